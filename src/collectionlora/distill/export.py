"""The single LoRA as users get it: diffusers keys (stock `pipe.load_lora_weights` works), optionally a
kohya/ComfyUI layout, `collection.json` (effects, triggers, student prompts, step list, base, hashes),
`scheduler/` (the stock scheduler set up as the student's sampler) and a model card whose diffusers call
reproduces `collectionlora edit` (tests/test_diffusers_script.py runs it)."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from collectionlora import lorafile
from collectionlora.bank import file_sha256
from collectionlora.distill.prompting import PromptPlan
from collectionlora.errors import CollectionLoraError
from collectionlora.lorafile import atomic_write_text, replace_folder
from collectionlora.models.backbone import DTYPES
from collectionlora.sampling import student_sigmas

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHTS = "pytorch_lora_weights_kohya.safetensors"
COLLECTION = "collection.json"
MODEL_CARD = "README.md"
PROMPTS = "prompts.json"  # the AOP prompt plan, written when a run starts (baselines read it too)
# The student at the end of the anchor phase (TA-FM alone on every teacher target with the student
# prompts): what the FM all-in-1 baseline is, so `baselines` takes it instead of training it again.
ANCHOR = "anchor"
ANCHOR_RECORD = "anchor.json"
SCHEDULER = "scheduler"
# The stock FlowMatchEulerDiscreteScheduler as the student's sampler (sampling.sample_student): each step
# predicts x0 and re-noises it to the next sigma with fresh noise (`stochastic_sampling`), and the
# `sigmas` of the call are used as given (no static or resolution-dependent shift, no terminal stretch).
# A base's own scheduler (deterministic Euler; Qwen-Image's dynamic shift) samples differently.
STUDENT_SCHEDULER = {"shift": 1.0, "use_dynamic_shifting": False, "shift_terminal": None, "stochastic_sampling": True}


def export_student(
    state_dict: dict[str, torch.Tensor],
    alpha: float,
    out: Path,
    save_dtype: str,
    kohya: bool,
) -> dict[str, str]:
    """Write the student LoRA files; returns {file name: sha256}."""
    dtype = DTYPES[save_dtype]
    modules: dict[str, list] = {}
    for key, tensor in state_dict.items():
        module, role = key.rsplit(".", 2)[0], key.rsplit(".", 2)[1]
        modules.setdefault(module, [None, None, alpha])[0 if role == "lora_A" else 1] = tensor.to(dtype)
    weights = lorafile.LoraWeights.from_tensors({m: tuple(v) for m, v in modules.items()})
    out.mkdir(parents=True, exist_ok=True)
    lorafile.write_lora(weights, out / LORA_WEIGHTS, "diffusers")
    written = {LORA_WEIGHTS: file_sha256(out / LORA_WEIGHTS)}
    if kohya:
        lorafile.write_lora(weights, out / KOHYA_WEIGHTS, "kohya")
        written[KOHYA_WEIGHTS] = file_sha256(out / KOHYA_WEIGHTS)
    return written


def export_anchor(state_dict: dict[str, torch.Tensor] | None, alpha: float, out: Path, steps: int, rows: int) -> Path:
    """`out`/anchor/: the anchored student (float32) and anchor.json, replaced in one rename. A run
    without an anchor phase writes anchor.json alone (steps 0), so the folder always exists (a DVC dep)."""
    staging, final = out / f"{ANCHOR}.partial", out / ANCHOR
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    files = export_student(state_dict, alpha, staging, "float32", kohya=False) if state_dict is not None else {}
    atomic_write_text(staging / ANCHOR_RECORD, json.dumps({"anchor_steps": steps, "rows": rows, "files": files}, indent=2) + "\n")
    replace_folder(staging, final)
    return final


def write_scheduler(out: Path) -> dict[str, str]:
    """Write `scheduler/scheduler_config.json` (load it with `FlowMatchEulerDiscreteScheduler.from_pretrained(
    out, subfolder="scheduler")`); returns {file name: sha256} for collection.json's `files`."""
    name = f"{SCHEDULER}/{FlowMatchEulerDiscreteScheduler.config_name}"
    (out / SCHEDULER).mkdir(parents=True, exist_ok=True)  # the file `save_pretrained` writes, written atomically
    atomic_write_text(out / name, FlowMatchEulerDiscreteScheduler(**STUDENT_SCHEDULER).to_json_string())
    return {name: file_sha256(out / name)}


