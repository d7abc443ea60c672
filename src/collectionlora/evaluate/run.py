"""The evaluate stage end to end: bank + collection (+ baselines) -> every method scored -> report + gate."""

from __future__ import annotations

import time
from pathlib import Path

from collectionlora.bank import open_bank
from collectionlora.config import Params
from collectionlora.distill.export import LORA_WEIGHTS
from collectionlora.distill.prompting import PromptPlan
from collectionlora.errors import CollectionLoraError
from collectionlora.evaluate.evaluation import (
    Evaluator,
    make_cases,
    structure_threshold,
)
from collectionlora.evaluate.gate import decide_gate
from collectionlora.evaluate.judge import EffectJudge
from collectionlora.evaluate.methods import MethodBuilder, check_gate_methods
from collectionlora.evaluate.parallel import parallel_edits
from collectionlora.evaluate.plugins import load_plugins
from collectionlora.evaluate.report import write_report
from collectionlora.models.backbone import Backbone

SAMPLE_METHODS = ("teacher", "cascade", "student_8nfe")  # the columns of samples.png and bleeding.png


def evaluate_collection(
    params: Params, collection: Path, record: dict, baselines: Path | None, out: Path, params_file: Path = Path("params.yaml")
) -> dict:
    """Score every method of `evaluate.methods` on the bank's eval sources; writes `out` (see report.py).
    `record`: the collection's collection.json, checked against the bank (upstream.trained_collection)."""
    started = time.perf_counter()
    config = params.evaluate
    check_gate_methods(params, params_file)
    bank = open_bank(params.bank)
    if bank.judge is None:
        raise CollectionLoraError(f"{params.bank.manifest}: judge: the bank has no effect judge (train one with `collectionlora judge train`)")
    plan = PromptPlan.from_json(record["prompts"])
    plugins = load_plugins(params.eval_plugins)
    judge = EffectJudge.load(bank.judge)
    cases = make_cases(bank, config)
    threshold = structure_threshold(bank, config.structure_quantile)
    backbone = Backbone.load(params.base, bank.base_dir)
    builder = MethodBuilder(params, bank, backbone, Path(collection), plan, baselines)
    try:
        methods = builder.build()
        done = parallel_edits(params, bank, Path(collection), plan, baselines) if config.processes > 1 else {}
        evaluator = Evaluator(bank, judge, cases, threshold, plugins, config, params.sampling)
        results = [evaluator.run(method, done.get(method.name)) for method in methods]
    finally:
        builder.close()
    by_name = {r.name: r for r in results}
    gate = decide_gate({r.name: r.summary for r in results}, by_name[config.gate.student].per_effect, config.gate)
    context = {
        "bank": bank.name,
        "student_lora_sha256": record["files"][LORA_WEIGHTS],  # which LoRA this evaluation is of (the registry checks it)
        "effects": [e.id for e in bank.effects],
        "eval_sources": len(cases.sources),
        "cases": sum(len(cases.sources) * len(s) for s in cases.seeds.values()),
        "structure_threshold": threshold,
        "plugins": plugins.enabled,
        "seconds": time.perf_counter() - started,
    }
    sample_methods = [name for name in SAMPLE_METHODS if name in by_name]
    return write_report(Path(out), results, gate, context, cases.sources, sample_methods)
