"""The evaluation's files: metrics.json (DVC metrics), per_effect.csv, methods.md, cost.csv, gate.json,
bleeding.png and samples.png. Written into a staging folder and renamed into place together."""

from __future__ import annotations

import csv
import io
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import torch
from torch import Tensor

from collectionlora.evaluate.evaluation import MethodResult
from collectionlora.evaluate.gate import GateDecision
from collectionlora.evaluate.judge import NONE
from collectionlora.evaluate.metrics import BleedingMatrix
from collectionlora.images import labelled_grid, save_png
from collectionlora.lorafile import replace_folder

METRICS, PER_EFFECT, TABLE, COST, GATE = "metrics.json", "per_effect.csv", "methods.md", "cost.csv", "gate.json"
BLEEDING, SAMPLES = "bleeding.png", "samples.png"
# Columns of the methods table: (metric key, header, format); a blank cell where a method lacks the metric.
TABLE_COLUMNS = (
    ("judge_accuracy", "judge acc. ↑", "{:.3f}"),
    ("style_alignment", "style align. ↑", "{:.3f}"),
    ("bcr", "BCR ↓", "{:.3f}"),
    ("bleed_rate", "bleed ↓", "{:.3f}"),
    ("psnr_truth_db", "PSNR truth (dB) ↑", "{:.1f}"),
    ("ssim_truth", "SSIM truth ↑", "{:.3f}"),
    ("psnr_teacher_db", "PSNR teacher (dB) ↑", "{:.1f}"),
    ("fd_teacher", "FD teacher ↓", "{:.2f}"),
    ("diversity", "diversity", "{:.3f}"),
    ("subject_consistency", "subject ↑", "{:.3f}"),
    ("clip_teacher", "CLIP ↑", "{:.3f}"),
    ("dino_source", "DINO ↑", "{:.3f}"),
    ("mllm_bcr", "MLLM BCR ↓", "{:.3f}"),
    ("mllm_vsa", "VSA ↑", "{:.2f}"),
)
COST_COLUMNS = (
    "nfe", "seconds_per_edit_batched", "stored_bytes", "adapter_loads_per_request", "adapter_switches_per_request", "fused_delta_kept",
    "fused_delta_to_weight",
)


def write_report(out: Path, results: Sequence[MethodResult], gate: GateDecision, context: dict, sources: Tensor, sample_methods: Sequence[str]) -> dict:
    """Every output file into `out` (replaced as a whole); returns metrics.json's content."""
    out = Path(out)
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        summary = _write_staging(staging, results, gate, context, sources, sample_methods)
        replace_folder(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # a full disk gets its space back; `out` is as it was
        raise
    return summary


def _write_staging(staging: Path, results: Sequence[MethodResult], gate: GateDecision, context: dict, sources: Tensor, sample_methods: Sequence[str]) -> dict:
    summary = metrics_json(results, gate, context)
    (staging / METRICS).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    (staging / GATE).write_text(json.dumps(gate.to_json(), indent=2) + "\n", encoding="utf-8")
    (staging / PER_EFFECT).write_text(per_effect_csv(results), encoding="utf-8")
    (staging / COST).write_text(cost_csv(results), encoding="utf-8")
    by_name = {r.name: r for r in results}
    shown = [by_name[name] for name in sample_methods if name in by_name]
    (staging / TABLE).write_text(methods_markdown(results, gate, context, [r.name for r in shown]), encoding="utf-8")
    bleeding_png(shown, staging / BLEEDING)
    save_png(samples_grid(sources, shown), staging / SAMPLES)
    return summary


def metrics_json(results: Sequence[MethodResult], gate: GateDecision, context: dict) -> dict:
    return {
        **context,
        "methods": {r.name: {"label": r.label, **r.summary, **r.cost} for r in results},
        "gate": {"passed": gate.passed, "failed": gate.reasons},
    }


def per_effect_csv(results: Sequence[MethodResult]) -> str:
    keys = list(dict.fromkeys(k for r in results for row in r.per_effect.values() for k in row))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["method", "effect", *keys])
    for r in results:
        for effect, row in r.per_effect.items():
            writer.writerow([r.name, effect, *(_number(row.get(k)) for k in keys)])
    return buffer.getvalue()


def cost_csv(results: Sequence[MethodResult]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["method", *COST_COLUMNS])
    for r in results:
        writer.writerow([r.name, *(_number(r.cost.get(k)) for k in COST_COLUMNS)])
    return buffer.getvalue()


