"""Per-effect fidelity metrics of the evaluation stage: pure functions on image, probability and feature tensors.

Images are float [B, 3, H, W] tensors in [0, 1] of any size. These are offline stand-ins for the paper's metrics
(docs/method.md section 8.2): the effect judge replaces CLIP/DreamSim for style alignment and the MLLM for BCR,
judge features replace Inception for a Frechet distance, and SSIM-based scores replace DINO for subject
consistency.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from collectionlora.effects.ops import luma
from collectionlora.evaluate.judge import NONE, PREDICT_CHUNK, EffectJudge

SSIM_WINDOW, SSIM_SIGMA = 11, 1.5  # Gaussian window of Wang et al. (2004), the usual SSIM definition
SSIM_K1, SSIM_K2 = 0.01, 0.03  # stabilising constants for data range 1: C1 = K1**2, C2 = K2**2
SOBEL_SCALE = 4 * math.sqrt(2)  # largest Sobel gradient magnitude of an image in [0, 1]: edge maps in [0, 1]
FLAT_STD = 1e-6  # below this luminance spread an image counts as flat (no structure to rescale)


def _check_images(name: str, images: Tensor, references: Tensor) -> None:
    if images.ndim != 4:
        raise ValueError(f"{name}: expected [B, C, H, W] images, got {tuple(images.shape)}")
    if images.shape != references.shape:
        raise ValueError(f"{name}: shapes differ, {tuple(images.shape)} vs {tuple(references.shape)}")


def _gaussian_window(size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A normalised 2-D Gaussian window [size, size]."""
    offsets = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    line = torch.exp(-(offsets**2) / (2 * sigma**2))
    line = line / line.sum()
    return line[:, None] * line[None, :]


