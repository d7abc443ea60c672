"""The pipeline's distillation: on the checkpoint volume, so a retried task resumes where the failed
attempt stopped, on this task's accelerators (torchrun) or on a multi-node Kubeflow Trainer TrainJob.

Layout under the task's work folder (`<kfp.distill.checkpoint_mount>/runs/<pipeline run id>`):
    params.yaml   the task's params (bank paths inside this pod), for the processes it starts
    bank/, rollouts/  (trainjob) the bank and merged rollouts, copied where every node can read them
    student/      the collection and its checkpoints/
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from collectionlora.config import Params, write_params
from collectionlora.distill.launch import torchrun_command
from collectionlora.errors import CollectionLoraError, ConfigError
from collectionlora.pipeline.outputs import copy_collection
from collectionlora.pipeline.task_params import params_json, task_params


def check_placement(params: Params) -> None:
    """Accelerators and base.device must agree: GPUs with a CPU base sit idle, a CUDA base without GPUs fails."""
    on_cuda = params.base.device.startswith("cuda")
    for field, count in (("kfp.task", params.kfp.task.accelerator_count), ("kfp.distill", params.kfp.distill.accelerator_count)):
        if count > 0 and not on_cuda:
            raise ConfigError(f"params: {field}.accelerator_count is {count} but base.device is {params.base.device}: set base.device: cuda")
        if count == 0 and on_cuda:
            raise ConfigError(f"params: base.device is {params.base.device} but {field}.accelerator_count is 0: request the GPUs")


def distill_task(params: Params, rollouts: Path, checkpoint_root: Path, run_id: str, student: Path) -> dict:
    """Distil in `checkpoint_root`/runs/`run_id` (resuming an interrupted attempt of this run), then copy
    the collection to `student` (the task's Model artifact); returns the student's metrics.json."""
    from collectionlora.distill.run import METRICS, auto_resume

    check_placement(params)
    workdir = Path(checkpoint_root) / "runs" / run_id
    out = workdir / "student"
    if params.kfp.distill.backend == "trainjob":  # the nodes mount the volume, not this task's artifacts
        from collectionlora.trainjob import submit_and_wait  # it decides resume itself (auto_resume, once)

        shutil.copytree(params.bank.root, workdir / "bank", dirs_exist_ok=True)
        params = task_params(params_json(params), workdir / "bank")
        shared = workdir / "rollouts"
        shutil.copytree(rollouts, shared, dirs_exist_ok=True)
        submit_and_wait(params, write_params(params, workdir / "params.yaml"), shared, out)
    else:
        params_file = write_params(params, workdir / "params.yaml")
        resume = auto_resume(params, Path(rollouts), out)
        print(f"distill: {'resuming the interrupted attempt' if resume else 'a fresh run'} in {out}", flush=True)
        _run_here(params, params_file, Path(rollouts), out, resume)
    copy_collection(out, Path(student))
    return json.loads((out / METRICS).read_text(encoding="utf-8"))


def _run_here(params: Params, params_file: Path, rollouts: Path, out: Path, resume: bool) -> None:
    """One process per accelerator of this node; on a CPU node, `distill.processes` (distill/launch.py)."""
    processes = params.kfp.distill.accelerator_count
    if processes <= 1:
        from collectionlora.stages import run_distill

        run_distill(params, rollouts, out, resume)
        return
    done = subprocess.run(torchrun_command(processes, params_file, rollouts, out, resume), check=False)
    if done.returncode != 0:
        raise CollectionLoraError(f"{out}: torchrun distill exited with {done.returncode} (see the task log above)")
