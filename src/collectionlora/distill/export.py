"""The single LoRA as users get it: diffusers keys (stock `pipe.load_lora_weights` works), optionally a
kohya/ComfyUI layout, `collection.json` (effects, triggers, student prompts, step list, base, hashes)
and a model card."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from collectionlora import lorafile
from collectionlora.bank import file_sha256
from collectionlora.distill.prompting import PromptPlan
from collectionlora.errors import CollectionLoraError
from collectionlora.lorafile import atomic_write_text
from collectionlora.models.backbone import DTYPES

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHTS = "pytorch_lora_weights_kohya.safetensors"
COLLECTION = "collection.json"
MODEL_CARD = "README.md"


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


def write_collection(out: Path, record: dict) -> Path:
    atomic_write_text(out / COLLECTION, json.dumps(record, indent=2, sort_keys=False) + "\n")
    return out / COLLECTION


def read_collection(folder: Path) -> dict:
    """collection.json of a trained collection, with a one-line error when it is missing or broken."""
    path = Path(folder) / COLLECTION
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        PromptPlan.from_json(record["prompts"])
        record["timesteps"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CollectionLoraError(f"{path}: not a collection ({' '.join(str(error).split())})") from error
    return record


def write_model_card(out: Path, record: dict) -> Path:
    """A short README in the spirit of diffusers' model cards: base, how to load, trigger words."""
    plan = PromptPlan.from_json(record["prompts"])
    rows = "\n".join(f"| `{e.effect}` | `{e.trigger or '-'}` | {e.student_prompt} |" for e in plan.effects)
    steps = ", ".join(f"{t:g}" for t in record["timesteps"])
    text = f"""# {record['name']}: {len(plan.effects)} effects in one LoRA

Distilled by collectionlora (multi-teacher on-policy distillation: PDSR, AOP, C2F-DO) from
{len(plan.effects)} effect LoRAs on base `{record['base'].get('model') or record['base'].get('path')}`.
It samples in {len(record['timesteps'])} steps without CFG (step list {steps}).

```python
pipe.load_lora_weights("{out.as_posix()}", weight_name="{LORA_WEIGHTS}")
```

or `collectionlora edit --collection {out.as_posix()} --effect ID --image in.png --out out.png`.

| effect | trigger | student prompt |
|---|---|---|
{rows}
"""
    atomic_write_text(out / MODEL_CARD, text)
    return out / MODEL_CARD
