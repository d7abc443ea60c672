"""Distillation benchmarks on the embedded demo bank (params.yaml as is): ratios measured in one run.

1. Wall time per training iteration against the sum of its transformer forwards and backwards
   (goal <= 1.10x: everything else — data, noise, routing, switching, optimiser — is overhead).
2. Teacher switch cost (activating the step's effect teacher) as a share of step time (goal <= 1%).
3. Transformer forwards per generator update (per item) against the reference's schedule: 7
   backward-simulation passes for the generator and 7 again for every critic update, 3 generator
   forwards with gradient, critic + CFG teacher for BS and TS (dummy TS/TA-FM in the general stream).
4. Rollout time when one effect is added to a bank whose rollouts exist, against a cold run.
5. An anchor-phase step (TA-FM alone, `distill.anchor_steps`) against a full iteration.

Needs the demo bank (`dvc pull data.dvc`). Usage:
    python benchmarks/bench_distill.py [--iterations 150] [--out artifacts/benchmarks/distill.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from collectionlora.config import load_params
from collectionlora.stages import run_distill, run_rollout

REPO = Path(__file__).resolve().parents[1]


def reference_forwards_per_generator_update(steps: int, generator_every: int) -> int:
    """Per item: generator (steps-1 simulation + 3 with grad + 2 x (critic + 2 CFG teacher halves)) plus
    generator_every critic updates (steps-1 simulation + 1 sample + 1 critic), as the reference runs
    them in either stream (METHOD.md 5.2-5.6, 9.12)."""
    generator = (steps - 1) + 3 + 2 * (1 + 2)
    critic = (steps - 1) + 1 + 1
    return generator + generator_every * critic


def rollout_cost(params, workdir: Path) -> dict:
    """Cold rollouts of the whole bank, then the same folder missing one effect (as if just added)."""
    out = workdir / "rollouts"
    started = time.perf_counter()
    run_rollout(params, out, None)
    cold = time.perf_counter() - started
    effects = list(json.loads((out / "report.json").read_text())["effects"])
    last = effects[-1]
    shutil.rmtree(out / last)
    started = time.perf_counter()
    report = run_rollout(params, out, None)
    warm = time.perf_counter() - started
    return {
        "rollout_cold_s": cold,
        "rollout_one_added_s": warm,
        "rollout_one_added_over_cold": warm / cold,
        "rollout_one_added_computed": report["effects"][last]["computed"],
        "rollout_effects": len(effects),
    }


def _run(params, rollouts: Path, out: Path, anchor_steps: int, max_steps: int) -> dict:
    every = anchor_steps + max_steps
    distill = {"anchor_steps": anchor_steps, "max_steps": max_steps, "checkpoint_every": every, "log_every": every}
    params = params.model_copy(
        update={
            "distill": params.distill.model_copy(update=distill),
            "tracking": params.tracking.model_copy(update={"uri": f"sqlite:///{out.parent / 'mlflow.db'}"}),
        }
    )
    return run_distill(params, rollouts, out)


def training_cost(params, rollouts: Path, workdir: Path, iterations: int) -> dict:
    """Full iterations (no anchor phase), then an anchor phase of as many steps plus one iteration."""
    summary = _run(params, rollouts, workdir / "student", 0, iterations)
    anchored = _run(params, rollouts, workdir / "anchored", iterations, 1)
    iteration = summary["time_total_s"] / summary["steps"]
    anchor_step = (anchored["time_total_s"] - iteration) / iterations
    transformer = summary["time_forward_s"] + summary["time_backward_s"]
    ours = summary["transformer_forward_items"] / params.distill.batch_size / summary["generator_updates"]
    reference = reference_forwards_per_generator_update(len(params.sampling.student_timesteps), params.distill.generator_every)
    return {
        "iterations": summary["steps"],
        "seconds_per_iteration": iteration,
        "anchor_step_over_iteration": anchor_step / iteration,
        "iteration_over_transformer_time": summary["time_total_s"] / transformer,
        "teacher_switch_share_of_step": summary["time_teacher_switch_s"] / summary["time_total_s"],
        "teacher_loads": summary["teacher_loads"],
        "forwards_per_generator_update": ours,
        "reference_forwards_per_generator_update": reference,
        "forwards_ours_over_reference": ours / reference,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=150)
    parser.add_argument("--out", type=Path, default=REPO / "artifacts" / "benchmarks" / "distill.json")
    args = parser.parse_args()
    params = load_params(REPO / "params.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        results = rollout_cost(params, workdir)
        results.update(training_cost(params, workdir / "rollouts", workdir, args.iterations))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    for key, value in results.items():
        print(f"{key:<42} {value:10.4f}")


if __name__ == "__main__":
    main()
