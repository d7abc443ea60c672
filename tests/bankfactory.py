"""Build a small valid effect bank, and break it with declarative mutations (tests/fixtures/bad_banks)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
import yaml
from diffusers import QwenImageTransformer2DModel
from PIL import Image
from safetensors.torch import load_file, save_file

from collectionlora.images import save_png
from collectionlora.lorafile import LoraWeights, base_linear_shapes, write_lora

IMAGE_SIZE = 32
PAIRS = 3
# effect id -> (rank per targeted module kind, alpha or None)
EFFECTS = {
    "sepia": ({"attn.to_q": 2, "attn.to_v": 2}, None),
    "blur": ({"attn.to_q": 4, "attn.to_out.0": 2, "img_mlp.net.0.proj": 4}, 8.0),
    "invert": ({"attn.add_q_proj": 3, "attn.to_add_out": 3}, None),
}
TEACHER = "effects/{id}/teacher/pytorch_lora_weights.safetensors"


def tiny_transformer(seed: int = 0) -> QwenImageTransformer2DModel:
    torch.manual_seed(seed)
    return QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=48,
        out_channels=12,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        axes_dims_rope=(8, 4, 4),
    )


def random_lora(
    shapes: dict[str, tuple[int, int]], ranks: dict[str, int], alpha: float | None, seed: int
) -> LoraWeights:
    """A LoRA on every block module whose path ends with one of `ranks`' kinds."""
    generator = torch.Generator().manual_seed(seed)
    modules = {}
    for name, (out_features, in_features) in shapes.items():
        for kind, rank in ranks.items():
            if name.startswith("transformer_blocks.") and name.endswith("." + kind):
                down = torch.randn(rank, in_features, generator=generator) * 0.1
                up = torch.randn(out_features, rank, generator=generator) * 0.1
                modules[name] = (down, up, alpha)
    return LoraWeights.from_tensors(modules)


