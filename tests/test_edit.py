"""`collectionlora edit` on a tiny real workflow: any LoRA of the bank (a teacher, the acceleration LoRA,
a cascade, a baseline file) gives exactly what the evaluation scores for it, a collection edits from any
working directory, and bad input is one line with nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from collectionlora.adapters import AdapterSet
from collectionlora.bank import open_bank
from collectionlora.cli import app
from collectionlora.config import Params, merge
from collectionlora.distill.export import COLLECTION, LORA_WEIGHTS
from collectionlora.distill.prompting import PromptPlan
from collectionlora.evaluate.baselines import FM_ALL_IN_ONE, MERGES
from collectionlora.evaluate.evaluation import edit as evaluate_edit
from collectionlora.evaluate.methods import MethodBuilder
from collectionlora.images import load_image_fitted, load_png, quantize
from collectionlora.models.backbone import Backbone
from collectionlora.sampling import sample_student, student_timesteps

SEED = 3


@pytest.fixture(scope="module")
def setup(tiny_workflow: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The session's tiny workflow, its params as a file, an eval source and every evaluated method."""
    folder = tmp_path_factory.mktemp("edit")
    params: Params = tiny_workflow["params"]
    params_file = folder / "params.yaml"
    params_file.write_text(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
    bank = open_bank(params.bank)
    image = min((tiny_workflow["root"] / "eval").glob("*.png"))
    record = json.loads((tiny_workflow["student"] / COLLECTION).read_text())
    families = {"evaluate": {"methods": ["teacher", "cascade", "fm_all_in_one", "merges"]}}
    evaluated = Params.model_validate(merge(params.model_dump(mode="json"), families))
    backbone = Backbone.load(params.base, bank.base_dir)
    builder = MethodBuilder(evaluated, bank, backbone, tiny_workflow["student"], PromptPlan.from_json(record["prompts"]), tiny_workflow["baselines"])
    source = load_image_fitted(image, params.base.resolution)
    methods = {method.name: method for method in builder.build()}

    def evaluated_edit(name: str, effect: str) -> torch.Tensor:
        """What `evaluate` computes for this method, effect, source and seed (as its PNG would hold it)."""
        return quantize(evaluate_edit(methods[name], effect, source[None], [SEED], params.sampling)[0])

    yield {
        "params": params, "params_file": params_file, "bank": bank, "image": image, "record": record, "backbone": backbone,
        "source": source, "evaluated_edit": evaluated_edit, "effects": [e.id for e in bank.effects], "workflow": tiny_workflow,
    }
    builder.close()


def edit(setup: dict, out: Path, *args: str) -> torch.Tensor:
    """Run the real command; returns the PNG it wrote."""
    result = CliRunner().invoke(app, ["edit", "--params", str(setup["params_file"]), "--image", str(setup["image"]), "--out", str(out), *args])
    assert result.exit_code == 0, result.output
    return load_png(out, setup["params"].base.resolution)


def test_a_teacher_is_sampled_as_the_evaluation_samples_it(setup, tmp_path):
    """Teacher prompt, sampling.teacher_steps Euler steps with CFG: the `teacher` method's edit, exactly."""
    for effect in setup["effects"]:
        edited = edit(setup, tmp_path / f"{effect}.png", "--lora", "teacher", "--effect", effect, "--seed", str(SEED))
        assert torch.equal(edited, setup["evaluated_edit"]("teacher", effect)), effect
    assert not torch.equal(edited, quantize(setup["source"]))
    fewer = edit(setup, tmp_path / "fewer.png", "--lora", "teacher", "--effect", effect, "--seed", str(SEED), "--steps", "2")
    assert not torch.equal(fewer, edited)


def test_a_teacher_trained_into_a_folder_is_tried_by_its_path(setup, tmp_path):
    """`teachers train --out DIR` writes DIR/pytorch_lora_weights.safetensors: DIR works as --lora."""
    effect = setup["bank"].effects[0]
    by_path = edit(setup, tmp_path / "path.png", "--lora", str(effect.teacher.parent), "--effect", effect.id, "--seed", str(SEED))
    assert torch.equal(by_path, setup["evaluated_edit"]("teacher", effect.id))


def test_accelerate_stacks_the_acceleration_lora_as_the_cascade_and_baselines_do(setup, tmp_path):
    effect = setup["effects"][0]
    common = ["--effect", effect, "--seed", str(SEED), "--accelerate"]
    cascade = edit(setup, tmp_path / "cascade.png", "--lora", "teacher", *common)
    assert torch.equal(cascade, setup["evaluated_edit"]("cascade", effect))
    baselines = setup["workflow"]["baselines"]
    for merge_method in setup["params"].baselines.merges.methods:
        merged = edit(setup, tmp_path / f"{merge_method}.png", "--lora", str(baselines / MERGES / merge_method / LORA_WEIGHTS), *common)
        assert torch.equal(merged, setup["evaluated_edit"](f"merge_{merge_method}", effect)), merge_method
    student_prompt = PromptPlan.from_json(setup["record"]["prompts"]).student(effect)  # FM all-in-1 learnt the student prompts
    fm = edit(setup, tmp_path / "fm.png", "--lora", str(baselines / FM_ALL_IN_ONE), "--prompt", student_prompt, *common[2:])
    assert torch.equal(fm, setup["evaluated_edit"](FM_ALL_IN_ONE, effect))


def test_the_acceleration_lora_alone_samples_in_few_steps(setup, tmp_path):
    params, bank, effect = setup["params"], setup["bank"], setup["bank"].effects[0]
    edited = edit(setup, tmp_path / "acc.png", "--lora", "acceleration", "--effect", effect.id, "--seed", str(SEED))
    backbone = Backbone.load(params.base, bank.base_dir)
    adapters = AdapterSet(backbone.transformer)
    adapters.add_teacher("acceleration", bank.acceleration)
    adapters.activate("acceleration")
    for steps in (None, 1):
        expected = sample_student(backbone, setup["source"][None], [effect.prompt], [SEED], student_timesteps(params.sampling, steps))
        if steps is None:
            assert torch.equal(edited, quantize(expected.images[0]))
        else:
            one = edit(setup, tmp_path / "acc1.png", "--lora", "acceleration", "--effect", effect.id, "--seed", str(SEED), "--steps", "1")
            assert torch.equal(one, quantize(expected.images[0])) and not torch.equal(one, edited)


def test_a_collection_edits_from_any_working_directory(setup, tmp_path, monkeypatch):
    """collection.json records the base relative to itself: no path of this machine, and `edit` finds
    the base wherever it is run from."""
    student = setup["workflow"]["student"]
    recorded = setup["record"]["base"]["path"]
    assert not Path(recorded).is_absolute()
    assert (student / recorded).resolve() == setup["bank"].base_dir.resolve()
    at_root = edit(setup, tmp_path / "root.png", "--collection", str(student), "--effect", setup["effects"][0])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert torch.equal(edit(setup, tmp_path / "away.png", "--collection", str(student), "--effect", setup["effects"][0]), at_root)


def test_a_collection_moved_away_from_its_base_says_to_pass_base(setup, tmp_path):
    moved = tmp_path / "deep" / "moved"
    shutil.copytree(setup["workflow"]["student"], moved, ignore=shutil.ignore_patterns("checkpoints"))
    args = ["edit", "--params", str(setup["params_file"]), "--collection", str(moved), "--effect", setup["effects"][0], "--image", str(setup["image"])]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "x.png")])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert f"{moved / COLLECTION}: base.path:" in result.output and "pass --base" in result.output
    assert not (tmp_path / "x.png").exists()
    fixed = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "y.png"), "--base", str(setup["bank"].base_dir)])
    assert fixed.exit_code == 0, fixed.output


