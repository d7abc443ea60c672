"""The LoRA in a plain diffusers script: the model card's stock call (`load_pipeline` or `from_pretrained`,
the shipped scheduler, `pipe.load_lora_weights`, the recorded sigmas) edits exactly as `collectionlora edit`."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
from pathlib import Path

import torch
from diffusers import QwenImageEditPlusPipeline

from collectionlora.bank import file_sha256
from collectionlora.distill.export import COLLECTION, MODEL_CARD, diffusers_recipe, diffusers_snippet
from collectionlora.edit import run_edit
from collectionlora.images import load_png

SCHEDULER_LINE = re.compile(r"^pipe\.scheduler = .*\n", re.MULTILINE)
SIGMAS_LINE = re.compile(r"^ *sigmas=.*\n", re.MULTILINE)
ONE_LEVEL = 1 / 255


def card_script(collection: Path) -> str:
    """The python block of the collection's model card."""
    card = (collection / MODEL_CARD).read_text(encoding="utf-8")
    return re.search(r"```python\n(.*?)```", card, re.DOTALL).group(1)


def run_script(code: str, folder: Path) -> tuple[torch.Tensor, dict]:
    """Run `code` in `folder` (which holds in.png) as a user would; the out.png it wrote and its variables."""
    namespace: dict = {"__name__": "__main__"}
    with contextlib.chdir(folder):
        exec(compile(code, "model-card", "exec"), namespace)
    return load_png(folder / "out.png"), namespace


def test_the_model_card_script_edits_exactly_as_collectionlora_edit(tiny_workflow: dict, tmp_path: Path):
    student, params = tiny_workflow["student"], tiny_workflow["params"]
    record = json.loads((student / COLLECTION).read_text())
    scheduler = student / "scheduler" / "scheduler_config.json"
    assert record["files"]["scheduler/scheduler_config.json"] == file_sha256(scheduler)
    assert json.loads(scheduler.read_text())["stochastic_sampling"] is True
    assert record["diffusers"]["call"]["sigmas"] == [t / 1000 for t in record["timesteps"]]
    source_file = min((tiny_workflow["root"] / "eval").rglob("*.png"))
    shutil.copy(source_file, tmp_path / "in.png")
    effect = record["prompts"]["effects"][0]

    code = card_script(student)
    assert "pipe.load_lora_weights(" in code and f"prompt={effect['student_prompt']!r}" in code
    stock, namespace = run_script(code, tmp_path)
    assert type(namespace["pipe"]) is QwenImageEditPlusPipeline  # the stock class, not a wrapper

    edited = load_png(run_edit(params, student, effect["effect"], tmp_path / "in.png", tmp_path / "edit.png", seed=0))
    # The same PNG: at most a few values one 8-bit level apart, where a float rounding difference meets a tie.
    gap = (stock - edited).abs()
    assert gap.max() <= ONE_LEVEL + 1e-6 and int((gap > 0).sum()) <= 3, (float(gap.max()), int((gap > 0).sum()))

    # The shipped scheduler and the sigmas are what make it equal: the base's own scheduler (deterministic
    # Euler) or the scheduler's default sigmas give another image.
    for broken in (SCHEDULER_LINE.sub("", code, count=1), SIGMAS_LINE.sub("", code, count=1)):
        assert broken != code
        other, _ = run_script(broken, tmp_path)
        assert (other - edited).abs().max() > 10 * ONE_LEVEL, float((other - edited).abs().max())


def test_a_real_base_card_loads_with_plain_from_pretrained(tmp_path: Path):
    """No collectionlora import in the script for a real Qwen-Image-Edit base (a GPU install with torchvision)."""
    record = {
        "base": {"path": None, "model": "Qwen/Qwen-Image-Edit-2509", "pipeline": "QwenImageEditPlusPipeline"},
        "diffusers": diffusers_recipe([1000.0, 954.0, 900.0, 833.0, 750.0, 642.0, 500.0, 300.0], 1024, embedded=False),
    }
    code = diffusers_snippet(tmp_path / "student", record, "<t0k> Turn it sepia")
    compile(code, "model-card", "exec")
    assert "from collectionlora" not in code and "import collectionlora" not in code and "condition_area" not in code
    assert "QwenImageEditPlusPipeline.from_pretrained('Qwen/Qwen-Image-Edit-2509'" in code
    assert "sigmas=[1.0, 0.954, 0.9, 0.833, 0.75, 0.642, 0.5, 0.3]" in code and "height=1024" in code
    assert record["diffusers"]["scheduler"]["config"] == {
        "shift": 1.0, "use_dynamic_shifting": False, "shift_terminal": None, "stochastic_sampling": True,
    }
