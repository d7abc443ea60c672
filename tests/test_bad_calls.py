"""Every entry point is as strict as `validate`: a bad call of edit, rollout, distill, baselines or evaluate
(a bad input, a missing or stale upstream artifact, a bad params.yaml or `--set`) exits non-zero with ONE
line on stderr, `error: ...` naming the file (or the `--set` item) and the field, writes nothing, and
prints no library warning before it.

The corpus is data: tests/fixtures/bad_calls/<name>.yaml gives the command line, the setup that breaks one
thing in a private copy of the session's tiny workflow, and what the line must say ({placeholders} are
filled by str.format: a literal brace is doubled). The cases run through the real typer app in this
process (a process start costs ~5 s of imports); those marked `via: process` run the installed
`collectionlora` script, for a real stderr.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import traceback
import warnings
import zlib
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from collectionlora.cli import app
from collectionlora.config import Params, load_params
from collectionlora.distill.export import COLLECTION, LORA_WEIGHTS

REPO = Path(__file__).resolve().parents[1]
CASES = sorted((Path(__file__).parent / "fixtures" / "bad_calls").glob("*.yaml"))
COMMANDS = ("edit", "rollout", "distill", "baselines", "evaluate")
LOCK = re.compile(r"^\..*\.lock$")  # runlock.py's lock beside an output folder: kept by design, not output
# Python's default filters hide these from a user; anything else on stderr would precede the error line.
HIDDEN = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)


@pytest.fixture(scope="module")
def calls(tiny_workflow: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The tiny workflow, an eval image, its first effect and a base of another architecture (other shapes)."""
    from collectionlora.base_pretrain import general_instructions
    from collectionlora.models.tiny import build_tiny_pipeline

    params: Params = tiny_workflow["params"]
    other = params.base.tiny.model_copy(update={"attention_head_dim": 16, "axes_dims_rope": (8, 4, 4)})
    other_base = tmp_path_factory.mktemp("other_base") / "base"
    build_tiny_pipeline(other, general_instructions(), seed=0).save_pretrained(other_base)
    manifest = yaml.safe_load(params.bank.manifest.read_text())
    return {
        "workflow": tiny_workflow,
        "image": min((tiny_workflow["root"] / "eval").glob("*.png")),
        "effect": manifest["effects"][0]["id"],
        "teacher": tiny_workflow["root"] / manifest["effects"][0]["teacher"],
        "other_base": other_base,
    }


