"""The whole Kubeflow pipeline on this machine: kfp.local's SubprocessRunner runs every task as a
process of this environment (no venv, no pip, no container), on the repository's bank, registering into
the local tracking store. Kubernetes settings (GPUs, volumes, Secrets) are accepted and ignored there."""

from __future__ import annotations

import builtins
import os
import time
from pathlib import Path

from collectionlora.config import Params
from collectionlora.errors import PipelineError
from collectionlora.pipeline.build import check_expressible, data_version, load_pipeline, project_image
from collectionlora.pipeline.task_params import params_json
from collectionlora.tracking import TRACKING_URI_VARIABLE, absolute_tracking_uri, tracking_uri

def run_local(params: Params, work: Path, repo: Path = Path(".")) -> dict:
    """Run the pipeline under kfp.local with outputs under `work` (pipeline_root/, checkpoints/);
    returns {"seconds", "pipeline_root", "tracking_uri"}. A failed task raises with its name."""
    from kfp import local

    check_expressible(params, cluster=False)
    work = Path(work).resolve()
    uri = absolute_tracking_uri(tracking_uri(params.tracking))
    os.environ[TRACKING_URI_VARIABLE] = uri  # the task processes inherit it (and never see a credential here)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(work / "pipeline_root"), raise_on_error=True)
    pipeline = load_pipeline(repo).build_pipeline(params, project_image(params), data_version(repo))
    started, original_print = time.perf_counter(), builtins.print
    try:
        pipeline(
            bank_uri=str(Path(params.bank.root).resolve()), params=params_json(params), data_version=data_version(repo),
            checkpoint_root=str(work / "checkpoints"),
        )
    except RuntimeError as error:  # kfp.local: "Pipeline 'x' finished with status FAILURE. Inner task failed: 'y'."
        raise PipelineError(f"{work / 'pipeline_root'}: {' '.join(str(error).split())}") from error
    finally:
        # kfp.local swaps builtins.print for an indenting one per task; its parallel loop iterations
        # (threads) can restore each other's swap, leaving every later print() in this process indented.
        builtins.print = original_print
    return {"seconds": time.perf_counter() - started, "pipeline_root": str(work / "pipeline_root"), "tracking_uri": uri}

