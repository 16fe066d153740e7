"""Rotation training (SpinQuant protocol): next-token loss through fake-quantized activations/KV,
rotations updated by Cayley SGD, model weights frozen.

Batches: step s uses windows ``perm[s*B : (s+1)*B]`` (cycling, ``perm`` seeded), split evenly over the
data-parallel ranks; each rank accumulates its share one window at a time (memory: one window's
activations), gradients are averaged over ranks, so the step equals a single process on the same
global batch. Checkpoints (safetensors: rotations, step, losses, and the float32 momentum buffers when
momentum > 0; momentum 0 keeps none) allow resuming.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from . import distributed as ddp
from ..rotation.cayley import CayleySGD
from ..infra.artifacts import is_finite
from ..infra.errors import PipelineError, check_int
from .trainable import TrainableRotations

SCHEDULES = ("linear", "cosine", "constant")


@dataclass(frozen=True)
class TrainSpec:
    """One rotation-training run (see ``conf/train/*.yaml``)."""

    steps: int
    lr: float
    batch_size: int = 1
    momentum: float = 0.0
    schedule: str = "linear"
    cayley_iters: int = 8
    reorth_every: int = 50
    checkpoint_every: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        for name, low in (("steps", 1), ("batch_size", 1), ("cayley_iters", 1), ("reorth_every", 0),
                          ("checkpoint_every", 0), ("seed", 0)):
            check_int(getattr(self, name), f"train.{name}", low)
        for name, ok, rule in (("lr", lambda v: v > 0, "> 0"), ("momentum", lambda v: 0 <= v < 1, "in [0, 1)")):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
                raise PipelineError(f"train.{name}={value!r}: must be a finite number {rule}")
        if self.schedule not in SCHEDULES:
            raise PipelineError(f"train.schedule={self.schedule}: choose one of {', '.join(SCHEDULES)}")


@dataclass
class TrainState:
    """What a checkpoint holds and a resumed run continues from."""

    step: int = 0
    losses: list[float] = field(default_factory=list)
    momentum: dict[str, torch.Tensor] = field(default_factory=dict)
    step_seconds: list[float] = field(default_factory=list)


def lr_factor(schedule: str, step: int, steps: int) -> float:
    if schedule == "linear":
        return 1.0 - step / max(steps, 1)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * step / max(steps, 1)))
    return 1.0


def batch_indices(spec: TrainSpec, n_windows: int, step: int) -> list[int]:
    """The global batch of ``step``: ``batch_size`` window indices from a seeded permutation."""
    perm = torch.randperm(n_windows, generator=torch.Generator().manual_seed(spec.seed)).tolist()
    return [perm[(step * spec.batch_size + j) % n_windows] for j in range(spec.batch_size)]


def window_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of one ``(seqlen,)`` window."""
    logits = model(ids.unsqueeze(0), use_cache=False).logits[0, :-1].float()
    return F.cross_entropy(logits, ids[1:])


def train_rotations(
    model: nn.Module,
    rotations: TrainableRotations,
    windows: torch.Tensor,
    spec: TrainSpec,
    state: TrainState,
    save_checkpoint: Callable[[TrainState], None],
    desc: str = "train",
) -> TrainState:
    """Train ``rotations`` (already parametrizing ``model``) from ``state`` to ``spec.steps``.

    ``windows``: ``(n, seqlen)`` calibration tokens on the model's device. A NaN/inf loss stops with
    a PipelineError naming the step; the last checkpoint written before it is kept.
    """
    world, rank = ddp.world_size(), ddp.rank()
    if spec.batch_size % world:
        raise PipelineError(f"train.batch_size={spec.batch_size} must be a multiple of the {world} ranks")
    params = list(rotations.mats)
    opt = CayleySGD(params, lr=spec.lr, momentum=spec.momentum, iters=spec.cayley_iters,
                    reorth_every=spec.reorth_every)
    for name, p in zip(rotations.names, params):
        if state.step:  # resuming: the step counter times the QR re-orthogonalisation
            opt.state[p]["step"] = state.step
        if spec.momentum and name in state.momentum:  # momentum 0 keeps (and saves) no buffer
            opt.state[p]["momentum"] = state.momentum[name].to(device=p.device, dtype=p.dtype)
    start_step = state.step
    bar = tqdm(range(state.step, spec.steps), desc=desc, unit="step", disable=not ddp.is_main(),
               initial=state.step, total=spec.steps)
    for step in bar:
        start = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = spec.lr * lr_factor(spec.schedule, step, spec.steps)
        mine = batch_indices(spec, windows.shape[0], step)[rank::world]
        total = 0.0
        for idx in mine:
            loss = window_loss(model, windows[idx]) / len(mine)
            loss.backward()
            total += loss.item()
        total = ddp.average_scalar(total)
        if not math.isfinite(total):
            raise PipelineError(f"training loss is {total} at step {step}: stopped; the last good checkpoint "
                                f"(step {state.step}) is kept")
        ddp.average_gradients(params)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if not all(is_finite(p) for p in params):
            raise PipelineError(f"the rotations are not finite after step {step}: stopped; the last good "
                                f"checkpoint (step {state.step}) is kept")
        state.step = step + 1
        state.losses.append(total)
        state.step_seconds.append(time.perf_counter() - start)
        bar.set_postfix(loss=f"{total:.4f}")
        last = state.step == spec.steps
        if spec.checkpoint_every and (state.step % spec.checkpoint_every == 0 or last):
            # CayleySGD replaces (never mutates) its buffers, so on CPU these may alias them without a copy
            state.momentum = {n: opt.state[p]["momentum"].detach().cpu() for n, p in zip(rotations.names, params)
                              if "momentum" in opt.state[p]}
            save_checkpoint(state)
    if spec.steps > start_step:
        check_final_loss(model, windows, spec)
    return state


@torch.no_grad()
def check_final_loss(model: nn.Module, windows: torch.Tensor, spec: TrainSpec) -> float:
    """The loss of the trained rotations on the batch after the last step (every rank its share);
    a NaN/inf one is a PipelineError, so a set that diverged in its last update is not published."""
    world, rank = ddp.world_size(), ddp.rank()
    mine = batch_indices(spec, windows.shape[0], spec.steps)[rank::world]
    total = ddp.average_scalar(sum(window_loss(model, windows[i]).item() for i in mine) / len(mine))
    if not math.isfinite(total):
        raise PipelineError(f"the loss after the last step ({spec.steps}) is {total}: the trained rotations "
                            "are not published")
    return total
