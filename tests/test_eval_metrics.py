"""Evaluation metrics: SSIM, style alignment, structure and BCR, effect bleeding, Frechet distance on judge
features, seed diversity and subject consistency, each on inputs with a known answer."""

import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view

from collectionlora.effects import get_effect, make_sources
from collectionlora.evaluate.judge import NONE, EffectJudge, JudgeNet
from collectionlora.evaluate.metrics import (
    bad_case_rate,
    bad_cases,
    bleeding_matrix,
    calibrate_structure_threshold,
    diversity,
    fitted_window,
    frechet_distance,
    judge_features,
    off_diagonal_bleed,
    ssim,
    structure_similarity,
    style_alignment,
    subject_consistency,
)


@pytest.fixture(scope="module")
def sources() -> torch.Tensor:
    return make_sources("eval", 6, 32, seed=0)


def reference_ssim(x: np.ndarray, y: np.ndarray, window: int, sigma: float) -> np.ndarray:
    """Textbook SSIM in numpy: at every valid window position of every channel, Gaussian-weighted means,
    central variances and covariance; the mean over positions and channels per image."""
    offsets = np.arange(window) - (window - 1) / 2
    line = np.exp(-(offsets**2) / (2 * sigma**2))
    weights = np.outer(line, line) / np.outer(line, line).sum()
    c1, c2 = 0.01**2, 0.03**2
    scores = []
    for image, reference in zip(x, y):
        per_channel = []
        for a, b in zip(image, reference):
            pa, pb = sliding_window_view(a, (window, window)), sliding_window_view(b, (window, window))
            ma, mb = (pa * weights).sum((-2, -1)), (pb * weights).sum((-2, -1))
            da, db = pa - ma[..., None, None], pb - mb[..., None, None]
            va, vb = (da**2 * weights).sum((-2, -1)), (db**2 * weights).sum((-2, -1))
            cab = (da * db * weights).sum((-2, -1))
            index = ((2 * ma * mb + c1) * (2 * cab + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2))
            per_channel.append(index.mean())
        scores.append(np.mean(per_channel))
    return np.array(scores)


