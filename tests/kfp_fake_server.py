"""A fake Kubeflow Pipelines v2beta1 API server on 127.0.0.1, for driving a real kfp.Client in tests.

It answers the calls `collectionlora pipeline upload|run` make (healthz, pipelines, upload, upload_version,
versions, experiments, runs), records every request, and checks what a real server would parse: an
uploaded YAML must parse into PipelineSpec (+ PlatformSpec when a second document exists) and a run's
embedded pipeline_spec likewise, else 400. Given a token, any request without `Authorization: Bearer
<token>` gets 401. It mirrors the request/response shapes of kfp-server-api 2.17; it proves nothing
about a real server's own rules beyond those."""

from __future__ import annotations

import json
import threading
import uuid

import yaml
from google.protobuf import json_format
from kfp.pipeline_spec import pipeline_spec_pb2
from werkzeug.serving import WSGIRequestHandler, make_server
from werkzeug.wrappers import Request, Response

API = "/apis/v2beta1"


class FakeKfp:
    """Serve on a free loopback port until close(); `requests` lists what arrived, in order."""

    def __init__(self, token: str | None = None) -> None:
        self.token = token
        self.requests: list[dict] = []
        self.pipelines: dict[str, dict] = {}
        self.versions: dict[str, dict] = {}
        self.experiments: dict[str, dict] = {}
        self.runs: dict[str, dict] = {}
        self._lock = threading.Lock()
        self._server = make_server("127.0.0.1", 0, self._app, threaded=True, request_handler=_Quiet)
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> FakeKfp:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def paths(self) -> list[tuple[str, str]]:
        return [(r["method"], r["path"]) for r in self.requests]

    @Request.application
    def _app(self, request: Request) -> Response:
        record = {"method": request.method, "path": request.path, "args": dict(request.args),
                  "authorization": request.headers.get("Authorization")}
        if request.files:
            upload = request.files["uploadfile"]
            record["upload"] = {"filename": upload.filename, "text": upload.read().decode("utf-8", "replace")}
        elif request.get_data():
            record["json"] = request.get_json(silent=True)
        with self._lock:
            self.requests.append(record)
            if self.token and record["authorization"] != f"Bearer {self.token}":
                return _json({"error_message": "missing or wrong bearer token", "code": 16}, 401)
            try:
                return self._route(request, record)
            except SpecError as error:
                return _json({"error_message": f"invalid pipeline spec: {error}", "code": 3}, 400)

    def _route(self, request: Request, record: dict) -> Response:
        method, path = request.method, request.path
        if path == f"{API}/healthz":
            return _json({"multi_user": False})
        if path == f"{API}/pipelines/upload" and method == "POST":
            _validate_yaml(record["upload"]["text"])
            name = request.args["name"]
            if any(p["display_name"] == name for p in self.pipelines.values()):
                return _json({"error_message": f"pipeline {name} already exists", "code": 6}, 409)
            pipeline = {"pipeline_id": _id(), "display_name": name, "description": request.args.get("description", "")}
            self.pipelines[pipeline["pipeline_id"]] = pipeline
            self._add_version(pipeline["pipeline_id"], name, record["upload"]["text"])  # as KFP: a first version, named after the pipeline
            return _json(pipeline)
        if path == f"{API}/pipelines/upload_version" and method == "POST":
            _validate_yaml(record["upload"]["text"])
            pipeline_id, name = request.args.get("pipelineid"), request.args["name"]
            if pipeline_id not in self.pipelines:
                return _json({"error_message": f"pipeline {pipeline_id} not found", "code": 5}, 404)
            if any(v["pipeline_id"] == pipeline_id and v["display_name"] == name for v in self.versions.values()):
                return _json({"error_message": f"pipeline version {name} already exists", "code": 6}, 409)
            return _json(self._add_version(pipeline_id, name, record["upload"]["text"]))
        if path == f"{API}/pipelines" and method == "GET":
            found = _filtered(list(self.pipelines.values()), request.args)
            return _json({"pipelines": found, "total_size": len(found)} if found else {})
        if path.startswith(f"{API}/pipelines/") and path.endswith("/versions") and method == "GET":
            pipeline_id = path.split("/")[-2]
            found = [v for v in self.versions.values() if v["pipeline_id"] == pipeline_id]
            return _json({"pipeline_versions": found, "total_size": len(found)} if found else {})
        if path == f"{API}/experiments" and method == "GET":
            found = _filtered(list(self.experiments.values()), request.args)
            return _json({"experiments": found, "total_size": len(found)} if found else {})
        if path == f"{API}/experiments" and method == "POST":
            experiment = {**record["json"], "experiment_id": _id()}
            self.experiments[experiment["experiment_id"]] = experiment
            return _json(experiment)
        if path == f"{API}/runs" and method == "POST":
            body = record["json"]
            _validate_run_spec(body.get("pipeline_spec"))
            run = {"run_id": _id(), "state": "PENDING", **{k: body.get(k) for k in ("display_name", "experiment_id", "runtime_config")}}
            self.runs[run["run_id"]] = run
            return _json(run)
        if path.startswith(f"{API}/runs/") and method == "GET" and path.rsplit("/", 1)[1] in self.runs:
            return _json(self.runs[path.rsplit("/", 1)[1]])
        return _json({"error_message": f"the fake does not implement {method} {path}", "code": 12}, 501)

    def _add_version(self, pipeline_id: str, name: str, text: str) -> dict:
        version = {"pipeline_id": pipeline_id, "pipeline_version_id": _id(), "display_name": name}
        self.versions[version["pipeline_version_id"]] = {**version, "yaml": text}
        return version


class _Quiet(WSGIRequestHandler):
    """No access log on stderr: tests assert on what the CLI itself writes there."""

    def log(self, *args) -> None:
        pass


class SpecError(Exception):
    """What a real API server answers with 400 InvalidArgument."""


def _validate_yaml(text: str) -> None:
    try:
        documents = list(yaml.safe_load_all(text))
    except yaml.YAMLError as error:
        raise SpecError(f"not YAML: {error}") from error
    if not documents or len(documents) > 2:
        raise SpecError("expected a PipelineSpec document and an optional PlatformSpec document")
    _parse(documents[0], documents[1] if len(documents) == 2 else None)


def _validate_run_spec(spec) -> None:
    if not isinstance(spec, dict):
        raise SpecError("a run from a package needs pipeline_spec")
    if "pipeline_spec" in spec:  # kfp.Client's form when a PlatformSpec exists
        _parse(spec["pipeline_spec"], spec.get("platform_spec"))
    else:
        _parse(spec, None)


def _parse(pipeline: object, platform: object) -> None:
    try:
        parsed = json_format.ParseDict(pipeline, pipeline_spec_pb2.PipelineSpec())
        if platform is not None:
            json_format.ParseDict(platform, pipeline_spec_pb2.PlatformSpec())
    except (json_format.ParseError, AttributeError, TypeError) as error:
        raise SpecError(" ".join(str(error).split())) from error
    if not parsed.pipeline_info.name:
        raise SpecError("pipelineInfo.name is empty")


def _filtered(items: list[dict], args) -> list[dict]:
    for predicate in json.loads(args.get("filter") or "{}").get("predicates", []):
        items = [item for item in items if item.get(predicate["key"]) == predicate.get("stringValue", predicate.get("string_value"))]
    return items


def _json(payload: dict, status: int = 200) -> Response:
    return Response(json.dumps(payload), status=status, mimetype="application/json")


def _id() -> str:
    return str(uuid.uuid4())
