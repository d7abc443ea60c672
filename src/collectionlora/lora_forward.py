"""A frozen adapted linear computed as ONE matmul with the merged weight W + s * B @ A, instead of
peft's side path (base matmul, then x @ A, then @ B, then an add).

Why: on the embedded tiny base a LoRA matmul costs about as much as the base matmul it adapts, so
peft's path makes a teacher forward much slower than a base forward. Frozen adapters (teachers, or any
adapter in a no-grad pass: the student's backward simulation, the critic's fake score) are merged once
and reuse the merged weight until one of its tensors changes in place (an optimiser step, a teacher
copied into its slot): the cache is keyed by the tensors' version counters, so it can never serve stale
weights. The outputs differ from peft's only by float rounding.

A forward that trains the adapter keeps peft's path: through a merged weight the backward would form
the full d_out x d_in weight gradient before projecting it onto A and B, more arithmetic than peft's
low-rank backward (bench_distill.py could not tell the two apart from this machine's noise).

Used where it pays and is exact enough: float32 weights on the CPU. On a GPU, or with bf16/fp16 base
weights (where merging a small fp32 delta into low-precision weights would round it away), peft's own
path runs unchanged.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from peft.tuners.lora import Linear as LoraLinear

_PEFT_FORWARD = "_collectionlora_peft_forward"
_CACHE = "_collectionlora_merged"


def merged_forward_applies(transformer: torch.nn.Module) -> bool:
    """The rule of the module docstring: float32 weights on the CPU."""
    weight = next(transformer.parameters())
    return weight.device.type == "cpu" and weight.dtype == torch.float32


def install(transformer: torch.nn.Module) -> int:
    """Route every peft LoRA linear of `transformer` not yet routed through the merged forward; returns
    how many were routed now. Call it again whenever adapters are added or deleted: it also drops every
    cached merged weight (a new adapter's tensors may reuse a deleted one's memory)."""
    routed = 0
    for module in transformer.modules():
        if not isinstance(module, LoraLinear):
            continue
        module.__dict__.pop(_CACHE, None)
        if not hasattr(module, _PEFT_FORWARD):
            setattr(module, _PEFT_FORWARD, module.forward)
            module.forward = types.MethodType(_merged_forward, module)
            routed += 1
    return routed


def uninstall(transformer: torch.nn.Module) -> None:
    """Back to peft's forward everywhere (benchmarks compare the two)."""
    for module in transformer.modules():
        if hasattr(module, _PEFT_FORWARD):
            del module.forward  # the instance attribute; the class's forward shows again
            delattr(module, _PEFT_FORWARD)
            module.__dict__.pop(_CACHE, None)


def _single_plain_adapter(layer: LoraLinear) -> str | None:
    """The one active vanilla LoRA adapter this layer would apply, or None when peft's path is needed."""
    if layer.disable_adapters or layer.merged:
        return None
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if len(active) != 1:
        return None
    adapter = active[0]
    if adapter in layer.lora_variant or not isinstance(layer.lora_dropout[adapter], torch.nn.Identity):
        return None
    return adapter


def _merged_weight(layer: LoraLinear, adapter: str, weight: torch.Tensor) -> torch.Tensor:
    down, up = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    scaling = layer.scaling[adapter]
    key = (adapter, down.data_ptr(), up.data_ptr(), down._version, up._version, weight._version, scaling)
    cached = layer.__dict__.get(_CACHE)
    if cached is not None and cached[0] == key:
        return cached[1]
    with torch.no_grad():
        merged = torch.addmm(weight, up, down, alpha=scaling)
    layer.__dict__[_CACHE] = (key, merged)
    return merged


def _trains(layer: LoraLinear, adapter: str) -> bool:
    return torch.is_grad_enabled() and (layer.lora_A[adapter].weight.requires_grad or layer.lora_B[adapter].weight.requires_grad)


def _merged_forward(self: LoraLinear, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    adapter = None if args or kwargs else _single_plain_adapter(self)
    base = self.get_base_layer()
    if (
        adapter is None
        or _trains(self, adapter)
        or x.dtype != base.weight.dtype
        or self.lora_A[adapter].weight.dtype != base.weight.dtype
    ):
        return getattr(self, _PEFT_FORWARD)(x, *args, **kwargs)
    return F.linear(x, _merged_weight(self, adapter, base.weight), base.bias)