class Setup:
    """One case's private world: params.yaml in tmp, the workflow's folders shared read-only until a
    `copy` op gives the case its own copy (and points the placeholder at it)."""

    def __init__(self, tmp: Path, calls: dict):
        workflow = calls["workflow"]
        self.tmp, self.workflow = tmp, workflow
        self.raw = workflow["params"].model_dump(mode="json")
        self.names = {
            "tmp": str(tmp), "params": str(tmp / "params.yaml"), "image": str(calls["image"]), "effect": calls["effect"],
            "teacher": str(calls["teacher"]), "other_base": str(calls["other_base"]), "data": str(workflow["root"]),
            "manifest": str(workflow["params"].bank.manifest), "rollouts": str(workflow["rollouts"]),
            "student": str(workflow["student"]), "baselines": str(workflow["baselines"]),
        }
        self.write_params()

    def fill(self, value):
        return value.format(**self.names) if isinstance(value, str) else value

    def write_params(self, text: str | None = None) -> None:
        (self.tmp / "params.yaml").write_text(text if text is not None else yaml.safe_dump(self.raw, sort_keys=False))

    def apply(self, op: dict) -> None:
        op = {key: self.fill(value) for key, value in op.items()}
        getattr(self, f"op_{op.pop('op')}")(**op)

    # ---- ops -----------------------------------------------------------------------------------------
    def op_copy(self, what: str) -> None:
        """A private copy of the workflow's `what` (student, baselines, rollouts, data) in tmp/work. A
        student records its base as ../data/base: tmp/work/data links to the shared bank unless copied."""
        work = self.tmp / "work"
        work.mkdir(exist_ok=True)
        source = self.workflow["root"] if what == "data" else self.workflow[what]
        target = work / what
        if target.is_symlink():
            target.unlink()
        shutil.copytree(source, target)
        if not (work / "data").exists():
            (work / "data").symlink_to(self.workflow["root"], target_is_directory=True)
        self.names[what] = str(target)
        if what == "data":
            self.raw["bank"] = {**self.raw["bank"], "root": str(target), "manifest": str(target / Path(self.names["manifest"]).name)}
            self.names["manifest"] = self.raw["bank"]["manifest"]
            self.write_params()

    def op_write(self, path: str, text: str) -> None:
        Path(path).write_text(text)

    def op_copy_file(self, source: str, path: str) -> None:
        shutil.copyfile(source, path)

    def op_delete(self, path: str) -> None:
        Path(path).unlink()

    def op_mkdir(self, path: str, mode: int) -> None:
        Path(path).mkdir(mode=mode)
        os.chmod(path, mode)

    def op_truncate(self, path: str, keep: float) -> None:
        """Cut the (last, for a glob) file to `keep` of its bytes: a copy that stopped half way."""
        matches = sorted(glob.glob(path))
        assert matches, f"truncate: nothing matches {path}"
        target = Path(matches[-1])
        data = target.read_bytes()
        target.write_bytes(data[: int(len(data) * keep)])

    def op_png_header(self, path: str, width: int, height: int) -> None:
        """A PNG whose header claims width x height (no pixel data: only a decoder would notice)."""
        def chunk(kind: bytes, body: bytes) -> bytes:
            return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

        header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
        Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))

    def op_rehash(self, folder: str) -> None:
        """collection.json made to vouch for whatever LoRA file is now beside it."""
        record = json.loads((Path(folder) / COLLECTION).read_text())
        record["files"][LORA_WEIGHTS] = hashlib.sha256((Path(folder) / LORA_WEIGHTS).read_bytes()).hexdigest()
        (Path(folder) / COLLECTION).write_text(json.dumps(record))

    def op_json_set(self, path: str, field: str, value) -> None:
        data = json.loads(Path(path).read_text())
        *parents, leaf = _walk(data, field)
        parents[-1][leaf] = value
        Path(path).write_text(json.dumps(data))

    def op_json_pop(self, path: str, field: str) -> None:
        """Drop the last item of the list at `field`."""
        data = json.loads(Path(path).read_text())
        *parents, leaf = _walk(data, field)
        parents[-1][leaf].pop()
        Path(path).write_text(json.dumps(data))

    def op_yaml_set(self, path: str, field: str, value) -> None:
        data = yaml.safe_load(Path(path).read_text())
        *parents, leaf = _walk(data, field)
        parents[-1][leaf] = value
        Path(path).write_text(yaml.safe_dump(data, sort_keys=False))

    def op_params_set(self, field: str, value) -> None:
        *parents, leaf = _walk(self.raw, field, create=True)
        parents[-1][leaf] = value
        self.write_params()

    def op_params_del(self, field: str) -> None:
        *parents, leaf = _walk(self.raw, field)
        del parents[-1][leaf]
        self.write_params()

    def op_params_insert(self, after: str, line: str) -> None:
        """A line inserted after the first line equal to `after` (e.g. a key written twice)."""
        lines = (self.tmp / "params.yaml").read_text().splitlines()
        lines.insert(lines.index(after) + 1, line)
        self.write_params("\n".join(lines) + "\n")

    def op_params_text(self, text: str) -> None:
        self.write_params(text)

    # ---- what must not change --------------------------------------------------------------------------
    def snapshot(self) -> dict[str, tuple]:
        """Every file (size, mtime) and empty folder under tmp and the shared workflow folders. runlock.py's
        lock files beside an output folder are no output (kept by design), nor a folder holding only them."""
        roots = [self.tmp, *(self.workflow[k] for k in ("root", "rollouts", "student", "baselines"))]
        seen = {}
        for root in roots:
            for path in root.rglob("*"):
                if LOCK.match(path.name):
                    continue
                info = path.lstat()
                if not path.is_dir():
                    seen[str(path)] = (info.st_size, info.st_mtime_ns)
                elif not any(path.iterdir()):
                    seen[str(path)] = ("empty folder",)
        return seen


