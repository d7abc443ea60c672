"""Progress bars a user watches: distill shows its anchor phase and its iterations as two bars (their steps
cost differently, so one bar's time estimate would be wrong), rollout counts the targets it samples, and a
finished stage's bar stays on screen while a bar nested in another one does not pile up."""

from __future__ import annotations

import re
import shutil

import torch
from tqdm.auto import tqdm

from collectionlora.adapters import AdapterSet
from collectionlora.bank import open_bank
from collectionlora.config import Params, merge
from collectionlora.effects import catalog, make_sources
from collectionlora.evaluate.judge import NONE, procedural_examples, train_judge
from collectionlora.stages import run_distill, run_rollout
from collectionlora.teachers import train_teacher


def finished(stderr: str, name: str) -> list[str]:
    """What the bars called `name` left on screen when they closed: their last state, then a newline."""
    return re.findall(rf"(?:^|\r){re.escape(name)}: (100%[^\r\n]*)\n", stderr)


def test_distill_shows_the_anchor_phase_and_the_iterations_as_two_bars(tiny_workflow, tmp_path, capsys):
    sections = {"distill": {"anchor_steps": 3, "max_steps": 2}, "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}}
    params = Params.model_validate(merge(tiny_workflow["params"].model_dump(mode="json"), sections))
    summary = run_distill(params, tiny_workflow["rollouts"], tmp_path / "student")
    assert (summary["steps"], summary["anchor_updates"]) == (5, 3)
    stderr = capsys.readouterr().err
    anchor, iterations = finished(stderr, "distill anchor"), finished(stderr, "distill")
    assert len(anchor) == 1 and " 3/3 " in anchor[0], stderr
    assert len(iterations) == 1 and " 2/2 " in iterations[0], stderr


def test_rollout_counts_the_targets_it_samples_on_one_bar(tiny_workflow, tmp_path, capsys):
    """Cached targets take no time: the bar counts (and estimates) only the ones still to sample."""
    out = tmp_path / "rollouts"
    shutil.copytree(tiny_workflow["rollouts"], out)
    first = open_bank(tiny_workflow["params"].bank).effects[0].id
    shutil.rmtree(out / first)
    report = run_rollout(tiny_workflow["params"], out, None)
    computed = report["totals"]["computed"]
    assert computed == report["effects"][first]["computed"] > 0 and report["totals"]["cached"] > 0
    bars = finished(capsys.readouterr().err, "rollout")
    assert len(bars) == 1 and f" {computed}/{computed} " in bars[0], bars


def test_a_finished_stage_bar_stays_on_screen_and_a_nested_one_does_not(tiny_params, backbone, capsys):
    effects = list(catalog())[:2]
    judge = tiny_params.judge.model_copy(update={"steps": 3})
    train_judge(procedural_examples(effects, 2, tiny_params.base.resolution, 0), judge, [NONE, *effects])
    sources = make_sources("train", 2, tiny_params.base.resolution, 0)
    lora = tiny_params.lora.model_copy(update={"steps": 2, "batch_size": 2})
    adapters = AdapterSet(backbone.transformer)
    train_teacher(backbone, adapters, sources, torch.flip(sources, [-1]), "mirror it", lora, tiny_params.sampling, "teacher")
    stderr = capsys.readouterr().err
    assert len(finished(stderr, "judge")) == 1 and len(finished(stderr, "teacher")) == 1, stderr
    with tqdm(range(1), desc="demo-bank teachers") as outer:  # as the demo bank trains its teachers
        for _ in outer:
            train_teacher(backbone, adapters, sources, sources, "keep it", lora, tiny_params.sampling, "nested teacher")
    stderr = capsys.readouterr().err
    assert len(finished(stderr, "demo-bank teachers")) == 1 and not finished(stderr, "nested teacher"), stderr
