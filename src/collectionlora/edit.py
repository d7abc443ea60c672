"""Apply one effect (or two in a row) of a trained collection to an image: the student alone, no
routing, no LoRA switching, 8 (or 4, 2, 1) transformer forwards. Or try any other LoRA on the bank's
base before (or instead of) distilling: an effect's teacher, the acceleration LoRA, a baseline, any file.

`CollectionEditor` is the one implementation behind `collectionlora edit` and the registry's pyfunc
model, so a registered model edits exactly as the command line does. Other LoRAs are sampled by the
evaluation's own code (`evaluate.methods`, `evaluate.evaluation.edit`), so what `edit` shows of a
teacher or a cascade is what `evaluate` scores."""

from __future__ import annotations

import tempfile
from functools import partial
from pathlib import Path

import torch

from collectionlora.adapters import AdapterSet
from collectionlora.bank import Bank, Effect, open_bank
from collectionlora.config import BaseConfig, Params, SamplingConfig
from collectionlora.distill.export import COLLECTION, LORA_WEIGHTS, check_collection_files, read_collection
from collectionlora.distill.prompting import PromptPlan, compose_prompt
from collectionlora.errors import CollectionLoraError, OutputError
from collectionlora.images import load_image_fitted, save_png
from collectionlora.lorafile import atomic_write, base_linear_shapes, read_lora, refuse_pickle
from collectionlora.models.backbone import Backbone
from collectionlora.sampling import sample_student, student_timesteps
from collectionlora.writable import check_output_file

COLLECTION_ADAPTER = "collection"
# What `edit --lora` applies besides a file path, and the two samplers (sampling.py).
STUDENT, TEACHER, ACCELERATION = "student", "teacher", "acceleration"
TEACHER_SAMPLER, FEW_STEP_SAMPLER = "teacher", "few-step"


def student_prompt_for(collection: Path, record: dict, effect: str, then: str | None) -> str:
    """The student prompt of `effect`, or the composition template around `effect` then `then`."""
    plan = PromptPlan.from_json(record["prompts"])
    known = [e.effect for e in plan.effects]
    for name in (effect, then):
        if name is not None and name not in known:
            raise CollectionLoraError(f"{Path(collection) / COLLECTION}: prompts.effects: no effect '{name}' (known: {', '.join(known)})")
    prompt = plan.student(effect)
    return compose_prompt(prompt, plan.student(then)) if then else prompt


def student_step_list(collection: Path, record: dict, sampling: SamplingConfig, steps: int | None) -> list[float]:
    """The step list for `steps` (None: the trained one). Another count is allowed only when each of its
    times is one the student was trained at (the shift rule gives 8 -> 4, 2, 1), so the student is never
    asked to denoise from a noise level it has not seen."""
    trained = [float(t) for t in record["timesteps"]]
    if steps is None or steps == len(trained):
        return trained

    def seen(count: int) -> bool:
        return all(any(abs(t - u) < 1e-3 for u in trained) for t in student_timesteps(sampling, count))

    if steps >= 1 and seen(steps):
        return student_timesteps(sampling, steps)
    valid = [str(n) for n in range(len(trained), 0, -1) if n == len(trained) or seen(n)]
    raise CollectionLoraError(
        f"{Path(collection) / COLLECTION}: timesteps: the student was trained at {len(trained)} timesteps "
        f"({', '.join(f'{t:g}' for t in trained)}); {steps} steps would sample at others (use {' or '.join(valid)} steps)"
    )


def recorded_base(collection: Path, record: dict) -> Path | None:
    """The base folder collection.json names. distill records it relative to the collection folder, so
    `edit` works from any working directory and the file holds no path of the machine that wrote it."""
    recorded = record["base"].get("path")
    if recorded is None:
        return None
    folder = Path(collection) / recorded
    if not (folder / "model_index.json").is_file():
        raise CollectionLoraError(
            f"{Path(collection) / COLLECTION}: base.path: {folder} is not a diffusers pipeline folder "
            "(the path is relative to the collection folder; pass --base)"
        )
    return folder


