"""Full-state training checkpoints: one folder per step holding everything needed to resume exactly.

`weights.safetensors` holds the student and critic LoRA parameters, both AdamW states and the torch
RNG state; `state.json` the step, data positions, counters and the config fingerprint. A folder is
written under a temporary name and renamed, so a checkpoint either exists whole or not at all.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from collectionlora.errors import CollectionLoraError
from collectionlora.lorafile import ordinary_permissions, replace_folder, save_safetensors

WEIGHTS = "weights.safetensors"
STATE = "state.json"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


class CheckpointError(CollectionLoraError):
    """A checkpoint is missing, malformed, or was made with different params."""


@dataclass
class TrainState:
    """Everything besides tensors that the next step depends on."""

    step: int = 0
    effect_batches: int = 0  # data position: effect-stream steps taken so far
    general_batches: int = 0
    generator_updates: int = 0
    anchor_updates: int = 0  # TA-FM-only updates of the anchor phase
    critic_updates: int = 0
    stream_counts: dict[str, int] = field(default_factory=lambda: {"effect": 0, "general": 0})
    nonfinite_skipped: int = 0
    nonfinite_in_a_row: int = 0
    tracking_run_id: str | None = None  # the MLflow run a resumed run continues
    # The last generator step's batch (rebuilt from these) and samples, reused by critic-only steps.
    cached_step: int | None = None
    cached_stream: str | None = None
    cached_effects: list[str] | None = None
    # What metrics.json reports for the whole run, carried over a resume: the trainer's Timings fields,
    # the adapter set's teacher loads and switches, and the run's seconds up to this checkpoint.
    timings: dict[str, float] = field(default_factory=dict)
    adapter_counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class Checkpoint:
    state: TrainState
    fingerprint: dict
    tensors: dict[str, torch.Tensor]
    path: Path


def optimizer_tensors(prefix: str, optimizer: torch.optim.Optimizer, names: list[str]) -> dict[str, torch.Tensor]:
    """AdamW's per-parameter state keyed by parameter name (optimizer order = `names` order)."""
    params = optimizer.param_groups[0]["params"]
    out = {}
    for name, param in zip(names, params, strict=True):
        for key, value in optimizer.state.get(param, {}).items():
            out[f"{prefix}/{name}/{key}"] = value.detach().cpu().clone().contiguous()
    return out


def restore_optimizer(prefix: str, optimizer: torch.optim.Optimizer, names: list[str], tensors: dict[str, torch.Tensor]) -> None:
    params = optimizer.param_groups[0]["params"]
    for name, param in zip(names, params, strict=True):
        keys = [k for k in tensors if k.startswith(f"{prefix}/{name}/")]
        if keys:
            optimizer.state[param] = {k.rsplit("/", 1)[1]: tensors[k].to(param.device) for k in keys}


def save_checkpoint(folder: Path, state: TrainState, fingerprint: dict, tensors: dict[str, torch.Tensor], keep: int) -> Path:
    """Write checkpoints/step-NNNNNNNN atomically, then delete all but the newest `keep`."""
    folder.mkdir(parents=True, exist_ok=True)
    for leftover in folder.glob(".step-*"):  # staging folders of a killed run (the output lock: no other writer)
        shutil.rmtree(leftover, ignore_errors=True)
    final = folder / f"step-{state.step:08d}"
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=folder))
    try:
        save_safetensors({k: v.contiguous() for k, v in tensors.items()}, staging / WEIGHTS)
        record = {"state": asdict(state), "fingerprint": fingerprint}
        (staging / STATE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        ordinary_permissions(staging)
        replace_folder(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # a full disk gets its space back
        raise
    for stale in list_checkpoints(folder)[:-keep]:
        shutil.rmtree(stale)
    return final


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of an interrupted write are ignored)."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name)[1]))


def load_checkpoint(path: Path) -> Checkpoint:
    """A checkpoint folder read whole; a damaged file (a truncated copy, a full disk) is one line naming it."""
    remedy = f"remove {path} to resume from the checkpoint before it, or start a new run"
    try:
        record = json.loads((path / STATE).read_text(encoding="utf-8"))
        state = TrainState(**record["state"])
        fingerprint = record["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{path / STATE}: unreadable checkpoint state ({' '.join(str(error).split())}); {remedy}") from error
    try:
        tensors = load_file(path / WEIGHTS)
    except (SafetensorError, OSError) as error:  # safetensors' own error is no OSError
        raise CheckpointError(f"{path / WEIGHTS}: unreadable checkpoint weights ({' '.join(str(error).split())}); {remedy}") from error
    return Checkpoint(state, fingerprint, tensors, path)


def check_fingerprint(checkpoint: Checkpoint, current: dict) -> None:
    """Resuming with different params would silently train something else: name the first difference."""
    for key in sorted(set(checkpoint.fingerprint) | set(current)):
        if checkpoint.fingerprint.get(key) != current.get(key):
            raise CheckpointError(
                f"{checkpoint.path / STATE}: fingerprint.{key}: the checkpoint was made with different params "
                f"({checkpoint.fingerprint.get(key)!r} != {current.get(key)!r}); start a new run or restore them"
            )
