"""LoRA files: layouts normalise to one form, mixed ranks load into a real transformer, bad files are refused."""

from __future__ import annotations

import copy
import json
import os
import pickle
import re
import stat
from pathlib import Path

import pytest
import torch
from bankfactory import random_lora, tiny_transformer
from diffusers import QwenImageEditPlusPipeline
from peft import set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from collectionlora.errors import LoraFileError
from collectionlora.lorafile import (
    LoraWeights,
    base_linear_shapes,
    base_linear_shapes_from_safetensors,
    peft_config_for,
    read_lora,
    read_lora_header,
    to_peft_state_dict,
    write_lora,
)

RANKS = {
    "attn.to_q": 4,
    "attn.add_q_proj": 2,
    "attn.to_out.0": 3,
    "attn.to_add_out": 2,
    "img_mlp.net.0.proj": 4,
    "txt_mlp.net.2": 1,
}


@pytest.fixture(scope="module")
def transformer():
    return tiny_transformer().eval()


@pytest.fixture(scope="module")
def shapes(transformer) -> dict[str, tuple[int, int]]:
    return base_linear_shapes(transformer)


@pytest.fixture(scope="module")
def mixed(shapes) -> LoraWeights:
    """Mixed ranks and alphas across modules."""
    base = random_lora(shapes, RANKS, None, seed=3)
    modules = {}
    for i, (name, down, up) in enumerate(base.pairs()):
        modules[name] = (down, up * 10, [None, 2.0, 6.0][i % 3])
    return LoraWeights.from_tensors(modules)


def assert_same(a: LoraWeights, b: LoraWeights) -> None:
    assert list(a.modules) == list(b.modules)
    assert a.ranks() == b.ranks() and a.alphas() == b.alphas()
    for (name, down_a, up_a), (_, down_b, up_b) in zip(a.pairs(), b.pairs()):
        assert torch.equal(down_a, down_b) and torch.equal(up_a, up_b), name


def comfyui_file(weights: LoraWeights, path: Path) -> None:
    tensors = {}
    for name, down, up in weights.pairs():
        tensors[f"diffusion_model.{name}.lora_down.weight"] = down.contiguous()
        tensors[f"diffusion_model.{name}.lora_up.weight"] = up.contiguous()
        tensors[f"diffusion_model.{name}.alpha"] = torch.tensor(weights.modules[name].alpha)
    save_file(tensors, path)


def test_layouts_normalise_identically(mixed, shapes, tmp_path):
    for layout in ("diffusers", "peft", "kohya"):
        path = tmp_path / layout / "lora.safetensors"
        write_lora(mixed, path, layout)
        loaded = read_lora(path, shapes)
        assert loaded.layout == layout
        assert_same(mixed, loaded)
    comfyui_file(mixed, tmp_path / "comfyui.safetensors")
    assert_same(mixed, read_lora(tmp_path / "comfyui.safetensors", shapes))


def test_peft_adapter_name_and_prefixes(mixed, shapes, tmp_path):
    write_lora(mixed, tmp_path / "peft" / "adapter_model.safetensors", "peft")
    plain = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    renamed = {"model." + re.sub(r"\.(lora_[AB])\.weight$", r".\1.default.weight", k): v for k, v in plain.items()}
    save_file(renamed, tmp_path / "peft" / "adapter_model.safetensors")
    assert_same(mixed, read_lora(tmp_path / "peft" / "adapter_model.safetensors", shapes))
    # Without adapter_config.json (alphas live there for PEFT), alpha falls back to the rank.
    (tmp_path / "peft" / "adapter_config.json").unlink()
    loaded = read_lora(tmp_path / "peft" / "adapter_model.safetensors", shapes)
    assert loaded.alphas() == {name: float(rank) for name, rank in loaded.ranks().items()}


def test_reads_diffusers_save_lora_weights(mixed, shapes, tmp_path):
    state = {f"{name}.lora_A.weight": down for name, down, _ in mixed.pairs()}
    state.update({f"{name}.lora_B.weight": up for name, _, up in mixed.pairs()})
    QwenImageEditPlusPipeline.save_lora_weights(tmp_path, transformer_lora_layers=state)
    loaded = read_lora(tmp_path / "pytorch_lora_weights.safetensors", shapes)
    assert loaded.layout == "diffusers" and loaded.ranks() == mixed.ranks()


def forward(model) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return model(
            hidden_states=torch.randn(1, 16, 48, generator=generator),
            encoder_hidden_states=torch.randn(1, 5, 32, generator=generator),
            encoder_hidden_states_mask=torch.ones(1, 5),
            timestep=torch.tensor([0.5]),
            img_shapes=[(1, 4, 4)],
            return_dict=False,
        )[0]


def merged_reference(transformer, weights: LoraWeights):
    """The base with W += (alpha / r) B A merged in: what any correct adapter must compute."""
    reference = copy.deepcopy(transformer)
    with torch.no_grad():
        for name, down, up in weights.pairs():
            reference.get_submodule(name).weight += weights.modules[name].scale * up.float() @ down.float()
    return reference


