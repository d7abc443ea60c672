"""Where the time of the embedded demo goes, and how close the trainer runs to the machine: ratios
measured in one run on the demo bank (params.yaml as is, short budgets).

1. Machine: an fp32 2048x2048 matmul's GFLOP/s on 1 thread and on `base.threads` threads (the peak
   every utilization below is a share of).
2. Distillation under four layouts (one process x base.threads with peft's LoRA path; the same with
   the merged-weight forward of frozen adapters (lora_forward.py); that with the anchor phase compiled
   (distill.compile_anchor, the compile timed apart); and that on 2 processes x base.threads / 2):
   seconds per anchor step and per iteration, and the transformer work's GFLOP/s inside each as a share
   of the peak. Work = forward items x (FLOPs of one item's forward) + backward items x (one item's
   backward), FLOPs counted by torch's FlopCounterMode on peft's path (the least arithmetic; the merged
   path does more and finishes sooner).
3. Shares of an iteration (params.yaml's `distill.processes` layout): transformer forward, backward, batch assembly,
   optimizer, teacher switching, logging, checkpoints, the rest; and peft's side path as a share of the
   one-process iteration.
4. Shares of the other stages' time by component (transformer, text encoder, VAE, the rest): a rollout
   of two effects, an FM all-in-1 run, an evaluation of the teacher and the student on two eval sources
   per effect.
5. Rollout time when one effect is added to a bank whose rollouts exist, against a cold run; forwards
   per generator update against the reference's schedule.

Needs the demo bank (`dvc pull data.dvc`). Usage:
    python benchmarks/bench_distill.py [--steps 40] [--out artifacts/benchmarks/distill.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import torch
from torch.utils.flop_counter import FlopCounterMode

from collectionlora import lora_forward
from collectionlora.adapters import AdapterSet
from collectionlora.bank import open_bank
from collectionlora.config import Params, load_params
from collectionlora.models.backbone import Backbone
from collectionlora.stages import run_baselines, run_distill, run_evaluate, run_rollout

REPO = Path(__file__).resolve().parents[1]


def matmul_gflops(threads: int, size: int = 2048, repeats: int = 10) -> float:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(size, size), torch.randn(size, size)
        a @ b
        started = time.perf_counter()
        for _ in range(repeats):
            a @ b
        return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e9
    finally:
        torch.set_num_threads(previous)


def flops_per_item(params: Params) -> tuple[float, float]:
    """FLOPs of one item's transformer forward and backward with a rank-`distill.rank` LoRA on peft's
    path, at the distillation's batch size and the bank's prompts."""
    bank = open_bank(params.bank)
    backbone = Backbone.load(params.base, bank.base_dir)
    adapters = AdapterSet(backbone.transformer)
    adapters.add_trainable("student", params.distill.rank, params.distill.alpha, params.distill.targets, 0)
    lora_forward.uninstall(backbone.transformer)
    adapters.activate("student")
    size = params.distill.batch_size
    sources = bank.load_pairs(bank.effects[0])[0][:size]
    latents = backbone.encode_images(sources)
    text = backbone.encode_prompts([bank.effects[0].prompt] * len(sources), sources)
    with FlopCounterMode(display=False) as forward:
        velocity = backbone.velocity(torch.randn_like(latents), torch.full((len(sources),), 0.5), latents, text)
    with FlopCounterMode(display=False) as backward:
        velocity.square().mean().backward()
    return forward.get_total_flops() / len(sources), backward.get_total_flops() / len(sources)


def _with(params: Params, **sections: dict) -> Params:
    return params.model_copy(update={name: getattr(params, name).model_copy(update=values) for name, values in sections.items()})


def _distill(params: Params, rollouts: Path, out: Path, anchor_steps: int, max_steps: int, processes: int, merged: bool, compiled: bool) -> dict:
    every = anchor_steps + max_steps
    params = _with(
        params,
        distill={
            "anchor_steps": anchor_steps, "max_steps": max_steps, "checkpoint_every": every, "log_every": every, "processes": processes,
            "compile_anchor": compiled,
        },
        tracking={"uri": f"sqlite:///{out.parent / 'mlflow.db'}"},
    )
    if merged:
        return run_distill(params, rollouts, out)
    original = lora_forward.merged_forward_applies
    lora_forward.merged_forward_applies = lambda transformer: False  # peft's own path, for comparison
    try:
        return run_distill(params, rollouts, out)
    finally:
        lora_forward.merged_forward_applies = original


def utilization(summary: dict, per_item: tuple[float, float], peak: float) -> dict:
    """The run's transformer work (all ranks: rank 0's items x world size) over rank 0's transformer time."""
    world = summary["world_size"]
    work = world * (summary["transformer_forward_items"] * per_item[0] + summary["transformer_backward_items"] * per_item[1])
    seconds = summary["time_forward_s"] + summary["time_backward_s"]
    return {"gflops": work / seconds / 1e9, "share_of_peak": work / seconds / 1e9 / peak}


