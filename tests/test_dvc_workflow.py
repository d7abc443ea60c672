"""DVC as the local workflow: dvc.yaml's deps cover the code each stage runs, its metrics and plots are
declared, an S3 remote round-trips the bank (moto, credentials from the environment only), and a
second `dvc repro` of the real dvc.yaml runs nothing (tiny configuration, slow)."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, S3_CREDENTIALS, TINY_OVERRIDES, s3_bucket

from collectionlora.config import load_params, merge

SRC = REPO / "src"
PACKAGE = "collectionlora"
DVC = Path(sys.executable).with_name("dvc")
BIN = Path(sys.executable).parent
STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
# Modules whose functions are dispatchers: only the command's (stage's) own function counts, plus the
# module-level imports. Every other module counts whole (module-level and function-level imports).
DISPATCHERS = {"collectionlora.cli", "collectionlora.stages"}


# ---- the modules a stage runs, from its imports -----------------------------------------------------
def _module_file(name: str) -> Path | None:
    path = SRC / Path(*name.split("."))
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return path.with_suffix(".py") if path.with_suffix(".py").is_file() else None


def _imported(nodes: list[ast.stmt] | ast.AST, module: str) -> set[str]:
    """collectionlora modules imported anywhere in `nodes` (nested functions included), with their parent
    packages (importing a.b.c runs a/__init__ and a/b/__init__); `from m import name` counts m.name when it
    is a module."""
    package = module if _module_file(module).name == "__init__.py" else module.rpartition(".")[0]
    trees = nodes if isinstance(nodes, list) else [nodes]
    names: list[str] = []
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                names += [base, *(f"{base}.{alias.name}" for alias in node.names)]
    found = set()
    for name in names:
        if (name == PACKAGE or name.startswith(PACKAGE + ".")) and _module_file(name):
            parts = name.split(".")
            found |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    return found


def _tree(module: str) -> ast.Module:
    return ast.parse(_module_file(module).read_text(encoding="utf-8"))


def _function(module: str, name: str) -> ast.FunctionDef | None:
    return next((n for n in _tree(module).body if isinstance(n, ast.FunctionDef) and n.name == name), None)


def _module_level(module: str) -> list[ast.stmt]:
    return [n for n in _tree(module).body if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def _command_function(command: str) -> ast.FunctionDef:
    """The cli.py function registered as `@app.command("<command>")`."""
    for node in _tree("collectionlora.cli").body:
        if not isinstance(node, ast.FunctionDef):
            continue
        for decorator in node.decorator_list:
            if (
                isinstance(decorator, ast.Call)
                and isinstance(decorator.func, ast.Attribute)
                and getattr(decorator.func.value, "id", None) == "app"
                and decorator.func.attr == "command"
                and decorator.args
                and getattr(decorator.args[0], "value", None) == command
            ):
                return node
    raise AssertionError(f"cli.py has no `collectionlora {command}` command")


def stage_modules(cmd: str) -> set[Path]:
    """Files of every collectionlora module that `cmd` (`collectionlora <command> ...`) can run."""
    words = cmd.split()
    assert words[0] == "collectionlora", f"{cmd!r}: a stage runs the collectionlora CLI"
    command = _command_function(words[1])
    todo = _imported(_module_level("collectionlora.cli"), "collectionlora.cli") | _imported(command, "collectionlora.cli")
    called = {a.name for n in ast.walk(command) if isinstance(n, ast.ImportFrom) and n.module == "collectionlora.stages" for a in n.names}
    for name in called:  # the stage function's own imports (others re-exported by stages.py are modules walked below)
        function = _function("collectionlora.stages", name)
        if function is not None:
            todo |= _imported(function, "collectionlora.stages")
    seen = {"collectionlora.cli"}
    stack = sorted(todo)
    while stack:
        module = stack.pop()
        if module in seen:
            continue
        seen.add(module)
        nodes = _module_level(module) if module in DISPATCHERS else [_tree(module)]
        stack += sorted(_imported(nodes, module) - seen)
    return {_module_file(m) for m in seen}


def _dep_paths(stage: dict) -> list[str]:
    return [d if isinstance(d, str) else next(iter(d)) for d in stage.get("deps", [])]


def test_stage_modules_follow_the_stage_functions():
    """The walker itself: distill reaches the trainer through stages.run_distill; validate does not."""
    distill = stage_modules("collectionlora distill")
    validate = stage_modules("collectionlora validate")
    trainer = SRC / "collectionlora/distill/trainer.py"
    assert trainer in distill and trainer not in validate
    assert SRC / "collectionlora/stages.py" in validate and SRC / "collectionlora/cli.py" in validate
    assert SRC / "collectionlora/evaluate/report.py" not in distill


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_deps_cover_the_code_it_runs(name: str):
    """Every module file the stage's command imports (transitively) is a dep, or under a dep folder;
    every dep exists, except the outputs of earlier stages."""
    stage = STAGES[name]
    deps = _dep_paths(stage)
    produced = {next(iter(o)) if isinstance(o, dict) else o for s in STAGES.values() for key in ("outs", "metrics", "plots") for o in s.get(key, [])}

    def exists(dep: str) -> bool:  # in the repo, tracked by a .dvc file (data.dvc), or an earlier stage's output
        return (REPO / dep).exists() or (REPO / f"{dep}.dvc").is_file() or any(dep == o or dep.startswith(f"{o}/") for o in produced)

    absent = [d for d in deps if not exists(d)]
    assert not absent, f"stage {name}: deps that exist nowhere: {absent}"
    covered = [REPO / d for d in deps if d.startswith("src/")]
    missing = sorted(
        str(path.relative_to(REPO)) for path in stage_modules(stage["cmd"]) if not any(path == d or d in path.parents for d in covered)
    )
    assert not missing, f"stage {name}: `{stage['cmd'].split()[1]}` runs modules its deps miss (add them to dvc.yaml): {missing}"


def test_users_metrics_and_plots_are_declared():
    """What users look at is a DVC metric or plot, in the cache (artifacts/ is git-ignored, so an
    experiment keeps its values only there), and the student's outputs persist (--auto-resume)."""
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))

    def entries(stage: str, key: str) -> dict[str, dict]:
        return {next(iter(o)) if isinstance(o, dict) else o: (next(iter(o.values())) or {}) if isinstance(o, dict) else {} for o in dvc["stages"][stage].get(key, [])}

    metrics = {**entries("distill", "metrics"), **entries("evaluate", "metrics")}
    assert {"artifacts/student/metrics.json", "artifacts/eval/metrics.json", "artifacts/eval/gate.json"} <= set(metrics)
    plots = entries("evaluate", "plots")
    assert {"artifacts/eval/per_effect.csv", "artifacts/eval/bleeding.png", "artifacts/eval/samples.png", "artifacts/eval/cost.csv"} <= set(plots)
    assert all(options.get("cache", True) for options in {**metrics, **plots}.values())
    curves = {k: v for plot in dvc["plots"] for k, v in plot.items()}["student losses"]
    assert curves["x"] == "step" and {"loss_ta_fm", "loss_dmd_bs", "loss_critic_fm"} <= set(curves["y"]["artifacts/student/losses.json"])
    distill = dvc["stages"]["distill"]
    assert "--auto-resume" in distill["cmd"].split()
    student_outs = {**entries("distill", "outs"), **entries("distill", "metrics")}
    assert student_outs and all(options.get("persist") for options in student_outs.values())
    assert entries("rollout", "outs")["artifacts/rollouts"]["persist"] is True
    register = dvc["stages"]["register"]
    assert [next(iter(o)) for o in register["outs"]] == ["artifacts/registry/registration.json"]
    declared = [path for stage in dvc["stages"] for key in ("outs", "metrics", "plots") for path in entries(stage, key)]
    assert not [path for path in declared if "mlflow" in path]  # MLflow's store is its own, not a DVC output


