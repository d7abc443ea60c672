"""The trainer as separate processes: exact resume after kill -9, and 2 processes under torchrun."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import params_for_bank
from safetensors.torch import load_file

from collectionlora.distill.export import LORA_WEIGHTS
from collectionlora.stages import run_rollout

CLI = [sys.executable, "-m", "collectionlora.cli"]


@pytest.fixture(scope="module")
def setup(tiny_bank: Path, tiny_params, tmp_path_factory) -> tuple[Path, Path]:
    """(params.yaml for the tiny bank, rollouts folder)."""
    work = tmp_path_factory.mktemp("processes")
    root = work / "data"
    shutil.copytree(tiny_bank, root)
    params = params_for_bank(tiny_params, root, tracking={"uri": f"sqlite:///{work / 'mlflow.db'}"})
    run_rollout(params, work / "rollouts", None)
    path = work / "params.yaml"
    path.write_text(yaml.safe_dump(params.model_dump(mode="json")))
    return path, work / "rollouts"


def _distill_command(params: Path, rollouts: Path, out: Path, *sets: str) -> list[str]:
    command = [*CLI, "distill", "--params", str(params), "--rollouts", str(rollouts), "--out", str(out)]
    for item in sets:
        command += ["--set", item]
    return command


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": ""}


def test_resume_after_kill_9_is_bit_identical(setup, tmp_path):
    params, rollouts = setup
    # A decaying learning rate, repeated TA-FM draws and an anchor phase the kill may fall in or after:
    # all are functions of the step, no extra state.
    sets = (
        "distill.max_steps=31", "distill.checkpoint_every=2", "distill.keep_checkpoints=2",
        "distill.lr_schedule=cosine", "distill.ta_fm_repeats=2", "distill.anchor_steps=9",
    )
    subprocess.run(_distill_command(params, rollouts, tmp_path / "straight", *sets), check=True, env=_env(), capture_output=True)

    interrupted = tmp_path / "interrupted"
    kill_after = 2 * random.Random().randint(2, 12)  # a random checkpointed step
    process = subprocess.Popen(_distill_command(params, rollouts, interrupted, *sets), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = interrupted / "checkpoints" / f"step-{kill_after:08d}"
    deadline = time.monotonic() + 300
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (interrupted / LORA_WEIGHTS).exists()

    result = subprocess.run(
        [*_distill_command(params, rollouts, interrupted, *sets), "--resume"], env=_env(), capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert (interrupted / LORA_WEIGHTS).read_bytes() == (tmp_path / "straight" / LORA_WEIGHTS).read_bytes()
    steps = [json.loads(line)["step"] for line in (interrupted / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 40  # no duplicated history after the resume


def test_two_processes_stay_in_sync_and_match_one_process_on_the_same_global_batch(setup, tmp_path):
    params, rollouts = setup
    sets = ("distill.max_steps=6", "distill.generator_every=2", "distill.checkpoint_every=3", "distill.batch_size=2")
    subprocess.run(_distill_command(params, rollouts, tmp_path / "one", *sets, "base.threads=1"), check=True, env=_env(), capture_output=True)
    # distill.processes=2: the same command starts two torchrun workers (distill/launch.py)
    command = _distill_command(params, rollouts, tmp_path / "two", *sets, "distill.processes=2", "base.threads=2")
    result = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-2000:]

    metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["ranks_in_sync"] is True
    one = load_file(tmp_path / "one" / LORA_WEIGHTS)
    two = load_file(tmp_path / "two" / LORA_WEIGHTS)
    assert one.keys() == two.keys()
    worst = max(float((one[k] - two[k]).abs().max()) for k in one)
    scale = max(float(t.abs().max()) for t in one.values())
    # Same global batch, same draws: only float summation order differs (per-rank means, then the
    # all-reduce average), which Adam can amplify on near-zero gradients to about lr per step.
    assert worst <= 6 * 1e-3, (worst, scale)
    assert scale > 0 and any(k.endswith("lora_B.weight") and torch.count_nonzero(two[k]) for k in two)  # it trained
