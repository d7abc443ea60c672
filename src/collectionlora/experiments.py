"""The paper's tables as runnable experiments (`collectionlora experiment <name>`), on the same stage
functions as the pipeline, each writing `<name>.md` and `<name>.json` into its folder:

- ablations (Table 3): the full method against each of PDSR, AOP, TS and TA-FM switched off;
- scaling (Table 4): collections of the first 10, 20, 50 effects of the 50-effect bank against the
  teachers, the cascade and FM all-in-1 of the same effects;
- composition (zero-shot A then B): one student pass with the composition prompt, judged for both effects;
- incremental (Table 5): effects of the larger bank added one at a time to an existing collection.

Every run keeps its students under the experiment folder and is reused when found, so an interrupted
experiment continues where it stopped.
"""

from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path

import torch

from collectionlora.adapters import AdapterSet
from collectionlora.bank import open_bank
from collectionlora.config import Params, merge
from collectionlora.distill.checkpoint import list_checkpoints
from collectionlora.distill.export import COLLECTION, LORA_WEIGHTS, read_collection
from collectionlora.distill.prompting import PromptPlan, compose_prompt
from collectionlora.distill.run import CHECKPOINTS, INCREMENTAL_REPORT
from collectionlora.effects import catalog
from collectionlora.effects.base import stable_seed
from collectionlora.errors import CollectionLoraError
from collectionlora.evaluate.judge import EffectJudge
from collectionlora.evaluate.report import METRICS
from collectionlora.lorafile import atomic_write_text
from collectionlora.models.backbone import Backbone
from collectionlora.sampling import sample_student, student_timesteps
from collectionlora.stages import run_baselines, run_distill, run_evaluate, run_rollout

ABLATIONS: dict[str, dict] = {
    "full": {},
    "no_pdsr": {"distill": {"pdsr": False}},
    "no_aop": {"prompting": {"aop": False}},
    "no_ts": {"distill": {"ts": False}},
    "no_ta_fm": {"distill": {"ta_fm": False, "anchor_steps": 0}},
}
TEACHER_AND_STUDENT = {"evaluate": {"methods": ["teacher", "student"], "student_steps": [8], "gate": {"beat_bcr_of": []}}}
SCALING_METHODS = {
    "evaluate": {
        "methods": ["teacher", "cascade", "fm_all_in_one", "student"],
        "student_steps": [8],
        "gate": {"beat_bcr_of": ["cascade", "fm_all_in_one"]},
    },
    "baselines": {"merges": {"methods": []}},
}
ROW_METRICS = ("judge_accuracy", "style_alignment", "bcr", "bleed_rate", "subject_consistency", "psnr_truth_db", "fd_teacher")


def with_overrides(params: Params, overrides: dict) -> Params:
    return Params.model_validate(merge(params.model_dump(mode="json"), overrides))


def distilled(params: Params, rollouts: Path, out: Path, warm_start: Path | None = None) -> Path:
    """A finished collection in `out`: reused when there, resumed from its checkpoints, else trained."""
    if (out / COLLECTION).is_file():
        return out
    run_distill(params, rollouts, out, resume=bool(list_checkpoints(out / CHECKPOINTS)), warm_start=warm_start)
    return out


def evaluated(params: Params, collection: Path, baselines: Path | None, out: Path) -> dict:
    """The evaluation in `out` (metrics.json): reused when there (it is written in one rename), else run."""
    if (out / METRICS).is_file():
        return json.loads((out / METRICS).read_text(encoding="utf-8"))
    return run_evaluate(params, collection, baselines, out)


def _row(metrics: dict, method: str) -> dict[str, float]:
    values = metrics["methods"][method]
    return {key: values[key] for key in ROW_METRICS if key in values}


def _write(out: Path, name: str, result: dict, table: str) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / f"{name}.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(out / f"{name}.md", table)
    return result


def _cell(value: float | None, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}f}"


