"""A full disk, a read-only output folder, a file-size limit: one line naming the file and what to do,
exit 1, and what the folder held before left as it was, with no temp file or staging folder behind.

The failures are real: a small tmpfs or a read-only bind mount in a private mount namespace of the
command (`unshare --mount`: root, or an unprivileged user namespace; the test is skipped where neither
is allowed), and RLIMIT_FSIZE, under which a write past the limit fails with EFBIG (Python ignores SIGXFSZ).
"""

from __future__ import annotations

import os
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import workflow_params_file

from collectionlora.distill.checkpoint import list_checkpoints, load_checkpoint

CLI = [sys.executable, "-m", "collectionlora.cli"]


def _unshare() -> list[str] | None:
    """The `unshare` prefix that gives a private mount namespace where mounting works, or None."""
    if shutil.which("unshare") is None:
        return None
    with tempfile.TemporaryDirectory() as probe:
        for prefix in (["unshare", "--mount", "--propagation", "private"], ["unshare", "--user", "--map-root-user", "--mount"]):
            if subprocess.run([*prefix, "mount", "-t", "tmpfs", "tmpfs", probe], capture_output=True, check=False).returncode == 0:
                return prefix
    return None


UNSHARE = _unshare()
needs_mounts = pytest.mark.skipif(UNSHARE is None, reason="no private mount namespace here (unshare --mount not permitted)")


@pytest.fixture(scope="module")
def params_file(tiny_workflow: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return workflow_params_file(tiny_workflow, tmp_path_factory.mktemp("write_failures"))


def _environment() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": ""}


def _in_namespace(setup: str, command: list[str], keep: Path, folder: Path) -> subprocess.CompletedProcess:
    """Run `setup` (mounts) then `command` in a private mount namespace; copy what `folder` holds then to `keep`
    (the mounts vanish with the namespace). The command's stderr and exit status are returned."""
    script = f"{setup} && {{ {shlex.join(command)}; status=$?; cp -a {shlex.quote(str(folder))} {shlex.quote(str(keep))}; exit $status; }}"
    return subprocess.run([*UNSHARE, "sh", "-c", script], env=_environment(), capture_output=True, text=True, check=False, timeout=600)


def _one_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ") or "Traceback" in line]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return lines[0]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@needs_mounts
def test_a_full_disk_mid_training_is_one_line_and_keeps_the_last_checkpoint(params_file, tiny_workflow, tmp_path):
    disk, out, kept = tmp_path / "disk", tmp_path / "disk" / "student", tmp_path / "kept"
    disk.mkdir()
    checkpoint = sum(p.stat().st_size for p in list_checkpoints(tiny_workflow["student"] / "checkpoints")[-1].iterdir())
    size = int(checkpoint * 1.6) // 4096 * 4096  # the first checkpoint fits, the second one does not
    command = [*CLI, "distill", "--params", str(params_file), "--rollouts", str(tiny_workflow["rollouts"]), "--out", str(out)]
    result = _in_namespace(f"mount -t tmpfs -o size={size} tmpfs {shlex.quote(str(disk))}", command, kept, disk)

    line = _one_line(result)
    assert "cannot write the distill output: No space left on device; free space on that disk or choose another output folder" in line
    student = kept / "student"
    (last,) = list_checkpoints(student / "checkpoints")
    assert last.name == "step-00000005" and load_checkpoint(last).state.step == 5  # whole, resumable
    assert not [p.name for p in (student / "checkpoints").iterdir() if p.name.startswith(".")]  # the failed one's staging is gone
    assert not (student / "metrics.json").exists()


@needs_mounts
def test_a_folder_turned_read_only_under_a_run_is_one_line_and_stays_as_it_was(params_file, tiny_workflow, tmp_path):
    """The output folder passes the up-front check (writable); one of its effect folders is read-only."""
    out, kept = tmp_path / "rollouts", tmp_path / "kept"
    shutil.copytree(tiny_workflow["rollouts"], out)
    before = _files(out)
    effect = min(p for p in out.iterdir() if p.is_dir())
    folder = shlex.quote(str(effect))
    command = [*CLI, "rollout", "--params", str(params_file), "--out", str(out)]
    result = _in_namespace(f"mount --bind {folder} {folder} && mount -o remount,bind,ro {folder}", command, kept, out)

    line = _one_line(result)
    assert f"error: {effect}/.index.jsonl.tmp-" in line
    assert line.endswith(": cannot write the rollout output: Read-only file system; the filesystem is read-only; choose another output folder")
    assert _files(kept) == before == _files(out)  # report.json too: a run that changes nothing keeps it


def test_a_file_size_limit_is_one_line_and_keeps_the_previous_baselines(params_file, tiny_workflow, tmp_path):
    out = tmp_path / "baselines"
    shutil.copytree(tiny_workflow["baselines"], out)  # the good result of an earlier run
    before = _files(out)
    largest = max(p.stat().st_size for p in out.rglob("*.safetensors"))
    limit = largest - 4096  # the largest merge does not fit

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    command = [*CLI, "baselines", "--params", str(params_file), "--rollouts", str(tiny_workflow["rollouts"]),
               "--student", str(tiny_workflow["student"]), "--out", str(out)]
    result = subprocess.run(command, env=_environment(), capture_output=True, text=True, check=False, preexec_fn=limited, timeout=600)

    line = _one_line(result)
    assert "cannot write the baselines output: File too large; the file exceeds this process's file-size limit" in line
    assert ".safetensors" in line and "baselines.partial" in line
    assert _files(out) == before
    assert not out.with_name("baselines.partial").exists()
