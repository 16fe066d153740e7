"""Data-parallel helpers for rotation training under ``torchrun`` (gloo on CPU, nccl on GPU).

Without torchrun (no ``WORLD_SIZE`` in the environment) everything is a single process.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


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