def methods_markdown(results: Sequence[MethodResult], gate: GateDecision, context: dict, shown: Sequence[str]) -> str:
    """Table 1 (means over effects), the per-effect judge accuracy, cost, and the gate's verdict."""
    columns = [c for c in TABLE_COLUMNS if any(c[0] in r.summary for r in results)]
    lines = [
        f"# Evaluation: {context['bank']} ({len(context['effects'])} effects, {context['cases']} cases per method)",
        "",
        "| method | NFE | " + " | ".join(c[1] for c in columns) + " |",
        "|---|---|" + "---|" * len(columns),
    ]
    for r in results:
        cells = [fmt.format(r.summary[key]) if key in r.summary else "" for key, _, fmt in columns]
        lines.append(f"| {r.label} | {r.nfe} | " + " | ".join(cells) + " |")
    lines += ["", "## Judge accuracy per effect", "", "| effect | " + " | ".join(r.name for r in results) + " |", "|---|" + "---|" * len(results)]
    for effect in context["effects"]:
        lines.append(f"| {effect} | " + " | ".join(f"{r.per_effect[effect]['judge_accuracy']:.2f}" for r in results) + " |")
    lines += ["", "## Cost", "", "| method | " + " | ".join(COST_COLUMNS) + " |", "|---|" + "---|" * len(COST_COLUMNS)]
    for r in results:
        lines.append(f"| {r.name} | " + " | ".join(_number(r.cost.get(k)) for k in COST_COLUMNS) + " |")
    verdict = "PASSED" if gate.passed else "FAILED"
    lines += ["", f"## Gate ({gate.student}): {verdict}", ""] + [f"- {c.detail}" for c in gate.checks]
    figures = " | ".join(["source", *shown])
    lines += ["", f"{SAMPLES}: one row per effect (in the order above): {figures}. {BLEEDING}: {', '.join(shown)}.", "", METRIC_NOTES]
    return "\n".join(lines) + "\n"


METRIC_NOTES = """Metrics (offline stand-ins for the paper's, see evaluate/metrics.py): judge accuracy = share of cases the
bank's effect judge names the requested effect; style alignment = its mean probability of that effect; BCR = share
of cases judged as another effect or none, or whose edge structure falls below the threshold calibrated on the
bank's ground-truth pairs; bleed = mean share judged as another effect; PSNR/SSIM to the procedural ground truth
and to the teacher's output (deterministic effects); FD teacher = Frechet distance of judge features to the
teacher's outputs and diversity = mean pixel distance across seeds (stochastic effects); subject = luminance
SSIM to the source after tone matching. Cost: seconds per edit are batched throughput on this machine; loads and
switches per request over a simulated stream of random-effect requests."""


def bleeding_png(results: Sequence[MethodResult], path: Path) -> None:
    """One heatmap per method: requested effect (rows) x judged label (columns, the requested effects in
    the same order, then "none" and every other label of the judge pooled as "other"), row-normalised."""
    if not results:
        raise ValueError("no method to draw a bleeding matrix for")
    effects = list(results[0].bleeding.effects)
    size = max(4.0, 0.45 * (len(effects) + 2))
    figure, axes = plt.subplots(1, len(results), figsize=(size * len(results), size), squeeze=False)
    for axis, result in zip(axes[0], results):
        columns, rates = condensed_rates(result.bleeding)
        axis.imshow(rates.numpy(), vmin=0.0, vmax=1.0, cmap="viridis")
        axis.set_xticks(range(len(columns)), columns, rotation=90, fontsize=7)
        axis.set_yticks(range(len(effects)), effects, fontsize=7)
        axis.set_xlabel("judged as")
        axis.set_title(result.label, fontsize=9)
    axes[0][0].set_ylabel("requested")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def condensed_rates(matrix: BleedingMatrix) -> tuple[list[str], Tensor]:
    """The matrix's rates over columns (requested effects..., none, other): a judge knows many more labels
    than one bank has effects, and the diagonal should read as one."""
    columns = [*matrix.effects, NONE]
    picked = [matrix.labels.index(label) for label in columns if label in matrix.labels]
    kept = matrix.rates[:, picked]
    other = matrix.rates.sum(1, keepdim=True) - kept.sum(1, keepdim=True)
    return [label for label in columns if label in matrix.labels] + ["other"], torch.cat([kept, other.clamp(min=0)], 1)


def samples_grid(sources: Tensor, results: Sequence[MethodResult]) -> Tensor:
    """Per effect and shown source, one row: source | each method's seed-0 edit (in `results` order),
    labelled with the effect (rows) and the method (columns)."""
    rows, effects = [], []
    for effect in results[0].samples:
        for i in range(len(results[0].samples[effect])):
            rows.append([sources[i]] + [r.samples[effect][i] for r in results])
            effects.append(effect)
    return labelled_grid(rows, effects, ["source", *(r.name for r in results)], scale=3)


def _number(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.6g}"
