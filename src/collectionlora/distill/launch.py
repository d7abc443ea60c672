"""`distill.processes` data-parallel processes on this machine, started through torchrun.

Why: data parallelism over GPUs, or over the cores of a CPU machine where one process cannot keep its
threads busy. `distill.batch_size` is the global batch, so the layout changes the speed, not what is
trained. On CUDA each process takes one GPU. On the embedded tiny base the layouts are close and the
measurements disagree (bench_distill.py: 2 x 1 thread no faster than 1 x 2; two demo runs: 2 x 1
faster), see docs/results.md.

The command the user typed (or DVC, or a KFP task) stays `collectionlora distill`: when
`distill.processes` > 1 and this process is not already a torchrun worker, it starts the workers
with the same arguments and waits; rank 0 writes the collection and its metrics.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from collectionlora.config import Params, write_params
from collectionlora.errors import CollectionLoraError
from collectionlora.runlock import held_for_workers


def is_worker() -> bool:
    """Started by torchrun (or a TrainJob): the process group is already decided."""
    return "WORLD_SIZE" in os.environ


def needs_launch(params: Params) -> bool:
    return params.distill.processes > 1 and not is_worker()


def distill_arguments(params_file: Path, rollouts: Path, out: Path, resume: bool, warm_start: Path | None = None) -> list[str]:
    """`collectionlora distill`'s arguments, the same on every rank (torchrun here, a TrainJob's nodes)."""
    arguments = ["distill", "--params", str(params_file), "--rollouts", str(rollouts), "--out", str(out)]
    if warm_start is not None:
        arguments += ["--warm-start", str(warm_start)]
    return arguments + (["--resume"] if resume else [])


def torchrun_command(processes: int, params_file: Path, rollouts: Path, out: Path, resume: bool, warm_start: Path | None = None) -> list[str]:
    """`processes` workers on this machine (a standalone rendezvous on the loopback interface)."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", "-m", "collectionlora.cli"]
    return torchrun + distill_arguments(params_file, rollouts, out, resume, warm_start)


def worker_environment(params: Params) -> dict[str, str]:
    """CPU workers split `base.threads` between them and keep gloo on the loopback interface."""
    env = dict(os.environ)
    if not params.base.device.startswith("cuda"):
        env["OMP_NUM_THREADS"] = str(max(1, params.base.threads // params.distill.processes))
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    return env


def launch(params: Params, rollouts: Path, out: Path, resume: bool, warm_start: Path | None = None) -> dict:
    """Run the distillation as `distill.processes` torchrun workers; returns rank 0's metrics.json."""
    from collectionlora.distill.run import METRICS, check_start

    check_start(Path(out), resume)
    with tempfile.TemporaryDirectory(prefix="collectionlora-distill-") as tmp:
        params_file = write_params(params, Path(tmp) / "params.yaml")
        command = torchrun_command(params.distill.processes, params_file, Path(rollouts), Path(out), resume, warm_start)
        environment = held_for_workers(worker_environment(params), Path(out))  # rank 0 writes OUT under this process's lock
        done = subprocess.run(command, env=environment, check=False)
    if done.returncode != 0:
        raise CollectionLoraError(f"{out}: the {params.distill.processes} distill processes exited with {done.returncode} (their log is above)")
    from collectionlora.distill.export import read_collection

    return {**json.loads((Path(out) / METRICS).read_text(encoding="utf-8")), "collection": read_collection(Path(out))}
