"""Crashes at any point: the real CLI of rollout, distill, baselines and evaluate killed with SIGKILL at
seeded random points, twice in a row, then run to completion. The result equals the session's
uninterrupted tiny workflow (conftest), byte for byte for every deterministic file; after every kill each
file under a final name is whole (no partial PNG, safetensors or JSON is ever read back), no completion
marker stands over partial output, and a folder that held a good result holds it still (or, for an
instant between two renames, nothing).

Kill points: rollout after a random number of new targets; distill after a random checkpoint, then
during its export; baselines and evaluate once while their staging folder is written and once at a
random time. Run with `-s` to see where each kill landed.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import workflow_params_file
from PIL import Image
from safetensors.torch import load_file

from collectionlora.distill.export import KOHYA_WEIGHTS, LORA_WEIGHTS
from collectionlora.distill.run import CHECKPOINTS, HISTORY, METRICS
from collectionlora.rollout import REPORT as ROLLOUT_REPORT

CLI = [sys.executable, "-m", "collectionlora.cli"]
KILLS = 2  # per stage
# metrics.json counters that an interrupted run must report exactly as the uninterrupted one
EXACT_COUNTERS = (
    "steps", "anchor_updates", "generator_updates", "critic_updates", "effect_steps", "general_steps", "nonfinite_skipped",
    "transformer_forwards", "transformer_forward_items", "transformer_backward_items",
)
landed: dict[str, list[str]] = {}  # stage -> where each kill landed (printed at the end of the module)


@pytest.fixture(scope="module")
def setup(tiny_workflow: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The tiny workflow (the uninterrupted reference) and a params.yaml for the CLI runs, logging to a store of their own."""
    yield {**tiny_workflow, "params_file": workflow_params_file(tiny_workflow, tmp_path_factory.mktemp("kill_resume"))}
    for stage, kills in landed.items():
        print(f"\n{stage}: {len(kills)} kills tried: {'; '.join(kills)}")


# ---- running and killing -------------------------------------------------------------------------
def _environment() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": ""}


def _run(command: list[str], log: Path) -> None:
    with open(log, "a", encoding="utf-8") as handle:
        done = subprocess.run(command, env=_environment(), stdout=handle, stderr=subprocess.STDOUT, check=False)
    assert done.returncode == 0, log.read_text()[-3000:]


def _kill(
    stage: str, command: list[str], trigger: Callable[[], bool], delay: float, log: Path, state: Callable[[], str], timeout: float = 300.0
) -> tuple[bool, float]:
    """Start `command`; `delay` seconds after `trigger()` first holds, SIGKILL it. Returns (killed: False if
    it finished first, seconds from its start to the trigger). `state()` describes what the kill left."""
    with open(log, "a", encoding="utf-8") as handle:
        process = subprocess.Popen(command, env=_environment(), stdout=handle, stderr=subprocess.STDOUT)
        started = time.monotonic()
        while process.poll() is None and not trigger():
            assert time.monotonic() - started < timeout, f"{stage}: the kill trigger never held"
            time.sleep(0.005)
        fired = time.monotonic() - started
        time.sleep(delay)
        killed = process.poll() is None
        if killed:
            process.send_signal(signal.SIGKILL)
        process.wait()
    where = f"killed {fired + delay:.2f} s after start ({state()})" if killed else f"finished before the kill ({process.returncode})"
    landed.setdefault(stage, []).append(where)
    if not killed:
        assert process.returncode == 0, log.read_text()[-3000:]
    return killed, fired


