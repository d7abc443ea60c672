"""Adapters on one shared base: teachers in any key layout and rank, switching, lazy loading and
requires_grad discipline, checked against diffusers' own `load_lora_weights`."""

from __future__ import annotations

import warnings

import pytest
import torch
from bankfactory import PROBE_PROMPT, module_lora, probe_velocity

from collectionlora.adapters import NONE, AdapterSet
from collectionlora.effects import make_sources
from collectionlora.lorafile import LoraWeights, base_linear_shapes, write_lora
from collectionlora.models.backbone import Backbone


def random_lora(backbone: Backbone, modules: dict[str, int], alpha: float | None, seed: int) -> LoraWeights:
    return module_lora(base_linear_shapes(backbone.transformer), modules, alpha, seed)


def diffusers_reference(params, base_dir, path) -> torch.Tensor:
    fresh = Backbone.load(params.base, base_dir)
    fresh.pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="ref")
    return probe_velocity(fresh)


TEACHERS = {
    # name -> (module -> rank, alpha)
    "a": ({"transformer_blocks.0.attn.to_q": 4, "transformer_blocks.1.attn.to_v": 4, "transformer_blocks.0.img_mlp.net.2": 4}, None),
    "b": ({"transformer_blocks.0.attn.to_q": 2, "transformer_blocks.1.attn.add_k_proj": 6}, 3.0),
    "c": ({"transformer_blocks.1.attn.to_out.0": 8, "transformer_blocks.0.attn.to_add_out": 8}, 16.0),
}


@pytest.fixture
def teacher_files(backbone, tmp_path):
    files = {}
    for i, (name, (modules, alpha)) in enumerate(TEACHERS.items()):
        files[name] = tmp_path / name / "pytorch_lora_weights.safetensors"
        write_lora(random_lora(backbone, modules, alpha, seed=i), files[name], "diffusers")
    return files


def test_mixed_rank_teachers_match_diffusers_and_switch_back_and_forth(backbone, tiny_params, tiny_base_dir, teacher_files):
    adapters = AdapterSet(backbone.transformer)
    base = probe_velocity(backbone)
    for name, path in teacher_files.items():
        adapters.add_teacher(name, path)
    expected = {name: diffusers_reference(tiny_params, tiny_base_dir, path) for name, path in teacher_files.items()}
    for name in ["a", "b", "c", "a", "c", NONE, "b"]:
        adapters.activate(name)
        got = probe_velocity(backbone)
        want = base if name == NONE else expected[name]
        assert torch.allclose(got, want, atol=1e-5), (name, (got - want).abs().max())
    assert not torch.allclose(expected["a"], base)


@pytest.mark.parametrize("layout", ["peft", "kohya"])
def test_key_layouts_give_the_same_teacher(backbone, tmp_path, layout):
    lora = random_lora(backbone, TEACHERS["b"][0], 3.0, seed=7)
    write_lora(lora, tmp_path / "d.safetensors", "diffusers")
    write_lora(lora, tmp_path / layout / "l.safetensors", layout)
    adapters = AdapterSet(backbone.transformer)
    adapters.add_teacher("diffusers", tmp_path / "d.safetensors")
    adapters.add_teacher(layout, tmp_path / layout / "l.safetensors")
    adapters.activate("diffusers")
    reference = probe_velocity(backbone)
    adapters.activate(layout)
    assert torch.allclose(probe_velocity(backbone), reference, atol=1e-6)


def test_teachers_share_slots_so_memory_does_not_grow(backbone, tmp_path):
    adapters = AdapterSet(backbone.transformer)
    modules = TEACHERS["a"][0]
    for i in range(12):
        path = tmp_path / f"t{i}.safetensors"
        write_lora(random_lora(backbone, modules, None, seed=100 + i), path, "diffusers")
        adapters.add_teacher(f"t{i}", path)
    lora_params = [n for n, _ in backbone.transformer.named_parameters() if "lora_" in n]
    assert len(lora_params) == 2 * len(modules)  # one slot for twelve same-shaped teachers
    outputs = []
    for i in (0, 5, 11):
        adapters.activate(f"t{i}")
        outputs.append(probe_velocity(backbone))
    assert not torch.allclose(outputs[0], outputs[1]) and not torch.allclose(outputs[1], outputs[2])
    assert adapters.loads == 3 and adapters.switches == 3


