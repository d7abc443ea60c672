"""The effect judge: a small CNN that names the effect turning a source image into a result.

It checks teachers and students by naming the effect in their edits. Label "none" is an unedited
pair (result == source), so an edit that does nothing is never mistaken for an effect.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn
from tqdm import tqdm

from collectionlora.config import JudgeConfig
from collectionlora.effects.base import stable_seed
from collectionlora.effects.catalog import get_effect
from collectionlora.effects.sources import make_sources
from collectionlora.errors import JudgeFileError
from collectionlora.images import quantize
from collectionlora.lorafile import atomic_write, atomic_write_text, save_safetensors

NONE = "none"
WEIGHTS_FILE, META_FILE = "judge.safetensors", "judge.json"
FORMAT = "collectionlora-effect-judge/1"
PREDICT_CHUNK = 512
RIDGE = 1e-3  # ridge weight of the colour fit, per pixel


@dataclass(frozen=True)
class JudgeExamples:
    """Labelled (source, result) pairs; `labels[i]` indexes `names`."""

    sources: Tensor
    results: Tensor
    labels: Tensor
    names: tuple[str, ...]

    def __post_init__(self) -> None:
        _check_pairs(self.sources, self.results)
        if self.labels.shape != (self.sources.shape[0],) or self.labels.dtype != torch.long:
            raise ValueError(f"labels must be a long tensor of shape ({self.sources.shape[0]},)")
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(self.names)):
            raise ValueError("labels index outside names")

    def __len__(self) -> int:
        return self.sources.shape[0]

    def label_names(self) -> list[str]:
        return [self.names[i] for i in self.labels.tolist()]

    def __add__(self, other: JudgeExamples) -> JudgeExamples:
        names = tuple(dict.fromkeys(self.names + other.names))
        index = {name: i for i, name in enumerate(names)}
        remap = [torch.tensor([index[n] for n in e.names], dtype=torch.long) for e in (self, other)]
        return JudgeExamples(
            torch.cat((self.sources, other.sources)),
            torch.cat((self.results, other.results)),
            torch.cat((remap[0][self.labels], remap[1][other.labels])),
            names,
        )


def _check_pairs(sources: Tensor, results: Tensor) -> None:
    if sources.ndim != 4 or sources.shape[1] != 3:
        raise ValueError(f"expected [N, 3, H, W] sources, got {tuple(sources.shape)}")
    if results.shape != sources.shape:
        raise ValueError(f"results {tuple(results.shape)} do not match sources {tuple(sources.shape)}")


def _labelled(groups: Sequence[tuple[str, Tensor, Tensor]]) -> JudgeExamples:
    names = tuple(name for name, _, _ in groups)
    labels = torch.cat([torch.full((len(s),), i, dtype=torch.long) for i, (_, s, _) in enumerate(groups)])
    return JudgeExamples(
        torch.cat([s for _, s, _ in groups]).float(), torch.cat([r for _, _, r in groups]).float(), labels, names
    )


def _unedited(sources: Tensor, count: int) -> tuple[str, Tensor, Tensor]:
    """`count` evenly spaced sources paired with themselves: the "none" class."""
    picks = torch.linspace(0, len(sources) - 1, count).round().long()
    return NONE, sources[picks], sources[picks]


def examples_from_pairs(pairs: dict[str, tuple[Tensor, Tensor]]) -> JudgeExamples:
    """Examples from a bank's own pairs (effect id -> (sources [N], results [N])), plus as many "none" pairs
    as the average effect has, taken from those sources: enough to judge effects outside the catalog."""
    if not pairs:
        raise ValueError("no effect pairs given")
    if NONE in pairs:
        raise ValueError(f"effect id {NONE!r} is reserved for unedited pairs")
    for effect_id, (sources, results) in pairs.items():
        try:
            _check_pairs(sources, results)
        except ValueError as error:
            raise ValueError(f"effect {effect_id}: {error}") from error
    groups = [(effect_id, sources, results) for effect_id, (sources, results) in pairs.items()]
    every_source = torch.cat([sources for sources, _ in pairs.values()])
    return _labelled([*groups, _unedited(every_source, math.ceil(len(every_source) / len(pairs)))])


def procedural_examples(
    effect_ids: Sequence[str], per_effect: int, size: int, seed: int, split: str = "judge"
) -> JudgeExamples:
    """Catalog effects applied to fresh `split` sources (per effect its own sources and effect seed),
    plus `per_effect` "none" pairs. Results are 8-bit quantised like the PNGs of a bank."""
    if per_effect < 1:
        raise ValueError(f"per_effect must be at least 1, got {per_effect}")
    groups = []
    for effect_id in effect_ids:
        effect = get_effect(effect_id)
        sources = make_sources(split, per_effect, size, stable_seed("judge-sources", seed, effect_id))
        results = quantize(effect.apply(sources, stable_seed("judge-effect", seed, effect_id)))
        groups.append((effect_id, sources, results))
    groups.append(_unedited(make_sources(split, per_effect, size, stable_seed("judge-none", seed)), per_effect))
    return _labelled(groups)


def _ridge(inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Batched ridge regression of targets [B, P, T] on inputs [B, P, K]: coefficients [B, K, T], RMS residual [B]."""
    gram = inputs.transpose(1, 2) @ inputs + RIDGE * inputs.shape[1] * torch.eye(inputs.shape[2])
    coefficients = torch.linalg.solve(gram, inputs.transpose(1, 2) @ targets)
    residual = (targets - inputs @ coefficients).pow(2).mean((1, 2)).sqrt()
    return coefficients, residual