# ---- what a killed run may leave -------------------------------------------------------------------
def _final_files(folder: Path) -> list[Path]:
    """Files under final names: nothing under a dot-named file or folder (temp files, staging folders)."""
    if not folder.exists():
        return []
    return sorted(p for p in folder.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _assert_whole(folder: Path) -> None:
    """Every file under a final name reads back whole."""
    for path in _final_files(folder):
        if path.suffix == ".png":
            with Image.open(path) as image:
                image.load()
        elif path.suffix == ".safetensors":
            load_file(path)
        elif path.suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
        elif path.suffix == ".jsonl":
            for line in path.read_text(encoding="utf-8").splitlines():
                json.loads(line)


def _no_leftovers(folder: Path) -> None:
    """After a completed run: no temp file, staging folder or folder renamed aside by a killed run."""
    names = [p.name for p in [*folder.rglob("*"), *folder.parent.glob(f"*{folder.name}*")]]
    assert not [n for n in names if ".tmp-" in n or n.endswith(".partial") or ".old-" in n or n.startswith(".step-")], names


def _same_bytes(folder: Path, reference: Path, names: list[str]) -> None:
    for name in names:
        assert (folder / name).read_bytes() == (reference / name).read_bytes(), name


def _whole_or_absent(folder: Path, reference: Path, names: list[str], summary: str) -> None:
    """A killed run replaces a folder whole or not at all: it holds the earlier result or (killed on its
    way out) the new one, both equal to the reference but for times; or, killed in the instant between
    its two renames, nothing (the earlier result is left aside under a dot name)."""
    if folder.exists():
        _same_bytes(folder, reference, names)
        assert _without(_json(folder / summary), ("seconds",)) == _without(_json(reference / summary), ("seconds",))


def _without(record: dict, words: tuple[str, ...]) -> dict:
    """`record` without the keys containing any of `words` (times), at any depth."""
    return {k: _without(v, words) if isinstance(v, dict) else v for k, v in record.items() if not any(w in k for w in words)}


def _distill_state(out: Path) -> str:
    newest = sorted(p.name for p in (out / CHECKPOINTS).glob("step-*"))
    exported = [name for name in (LORA_WEIGHTS, KOHYA_WEIGHTS, "collection.json", "README.md", "losses.json") if (out / name).exists()]
    done = ", metrics.json written: it had completed" if (out / METRICS).exists() else ""
    return f"newest checkpoint {newest[-1] if newest else 'none'}, exported {exported or 'nothing'}{done}"


def _replaced_state(out: Path, staging: Path) -> str:
    files = len(_final_files(staging))
    left = f"a staging folder of {files} files left (by this or the previous killed run)" if staging.exists() else "no staging folder"
    return f"{left}, the output folder {'in place' if out.exists() else 'absent'}"


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


# ---- the stages -------------------------------------------------------------------------------------
def test_rollout_killed_twice_then_resumed_writes_the_same_targets(setup, tmp_path):
    reference, out, log = setup["rollouts"], tmp_path / "rollouts", tmp_path / "rollout.log"
    command = [*CLI, "rollout", "--params", str(setup["params_file"]), "--out", str(out)]
    total = len(list(reference.glob("*/*.png")))
    names = [p.relative_to(reference).as_posix() for p in _final_files(reference) if p.name != ROLLOUT_REPORT]
    rng = random.Random(20)

    def targets() -> int:
        return len(list(out.glob("*/*.png")))

    def state() -> str:
        return f"{targets()}/{total} targets on disk" + (", report.json written: it had completed" if (out / ROLLOUT_REPORT).exists() else "")

    batch = setup["params"].rollout.batch_size  # targets are written a batch at a time
    for _ in range(KILLS):
        wanted = min(total - batch, targets() + rng.randint(1, batch))  # after one more batch, before the last
        _kill("rollout", command, lambda wanted=wanted: targets() >= wanted, rng.uniform(0.0, 0.05), log, state)
        _assert_whole(out)
        if (out / ROLLOUT_REPORT).exists():  # the completion marker stands only over complete output
            _same_bytes(out, reference, names)
    _run(command, log)
    _no_leftovers(out)
    assert [p.relative_to(out).as_posix() for p in _final_files(out) if p.name != ROLLOUT_REPORT] == names
    _same_bytes(out, reference, names)  # every target byte for byte (fixed batches), and the indexes


def test_distill_killed_at_a_checkpoint_and_in_its_export_resumes_to_the_same_student_and_run_totals(setup, tmp_path):
    reference, out, log = setup["student"], tmp_path / "student", tmp_path / "distill.log"
    # checkpoint_every is a runtime field: the same training as the reference's, with more kill points
    command = [*CLI, "distill", "--params", str(setup["params_file"]), "--rollouts", str(setup["rollouts"]), "--out", str(out),
               "--set", "distill.checkpoint_every=2"]
    steps = _json(reference / METRICS)["steps"]
    rng = random.Random(21)
    checkpoint = out / CHECKPOINTS / f"step-{2 * rng.randint(1, steps // 2 - 1):08d}"
    triggers = [checkpoint.exists, (out / LORA_WEIGHTS).exists]  # after a random checkpoint, then in the export
    for attempt, trigger in enumerate(triggers):
        _kill("distill", command + ["--resume"] * bool(attempt), trigger, rng.uniform(0.0, 0.005 if attempt else 0.4), log, lambda: _distill_state(out))
        _assert_whole(out)
        if (out / METRICS).exists():  # the completion marker stands only over complete output
            _same_bytes(out, reference, [LORA_WEIGHTS, KOHYA_WEIGHTS, "losses.json"])
    resumed_from = _json(max((out / CHECKPOINTS).glob("step-*")) / "state.json")["state"]
    _run(command + ["--resume"], log)
    _no_leftovers(out)

    _same_bytes(out, reference, [LORA_WEIGHTS, KOHYA_WEIGHTS, "prompts.json", "losses.json", "anchor/anchor.json", "scheduler/scheduler_config.json"])
    record, expected = _json(out / "collection.json"), _json(reference / "collection.json")
    for other in (record, expected):  # the run's MLflow id, and the base as a path relative to the output folder
        del other["tracking_run_id"], other["base"]["path"]
    assert record == expected
    history = [json.loads(line) for line in (out / HISTORY).read_text().splitlines()]
    reference_history = [json.loads(line) for line in (reference / HISTORY).read_text().splitlines()]
    assert [r["step"] for r in history] == [r["step"] for r in reference_history]  # no step twice after the resumes

    # metrics.json covers the whole run, not the last segment: exact counts, and times since the first start
    metrics, straight = _json(out / METRICS), _json(reference / METRICS)
    assert {k: metrics[k] for k in EXACT_COUNTERS} == {k: straight[k] for k in EXACT_COUNTERS}
    assert metrics["teacher_loads"] >= straight["teacher_loads"] and metrics["adapter_switches"] >= straight["adapter_switches"]
    assert metrics["time_total_s"] >= resumed_from["timings"]["total"] > 0
    assert metrics["time_forward_s"] >= resumed_from["timings"]["forward"] > 0
    assert metrics["seconds"] > resumed_from["seconds"] > 0


def test_baselines_killed_twice_keep_the_last_good_folder_then_rebuild_it(setup, tmp_path):
    reference, out, log = setup["baselines"], tmp_path / "baselines", tmp_path / "baselines.log"
    shutil.copytree(reference, out)  # a good result of an earlier run
    before = out.stat().st_ino
    files = [p.relative_to(reference).as_posix() for p in _final_files(reference) if p.suffix == ".safetensors"]
    command = [*CLI, "baselines", "--params", str(setup["params_file"]), "--rollouts", str(setup["rollouts"]),
               "--student", str(setup["student"]), "--out", str(out)]
    rng = random.Random(22)
    staging = out.with_name(out.name + ".partial")
    # first while the staging folder is written, then at a random time before that point (loading, training)
    _, writing = _kill("baselines", command, staging.exists, rng.uniform(0.0, 0.3), log, lambda: _replaced_state(out, staging))
    _whole_or_absent(out, reference, files, "baselines.json")
    _kill("baselines", command, lambda: True, rng.uniform(0.3, 0.9) * writing, log, lambda: _replaced_state(out, staging))
    _whole_or_absent(out, reference, files, "baselines.json")
    _run(command, log)
    _no_leftovers(out)
    assert out.stat().st_ino != before  # rebuilt, not the copy left in place
    _same_bytes(out, reference, files)
    assert _without(_json(out / "baselines.json"), ("seconds",)) == _without(_json(reference / "baselines.json"), ("seconds",))


def test_evaluate_killed_twice_keeps_the_last_good_report_then_writes_the_same_one(setup, tmp_path):
    reference, out, log = setup["eval"], tmp_path / "eval", tmp_path / "evaluate.log"
    shutil.copytree(reference, out)
    before = out.stat().st_ino
    command = [*CLI, "evaluate", "--params", str(setup["params_file"]), "--collection", str(setup["student"]),
               "--baselines", str(setup["baselines"]), "--out", str(out)]
    rng = random.Random(23)
    staging = out.with_name(out.name + ".partial")
    deterministic = ["gate.json", "per_effect.csv", "samples.png", "bleeding.png"]
    # first while the staging folder is written, then at a random time before that point (loading, scoring)
    _, writing = _kill("evaluate", command, staging.exists, rng.uniform(0.0, 0.2), log, lambda: _replaced_state(out, staging))
    _whole_or_absent(out, reference, deterministic, "metrics.json")
    _kill("evaluate", command, lambda: True, rng.uniform(0.3, 0.9) * writing, log, lambda: _replaced_state(out, staging))
    _whole_or_absent(out, reference, deterministic, "metrics.json")
    _run(command, log)
    _no_leftovers(out)
    assert out.stat().st_ino != before
    _same_bytes(out, reference, deterministic)
    assert _without(_json(out / "metrics.json"), ("seconds",)) == _without(_json(reference / "metrics.json"), ("seconds",))
