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
from urllib.parse import urlsplit, urlunsplit

from collectionlora.config import TrackingConfig
from collectionlora.errors import CollectionLoraError


TRACKING_URI_VARIABLE = "MLFLOW_TRACKING_URI"


def tracking_uri(config: TrackingConfig) -> str:
    return os.environ.get(TRACKING_URI_VARIABLE) or config.uri


def absolute_tracking_uri(uri: str) -> str:
    """A relative `sqlite:///` store made absolute (for processes with another working directory); others as given."""
    if uri.startswith("sqlite:///"):
        return f"sqlite:///{Path(uri.removeprefix('sqlite:///')).resolve()}"
    return uri


def redact(uri: str) -> str:
    """The URI without user:password@ (never print or log a credential)."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """A tracking server must answer /health now: MLflow's own client retries for minutes before failing."""
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    try:
        response = requests.get(uri.rstrip("/") + "/health", timeout=timeout_s)
    except requests.RequestException as error:
        raise CollectionLoraError(f"MLFLOW_TRACKING_URI / tracking.uri: {redact(uri)} is unreachable ({type(error).__name__})") from None
    if response.status_code != 200:
        raise CollectionLoraError(f"MLFLOW_TRACKING_URI / tracking.uri: {redact(uri)}/health answered HTTP {response.status_code}")


def open_experiment(config: TrackingConfig):
    """Point MLflow at the store (checked reachable) and return (client, experiment id). A local
    `sqlite:///` store keeps the experiment's artifacts in a folder beside the database."""
    import mlflow

    uri = tracking_uri(config)
    check_reachable(uri)
    artifacts = None
    if uri.startswith("sqlite:///"):
        database = Path(uri.removeprefix("sqlite:///"))
        database.parent.mkdir(parents=True, exist_ok=True)
        artifacts = (database.parent / "artifacts").resolve().as_uri()
    users_choice = os.environ.get(TRACKING_URI_VARIABLE)
    mlflow.set_tracking_uri(uri)
    # MLflow also exports the URI to the environment, where `tracking_uri` would then mistake it for
    # the user's choice in every later call of this process (KFP local runs, tests): undo that.
    if users_choice is None:
        os.environ.pop(TRACKING_URI_VARIABLE, None)
    else:
        os.environ[TRACKING_URI_VARIABLE] = users_choice
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(config.experiment)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(config.experiment, artifact_location=artifacts)
    return client, experiment_id


class RunLogger:
    """One MLflow run plus `metrics.jsonl`; inactive (no MLflow, no file) on ranks other than 0."""

    def __init__(self, config: TrackingConfig, run_name: str, params: dict, metrics_file: Path, active: bool, resume_run_id: str | None = None):
        self.active = active
        self.metrics_file = Path(metrics_file)
        self.run_id: str | None = None
        if not active:
            return
        import mlflow

        client, experiment_id = open_experiment(config)
        uri = redact(tracking_uri(config))
        self._mlflow = mlflow
        if resume_run_id and not _run_exists(client, resume_run_id):
            # a checkpoint moved to another machine or tracking server: its run is not there to continue
            print(f"tracking: run {resume_run_id} of the checkpoint is not in {uri}; logging the resumed steps to a new run", file=sys.stderr)
            resume_run_id = None
        if resume_run_id:
            run = mlflow.start_run(run_id=resume_run_id)
        else:
            run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name)
            mlflow.log_params(flatten_params(params))
        self.run_id = run.info.run_id
        self.metrics_file.parent.mkdir(parents=True, exist_ok=True)

    def log(self, metrics: dict[str, float], step: int) -> None:
        if not self.active:
            return
        self._mlflow.log_metrics(metrics, step=step)
        with open(self.metrics_file, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"step": step, **metrics}, sort_keys=True) + "\n")

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


def flatten_params(params: dict, prefix: str = "") -> dict[str, str]:
    """Nested sections as dotted keys; MLflow caps a value at 6000 characters."""
    out: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten_params(value, f"{name}."))
        else:
            out[name] = str(value)[:6000]
    return out
