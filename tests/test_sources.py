"""Procedural source images: deterministic, varied, and disjoint across splits."""

from __future__ import annotations

import pytest
import torch

from collectionlora.effects import SPLITS, make_sources


def test_deterministic_shape_and_range():
    a = make_sources("train", 16, 32, 0)
    assert a.shape == (16, 3, 32, 32) and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, make_sources("train", 16, 32, 0))
    assert torch.equal(a[:4], make_sources("train", 4, 32, 0)), "an image does not depend on the batch size"
    assert not torch.equal(a, make_sources("train", 16, 32, 1))


def test_splits_are_disjoint_and_images_varied():
    batches = {split: make_sources(split, 200, 32, 0) for split in SPLITS}
    seen = {}
    for split, images in batches.items():
        keys = {img.numpy().tobytes() for img in images}
        assert len(keys) == 200, f"duplicate images within {split}"
        for other, other_keys in seen.items():
            assert not keys & other_keys, f"{split} and {other} share images"
        seen[split] = keys
    spread = batches["eval"].flatten(1).std(dim=0).mean()
    assert spread > 0.15


def test_unknown_split_is_an_error():
    with pytest.raises(ValueError, match="unknown source split 'test'"):
        make_sources("test", 1, 32, 0)
