"""Data-parallel helpers for rotation training under ``torchrun`` (gloo on CPU, nccl on GPU).

Without torchrun (no ``WORLD_SIZE`` in the environment) everything is a single process. With
``train.fsdp=true`` the frozen model weights are also sharded over the ranks (FSDP2, ``shard_layers``):
each decoder layer is all-gathered for its forward (and again for its backward) and freed after,
so a rank holds 1/world of the weights plus one layer; the rotations stay replicated and their
gradients are averaged by ``average_gradients`` as without FSDP.
"""
from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)


def init_from_env(device: torch.device) -> None:
    """Join the process group torchrun describes (once); a no-op for a single process."""
    if world_size_from_env() > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def world_size_from_env() -> int:
    """The world size torchrun announces (1 without torchrun), before the group is joined."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    """This process's rank on its host (torchrun's ``LOCAL_RANK``): the GPU it drives."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """Only rank 0 writes artifacts and logs."""
    return rank() == 0


def average_gradients(params: list[torch.Tensor]) -> None:
    """All-reduce every gradient to its mean over ranks (so all ranks take the same step)."""
    if world_size() == 1:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(world_size())


def average_scalar(value: float) -> float:
    if world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.item() / world_size()


def shard_layers(model: nn.Module, layers: list[nn.Module], device: torch.device) -> int:
    """FSDP2 (``fully_shard``) on every decoder layer, then on ``model`` (embedding, final norm and
    lm_head); returns the bytes of parameters this rank now holds. Call it after the rotation
    parametrizations are registered: the frozen originals are sharded, the rotations are not (they
    are read through a bound method, not registered under the model)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    full = _param_bytes(model)
    mesh = init_device_mesh(device.type, (world_size(),))
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    mine = _param_bytes(model)
    log.info("FSDP2: %d decoder layers sharded over %d ranks: %.1f MiB of parameters on rank %d (of %.1f MiB)",
             len(layers), world_size(), mine / 2**20, rank(), full / 2**20)
    return mine


def _param_bytes(model: nn.Module) -> int:
    """Bytes of parameter storage this rank holds (a DTensor's local shard only)."""
    total = 0
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        total += local.numel() * local.element_size()
    return total