def test_mixed_ranks_kohya_alpha_in_real_transformer(mixed, transformer, shapes, tmp_path):
    write_lora(mixed, tmp_path / "kohya.safetensors", "kohya")
    weights = read_lora(tmp_path / "kohya.safetensors", shapes)
    assert weights.alphas() == mixed.alphas()
    assert {m.scale for m in weights.modules.values()} > {1.0}  # alpha != rank somewhere: the .alpha is used
    model = copy.deepcopy(transformer)
    model.add_adapter(peft_config_for(weights), adapter_name="teacher")
    result = set_peft_model_state_dict(model, to_peft_state_dict(weights), adapter_name="teacher")
    assert not result.unexpected_keys and not [k for k in result.missing_keys if "lora_" in k]
    expected = forward(merged_reference(transformer, weights))
    assert not torch.allclose(expected, forward(transformer), atol=1e-3)
    torch.testing.assert_close(forward(model), expected, atol=1e-5, rtol=1e-4)


def test_diffusers_layout_loads_in_diffusers(mixed, transformer, tmp_path):
    """diffusers' own loader (the `load_lora_weights` path) reads our alphas from the header metadata."""
    write_lora(mixed, tmp_path / "lora.safetensors", "diffusers")
    loader = QwenImageEditPlusPipeline
    state, metadata = loader.lora_state_dict(tmp_path / "lora.safetensors", return_lora_metadata=True)
    model = copy.deepcopy(transformer)
    loader.load_lora_into_transformer(state, transformer=model, adapter_name="d", metadata=metadata)
    torch.testing.assert_close(forward(model), forward(merged_reference(transformer, mixed)), atol=1e-5, rtol=1e-4)


def test_adapter_config_alpha_pattern(mixed, shapes, tmp_path):
    write_lora(mixed, tmp_path / "adapter_model.safetensors", "peft")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["alpha_pattern"] and config["rank_pattern"]
    config["r"] = 99
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(LoraFileError, match=r"adapter_config.json: r: says rank 99"):
        read_lora(tmp_path / "adapter_model.safetensors", shapes)


@pytest.mark.parametrize("name", ["lora.bin", "lora.pt", "lora.pth", "lora.ckpt", "lora.pkl", "disguised.safetensors"])
def test_pickle_refused(name, tmp_path):
    path = tmp_path / name
    path.write_bytes(pickle.dumps({"w": [0.0]}, protocol=4))
    with pytest.raises(LoraFileError, match="pickle files are refused; convert to safetensors"):
        read_lora(path, None)


def test_torch_zip_refused(tmp_path):
    path = tmp_path / "lora.safetensors"
    torch.save({"w": torch.zeros(1)}, path)
    with pytest.raises(LoraFileError, match="pickle files are refused"):
        read_lora(path, None)


def test_header_shapes_equal_live_model(transformer, shapes, tmp_path):
    transformer.save_pretrained(tmp_path / "single")
    assert base_linear_shapes_from_safetensors(tmp_path / "single") == shapes
    transformer.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert base_linear_shapes_from_safetensors(tmp_path / "sharded") == shapes


def test_live_shapes_see_through_adapters(mixed, transformer, shapes):
    model = copy.deepcopy(transformer)
    model.add_adapter(peft_config_for(mixed), adapter_name="a")
    assert base_linear_shapes(model) == shapes


def test_kohya_needs_base_names(mixed, tmp_path):
    write_lora(mixed, tmp_path / "kohya.safetensors", "kohya")
    with pytest.raises(LoraFileError, match="kohya module names need the base"):
        read_lora(tmp_path / "kohya.safetensors", None)


def test_values_checked_lazily_and_eagerly(mixed, shapes, tmp_path):
    path = tmp_path / "lora.safetensors"
    write_lora(mixed, path, "diffusers")
    tensors = load_file(path)
    key = sorted(k for k in tensors if k.endswith("lora_A.weight"))[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, path, metadata={"format": "pt"})
    header = read_lora_header(path, shapes)  # header only: no data read yet
    with pytest.raises(LoraFileError, match=f"tensor {key}: contains non-finite"):
        to_peft_state_dict(header)
    with pytest.raises(LoraFileError, match=f"tensor {key}: contains non-finite"):
        read_lora(path, shapes)


def test_corrupt_file_one_line(tmp_path):
    path = tmp_path / "lora.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}\n\n\n\n\n\n")
    with pytest.raises(LoraFileError) as caught:
        read_lora(path, None)
    assert "\n" not in str(caught.value) and str(path) in str(caught.value)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_loras_get_an_ordinary_files_mode(mixed, tmp_path, umask):
    """safetensors writes 0600 files (through its own temp file): ours get 0666 minus the umask, like
    every other artifact."""
    old = os.umask(umask)
    try:
        for layout in ("diffusers", "peft", "kohya"):
            write_lora(mixed, tmp_path / layout / "pytorch_lora_weights.safetensors", layout)
    finally:
        os.umask(old)
    modes = {path.relative_to(tmp_path).as_posix(): stat.S_IMODE(path.stat().st_mode) for path in tmp_path.rglob("*")}
    assert len(modes) == 7  # three folders, three LoRAs and peft's adapter_config.json
    for name, mode in modes.items():
        assert mode == (0o777 if (tmp_path / name).is_dir() else 0o666) & ~umask, (name, oct(mode))