# ---- --auto-resume ------------------------------------------------------------------------------------
def _fake_run(tiny_params, tmp_path: Path):
    from collectionlora.distill import run

    bank = tmp_path / "bank"
    bank.mkdir()
    (bank / "bank.yaml").write_text("name: x\n", encoding="utf-8")
    rollouts = tmp_path / "rollouts"
    (rollouts / "a").mkdir(parents=True)
    (rollouts / "a" / "index.jsonl").write_text("{}\n", encoding="utf-8")
    params = tiny_params.model_copy(update={"bank": tiny_params.bank.model_copy(update={"root": str(bank)})})
    out = tmp_path / "student"
    (out / run.CHECKPOINTS / "step-00000005").mkdir(parents=True)
    (out / run.PROMPTS).write_text("{}\n", encoding="utf-8")
    (out / run.CHECKPOINTS / run.INPUTS).write_text(json.dumps(run._inputs(params, rollouts, None)), encoding="utf-8")
    return run, params, rollouts, out


def test_auto_resume_continues_only_an_interrupted_run_of_the_same_inputs(tiny_params, tmp_path):
    run, params, rollouts, out = _fake_run(tiny_params, tmp_path)
    assert run.auto_resume(params, rollouts, out) is True and (out / run.PROMPTS).exists()  # kept as it is

    changed = params.model_copy(update={"distill": params.distill.model_copy(update={"lr": params.distill.lr * 2})})
    assert run.auto_resume(changed, rollouts, out) is False and not out.exists()  # a params change: a clean retrain


