"""PEFT merges of effect-teacher LoRAs into one LoRA: the "PEFT merges" baseline of the evaluation.

Works from the LoRA files alone (no model, no forward pass), one module at a time: memory holds one
module's tensors of every teacher, never a whole teacher. The methods follow peft's
`add_weighted_adapter(combination_type=...)` (peft 0.21) and call its `merge_utils` where peft does:

- `cat`: A's stacked, B's side by side with weight * alpha/r folded into each B. Exact:
  delta = sum_i w_i s_i B_i A_i; the rank is the sum of the teachers' ranks.
- `linear`: peft's `linear`, which mixes the factors, not the deltas (see `_linear`); equal ranks only.
- `svd`: the weighted sum of deltas, truncated by SVD to `rank` (peft's `svd`).
- `ties`, `dare_ties`: peft's `merge_utils.ties` / `dare_ties` on the full deltas, then the same SVD
  truncation, i.e. peft's `ties_svd` / `dare_ties_svd`. peft's plain `ties` / `dare_ties` prune and
  sign-elect A and B separately, which needs equal ranks and mixes factors of different teachers.

A module missing from some teachers counts as a zero delta. Like peft, only the teachers holding the
module enter its merge; this is the same result (a zero entry is pruned, casts no sign vote and does
not count in the TIES mean) except that DARE draws fewer random masks. DARE is random: the whole merge
runs under its own seeded RNG, modules in name order, so one seed gives one file.

The merged LoRA has scale 1 (alpha = rank per module) and float32 tensors.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal, get_args

import torch
from peft.utils import merge_utils

from collectionlora.errors import CollectionLoraError
from collectionlora.lorafile import LoraWeights, WriteLayout, read_lora, write_lora

MergeMethod = Literal["linear", "ties", "dare_ties", "svd", "cat"]
MERGE_METHODS: tuple[str, ...] = get_args(MergeMethod)
SignMethod = Literal["total", "frequency"]
SIGN_METHODS: tuple[str, ...] = get_args(SignMethod)
# diffusers' default weight name, so that `pipe.load_lora_weights(<method folder>)` finds the file.
MERGED_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
_SVD_METHODS = ("svd", "ties", "dare_ties")
_DENSITY_METHODS = ("ties", "dare_ties")


class MergeError(CollectionLoraError):
    """Teacher LoRAs cannot be merged as asked: unknown method, bad weights, unequal ranks, NaN/inf result."""


class _Part:
    """One teacher's tensors for the module being merged, in float32."""

    def __init__(self, source: str, weight: float, scale: float, down: torch.Tensor, up: torch.Tensor):
        self.source = source
        self.weight = weight
        self.scale = scale
        self.down = down.float()
        self.up = up.float()

    def delta(self) -> torch.Tensor:
        """scale * B @ A, computed in peft's order (`get_delta_weight`)."""
        return (self.up @ self.down) * self.scale


def merge_loras(
    paths: Sequence[Path],
    method: str,
    weights: Sequence[float] | None,
    *,
    rank: int,
    density: float,
    majority_sign_method: str,
    seed: int,
    base_shapes: dict[str, tuple[int, int]] | None,
) -> LoraWeights:
    """Read the teacher files (checked against `base_shapes`) and merge them into one LoRA with `method`."""
    loras = [read_lora(Path(path), base_shapes) for path in paths]
    return merge_weights(
        loras, method, weights, rank=rank, density=density, majority_sign_method=majority_sign_method, seed=seed
    )


def merge_weights(
    loras: Sequence[LoraWeights],
    method: str,
    weights: Sequence[float] | None,
    *,
    rank: int,
    density: float,
    majority_sign_method: str,
    seed: int,
) -> LoraWeights:
    """Merge already-read teachers. `weights` None means 1.0 each (every effect at full strength);
    `rank` is the target rank of svd/ties/dare_ties; `density` and `majority_sign_method` are TIES/DARE's."""
    if not loras:
        raise MergeError("paths: no LoRA files to merge")
    _check_settings(method, rank, density, majority_sign_method)
    factors = _check_weights(weights, loras)
    merged: dict[str, tuple[torch.Tensor, torch.Tensor, float | None]] = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module, parts in _aligned_modules(loras, factors):
            if module in merged:  # pairs() yields modules in name order; guard the alignment on it
                raise MergeError(f"{parts[0].source}: module {module}: listed twice or out of order")
            _check_shapes(module, parts)
            down, up = _merge_module(method, module, parts, rank, density, majority_sign_method)
            if not (torch.isfinite(down).all() and torch.isfinite(up).all()):
                raise MergeError(f"{method} merge: module {module}: result is not finite (NaN or inf); check weights")
            merged[module] = (down, up, None)
    return LoraWeights.from_tensors(merged)


def write_merges(
    paths: Sequence[Path],
    out_dir: Path,
    methods: Sequence[str],
    weights: Sequence[float] | None,
    *,
    rank: int,
    density: float,
    majority_sign_method: str,
    seed: int,
    base_shapes: dict[str, tuple[int, int]] | None,
    layout: WriteLayout,
) -> dict[str, Path]:
    """One merged LoRA per method at `out_dir/<method>/pytorch_lora_weights.safetensors`; teachers are
    read (and checked) once, every setting is checked before the first file is written."""
    if not paths:
        raise MergeError("paths: no LoRA files to merge")
    for method in methods:
        _check_settings(method, rank, density, majority_sign_method)
    loras = [read_lora(Path(path), base_shapes) for path in paths]
    _check_weights(weights, loras)
    written: dict[str, Path] = {}
    for method in methods:
        merged = merge_weights(
            loras, method, weights, rank=rank, density=density, majority_sign_method=majority_sign_method, seed=seed
        )
        written[method] = Path(out_dir) / method / MERGED_WEIGHT_NAME
        write_lora(merged, written[method], layout)
    return written


