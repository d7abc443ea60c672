"""The paper's tables as experiments, on the tiny bank: each writes its table and JSON, reuses finished
runs, and switches exactly the ablated term off."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import params_for_bank

from collectionlora.bank import open_bank
from collectionlora.effects import catalog
from collectionlora.errors import CollectionLoraError
from collectionlora.evaluate.judge import EffectJudge
from collectionlora.experiments import (
    run_ablations,
    run_composition,
    run_incremental,
    run_scaling,
)
from collectionlora.stages import run_distill, run_rollout


@pytest.fixture(scope="module")
def lab(tiny_bank: Path, tiny_params, tmp_path_factory) -> dict:
    """A copy of the tiny bank, rollouts of its 2-effect bank and a collection of those 2 effects."""
    work = tmp_path_factory.mktemp("experiments")
    root = work / "data"
    shutil.copytree(tiny_bank, root)
    params = params_for_bank(tiny_params, root, tracking={"uri": f"sqlite:///{work / 'mlflow.db'}"})
    run_rollout(params, work / "rollouts", None)
    run_distill(params, work / "rollouts", work / "student")
    return {"params": params, "root": root, "work": work}


def test_ablations_switch_one_term_off_per_variant_and_reuse_finished_runs(lab):
    out = lab["work"] / "ablations"
    result = run_ablations(lab["params"], lab["work"] / "rollouts", out, full=lab["work"] / "student", variants=["full", "no_ts"])
    assert list(result["variants"]) == ["full", "no_ts"]
    assert result["variants"]["full"]["collection"] == str(lab["work"] / "student") and not (out / "full" / "student").exists()
    flags = {name: [row[f] for f in ("pdsr", "aop", "ts", "ta_fm")] for name, row in result["variants"].items()}
    assert flags == {"full": [True, True, True, True], "no_ts": [True, True, False, True]}
    trained = json.loads((out / "no_ts" / "student" / "collection.json").read_text())
    assert trained["training"]["steps"] == lab["params"].distill.max_steps
    table = (out / "ablations.md").read_text()
    assert "| no_ts | ✓ | ✓ |  | ✓ |" in table and "| teachers, 80 NFE |" in table
    stamp = (out / "no_ts" / "student" / "collection.json").stat().st_mtime_ns
    assert run_ablations(lab["params"], lab["work"] / "rollouts", out, full=lab["work"] / "student", variants=["no_ts"])["variants"]["no_ts"] == result["variants"]["no_ts"]
    assert (out / "no_ts" / "student" / "collection.json").stat().st_mtime_ns == stamp
    with pytest.raises(CollectionLoraError, match=r"unknown variants \['no_magic'\]"):
        run_ablations(lab["params"], lab["work"] / "rollouts", out, variants=["no_magic"])


def test_composition_scores_both_effects_composed_and_chained(lab):
    out = lab["work"] / "composition"
    result = run_composition(lab["params"], lab["work"] / "student", out, max_pairs=2)
    effects = [e["id"] for e in yaml.safe_load((lab["root"] / "bank.yaml").read_text())["effects"]]
    assert [(p["first"], p["then"]) for p in result["pairs"]] == [(effects[0], effects[1]), (effects[1], effects[0])]
    for kind in ("composed", "chained"):
        assert all(0 <= v <= 1 for v in result["means"][kind].values())
    table = (out / "composition.md").read_text()
    assert "| composed | 8 |" in table and "| chained | 16 |" in table and "| ground truth |  |" in table
    bank = open_bank(lab["params"].bank)
    judge = EffectJudge.load(bank.judge)
    sources = bank.load_eval_sources()[: lab["params"].evaluate.eval_images]
    known = catalog()
    first, then = effects[0], effects[1]
    truth = judge.predict_proba(sources, known[then].apply(known[first].apply(sources, 0), 0))
    expected = float(truth[:, judge.labels.index(first)].mean())
    assert result["pairs"][0]["ground_truth"]["p_first"] == pytest.approx(expected, abs=1e-6)


def test_incremental_adds_the_larger_banks_next_effect(lab):
    out = lab["work"] / "incremental"
    result = run_incremental(lab["params"], lab["work"] / "student", lab["root"] / "bank-3.yaml", lab["work"] / "rollouts-3", out, added=1)
    (step,) = result["steps"]
    assert step["effects"] == 3 and step["generator_steps"] == lab["params"].incremental.generator_steps_per_effect
    assert all(0 <= step[k] <= 1 for k in ("old_before", "old_after", "new_student", "student_all", "teacher_all"))
    assert f"| 3 | {step['added']} |" in (out / "incremental.md").read_text()


def test_scaling_compares_the_methods_at_each_size(lab):
    out = lab["work"] / "scaling"
    result = run_scaling(lab["params"], lab["root"] / "bank-3.yaml", lab["work"] / "rollouts-scaling", out, [1, 3])
    assert set(result["methods"]) == {1, 3}
    assert set(result["methods"][3]) == {"teacher", "cascade", "fm_all_in_one", "student_8nfe"}
    effects = [e["id"] for e in yaml.safe_load((lab["root"] / "bank-3.yaml").read_text())["effects"]]
    assert json.loads((out / "n3" / "eval" / "metrics.json").read_text())["effects"] == effects
    assert json.loads((out / "n1" / "eval" / "metrics.json").read_text())["effects"] == effects[:1]
    assert "| All-in-1 (ours) |" in (out / "scaling.md").read_text()
    assert result["fm_all_in_one_steps"] == lab["params"].baselines.fm_all_in_one.steps