def global_fit(sources: Tensor, results: Tensor) -> Tensor:
    """Two per-pair fits over all pixels, as [B, 30] features: result ~ A @ source + b (colour matrices:
    channel swaps, tints, grey, sepia, contrast) and a per-channel cubic tone curve (gamma, solarize),
    each with its RMS residual (large for spatial edits), and the mean and spread of the source's and
    result's chroma (zero for grey). These name global edits directly where
    convolutions would have to estimate them from pixels."""
    s = sources.flatten(2).transpose(1, 2)  # [B, P, 3]
    r = results.flatten(2).transpose(1, 2)
    ones = torch.ones_like(s[..., :1])
    matrix, matrix_residual = _ridge(torch.cat((s, ones), -1), r)
    channels = s.transpose(1, 2).reshape(-1, s.shape[1], 1)  # [B * 3, P, 1]
    powers = torch.cat((torch.ones_like(channels), channels, channels**2, channels**3), -1)
    curve, curve_residual = _ridge(powers, r.transpose(1, 2).reshape(-1, r.shape[1], 1))
    curve_residual = curve_residual.view(-1, 3).pow(2).mean(1).sqrt()
    chroma = [(x.amax(1) - x.amin(1)).flatten(1) for x in (sources, results)]  # grey pixels have none
    return torch.cat(
        (
            matrix.flatten(1),
            curve.view(-1, 12),
            10 * matrix_residual[:, None],
            10 * curve_residual[:, None],
            *(torch.stack((c.mean(1), c.std(1)), 1) for c in chroma),
        ),
        1,
    )


class JudgeNet(nn.Module):
    """Conv stack over (source, result, result - source), pooled to a 4x4 map so position still counts
    (frames, letterboxes, corner badges), joined by the global fits before the classifier head."""

    IN_CHANNELS = 9
    FIT_FEATURES = 30

    def __init__(self, width: int, n_labels: int) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        w = width
        self.features = nn.Sequential(
            *block(self.IN_CHANNELS, w), *block(w, w), nn.MaxPool2d(2),
            *block(w, 2 * w), *block(2 * w, 2 * w), nn.MaxPool2d(2),
            *block(2 * w, 4 * w), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
        )  # fmt: skip
        self.fit = nn.Sequential(nn.Linear(self.FIT_FEATURES, 4 * w), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(4 * w * 17, 4 * w), nn.ReLU(), nn.Linear(4 * w, n_labels))

    def forward(self, sources: Tensor, results: Tensor) -> Tensor:
        inputs = torch.cat((sources * 2 - 1, results * 2 - 1, (results - sources) * 2), dim=1)
        joined = torch.cat((self.features(inputs), self.fit(global_fit(sources, results))), dim=1)
        return self.head(joined)


