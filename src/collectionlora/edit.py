"""Apply one effect (or two in a row) of a trained collection to an image: the student alone, no
routing, no LoRA switching, 8 (or 4, 2, 1) transformer forwards.

`CollectionEditor` is the one implementation behind `collectionlora edit` and the registry's pyfunc
model, so a registered model edits exactly as the command line does."""

from __future__ import annotations

from pathlib import Path

import torch

from collectionlora.adapters import AdapterSet
from collectionlora.bank import file_sha256
from collectionlora.config import BaseConfig, Params, SamplingConfig
from collectionlora.distill.export import COLLECTION, LORA_WEIGHTS, read_collection
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
            raise CollectionLoraError(f"{Path(collection) / COLLECTION}: prompts.effects: no effect '{name}' (known: {', '.join(known)})")
    prompt = plan.student(effect)
    return compose_prompt(prompt, plan.student(then)) if then else prompt


def check_collection_files(collection: Path, record: dict, lora: Path) -> None:
    """The LoRA must be the one collection.json describes: a swapped or truncated file edits wrongly."""
    expected = record.get("files", {}).get(LORA_WEIGHTS)
    if expected is None:
        raise CollectionLoraError(f"{Path(collection) / COLLECTION}: files.{LORA_WEIGHTS}: missing (re-run distill)")
    if not lora.is_file():
        raise CollectionLoraError(f"{lora}: missing (the collection's LoRA)")
    if file_sha256(lora) != expected:
        raise CollectionLoraError(f"{lora}: sha256 differs from {Path(collection) / COLLECTION} files.{LORA_WEIGHTS} (not the LoRA this collection describes)")


class CollectionEditor:
    """A collection's student LoRA on its base, ready to edit images."""

    def __init__(self, collection: Path, base: BaseConfig, sampling: SamplingConfig, base_path: Path | None = None, lora: Path | None = None):
        """`collection` holds collection.json; the LoRA is `lora` (default: beside it) and the base
        `base_path` (default: the one collection.json names)."""
        self.collection = Path(collection)
        self.record = read_collection(self.collection)
        lora = Path(lora) if lora is not None else self.collection / LORA_WEIGHTS
        check_collection_files(self.collection, self.record, lora)
        recorded = self.record["base"]["path"]
        self.backbone = Backbone.load(base, base_path or (Path(recorded) if recorded else None))
        self.adapters = AdapterSet(self.backbone.transformer)
        self.adapters.add_teacher(COLLECTION_ADAPTER, lora)
        self.adapters.activate(COLLECTION_ADAPTER)
        self.sampling = sampling
        self.trained_timesteps = [float(t) for t in self.record["timesteps"]]

    @property
    def effects(self) -> list[str]:
        return [e["effect"] for e in self.record["prompts"]["effects"]]

    def prompt(self, effect: str, then: str | None = None) -> str:
        return student_prompt_for(self.collection, self.record, effect, then)

    def timesteps(self, steps: int | None) -> list[float]:
        """The trained step list, or the same rule's list for another number of steps."""
        if steps in (None, len(self.trained_timesteps)):
            return self.trained_timesteps
        return student_timesteps(self.sampling, steps)

    def edit(self, source: torch.Tensor, prompt: str, steps: int | None, seed: int) -> torch.Tensor:
        """One [3, H, W] source (at the base's resolution) edited by `prompt`."""
        return sample_student(self.backbone, source[None], [prompt], [seed], self.timesteps(steps)).images[0]


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
    prompt = student_prompt_for(collection, read_collection(collection), effect, then)  # before loading the base
    editor = CollectionEditor(collection, params.base, params.sampling, base)
    source = load_image_fitted(Path(image), editor.backbone.resolution)
    save_png(editor.edit(source, prompt, steps, seed), Path(out))
    return Path(out)
