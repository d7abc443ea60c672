"""The evaluation's edits on several processes, one effect at a time per process.

Why: evaluation is thousands of tiny-batch sampler forwards, and on a CPU such shapes use a second
thread poorly; two processes of one thread each finish sooner than one process of two (the same
reason `distill.processes` exists, without the gradient exchange that eats the gain there).

Each worker builds every method once (as the one-process evaluation does), then edits the effects it
is handed; the main process scores. An edit depends only on its effect, sources and per-row seeds, so
the images are those of the one-process evaluation up to the float rounding of the thread count.
"""

from __future__ import annotations

import multiprocessing
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from torch import Tensor
from tqdm.auto import tqdm

from collectionlora.bank import Bank, open_bank
from collectionlora.config import Params
from collectionlora.distill.prompting import PromptPlan
from collectionlora.evaluate.evaluation import Cases, edit, make_cases
from collectionlora.evaluate.methods import Method, MethodBuilder
from collectionlora.models.backbone import Backbone

Edits = dict[str, dict[str, tuple[Tensor, float]]]  # method -> effect -> (images, seconds)

# One worker process's methods, built once; the builder stays referenced: its folder holds their files.
_worker: tuple[Params, Cases, MethodBuilder, list[Method]] | None = None


def worker_params(params: Params) -> Params:
    """A worker's params: `base.threads` shared out among `evaluate.processes`."""
    threads = max(1, params.base.threads // params.evaluate.processes)
    return params.model_copy(update={"base": params.base.model_copy(update={"threads": threads})})


def parallel_edits(params: Params, bank: Bank, collection: Path, plan: PromptPlan, baselines: Path | None) -> Edits:
    """Every method's edits of every effect, computed by `evaluate.processes` worker processes."""
    effects = [e.id for e in bank.effects]
    edits: Edits = {}
    with tempfile.TemporaryDirectory(prefix="collectionlora-eval-workers-") as scratch:
        with ProcessPoolExecutor(
            max_workers=min(params.evaluate.processes, len(effects)),
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_worker,
            initargs=(worker_params(params), Path(collection), plan, baselines, scratch),
        ) as pool:
            futures = [pool.submit(_edit_effect, effect) for effect in _costliest_first(effects, make_cases(bank, params.evaluate))]
            for future in tqdm(as_completed(futures), total=len(futures), desc="evaluate", unit="effect", leave=None):
                for method, (effect, images, seconds) in future.result().items():
                    edits.setdefault(method, {})[effect] = (images, seconds)
    return edits


def _costliest_first(effects: list[str], cases: Cases) -> list[str]:
    """Stochastic effects have several seeds per source: handing them out first evens the workers' load."""
    return sorted(effects, key=lambda effect: -len(cases.seeds[effect]))


def _start_worker(params: Params, collection: Path, plan: PromptPlan, baselines: Path | None, scratch: str) -> None:
    global _worker
    tempfile.tempdir = scratch  # the methods' stacked LoRA files: removed with the main process's folder
    bank = open_bank(params.bank)
    backbone = Backbone.load(params.base, bank.base_dir)
    builder = MethodBuilder(params, bank, backbone, collection, plan, baselines)
    _worker = (params, make_cases(bank, params.evaluate), builder, builder.build())


def _edit_effect(effect: str) -> dict[str, tuple[str, Tensor, float]]:
    if _worker is None:
        raise RuntimeError("evaluation worker used before its initializer ran")
    params, cases, _, methods = _worker
    sources, seeds = cases.rows(effect)
    out = {}
    for method in methods:
        started = time.perf_counter()
        images = edit(method, effect, sources, seeds, params.sampling)
        out[method.name] = (effect, images, time.perf_counter() - started)
    return out