class EffectJudge:
    """A trained JudgeNet with its label names."""

    def __init__(self, net: JudgeNet, labels: Sequence[str], width: int) -> None:
        self.net = net.eval()
        self.labels = list(labels)
        self.width = width

    @torch.no_grad()
    def predict_proba(self, sources: Tensor, results: Tensor) -> Tensor:
        """Class probabilities [B, len(labels)] for each (source, result) pair."""
        _check_pairs(sources, results)
        chunks = [
            self.net(sources[i : i + PREDICT_CHUNK].float(), results[i : i + PREDICT_CHUNK].float()).softmax(-1)
            for i in range(0, len(sources), PREDICT_CHUNK)
        ]
        return torch.cat(chunks)

    def predict(self, sources: Tensor, results: Tensor) -> list[str]:
        return [self.labels[i] for i in self.predict_proba(sources, results).argmax(-1).tolist()]

    def save(self, directory: Path | str) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self.net.state_dict().items()}
        atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_safetensors(state, tmp))
        meta = {"format": FORMAT, "labels": self.labels, "architecture": {"width": self.width}}
        atomic_write_text(directory / META_FILE, json.dumps(meta, indent=2) + "\n")  # last: the judge is complete

    @classmethod
    def load(cls, directory: Path | str) -> EffectJudge:
        directory = Path(directory)
        meta_path, weights_path = directory / META_FILE, directory / WEIGHTS_FILE
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise JudgeFileError(f"{meta_path}: cannot read judge metadata ({error})") from error
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise JudgeFileError(f"{meta_path}: not an effect judge (expected format {FORMAT!r})")
        architecture = meta.get("architecture")
        labels = meta.get("labels")
        width = architecture.get("width") if isinstance(architecture, dict) else None
        if not isinstance(labels, list) or not labels or not all(isinstance(n, str) for n in labels):
            raise JudgeFileError(f"{meta_path}: labels must be a non-empty list of strings")
        if not isinstance(width, int) or width < 1:
            raise JudgeFileError(f"{meta_path}: architecture.width must be a positive integer")
        try:
            state = load_file(str(weights_path))
        except (OSError, SafetensorError) as error:
            raise JudgeFileError(f"{weights_path}: cannot read judge weights ({error})") from error
        net = JudgeNet(width, len(labels))
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise JudgeFileError(f"{weights_path}: weights do not fit the judge architecture ({error})") from error
        return cls(net, labels, width)


def train_judge(examples: JudgeExamples, config: JudgeConfig, labels: Sequence[str]) -> EffectJudge:
    """Train a judge on `examples` whose outputs are `labels` (each must have examples). Deterministic on
    CPU for a given config.seed: own generators, and the global RNG is restored afterwards."""
    labels = list(labels)
    missing = sorted(set(examples.names) - set(labels))
    if missing:
        raise ValueError(f"examples carry labels {missing} that are not among the judge's labels")
    index = torch.tensor([labels.index(n) for n in examples.names], dtype=torch.long)
    targets = index[examples.labels]
    empty = [name for i, name in enumerate(labels) if not (targets == i).any()]
    if empty:
        raise ValueError(f"judge labels {empty} have no examples")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        net = JudgeNet(config.width, len(labels))
    order = torch.Generator().manual_seed(stable_seed("judge-batches", config.seed))
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=config.steps)
    loss_fn = nn.CrossEntropyLoss()
    net.train()
    batches = _batches(len(examples), config.batch_size, order)
    with tqdm(range(config.steps), desc="judge", unit="step", leave=None) as progress:  # None: kept unless nested
        for _ in progress:
            batch = next(batches)
            loss = loss_fn(net(examples.sources[batch], examples.results[batch]), targets[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            progress.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return EffectJudge(net, labels, config.width)


def _batches(count: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Endless shuffled epochs of example indices, cut into batches of `batch_size` (wrapping epochs)."""
    pending = torch.empty(0, dtype=torch.long)
    while True:
        while len(pending) < batch_size:
            pending = torch.cat((pending, torch.randperm(count, generator=generator)))
        yield pending[:batch_size]
        pending = pending[batch_size:]


def judge_accuracy(judge: EffectJudge, sources: Tensor, results: Tensor, labels: Sequence[str]) -> float:
    """Share of pairs whose predicted label equals the true one."""
    predictions = judge.predict(sources, results)
    if len(predictions) != len(labels):
        raise ValueError(f"{len(labels)} labels for {len(predictions)} pairs")
    return sum(p == t for p, t in zip(predictions, labels)) / len(labels)


def per_label_accuracy(judge: EffectJudge, sources: Tensor, results: Tensor, labels: Sequence[str]) -> dict[str, float]:
    """Accuracy per true label, in order of first appearance."""
    predictions = judge.predict(sources, results)
    if len(predictions) != len(labels):
        raise ValueError(f"{len(labels)} labels for {len(predictions)} pairs")
    hits: dict[str, list[bool]] = {}
    for predicted, truth in zip(predictions, labels):
        hits.setdefault(truth, []).append(predicted == truth)
    return {label: sum(h) / len(h) for label, h in hits.items()}


def holdout_report(judge: EffectJudge, effect_ids: Sequence[str], per_effect: int, size: int, seed: int) -> dict:
    """Accuracy on fresh ground truth from the eval split (disjoint from the judge's training sources)."""
    examples = procedural_examples(effect_ids, per_effect, size, stable_seed("judge-holdout", seed), split="eval")
    truth = examples.label_names()
    per_label = per_label_accuracy(judge, examples.sources, examples.results, truth)
    return {
        "accuracy": judge_accuracy(judge, examples.sources, examples.results, truth),
        "examples": len(truth),
        "below_95": {label: acc for label, acc in per_label.items() if acc < 0.95},
        "per_label": per_label,
    }
