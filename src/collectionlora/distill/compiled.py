"""torch.compile for the anchor phase: its steps are all alike (the student, with gradients, on one
padded batch shape), so one compile serves thousands of steps. On the tiny CPU base eager PyTorch
spends most of a step in small element-wise kernels and their Python dispatch; the compiled graph
fuses them (bench_distill.py measures the gain against the compile's own time).

The iterations stay eager: they switch adapters and batch shapes from call to call, and each new
combination would cost a compile of its own.
"""

from __future__ import annotations

import os
import shutil

import torch

from collectionlora.errors import ConfigError


def require_compiler(device: torch.device) -> None:
    """Inductor writes C++ for CPU graphs (and Triton's launchers need a C compiler on CUDA): fail at
    start, not after the run's set-up, when there is none."""
    candidates = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "clang++"]
    if not any(shutil.which(name) for name in candidates):
        raise ConfigError(
            f"distill.compile_anchor: torch.compile on {device.type} needs a C++ compiler ({' or '.join(candidates)} not found); "
            "install one or set distill.compile_anchor: false"
        )


def compiled_transformer(transformer: torch.nn.Module) -> torch.nn.Module:
    """A compiled view of `transformer` (same parameters and adapters): one static-shape graph, and
    an error rather than a silent fallback if the model stops tracing as one graph."""
    return torch.compile(transformer, dynamic=False, fullgraph=True)