def training_cost(params: Params, rollouts: Path, workdir: Path, steps: int, per_item: tuple[float, float], peak: float) -> dict:
    """Each layout: (processes, merged frozen-adapter forward, compiled anchor phase). The compile is
    timed apart (time_compile_s) and left out of the per-step figures."""
    layouts = {
        "peft_1proc": (1, False, False),
        "merged_1proc": (1, True, False),
        "merged_compiled_1proc": (1, True, True),
        "merged_compiled_2proc": (2, True, True),
    }
    results: dict = {}
    for name, (processes, merged, compiled) in layouts.items():
        iterations = _distill(params, rollouts, workdir / f"{name}-it", 0, steps, processes, merged, compiled)
        anchored = _distill(params, rollouts, workdir / f"{name}-anchor", 3 * steps, 1, processes, merged, compiled)
        per_iteration = iterations["time_total_s"] / iterations["steps"]
        results[name] = {
            "seconds_per_iteration": per_iteration,
            "seconds_per_anchor_step": (anchored["time_total_s"] - anchored["time_compile_s"] - per_iteration) / (3 * steps),
            "compile_s": anchored["time_compile_s"],
            "iteration": utilization(iterations, per_item, peak),
            "anchor": utilization(anchored, per_item, peak),
            "summary": iterations,
        }
    default = results[f"merged{'_compiled' if params.distill.compile_anchor else ''}_{params.distill.processes}proc"]  # params.yaml's layout
    summary = default["summary"]
    for layout in results.values():
        layout.pop("summary", None)
    total = summary["time_total_s"] + summary["time_logging_s"] + summary["time_checkpoint_s"]
    shares = {
        key.removeprefix("time_").removesuffix("_s"): summary[key] / total
        for key in ("time_forward_s", "time_backward_s", "time_data_s", "time_optimizer_s", "time_other_s", "time_logging_s", "time_checkpoint_s")
    }
    shares["teacher_switch"] = summary["time_teacher_switch_s"] / total  # inside forward/other
    ours = summary["transformer_forward_items"] * summary["world_size"] / params.distill.batch_size / summary["generator_updates"]
    return {
        "layouts": results,
        "iteration_shares": shares,
        "peft_side_path_share_of_iteration": 1 - results["merged_1proc"]["seconds_per_iteration"] / results["peft_1proc"]["seconds_per_iteration"],
        "speedup_default_over_peft_1proc": results["peft_1proc"]["seconds_per_iteration"] / default["seconds_per_iteration"],
        "anchor_step_speedup_compiled_over_eager_1proc": (
            results["merged_1proc"]["seconds_per_anchor_step"] / results["merged_compiled_1proc"]["seconds_per_anchor_step"]
        ),
        "forwards_per_generator_update": ours,
        "reference_forwards_per_generator_update": reference_forwards_per_generator_update(
            len(params.sampling.student_timesteps), params.distill.generator_every
        ),
    }


def reference_forwards_per_generator_update(steps: int, generator_every: int) -> int:
    """Per item: generator (steps-1 simulation + 3 with grad + 2 x (critic + 2 CFG teacher halves)) plus
    generator_every critic updates (steps-1 simulation + 1 sample + 1 critic), as the reference runs
    them in either stream (docs/method.md 5.2-5.6, 9.12)."""
    generator = (steps - 1) + 3 + 2 * (1 + 2)
    critic = (steps - 1) + 1 + 1
    return generator + generator_every * critic


