"""LoRA adapters on ONE shared base: trainable ones (student, critic, a teacher in training) and
frozen effect teachers, switched per forward pass.

The reference keeps three copies of the base; we keep one transformer and name adapters on it.
Teachers are lazy: a teacher is a memory-mapped safetensors file until it is activated, when its
tensors are copied into a "slot" adapter shared by every teacher with the same per-module ranks.
Host memory therefore does not grow with the number of teachers, and teachers may differ in rank,
alpha and target modules (alpha/r is folded into B, so slots depend on ranks only).

peft flips `requires_grad` on every `set_adapter` (only the active adapter becomes trainable);
`activate` re-asserts the rule after each switch: trainable adapters keep their gradients,
teacher slots never get any.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model_state_dict

from collectionlora import lora_forward, lorafile
from collectionlora.errors import LoraFileError

NONE = "none"


def _add_adapter(transformer: torch.nn.Module, config: PeftLoraConfig, name: str) -> None:
    """diffusers' `add_adapter`, without peft's "Already found a `peft_config` attribute ... multiple
    adapters" UserWarning. peft warns whenever a model that has an adapter gets another (its tuner sees the
    model's `peft_config`); several named adapters on one base, exactly one active per forward, is this
    module's design, so the warning is harmless here and only noise in every distill and evaluate run."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute", category=UserWarning)
        transformer.add_adapter(config, adapter_name=name)


@dataclass
class _Teacher:
    path: Path
    lora: lorafile.LoraWeights
    slot: str
    values_checked: bool = False  # NaN/inf checked on the first load; later loads only copy


