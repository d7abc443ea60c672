"""The same trainer on one process or many under torchrun: rank from torchrun's environment, gloo on
CPU and nccl on CUDA, data-parallel over the LoRA parameters.

Gradients of the trainable LoRA parameters are averaged with one bucketed all-reduce per update
(what DistributedDataParallel does; its module wrapper cannot follow adapter switching on one
shared base, so the reduction is explicit). Rank 0 logs and saves.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def init_world(device: str) -> tuple[World, str]:
    """Join torchrun's process group when WORLD_SIZE > 1; returns the world and this rank's device."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World(0, 1, 0), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    on_cuda = device.startswith("cuda")
    if on_cuda:
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if on_cuda else "gloo", rank=rank, world_size=size)
    return World(rank, size, local_rank), device


def close_world(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def _flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _unflat(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def average_gradients(parameters: Sequence[torch.nn.Parameter], world: World) -> None:
    """Mean of each parameter's gradient over ranks (missing gradients count as zeros)."""
    if not world.distributed:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    flat = _flat(grads)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world.size
    for p, g in zip(parameters, grads):
        if p.grad is None:
            p.grad = g
    _unflat(flat, [p.grad for p in parameters])


def all_ranks_agree(flag: bool, world: World, device: str) -> bool:
    """True only if `flag` is true on every rank (used so that all ranks skip a non-finite step together)."""
    if not world.distributed:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item() == 1.0)


def broadcast_parameters(parameters: Sequence[torch.nn.Parameter], world: World) -> None:
    """Rank 0's values everywhere, so every rank starts (or resumes) from the same weights."""
    if not world.distributed:
        return
    with torch.no_grad():
        flat = _flat([p.detach() for p in parameters])
        dist.broadcast(flat, src=0)
        _unflat(flat, [p.data for p in parameters])


def parameters_in_sync(parameters: Sequence[torch.nn.Parameter], world: World) -> bool:
    """Whether every rank holds bit-identical parameters (elementwise max == min over ranks)."""
    if not world.distributed:
        return True
    with torch.no_grad():
        flat = _flat([p.detach() for p in parameters])
        high, low = flat.clone(), flat.clone()
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        return bool(torch.equal(high, low))


def barrier(world: World) -> None:
    """Wait for every rank (e.g. until rank 0 has written a file the others read)."""
    if world.distributed:
        dist.barrier()
