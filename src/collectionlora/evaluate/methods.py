"""The methods compared by the evaluation, each as what a deployment would run: which LoRA is active for
an effect, which prompt it gets, which sampler, and what it stores besides the base.

Stacked LoRAs (an effect LoRA + the acceleration LoRA, as users cascade them with diffusers'
`set_adapters([...], [1, 1])`) are evaluated as their exact sum: a `cat` merge of the two files, whose
delta is B_1 A_1 + B_2 A_2. One adapter per forward therefore covers every method.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from collectionlora.adapters import AdapterSet
from collectionlora.bank import Bank
from collectionlora.config import Params
from collectionlora.distill.export import LORA_WEIGHTS
from collectionlora.distill.prompting import PromptPlan
from collectionlora.errors import CollectionLoraError, ConfigError
from collectionlora.evaluate.baselines import FM_ALL_IN_ONE, MERGES
from collectionlora.lorafile import (
    LoraWeights,
    base_linear_shapes,
    read_lora,
    write_lora,
)
from collectionlora.merging import merge_weights
from collectionlora.models.backbone import Backbone
from collectionlora.sampling import student_timesteps


@dataclass
class Method:
    """One row of the methods table. `adapters[effect]` is the adapter of `adapter_set` active for that
    effect, None for a fused model; `timesteps` is the few-step list, or None for the teacher sampler."""

    name: str
    label: str
    backbone: Backbone
    adapter_set: AdapterSet | None
    adapters: dict[str, str | None]
    prompts: dict[str, str]
    timesteps: list[float] | None
    nfe: int
    stored_files: list[Path] = field(default_factory=list)
    stored_bytes: int = 0
    notes: dict[str, float] = field(default_factory=dict)


def method_names(params: Params) -> list[str]:
    """Every method name the `evaluate.methods` families expand to, in table order."""
    names = []
    for family in params.evaluate.methods:
        if family == "merges":
            names += [f"merge_{m}" for m in params.baselines.merges.methods]
        elif family == "student":
            names += [f"student_{k}nfe" for k in params.evaluate.student_steps]
        elif family == "fused":
            names += [f"fused_{d}" for d in params.evaluate.fused_dtypes]
        else:
            names.append(family)
    return names


def check_gate_methods(params: Params, where: Path) -> None:
    """The gate may only name evaluated methods: found before anything runs."""
    names, gate = method_names(params), params.evaluate.gate
    for field_name, wanted in (("student", [gate.student]), ("teacher", [gate.teacher]), ("beat_bcr_of", gate.beat_bcr_of)):
        missing = [name for name in wanted if name not in names]
        if missing:
            raise ConfigError(f"{where}: evaluate.gate.{field_name}: {missing} not among the evaluated methods {names}")


class MethodBuilder:
    """Registers every method's adapters on one shared base (fused methods get their own base copy)."""

    def __init__(self, params: Params, bank: Bank, backbone: Backbone, collection: Path, plan: PromptPlan, baselines: Path | None):
        self.params, self.bank, self.backbone = params, bank, backbone
        self.collection, self.plan, self.baselines = Path(collection), plan, baselines
        self.adapters = AdapterSet(backbone.transformer)
        self.effects = [e.id for e in bank.effects]
        self._work = tempfile.TemporaryDirectory(prefix="collectionlora-eval-")
        self._shapes = base_linear_shapes(backbone.transformer)
        self._read: dict[Path, LoraWeights] = {}  # the acceleration LoRA is stacked on many: read it once

    def close(self) -> None:
        self._work.cleanup()

    def build(self) -> list[Method]:
        """Every method, the teachers first: the others are compared with their outputs."""
        methods = []
        for family in sorted(self.params.evaluate.methods, key=lambda family: family != "teacher"):
            methods += getattr(self, f"_{family}")()
        return methods

    # ---- families -------------------------------------------------------------------------------
    def _teacher(self) -> list[Method]:
        adapters = {}
        for effect in self.bank.effects:
            adapters[effect.id] = f"teacher:{effect.id}"
            self.adapters.add_teacher(adapters[effect.id], effect.teacher)
        sampling = self.params.sampling
        nfe = sampling.teacher_steps * (2 if sampling.teacher_cfg_scale != 1.0 else 1)
        files = [e.teacher for e in self.bank.effects]
        return [self._method("teacher", f"Teachers, {nfe} NFE (Base)", adapters, self._teacher_prompts(), None, nfe, files)]

    def _cascade(self) -> list[Method]:
        acceleration = self._acceleration()
        adapters = {}
        for effect in self.bank.effects:
            adapters[effect.id] = f"cascade:{effect.id}"
            self.adapters.add_teacher(adapters[effect.id], self._stacked(f"cascade-{effect.id}", effect.teacher, acceleration))
        files = [e.teacher for e in self.bank.effects] + [acceleration]
        return [self._few_step("cascade", "Teacher + acceleration (Base + Lightning)", adapters, self._teacher_prompts(), files)]

    def _fm_all_in_one(self) -> list[Method]:
        fm = self._baseline_file(f"{FM_ALL_IN_ONE}/{LORA_WEIGHTS}")
        acceleration = self._acceleration()
        self.adapters.add_teacher(FM_ALL_IN_ONE, self._stacked(FM_ALL_IN_ONE, fm, acceleration))
        adapters = dict.fromkeys(self.effects, FM_ALL_IN_ONE)
        return [self._few_step(FM_ALL_IN_ONE, "FM all-in-1 + acceleration", adapters, self._student_prompts(), [fm, acceleration])]

    def _merges(self) -> list[Method]:
        acceleration = self._acceleration()
        methods = []
        for merge in self.params.baselines.merges.methods:
            name = f"merge_{merge}"
            merged = self._baseline_file(f"{MERGES}/{merge}/{LORA_WEIGHTS}")
            self.adapters.add_teacher(name, self._stacked(name, merged, acceleration))
            adapters = dict.fromkeys(self.effects, name)
            methods.append(self._few_step(name, f"PEFT merge ({merge}) + acceleration", adapters, self._teacher_prompts(), [merged, acceleration]))
        return methods

    def _student(self) -> list[Method]:
        student = self.collection / LORA_WEIGHTS
        self.adapters.add_teacher("student", student)
        adapters = dict.fromkeys(self.effects, "student")
        return [
            self._method(f"student_{k}nfe", f"Student, {k} NFE (ours)", adapters, self._student_prompts(), student_timesteps(self.params.sampling, k), k, [student])
            for k in self.params.evaluate.student_steps
        ]

    def _fused(self) -> list[Method]:
        methods = []
        student = self.collection / LORA_WEIGHTS
        for dtype in self.params.evaluate.fused_dtypes:
            backbone, notes = fuse_lora_into_base(self.params, self.bank, student, dtype)
            stored = sum(p.numel() * p.element_size() for p in backbone.transformer.parameters())
            method = Method(
                f"fused_{dtype}", f"Student fused into the base, {dtype}", backbone, None, dict.fromkeys(self.effects),
                self._student_prompts(), self._timesteps(), len(self._timesteps()), stored_bytes=stored,
                notes=notes,
            )
            methods.append(method)
        return methods

    # ---- helpers --------------------------------------------------------------------------------
    def _method(self, name: str, label: str, adapters: dict, prompts: dict, timesteps: list[float] | None, nfe: int, files: list[Path]) -> Method:
        return Method(name, label, self.backbone, self.adapters, adapters, prompts, timesteps, nfe, files, sum(Path(f).stat().st_size for f in files))

    def _few_step(self, name: str, label: str, adapters: dict, prompts: dict, files: list[Path]) -> Method:
        timesteps = self._timesteps()
        return self._method(name, label, adapters, prompts, timesteps, len(timesteps), files)

    def _timesteps(self) -> list[float]:
        return student_timesteps(self.params.sampling)

    def _teacher_prompts(self) -> dict[str, str]:
        return {e.id: e.prompt for e in self.bank.effects}

    def _student_prompts(self) -> dict[str, str]:
        return {effect: self.plan.student(effect) for effect in self.effects}

    def _acceleration(self) -> Path:
        return acceleration_lora(
            self.bank, "which the cascade, FM all-in-1 and merge baselines stack (train one with `collectionlora acceleration train`, or drop those methods)"
        )

    def _baseline_file(self, relative: str) -> Path:
        if self.baselines is None or not (Path(self.baselines) / relative).is_file():
            raise CollectionLoraError(f"{self.baselines}: no {relative}; run `collectionlora baselines` first")
        return Path(self.baselines) / relative

    def _stacked(self, name: str, first: Path, second: Path) -> Path:
        """The exact sum of two LoRAs as one file (a cat merge); `second` is the shared acceleration LoRA."""
        if second not in self._read:
            self._read[second] = read_lora(second, self._shapes)
        return write_stacked(read_lora(first, self._shapes), self._read[second], Path(self._work.name) / f"{name}.safetensors")


