"""Training metrics to MLflow (a local sqlite store by default) and to a JSON-lines file.

The environment's MLFLOW_TRACKING_URI, when set, wins over params (a cluster points every stage at
its MLflow server that way). For a local `sqlite:///` store the experiment's artifacts go to a
folder beside the database, not to the working directory.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
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
    """One MLflow run plus `metrics.jsonl`; inactive (no MLflow, no file) on ranks other than 0.

    The server must answer when the run starts. If it goes away later (stopped, a timeout) training goes
    on: every record is in metrics.jsonl first, the ones the server did not take are kept and sent when
    it answers /health again (checked at each later log call), and it is said once on stderr, not per
    step. How long the first failing call takes is MLflow's: MLFLOW_HTTP_REQUEST_TIMEOUT and
    MLFLOW_HTTP_REQUEST_MAX_RETRIES. What is still unsent at close() is reported in one line.
    """

    def __init__(self, config: TrackingConfig, run_name: str, params: dict, metrics_file: Path, active: bool, resume_run_id: str | None = None):
        self.active = active
        self.metrics_file = Path(metrics_file)
        self.run_id: str | None = None
        self._closed = False
        if not active:
            return
        from mlflow.entities import Param
        from mlflow.tracking.context.registry import resolve_tags

        # The client API, not the fluent one: no process-wide active run that a server gone away at the
        # end would leave behind (fluent's end_run cannot skip the server).
        client, experiment_id = open_experiment(config)
        uri = redact(tracking_uri(config))
        self._client = client
        self._uri, self._probe_uri = uri, tracking_uri(config)
        self._pending: list = []  # mlflow Metric records the server has not taken yet
        self._away = False  # the server failed a call and has not answered since
        if resume_run_id and not _run_exists(client, resume_run_id):
            # a checkpoint moved to another machine or tracking server: its run is not there to continue
            print(f"tracking: run {resume_run_id} of the checkpoint is not in {uri}; logging the resumed steps to a new run", file=sys.stderr)
            resume_run_id = None
        if resume_run_id:
            client.update_run(resume_run_id, status="RUNNING")
            self.run_id = resume_run_id
        else:
            self.run_id = client.create_run(experiment_id, run_name=run_name, tags=resolve_tags()).info.run_id
            flat = [Param(key, value) for key, value in flatten_params(params).items()]
            for start in range(0, len(flat), 100):  # MLflow takes 100 params per call
                client.log_batch(self.run_id, params=flat[start : start + 100])
        self.metrics_file.parent.mkdir(parents=True, exist_ok=True)

    def log(self, metrics: dict[str, float], step: int) -> None:
        if not self.active:
            return
        with open(self.metrics_file, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"step": step, **metrics}, sort_keys=True) + "\n")
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._pending += [Metric(key, float(value), now, step) for key, value in metrics.items()]
        self._send()

    def close(self, status: str = "FINISHED") -> None:
        """Send what is pending and mark the run `status` (a second close does nothing)."""
        if not self.active or self._closed:
            return
        self._closed = True
        self._send()
        if self._away:
            steps = sorted({metric.step for metric in self._pending})
            _say(
                f"tracking: {self._uri} still does not answer: {len(steps)} metric records (steps {steps[0]}-{steps[-1]}) were not "
                f"logged (they are in {self.metrics_file}) and run {self.run_id} stays RUNNING there",
            )
            return
        try:
            self._client.set_terminated(self.run_id, status)
        except tracking_errors() as error:
            _say(f"tracking: run {self.run_id} could not be marked {status} in {self._uri} ({one_line_error(error)})")

    def _send(self) -> None:
        """Log the pending records in batches (MLflow takes 1000 metrics per call); on a failure keep the
        rest and say so once; while the server is away, try again only once /health answers."""
        if not self._pending:
            return
        if self._away and not _answers(self._probe_uri):
            return
        try:
            while self._pending:
                self._client.log_batch(self.run_id, metrics=self._pending[:1000])
                del self._pending[:1000]
        except tracking_errors() as error:
            if not self._away:
                _say(
                    f"tracking: {self._uri} did not take the metrics ({one_line_error(error)}); training goes on, metrics are kept in "
                    f"{self.metrics_file} and logged when the server answers again",
                )
            self._away = True
            return
        if self._away:
            _say(f"tracking: {self._uri} answers again; the metrics kept meanwhile are logged")
        self._away = False


def _say(line: str) -> None:
    """One line on stderr, above any progress bar (not glued to the end of one)."""
    from tqdm.auto import tqdm

    tqdm.write(line, file=sys.stderr)


def tracking_errors() -> tuple[type[BaseException], ...]:
    """What a call to an unavailable tracking server raises: MLflow's error after its retries, or the
    transport's (requests) or the operating system's."""
    import requests
    from mlflow.exceptions import MlflowException

    return (MlflowException, requests.RequestException, OSError)


def _answers(uri: str) -> bool:
    try:
        check_reachable(uri)
    except CollectionLoraError:
        return False
    return True


def one_line_error(error: BaseException) -> str:
    """The error's message on one line, at most 200 characters, with no user:password@ of a URL."""
    text = re.sub(r"//[^/@\s]+@", "//", " ".join(str(error).split()))
    return text[:200] + ("..." if len(text) > 200 else "")


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