def module_lora(shapes: dict[str, tuple[int, int]], modules: dict[str, int], alpha: float | None, seed: int) -> LoraWeights:
    """Random A and B (B non-zero, so the adapter changes the output) on exactly `modules` (path -> rank)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, rank in modules.items():
        out_features, in_features = shapes[name]
        down = torch.randn(rank, in_features, generator=generator) * 0.3
        up = torch.randn(out_features, rank, generator=generator) * 0.3
        tensors[name] = (down, up, alpha)
    return LoraWeights.from_tensors(tensors)


PROBE_PROMPT = "Convert the photo to black and white"


def probe_velocity(backbone) -> torch.Tensor:
    """The transformer's prediction on a fixed input: compares adapter states across tests."""
    from collectionlora.effects import make_sources

    sources = make_sources("eval", 2, 32, 0)
    x = torch.randn(2, 64, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return backbone.velocity(
            x, torch.full((2,), 0.7), backbone.encode_images(sources), backbone.encode_prompts([PROBE_PROMPT] * 2, sources)
        )


def build_bank(root: Path) -> Path:
    """Write the valid bank under `root` and return its bank.yaml path."""
    transformer = tiny_transformer()
    transformer.save_pretrained(root / "base" / "transformer")
    model_index = {
        "_class_name": "QwenImageEditPlusPipeline",
        "transformer": ["diffusers", "QwenImageTransformer2DModel"],
    }
    (root / "base" / "model_index.json").write_text(json.dumps(model_index))
    shapes = base_linear_shapes(transformer)
    generator = torch.Generator().manual_seed(1)

    def image() -> torch.Tensor:
        return torch.rand(3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)

    effects = []
    for seed, (effect_id, (ranks, alpha)) in enumerate(EFFECTS.items()):
        write_lora(random_lora(shapes, ranks, alpha, seed), root / TEACHER.format(id=effect_id), "diffusers")
        for i in range(PAIRS):
            save_png(image(), root / f"effects/{effect_id}/pairs/{i:04d}_source.png")
            save_png(image(), root / f"effects/{effect_id}/pairs/{i:04d}_result.png")
        effects.append(
            {
                "id": effect_id,
                "category": "test",
                "prompt": f"Apply the {effect_id} effect",
                "teacher": TEACHER.format(id=effect_id),
                "pairs": f"effects/{effect_id}/pairs",
            }
        )
    for i in range(3):
        save_png(image(), root / f"general/sources/{i:04d}.png")
    for i in range(2):
        save_png(image(), root / f"eval/{i:04d}.png")
    (root / "general" / "instructions.txt").write_text("Make it brighter\nAdd a soft glow\n", encoding="utf-8")
    manifest = {
        "version": 1,
        "name": "test-bank",
        "base": {"path": "base"},
        "general": {"sources": "general/sources", "instructions": "general/instructions.txt"},
        "eval": "eval",
        "effects": effects,
    }
    path = root / "bank.yaml"
    path.write_text(yaml.safe_dump(manifest, sort_keys=False), encoding="utf-8")
    return path


def apply_mutation(root: Path, steps: list[dict]) -> None:
    """Apply a bad-bank case's steps; paths are relative to the bank root ('../x' lands beside it)."""
    for step in steps:
        step = dict(step)
        op = step.pop("op")
        _OPS[op](root, **step)


def _write(root: Path, path: str, text: str, encoding: str = "utf-8") -> None:
    (root / path).parent.mkdir(parents=True, exist_ok=True)
    (root / path).write_bytes(text.encode(encoding))


def _reencode(root: Path, path: str, encoding: str) -> None:
    (root / path).write_bytes((root / path).read_text(encoding="utf-8").encode(encoding))


def _truncate(root: Path, path: str, keep: int) -> None:
    data = (root / path).read_bytes()
    (root / path).write_bytes(data[:keep])


def _image_mode(root: Path, path: str, mode: str) -> None:
    with Image.open(root / path) as image:
        image.convert(mode).save(root / path, format="PNG")


def _image_size(root: Path, path: str, size: int) -> None:
    with Image.open(root / path) as image:
        image.resize((size, size)).save(root / path, format="PNG")


def _lora_value(root: Path, path: str, key: str, value: float) -> None:
    tensors = load_file(root / path)
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = value
    save_file(tensors, root / path)


def _lora_tensor(root: Path, path: str, key: str, shape: list[int]) -> None:
    """Set (replace or add) a tensor, keeping the rest of the file."""
    tensors = load_file(root / path)
    tensors[key] = torch.zeros(shape)
    save_file(tensors, root / path)


def _manifest_set(root: Path, field: str, value: object) -> None:
    data = yaml.safe_load((root / "bank.yaml").read_text(encoding="utf-8"))
    *parents, last = _parse_field(field)
    target = data
    for part in parents:
        target = target[part]
    target[last] = value
    (root / "bank.yaml").write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")


def _manifest_delete(root: Path, field: str) -> None:
    data = yaml.safe_load((root / "bank.yaml").read_text(encoding="utf-8"))
    *parents, last = _parse_field(field)
    target = data
    for part in parents:
        target = target[part]
    del target[last]
    (root / "bank.yaml").write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")


def _parse_field(field: str) -> list[str | int]:
    return [int(part) if part.isdigit() else part for part in field.split(".")]


def _symlink_outside(root: Path, path: str) -> None:
    """Replace a file by a symlink to a copy of it outside the root."""
    outside = root.parent / ("outside" + Path(path).suffix)
    outside.write_bytes((root / path).read_bytes())
    (root / path).unlink()
    (root / path).symlink_to(outside)


def _move(root: Path, src: str, dst: str) -> None:
    (root / dst).parent.mkdir(parents=True, exist_ok=True)
    (root / src).rename(root / dst)


def _delete(root: Path, glob: str) -> None:
    for path in sorted(root.glob(glob)):
        path.unlink()


def _pickle(root: Path, path: str) -> None:
    (root / path).parent.mkdir(parents=True, exist_ok=True)
    (root / path).write_bytes(pickle.dumps({"weight": np.zeros(2).tolist()}, protocol=4))


def _png_header_size(root: Path, path: str, width: int, height: int) -> None:
    """Rewrite a real PNG's IHDR (CRC fixed) to claim width x height; the pixel data stays 32x32."""
    data = bytearray((root / path).read_bytes())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    (root / path).write_bytes(bytes(data))


def _blank_png(root: Path, path: str, width: int, height: int) -> None:
    """A real RGB PNG of width x height, one colour (compresses to little, decodes to width*height*3 bytes)."""
    Image.new("RGB", (width, height), (120, 30, 200)).save(root / path, format="PNG")


def _lora_dtype(root: Path, path: str, key: str, dtype: str) -> None:
    tensors = load_file(root / path)
    tensors[key] = tensors[key].to(getattr(torch, dtype))
    save_file(tensors, root / path)


def _lora_scale(root: Path, path: str, suffix: str, factor: float) -> None:
    """Multiply every tensor whose key ends with `suffix` (e.g. lora_B.weight) by `factor`, metadata kept."""
    from safetensors import safe_open

    with safe_open(str(root / path), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = {k: v * factor if k.endswith(suffix) else v for k, v in load_file(root / path).items()}
    save_file(tensors, root / path, metadata=metadata)


def _relayout(root: Path, path: str, layout: str) -> None:
    """Rewrite a LoRA in another layout (peft: tensors plus adapter_config.json beside them)."""
    from collectionlora.lorafile import read_lora

    weights = read_lora(root / path, None)
    copied = {name: (down.clone(), up.clone(), weights.modules[name].alpha) for name, down, up in weights.pairs()}
    write_lora(LoraWeights.from_tensors(copied), root / path, layout)


def _json_set(root: Path, path: str, field: str, value: object) -> None:
    data = json.loads((root / path).read_text(encoding="utf-8"))
    data[field] = value
    (root / path).write_text(json.dumps(data), encoding="utf-8")


def _write_json(root: Path, path: str, value: object) -> None:
    (root / path).parent.mkdir(parents=True, exist_ok=True)
    (root / path).write_text(json.dumps(value), encoding="utf-8")


def _copy(root: Path, src: str, dst: str) -> None:
    (root / dst).parent.mkdir(parents=True, exist_ok=True)
    if (root / src).is_dir():
        shutil.copytree(root / src, root / dst)
    else:
        shutil.copyfile(root / src, root / dst)


def _truncate_end(root: Path, path: str, drop: int) -> None:
    data = (root / path).read_bytes()
    (root / path).write_bytes(data[:-drop])


def _mkfifo(root: Path, path: str) -> None:
    """Replace `path` (if any) by a named pipe: opening it for reading would block forever."""
    (root / path).parent.mkdir(parents=True, exist_ok=True)
    (root / path).unlink(missing_ok=True)
    os.mkfifo(root / path)


def _symlink(root: Path, path: str, target: str) -> None:
    """Replace `path` (if any) by a symlink to `target` (an absolute path such as /dev/zero, or relative)."""
    (root / path).parent.mkdir(parents=True, exist_ok=True)
    (root / path).unlink(missing_ok=True)
    (root / path).symlink_to(target)


def _manifest_set_long(root: Path, field: str, fill: str, count: int, prefix: str = "", suffix: str = "") -> None:
    """Set a manifest field to prefix + fill * count + suffix (long ids, prompts, path components)."""
    _manifest_set(root, field, prefix + fill * count + suffix)


def _manifest_set_abspath(root: Path, field: str, path: str) -> None:
    """Set a manifest field to the absolute path of root / path (a base outside the bank)."""
    _manifest_set(root, field, str((root / path).resolve()))


def _manifest_nest(root: Path, field: str, depth: int) -> None:
    """Append `field: [[[...]]]`, `depth` levels deep, as raw text (safe_dump itself would recurse)."""
    with open(root / "bank.yaml", "a", encoding="utf-8") as handle:
        handle.write(f"{field}: {'[' * depth}{']' * depth}\n")


def _manifest_replace(root: Path, old: str, new: str) -> None:
    """Replace text in bank.yaml as raw characters (a NUL byte, say), bypassing the YAML writer."""
    text = (root / "bank.yaml").read_text(encoding="utf-8")
    assert old in text, old
    (root / "bank.yaml").write_text(text.replace(old, new), encoding="utf-8")


_OPS = {
    "write": _write,
    "reencode": _reencode,
    "truncate": _truncate,
    "image_mode": _image_mode,
    "image_size": _image_size,
    "lora_value": _lora_value,
    "lora_tensor": _lora_tensor,
    "manifest_set": _manifest_set,
    "manifest_delete": _manifest_delete,
    "symlink_outside": _symlink_outside,
    "move": _move,
    "delete": _delete,
    "pickle": _pickle,
    "png_header_size": _png_header_size,
    "blank_png": _blank_png,
    "lora_dtype": _lora_dtype,
    "lora_scale": _lora_scale,
    "relayout": _relayout,
    "json_set": _json_set,
    "write_json": _write_json,
    "copy": _copy,
    "truncate_end": _truncate_end,
    "mkfifo": _mkfifo,
    "symlink": _symlink,
    "manifest_set_long": _manifest_set_long,
    "manifest_set_abspath": _manifest_set_abspath,
    "manifest_nest": _manifest_nest,
    "manifest_replace": _manifest_replace,
}