# ---- Table 3 -----------------------------------------------------------------------------------------
def run_ablations(params: Params, rollouts: Path, out: Path, full: Path | None = None, variants: list[str] | None = None) -> dict:
    """Each variant distilled with the same budget and scored against the teachers; `full` reuses an
    existing default collection (e.g. artifacts/student) instead of training it again."""
    unknown = sorted(set(variants or []) - set(ABLATIONS))
    if unknown:
        raise CollectionLoraError(f"experiment ablations: unknown variants {unknown}; known: {list(ABLATIONS)}")
    rows = {}
    for name in variants or list(ABLATIONS):
        variant = with_overrides(params, merge(ABLATIONS[name], TEACHER_AND_STUDENT))
        student = full if name == "full" and full is not None else distilled(variant, rollouts, out / name / "student")
        metrics = evaluated(variant, student, None, out / name / "eval")
        rows[name] = {
            "pdsr": variant.distill.pdsr, "aop": variant.prompting.aop, "ts": variant.distill.ts, "ta_fm": variant.distill.ta_fm,
            "collection": str(student), "student_8nfe": _row(metrics, "student_8nfe"), "teacher": _row(metrics, "teacher"),
        }
    teacher = next(iter(rows.values()))["teacher"]
    lines = [
        "| variant | PDSR | AOP | TS | TA-FM | judge acc. ↑ | style align. ↑ | BCR ↓ | bleed ↓ | subject ↑ | PSNR truth (dB) ↑ |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        s = row["student_8nfe"]
        flags = " | ".join("✓" if row[f] else "" for f in ("pdsr", "aop", "ts", "ta_fm"))
        lines.append(
            f"| {name} | {flags} | {_cell(s['judge_accuracy'])} | {_cell(s['style_alignment'])} | {_cell(s['bcr'])} | "
            f"{_cell(s['bleed_rate'])} | {_cell(s['subject_consistency'])} | {_cell(s.get('psnr_truth_db'), 1)} |"
        )
    lines.append(
        f"| teachers, 80 NFE | | | | | {_cell(teacher['judge_accuracy'])} | {_cell(teacher['style_alignment'])} | {_cell(teacher['bcr'])} | "
        f"{_cell(teacher['bleed_rate'])} | {_cell(teacher['subject_consistency'])} | {_cell(teacher.get('psnr_truth_db'), 1)} |"
    )
    table = "# Ablations (Table 3): student at 8 NFE, same budget per variant\n\n" + "\n".join(lines) + "\n"
    return _write(out, "ablations", {"variants": rows, "distill_max_steps": params.distill.max_steps}, table)


# ---- Table 4 -----------------------------------------------------------------------------------------
def run_scaling(params: Params, manifest: Path, rollouts: Path, out: Path, sizes: list[int]) -> dict:
    """Collections of the manifest's first N effects (same budget each) against the alternatives."""
    labels = {"teacher": "Base (teachers, 80 NFE)", "cascade": "Base + acceleration", "fm_all_in_one": "FM all-in-1 + acceleration", "student_8nfe": "All-in-1 (ours)"}
    columns: dict[int, dict] = {}
    for size in sizes:
        sized = with_overrides(params, merge(SCALING_METHODS, {"bank": {"manifest": str(manifest), "max_effects": size}}))
        folder = out / f"n{size}"
        run_rollout(sized, rollouts, None)
        student = distilled(sized, rollouts, folder / "student")
        if not (folder / "baselines" / "baselines.json").is_file():
            run_baselines(sized, rollouts, student, folder / "baselines")
        metrics = evaluated(sized, student, folder / "baselines", folder / "eval")
        columns[size] = {method: _row(metrics, method) for method in labels}
    lines = ["| method | " + " | ".join(f"{n} effects" for n in sizes) + " |", "|---|" + "---|" * len(sizes)]
    for method, label in labels.items():
        cells = [f"{columns[n][method]['judge_accuracy']:.3f} / {columns[n][method]['bcr']:.3f}" for n in sizes]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    fm = params.baselines.fm_all_in_one
    fm_budget = "the student's anchor phase" if fm.source == "anchor" else f"{fm.steps} steps"
    budget = f"{params.distill.anchor_steps} anchor steps + {params.distill.max_steps} distillation iterations, FM all-in-1 {fm_budget}"
    table = f"# Scaling (Table 4): judge accuracy ↑ / BCR ↓, the same budget at every size ({budget})\n\n" + "\n".join(lines) + "\n"
    result = {
        "sizes": sizes, "manifest": str(manifest), "methods": columns,
        "distill_max_steps": params.distill.max_steps, "fm_all_in_one_steps": params.baselines.fm_all_in_one.steps,
    }
    return _write(out, "scaling", result, table)


# ---- composition -------------------------------------------------------------------------------------
@torch.no_grad()
def run_composition(params: Params, collection: Path, out: Path, max_pairs: int | None = None) -> dict:
    """For ordered effect pairs (A, B): the student with the composition prompt in one 8-NFE pass, and
    chained (A's edit, then B on it: 16 NFE). The judge names one label per image, so each is scored by
    its probabilities of A and of B and by whether both are its two most likely labels. Where both effects
    are procedural, their ground truth applied in turn gives the scores' ceiling: the judge was trained on
    single effects, so a perfect composite need not score 1."""
    bank = open_bank(params.bank)
    if bank.judge is None:
        raise CollectionLoraError(f"{params.bank.manifest}: judge: the bank has no effect judge")
    plan = PromptPlan.from_json(read_collection(collection)["prompts"])
    judge = EffectJudge.load(bank.judge)
    backbone = Backbone.load(params.base, bank.base_dir)
    adapters = AdapterSet(backbone.transformer)
    adapters.add_teacher("student", Path(collection) / LORA_WEIGHTS)
    adapters.activate("student")
    timesteps = student_timesteps(params.sampling)
    sources = bank.load_eval_sources()
    if params.evaluate.eval_images is not None:
        sources = sources[: params.evaluate.eval_images]
    pairs = list(itertools.permutations([e.id for e in bank.effects], 2))[:max_pairs]

    def student(images: torch.Tensor, prompt: str, purpose: str) -> torch.Tensor:
        seeds = [stable_seed("composition", purpose, i) for i in range(len(images))]
        return sample_student(backbone, images, [prompt] * len(images), seeds, timesteps).images

    def scores(images: torch.Tensor, first: str, then: str) -> dict[str, float]:
        probabilities = judge.predict_proba(sources, images)
        a, b = judge.labels.index(first), judge.labels.index(then)
        top2 = probabilities.topk(2, dim=1).indices
        both = ((top2 == a).any(1) & (top2 == b).any(1)).float().mean()
        return {"p_first": float(probabilities[:, a].mean()), "p_then": float(probabilities[:, b].mean()), "both_top2": float(both)}

    known = catalog()
    rows = []
    for first, then in pairs:
        composed = student(sources, compose_prompt(plan.student(first), plan.student(then)), f"{first}+{then}")
        chained = student(student(sources, plan.student(first), first), plan.student(then), f"{first}>{then}")
        row = {"first": first, "then": then, "composed": scores(composed, first, then), "chained": scores(chained, first, then)}
        if first in known and then in known:
            row["ground_truth"] = scores(known[then].apply(known[first].apply(sources, 0), 0), first, then)
        rows.append(row)
    means = {}
    for kind in ("composed", "chained", "ground_truth"):
        scored = [r[kind] for r in rows if kind in r]
        if scored:
            means[kind] = {key: sum(s[key] for s in scored) / len(scored) for key in ("p_first", "p_then", "both_top2")}
    lines = ["| method | NFE | P(A) ↑ | P(B) ↑ | both in top 2 ↑ |", "|---|---|---|---|---|"]
    for kind, nfe in (("composed", len(timesteps)), ("chained", 2 * len(timesteps)), ("ground_truth", "")):
        if kind in means:
            m = means[kind]
            lines.append(f"| {kind.replace('_', ' ')} | {nfe} | {m['p_first']:.3f} | {m['p_then']:.3f} | {m['both_top2']:.3f} |")
    table = f"# Zero-shot composition A then B ({len(rows)} ordered pairs, {len(sources)} sources each)\n\n" + "\n".join(lines) + "\n"
    return _write(out, "composition", {"pairs": rows, "means": means}, table)


# ---- Table 5 -----------------------------------------------------------------------------------------
def run_incremental(params: Params, collection: Path, manifest: Path, rollouts: Path, out: Path, added: int) -> dict:
    """Grow `collection` by the manifest's next `added` effects, one short warm-started run each; per
    step the old effects' judge accuracy before and after, and the new effect's."""
    base_effects = len(PromptPlan.from_json(read_collection(collection)["prompts"]).effects)
    previous, steps = Path(collection), []
    for k in range(1, added + 1):
        grown = with_overrides(params, {"bank": {"manifest": str(manifest), "max_effects": base_effects + k}})
        run_rollout(grown, rollouts, None)
        folder = distilled(grown, rollouts, out / f"plus{k}", warm_start=previous)
        report = json.loads((folder / INCREMENTAL_REPORT).read_text(encoding="utf-8"))
        metrics = evaluated(with_overrides(grown, TEACHER_AND_STUDENT), folder, None, out / f"plus{k}-eval")
        new = report["added"][0]
        per_effect = _per_effect(out / f"plus{k}-eval" / "per_effect.csv", "student_8nfe")
        steps.append({
            "effects": base_effects + k, "added": new,
            "old_before": _mean_rate(report["before"]), "old_after": _mean_rate(report["after"]),
            "new_student": per_effect[new], "student_all": metrics["methods"]["student_8nfe"]["judge_accuracy"],
            "teacher_all": metrics["methods"]["teacher"]["judge_accuracy"], "generator_steps": report["generator_steps"],
        })
        previous = folder
    lines = [
        "| effects | added | old effects before ↑ | old effects after ↑ | new effect ↑ | all effects (student) ↑ | all effects (teachers) |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {s['effects']} | {s['added']} | {s['old_before']:.3f} | {s['old_after']:.3f} | {s['new_student']:.3f} | {s['student_all']:.3f} | {s['teacher_all']:.3f} |"
        for s in steps
    ]
    table = "# Incremental add-an-effect (Table 5): judge accuracy at 8 NFE\n\n" + "\n".join(lines) + "\n"
    return _write(out, "incremental", {"start": str(collection), "steps": steps}, table)


def _mean_rate(rows: dict[str, dict]) -> float:
    return sum(r["judge_rate"] for r in rows.values()) / len(rows)


def _per_effect(path: Path, method: str) -> dict[str, float]:
    with path.open(encoding="utf-8") as handle:
        return {r["effect"]: float(r["judge_accuracy"]) for r in csv.DictReader(handle) if r["method"] == method}