class CollectionEditor:
    """A collection's student LoRA on its base, ready to edit images."""

    def __init__(self, collection: Path, base: BaseConfig, sampling: SamplingConfig, base_path: Path | None = None, lora: Path | None = None):
        """`collection` holds collection.json; the LoRA is `lora` (default: beside it) and the base
        `base_path` (default: the one collection.json names)."""
        self.collection = Path(collection)
        self.record = read_collection(self.collection)
        lora = Path(lora) if lora is not None else self.collection / LORA_WEIGHTS
        check_collection_files(self.collection, self.record, lora)
        if base_path is None and base.is_embedded:
            base_path = recorded_base(self.collection, self.record)
        self.backbone = Backbone.load(base, base_path)
        self.adapters = AdapterSet(self.backbone.transformer)
        self.adapters.add_teacher(COLLECTION_ADAPTER, lora)
        self.adapters.activate(COLLECTION_ADAPTER)
        self.sampling = sampling

    @property
    def effects(self) -> list[str]:
        return [e["effect"] for e in self.record["prompts"]["effects"]]

    def prompt(self, effect: str, then: str | None = None) -> str:
        return student_prompt_for(self.collection, self.record, effect, then)

    def timesteps(self, steps: int | None) -> list[float]:
        """The trained step list, or the same rule's list for another number of steps (a sub-list of it)."""
        return student_step_list(self.collection, self.record, self.sampling, steps)

    def edit(self, source: torch.Tensor, prompt: str, steps: int | None, seed: int) -> torch.Tensor:
        """One [3, H, W] source (at the base's resolution) edited by `prompt`."""
        return sample_student(self.backbone, source[None], [prompt], [seed], self.timesteps(steps)).images[0]


def run_edit(
    params: Params,
    collection: Path,
    effect: str | None,
    image: Path,
    out: Path,
    steps: int | None = None,
    then: str | None = None,
    seed: int = 0,
    base: Path | None = None,
    lora: str = STUDENT,
    prompt: str | None = None,
    sampler: str | None = None,
    accelerate: bool = False,
) -> Path:
    """Edit `image` with the collection's student (`lora` "student", `steps` defaulting to the trained
    step list) or with another LoRA on the bank's base (see `run_lora_edit`); writes the PNG `out`."""
    check_edit_options(lora, effect, prompt, then, sampler, accelerate, steps, Path(out))
    if lora != STUDENT:
        return run_lora_edit(params, lora, effect, image, out, prompt, steps, seed, base, sampler, accelerate)
    record = read_collection(collection)  # everything below up to the editor: before loading the base
    if prompt is None:
        prompt = student_prompt_for(collection, record, effect, then)
    student_step_list(collection, record, params.sampling, steps)
    source = load_image_fitted(Path(image), params.base.resolution)
    editor = CollectionEditor(collection, params.base, params.sampling, base)
    return write_edit(editor.edit(source, prompt, steps, seed), Path(out))


