"""The procedural effect catalog: size, stochastic share, determinism and seeded randomness."""

from __future__ import annotations

import pytest
import torch

from collectionlora.effects import catalog, catalog_records, get_effect, make_sources

EFFECTS = list(catalog().values())


def test_catalog_size_ids_prompts_and_stochastic_share():
    assert len(EFFECTS) >= 64
    assert len({e.id for e in EFFECTS}) == len(EFFECTS)
    assert len({e.prompt for e in EFFECTS}) == len(EFFECTS)
    assert sum(e.stochastic for e in EFFECTS) >= len(EFFECTS) / 3
    assert [r["id"] for r in catalog_records()] == [e.id for e in EFFECTS]
    with pytest.raises(ValueError, match="unknown effect 'nope'"):
        get_effect("nope")


@pytest.mark.parametrize("effect", EFFECTS, ids=lambda e: e.id)
def test_effect_contract(effect):
    images = make_sources("train", 4, 32, 1)
    out = effect.apply(images, seed=3)
    assert out.shape == images.shape and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    assert (out - images).abs().mean() > 0.02, "the effect must visibly change the image"
    assert torch.equal(out, effect.apply(images, seed=3))
    other_seed = effect.apply(images, seed=4)
    if effect.stochastic:
        assert not torch.equal(out, other_seed)
        # each item draws its own randomness: item 0 alone equals item 0 in the batch
        assert torch.allclose(effect.apply(images[:1], seed=3)[0], out[0])
        assert not torch.allclose(out[0] - images[0], out[1] - images[1])
    else:
        assert torch.equal(out, other_seed)


def test_apply_rejects_bad_shapes():
    with pytest.raises(ValueError, match="expected a float"):
        EFFECTS[0].apply(torch.zeros(3, 32, 32), 0)