@pytest.mark.parametrize("change", ["finished", "bank", "rollouts", "no_record"])
def test_auto_resume_starts_afresh(change, tiny_params, tmp_path):
    run, params, rollouts, out = _fake_run(tiny_params, tmp_path)
    if change == "finished":
        (out / run.METRICS).write_text("{}\n", encoding="utf-8")
    elif change == "bank":
        (Path(params.bank.root) / "bank.yaml").write_text("name: y\n", encoding="utf-8")
    elif change == "rollouts":
        (rollouts / "a" / "index.jsonl").write_text("{}\n{}\n", encoding="utf-8")
    else:
        (out / run.CHECKPOINTS / run.INPUTS).unlink()
    assert run.auto_resume(params, rollouts, out) is False and not out.exists()


def test_auto_resume_refuses_torchrun(tiny_params, tmp_path, monkeypatch):
    from collectionlora.errors import CollectionLoraError

    run, params, rollouts, out = _fake_run(tiny_params, tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(CollectionLoraError, match="one process"):
        run.auto_resume(params, rollouts, out)
    assert out.exists()


# ---- DVC in a scratch git repository --------------------------------------------------------------
def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        DVC_NO_ANALYTICS="1", AWS_EC2_METADATA_DISABLED="true", HF_HUB_OFFLINE="1", MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true",
        GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.invalid", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@example.invalid",
    )
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, f"{' '.join(args)} (exit {done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done.stdout + done.stderr


def _git_dvc_repo(path: Path, env: dict[str, str]) -> Path:
    path.mkdir(parents=True)
    _run(["git", "init", "-q"], path, env)
    _run([str(DVC), "init", "-q"], path, env)
    _run([str(DVC), "config", "core.analytics", "false"], path, env)
    _run([str(DVC), "config", "core.check_update", "false"], path, env)
    return path