def acceleration_lora(bank: Bank, needed_by: str) -> Path:
    """The bank's few-step LoRA, or a one-line error ending in `needed_by` (what needs it, what to do)."""
    if bank.acceleration is None:
        raise CollectionLoraError(f"{bank.manifest}: acceleration: the bank has no acceleration LoRA, {needed_by}")
    return bank.acceleration


def write_stacked(first: LoraWeights, second: LoraWeights, path: Path) -> Path:
    """Two LoRAs applied together (diffusers' `set_adapters([a, b], [1, 1])`) as one file: their exact
    sum, a `cat` merge whose delta is B_1 A_1 + B_2 A_2, so one adapter per forward runs the stack."""
    merged = merge_weights([first, second], "cat", None, rank=1, density=1.0, majority_sign_method="total", seed=0)
    write_lora(merged, path, "diffusers")
    return path


def fuse_lora_into_base(params: Params, bank: Bank, lora: Path, dtype: str) -> tuple[Backbone, dict[str, float]]:
    """A fresh base in `dtype` with the LoRA fused into its weights the stock diffusers way
    (`load_lora_weights`, `fuse_lora`, `unload_lora_weights`). Also returns the share of the LoRA's
    float32 delta the fused weights carry: <W_fused - W, delta> / |delta|^2 over the adapted layers
    (1 in float32; rounding W + delta to bf16 can erase a delta that is small against W), and that
    relative size, |delta| / |W|."""
    backbone = Backbone.load(params.base.model_copy(update={"dtype": dtype}), bank.base_dir)
    weights = read_lora(lora, base_linear_shapes(backbone.transformer))
    parameters = dict(backbone.transformer.named_parameters())
    before = {module: parameters[f"{module}.weight"].detach().float().clone() for module in weights.modules}
    backbone.pipe.load_lora_weights(str(lora.parent), weight_name=lora.name, adapter_name="fused")
    backbone.pipe.fuse_lora(components=["transformer"], lora_scale=1.0)
    backbone.pipe.unload_lora_weights()
    after = dict(backbone.transformer.named_parameters())
    carried, total, base = 0.0, 0.0, 0.0
    with torch.no_grad():
        for module, down, up in weights.pairs():
            delta = (up.float() @ down.float()) * weights.modules[module].scale
            change = after[f"{module}.weight"].float() - before[module]
            carried += float((change * delta).sum())
            total += float(delta.pow(2).sum())
            base += float(before[module].pow(2).sum())
    if total == 0.0:
        raise CollectionLoraError(f"{lora}: the LoRA's delta is zero; nothing to fuse")
    return backbone, {"fused_delta_kept": carried / total, "fused_delta_to_weight": (total / base) ** 0.5}
