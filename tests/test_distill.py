"""The distill stage on a tiny real bank: streams, loss terms, export that stock diffusers loads,
MLflow logging, the NaN guard, incremental add, and the edit command."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from conftest import params_for_bank
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from collectionlora.cli import app
from collectionlora.distill.checkpoint import list_checkpoints, load_checkpoint
from collectionlora.distill.export import ANCHOR, ANCHOR_RECORD, COLLECTION, KOHYA_WEIGHTS, LORA_WEIGHTS
from collectionlora.distill.trainer import TrainingDiverged
from collectionlora.errors import ConfigError
from collectionlora.stages import run_baselines, run_distill, run_rollout


@pytest.fixture(scope="module")
def rolled(tiny_bank: Path, tiny_params, tmp_path_factory) -> tuple[Path, Path]:
    """A private copy of the tiny bank with rollouts for all 3 effects: (bank root, rollouts)."""
    root = tmp_path_factory.mktemp("distill") / "data"
    shutil.copytree(tiny_bank, root)
    rollouts = root.parent / "rollouts"
    run_rollout(params_for_bank(tiny_params, root, "bank-3.yaml"), rollouts, None)
    return root, rollouts


def _params(tiny_params, root: Path, tmp_path: Path, manifest: str = "bank.yaml", **distill):
    return params_for_bank(
        tiny_params, root, manifest, distill=distill, tracking={"uri": f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"}
    )


@pytest.fixture(scope="module")
def trained(rolled, tiny_params, tmp_path_factory) -> tuple[Path, dict]:
    """One default tiny run on the 2-effect bank."""
    root, rollouts = rolled
    tmp = tmp_path_factory.mktemp("trained")
    summary = run_distill(_params(tiny_params, root, tmp), rollouts, tmp / "student")
    return tmp / "student", summary


def test_run_uses_both_streams_every_term_and_logs_them(trained):
    out, summary = trained
    assert summary["steps"] == 10 and summary["critic_updates"] == 10 and summary["generator_updates"] == 2
    assert summary["effect_steps"] + summary["general_steps"] == 10
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [2, 4, 6, 8, 10]
    names = set().union(*history)
    assert {"loss_critic_fm", "loss_dmd_bs", "time_forward_s", "time_backward_s", "effect_steps"} <= names
    assert summary["time_forward_s"] > 0 and summary["time_backward_s"] > 0
    assert summary["time_forward_s"] + summary["time_backward_s"] <= summary["time_total_s"]
    assert json.loads((out / "metrics.json").read_text())["steps"] == 10


def test_mlflow_run_holds_params_and_per_term_losses(trained, tiny_params, tmp_path):
    import mlflow

    out, _ = trained
    database = out.parent / "mlflow" / "mlflow.db"
    client = mlflow.MlflowClient(f"sqlite:///{database}")
    experiment = client.get_experiment_by_name("collectionlora")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["distill.p_switch"] == str(tiny_params.distill.p_switch)
    assert run.data.params["distill.effects_per_batch"] == str(tiny_params.distill.effects_per_batch)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss_critic_fm")] == [2, 4, 6, 8, 10]


def test_effect_steps_use_all_three_generator_terms(rolled, tiny_params, tmp_path):
    root, rollouts = rolled
    params = _params(tiny_params, root, tmp_path, pdsr=False, max_steps=2, generator_every=1, checkpoint_every=2, log_every=1)
    run_distill(params, rollouts, tmp_path / "student")
    history = [json.loads(line) for line in (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()]
    assert all({"loss_dmd_bs", "loss_dmd_ts", "loss_ta_fm"} <= set(h) for h in history)
    assert all(h["general_steps"] == 0 for h in history)


@pytest.mark.parametrize("groups", [1, 2])
def test_an_effect_step_loads_one_teacher_per_effect_group(rolled, tiny_params, tmp_path, groups):
    root, rollouts = rolled
    params = _params(tiny_params, root, tmp_path, pdsr=False, max_steps=1, generator_every=1, effects_per_batch=groups)
    summary = run_distill(params, rollouts, tmp_path / "student")
    assert summary["effect_steps"] == 1 and summary["teacher_loads"] == groups


def test_effect_groups_must_fit_the_global_batch(rolled, tiny_params, tmp_path):
    root, rollouts = rolled
    params = _params(tiny_params, root, tmp_path, effects_per_batch=3)
    with pytest.raises(ConfigError, match=r"distill.effects_per_batch: 3 effects do not fit a global batch of 2"):
        run_distill(params, rollouts, tmp_path / "student")
    assert not (tmp_path / "student" / LORA_WEIGHTS).exists()


def test_ta_fm_repeats_add_one_target_copy_per_repeat_to_the_generator_forward(rolled, tiny_params, tmp_path):
    root, rollouts = rolled
    items = {}
    for repeats in (1, 3):
        params = _params(tiny_params, root, tmp_path, pdsr=False, max_steps=1, generator_every=1, ta_fm_repeats=repeats)
        summary = run_distill(params, rollouts, tmp_path / f"student-{repeats}")
        assert summary["last_window"]["loss_ta_fm"] > 0
        items[repeats] = summary["transformer_forward_items"]
    assert items[3] - items[1] == 2 * tiny_params.distill.batch_size


def test_the_anchor_phase_trains_the_student_by_ta_fm_alone_then_the_critic_starts_from_it(rolled, tiny_params, tmp_path):
    root, rollouts = rolled
    # A negligible critic rate: after its one update the critic still equals the anchored student it was copied from.
    params = _params(
        tiny_params, root, tmp_path, max_steps=1, anchor_steps=3, generator_every=1, log_every=1,
        checkpoint_every=1, keep_checkpoints=4, critic_lr=1e-12,
    )
    summary = run_distill(params, rollouts, tmp_path / "student")
    anchored, last = (load_checkpoint(c).tensors for c in list_checkpoints(tmp_path / "student" / "checkpoints")[-2:])
    students = {k.split("/", 1)[1].replace(".student.", "."): v for k, v in anchored.items() if k.startswith("student/")}
    critics = {k.split("/", 1)[1].replace(".critic.", "."): v for k, v in last.items() if k.startswith("critic/")}
    initial = {k.split("/", 1)[1].replace(".critic.", "."): v for k, v in anchored.items() if k.startswith("critic/")}
    assert students.keys() == critics.keys()
    assert all(torch.allclose(critics[k], students[k], atol=1e-8) for k in students)
    assert not all(torch.equal(initial[k], students[k]) for k in students)  # the copy, not the critic's own initialisation
    history = [json.loads(line) for line in (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()]
    losses = [sorted(k for k in h if k.startswith("loss_")) for h in history]
    assert losses[:3] == [["loss_ta_fm"]] * 3
    assert {"loss_dmd_bs", "loss_critic_fm"} <= set(losses[3])
    assert (summary["steps"], summary["anchor_updates"], summary["generator_updates"], summary["critic_updates"]) == (4, 3, 1, 1)
    assert summary["effect_steps"] + summary["general_steps"] == 1  # PDSR counts the distillation steps only
    assert json.loads((tmp_path / "student" / COLLECTION).read_text())["training"]["anchor_updates"] == 3

    # anchor/ holds the student as the anchor phase left it: the FM all-in-1 baseline (source: anchor)
    exported = load_file(tmp_path / "student" / ANCHOR / LORA_WEIGHTS)
    assert {k.removeprefix("transformer.") for k in exported} == set(students)
    assert all(torch.equal(exported[f"transformer.{k}"], v) for k, v in students.items())
    assert json.loads((tmp_path / "student" / ANCHOR / ANCHOR_RECORD).read_text())["anchor_steps"] == 3
    anchored_params = params.model_copy(
        update={"baselines": params.baselines.model_copy(update={"fm_all_in_one": params.baselines.fm_all_in_one.model_copy(update={"source": "anchor"})})}
    )
    report = run_baselines(anchored_params, rollouts, tmp_path / "student", tmp_path / "baselines")
    assert report["fm_all_in_one"]["source"] == "anchor" and report["fm_all_in_one"]["steps"] == 3
    fm = tmp_path / "baselines" / report["fm_all_in_one"]["file"]
    assert fm.read_bytes() == (tmp_path / "student" / ANCHOR / LORA_WEIGHTS).read_bytes()


def test_the_compiled_anchor_phase_trains_the_same_student_as_the_eager_one(rolled, tiny_params, tmp_path):
    """distill.compile_anchor: prompts padded to one shape and a compiled transformer; the same student up
    to float rounding, the compile timed apart from the steps."""
    root, rollouts = rolled
    students, summaries = {}, {}
    for compiled in (False, True):
        out = tmp_path / f"compiled-{compiled}"
        summaries[compiled] = run_distill(
            _params(tiny_params, root, out, max_steps=1, anchor_steps=3, compile_anchor=compiled), rollouts, out / "student"
        )
        students[compiled] = load_file(out / "student" / ANCHOR / LORA_WEIGHTS)
    assert students[True].keys() == students[False].keys()
    moved = [k for k in students[False] if ".lora_B." in k]
    assert any(students[False][k].abs().max() > 0 for k in moved)  # the anchor steps trained B away from zero
    for key, eager in students[False].items():
        torch.testing.assert_close(students[True][key], eager, rtol=1e-4, atol=1e-6)
    assert summaries[True]["time_compile_s"] > 0 and summaries[False]["time_compile_s"] == 0
    assert summaries[True]["anchor_updates"] == summaries[False]["anchor_updates"] == 3


def test_a_compiled_anchor_phase_without_a_cpp_compiler_stops_before_training(rolled, tiny_params, tmp_path, monkeypatch):
    root, rollouts = rolled
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(ConfigError, match=r"distill.compile_anchor: torch.compile on cpu needs a C\+\+ compiler .*no-such-compiler"):
        run_distill(_params(tiny_params, root, tmp_path, anchor_steps=2, compile_anchor=True), rollouts, tmp_path / "student")
    assert not (tmp_path / "student" / LORA_WEIGHTS).exists()


def test_fm_all_in_one_from_a_run_without_anchor_phase_is_one_clear_error(trained, rolled, tiny_params, tmp_path):
    student, _ = trained
    root, rollouts = rolled
    params = _params(tiny_params, root, tmp_path)
    params = params.model_copy(
        update={"baselines": params.baselines.model_copy(update={"fm_all_in_one": params.baselines.fm_all_in_one.model_copy(update={"source": "anchor"})})}
    )
    with pytest.raises(ConfigError, match=r"anchor.json: that run had no anchor phase .* set baselines.fm_all_in_one.source: train"):
        run_baselines(params, rollouts, student, tmp_path / "baselines")
    assert not (tmp_path / "baselines").exists()


def test_the_anchor_phase_needs_ta_fm(rolled, tiny_params, tmp_path):
    root, rollouts = rolled
    params = _params(tiny_params, root, tmp_path, anchor_steps=2, ta_fm=False)
    with pytest.raises(ConfigError, match=r"distill.anchor_steps: .* needs distill.ta_fm: true"):
        run_distill(params, rollouts, tmp_path / "student")
    assert not (tmp_path / "student" / LORA_WEIGHTS).exists()


def test_a_decaying_learning_rate_applies_and_ties_the_run_to_its_length(rolled, tiny_params, tmp_path):
    """The cosine rate reaches the optimizer (the second update is half as large as a constant run's, so
    the students differ), and since max_steps changes every step's rate, extending such a run is refused."""
    root, rollouts = rolled

    def params(schedule: str, steps: int):
        return _params(tiny_params, root, tmp_path, lr_schedule=schedule, max_steps=steps, generator_every=1, checkpoint_every=1)

    cosine, constant = tmp_path / "cosine", tmp_path / "constant"
    run_distill(params("cosine", 2), rollouts, cosine)
    run_distill(params("constant", 2), rollouts, constant)
    assert (cosine / LORA_WEIGHTS).read_bytes() != (constant / LORA_WEIGHTS).read_bytes()
    with pytest.raises(Exception, match=r"fingerprint\.distill\.max_steps"):
        run_distill(params("cosine", 4), rollouts, cosine, resume=True)
    assert run_distill(params("constant", 4), rollouts, constant, resume=True)["steps"] == 4