def test_dvc_s3_remote_push_pull_on_moto(s3_server, tmp_path):
    """dvc push of a tracked bank folder to S3 (moto on loopback), then a fresh clone pulls it back
    byte for byte; the credentials live in the environment only, never in .dvc/config."""
    s3_bucket(s3_server, "dvc-test")
    env = _env(**S3_CREDENTIALS)
    repo = _git_dvc_repo(tmp_path / "repo", env)
    bank = repo / "data"
    (bank / "effects" / "warm").mkdir(parents=True)
    files = {
        "bank.yaml": b"name: s3-test\neffects: [warm]\n",
        "effects/warm/teacher.safetensors": os.urandom(70_000),
        "effects/warm/0000_source.png": os.urandom(3_000),
        "effects/warm/0000_result.png": os.urandom(3_000),
    }
    for name, data in files.items():
        (bank / name).write_bytes(data)
    _run([str(DVC), "add", "-q", "data"], repo, env)
    _run([str(DVC), "remote", "add", "-d", "s3", "s3://dvc-test/store"], repo, env)
    _run([str(DVC), "remote", "modify", "s3", "endpointurl", s3_server], repo, env)
    _run([str(DVC), "remote", "modify", "s3", "region", S3_CREDENTIALS["AWS_DEFAULT_REGION"]], repo, env)
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "bank"], repo, env)
    _run([str(DVC), "push", "-q"], repo, env)

    written = [p for p in (repo / ".dvc").rglob("config*") if p.is_file()] + [repo / "data.dvc"]
    for path in written:
        text = path.read_text(encoding="utf-8")
        for secret in (S3_CREDENTIALS["AWS_ACCESS_KEY_ID"], S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"]):
            assert secret not in text, f"{path}: holds a credential"
    assert "endpointurl" in (repo / ".dvc" / "config").read_text(encoding="utf-8")

    clone = tmp_path / "clone"
    _run(["git", "clone", "-q", str(repo), str(clone)], tmp_path, env)
    assert not (clone / "data").exists()
    _run([str(DVC), "pull", "-q"], clone, env)
    for name, data in files.items():
        assert (clone / "data" / name).read_bytes() == data, name
    assert sorted(p.relative_to(clone / "data").as_posix() for p in (clone / "data").rglob("*") if p.is_file()) == sorted(files)


def _tiny_workflow_repo(root: Path, tiny_bank: Path, env: dict[str, str]) -> Path:
    """A git repo holding the real dvc.yaml, the code its deps name, the tiny bank as data/ and
    params.yaml with TINY_OVERRIDES (one torch thread)."""
    repo = _git_dvc_repo(root, env)
    shutil.copy2(REPO / "dvc.yaml", repo / "dvc.yaml")
    shutil.copytree(SRC, repo / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copytree(tiny_bank, repo / "data", symlinks=True)
    raw = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    raw = merge(raw, TINY_OVERRIDES)
    raw = merge(raw, {"bank": {"root": "data", "manifest": "data/bank.yaml"}})
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    load_params(repo / "params.yaml")  # still valid
    (repo / ".gitignore").write_text("/artifacts/\n/data\n__pycache__/\n", encoding="utf-8")
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "tiny workflow"], repo, env)
    return repo


@pytest.mark.slow
def test_dvc_repro_twice_runs_nothing_the_second_time(tiny_bank, tmp_path):
    """`dvc repro` of the real dvc.yaml (every stage up to register) on the tiny configuration, then
    again: the second run is a no-op, `dvc status` is clean, and the metrics and plots are readable."""
    env = _env()
    repo = _tiny_workflow_repo(tmp_path / "repo", tiny_bank, env)
    first = _run([str(DVC), "repro"], repo, env)
    for stage in ("validate", "rollout", "distill", "baselines", "evaluate", "register"):
        assert f"Running stage '{stage}'" in first, f"stage {stage} did not run:\n{first[-3000:]}"
    assert "distill: a fresh run" in first
    registration = json.loads((repo / "artifacts/registry/registration.json").read_text(encoding="utf-8"))
    assert registration["version"] and "challenger" in registration["aliases"]

    started = time.perf_counter()
    second = _run([str(DVC), "repro"], repo, env)
    seconds = time.perf_counter() - started
    assert "Running stage" not in second, second
    assert "didn't change, skipping" in second or "Data and pipelines are up to date" in second
    assert "up to date" in _run([str(DVC), "status"], repo, env)
    print(f"no-op dvc repro: {seconds:.2f} s")

    metrics = json.loads(_run([str(DVC), "metrics", "show", "--json"], repo, env))
    shown = json.dumps(metrics)
    assert "artifacts/student/metrics.json" in shown and "artifacts/eval/gate.json" in shown
    plots = json.loads(_run([str(DVC), "plots", "show", "--json"], repo, env))
    assert not plots.get("errors"), plots["errors"]
    names = set(plots["data"])
    assert {"student losses", "artifacts/eval/per_effect.csv", "artifacts/eval/bleeding.png", "artifacts/eval/samples.png"} <= names, names

    # An interruption: the last checkpoint and the end of the run are lost. Re-running continues from
    # the checkpoint left; downstream stages then re-run on the new student.
    student = repo / "artifacts/student"
    checkpoints = sorted((student / "checkpoints").glob("step-*"))
    assert len(checkpoints) == 2
    shutil.rmtree(checkpoints[-1])
    (student / "metrics.json").unlink()
    resumed = _run([str(DVC), "repro", "distill"], repo, env)
    assert "distill: resuming the interrupted run" in resumed, resumed[-3000:]
    assert json.loads((student / "metrics.json").read_text(encoding="utf-8"))["steps"] == TINY_OVERRIDES["distill"]["max_steps"]
