"""Procedural sources: deterministic, in range, varied, and disjoint across splits."""

import pytest
import torch

from collectionlora.effects import SPLITS, make_sources


def test_sources_are_deterministic_and_in_range():
    images = make_sources("train", 16, 32, seed=0)
    assert images.shape == (16, 3, 32, 32) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    assert torch.equal(images, make_sources("train", 16, 32, seed=0))
    assert torch.equal(images[:4], make_sources("train", 4, 32, seed=0))  # an image ignores the count
    assert not torch.equal(images, make_sources("train", 16, 32, seed=1))


def test_other_sizes_render():
    assert make_sources("general", 2, 48, seed=0).shape == (2, 3, 48, 48)


def test_splits_are_disjoint():
    flat = {split: make_sources(split, 300, 32, seed=0).flatten(1) for split in SPLITS}
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1 :]:
            distances = torch.cdist(flat[a], flat[b])
            assert distances.min() > 0, f"{a} and {b} share an image"


def test_images_within_a_split_vary():
    images = make_sources("eval", 200, 32, seed=0)
    distances = torch.cdist(images.flatten(1), images.flatten(1)) + torch.eye(200) * 1e9
    assert distances.min() > 1.0
    assert images.mean((2, 3)).std(0).min() > 0.1  # colour varies across images
    assert images.flatten(1).std(1).median() > 0.08  # and within them


def test_unknown_split_and_bad_sizes_are_errors():
    with pytest.raises(ValueError, match="holdout"):
        make_sources("holdout", 1, 32, seed=0)
    with pytest.raises(ValueError):
        make_sources("train", 0, 32, seed=0)
    with pytest.raises(ValueError):
        make_sources("train", 1, 4, seed=0)
