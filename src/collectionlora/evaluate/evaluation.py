"""Run every method on the same cases and score each (method, effect) with the offline metrics.

A case is (effect, eval source, seed): deterministic effects use one seed, stochastic ones
`evaluate.stochastic_seeds`, and every method sees the same seeds. The teachers run first: their
outputs are the reference for PSNR/SSIM (deterministic effects) and the Frechet distance (stochastic).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor
from tqdm.auto import tqdm

from collectionlora.adapters import NONE
from collectionlora.bank import Bank
from collectionlora.config import EvaluateConfig, SamplingConfig
from collectionlora.effects import catalog
from collectionlora.effects.base import stable_seed
from collectionlora.evaluate import metrics
from collectionlora.evaluate.fidelity import psnr
from collectionlora.evaluate.judge import EffectJudge
from collectionlora.evaluate.methods import Method
from collectionlora.evaluate.plugins import EvalPlugins, JudgeCase, summarize
from collectionlora.sampling import sample_student, sample_teacher


@dataclass
class Cases:
    """Eval sources and, per effect, the seeds each source is edited with."""

    sources: Tensor
    seeds: dict[str, list[int]]

    def rows(self, effect: str) -> tuple[Tensor, list[int]]:
        """Sources repeated once per seed (seed-major) and the per-row sampler seeds."""
        count = len(self.sources)
        seeds = self.seeds[effect]
        per_row = [stable_seed("evaluate", effect, s, i) for s in seeds for i in range(count)]
        return self.sources.repeat(len(seeds), 1, 1, 1), per_row


def make_cases(bank: Bank, config: EvaluateConfig) -> Cases:
    sources = bank.load_eval_sources()
    if config.eval_images is not None:
        sources = sources[: config.eval_images]
    known = catalog()
    seeds = {}
    for effect in bank.effects:
        stochastic = effect.id in known and known[effect.id].stochastic
        seeds[effect.id] = [config.seed + s for s in range(config.stochastic_seeds if stochastic else 1)]
    return Cases(sources, seeds)


@dataclass
class MethodResult:
    """A method's scores: per effect, their mean over effects, its bleeding matrix and its cost."""

    name: str
    label: str
    nfe: int
    per_effect: dict[str, dict[str, float]]
    summary: dict[str, float]
    bleeding: metrics.BleedingMatrix
    cost: dict[str, float]
    samples: dict[str, Tensor] = field(default_factory=dict)  # effect -> the first sources' seed-0 edits


def structure_threshold(bank: Bank, quantile: float) -> float:
    """BCR's structure-lost threshold, calibrated on the bank's own ground-truth pairs (every effect pooled)."""
    return metrics.calibrate_structure_threshold({e.id: bank.load_pairs(e) for e in bank.effects}, quantile)


def edit(method: Method, effect: str, sources: Tensor, seeds: list[int], sampling: SamplingConfig) -> Tensor:
    """The method's edits of `sources` for `effect` (images in [0, 1])."""
    adapter = method.adapters[effect]
    if method.adapter_set is not None:
        method.adapter_set.activate(adapter if adapter is not None else NONE)
    prompts = [method.prompts[effect]] * len(sources)
    if method.timesteps is None:
        return sample_teacher(method.backbone, sources, prompts, seeds, sampling).images
    return sample_student(method.backbone, sources, prompts, seeds, method.timesteps).images