def _walk(data, field: str, create: bool = False) -> list:
    """[data, ..., parent, key] for a dotted `field` (integer parts index lists)."""
    chain, node = [data], data
    parts = [int(p) if p.lstrip("-").isdigit() else p for p in field.split(".")]
    for part in parts[:-1]:
        node = node.setdefault(part, {}) if create and isinstance(node, dict) else node[part]
        chain.append(node)
    return [*chain, parts[-1]]


def test_the_corpus_covers_every_entry_point():
    cases = [yaml.safe_load(path.read_text()) for path in CASES]
    assert len(cases) >= 25
    assert set(COMMANDS) <= {case["argv"][0] for case in cases}
    assert {"params", "set"} <= {case["name"].split("_")[0] for case in cases}  # params.yaml itself, and --set items
    assert any("--resume" in case["argv"] for case in cases)


@pytest.mark.parametrize("case_file", CASES, ids=[c.stem for c in CASES])
def test_a_bad_call_is_one_line_and_writes_nothing(case_file: Path, calls: dict, tmp_path: Path):
    case = yaml.safe_load(case_file.read_text(encoding="utf-8"))
    assert case["name"] == case_file.stem
    setup = Setup(tmp_path, calls)
    for op in case.get("setup", []):
        setup.apply(op)
    if "skip_if_writable" in case and os.access(setup.fill(case["skip_if_writable"]), os.W_OK):
        pytest.skip("a read-only folder is writable here (running as root)")
    argv = [setup.fill(a) for a in case["argv"]] + ["--params", setup.fill("{params}")]
    expected = case["expect"] if isinstance(case["expect"], list) else [case["expect"]]
    before = setup.snapshot()

    if case.get("via") == "process":
        script = Path(sys.executable).with_name("collectionlora")  # the installed console script
        command = [str(script)] if script.is_file() else [sys.executable, "-m", "collectionlora.cli"]
        result = subprocess.run([*command, *argv], capture_output=True, text=True, cwd=tmp_path, timeout=300)
        code, stderr, shown, crash = result.returncode, result.stderr, [], ""
    else:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # a fresh process shows each warning once: here, every time
            result = CliRunner().invoke(app, argv)
        code, stderr = result.exit_code, result.stderr
        shown = [f"{w.category.__name__}: {w.message}" for w in caught if not issubclass(w.category, HIDDEN)]
        crash = "".join(traceback.format_exception(*result.exc_info)) if result.exc_info and result.exc_info[0] is not SystemExit else ""

    lines = stderr.splitlines()
    assert code != 0 and len(lines) == 1 and lines[0].startswith("error: "), f"exit {code}, stderr:\n{stderr}\n{crash}"
    for text in expected:
        assert setup.fill(text) in lines[0], lines[0]
    assert not shown, shown  # no library warning before the error line
    assert setup.snapshot() == before  # nothing written, nothing half written, nothing changed


def test_strict_params_still_read_what_yaml_writers_write(tmp_path: Path):
    """Strict values refuse `true` for 1, not YAML's own spellings: `1e-4` is a float (YAML 1.2), a list
    fills a tuple, a string a path; params.yaml itself loads."""
    params = load_params(REPO / "params.yaml")
    text = (REPO / "params.yaml").read_text().replace("  lr: 0.002                #", "  lr: 2e-3                 #", 1)
    assert text != (REPO / "params.yaml").read_text()
    (tmp_path / "params.yaml").write_text(text)
    exponent = load_params(tmp_path / "params.yaml", sets=["distill.critic_lr=4E-3", "distill.ts_critic_range=[400, 1000]", "bank.root=elsewhere"])
    assert exponent.distill.lr == params.distill.lr == 0.002 and exponent.distill.critic_lr == 0.004
    assert exponent.distill.ts_critic_range == (400.0, 1000.0) and exponent.bank.root == Path("elsewhere")
    assert Params.model_validate(params.model_dump(mode="json")) == params  # a dump (KFP, torchrun) reads back
