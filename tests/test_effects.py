"""The effect catalog: size, uniqueness, and the contract of Effect.apply."""

import pytest
import torch

from collectionlora.effects import catalog, catalog_records, get_effect, make_sources

SOURCES = make_sources("eval", 6, 32, seed=7)


def test_catalog_is_large_unique_and_one_third_stochastic():
    effects = catalog()
    assert len(effects) >= 64
    assert len({e.prompt for e in effects.values()}) == len(effects)
    assert all(key == effect.id for key, effect in effects.items())
    assert sum(e.stochastic for e in effects.values()) * 3 >= len(effects)


def test_catalog_order_and_records_are_stable():
    assert list(catalog()) == list(catalog())
    records = catalog_records()
    assert [r["id"] for r in records] == list(catalog())
    assert set(records[0]) == {"id", "category", "stochastic", "prompt"}


def test_unknown_effect_is_a_value_error_naming_it():
    with pytest.raises(ValueError, match="no_such_effect"):
        get_effect("no_such_effect")


def test_apply_rejects_a_wrong_shape():
    with pytest.raises(ValueError, match="grayscale"):
        get_effect("grayscale").apply(SOURCES[0], seed=0)


@pytest.mark.parametrize("effect_id", list(catalog()))
def test_effect_keeps_shape_and_range_and_changes_the_image(effect_id):
    out = get_effect(effect_id).apply(SOURCES, seed=3)
    assert out.shape == SOURCES.shape and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    assert (out - SOURCES).abs().mean() > 0.01


@pytest.mark.parametrize("effect_id", list(catalog()))
def test_effect_randomness_follows_the_seed(effect_id):
    effect = get_effect(effect_id)
    first = effect.apply(SOURCES, seed=1)
    assert torch.equal(first, effect.apply(SOURCES, seed=1))
    assert torch.equal(first, get_effect(effect_id).apply(SOURCES.clone(), seed=1))
    if not effect.stochastic:
        assert torch.equal(first, effect.apply(SOURCES, seed=2))
        return
    assert not torch.equal(first, effect.apply(SOURCES, seed=2))
    same_source = effect.apply(SOURCES[:1].repeat(8, 1, 1, 1), seed=1)
    assert len({tuple(item.flatten().tolist()) for item in same_source}) >= 3  # items draw their own randomness
    assert torch.equal(same_source[:1], effect.apply(SOURCES[:1], seed=1))  # item 0 ignores the batch size