def test_requires_grad_discipline(backbone, teacher_files):
    adapters = AdapterSet(backbone.transformer)
    student = adapters.add_trainable("student", 4, 4, ["to_q", "to_v"], seed=0)
    critic = adapters.add_trainable("critic", 4, 4, ["to_q", "to_v"], seed=1)
    for name, path in teacher_files.items():
        adapters.add_teacher(name, path)
    optimizer = torch.optim.SGD(student, lr=1.0)
    for name in ["a", "student", "b", "critic", NONE, "c", "student"]:
        adapters.activate(name)
        trainable = [n for n, p in backbone.transformer.named_parameters() if p.requires_grad]
        assert all("teacher_slot" not in n for n in trainable), name
        assert all(p.requires_grad for p in student + critic), name
        assert not any(p.requires_grad for n, p in backbone.transformer.named_parameters() if "lora_" not in n)
    # A student update through a teacher-active forward must not move the teacher.
    adapters.activate("a")
    slot_before = {n: p.detach().clone() for n, p in backbone.transformer.named_parameters() if "teacher_slot" in n}
    adapters.activate("student")
    velocity_with_grad = backbone.velocity(
        torch.randn(1, 64, 48), torch.full((1,), 0.5), torch.randn(1, 64, 48),
        backbone.encode_prompts([PROBE_PROMPT], make_sources("eval", 1, 32, 0)),
    )
    velocity_with_grad.square().mean().backward()
    assert all(p.grad is not None for p in student)
    optimizer.step()
    for n, p in backbone.transformer.named_parameters():
        if n in slot_before:
            assert torch.equal(p, slot_before[n]), n
            assert p.grad is None


def test_unknown_adapter_and_name_clash_are_errors(backbone, teacher_files):
    adapters = AdapterSet(backbone.transformer)
    adapters.add_teacher("a", teacher_files["a"])
    with pytest.raises(KeyError, match="unknown adapter 'zzz'"):
        adapters.activate("zzz")
    with pytest.raises(ValueError, match="already used"):
        adapters.add_teacher("a", teacher_files["b"])


def test_adding_adapters_keeps_the_active_one(backbone, teacher_files):
    """peft activates every newly added adapter; the set must keep what the caller activated."""
    adapters = AdapterSet(backbone.transformer)
    adapters.add_teacher("a", teacher_files["a"])
    adapters.activate("a")
    with_a = probe_velocity(backbone)
    adapters.add_trainable("student", 4, 4, ["to_q"], seed=0)
    adapters.add_teacher("c", teacher_files["c"])  # a new slot (other ranks)
    assert torch.allclose(probe_velocity(backbone), with_a, atol=1e-6)
    adapters.activate(NONE)
    base = probe_velocity(backbone)
    adapters.add_trainable("critic", 4, 4, ["to_q"], seed=1)
    assert torch.allclose(probe_velocity(backbone), base, atol=1e-6)
    adapters.remove("critic")
    assert torch.allclose(probe_velocity(backbone), base, atol=1e-6)


def test_several_adapters_on_one_base_print_no_peft_warning(backbone, teacher_files):
    """peft warns "Already found a `peft_config` attribute ... multiple adapters" for every adapter added
    after the first. Several named adapters on one base is this class's design: the warning is silenced
    where adapters are added, so distill and evaluate runs do not print it."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        adapters = AdapterSet(backbone.transformer)
        for name, path in teacher_files.items():  # three rank maps: three slots
            adapters.add_teacher(name, path)
        adapters.add_trainable("student", 4, 4, ["to_q"], seed=0)
        adapters.add_trainable("critic", 4, 4, ["to_q"], seed=1)
    assert len(backbone.transformer.peft_config) == 5
    assert not [str(w.message) for w in caught if "peft_config" in str(w.message)]