# ---- SSIM -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(32, 32), (8, 8), (5, 7)])
def test_ssim_of_identical_images_is_one(shape):
    images = torch.rand(3, 3, *shape, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(ssim(images, images.clone()), torch.ones(3), atol=1e-6)


def test_ssim_of_flat_images_with_a_constant_offset_is_the_luminance_term():
    images, references = torch.full((1, 3, 32, 32), 0.3), torch.full((1, 3, 32, 32), 0.5)
    c1 = 0.01**2
    expected = (2 * 0.3 * 0.5 + c1) / (0.3**2 + 0.5**2 + c1)
    assert ssim(images, references).item() == pytest.approx(expected, abs=1e-6)


def test_ssim_matches_a_numpy_reference_on_an_offset_and_on_noise(sources):
    noise = np.random.default_rng(0).normal(0.0, 0.1, sources.shape).astype(np.float32)
    offset, noisy = (sources + 0.1).clamp(0, 1), (sources + torch.from_numpy(noise)).clamp(0, 1)
    for images in (offset, noisy):
        expected = reference_ssim(images.numpy().astype(np.float64), sources.numpy().astype(np.float64), 11, 1.5)
        assert np.allclose(ssim(images, sources).numpy(), expected, atol=1e-5)
    assert (ssim(noisy, sources) < 0.9).all() and (ssim(offset, sources) < 1).all()


def test_ssim_shrinks_its_window_to_fit_small_images(sources):
    assert fitted_window(32, 32) == (11, 1.5)
    assert fitted_window(8, 7) == (7, pytest.approx(1.5 * 7 / 11))
    small = sources[:, :, :8, :7]
    noisy = (small + 0.1 * torch.randn(small.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    expected = reference_ssim(noisy.double().numpy(), small.double().numpy(), 7, 1.5 * 7 / 11)
    assert np.allclose(ssim(noisy, small).numpy(), expected, atol=1e-5)


def test_ssim_rejects_images_of_different_shapes(sources):
    with pytest.raises(ValueError, match="shapes differ"):
        ssim(sources, sources[:, :, :16])


# ---- style alignment ------------------------------------------------------------------------------


def test_style_alignment_is_the_mean_probability_and_the_verdict_accuracy_of_the_requested_effect():
    probabilities = torch.tensor([[0.7, 0.2, 0.1], [0.4, 0.5, 0.1], [0.9, 0.05, 0.05], [0.2, 0.2, 0.6]])
    scores = style_alignment(probabilities, ["a", "b", NONE], "a")
    assert scores == {"requested_probability": pytest.approx(0.55), "verdict_accuracy": 0.5}
    with pytest.raises(ValueError, match="not among the judge's labels"):
        style_alignment(probabilities, ["a", "b", NONE], "c")


# ---- structure and bad cases ----------------------------------------------------------------------


def test_structure_similarity_ignores_tone_and_colour_but_not_lost_structure(sources):
    assert torch.allclose(structure_similarity(sources, sources.clone()), torch.ones(6), atol=1e-6)
    assert torch.allclose(structure_similarity(sources, 1 - sources), torch.ones(6), atol=1e-4)
    greyed = get_effect("grayscale").apply(sources, 0)
    assert (structure_similarity(sources, greyed) > 0.99).all()
    blank = torch.full_like(sources, 0.5)
    scrambled = sources.flatten(2)[:, :, torch.randperm(32 * 32, generator=torch.Generator().manual_seed(0))]
    assert (structure_similarity(sources, blank) < 0.5).all()  # flat regions of the source still agree
    assert (structure_similarity(sources, scrambled.view_as(sources)) < 0.3).all()


def test_structure_threshold_is_the_requested_quantile_of_the_ground_truth_scores(sources):
    truth = {e: get_effect(e).apply(sources, 7) for e in ("grayscale", "blur", "pixelate", "film_grain")}
    scores = torch.cat([structure_similarity(sources, edit) for edit in truth.values()]).double().numpy()
    assert len(set(scores.round(6))) > 10  # distinct scores, so the quantile is not trivially any of them

    for quantile in (0.05, 0.25, 0.5):
        threshold = calibrate_structure_threshold({e: (sources, t) for e, t in truth.items()}, quantile)
        assert threshold == pytest.approx(np.quantile(scores, quantile, method="lower"), abs=1e-9)
        assert threshold in set(scores)  # an observed score, not an interpolation
        assert (scores < threshold).mean() <= quantile
        assert (scores <= threshold).mean() >= quantile
    lowest = calibrate_structure_threshold({e: (sources, t) for e, t in truth.items()}, quantile=0.0)
    assert lowest == pytest.approx(scores.min())
    blur = calibrate_structure_threshold({"blur": (sources, truth["blur"])}, 0.5)
    blur_scores = structure_similarity(sources, truth["blur"]).double()
    assert blur == pytest.approx(float(blur_scores.sort().values[2]), abs=1e-9)  # lower median of 6

    # at quantile 0 no genuine edit, judged correctly, is a bad case
    for effect_id, edit in truth.items():
        verdicts = [effect_id] * len(sources)
        assert not bad_cases(verdicts, effect_id, structure_similarity(sources, edit), lowest).any()


def test_bad_cases_count_a_wrong_verdict_a_missing_effect_and_a_structure_loss():
    structure = torch.tensor([0.9, 0.9, 0.9, 0.1, 0.6])
    verdicts = ["a", "b", NONE, "a", "a"]
    assert bad_cases(verdicts, "a", structure, threshold=0.5).tolist() == [False, True, True, True, False]
    assert bad_case_rate(verdicts, "a", structure, threshold=0.5) == pytest.approx(0.6)
    assert bad_case_rate(["a"] * 5, "a", structure, threshold=0.05) == 0.0
    with pytest.raises(ValueError, match="verdicts"):
        bad_cases(verdicts[:4], "a", structure, 0.5)


# ---- effect bleeding ------------------------------------------------------------------------------


def test_bleeding_matrix_shows_a_planted_bleed_and_the_summary_excludes_none():
    labels = ["a", "b", "c", NONE]
    requested = ["a"] * 4 + ["b"] * 4
    judged = ["b", "a", "b", "b", "b", NONE, NONE, "b"]
    matrix = bleeding_matrix(requested, judged, labels)
    assert matrix.effects == ("a", "b") and matrix.labels == tuple(labels)
    assert matrix.counts.tolist() == [[1, 3, 0, 0], [0, 2, 0, 2]]
    assert torch.allclose(matrix.rates, torch.tensor([[0.25, 0.75, 0, 0], [0, 0.5, 0, 0.5]], dtype=torch.float64))
    assert off_diagonal_bleed(matrix) == pytest.approx((0.75 + 0.0) / 2)


def test_bleeding_matrix_rejects_labels_the_judge_does_not_have():
    with pytest.raises(ValueError, match="not among the judge's labels"):
        bleeding_matrix(["a", "z"], ["a", "a"], ["a", NONE])


# ---- Frechet distance and judge features ----------------------------------------------------------


def whitened(count: int, dim: int, seed: int) -> torch.Tensor:
    """Samples whose sample mean is exactly 0 and sample covariance exactly I."""
    z = torch.randn(count, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    z = z - z.mean(0)
    return z @ torch.linalg.inv(torch.linalg.cholesky(torch.cov(z.T))).T


def test_frechet_distance_of_identical_sets_is_zero_and_of_shifted_sets_the_squared_shift():
    a = whitened(64, 5, seed=0)
    shift = torch.tensor([0.5, -1.0, 2.0, 0.0, 0.25], dtype=torch.float64)
    assert frechet_distance(a, a.clone()) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(a, a + shift) == pytest.approx(float(shift.pow(2).sum()), rel=1e-9)

    generator = torch.Generator().manual_seed(1)
    p, q = torch.randn(4000, 4, generator=generator), torch.randn(4000, 4, generator=generator) + 1.0
    assert frechet_distance(p, q) == pytest.approx(4.0, abs=0.3)  # sampling error of the means: about 0.1


def test_frechet_distance_has_the_closed_form_for_diagonal_covariances():
    z = whitened(100, 3, seed=2)
    scale_a, scale_b = torch.tensor([1.0, 2.0, 0.5]), torch.tensor([3.0, 2.0, 0.1])
    mean_a, mean_b = torch.tensor([0.0, 1.0, 0.0]), torch.tensor([1.0, 1.0, -1.0])
    expected = (mean_a - mean_b).pow(2).sum() + (scale_a - scale_b).pow(2).sum()
    distance = frechet_distance(z * scale_a + mean_a, z * scale_b + mean_b)
    assert distance == pytest.approx(float(expected), abs=1e-4)


def test_frechet_distance_matches_numpy_on_correlated_features():
    generator = torch.Generator().manual_seed(3)
    a = torch.randn(200, 6, generator=generator) @ torch.randn(6, 6, generator=generator)
    b = torch.randn(150, 6, generator=generator) @ torch.randn(6, 6, generator=generator) + 0.3
    x, y = a.double().numpy(), b.double().numpy()
    cov_x, cov_y = np.cov(x, rowvar=False) + 1e-6 * np.eye(6), np.cov(y, rowvar=False) + 1e-6 * np.eye(6)
    trace_root = np.sqrt(np.linalg.eigvals(cov_x @ cov_y).real.clip(min=0)).sum()
    expected = ((x.mean(0) - y.mean(0)) ** 2).sum() + np.trace(cov_x) + np.trace(cov_y) - 2 * trace_root
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_with_fewer_samples_than_dimensions_stays_finite_and_exact_for_a_shift():
    a = torch.randn(5, 16, generator=torch.Generator().manual_seed(4))
    assert frechet_distance(a, a.clone()) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(a, a + 1.0) == pytest.approx(16.0, rel=1e-6)
    assert np.isfinite(frechet_distance(a, torch.randn(3, 16, generator=torch.Generator().manual_seed(5))))


@pytest.fixture(scope="module")
def tiny_judge() -> EffectJudge:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return EffectJudge(JudgeNet(width=2, n_labels=3), ["a", "b", NONE], width=2)


def test_judge_features_are_the_input_of_the_judges_final_layer(tiny_judge, sources):
    images = get_effect("blur").apply(sources, 0)
    features = judge_features(tiny_judge, sources, images)
    assert features.shape == (6, 8)  # 4 * width
    assert torch.equal(features, judge_features(tiny_judge, sources, images))
    assert torch.allclose(features[:2], judge_features(tiny_judge, sources[:2], images[:2]), atol=1e-6)
    probabilities = tiny_judge.net.head[-1](features).softmax(-1)
    assert torch.allclose(probabilities, tiny_judge.predict_proba(sources, images), atol=1e-6)
    assert not tiny_judge.net.head[-1]._forward_pre_hooks  # the hook is removed again


# ---- diversity and subject consistency ------------------------------------------------------------


def test_diversity_is_zero_for_identical_seeds_and_the_mean_pairwise_pixel_distance_otherwise(sources):
    assert diversity(sources.expand(3, *sources.shape)) == 0.0
    black, white = torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)
    # pairs (black, black), (black, white), (black, white): per-pixel distances 0, sqrt(3), sqrt(3)
    assert diversity(torch.stack((black, black, white))) == pytest.approx(2 * 3**0.5 / 3)
    grainy = torch.stack([get_effect("film_grain").apply(sources, seed) for seed in (1, 2)])
    assert diversity(grainy) > 0.01
    with pytest.raises(ValueError, match="at least 2 seeds"):
        diversity(sources[None])


def test_subject_consistency_ignores_colour_and_tone_but_not_moved_or_erased_content(sources):
    ones = torch.ones(6)
    assert torch.allclose(subject_consistency(sources, sources.clone()), ones, atol=1e-5)
    assert torch.allclose(subject_consistency(sources, 0.5 * sources + 0.2), ones, atol=1e-4)
    assert torch.allclose(subject_consistency(sources, get_effect("grayscale").apply(sources, 0)), ones, atol=1e-4)
    assert (subject_consistency(sources, get_effect("warm_tint").apply(sources, 0)) > 0.95).all()
    moved = subject_consistency(sources, sources.roll(8, dims=-1))
    noise = subject_consistency(sources, torch.rand(sources.shape, generator=torch.Generator().manual_seed(0)))
    flat = subject_consistency(sources, torch.full_like(sources, 0.4))
    assert (moved < 0.8).all() and (noise < 0.3).all() and (flat < 0.6).all()
