"""The registered version's description: the collection's model card (base, how to load it in
diffusers, triggers), each effect's trigger with its evaluation scores, the methods table and the
gate, so that the MLflow UI page of a version says what it does and how well."""

from __future__ import annotations

from collectionlora.distill.export import MODEL_CARD
from collectionlora.distill.prompting import PromptPlan
from collectionlora.evaluate.report import TABLE
from collectionlora.registry.inputs import RegistrationInputs

PYFUNC_USAGE = """```python
import base64, pandas as pd, mlflow
model = mlflow.pyfunc.load_model("models:/{name}@champion")
image = base64.b64encode(open("in.png", "rb").read()).decode()
out = model.predict(pd.DataFrame([{{"image": image, "effect": "{effect}", "steps": 8, "seed": 0}}]))
open("out.png", "wb").write(base64.b64decode(out["image"][0]))
```"""


def version_description(inputs: RegistrationInputs, model_name: str) -> str:
    plan = PromptPlan.from_json(inputs.record["prompts"])
    scores = {row["effect"]: row for row in inputs.student_rows}
    student = inputs.gate["student"]
    rows = "\n".join(
        f"| `{e.effect}` | `{e.trigger or '-'}` | {_score(scores.get(e.effect), 'judge_accuracy')} | {_score(scores.get(e.effect), 'bcr')} |"
        for e in plan.effects
    )
    verdict = "passed" if inputs.gate["passed"] else "FAILED"
    checks = "\n".join(f"- {c['detail']}" for c in inputs.gate["checks"])
    card = (inputs.collection / MODEL_CARD).read_text(encoding="utf-8").strip()
    table = (inputs.evaluation / TABLE).read_text(encoding="utf-8").strip()
    return f"""{card}

## As an MLflow model

{PYFUNC_USAGE.format(name=model_name, effect=plan.effects[0].effect)}

## Per effect ({student})

| effect | trigger | judge accuracy | BCR |
|---|---|---|---|
{rows}

## Gate: {verdict}

{checks}

{table}
"""


def _score(row: dict | None, key: str) -> str:
    value = (row or {}).get(key)
    try:
        return f"{float(value):.3f}"
    except (TypeError, ValueError):
        return "-"
