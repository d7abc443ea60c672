"""The pipeline on a Kubeflow Pipelines cluster: connect with a token from the environment, upload the
compiled IR as a pipeline (or a new version of it), start a run. Every IR and argument is checked here
first, so a broken file or a value the pipeline cannot use is one line before any request is sent.

Tokens: $KFP_TOKEN, else the file named by $KF_PIPELINES_SA_TOKEN_PATH (a pod's projected service
account token). Only a loopback host (`kubectl port-forward` to a standalone KFP) may go without one.
A token is sent as `Authorization: Bearer ...` and is never printed, logged or written."""

from __future__ import annotations

import contextlib
import hashlib
import io
import ipaddress
import json
import os
import ssl
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Iterator
from datetime import datetime, timezone
from http.client import HTTPException
from pathlib import Path
from typing import TYPE_CHECKING

from collectionlora.config import Params
from collectionlora.errors import ConfigError, PipelineError
from collectionlora.pipeline.build import compile_pipeline, read_ir
from collectionlora.pipeline.distill_task import check_placement
from collectionlora.pipeline.task_params import ORIGIN, task_params

if TYPE_CHECKING:
    import kfp

TOKEN_ENV = "KFP_TOKEN"
TOKEN_PATH_ENV = "KF_PIPELINES_SA_TOKEN_PATH"
HEALTHZ = "/apis/v2beta1/healthz"
PROBE_TIMEOUT_S = 5.0  # kfp.Client's own healthz retries 5 times with 5 s sleeps: probe once, briefly, first
BANK_DIR = "/bank"  # any absolute folder: where a task would find the imported bank


def api_host(host: str) -> str:
    """`host` as the KFP API's base URL (http(s) only, no trailing slash): kfp.Client would silently
    turn a bare name into https://name."""
    parsed = urllib.parse.urlsplit(host.strip())
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise PipelineError(f"KFP host {host!r}: expected the API's URL, http(s)://host[:port][/prefix]")
    return host.strip().rstrip("/")


def is_loopback(host: str) -> bool:
    """A host on this machine: `kubectl port-forward svc/ml-pipeline 8888:8888`, the one case without a token."""
    name = urllib.parse.urlsplit(host).hostname or ""
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def kfp_token(host: str) -> str | None:
    """The bearer token from the environment only (never an option: it would land in shell history and
    process lists); None for a loopback host without one, else missing is an error."""
    token = os.environ.get(TOKEN_ENV, "").strip()
    path = os.environ.get(TOKEN_PATH_ENV, "").strip()
    if not token and path:
        try:
            token = Path(path).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as error:
            reason = getattr(error, "strerror", None) or type(error).__name__
            raise PipelineError(f"${TOKEN_PATH_ENV}={path}: cannot read the token ({reason})") from None
        if not token:
            raise PipelineError(f"${TOKEN_PATH_ENV}={path}: the token file is empty")
    if not token and not is_loopback(host):
        raise PipelineError(
            f"{host}: no token: set {TOKEN_ENV} (or {TOKEN_PATH_ENV} in a pod); only a loopback host (kubectl port-forward) may go without"
        )
    return token or None


def connect(host: str) -> kfp.Client:
    """A kfp.Client for `host` with the environment's token, after one short healthz probe (an
    unreachable host or a refused token is one line at once, not kfp's 25 s of retries)."""
    import kfp

    host = api_host(host)
    token = kfp_token(host)
    _probe(host, token)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="This client only works with Kubeflow Pipeline", category=FutureWarning)
        with _api(f"{host}: connecting"):
            return kfp.Client(host=host, existing_token=token)


def pipeline_ir(ir: Path | None, params: Params, repo: Path, scratch: Path) -> Path:
    """The IR to send: `ir` as given (refused here if broken), else `params` compiled for a cluster
    into `scratch` (params.yaml's values, with --set applied, become the parameters' defaults)."""
    if ir is None:
        return compile_pipeline(params, Path(scratch) / f"{params.kfp.pipeline_name}.yaml", repo)
    ir_spec(ir)
    return Path(ir)