class Evaluator:
    """Scores methods one after another against the teachers' outputs (the first method must be `teacher`
    when any later method compares to it)."""

    def __init__(
        self, bank: Bank, judge: EffectJudge, cases: Cases, threshold: float, plugins: EvalPlugins, config: EvaluateConfig, sampling: SamplingConfig
    ):
        self.bank, self.judge, self.cases, self.threshold, self.plugins = bank, judge, cases, threshold, plugins
        self.config, self.sampling = config, sampling
        self.effects = [e.id for e in bank.effects]
        self.reference: dict[str, Tensor] = {}
        known = catalog()
        self.truth = {
            e: known[e].apply(cases.sources, 0) for e in self.effects if e in known and not known[e].stochastic
        }
        self.templates = {e.id: tuple(t[0] for t in bank.load_pairs(e)) for e in bank.effects} if plugins.judge else {}

    def run(self, method: Method, done: dict[str, tuple[Tensor, float]] | None = None) -> MethodResult:
        """`done`: the method's edits per effect with their seconds, made elsewhere (parallel.py)."""
        per_effect, requested, judged, samples = {}, [], [], {}
        seconds, edits = 0.0, 0
        for effect in tqdm(self.effects, desc=method.name, leave=None, disable=done is not None):  # None: kept unless nested
            sources, seeds = self.cases.rows(effect)
            if done is None:
                started = time.perf_counter()
                images = edit(method, effect, sources, seeds, self.sampling)
                seconds += time.perf_counter() - started
            else:
                images, took = done[effect]
                seconds += took
            edits += len(images)
            if method.name == "teacher":
                self.reference[effect] = images
            verdicts, row = self._score(method, effect, sources, images)
            per_effect[effect] = row
            requested += [effect] * len(verdicts)
            judged += verdicts
            samples[effect] = images[: self.config.samples_per_effect]
        bleeding = metrics.bleeding_matrix(requested, judged, self.judge.labels)
        summary = _means(per_effect)
        summary["bleed_rate"] = metrics.off_diagonal_bleed(bleeding)
        cost = {"nfe": float(method.nfe), "seconds_per_edit_batched": seconds / edits, "stored_bytes": float(method.stored_bytes)}
        cost.update(adapter_traffic(method, self.effects, self.config.cost_requests, self.config.seed))
        cost.update(method.notes)
        return MethodResult(method.name, method.label, method.nfe, per_effect, summary, bleeding, cost, samples)

    def _score(self, method: Method, effect: str, sources: Tensor, images: Tensor) -> tuple[list[str], dict[str, float]]:
        probabilities = self.judge.predict_proba(sources, images)
        verdicts = [self.judge.labels[i] for i in probabilities.argmax(-1).tolist()]
        style = metrics.style_alignment(probabilities, self.judge.labels, effect)
        structure = metrics.structure_similarity(sources, images)
        row = {
            "judge_accuracy": style["verdict_accuracy"],
            "style_alignment": style["requested_probability"],
            "bcr": metrics.bad_case_rate(verdicts, effect, structure, self.threshold),
            "structure_kept": float(structure.mean()),
            "subject_consistency": float(metrics.subject_consistency(sources, images).mean()),
        }
        seeds = len(self.cases.seeds[effect])
        if effect in self.truth:
            truth = self.truth[effect].repeat(seeds, 1, 1, 1)
            row["psnr_truth_db"] = float(psnr(images, truth).mean())
            row["ssim_truth"] = float(metrics.ssim(images, truth).mean())
        reference = self.reference.get(effect)
        if method.name != "teacher" and reference is not None:
            if effect in self.truth:
                row["psnr_teacher_db"] = float(psnr(images, reference).mean())
                row["ssim_teacher"] = float(metrics.ssim(images, reference).mean())
            else:
                ours = metrics.judge_features(self.judge, sources, images)
                theirs = metrics.judge_features(self.judge, sources, reference)
                row["fd_teacher"] = metrics.frechet_distance(ours, theirs)
        if seeds > 1:
            row["diversity"] = metrics.diversity(images.reshape(seeds, -1, *images.shape[1:]))
        row.update(self._plugin_scores(method, effect, sources, images, reference))
        return verdicts, row

    def _plugin_scores(self, method: Method, effect: str, sources: Tensor, images: Tensor, reference: Tensor | None) -> dict[str, float]:
        plugins, row = self.plugins, {}
        if plugins.clip is not None and reference is not None and method.name != "teacher":
            row["clip_teacher"] = float(plugins.clip(images, reference).mean())
        if plugins.dino is not None:
            row["dino_source"] = float(plugins.dino(images, sources).mean())
        if plugins.judge is not None:
            spec = self.bank.effect(effect)
            template_source, template_result = self.templates[effect]
            verdicts = [
                plugins.judge.judge(JudgeCase(f"{method.name}/{effect}/{i}", spec.prompt, spec.criteria, template_source, template_result, s, r))
                for i, (s, r) in enumerate(zip(sources, images))
            ]
            scores = summarize(verdicts)
            row["mllm_bcr"], row["mllm_vsa"] = scores["bcr"], scores["vsa"]
        return row


def adapter_traffic(method: Method, effects: list[str], requests: int, seed: int) -> dict[str, float]:
    """Adapter loads (weights copied in) and switches per request over a seeded stream of requests for
    random effects, served by the method's own adapters from a cold start (the base alone active)."""
    generator = torch.Generator().manual_seed(stable_seed("requests", seed))
    stream = [effects[i] for i in torch.randint(len(effects), (requests,), generator=generator).tolist()]
    adapters = method.adapter_set
    if adapters is None:
        return {"adapter_loads_per_request": 0.0, "adapter_switches_per_request": 0.0}
    adapters.activate(NONE)
    adapters.evict_teachers()  # cold: whatever an earlier edit left in a slot must be loaded again
    loads, switches = adapters.loads, adapters.switches
    for effect in stream:
        adapters.activate(method.adapters[effect] or NONE)
    return {
        "adapter_loads_per_request": (adapters.loads - loads) / requests,
        "adapter_switches_per_request": (adapters.switches - switches) / requests,
    }


def _means(per_effect: dict[str, dict[str, float]]) -> dict[str, float]:
    """Each metric's mean over the effects that have it (every effect weighs the same)."""
    keys = dict.fromkeys(k for row in per_effect.values() for k in row)
    return {k: sum(r[k] for r in per_effect.values() if k in r) / sum(k in r for r in per_effect.values()) for k in keys}
