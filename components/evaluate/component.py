from typing import NamedTuple

from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Model, Output


def evaluate(
    bank: Input[Dataset],
    student: Input[Model],
    baselines: Input[Dataset],
    params: str,
    evaluation: Output[Dataset],
    metrics: Output[Metrics],
    methods: Output[Markdown],
    report: Output[HTML],
    bleeding: Output[Artifact],
    samples: Output[Artifact],
) -> NamedTuple("EvaluateOutputs", [("gate_passed", bool)]):
    """Every method scored on the bank's eval sources, the gate decided; the table, report and figures
    as KFP artifacts so they show in the run's UI."""
    import json
    import shutil
    from collections import namedtuple
    from pathlib import Path

    from collectionlora.pipeline.outputs import evaluation_html, log_scalars
    from collectionlora.pipeline.task_params import task_params
    from collectionlora.stages import run_evaluate

    out = Path(evaluation.path)
    summary = run_evaluate(task_params(params, bank.path), Path(student.path), Path(baselines.path), out)
    log_scalars(metrics.log_metric, summary)
    shutil.copyfile(out / "methods.md", methods.path)
    Path(report.path).write_text(evaluation_html(out), encoding="utf-8")
    shutil.copyfile(out / "bleeding.png", bleeding.path)
    shutil.copyfile(out / "samples.png", samples.path)
    gate = json.loads((out / "gate.json").read_text(encoding="utf-8"))
    return namedtuple("EvaluateOutputs", ["gate_passed"])(bool(gate["passed"]))