def default_version_name(ir: Path, now: datetime | None = None) -> str:
    """`<UTC time>-<IR sha256[:12]>`: sorts by upload time, never repeats, and names the exact IR
    (the compile is deterministic, so the hash identifies code, params, image and data version)."""
    digest = hashlib.sha256(Path(ir).read_bytes()).hexdigest()[:12]
    return f"{(now or datetime.now(timezone.utc)).astimezone(timezone.utc):%Y%m%dT%H%M%SZ}-{digest}"


def upload(client: kfp.Client, ir: Path, name: str, version: str | None, description: str) -> dict:
    """Upload `ir` as pipeline `name`, or as a new version when `name` exists (version default:
    default_version_name); returns {"created", "pipeline_id", "pipeline_version_id", "version", "url", "note"}."""
    ir = Path(ir)
    ir_spec(ir)
    if not name.strip():
        raise PipelineError("the pipeline name is empty")
    with _api(f"{name}: looking the pipeline up"):
        pipeline_id = client.get_pipeline_id(name)
    if pipeline_id is None:
        with _api(f"{ir}: uploading as pipeline {name}"):
            pipeline_id = client.upload_pipeline(str(ir), pipeline_name=name, description=description).pipeline_id
            listed = client.list_pipeline_versions(pipeline_id).pipeline_versions or []
        # KFP names a new pipeline's first version after the pipeline; --version names later uploads.
        note = f"version {version!r} not used: KFP names a new pipeline's first version after the pipeline" if version else ""
        first = listed[0] if len(listed) == 1 else None
        version_id, version_name = (first.pipeline_version_id, first.display_name) if first else (None, name)
        created = "pipeline"
    else:
        version_name, note, created = version or default_version_name(ir), "", "version"
        with _api(f"{ir}: uploading as version {version_name} of pipeline {name}"):
            response = client.upload_pipeline_version(
                str(ir), pipeline_version_name=version_name, pipeline_id=pipeline_id, description=description
            )
        version_id = response.pipeline_version_id
    url = f"{_ui(client)}/#/pipelines/details/{pipeline_id}" + (f"/version/{version_id}" if version_id else "")
    return {
        "created": created, "pipeline_id": pipeline_id, "pipeline_version_id": version_id, "version": version_name, "url": url,
        "note": note,
    }


def run(
    client: kfp.Client, ir: Path, experiment: str, arguments: dict, run_name: str | None, namespace: str, service_account: str
) -> dict:
    """Start a run of the compiled `ir` (embedded whole in the request) in `experiment` (created if
    missing), after checking `arguments` against the IR's parameters; returns {"run_id", "run_name", "url", ...}."""
    ir = Path(ir)
    spec = ir_spec(ir)
    check_arguments(spec, arguments)
    run_name = run_name or f"{spec.pipeline_info.name} {datetime.now(timezone.utc):%Y-%m-%d %H:%M:%S} UTC"
    with _api(f"{ir}: starting run {run_name!r} in experiment {experiment}"):
        result = client.create_run_from_pipeline_package(
            str(ir), arguments=dict(arguments), run_name=run_name, experiment_name=experiment, namespace=namespace,
            service_account=service_account,
        )
    return {
        "run_id": result.run_id, "run_name": run_name, "experiment": experiment, "experiment_id": result.run_info.experiment_id,
        "url": f"{_ui(client)}/#/runs/details/{result.run_id}",
    }


def check_arguments(spec, arguments: dict) -> None:
    """Refuse what the pipeline would only refuse on the cluster, minutes later: an unknown parameter,
    a non-text value for a text parameter, an empty bank_uri, a `params` its tasks cannot validate."""
    from kfp.pipeline_spec import pipeline_spec_pb2

    definitions = spec.root.input_definitions.parameters
    unknown = sorted(set(arguments) - set(definitions))
    if unknown:
        raise PipelineError(f"unknown pipeline parameter {', '.join(unknown)}; valid: {', '.join(sorted(definitions))}")
    for key, value in arguments.items():
        if definitions[key].parameter_type == pipeline_spec_pb2.ParameterType.STRING and not isinstance(value, str):
            raise PipelineError(f"pipeline parameter {key}: expected text, got {type(value).__name__}")
    if "bank_uri" in definitions and not arguments.get("bank_uri", definitions["bank_uri"].default_value.string_value):
        raise PipelineError(
            "pipeline parameter bank_uri is empty: a cluster run imports the bank from object storage (bank_uri=s3://bucket/prefix/data)"
        )
    if "params" in arguments:
        parsed = task_params(arguments["params"], BANK_DIR)  # ConfigError: one line naming the parameter
        try:
            check_placement(parsed)  # the distill task checks the same, hours into the run
        except ConfigError as error:
            raise PipelineError(f"{ORIGIN}: {str(error).removeprefix('params: ')}") from None


