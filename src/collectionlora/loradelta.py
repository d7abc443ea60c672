"""How much a LoRA changes its base: the norm of its weight delta against the base weights it adapts.

A teacher whose delta is zero (B never trained) or negligible edits nothing, and distilling it only teaches
the student to ignore its trigger. The measure is one number per LoRA,

    sqrt(sum_m ||(alpha_m / r_m) B_m A_m||_F^2) / sqrt(sum_m ||W_m||_F^2)   over its adapted modules m,

the relative Frobenius norm of the whole delta, so that a few untouched modules (a LoRA often leaves some
B at zero) do not make a trained teacher look degenerate. ||B A||_F is computed from r x r Gram matrices,
never as an out x in product.
"""

from __future__ import annotations

import math
from pathlib import Path

from safetensors import SafetensorError, safe_open

from collectionlora.errors import BankError, LoraFileError
from collectionlora.lorafile import LoraWeights, transformer_weight_files


def delta_norms_squared(weights: LoraWeights) -> dict[str, float]:
    """||scale * B @ A||_F^2 per module, via trace((B^T B)(A A^T)) in float64."""
    norms = {}
    for name, down, up in weights.pairs(check_values=False):
        down, up = down.double(), up.double()
        gram = (up.T @ up) * (down @ down.T)  # both r x r and symmetric: the sum is the trace of their product
        norms[name] = float(gram.sum()) * weights.modules[name].scale ** 2
    return norms


def base_norms_squared(transformer_dir: Path, modules: set[str]) -> dict[str, float]:
    """||W||_F^2 of each named module's `.weight` in a diffusers `transformer/` folder, one tensor in memory at
    a time (every adapted base weight is read once, however many LoRAs share it)."""
    norms: dict[str, float] = {}
    for file in transformer_weight_files(transformer_dir):
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    module = key.removesuffix(".weight")
                    if key.endswith(".weight") and module in modules:
                        norms[module] = float(handle.get_tensor(key).double().square().sum())
        except (SafetensorError, OSError) as error:
            raise BankError(f"{file}: cannot read base weights ({' '.join(str(error).split())})") from error
    return norms


def relative_delta(weights: LoraWeights, base_norms: dict[str, float] | None) -> float:
    """The LoRA's relative delta (module docstring); with no base weights to compare with, its absolute norm."""
    deltas = delta_norms_squared(weights)
    total = sum(deltas.values())
    if base_norms is None or total == 0:
        return math.sqrt(total)
    base = sum(base_norms.get(name, 0.0) for name in deltas)
    return math.sqrt(total / base) if base > 0 else math.inf


def check_delta(path: Path, weights: LoraWeights, base_norms: dict[str, float] | None, minimum: float) -> float:
    """The relative delta, refused when zero or below `minimum` (bank.min_teacher_delta); with no base to
    compare with, only a zero delta is refused."""
    value = relative_delta(weights, base_norms)
    if value == 0:
        raise LoraFileError(f"{path}: the LoRA's delta B@A is zero in every module: it changes nothing (an untrained LoRA?)")
    if base_norms is not None and value < minimum:
        raise LoraFileError(
            f"{path}: the LoRA's delta is {value:.3g} of the base weights it adapts (relative Frobenius norm), "
            f"below bank.min_teacher_delta={minimum:g}: it changes (almost) nothing"
        )
    return value
