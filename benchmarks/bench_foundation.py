"""Foundation benchmarks: ratios measured in one run, on the embedded tiny pipeline (2 CPU threads).

1. A teacher edit (40 steps x CFG = 80 NFE) against 8-step student sampling, same batch.
2. Adapter switch and adapter load (activating a teacher not yet resident) against one forward.
3. Host memory of a teacher bank of 5 vs 50 teachers: our lazy slots against loading every LoRA
   as its own resident adapter with diffusers' `load_lora_weights`. Each case runs in a fresh
   process so resident-set sizes do not mix.

Usage: python benchmarks/bench_foundation.py [--out artifacts/benchmarks/foundation.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import psutil
import torch

from collectionlora.adapters import AdapterSet
from collectionlora.base_pretrain import general_instructions
from collectionlora.config import load_params
from collectionlora.effects import make_sources
from collectionlora.lorafile import LoraWeights, base_linear_shapes, write_lora
from collectionlora.models.backbone import Backbone
from collectionlora.models.tiny import build_tiny_pipeline
from collectionlora.sampling import sample_student, sample_teacher, student_timesteps

REPO = Path(__file__).resolve().parents[1]
PROMPT = "Convert the photo to black and white"


def timed(fn, repeats: int) -> float:
    """Median wall time of `fn()` over `repeats` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


THREADS: dict = {}


def tiny_backbone(folder: Path) -> Backbone:
    params = load_params(REPO / "params.yaml", {"base": THREADS})
    if not (folder / "model_index.json").exists():
        build_tiny_pipeline(params.base.tiny, general_instructions(), seed=0).save_pretrained(folder)
    return Backbone.load(params.base, folder)


def write_teachers(backbone: Backbone, folder: Path, count: int) -> list[Path]:
    """`count` random rank-16 LoRAs on the params' target modules, as diffusers files."""
    params = load_params(REPO / "params.yaml")
    shapes = base_linear_shapes(backbone.transformer)
    modules = [m for m in shapes if any(m.endswith("." + t) for t in params.lora.targets)]
    paths = []
    for i in range(count):
        path = folder / f"teacher_{i:03d}" / "pytorch_lora_weights.safetensors"
        if not path.exists():
            generator = torch.Generator().manual_seed(i)
            tensors = {
                m: (torch.randn(params.lora.rank, shapes[m][1], generator=generator) * 0.01,
                    torch.randn(shapes[m][0], params.lora.rank, generator=generator) * 0.01, None)
                for m in modules
            }
            write_lora(LoraWeights.from_tensors(tensors), path, "diffusers")
        paths.append(path)
    return paths


def speed(workdir: Path) -> dict:
    backbone = tiny_backbone(workdir / "base")
    params = load_params(REPO / "params.yaml")
    sources = make_sources("eval", 4, params.base.resolution, 0)
    prompts, seeds = [PROMPT] * 4, [0, 1, 2, 3]
    backbone.encode_prompts(prompts, sources)
    backbone.encode_prompts([params.sampling.negative_prompt] * 4, sources)
    teacher = timed(lambda: sample_teacher(backbone, sources, prompts, seeds, params.sampling), 3)
    student = timed(lambda: sample_student(backbone, sources, prompts, seeds, student_timesteps(params.sampling)), 5)

    adapters = AdapterSet(backbone.transformer)
    paths = write_teachers(backbone, workdir / "teachers", 8)
    for i, path in enumerate(paths):
        adapters.add_teacher(f"t{i}", path)
    condition = backbone.encode_images(sources)
    text = backbone.encode_prompts(prompts, sources)
    x = torch.randn_like(condition)
    sigma = torch.full((4,), 0.5)

    def forward():
        with torch.no_grad():
            backbone.velocity(x, sigma, condition, text)

    adapters.activate("t0")
    one_forward = timed(forward, 20)
    order = iter([f"t{i % 8}" for i in range(1000)])
    load = timed(lambda: adapters.activate(next(order)), 20)  # every activation copies a new teacher in
    student_params = adapters.add_trainable("student", params.lora.rank, params.lora.alpha, params.lora.targets, 0)
    assert student_params
    flip = iter(["student", "none"] * 1000)
    switch = timed(lambda: adapters.activate(next(flip)), 20)  # resident adapters: switch only
    return {
        "teacher_edit_80nfe_s": teacher,
        "student_8step_s": student,
        "teacher_over_student_time": teacher / student,
        "one_forward_batch4_s": one_forward,
        "adapter_switch_over_forward": switch / one_forward,
        "adapter_load_over_forward": load / one_forward,
    }


def memory_case(workdir: Path, mode: str, count: int) -> float:
    """Resident-set growth (MB) from registering `count` teachers and running each once."""
    backbone = tiny_backbone(workdir / "base")
    paths = write_teachers(backbone, workdir / "teachers", count)
    sources = make_sources("eval", 1, backbone.resolution, 0)
    condition = backbone.encode_images(sources)
    text = backbone.encode_prompts([PROMPT], sources)
    x = torch.randn_like(condition)
    with torch.no_grad():
        backbone.velocity(x, torch.full((1,), 0.5), condition, text)
    before = psutil.Process().memory_info().rss
    if mode == "lazy_slots":
        adapters = AdapterSet(backbone.transformer)
        for i, path in enumerate(paths):
            adapters.add_teacher(f"t{i}", path)
        for i in range(count):
            adapters.activate(f"t{i}")
            with torch.no_grad():
                backbone.velocity(x, torch.full((1,), 0.5), condition, text)
    else:
        for i, path in enumerate(paths):
            backbone.pipe.load_lora_weights(str(path.parent), adapter_name=f"t{i}")
        for i in range(count):
            backbone.pipe.set_adapters(f"t{i}")
            with torch.no_grad():
                backbone.velocity(x, torch.full((1,), 0.5), condition, text)
    return (psutil.Process().memory_info().rss - before) / 2**20


def memory(workdir: Path) -> dict:
    results = {}
    for mode in ("lazy_slots", "resident_adapters"):
        for count in (5, 50):
            out = subprocess.run(
                [sys.executable, __file__, "--memory-case", mode, str(count), "--workdir", str(workdir),
                 *(["--threads", str(THREADS["threads"])] if THREADS else [])],
                check=True, capture_output=True, text=True,
            ).stdout.strip().splitlines()[-1]
            results[f"{mode}_{count}_mb"] = float(out)
    for mode in ("lazy_slots", "resident_adapters"):
        results[f"{mode}_50_over_5"] = results[f"{mode}_50_mb"] / max(results[f"{mode}_5_mb"], 1e-3)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "artifacts" / "benchmarks" / "foundation.json")
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--threads", type=int, help="torch threads (default: base.threads)")
    parser.add_argument("--memory-case", nargs=2, metavar=("MODE", "COUNT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        THREADS["threads"] = args.threads
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="clora-bench-"))
    if args.memory_case:
        print(memory_case(workdir, args.memory_case[0], int(args.memory_case[1])))
        return
    tiny_backbone(workdir / "base")
    write_teachers(tiny_backbone(workdir / "base"), workdir / "teachers", 50)
    results = {**speed(workdir), **memory(workdir)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    for key, value in results.items():
        print(f"{key:<36} {value:10.4f}")


if __name__ == "__main__":
    main()