def ir_spec(ir: Path):
    """read_ir's PipelineSpec (one line if broken); kfp.Client reads a package by its suffix, so it must be .yaml."""
    if Path(ir).suffix not in (".yaml", ".yml"):
        raise PipelineError(f"{ir}: expected a compiled pipeline IR ending in .yaml")
    return read_ir(Path(ir))[0]


def _ui(client: kfp.Client) -> str:
    """The UI's base URL as kfp.Client builds its own links ($KF_PIPELINES_UI_ENDPOINT, else the host)."""
    return client._get_url_prefix().rstrip("/")


@contextlib.contextmanager
def _api(what: str) -> Iterator[None]:
    """An API failure as one line; kfp.Client's printed links are dropped (the caller returns its own)."""
    import kfp_server_api
    import urllib3

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    except kfp_server_api.ApiException as error:
        raise PipelineError(f"{what}: the KFP API answered HTTP {error.status} ({_server_message(error)})") from None
    except (urllib3.exceptions.HTTPError, OSError) as error:
        raise PipelineError(f"{what}: {' '.join(str(error).split())}") from None
    except (ValueError, TimeoutError) as error:  # kfp: several pipelines of one name; healthz retries exhausted
        raise PipelineError(f"{what}: {' '.join(str(error).split())}") from None


def _server_message(error) -> str:
    try:
        body = json.loads(error.body or "{}")
    except (TypeError, ValueError):
        body = {}
    message = (body.get("error_message") or body.get("message") if isinstance(body, dict) else None) or error.reason or ""
    return " ".join(str(message).split())[:300]


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect (an auth proxy's login page) is an answer to report, not to follow with the token."""

    def redirect_request(self, *args, **kwargs):
        return None


def _probe(host: str, token: str | None) -> None:
    """GET healthz once with a short timeout, with the token (a proxy in front may demand it)."""
    import certifi

    request = urllib.request.Request(host + HEALTHZ, headers={"Accept": "application/json"})
    if token:
        request.add_unredirected_header("Authorization", f"Bearer {token}")
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}),  # as kfp.Client: no proxy from the environment
        urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=certifi.where())),
        _NoRedirect(),
    )
    try:
        with opener.open(request, timeout=PROBE_TIMEOUT_S) as response:
            body = response.read(65536)
    except urllib.error.HTTPError as error:
        if error.code in (401, 403):
            raise PipelineError(f"{host}: the KFP API refused the credentials (HTTP {error.code}); check {TOKEN_ENV}") from None
        if 300 <= error.code < 400:
            target = error.headers.get("Location", "?")
            raise PipelineError(
                f"{host}: healthz redirected (HTTP {error.code} to {target}): a login page? give the API's URL and a token in {TOKEN_ENV}"
            ) from None
        raise PipelineError(f"{host}: healthz answered HTTP {error.code} {error.reason}") from None
    except urllib.error.URLError as error:
        raise PipelineError(f"{host}: unreachable ({' '.join(str(error.reason).split())})") from None
    except (OSError, HTTPException) as error:
        raise PipelineError(f"{host}: unreachable ({' '.join(str(error).split()) or type(error).__name__})") from None
    try:
        if not isinstance(json.loads(body), dict):
            raise ValueError
    except ValueError:
        raise PipelineError(f"{host}{HEALTHZ}: not a KFP API answer (no JSON object); is this the API's URL?") from None
