"""Teacher training: a folder of pairs becomes a stock diffusers LoRA that raises fidelity to the effect."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from collectionlora.base_pretrain import pretrain_base
from collectionlora.effects import get_effect, make_sources
from collectionlora.evaluate.fidelity import psnr
from collectionlora.images import save_png
from collectionlora.models.backbone import Backbone
from collectionlora.sampling import sample_teacher
from collectionlora.stages import run_teacher_train


@pytest.fixture(scope="module")
def pretrained_base(tiny_params, tiny_base_dir, tmp_path_factory):
    """The tiny base after a short general-edit pretraining, so it can copy its input."""
    backbone = Backbone.load(tiny_params.base, tiny_base_dir)
    pretrain_base(backbone, steps=150, lr=3e-3, batch_size=8, pool_size=64, seed=0, prompt_dropout=0.1, empty_prompt="")
    folder = tmp_path_factory.mktemp("pretrained") / "base"
    backbone.pipe.save_pretrained(folder)
    return folder


def write_pairs(folder, effect_id: str, count: int):
    effect = get_effect(effect_id)
    sources = make_sources("train", count, 32, 0)
    for i, (source, result) in enumerate(zip(sources, effect.apply(sources, 0))):
        save_png(source, folder / f"{i:04d}_source.png")
        save_png(result, folder / f"{i:04d}_result.png")
    return effect


def test_teacher_training_raises_fidelity_and_loads_in_stock_diffusers(tiny_params, pretrained_base, tmp_path):
    effect = write_pairs(tmp_path / "pairs", "grayscale", 8)
    params = tiny_params.model_copy(
        update={"lora": tiny_params.lora.model_copy(update={"steps": 150, "lr": 5e-3, "batch_size": 8, "rank": 8, "alpha": 8})}
    )
    weights = run_teacher_train(params, tmp_path / "pairs", effect.prompt, tmp_path / "teacher", pretrained_base)
    assert weights.name == "pytorch_lora_weights.safetensors"
    config = json.loads((tmp_path / "teacher" / "adapter_config.json").read_text())
    assert config["r"] == 8 and "to_q" in config["target_modules"]

    held_out = make_sources("eval", 8, 32, 0)
    truth = effect.apply(held_out, 0)
    backbone = Backbone.load(params.base, pretrained_base)

    def fidelity() -> float:
        edited = sample_teacher(backbone, held_out, [effect.prompt] * 8, range(8), params.sampling, steps=4, cfg_scale=1.0)
        return float(psnr(edited.images, truth).mean())

    before = fidelity()
    backbone.pipe.load_lora_weights(str(tmp_path / "teacher"), adapter_name="grayscale")  # stock diffusers
    after = fidelity()
    assert after > before + 2.0, (before, after)


def test_cli_refuses_a_pickle_in_the_pairs_folder(tmp_path):
    write_pairs(tmp_path / "pairs", "sepia", 2)
    (tmp_path / "pairs" / "extra.pt").write_bytes(b"\x80\x04K\x01.")
    result = subprocess.run(
        [sys.executable, "-m", "collectionlora.cli", "teachers", "train", "--pairs", str(tmp_path / "pairs"),
         "--prompt", "x", "--out", str(tmp_path / "out")],
        capture_output=True, text=True,
    )
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "extra.pt" in result.stderr and "pickle" in result.stderr
    assert not (tmp_path / "out").exists()
