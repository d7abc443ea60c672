"""One run at a time per output folder, and a failed write into it as one line.

Every stage that writes an output folder runs inside `claim(out, stage)`:
- an exclusive, non-blocking `fcntl.flock` on `.<name>.lock` beside the folder `<name>`: a second run
  (another terminal, a retried Kubeflow task next to a slow one) stops at once with "<out> is in use by
  another run (pid N)" instead of interleaving checkpoints. The OS drops the lock when its process dies,
  so a kill -9 leaves no stale lock. The file sits beside the folder, not in it: evaluate and baselines
  replace their folder in one rename and `distill --auto-resume` clears it, which would take a lock file
  inside along while it is held. It is never deleted (deleting a lock file races with the next opener).
- an OSError of a failed write (disk full, quota, file too large, read-only, no permission) becomes one
  OutputError line naming the file; the stages write through temp files and renames, so what was in
  the folder before is left as it was.

A process that starts workers for one run (distill's torchrun launcher) holds the lock for them: it
names the lock in $COLLECTIONLORA_HELD_LOCKS, and a worker's claim of that lock only maps errors.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from collectionlora.errors import OutputError, OutputInUseError

HELD_VARIABLE = "COLLECTIONLORA_HELD_LOCKS"
# errno -> what to do about it
WRITE_ERRORS = {
    errno.ENOSPC: "free space on that disk or choose another output folder",
    errno.EDQUOT: "free space within your quota or choose another output folder",
    errno.EFBIG: "the file exceeds this process's file-size limit (ulimit -f) or the filesystem's",
    errno.EROFS: "the filesystem is read-only; choose another output folder",
    errno.EACCES: "no permission to write there; choose another output folder or fix its permissions",
    errno.EPERM: "no permission to write there; choose another output folder or fix its permissions",
}
_held: dict[Path, tuple[int, int]] = {}  # lock file -> (descriptor, claims) of this process


def lock_path(out: Path) -> Path:
    """The lock file of the output folder `out`: `.<name>.lock` beside it."""
    out = Path(out).absolute()
    return out.with_name(f".{out.name}.lock")


@contextmanager
def claim(out: Path, stage: str) -> Iterator[None]:
    """Hold `out` for this run of `stage` (re-entrant within a process) and turn a failed write into
    one OutputError line."""
    lock = lock_path(out)
    with write_errors(out, stage):
        _acquire(lock, Path(out))
    try:
        with write_errors(out, stage):
            yield
    finally:
        _release(lock)


@contextmanager
def write_errors(out: Path, stage: str) -> Iterator[None]:
    """An OSError of WRITE_ERRORS on a file of `out` (or with no file named: a write through an open
    file) as one OutputError line; any other error passes unchanged."""
    try:
        yield
    except OSError as error:
        if error.errno not in WRITE_ERRORS or not _is_output(error, Path(out)):
            raise
        where = error.filename or out
        raise OutputError(f"{where}: cannot write the {stage} output: {error.strerror}; {WRITE_ERRORS[error.errno]}") from error


def held_for_workers(environment: dict[str, str], out: Path) -> dict[str, str]:
    """`environment` for worker processes of this run: their claim of `out` is held by this process."""
    names = [name for name in environment.get(HELD_VARIABLE, "").split(os.pathsep) if name]
    return {**environment, HELD_VARIABLE: os.pathsep.join([*names, str(lock_path(out))])}


def _is_output(error: OSError, out: Path) -> bool:
    if error.filename is None:
        return True
    named, out = Path(os.fsdecode(error.filename)).absolute(), out.absolute()
    if out.is_relative_to(named):  # creating out or a folder above it
        return True
    if not named.is_relative_to(out.parent):
        return False
    top = named.relative_to(out.parent).parts[0]  # out itself, out.partial (staging), .out.lock, .out.old-N
    return top == out.name or top.startswith((f"{out.name}.", f".{out.name}."))


def _acquire(lock: Path, out: Path) -> None:
    if lock in _held:
        descriptor, claims = _held[lock]
        _held[lock] = (descriptor, claims + 1)
        return
    if str(lock) in os.environ.get(HELD_VARIABLE, "").split(os.pathsep):
        _held[lock] = (-1, 1)  # the launcher of this worker holds it
        return
    lock.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(descriptor, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(descriptor)
        raise OutputInUseError(f"{out}: is in use by another run (pid {holder}); wait for it to finish or choose another output folder") from None
    except BaseException:
        os.close(descriptor)
        raise
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
    _held[lock] = (descriptor, 1)


def _release(lock: Path) -> None:
    descriptor, claims = _held[lock]
    if claims > 1:
        _held[lock] = (descriptor, claims - 1)
        return
    del _held[lock]
    if descriptor >= 0:
        os.close(descriptor)  # closing the only descriptor releases the flock