class AdapterSet:
    """Named adapters on `transformer`; exactly one (or none = the base model) is active at a time."""

    def __init__(self, transformer: torch.nn.Module):
        self.transformer = transformer
        self._trainable: dict[str, list[torch.nn.Parameter]] = {}
        self._teachers: dict[str, _Teacher] = {}
        self._slots: dict[str, dict[str, torch.nn.Parameter]] = {}
        self._slot_content: dict[str, str] = {}
        self._slot_by_signature: dict[str, str] = {}
        self.active = NONE
        self.switches = 0  # activations that changed the active adapter (cost accounting)
        self.loads = 0  # teacher weights copied into a slot
        self._base_shapes = lorafile.base_linear_shapes(transformer)
        self.merged_forward = lora_forward.merged_forward_applies(transformer)  # lora_forward.py: when it applies

    # ---- trainable adapters -------------------------------------------------------------------
    def add_trainable(self, name: str, rank: int, alpha: float, targets: list[str], seed: int) -> list[torch.nn.Parameter]:
        """A new LoRA (A random, B zero: starts as the base model), trainable, returned as a parameter list."""
        self._check_new(name)
        config = PeftLoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, bias="none")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            _add_adapter(self.transformer, config, name)
        self._trainable[name] = [p for n, p in self.transformer.named_parameters() if f".{name}." in n]
        for param in self._trainable[name]:  # fp32 master weights, whatever the base dtype (peft casts inputs)
            param.data = param.data.float()
        self._apply(self.active)  # peft activates a newly added adapter; keep the current one
        self._restore_grad_rule()
        self._route()
        return self._trainable[name]

    def lora_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """The adapter's weights with diffusers' module keys (no adapter name), for save_lora_weights."""
        return {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.transformer, adapter_name=name).items()}

    def peft_config(self, name: str) -> dict:
        return self.transformer.peft_config[name].to_dict()

    def remove(self, name: str) -> None:
        if self.active == name:
            self.activate(NONE)
        self.transformer.delete_adapters(name)
        self._trainable.pop(name, None)
        self._apply(self.active)
        self._restore_grad_rule()
        self._route()

    # ---- teachers -----------------------------------------------------------------------------
    def add_teacher(self, name: str, path: Path) -> None:
        """Register a teacher LoRA file; only its header is read now (shape-checked against the base)."""
        self._check_new(name)
        lora = lorafile.read_lora_header(Path(path), self._base_shapes)
        signature = json.dumps(sorted(lora.ranks().items()))
        slot = self._slot_by_signature.get(signature)
        if slot is None:
            slot = f"teacher_slot_{len(self._slot_by_signature)}"
            self._create_slot(slot, lora)
            self._slot_by_signature[signature] = slot
        self._teachers[name] = _Teacher(Path(path), lora, slot)

    def _create_slot(self, slot: str, lora: lorafile.LoraWeights) -> None:
        ranks = lora.ranks()
        # alpha = rank per module: the slot's scale is 1, each teacher's own alpha/r is folded into B.
        config = lorafile.peft_config_for_ranks(ranks, {m: float(r) for m, r in ranks.items()})
        _add_adapter(self.transformer, config, slot)
        self._apply(self.active)
        params = {}
        for full_name, param in self.transformer.named_parameters():
            if f".{slot}." in full_name:
                module, kind = full_name.split(f".{slot}.")[0].rsplit(".", 1)
                params[f"{module}.{kind}"] = param
        self._slots[slot] = params
        self._restore_grad_rule()
        self._route()

    def drop_teacher(self, name: str) -> None:
        """Forget a registered teacher (its slot stays for teachers of the same shape)."""
        teacher = self._teachers.pop(name)
        if self._slot_content.get(teacher.slot) == name:
            del self._slot_content[teacher.slot]
        if self.active == name:
            self.activate(NONE)

    def evict_teachers(self) -> None:
        """Forget what the slots hold, as in a fresh process: each teacher's next activation copies its
        weights in again (a cold start for cost accounting). Call it with no teacher active."""
        if self.active in self._teachers:
            raise ValueError(f"evict_teachers with teacher {self.active!r} active")
        self._slot_content.clear()

    # ---- switching ----------------------------------------------------------------------------
    def activate(self, name: str) -> None:
        """Make `name` the only active adapter; NONE runs the plain base model."""
        if name == self.active:
            return
        self.switches += 1
        if self._shares_active_slot(name):  # teacher to teacher: new weights, same peft state
            self._load_teacher(name)
            self.active = name
            return
        self._apply(name)
        self.active = name
        self._restore_grad_rule()

    def _shares_active_slot(self, name: str) -> bool:
        current = self._teachers.get(self.active)
        return current is not None and name in self._teachers and self._teachers[name].slot == current.slot

    def _apply(self, name: str) -> None:
        """Put the transformer in `name`'s state (peft also changes it when adapters are added or deleted)."""
        if name == NONE:
            if self._trainable or self._slots:  # with no adapter left there is nothing to disable
                self.transformer.disable_adapters()
            return
        if name in self._teachers:
            adapter = self._load_teacher(name)
        elif name in self._trainable:
            adapter = name
        else:
            raise KeyError(f"unknown adapter {name!r}; known: {sorted([*self._trainable, *self._teachers])}")
        self.transformer.enable_adapters()
        self.transformer.set_adapter(adapter)

    def _load_teacher(self, name: str) -> str:
        teacher = self._teachers[name]
        if self._slot_content.get(teacher.slot) == name:
            return teacher.slot
        params = self._slots[teacher.slot]
        with torch.no_grad():
            for module, down, up in teacher.lora.pairs(check_values=not teacher.values_checked):
                params[f"{module}.lora_A"].copy_(down)
                params[f"{module}.lora_B"].copy_(up * teacher.lora.modules[module].scale)
            missing = set(params) - {f"{m}.lora_{k}" for m in teacher.lora.ranks() for k in "AB"}
            if missing:  # cannot happen for slots built from the same rank map; guard against drift
                raise LoraFileError(f"{teacher.path}: teacher does not cover slot modules {sorted(missing)[:3]}")
        teacher.values_checked = True
        self._slot_content[teacher.slot] = name
        self.loads += 1
        return teacher.slot

    def _route(self) -> None:
        """Adapted linears as one matmul with the merged weight where that applies (lora_forward.py)."""
        if self.merged_forward:
            lora_forward.install(self.transformer)

    def _restore_grad_rule(self) -> None:
        for params in self._trainable.values():
            for p in params:
                p.requires_grad_(True)
        for params in self._slots.values():
            for p in params.values():
                p.requires_grad_(False)

    def _check_new(self, name: str) -> None:
        if name == NONE or name in self._trainable or name in self._teachers:
            raise ValueError(f"adapter name {name!r} is reserved or already used")
