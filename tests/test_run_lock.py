"""Two runs at once on one output folder (two terminals, a retried Kubeflow task next to a slow one): the
second stops at once with one line naming the first's pid, and a run killed with -9 leaves no stale lock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import params_for_bank

from collectionlora.errors import OutputInUseError
from collectionlora.runlock import claim, lock_path

CLI = [sys.executable, "-m", "collectionlora.cli"]


def _params_file(tiny_workflow: dict, folder: Path, **sections) -> Path:
    params = params_for_bank(tiny_workflow["params"], tiny_workflow["root"], Path(tiny_workflow["params"].bank.manifest).name,
                             tracking={"uri": f"sqlite:///{folder / 'mlflow.db'}"}, **sections)
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params.model_dump(mode="json")))
    return path


def test_a_second_run_on_the_same_folder_stops_at_once_and_a_killed_run_leaves_no_lock(tiny_workflow, tmp_path):
    params = _params_file(tiny_workflow, tmp_path, distill={"max_steps": 400})  # long enough to be running throughout
    out = tmp_path / "student"
    command = [*CLI, "distill", "--params", str(params), "--rollouts", str(tiny_workflow["rollouts"]), "--out", str(out)]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": ""}
    first = subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while _holder(out) != str(first.pid):
            assert first.poll() is None and time.monotonic() < deadline, "the first run never took the lock"
            time.sleep(0.05)
        second = subprocess.run(command, env=environment, capture_output=True, text=True, check=False, timeout=120)
        assert first.poll() is None, "the first run must still be running: the second did not wait for it"
        assert second.returncode == 1
        assert second.stderr == f"error: {out}: is in use by another run (pid {first.pid}); wait for it to finish or choose another output folder\n"
        with pytest.raises(OutputInUseError, match=f"pid {first.pid}"), claim(out, "distill"):  # this process too
            pass
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert first.returncode == -signal.SIGKILL
    with claim(out, "distill"):  # the OS released the killed run's lock: nothing stale to clean up
        assert _holder(out) == str(os.getpid())


def _holder(out: Path) -> str | None:
    """The pid written in `out`'s lock file by the run that took it last."""
    return lock_path(out).read_text().strip() if lock_path(out).exists() else None