def diffusers_recipe(timesteps: list[float], resolution: int, embedded: bool) -> dict:
    """collection.json's `diffusers` section: the scheduler and the `pipe(...)` arguments under which a
    stock call samples exactly as `collectionlora edit` (the model card shows the call)."""
    return {
        "scheduler": {"subfolder": SCHEDULER, "class": "FlowMatchEulerDiscreteScheduler", "config": dict(STUDENT_SCHEDULER)},
        "call": {
            "true_cfg_scale": 1.0,
            "num_inference_steps": len(timesteps),
            "sigmas": student_sigmas(timesteps),
            "height": resolution,
            "width": resolution,
        },
        # the embedded base's condition image is `resolution`^2, not the stock 1024^2 (models/compat.py)
        "condition_area": resolution * resolution if embedded else None,
        "noise": "torch.manual_seed(seed), then latents = torch.randn(1, tokens, transformer.config.in_channels): "
        "the draws of `collectionlora edit --seed seed` (on CPU)",
    }


def write_collection(out: Path, record: dict) -> Path:
    atomic_write_text(out / COLLECTION, json.dumps(record, indent=2, sort_keys=False) + "\n")
    return out / COLLECTION


def read_collection(folder: Path) -> dict:
    """collection.json of a trained collection, with a one-line error when it is missing or broken."""
    path = Path(folder) / COLLECTION
    if not path.is_file():
        raise CollectionLoraError(f"{path}: missing: no trained collection in {folder}; run `collectionlora distill` first (--out {folder}, or `dvc repro distill`)")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        PromptPlan.from_json(record["prompts"])
        timesteps, base = record["timesteps"], record["base"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CollectionLoraError(f"{path}: not a collection ({' '.join(str(error).split())})") from error
    if not isinstance(base, dict):
        raise CollectionLoraError(f"{path}: base: expected a mapping (path, model, pipeline), got {base!r:.60}")
    numbers = isinstance(timesteps, list) and timesteps and all(type(t) in (int, float) for t in timesteps)
    if not numbers or any(not 0 < t <= 1000 for t in timesteps) or any(a <= b for a, b in zip(timesteps, timesteps[1:])):
        raise CollectionLoraError(f"{path}: timesteps: expected the trained step list (decreasing numbers in (0, 1000]), got {timesteps!r:.60}")
    return record


def check_collection_files(collection: Path, record: dict, lora: Path) -> None:
    """The LoRA must be the one collection.json describes: a swapped or truncated file edits wrongly."""
    expected = record.get("files", {}).get(LORA_WEIGHTS)
    if expected is None:
        raise CollectionLoraError(f"{Path(collection) / COLLECTION}: files.{LORA_WEIGHTS}: missing (re-run distill)")
    if not lora.is_file():
        raise CollectionLoraError(f"{lora}: missing (the collection's LoRA)")
    if file_sha256(lora) != expected:
        raise CollectionLoraError(f"{lora}: sha256 differs from {Path(collection) / COLLECTION} files.{LORA_WEIGHTS} (not the LoRA this collection describes)")


def write_model_card(out: Path, record: dict) -> Path:
    """A short README in the spirit of diffusers' model cards: base, the stock diffusers call that
    reproduces `collectionlora edit`, trigger words."""
    plan = PromptPlan.from_json(record["prompts"])
    rows = "\n".join(f"| `{e.effect}` | `{e.trigger or '-'}` | {e.student_prompt} |" for e in plan.effects)
    steps = ", ".join(f"{t:g}" for t in record["timesteps"])
    recipe = record["diffusers"]
    side = recipe["call"]["height"]
    text = f"""# {record['name']}: {len(plan.effects)} effects in one LoRA

Distilled by collectionlora (multi-teacher on-policy distillation: PDSR, AOP, C2F-DO) from
{len(plan.effects)} effect LoRAs on base `{record['base'].get('model') or record['base'].get('path')}`.
It samples in {len(record['timesteps'])} steps without CFG (step list {steps}).

## In diffusers

```python
{diffusers_snippet(out, record, plan.effects[0].student_prompt)}
```

- `scheduler/` is the stock `FlowMatchEulerDiscreteScheduler` set up as the sampler the student was
  trained for: each step predicts the clean image and re-noises it to the next sigma with fresh noise
  (`stochastic_sampling=True`), at exactly the `sigmas` given (`shift=1`, no dynamic shifting). With the
  base's own scheduler (deterministic Euler) or its default sigmas the edit is weaker.
- `sigmas` is the trained step list / 1000; `prompt` is the effect's student prompt (table below).
- The `torch.manual_seed` and `latents` lines make the output equal `collectionlora edit --seed 0` (on
  CPU). Without them the edit is as good, from other noise (the re-noising draws from torch's global
  generator, so seed it for repeatable results).
- `in.png` is a square image at {side}x{side}: `collectionlora edit` centre-crops and resizes any image to that.
{_base_note(recipe)}

Or from the command line: `collectionlora edit --collection {out.as_posix()} --effect ID --image in.png --out out.png`.

| effect | trigger | student prompt |
|---|---|---|
{rows}
"""
    atomic_write_text(out / MODEL_CARD, text)
    return out / MODEL_CARD


def diffusers_snippet(out: Path, record: dict, prompt: str) -> str:
    """The stock diffusers script that edits `in.png` with `prompt` exactly as `collectionlora edit` does."""
    recipe = record["diffusers"]
    call, area = recipe["call"], recipe["condition_area"]
    folder = out.as_posix()
    if area is not None:  # the embedded base: its base.path is relative to the collection folder
        base = Path(os.path.normpath(out / record["base"]["path"])).as_posix()
        imports = "from collectionlora.models import condition_area, load_pipeline\n"
        load = f"pipe = load_pipeline({base!r})  # the stock {record['base']['pipeline']}, loadable without torchvision"
    else:
        imports = f"from diffusers import {record['base']['pipeline']}\n"
        load = f"pipe = {record['base']['pipeline']}.from_pretrained({record['base']['model']!r}, dtype=torch.bfloat16)"
    arguments = [
        'image=Image.open("in.png").convert("RGB")',
        f"prompt={prompt!r}",
        *(f"{name}={value!r}" for name, value in call.items()),
        "latents=latents",
    ]
    indent = "    " if area is not None else ""
    body = f"{indent}image = pipe(\n" + "".join(f"{indent}    {a},\n" for a in arguments) + f"{indent}).images[0]"
    if area is not None:
        side = math.isqrt(area)
        body = f"with condition_area({side} * {side}):  # the embedded base sees {side}x{side} condition images, not 1024x1024\n{body}"
    return f"""import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from PIL import Image
{imports}
{load}
pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained({folder!r}, subfolder={recipe['scheduler']['subfolder']!r})
pipe.load_lora_weights({folder!r}, weight_name={LORA_WEIGHTS!r})

torch.manual_seed(0)  # collectionlora edit --seed 0
side = {call['height']} // (2 * pipe.vae_scale_factor)
latents = torch.randn(1, side * side, pipe.transformer.config.in_channels)
{body}
image.save("out.png")"""


def _base_note(recipe: dict) -> str:
    if recipe["condition_area"] is None:
        return "- Move the pipeline to your GPU (`pipe.to(\"cuda\")`) as usual; its re-noising then draws on the GPU, not as `edit` does on the CPU."
    return (
        "- The embedded base needs two things stock diffusers lacks: `load_pipeline` imports its pixel-shuffle VAE\n"
        "  class and rebuilds its processor without torchvision, and `condition_area` sizes the condition image\n"
        "  to the base's resolution instead of 1024x1024 (diffusers' warning that the VAE is not an\n"
        "  AutoencoderKLQwenImage is expected). A real Qwen-Image-Edit base loads with plain `from_pretrained`."
    )