def test_ablations_switch_terms_off(rolled, tiny_params, tmp_path):
    root, rollouts = rolled
    params = _params(tiny_params, root, tmp_path, pdsr=False, ts=False, ta_fm=False, max_steps=2, generator_every=1, log_every=1)
    run_distill(params, rollouts, tmp_path / "student")
    history = [json.loads(line) for line in (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()]
    assert all("loss_dmd_bs" in h and "loss_dmd_ts" not in h and "loss_ta_fm" not in h for h in history)


def test_export_is_diffusers_and_kohya_with_a_collection_record(trained):
    out, _ = trained
    with safe_open(out / LORA_WEIGHTS, framework="pt") as handle:
        keys = list(handle.keys())
    assert keys and all(k.startswith("transformer.transformer_blocks.") and ".lora_" in k for k in keys)
    with safe_open(out / KOHYA_WEIGHTS, framework="pt") as handle:
        assert all(k.startswith("lora_unet_") for k in handle.keys())  # noqa: SIM118 (safe_open has no __iter__)
    record = json.loads((out / COLLECTION).read_text())
    assert [e["id"] for e in record["effects"]] == [e["effect"] for e in record["prompts"]["effects"]]
    assert record["timesteps"] == [1000, 954, 900, 833, 750, 642, 500, 300]
    triggers = [e["trigger"] for e in record["prompts"]["effects"]]
    assert len(set(triggers)) == len(triggers) and all(t.startswith("<") for t in triggers)
    assert (out / "README.md").read_text().count("<") >= len(triggers)


def test_stock_diffusers_loads_the_student_and_matches_our_sampler(trained, rolled, tiny_params):
    """No collectionlora code on the loading side: pipe.load_lora_weights + a 1-step stock call equals
    our student sampler's 1-step x0 prediction (the stock Euler step from sigma 1 to 0 is x0)."""
    from diffusers import QwenImageEditPlusPipeline

    from collectionlora.adapters import AdapterSet
    from collectionlora.images import load_png, to_pil
    from collectionlora.models.backbone import Backbone
    from collectionlora.models.compat import condition_area, load_processor
    from collectionlora.sampling import sample_student

    out, _ = trained
    root, _ = rolled
    prompt = json.loads((out / COLLECTION).read_text())["prompts"]["effects"][0]["student_prompt"]
    source = load_png(min((root / "eval").glob("*.png")), 32)

    pipe = QwenImageEditPlusPipeline.from_pretrained(root / "base", processor=load_processor(root / "base"))
    pipe.load_lora_weights(out, weight_name=LORA_WEIGHTS)
    latents = torch.randn((1, 64, 48), generator=torch.Generator().manual_seed(0))  # = our seed-0 noise
    with condition_area(32 * 32):
        stock = pipe(
            image=[to_pil(source)], prompt=prompt, negative_prompt=None, true_cfg_scale=1.0, num_inference_steps=1,
            height=32, width=32, latents=latents, output_type="pt", sigmas=[1.0],
        ).images[0]

    backbone = Backbone.load(tiny_params.base, root / "base")
    adapters = AdapterSet(backbone.transformer)
    adapters.add_teacher("student", out / LORA_WEIGHTS)
    adapters.activate("student")
    ours = sample_student(backbone, source[None], [prompt], [0], [1000.0]).images[0]
    adapters.activate("none")
    plain = sample_student(backbone, source[None], [prompt], [0], [1000.0]).images[0]
    assert torch.allclose(stock.float().cpu(), ours, atol=2e-3)
    assert not torch.allclose(ours, plain, atol=1e-4)  # the LoRA does something


def test_existing_checkpoints_need_resume(trained, rolled, tiny_params):
    out, _ = trained
    root, rollouts = rolled
    result = CliRunner().invoke(
        app, ["distill", "--rollouts", str(rollouts), "--out", str(out), "--set", f"bank.root={root}", "--set", f"bank.manifest={root / 'bank.yaml'}"]
    )
    assert result.exit_code == 1 and "--resume" in result.output and len(result.output.strip().splitlines()) == 1


def test_resume_with_changed_params_names_the_field(trained, rolled, tiny_params):
    out, _ = trained
    root, rollouts = rolled
    copy = out.parent / "changed"
    shutil.copytree(out, copy)
    params = _params(tiny_params, root, out.parent, lr=0.5, max_steps=12)
    with pytest.raises(Exception, match=r"fingerprint\.distill\.lr"):
        run_distill(params, rollouts, copy, resume=True)


def test_nan_guard_skips_counts_aborts_and_keeps_the_last_good_checkpoint(rolled, tiny_params, tmp_path):
    """An absurd learning rate makes the weights explode: non-finite steps are skipped and counted,
    max_nonfinite in a row abort with a clear error, and every checkpoint left holds finite weights."""
    root, rollouts = rolled
    params = _params(tiny_params, root, tmp_path, max_steps=60, checkpoint_every=1, log_every=1, max_nonfinite=3, lr=1e12, critic_lr=1e12)
    out = tmp_path / "student"
    with pytest.raises(TrainingDiverged, match="3 non-finite losses in a row"):
        run_distill(params, rollouts, out)
    skipped = [json.loads(line)["nonfinite_skipped"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert skipped == sorted(skipped) and skipped[-1] >= 2  # counted; the aborting step itself is not logged
    checkpoints = list_checkpoints(out / "checkpoints")
    assert checkpoints, "the steps before the explosion were checkpointed"
    for path in checkpoints:
        tensors = load_checkpoint(path).tensors
        assert all(torch.isfinite(t).all() for k, t in tensors.items() if k.startswith(("student/", "critic/")))
    assert not (out / LORA_WEIGHTS).exists()  # nothing exported from a failed run


def test_edit_command_applies_one_effect_or_a_composition(trained, rolled, tmp_path):
    from PIL import Image

    from collectionlora.images import load_png

    out, _ = trained
    root, _ = rolled
    effects = [e["effect"] for e in json.loads((out / COLLECTION).read_text())["prompts"]["effects"]]
    image = tmp_path / "photo.png"
    Image.open(min((root / "eval").glob("*.png"))).resize((48, 40)).save(image)  # any size is fitted
    runner = CliRunner()

    def edit(name: str, *extra: str):
        result = runner.invoke(app, ["edit", "--collection", str(out), "--image", str(image), "--out", str(tmp_path / name), *extra])
        assert result.exit_code == 0, result.output
        return load_png(tmp_path / name, 32)

    eight = edit("a.png", "--effect", effects[0])
    assert torch.equal(eight, edit("again.png", "--effect", effects[0]))  # seeded
    assert not torch.equal(eight, edit("one.png", "--effect", effects[0], "--steps", "1"))
    assert not torch.equal(eight, edit("ab.png", "--effect", effects[0], "--then", effects[1]))
    bad = runner.invoke(app, ["edit", "--collection", str(out), "--image", str(image), "--out", str(tmp_path / "x.png"), "--effect", "nope"])
    assert bad.exit_code == 1 and "no effect 'nope'" in bad.output and len(bad.output.strip().splitlines()) == 1
    assert not (tmp_path / "x.png").exists()


def test_written_files_and_folders_get_an_ordinary_mode(trained, rolled):
    """The collection (LoRA files, checkpoints) and the demo bank (base, judge, teachers) are 0666 / 0777
    minus the umask like every other artifact: safetensors' save_file writes 0600 files and
    tempfile.mkdtemp 0700 folders unless corrected."""
    out, _ = trained
    root, _ = rolled
    mask = os.umask(0o077)
    os.umask(mask)
    paths = [path for folder in (out, root) for path in [folder, *folder.rglob("*")] if not path.is_symlink()]
    assert any(path.suffix == ".safetensors" for path in paths) and any(p.parent.name == "checkpoints" for p in paths)
    wrong = {
        path.as_posix(): oct(stat.S_IMODE(path.stat().st_mode))
        for path in paths
        if stat.S_IMODE(path.stat().st_mode) & ~stat.S_ISGID != (0o777 if path.is_dir() else 0o666) & ~mask
    }
    assert not wrong


def test_incremental_add_keeps_old_triggers_and_reports_old_effects(trained, rolled, tiny_params, tmp_path):
    out, _ = trained
    root, rollouts = rolled
    params = _params(tiny_params, root, tmp_path, manifest="bank-3.yaml", anchor_steps=4)  # a warm start never anchors
    summary = run_distill(params, rollouts, tmp_path / "grown", warm_start=out)
    old = json.loads((out / COLLECTION).read_text())["prompts"]["effects"]
    grown = json.loads((tmp_path / "grown" / COLLECTION).read_text())["prompts"]["effects"]
    assert [e["trigger"] for e in grown[: len(old)]] == [e["trigger"] for e in old]
    report = json.loads((tmp_path / "grown" / "incremental_report.json").read_text())
    assert report["old_effects"] == [e["effect"] for e in old] and report["added"] == [grown[-1]["effect"]]
    assert set(report["before"]) == set(report["after"]) == set(report["old_effects"])
    assert all(0 <= row["judge_rate"] <= 1 for row in report["after"].values())
    assert summary["steps"] == 2 * 1 * 5  # generator_steps_per_effect x added effects x generator_every
    assert summary["anchor_updates"] == 0
    # ... and its checkpoints record the value it ran with, so a resume compares what was trained
    fingerprint = load_checkpoint(list_checkpoints(tmp_path / "grown" / "checkpoints")[-1]).fingerprint
    assert fingerprint["distill.anchor_steps"] == "0"
    assert (tmp_path / "grown" / LORA_WEIGHTS).read_bytes() != (out / LORA_WEIGHTS).read_bytes()

    with pytest.raises(Exception, match="nothing to add"):
        run_distill(params, rollouts, tmp_path / "again", warm_start=tmp_path / "grown")
