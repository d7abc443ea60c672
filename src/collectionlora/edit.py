"""Apply one effect (or two in a row) of a trained collection to an image: the student alone, no
routing, no LoRA switching, 8 (or 4, 2, 1) transformer forwards."""

from __future__ import annotations

from pathlib import Path

from collectionlora.adapters import AdapterSet
from collectionlora.config import Params
from collectionlora.distill.export import LORA_WEIGHTS, read_collection
from collectionlora.distill.prompting import PromptPlan, compose_prompt
from collectionlora.errors import CollectionLoraError
from collectionlora.images import load_image_fitted, save_png
from collectionlora.models.backbone import Backbone
from collectionlora.sampling import sample_student, student_timesteps

COLLECTION_ADAPTER = "collection"


def student_prompt_for(collection: Path, record: dict, effect: str, then: str | None) -> str:
    """The student prompt of `effect`, or the composition template around `effect` then `then`."""
    plan = PromptPlan.from_json(record["prompts"])
    known = [e.effect for e in plan.effects]
    for name in (effect, then):
        if name is not None and name not in known:
            raise CollectionLoraError(f"{Path(collection) / 'collection.json'}: prompts.effects: no effect '{name}' (known: {', '.join(known)})")
    prompt = plan.student(effect)
    return compose_prompt(prompt, plan.student(then)) if then else prompt


def run_edit(
    params: Params,
    collection: Path,
    effect: str,
    image: Path,
    out: Path,
    steps: int | None = None,
    then: str | None = None,
    seed: int = 0,
    base: Path | None = None,
) -> Path:
    """Edit `image` with the collection's student; `steps` defaults to the trained step list."""
    record = read_collection(collection)
    prompt = student_prompt_for(collection, record, effect, then)
    base_path = base or (Path(record["base"]["path"]) if record["base"]["path"] else None)
    backbone = Backbone.load(params.base, base_path)
    adapters = AdapterSet(backbone.transformer)
    adapters.add_teacher(COLLECTION_ADAPTER, Path(collection) / LORA_WEIGHTS)
    adapters.activate(COLLECTION_ADAPTER)
    trained = [float(t) for t in record["timesteps"]]
    timesteps = trained if steps in (None, len(trained)) else student_timesteps(params.sampling, steps)
    source = load_image_fitted(Path(image), backbone.resolution)
    result = sample_student(backbone, source[None], [prompt], [seed], timesteps).images[0]
    save_png(result, Path(out))
    return Path(out)