class ComponentClock:
    """Wall time by model component while a stage runs: the Backbone's text, VAE and transformer calls."""

    COMPONENTS = {
        "text_encoder": ("encode_prompts",),
        "vae": ("encode_images", "decode_latents"),
        "transformer": ("velocity",),
    }

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._saved: list[tuple[str, Callable]] = []

    def __enter__(self) -> ComponentClock:
        for component, methods in self.COMPONENTS.items():
            for method in methods:
                original = getattr(Backbone, method)
                self._saved.append((method, original))
                setattr(Backbone, method, self._timed(component, original))
        return self

    def __exit__(self, *exc) -> None:
        for method, original in self._saved:
            setattr(Backbone, method, original)

    def _timed(self, component: str, original: Callable) -> Callable:
        depth = [0]  # a nested call (guided_velocity -> velocity) counts once

        def timed(*args, **kwargs):
            depth[0] += 1
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                depth[0] -= 1
                if depth[0] == 0:
                    self.seconds[component] += time.perf_counter() - started

        return timed

    def shares(self, total: float) -> dict[str, float]:
        out = {name: self.seconds[name] / total for name in self.COMPONENTS}
        out["other"] = max(0.0, 1 - sum(out.values()))
        return out


def stage_shares(params: Params, workdir: Path, student: Path) -> dict:
    effects = [e.id for e in open_bank(params.bank).effects]
    results = {}
    started, clock = time.perf_counter(), ComponentClock()
    with clock:
        run_rollout(params, workdir / "shares-rollouts", effects[:2])
    results["rollout_2_effects"] = clock.shares(time.perf_counter() - started)

    # a training FM all-in-1 (the iteration run had no anchor phase to take it from)
    fm = _with(params, baselines={"fm_all_in_one": params.baselines.fm_all_in_one.model_copy(update={"steps": 50, "source": "train"})})
    started, clock = time.perf_counter(), ComponentClock()
    with clock:
        run_baselines(fm, workdir / "rollouts", student, workdir / "shares-baselines")
    results["baselines_fm_50_steps_and_merges"] = clock.shares(time.perf_counter() - started)

    evaluation = _with(params, evaluate={"methods": ["teacher", "student"], "student_steps": [8], "eval_images": 2, "stochastic_seeds": 1})
    evaluation = _with(evaluation, evaluate={"gate": evaluation.evaluate.gate.model_copy(update={"beat_bcr_of": []})})
    started, clock = time.perf_counter(), ComponentClock()
    with clock:
        run_evaluate(evaluation, student, None, workdir / "shares-eval", params_file=REPO / "params.yaml")
    results["evaluate_teacher_and_student"] = clock.shares(time.perf_counter() - started)
    return results


def rollout_cost(params: Params, workdir: Path) -> dict:
    """Cold rollouts of the whole bank, then the same folder missing one effect (as if just added)."""
    out = workdir / "rollouts"
    started = time.perf_counter()
    run_rollout(params, out, None)
    cold = time.perf_counter() - started
    effects = list(json.loads((out / "report.json").read_text())["effects"])
    shutil.rmtree(out / effects[-1])
    started = time.perf_counter()
    report = run_rollout(params, out, None)
    warm = time.perf_counter() - started
    return {
        "rollout_cold_s": cold,
        "rollout_one_added_over_cold": warm / cold,
        "rollout_one_added_computed": report["effects"][effects[-1]]["computed"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="iterations, and anchor steps, per layout")
    parser.add_argument("--out", type=Path, default=REPO / "artifacts" / "benchmarks" / "distill.json")
    args = parser.parse_args()
    os.chdir(REPO)
    params = load_params(REPO / "params.yaml")
    results: dict = {"matmul_gflops_1_thread": matmul_gflops(1), f"matmul_gflops_{params.base.threads}_threads": matmul_gflops(params.base.threads)}
    peak = results[f"matmul_gflops_{params.base.threads}_threads"]
    per_item = flops_per_item(params)
    results["gflop_per_item_forward"], results["gflop_per_item_backward"] = per_item[0] / 1e9, per_item[1] / 1e9
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after each part: a long run that fails late keeps what it measured
        args.out.write_text(json.dumps(results, indent=2) + "\n")

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        results.update(rollout_cost(params, workdir))
        save()
        results.update(training_cost(params, workdir / "rollouts", workdir, args.steps, per_item, peak))
        save()
        results["stage_shares"] = stage_shares(params, workdir, workdir / "merged_1proc-it")
        save()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
