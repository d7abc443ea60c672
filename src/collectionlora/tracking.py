"""Training metrics to MLflow (a local sqlite store by default) and to a JSON-lines file.

The environment's MLFLOW_TRACKING_URI, when set, wins over params (a cluster points every stage at
its MLflow server that way). For a local `sqlite:///` store the experiment's artifacts go to a
folder beside the database, not to the working directory.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from collectionlora.config import TrackingConfig


def tracking_uri(config: TrackingConfig) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or config.uri


class RunLogger:
    """One MLflow run plus `metrics.jsonl`; inactive (no MLflow, no file) on ranks other than 0."""

    def __init__(self, config: TrackingConfig, run_name: str, params: dict, metrics_file: Path, active: bool, resume_run_id: str | None = None):
        self.active = active
        self.metrics_file = Path(metrics_file)
        self.run_id: str | None = None
        if not active:
            return
        import mlflow

        uri = tracking_uri(config)
        artifacts = None
        if uri.startswith("sqlite:///"):
            database = Path(uri.removeprefix("sqlite:///"))
            database.parent.mkdir(parents=True, exist_ok=True)
            artifacts = (database.parent / "artifacts").resolve().as_uri()
        mlflow.set_tracking_uri(uri)
        client = mlflow.MlflowClient()
        experiment = client.get_experiment_by_name(config.experiment)
        experiment_id = (
            experiment.experiment_id if experiment else client.create_experiment(config.experiment, artifact_location=artifacts)
        )
        self._mlflow = mlflow
        if resume_run_id and not _run_exists(client, resume_run_id):
            # a checkpoint moved to another machine or tracking server: its run is not there to continue
            print(f"tracking: run {resume_run_id} of the checkpoint is not in {uri}; logging the resumed steps to a new run", file=sys.stderr)
            resume_run_id = None
        if resume_run_id:
            run = mlflow.start_run(run_id=resume_run_id)
        else:
            run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name)
            mlflow.log_params(_flatten(params))
        self.run_id = run.info.run_id
        self.metrics_file.parent.mkdir(parents=True, exist_ok=True)

    def log(self, metrics: dict[str, float], step: int) -> None:
        if not self.active:
            return
        self._mlflow.log_metrics(metrics, step=step)
        with open(self.metrics_file, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"step": step, **metrics}, sort_keys=True) + "\n")

    def artifact(self, path: Path) -> None:
        if self.active:
            self._mlflow.log_artifact(str(path))

    def close(self, status: str = "FINISHED") -> None:
        if self.active and self._mlflow.active_run() is not None:
            self._mlflow.end_run(status=status)


def _run_exists(client, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_run(run_id)
    except MlflowException:
        return False
    return True


def _flatten(params: dict, prefix: str = "") -> dict[str, str]:
    """Nested sections as dotted keys; MLflow caps a value at 6000 characters."""
    out: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = str(value)[:6000]
    return out
