"""manifests/: base and both overlays render with kustomize, every document passes strict schema
validation for a pinned Kubernetes version, and the rendered objects are what the pipeline expects
(names and keys from params.yaml and the pipeline code), with no secret value, bounded resources,
non-root pods and a tracking server that checks hosts, authenticates and proxies artifacts.
(Applying them needs a cluster: not done here.)"""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
from functools import cache
from urllib.parse import urlsplit

import pytest
import yaml
from conftest import REPO

from collectionlora.config import Params, load_params

KUBERNETES_VERSION = "1.33.0"  # the oldest minor we support (Kubeflow Trainer v2 needs >= 1.31)
MANIFESTS = REPO / "manifests"
LAYOUTS = ("base", "overlays/local", "overlays/gpu")
# Not in params.yaml (the pipeline never names them): the manifests' namespace and the runs' identity.
NAMESPACE = "collectionlora"
SERVICE_ACCOUNT = "collectionlora-pipeline-runner"
WORKLOADS = ("Deployment", "StatefulSet")


@cache
def render(layout: str) -> tuple[dict, ...]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed: the manifests cannot be rendered (kubectl kustomize)")
    done = subprocess.run(["kubectl", "kustomize", str(MANIFESTS / layout)], check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


@cache
def params() -> Params:
    return load_params(REPO / "params.yaml")


def one(docs: tuple[dict, ...], kind: str, name: str) -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def containers(docs: tuple[dict, ...]):
    for doc in docs:
        if doc["kind"] in WORKLOADS:
            spec = doc["spec"]["template"]["spec"]
            for container in spec.get("initContainers", []) + spec["containers"]:
                yield doc, spec, container


def mlflow_container(docs: tuple[dict, ...]) -> dict:
    return one(docs, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]


def env_of(container: dict) -> dict[str, dict]:
    return {entry["name"]: entry for entry in container.get("env", [])}


def secret_template() -> list[dict]:
    return [d for d in yaml.safe_load_all((MANIFESTS / "base" / "secrets.template.yaml").read_text(encoding="utf-8")) if d]


def pipeline_env() -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """What the compiled pipeline's tasks read: the ConfigMap's keys and each Secret's keys."""
    from collectionlora.pipeline.build import load_pipeline

    module = load_pipeline(REPO)
    return module.CONFIG_MAP_ENV, module.S3_SECRET_ENV, module.MLFLOW_SECRET_ENV


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_rendered_document_passes_strict_validation(layout: str) -> None:
    import kubernetes_validate

    docs = render(layout)
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_strict_validation_rejects_an_unknown_field() -> None:
    import kubernetes_validate

    deployment = yaml.safe_load(yaml.safe_dump(one(render("base"), "Deployment", "mlflow")))
    deployment["spec"]["template"]["spec"]["containers"][0]["resource"] = {}  # a typo of `resources`
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_no_secret_value_is_rendered(layout: str) -> None:
    for doc in render(layout):
        if doc["kind"] == "Secret":
            assert not any(doc.get(field) for field in ("data", "stringData")), f"Secret {doc['metadata']['name']} has values"


def test_the_secret_templates_hold_no_value_and_are_no_resource() -> None:
    kustomization = yaml.safe_load((MANIFESTS / "base" / "kustomization.yaml").read_text(encoding="utf-8"))
    assert "secrets.template.yaml" not in kustomization["resources"]
    templates = secret_template()
    assert templates and all(doc["kind"] == "Secret" for doc in templates)
    for doc in templates:
        assert "data" not in doc and all(value == "" for value in doc["stringData"].values()), doc["metadata"]["name"]


def test_the_secret_templates_match_params_and_the_keys_the_tasks_read() -> None:
    _, s3_keys, mlflow_keys = pipeline_env()
    from collectionlora.trainjob import SECRET_KEYS

    templates = {doc["metadata"]["name"]: set(doc["stringData"]) for doc in secret_template()}
    secrets = params().kfp.secrets
    assert templates[secrets.s3] == set(s3_keys) == set(SECRET_KEYS["s3"])
    assert templates[secrets.mlflow] == set(mlflow_keys) == set(SECRET_KEYS["mlflow"])
    assert all(doc["metadata"]["namespace"] == NAMESPACE for doc in secret_template())


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_secret_reference_has_a_template(layout: str) -> None:
    templates = {doc["metadata"]["name"]: set(doc["stringData"]) for doc in secret_template()}
    for _, _, container in containers(render(layout)):
        for entry in container.get("env", []):
            ref = entry.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["key"] in templates.get(ref["name"], set()), f"{ref} is in no secret template"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_container_has_requests_and_limits(layout: str) -> None:
    for doc, _, container in containers(render(layout)):
        resources = container.get("resources", {})
        for bound in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(resources.get(bound, {})), f"{doc['metadata']['name']}/{container['name']}: {bound}"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_pod_runs_as_non_root_with_no_privileges(layout: str) -> None:
    for doc, spec, container in containers(render(layout)):
        where = f"{doc['metadata']['name']}/{container['name']}"
        pod = spec.get("securityContext", {})
        assert pod.get("runAsNonRoot") is True and pod.get("runAsUser", 0) != 0, where
        assert pod.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
        context = container.get("securityContext", {})
        assert context.get("allowPrivilegeEscalation") is False, where
        assert context.get("capabilities", {}).get("drop") == ["ALL"], where
        assert context.get("readOnlyRootFilesystem") is True, where
        mounts = {mount["mountPath"] for mount in container.get("volumeMounts", [])}
        assert "/tmp" in mounts, f"{where}: a read-only root needs a writable /tmp"
        assert spec.get("automountServiceAccountToken") is False, f"{where} never talks to the Kubernetes API"


def test_the_mlflow_server_authenticates_checks_hosts_and_proxies_artifacts() -> None:
    container = mlflow_container(render("base"))
    script = " ".join(container.get("command", []) + container.get("args", []))
    for flag in ("--app-name basic-auth", "--serve-artifacts", "--allowed-hosts", "--artifacts-destination",
                 "--host 0.0.0.0", "--port 5000", "--workers 2"):
        assert flag in script, flag
    env = env_of(container)
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"]["value"] == "false"
    for name in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY", "POSTGRES_PASSWORD"):
        assert "secretKeyRef" in env[name]["valueFrom"], f"{name} must come from a Secret"
    backend = env["MLFLOW_BACKEND_STORE_URI"]["value"]
    assert backend.startswith("postgresql") and ":$(POSTGRES_PASSWORD)@" in backend
    assert "--backend-store-uri" not in script, "the URI carries a password: from the environment, not argv"
    destination = one(render("base"), "ConfigMap", "mlflow-server-config")["data"]["MLFLOW_ARTIFACTS_DESTINATION"]
    assert destination.startswith("s3://")


def test_the_mlflow_server_has_health_probes() -> None:
    container = mlflow_container(render("base"))
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health", probe
    for doc in render("base"):
        if doc["kind"] == "StatefulSet":
            postgres = doc["spec"]["template"]["spec"]["containers"][0]
            assert all(probe in postgres for probe in ("readinessProbe", "livenessProbe"))


def test_no_service_links_so_mlflow_port_is_not_overridden() -> None:
    """A Service named `mlflow` would inject MLFLOW_PORT=tcp://...: `mlflow server` reads that as --port."""
    spec = one(render("base"), "Deployment", "mlflow")["spec"]["template"]["spec"]
    assert spec["enableServiceLinks"] is False


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_tracking_uri_is_the_mlflow_service_and_an_allowed_host(layout: str) -> None:
    docs = render(layout)
    uri = urlsplit(one(docs, "ConfigMap", params().kfp.config_map)["data"]["MLFLOW_TRACKING_URI"])
    service = one(docs, "Service", "mlflow")
    assert uri.hostname.split(".")[:2] == ["mlflow", service["metadata"]["namespace"]]
    assert uri.port == service["spec"]["ports"][0]["port"]
    allowed = one(docs, "ConfigMap", "mlflow-server-config")["data"]["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    host = f"{uri.hostname}:{uri.port}"
    assert any(fnmatch.fnmatch(host, pattern) if "*" in pattern else host == pattern for pattern in allowed), host
    assert "*" not in allowed


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_config_map_has_exactly_the_keys_the_tasks_read(layout: str) -> None:
    from collectionlora.trainjob import CONFIG_MAP_KEYS

    config_env, _, _ = pipeline_env()
    data = one(render(layout), "ConfigMap", params().kfp.config_map)["data"]
    assert set(data) == set(config_env) == set(CONFIG_MAP_KEYS)
    # MLflow hands an empty MLFLOW_S3_ENDPOINT_URL to boto3 as the endpoint, which refuses it.
    assert re.match(r"^https?://", data["MLFLOW_S3_ENDPOINT_URL"])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_names_match_params(layout: str) -> None:
    docs = render(layout)
    kfp = params().kfp
    one(docs, "Namespace", NAMESPACE)
    one(docs, "ConfigMap", kfp.config_map)
    one(docs, "PersistentVolumeClaim", kfp.distill.checkpoint_pvc)
    one(docs, "ServiceAccount", SERVICE_ACCOUNT)
    referenced = {entry["valueFrom"]["secretKeyRef"]["name"] for _, _, c in containers(docs)
                  for entry in c.get("env", []) if "secretKeyRef" in entry.get("valueFrom", {})}
    assert kfp.secrets.s3 in referenced  # the server writes artifacts to the same bucket
    assert {d["metadata"]["namespace"] for d in docs if "namespace" in d["metadata"]} == {NAMESPACE}


def test_checkpoint_volume_access_modes_per_layout() -> None:
    name = params().kfp.distill.checkpoint_pvc
    base, local, gpu = (one(render(layout), "PersistentVolumeClaim", name)["spec"] for layout in LAYOUTS)
    assert base["accessModes"] == ["ReadWriteMany"]  # backend trainjob: every node mounts it
    assert local["accessModes"] == ["ReadWriteOnce"] and local["storageClassName"] == "standard"
    assert gpu["accessModes"] == ["ReadWriteMany"] and gpu.get("storageClassName")
    assert gpu["resources"]["requests"]["storage"] != base["resources"]["requests"]["storage"]


def test_overlays_are_labelled_and_sized_apart() -> None:
    def requests(layout: str) -> str:
        return mlflow_container(render(layout))["resources"]["requests"]["memory"]

    assert len({requests(layout) for layout in LAYOUTS}) == 3
    for layout, label in (("overlays/local", "local"), ("overlays/gpu", "gpu")):
        assert all(doc["metadata"]["labels"]["collectionlora.io/overlay"] == label for doc in render(layout))


def test_the_runner_may_run_trainjobs_and_read_no_secret() -> None:
    docs = render("base")
    role = one(docs, "Role", SERVICE_ACCOUNT)

    def verbs(rules: list[dict], group: str, resource: str) -> set[str]:
        return {v for rule in rules if group in rule["apiGroups"] and resource in rule["resources"] for v in rule["verbs"]}

    assert {"create", "get", "list", "watch", "delete", "patch"} <= verbs(role["rules"], "trainer.kubeflow.org", "trainjobs")
    assert {"get", "list"} <= verbs(role["rules"], "trainer.kubeflow.org", "trainingruntimes")
    assert "get" in verbs(role["rules"], "", "pods/log")
    cluster_role = one(docs, "ClusterRole", "collectionlora-clustertrainingruntimes-reader")
    assert verbs(cluster_role["rules"], "trainer.kubeflow.org", "clustertrainingruntimes") == {"get", "list"}
    for doc in docs:
        if doc["kind"] in ("Role", "ClusterRole"):
            for rule in doc["rules"]:
                assert not {"secrets", "*"} & set(rule["resources"]), f"{doc['metadata']['name']} grants {rule}"
    for kind in ("RoleBinding", "ClusterRoleBinding"):
        binding = next(d for d in docs if d["kind"] == kind)
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": SERVICE_ACCOUNT, "namespace": NAMESPACE}]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_mlflow_image_is_the_dockerfiles_server_stage_at_the_locks_mlflow(layout: str) -> None:
    lock = (REPO / "requirements.lock").read_text(encoding="utf-8")
    mlflow_version = re.search(r"^mlflow==(\S+)$", lock, re.MULTILINE).group(1)
    image = mlflow_container(render(layout))["image"]
    assert re.fullmatch(rf"[\w.\-/:]+/collectionlora-mlflow:{re.escape(mlflow_version)}", image), image
    assert "AS mlflow-server" in (REPO / "Dockerfile").read_text(encoding="utf-8")
    for _, _, container in containers(render(layout)):
        assert ":" in container["image"].rsplit("/", 1)[-1] and not container["image"].endswith(":latest"), container["image"]
