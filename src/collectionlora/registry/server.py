"""The MLflow UI on a local store (`make ui`, `collectionlora ui`, the browser test).

One `mlflow server` process on 127.0.0.1 with one worker, telemetry and the job runner off (the job
runner alone costs ~1.4 GB and 7 processes). For the project's `sqlite:///` store the server serves
the same database and the same artifacts folder beside it that `tracking.py` logs to, so whatever
the CLI logged or registered shows in the UI.

    with MlflowServer.for_tracking_uri("sqlite:///artifacts/mlflow/mlflow.db", port=5000) as server:
        print(server.url)
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from collectionlora.errors import CollectionLoraError
from collectionlora.tracking import absolute_tracking_uri

HOST = "127.0.0.1"
PORT_VARIABLE = "COLLECTIONLORA_UI_PORT"
DEFAULT_PORT = 5000
# no telemetry, no background job runner: nothing leaves the machine and the server stays ~500 MB
SERVER_ENVIRONMENT = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    "HF_HUB_OFFLINE": "1",
}


class ServerError(CollectionLoraError):
    """The MLflow UI server cannot be configured, started or reached."""


@dataclass(frozen=True)
class ServerStore:
    """A backend store the server can serve, where its artifacts go (a local folder, or an s3:// URI the
    server reaches with credentials from its environment), and where the server logs."""

    backend_store_uri: str
    artifacts: Path | str
    log_file: Path


def local_store(tracking_uri: str, artifacts: Path | None = None) -> ServerStore:
    """The `sqlite:///` store of `tracking.py`, made absolute; artifacts default to `artifacts/` beside the DB as there."""
    if not tracking_uri.startswith("sqlite:///"):
        raise ServerError(
            f"tracking URI {tracking_uri!r}: the UI serves a local sqlite:/// store only"
            " (an http(s) tracking server already has its UI: open that URL)"
        )
    database = Path(absolute_tracking_uri(tracking_uri).removeprefix("sqlite:///"))
    return ServerStore(
        backend_store_uri=f"sqlite:///{database}",
        artifacts=(database.parent / "artifacts") if artifacts is None else Path(artifacts).resolve(),
        log_file=database.parent / "ui-server.log",
    )


def ui_port(environ: dict[str, str] | None = None) -> int:
    """The port from $COLLECTIONLORA_UI_PORT, else 5000."""
    raw = (os.environ if environ is None else environ).get(PORT_VARIABLE, "").strip()
    if not raw:
        return DEFAULT_PORT
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise ServerError(f"{PORT_VARIABLE}={raw!r}: expected a port number 1-65535")
    return int(raw)


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on now (tests run beside a developer's `make ui`)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def server_command(store: ServerStore, port: int, host: str = HOST) -> list[str]:
    """`mlflow server` for one store: loopback, one worker (2-core box), artifacts proxied from the store's folder."""
    return [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", store.backend_store_uri,
        "--artifacts-destination", str(store.artifacts),
        "--host", host,
        "--port", str(port),
        "--workers", "1",
    ]  # fmt: skip


def server_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """The caller's environment with telemetry and the job runner switched off."""
    return {**(os.environ if base is None else base), **SERVER_ENVIRONMENT}


class MlflowServer:
    """A running `mlflow server` subprocess: started by `start()` (or `with`), stopped by `stop()`."""

    def __init__(self, store: ServerStore, port: int, startup_timeout: float = 120.0):
        self.store = store
        self.port = port
        self.startup_timeout = startup_timeout
        self.url = f"http://{HOST}:{port}"
        self._process: subprocess.Popen | None = None

    @classmethod
    def for_tracking_uri(cls, tracking_uri: str, port: int | None = None, startup_timeout: float = 120.0) -> MlflowServer:
        return cls(local_store(tracking_uri), ui_port() if port is None else port, startup_timeout)

    def start(self) -> MlflowServer:
        """Start the server and return once `GET /health` answers 200; a dead or silent server is an error."""
        _require_free(self.port)
        if isinstance(self.store.artifacts, Path):
            self.store.artifacts.mkdir(parents=True, exist_ok=True)
        self.store.log_file.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.store.log_file, "w", encoding="utf-8")  # noqa: SIM115 - the child writes to it until stop()
        try:
            # own session: Ctrl-C in the terminal reaches us, and we stop the server in order
            self._process = subprocess.Popen(
                server_command(self.store, self.port),
                env=server_environment(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log.close()
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            code = self._process.poll()
            if code is not None:
                raise ServerError(f"mlflow server exited with status {code} before answering on {self.url}: {self.log_tail()}")
            if _health(self.url):
                return
            time.sleep(0.3)
        raise ServerError(f"mlflow server gave no /health 200 on {self.url} within {self.startup_timeout:.0f} s: {self.log_tail()}")

    def log_tail(self, lines: int = 4) -> str:
        """The last lines of the server's output on one line (for one-line errors)."""
        try:
            with open(self.store.log_file, encoding="utf-8", errors="replace") as handle:
                tail = deque((line.strip() for line in handle if line.strip()), maxlen=lines)
        except OSError:
            return "(no server log)"
        return " | ".join(tail) or "(server printed nothing)"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def wait(self) -> int:
        """Block until the server exits (the CLI serves until Ctrl-C)."""
        return self._process.wait() if self._process is not None else 0

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM (MLflow then stops its children itself), then SIGKILL to the process group after `grace` seconds."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _health(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _require_free(port: int) -> None:
    """Refuse a taken port: otherwise another server's /health 200 would pass for ours."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a closed server's TIME_WAIT is no conflict
        try:
            probe.bind((HOST, port))
        except OSError as error:
            raise ServerError(f"port {port} on {HOST} is in use ({error.strerror}); set {PORT_VARIABLE} to another port") from None
