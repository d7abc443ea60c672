"""What the components hand to Kubeflow: the collection without its checkpoints, scalar metrics for the
KFP UI, and the evaluation as one self-contained HTML page."""

from __future__ import annotations

import base64
import html
import json
import shutil
from collections.abc import Callable
from pathlib import Path

from collectionlora.distill.run import CHECKPOINTS
from collectionlora.errors import CollectionLoraError


def copy_collection(workdir: Path, dest: Path) -> Path:
    """The student folder minus checkpoints/ (they stay on the PVC for a retry; the model does not need them)."""
    workdir, dest = Path(workdir), Path(dest)
    if not (workdir / "collection.json").is_file():
        raise CollectionLoraError(f"{workdir}: no collection.json; the distillation did not finish")
    shutil.copytree(workdir, dest, ignore=shutil.ignore_patterns(CHECKPOINTS), dirs_exist_ok=True)
    return dest


def log_scalars(log_metric: Callable[[str, float], None], values: dict, prefix: str = "") -> int:
    """Every finite number in `values` (nested mappings flattened with '.') through `log_metric`
    (a KFP Metrics artifact's); returns how many were logged."""
    logged = 0
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            logged += log_scalars(log_metric, value, f"{name}.")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and value == value and abs(value) != float("inf"):
            log_metric(name, float(value))
            logged += 1
    return logged


def publish_evaluation(evaluation: Path, methods: Path, report: Path, bleeding: Path, samples: Path) -> bool:
    """An evaluation folder as the evaluate task's KFP outputs (table, one-page report, the two
    figures); returns whether the gate passed, which the pipeline's condition reads."""
    evaluation = Path(evaluation)
    shutil.copyfile(evaluation / "methods.md", methods)
    Path(report).write_text(evaluation_html(evaluation), encoding="utf-8")
    shutil.copyfile(evaluation / "bleeding.png", bleeding)
    shutil.copyfile(evaluation / "samples.png", samples)
    return bool(json.loads((evaluation / "gate.json").read_text(encoding="utf-8"))["passed"])


def evaluation_html(evaluation: Path) -> str:
    """The methods table, the gate's checks and the two figures of an evaluation folder, one page."""
    evaluation = Path(evaluation)
    gate = json.loads((evaluation / "gate.json").read_text(encoding="utf-8"))
    checks = "".join(
        f"<li>{'ok' if check['passed'] else 'FAIL'}: {html.escape(check['detail'])}</li>" for check in gate["checks"]
    )
    figures = "".join(
        f"<h2>{name}</h2><img alt='{name}' src='data:image/png;base64,{_b64(evaluation / name)}'>"
        for name in ("bleeding.png", "samples.png")
    )
    return (
        "<!doctype html><meta charset='utf-8'><title>collectionlora evaluation</title>"
        f"<h1>Gate: {'PASSED' if gate['passed'] else 'FAILED'}</h1><ul>{checks}</ul>"
        f"<h2>Methods</h2><pre>{html.escape((evaluation / 'methods.md').read_text(encoding='utf-8'))}</pre>{figures}"
    )


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")