def _check_settings(method: str, rank: int, density: float, majority_sign_method: str) -> None:
    if method not in MERGE_METHODS:
        raise MergeError(f"method: unknown merge method {method!r}; choose from {', '.join(MERGE_METHODS)}")
    if method in _SVD_METHODS and not (isinstance(rank, int) and rank >= 1):
        raise MergeError(f"rank: the {method} merge needs a target rank >= 1, got {rank!r}")
    if method in _DENSITY_METHODS:
        if not (isinstance(density, (int, float)) and 0 < density <= 1):
            raise MergeError(f"density: the {method} merge keeps this share of each delta, in (0, 1]; got {density!r}")
        if majority_sign_method not in SIGN_METHODS:
            raise MergeError(
                f"majority_sign_method: unknown {majority_sign_method!r}; choose from {', '.join(SIGN_METHODS)}"
            )


def _check_weights(weights: Sequence[float] | None, loras: Sequence[LoraWeights]) -> list[float]:
    if weights is None:
        return [1.0] * len(loras)
    if len(weights) != len(loras):
        raise MergeError(
            f"weights: {len(weights)} values for {len(loras)} LoRA files ({', '.join(lora.source for lora in loras)})"
        )
    for i, weight in enumerate(weights):
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise MergeError(f"weights[{i}] ({loras[i].source}): must be a finite number, got {weight!r}")
    return [float(weight) for weight in weights]


def _aligned_modules(loras: Sequence[LoraWeights], factors: list[float]) -> Iterator[tuple[str, list[_Part]]]:
    """(module, parts of the teachers holding it) over the union of modules in name order, reading one
    module of every file at a time (`LoraWeights.pairs` yields modules sorted by name)."""
    streams = [lora.pairs() for lora in loras]
    try:
        heads = [next(stream, None) for stream in streams]
        while any(head is not None for head in heads):
            module = min(head[0] for head in heads if head is not None)
            parts = []
            for i, head in enumerate(heads):
                if head is not None and head[0] == module:
                    scale = loras[i].modules[module].scale
                    parts.append(_Part(loras[i].source, factors[i], scale, head[1], head[2]))
                    heads[i] = next(streams[i], None)
            yield module, parts
    finally:
        for stream in streams:
            stream.close()


def _check_shapes(module: str, parts: list[_Part]) -> None:
    """Without base shapes the files are not checked against a base; they must at least agree."""
    first = parts[0]
    for part in parts[1:]:
        if part.down.shape[1] != first.down.shape[1] or part.up.shape[0] != first.up.shape[0]:
            raise MergeError(
                f"{part.source}: module {module}: shape (out={part.up.shape[0]}, in={part.down.shape[1]}) differs "
                f"from {first.source} (out={first.up.shape[0]}, in={first.down.shape[1]})"
            )


def _merge_module(
    method: str, module: str, parts: list[_Part], rank: int, density: float, majority_sign_method: str
) -> tuple[torch.Tensor, torch.Tensor]:
    if method == "cat":
        return _cat(parts)
    if method == "linear":
        return _linear(module, parts)
    deltas = [part.delta() for part in parts]
    weights = torch.tensor([part.weight for part in parts])
    if method == "svd":
        delta = merge_utils.task_arithmetic(deltas, weights)
    elif method == "ties":
        delta = merge_utils.ties(deltas, weights, density, majority_sign_method)
    else:
        delta = merge_utils.dare_ties(deltas, weights, density, majority_sign_method)
    if not torch.isfinite(delta).all():
        raise MergeError(f"{method} merge: module {module}: result is not finite (NaN or inf); check weights")
    return _truncate(delta, rank)


def _cat(parts: list[_Part]) -> tuple[torch.Tensor, torch.Tensor]:
    """peft folds weight * scale into A; we fold it into B (as the teacher slots do): the same delta."""
    down = torch.cat([part.down for part in parts], dim=0)
    up = torch.cat([part.up * (part.weight * part.scale) for part in parts], dim=1)
    return down, up


def _linear(module: str, parts: list[_Part]) -> tuple[torch.Tensor, torch.Tensor]:
    """peft's `linear`: A = sum_i sign(w_i s_i) sqrt(|w_i s_i|) A_i and B = sum_i sqrt(|w_i s_i|) B_i.

    It combines the factors rather than the deltas, so it is defined only when every teacher has the
    same rank (peft refuses otherwise), and B A then holds cross terms B_i A_j: a rough approximation
    of the weighted delta sum (use `svd` or `cat` for the exact one). Ranks are checked per module.
    """
    ranks = {part.source: part.down.shape[0] for part in parts}
    if len(set(ranks.values())) > 1:
        listed = ", ".join(f"{source} r={r}" for source, r in ranks.items())
        raise MergeError(f"linear merge: module {module}: needs equal ranks, got {listed}; use svd or cat")
    signed, unsigned = [], []
    for part in parts:
        weight_with_scaling = part.weight * part.scale
        root = math.sqrt(abs(weight_with_scaling))
        signed.append(root if weight_with_scaling >= 0 else -root)
        unsigned.append(root)
    down = merge_utils.task_arithmetic([part.down for part in parts], torch.tensor(signed))
    up = merge_utils.task_arithmetic([part.up for part in parts], torch.tensor(unsigned))
    return down, up


def _truncate(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-`rank` factors of `delta` (Eckart-Young), as peft does: B = U_r diag(S_r), A = Vh_r.
    A rank above min(out, in) keeps min(out, in), which is already exact."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    keep = min(rank, s.shape[0])
    return vh[:keep, :].contiguous(), (u[:, :keep] * s[:keep]).contiguous()