BAD = {
    # name -> (arguments, what the one line says)
    "unknown effect": (["--lora", "teacher", "--effect", "nope"], "bank-3.yaml: effects: no effect with id 'nope'"),
    "teacher without effect": (["--lora", "teacher", "--prompt", "make it blue"], "--lora teacher needs --effect"),
    "no effect nor prompt": (["--lora", "acceleration"], "give --effect (an effect id) or --prompt"),
    "effect and prompt": (["--effect", "{effect}", "--prompt", "make it blue"], "give --effect or --prompt, not both"),
    "missing file": (["--lora", "{tmp}/none.safetensors", "--effect", "{effect}"], "{tmp}/none.safetensors: no such LoRA file"),
    "not safetensors": (["--lora", "{image}", "--effect", "{effect}"], "{image}: not a valid safetensors file"),
    "pickle": (["--lora", "{tmp}/teacher.bin", "--effect", "{effect}"], "{tmp}/teacher.bin: pickle files are refused"),
    "then with a teacher": (["--lora", "teacher", "--effect", "{effect}", "--then", "{effect}"], "--then composes two of the collection's effects"),
    "accelerate the student": (["--effect", "{effect}", "--accelerate"], "the student samples in few steps by itself"),
    "accelerate acceleration": (["--lora", "acceleration", "--effect", "{effect}", "--accelerate"], "--lora acceleration applies it alone"),
    "unknown sampler": (["--lora", "teacher", "--effect", "{effect}", "--sampler", "fast"], "--sampler: 'fast' is neither"),
    "unreadable image": (["--lora", "teacher", "--effect", "{effect}", "--image", "{tmp}/teacher.bin"], "{tmp}/teacher.bin: unreadable image"),
    "output is a folder": (["--lora", "teacher", "--effect", "{effect}", "--out", "{tmp}"], "{tmp}: is a folder"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_naming_the_file_or_field_and_writes_nothing(setup, tmp_path, case):
    (tmp_path / "teacher.bin").write_bytes(b"\x80\x04not a LoRA")
    names = {"tmp": str(tmp_path), "image": str(setup["image"]), "effect": setup["effects"][0]}
    arguments, expected = BAD[case]
    args = ["edit", "--params", str(setup["params_file"]), "--collection", str(setup["workflow"]["student"])]
    args += ["--image", str(setup["image"]), "--out", str(tmp_path / "out.png")] + [a.format(**names) for a in arguments]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    assert len(result.output.strip().splitlines()) == 1 and expected.format(**names) in result.output, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["teacher.bin"]


def test_a_bank_without_acceleration_cannot_accelerate(setup, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(setup["workflow"]["root"], root)
    manifest_name = setup["params"].bank.manifest.name
    manifest = yaml.safe_load((root / manifest_name).read_text())
    del manifest["acceleration"]
    (root / manifest_name).write_text(yaml.safe_dump(manifest, sort_keys=False))
    raw = merge(setup["params"].model_dump(mode="json"), {"bank": {"root": str(root), "manifest": str(root / manifest_name)}})
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(raw))
    for lora, more in (("teacher", ["--accelerate"]), ("acceleration", [])):
        args = ["edit", "--params", str(params_file), "--image", str(setup["image"]), "--out", str(tmp_path / "x.png"), "--lora", lora]
        result = CliRunner().invoke(app, [*args, "--effect", setup["effects"][0], *more])
        assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
        assert f"{manifest_name}: acceleration: the bank has no acceleration LoRA" in result.output
        assert not (tmp_path / "x.png").exists()
