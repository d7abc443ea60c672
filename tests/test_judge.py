"""The effect judge: held-out accuracy on catalog effects and on a user's own pairs, save/load, determinism."""

from pathlib import Path

import pytest
import torch

from collectionlora.config import JudgeConfig, load_params
from collectionlora.effects import make_sources
from collectionlora.evaluate.judge import (
    NONE,
    EffectJudge,
    JudgeFileError,
    examples_from_pairs,
    judge_accuracy,
    per_label_accuracy,
    procedural_examples,
    train_judge,
)

EFFECTS = ["grayscale", "vignette", "film_grain", "colour_frame", "pixelate"]
LABELS = [*EFFECTS, NONE]


def quick_config(**update) -> JudgeConfig:
    judge = load_params(Path(__file__).parents[1] / "params.yaml").judge
    return judge.model_copy(update={"steps": 120, "width": 16, "procedural_per_effect": 64, **update})


@pytest.fixture(scope="module")
def catalog_judge() -> EffectJudge:
    config = quick_config()
    return train_judge(procedural_examples(EFFECTS, config.procedural_per_effect, 32, config.seed), config, LABELS)


@pytest.fixture(scope="module")
def held_out():
    return procedural_examples(EFFECTS, 32, 32, seed=1234, split="eval")


@pytest.mark.slow
def test_catalog_judge_names_held_out_edits(catalog_judge, held_out):
    truth = held_out.label_names()
    assert judge_accuracy(catalog_judge, held_out.sources, held_out.results, truth) >= 0.95
    per_label = per_label_accuracy(catalog_judge, held_out.sources, held_out.results, truth)
    assert set(per_label) == set(LABELS) and min(per_label.values()) >= 0.8
    probabilities = catalog_judge.predict_proba(held_out.sources[:3], held_out.results[:3])
    assert probabilities.shape == (3, len(LABELS))
    assert torch.allclose(probabilities.sum(-1), torch.ones(3))


def user_effects() -> dict:
    """Edits that are not in the catalog, as a user's own bank would hold them."""

    def top_bar(x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        out[:, :, :8] = torch.tensor([1.0, 0.9, 0.1]).view(1, 3, 1, 1)
        return out

    return {
        "red_boost": lambda x: (x * torch.tensor([1.0, 0.6, 0.6]).view(1, 3, 1, 1)).clamp(0, 1),
        "top_bar": top_bar,
        "left_fade": lambda x: x * torch.linspace(0.2, 1.0, x.shape[-1]),
    }


@pytest.mark.slow
def test_judge_from_user_pairs_alone():
    effects = user_effects()
    sources = make_sources("train", 32, 32, seed=0)
    examples = examples_from_pairs({name: (sources, edit(sources)) for name, edit in effects.items()})
    assert sorted(set(examples.label_names())) == sorted([*effects, NONE])
    judge = train_judge(examples, quick_config(), [*effects, NONE])

    fresh = make_sources("eval", 24, 32, seed=5)
    pairs = [(name, edit(fresh)) for name, edit in effects.items()] + [(NONE, fresh)]
    results = torch.cat([r for _, r in pairs])
    truth = [name for name, _ in pairs for _ in range(len(fresh))]
    assert judge_accuracy(judge, fresh.repeat(len(pairs), 1, 1, 1), results, truth) >= 0.9


def test_save_load_round_trip(catalog_judge, held_out, tmp_path):
    catalog_judge.save(tmp_path / "judge")
    loaded = EffectJudge.load(tmp_path / "judge")
    assert loaded.labels == LABELS
    expected = catalog_judge.predict_proba(held_out.sources, held_out.results)
    assert torch.equal(loaded.predict_proba(held_out.sources, held_out.results), expected)


def test_load_rejects_a_missing_or_foreign_judge(tmp_path):
    with pytest.raises(JudgeFileError, match="judge.json"):
        EffectJudge.load(tmp_path)
    (tmp_path / "judge.json").write_text('{"format": "something-else"}', encoding="utf-8")
    with pytest.raises(JudgeFileError, match="not an effect judge"):
        EffectJudge.load(tmp_path)


def test_training_is_deterministic_for_a_seed():
    config = quick_config(steps=5, procedural_per_effect=8)
    examples = procedural_examples(EFFECTS[:2], 8, 32, seed=0)
    sources, results = examples.sources[:6], examples.results[:6]
    labels = [*EFFECTS[:2], NONE]
    first = train_judge(examples, config, labels).predict_proba(sources, results)
    assert torch.equal(first, train_judge(examples, config, labels).predict_proba(sources, results))
    other = train_judge(examples, config.model_copy(update={"seed": config.seed + 1}), labels)
    assert not torch.equal(first, other.predict_proba(sources, results))


def test_training_rejects_labels_that_do_not_fit_the_examples():
    examples = procedural_examples(["grayscale"], 4, 32, seed=0)
    with pytest.raises(ValueError, match="grayscale"):
        train_judge(examples, quick_config(steps=1), [NONE])
    with pytest.raises(ValueError, match="sepia"):
        train_judge(examples, quick_config(steps=1), ["grayscale", "sepia", NONE])


def test_user_pairs_are_validated():
    sources = make_sources("train", 4, 32, seed=0)
    with pytest.raises(ValueError, match="reserved"):
        examples_from_pairs({NONE: (sources, sources)})
    with pytest.raises(ValueError, match="odd"):
        examples_from_pairs({"odd": (sources, sources[:2])})
    with pytest.raises(ValueError):
        examples_from_pairs({})


def test_examples_combine_under_shared_names():
    sources = make_sources("train", 4, 32, seed=0)
    own = examples_from_pairs({"user_tint": (sources, sources * 0.5)})
    both = own + procedural_examples(["grayscale"], 4, 32, seed=0)
    assert both.names == ("user_tint", NONE, "grayscale")
    assert len(both) == len(own) + 8
    assert both.label_names().count(NONE) == 4 + 4


def test_judge_train_stage_on_a_bank(valid_bank, tmp_path):
    """`collectionlora judge train`: the bank's pairs plus catalog ground truth, saved and reported."""
    from collectionlora.stages import run_judge_train

    params = load_params(Path(__file__).parents[1] / "params.yaml")
    params = params.model_copy(update={
        "bank": params.bank.model_copy(update={"root": valid_bank.parent, "manifest": valid_bank}),
        "judge": quick_config(steps=10, procedural_per_effect=8, holdout_per_effect=2),
    })
    report = run_judge_train(params, tmp_path / "judge")
    judge = EffectJudge.load(tmp_path / "judge")
    assert judge.labels == [NONE, *report["effects"]]
    assert report["catalog_effects"] == [e for e in report["effects"] if e in {"sepia", "blur", "invert"}]
    assert 0.0 <= report["holdout"]["accuracy"] <= 1.0