def fitted_window(height: int, width: int, window: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> tuple[int, float]:
    """The SSIM window used for an image of this size: unchanged when it fits, else the largest odd size that
    fits, with sigma shrunk in proportion so the window keeps its shape (11/1.5 becomes 7/0.95 at 7x7)."""
    if window < 1 or window % 2 == 0:
        raise ValueError(f"SSIM window must be a positive odd size, got {window}")
    if sigma <= 0:
        raise ValueError(f"SSIM sigma must be positive, got {sigma}")
    fitted = min(window, height, width)
    fitted -= 1 - fitted % 2
    return fitted, sigma * fitted / window


def ssim(images: Tensor, references: Tensor, window: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> Tensor:
    """Per-image SSIM [B] (data range 1), computed per channel and averaged over channels and window positions,
    so colour errors count, not only luminance. Valid windows only (no padding: borders are not invented);
    images smaller than the window use `fitted_window`. Computed in float64."""
    _check_images("ssim", images, references)
    size, sigma = fitted_window(images.shape[-2], images.shape[-1], window, sigma)
    x, y = images.double(), references.double()
    channels = x.shape[1]
    kernel = _gaussian_window(size, sigma, x.dtype, x.device).expand(channels, 1, size, size).contiguous()

    def local_mean(t: Tensor) -> Tensor:
        return F.conv2d(t, kernel, groups=channels)

    mu_x, mu_y = local_mean(x), local_mean(y)
    var_x = local_mean(x * x) - mu_x**2
    var_y = local_mean(y * y) - mu_y**2
    cov = local_mean(x * y) - mu_x * mu_y
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return index.flatten(1).mean(1).to(images.dtype if images.is_floating_point() else torch.float32)


def style_alignment(probabilities: Tensor, labels: Sequence[str], requested: str) -> dict[str, float]:
    """How clearly the judge sees the requested effect in a batch of edits of that effect: its mean probability
    (a soft score that still moves when verdicts do not) and the share of verdicts naming it."""
    labels = list(labels)
    if probabilities.ndim != 2 or probabilities.shape[1] != len(labels):
        raise ValueError(f"expected probabilities [B, {len(labels)}], got {tuple(probabilities.shape)}")
    if requested not in labels:
        raise ValueError(f"requested effect {requested!r} is not among the judge's labels {labels}")
    column = labels.index(requested)
    return {
        "requested_probability": float(probabilities[:, column].mean()),
        "verdict_accuracy": float((probabilities.argmax(1) == column).float().mean()),
    }


def edge_map(images: Tensor) -> Tensor:
    """Sobel gradient magnitude of the luminance, [B, 1, H, W] in [0, 1] (borders replicated)."""
    sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=images.dtype)
    kernels = torch.stack((sobel, sobel.T))[:, None].to(images.device)  # d/dx, d/dy: [2, 1, 3, 3]
    gradients = F.conv2d(F.pad(luma(images), (1, 1, 1, 1), mode="replicate"), kernels)
    return gradients.pow(2).sum(1, keepdim=True).sqrt() / SOBEL_SCALE


def structure_similarity(sources: Tensor, images: Tensor) -> Tensor:
    """BCR's "subject structure kept" score [B]: SSIM between the Sobel edge maps of source and output.
    Edges rather than luminance because they carry where the contours are, not how they are toned: colour,
    tone and inversion effects keep a score near 1, so the calibrated threshold only has to tolerate effects
    that genuinely redraw edges (blur, pixelate, grain), and a blank, noisy or different image still scores low."""
    _check_images("structure_similarity", images, sources)
    return ssim(edge_map(images.float()), edge_map(sources.float()))


def calibrate_structure_threshold(ground_truth_pairs: dict[str, tuple[Tensor, Tensor]], quantile: float = 0.05) -> float:
    """The structure score below which an edit counts as having lost its subject: the `quantile` of the scores of
    genuine edits, `ground_truth_pairs[effect] = (sources, their ground-truth edits)` (all effects pooled; a bank's
    own pairs, or procedural ground truth). The quantile is taken without interpolation (the observed score at or
    below it), so at most that share of genuine edits falls below the threshold; quantile 0 is the lowest score.
    Pass a one-effect dict for a per-effect threshold."""
    if not ground_truth_pairs:
        raise ValueError("no ground-truth edits given to calibrate the structure threshold")
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {quantile}")
    scores = []
    for effect_id, (sources, truth) in ground_truth_pairs.items():
        if truth.shape != sources.shape:
            shapes = f"{tuple(truth.shape)} vs sources {tuple(sources.shape)}"
            raise ValueError(f"effect {effect_id}: ground truth does not match its sources, {shapes}")
        scores.append(structure_similarity(sources, truth))
    return float(torch.quantile(torch.cat(scores).double(), quantile, interpolation="lower"))


def bad_cases(verdicts: Sequence[str], requested: str, structure: Tensor, threshold: float) -> Tensor:
    """Which edits are bad cases [B] (bool): the judge names another effect or "none", or the structure score
    is below the calibrated threshold. The offline analogue of the paper's MLLM bad-case verdict."""
    if structure.shape != (len(verdicts),):
        raise ValueError(f"{len(verdicts)} verdicts but structure scores of shape {tuple(structure.shape)}")
    wrong = torch.tensor([verdict != requested for verdict in verdicts], dtype=torch.bool, device=structure.device)
    return wrong | (structure < threshold)


def bad_case_rate(verdicts: Sequence[str], requested: str, structure: Tensor, threshold: float) -> float:
    """BCR: the share of bad cases (see `bad_cases`), lower is better."""
    if not verdicts:
        raise ValueError("no cases to rate")
    return float(bad_cases(verdicts, requested, structure, threshold).float().mean())


@dataclass(frozen=True)
class BleedingMatrix:
    """Which label the judge gave to edits requested as each effect. Rows are the requested effects (in label
    order), columns the judge's labels; `rates` are row-normalised counts."""

    effects: tuple[str, ...]
    labels: tuple[str, ...]
    counts: Tensor
    rates: Tensor


def bleeding_matrix(requested: Sequence[str], judged: Sequence[str], labels: Sequence[str]) -> BleedingMatrix:
    """Count per requested effect how often each label was judged: off-diagonal mass is one effect bleeding
    into another in the collection LoRA, the "none" column is an edit that did nothing visible."""
    labels = tuple(labels)
    if len(requested) != len(judged):
        raise ValueError(f"{len(requested)} requested effects but {len(judged)} verdicts")
    unknown = sorted((set(requested) | set(judged)) - set(labels))
    if unknown:
        raise ValueError(f"{unknown} are not among the judge's labels {list(labels)}")
    effects = tuple(label for label in labels if label in set(requested))
    counts = torch.zeros(len(effects), len(labels), dtype=torch.long)
    for wanted, verdict in zip(requested, judged):
        counts[effects.index(wanted), labels.index(verdict)] += 1
    rates = counts.double() / counts.sum(1, keepdim=True).clamp(min=1)
    return BleedingMatrix(effects, labels, counts, rates)


def off_diagonal_bleed(matrix: BleedingMatrix) -> float:
    """Mean over requested effects of the share of their edits judged as another effect ("none" excluded:
    that is a missing effect, not bleeding). Every effect weighs the same, whatever its case count."""
    if not matrix.effects:
        raise ValueError("empty bleeding matrix")
    other = torch.ones_like(matrix.rates, dtype=torch.bool)
    for row, effect in enumerate(matrix.effects):
        other[row, matrix.labels.index(effect)] = False
    if NONE in matrix.labels:
        other[:, matrix.labels.index(NONE)] = False
    return float((matrix.rates * other).sum(1).mean())


def frechet_distance(features_a: Tensor, features_b: Tensor, eps: float = 1e-6) -> float:
    """Frechet distance between Gaussians fitted to two feature sets [N, D] and [M, D]:
    |mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a C_b)^(1/2)), in float64. The trace of the matrix root is taken
    from the eigenvalues of the symmetric C_a^(1/2) C_b C_a^(1/2) (eigh, negatives from rounding clipped),
    which is stable where a general sqrtm is not. A ridge `eps` * I is added to both covariances so that
    N < D (singular covariances) is well defined; it cancels exactly for equal covariances and otherwise
    changes the distance by O(eps)."""
    if features_a.ndim != 2 or features_b.ndim != 2 or features_a.shape[1] != features_b.shape[1]:
        shapes = f"{tuple(features_a.shape)} and {tuple(features_b.shape)}"
        raise ValueError(f"expected features [N, D] and [M, D] with the same D, got {shapes}")
    if len(features_a) < 2 or len(features_b) < 2:
        raise ValueError("a covariance needs at least 2 feature vectors per set")
    a, b = features_a.double(), features_b.double()
    ridge = eps * torch.eye(a.shape[1], dtype=a.dtype, device=a.device)
    cov_a, cov_b = torch.cov(a.T).reshape_as(ridge) + ridge, torch.cov(b.T).reshape_as(ridge) + ridge
    values, vectors = torch.linalg.eigh(cov_a)
    root_a = vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T
    middle = root_a @ cov_b @ root_a
    trace_root = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    mean_term = (a.mean(0) - b.mean(0)).pow(2).sum()
    distance = mean_term + torch.trace(cov_a) + torch.trace(cov_b) - 2 * trace_root
    return max(float(distance), 0.0)  # rounding can leave -1e-12 for identical sets


@torch.no_grad()
def judge_features(judge: EffectJudge, sources: Tensor, images: Tensor) -> Tensor:
    """Penultimate activations [N, D] of the judge's network for (source, image) pairs: the input of its final
    linear layer, caught with a forward pre-hook so the real forward runs unchanged. An effect-aware feature
    space for `frechet_distance` (the judge is trained on these effects; Inception is not)."""
    _check_images("judge_features", images, sources)
    net = judge.net
    if net.training:
        raise ValueError("the judge network is in training mode; call judge.net.eval() (BatchNorm would update)")
    last = net.head[-1]
    if not isinstance(last, nn.Linear):
        raise TypeError(f"expected the judge head to end in nn.Linear, found {type(last).__name__}")
    caught: list[Tensor] = []
    handle = last.register_forward_pre_hook(lambda _module, inputs: caught.append(inputs[0].detach()))
    try:
        for start in range(0, len(sources), PREDICT_CHUNK):
            stop = start + PREDICT_CHUNK
            net(sources[start:stop].float(), images[start:stop].float())
    finally:
        handle.remove()
    return torch.cat(caught) if caught else torch.empty(0, last.in_features)


def diversity(images_by_seed: Tensor) -> float:
    """How much outputs of the same source differ across seeds: the per-pixel RGB Euclidean distance, averaged
    over pixels, seed pairs and sources ([S, B, 3, H, W] in, 0 when every seed gives the same image; at most
    sqrt(3)). Low diversity on a stochastic effect means the seed is ignored."""
    if images_by_seed.ndim != 5:
        raise ValueError(f"expected [S, B, C, H, W] images, got {tuple(images_by_seed.shape)}")
    seeds = images_by_seed.shape[0]
    if seeds < 2:
        raise ValueError(f"diversity needs at least 2 seeds, got {seeds}")
    first, second = torch.triu_indices(seeds, seeds, offset=1)
    x = images_by_seed.double()
    distances = (x[first] - x[second]).pow(2).sum(2).sqrt()  # [pairs, B, H, W]
    return float(distances.mean())


def subject_consistency(sources: Tensor, images: Tensor) -> Tensor:
    """Whether the output still shows the source's subject [B]: SSIM of luminance after the output's luminance
    is rescaled to the source's mean and spread. Colour, brightness and contrast effects therefore do not
    count as subject changes; moved, erased or redrawn content does. (Inversion does count: its structure
    correlates negatively.) A flat output stays flat and scores well below 1, though not 0: flat regions of the
    source still agree with it. A flat source has no subject and scores 1."""
    _check_images("subject_consistency", images, sources)
    source, output = luma(sources.float()), luma(images.float())
    source_mean, source_std = source.mean((1, 2, 3), keepdim=True), source.std((1, 2, 3), correction=0, keepdim=True)
    output_mean, output_std = output.mean((1, 2, 3), keepdim=True), output.std((1, 2, 3), correction=0, keepdim=True)
    matched = (output - output_mean) / output_std.clamp(min=FLAT_STD) * source_std + source_mean
    return ssim(matched, source)
