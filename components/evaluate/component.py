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
    from collections import namedtuple
    from pathlib import Path

    from collectionlora.pipeline.outputs import log_scalars, publish_evaluation
    from collectionlora.pipeline.task_params import task_params
    from collectionlora.stages import run_evaluate

    out = Path(evaluation.path)
    log_scalars(metrics.log_metric, run_evaluate(task_params(params, bank.path), Path(student.path), Path(baselines.path), out))
    passed = publish_evaluation(out, Path(methods.path), Path(report.path), Path(bleeding.path), Path(samples.path))
    return namedtuple("EvaluateOutputs", ["gate_passed"])(passed)
