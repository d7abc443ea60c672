"""The merged-weight LoRA forward (lora_forward.py) against peft's own path: same outputs, same
gradients, and a cache of frozen merged weights that never serves stale weights."""

from __future__ import annotations

import torch
from bankfactory import PROBE_PROMPT, module_lora, probe_velocity

from collectionlora import lora_forward
from collectionlora.adapters import NONE, AdapterSet
from collectionlora.effects import make_sources
from collectionlora.lorafile import base_linear_shapes, write_lora

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "img_mlp.net.2"]


def _trainable(backbone, seed: int = 0) -> tuple[AdapterSet, list[torch.nn.Parameter]]:
    adapters = AdapterSet(backbone.transformer)
    params = adapters.add_trainable("student", 4, 8, TARGETS, seed)
    with torch.no_grad():  # B starts at zero: give the adapter a delta to merge
        for p in params:
            p.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed + 1))
    return adapters, params


def _loss_and_grads(backbone, params) -> tuple[torch.Tensor, list[torch.Tensor]]:
    for p in params:
        p.grad = None
    sources = make_sources("eval", 2, 32, 0)
    x = torch.randn(2, 64, 48, generator=torch.Generator().manual_seed(0))
    text = backbone.encode_prompts([PROBE_PROMPT] * 2, sources)
    velocity = backbone.velocity(x, torch.full((2,), 0.7), backbone.encode_images(sources), text)
    velocity.square().mean().backward()
    return velocity.detach(), [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]


def _merged_layers(backbone) -> int:
    return sum(1 for m in backbone.transformer.modules() if "_collectionlora_merged" in m.__dict__)


def test_a_frozen_pass_runs_merged_and_matches_peft_and_a_training_pass_keeps_peft(backbone):
    adapters, params = _trainable(backbone)
    assert adapters.merged_forward  # float32 on the CPU: the rule applies
    adapters.activate("student")
    routed, routed_grads = _loss_and_grads(backbone, params)
    assert _merged_layers(backbone) == 0  # the training pass took peft's low-rank path
    merged = probe_velocity(backbone)  # no grad: merged weights
    assert _merged_layers(backbone) > 0
    lora_forward.uninstall(backbone.transformer)
    peft, peft_grads = _loss_and_grads(backbone, params)
    assert not torch.equal(merged, probe_velocity_base(backbone, adapters))  # the adapter does something
    torch.testing.assert_close(merged, peft, atol=2e-5, rtol=1e-4)
    assert torch.equal(routed, peft)
    assert all(torch.equal(got, want) for got, want in zip(routed_grads, peft_grads))
    assert sum(float(g.abs().sum()) for g in routed_grads) > 0


def probe_velocity_base(backbone, adapters: AdapterSet) -> torch.Tensor:
    active = adapters.active
    adapters.activate(NONE)
    try:
        return probe_velocity(backbone)
    finally:
        adapters.activate(active)


def test_cached_merged_weight_follows_optimizer_steps_and_teacher_switches(backbone, tmp_path):
    shapes = base_linear_shapes(backbone.transformer)
    modules = {"transformer_blocks.0.attn.to_q": 4, "transformer_blocks.1.attn.to_v": 4}
    files = {}
    for i, name in enumerate(("a", "b")):
        files[name] = tmp_path / name / "pytorch_lora_weights.safetensors"
        write_lora(module_lora(shapes, modules, None, seed=i), files[name], "diffusers")
    adapters, params = _trainable(backbone)
    for name, path in files.items():
        adapters.add_teacher(name, path)

    def no_grad_velocity(name: str) -> torch.Tensor:
        adapters.activate(name)
        with torch.no_grad():
            return probe_velocity(backbone)

    first = {name: no_grad_velocity(name) for name in ("a", "b", "student")}
    again = {name: no_grad_velocity(name) for name in ("a", "b", "student")}  # a and b share one slot
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert not torch.allclose(first["a"], first["b"])

    optimizer = torch.optim.SGD(params, lr=0.5)
    adapters.activate("student")
    _loss_and_grads(backbone, params)
    optimizer.step()  # in place: the cached merge of the old weights must not be served
    stepped = no_grad_velocity("student")
    lora_forward.uninstall(backbone.transformer)
    torch.testing.assert_close(stepped, no_grad_velocity("student"), atol=2e-5, rtol=1e-4)
    assert not torch.allclose(stepped, first["student"])


def test_the_rule_keeps_peft_path_for_low_precision_weights(backbone):
    assert lora_forward.merged_forward_applies(backbone.transformer)
    backbone.transformer.to(torch.bfloat16)
    try:
        assert not lora_forward.merged_forward_applies(backbone.transformer)
        assert not AdapterSet(backbone.transformer).merged_forward
    finally:
        backbone.transformer.to(torch.float32)