def write_edit(image: torch.Tensor, out: Path) -> Path:
    """The PNG written whole or not at all (a temp file renamed); a failed write is one line naming `out`.
    Missing parent folders are created, as every stage creates its --out folder."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, partial(save_png, image))
    except OSError as error:
        raise OutputError(f"{out}: cannot write the edited image ({error.strerror or error})") from error
    return out


def check_edit_options(
    lora: str, effect: str | None, prompt: str | None, then: str | None, sampler: str | None, accelerate: bool, steps: int | None, out: Path
) -> None:
    """Contradictory or missing options, and an --out that cannot be written, are one line before anything is loaded."""
    if effect is None and prompt is None:
        raise CollectionLoraError("edit: give --effect (an effect id) or --prompt (an instruction)")
    if prompt is not None and not prompt.strip():
        raise CollectionLoraError("edit: --prompt is empty")
    if effect is not None and prompt is not None and lora != TEACHER:
        raise CollectionLoraError("edit: give --effect or --prompt, not both (both only with --lora teacher: that teacher, your prompt)")
    if then is not None and (lora != STUDENT or prompt is not None):
        raise CollectionLoraError("edit: --then composes two of the collection's effects; it needs --lora student and no --prompt")
    if lora == TEACHER and effect is None:
        raise CollectionLoraError("edit: --lora teacher needs --effect (whose teacher)")
    if sampler not in (None, TEACHER_SAMPLER, FEW_STEP_SAMPLER):
        raise CollectionLoraError(f"edit: --sampler: '{sampler}' is neither '{TEACHER_SAMPLER}' nor '{FEW_STEP_SAMPLER}'")
    if lora == STUDENT and (accelerate or sampler == TEACHER_SAMPLER):
        raise CollectionLoraError("edit: the student samples in few steps by itself; --accelerate and --sampler teacher apply to other LoRAs")
    if lora == ACCELERATION and accelerate:
        raise CollectionLoraError("edit: --accelerate stacks the acceleration LoRA on another LoRA; --lora acceleration applies it alone")
    if steps is not None and steps < 1:
        raise CollectionLoraError(f"edit: --steps {steps}: at least 1 sampling step")
    check_output_file(out, "--out")


def run_lora_edit(
    params: Params,
    lora: str,
    effect: str | None,
    image: Path,
    out: Path,
    prompt: str | None = None,
    steps: int | None = None,
    seed: int = 0,
    base: Path | None = None,
    sampler: str | None = None,
    accelerate: bool = False,
) -> Path:
    """Edit `image` with one LoRA on the bank's base (`lora`: "teacher" = `effect`'s teacher, "acceleration"
    = the bank's few-step LoRA, else a LoRA file or a folder holding one), prompted by `prompt` or else the
    effect's teacher prompt. With `accelerate` the bank's acceleration LoRA is stacked on it, as the
    evaluation's cascade and baselines are. The teacher sampler (sampling.teacher_steps Euler steps with
    CFG; `steps` overrides the count) is the default, the few-step one (the student's step list, or
    `steps` of it) for the acceleration LoRA and stacks."""
    # the evaluation's code, imported here: the registry's model imports this module for the student only
    from collectionlora.evaluate.evaluation import edit as sample_method
    from collectionlora.evaluate.methods import Method, acceleration_lora, write_stacked

    bank = open_bank(params.bank)
    chosen = bank.effect(effect) if effect is not None else None
    path = lora_file(bank, lora, chosen)
    stack = acceleration_lora(bank, "which --accelerate stacks (train one with `collectionlora acceleration train`)") if accelerate else None
    few_step = (sampler or (FEW_STEP_SAMPLER if accelerate or lora == ACCELERATION else TEACHER_SAMPLER)) == FEW_STEP_SAMPLER
    sampling = params.sampling if few_step or steps is None else params.sampling.model_copy(update={"teacher_steps": steps})
    key = chosen.id if chosen is not None else "prompt"
    source = load_image_fitted(Path(image), params.base.resolution)  # before loading the base
    backbone = Backbone.load(params.base, base or bank.base_dir)
    adapters = AdapterSet(backbone.transformer)
    with tempfile.TemporaryDirectory(prefix="collectionlora-edit-") as work:
        if stack is not None:
            shapes = base_linear_shapes(backbone.transformer)
            path = write_stacked(read_lora(path, shapes), read_lora(stack, shapes), Path(work) / "stacked.safetensors")
        adapters.add_teacher(key, path)
        timesteps = student_timesteps(sampling, steps) if few_step else None
        nfe = len(timesteps) if timesteps else sampling.teacher_steps * (2 if sampling.teacher_cfg_scale != 1.0 else 1)
        method = Method(lora, f"edit --lora {lora}", backbone, adapters, {key: key}, {key: chosen.prompt if prompt is None else prompt}, timesteps, nfe)
        edited = sample_method(method, key, source[None], [seed], sampling)[0]
    return write_edit(edited, Path(out))


def lora_file(bank: Bank, lora: str, effect: Effect | None) -> Path:
    """The file `--lora` names: `effect`'s teacher, the bank's acceleration LoRA, or a path (a folder
    stands for the pytorch_lora_weights.safetensors in it, as `teachers train --out` writes)."""
    if lora == TEACHER:
        return effect.teacher
    if lora == ACCELERATION:
        from collectionlora.evaluate.methods import acceleration_lora

        return acceleration_lora(bank, "which --lora acceleration applies (train one with `collectionlora acceleration train`)")
    path = Path(lora)
    if path.is_dir():
        path = path / LORA_WEIGHTS
    if not path.is_file():
        raise CollectionLoraError(f"{path}: no such LoRA file (--lora takes {STUDENT}, {TEACHER}, {ACCELERATION} or a .safetensors file or its folder)")
    refuse_pickle(path)  # before loading the base; the rest of the file is checked against it
    return path
