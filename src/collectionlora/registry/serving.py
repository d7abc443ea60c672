"""The registered model's request format: a DataFrame of {image (base64 PNG or JPEG), effect id or free
prompt, steps, seed} in, edited images as base64 PNG out. The schema is the model's signature; the
editing itself is `CollectionEditor`, the same code as `collectionlora edit`."""

from __future__ import annotations

import base64
import binascii
import math

import pandas as pd

from collectionlora.edit import CollectionEditor
from collectionlora.errors import CollectionLoraError
from collectionlora.images import decode_image_fitted, encode_png

IMAGE, EFFECT, PROMPT, STEPS, SEED = "image", "effect", "prompt", "steps", "seed"
MAX_IMAGE_BYTES = 32 << 20  # a request image beyond this is refused before decoding


def signature():
    """Inputs: image (required), effect or prompt, steps (default: the trained list), seed (default 0)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    inputs = Schema(
        [
            ColSpec("string", IMAGE),
            ColSpec("string", EFFECT, required=False),
            ColSpec("string", PROMPT, required=False),
            ColSpec("long", STEPS, required=False),
            ColSpec("long", SEED, required=False),
        ]
    )
    return ModelSignature(inputs=inputs, outputs=Schema([ColSpec("string", IMAGE)]))


def encode_request_image(png: bytes) -> str:
    return base64.b64encode(png).decode("ascii")


def predict_frame(editor: CollectionEditor, frame: pd.DataFrame) -> pd.DataFrame:
    """Edit every row; a bad row is a one-line error naming the row and column."""
    if IMAGE not in frame.columns:
        raise CollectionLoraError(f"request: column '{IMAGE}' is required (base64 PNG)")
    images = []
    for index, row in enumerate(frame.to_dict(orient="records")):
        source = decode_image_fitted(_image_bytes(row.get(IMAGE), index), editor.backbone.resolution, f"request row {index}: {IMAGE}")
        steps = _optional_int(row.get(STEPS), index, STEPS)
        seed = _optional_int(row.get(SEED), index, SEED)
        edited = editor.edit(source, _prompt(editor, row, index), steps, 0 if seed is None else seed)
        images.append(encode_request_image(encode_png(edited)))
    return pd.DataFrame({IMAGE: images})


def _prompt(editor: CollectionEditor, row: dict, index: int) -> str:
    effect, prompt = _optional_str(row.get(EFFECT)), _optional_str(row.get(PROMPT))
    if (effect is None) == (prompt is None):
        raise CollectionLoraError(f"request row {index}: give exactly one of '{EFFECT}' (one of {', '.join(editor.effects)}) or '{PROMPT}'")
    if effect is not None:
        if effect not in editor.effects:
            raise CollectionLoraError(f"request row {index}: {EFFECT}: unknown effect '{effect}' (known: {', '.join(editor.effects)})")
        return editor.prompt(effect)
    return prompt


def _image_bytes(value, index: int) -> bytes:
    if not isinstance(value, str) or not value:
        raise CollectionLoraError(f"request row {index}: {IMAGE}: expected a base64-encoded image")
    if len(value) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise CollectionLoraError(f"request row {index}: {IMAGE}: larger than {MAX_IMAGE_BYTES >> 20} MiB")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise CollectionLoraError(f"request row {index}: {IMAGE}: not valid base64") from None


def _optional_str(value) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value)
    return text if text.strip() else None


def _optional_int(value, index: int, column: str) -> int | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, bool) or not float(value).is_integer() or int(value) < (1 if column == STEPS else 0):
        raise CollectionLoraError(f"request row {index}: {column}: expected a {'positive' if column == STEPS else 'non-negative'} integer, got {value!r}")
    return int(value)
