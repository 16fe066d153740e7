"""Trainable rotations on the stock model: weights fused on the fly through torch parametrizations.

``parametrize_rotations`` registers, on every weight the rotation plan touches, a parametrization
``W -> transforms(W)`` that reads the live rotation Parameters; the frozen base weights stay the
norm-folded, R4-fused originals. Autograd then reaches the rotations through every weight (and through
the per-layer transitions, hooks computing ``h @ (A.T @ B - I)`` with ``ΔT`` formed in float32: see
``transition_delta``). ``fold_rotations`` removes the parametrizations and the hooks, leaving plain
weights (FlatQuant's ``reparameterize``).
This works with HF gradient checkpointing, since a recomputed forward re-reads the parametrized weights.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.hooks import RemovableHandle

from ..model.adapters import DecoderAdapter, get_linear
from ..rotation.cayley import orthonormalize
from ..quant.quantizers import OFF_BITS, QuantSpec, quantize_weight_rtn
from ..surgery.plan import Step, Transform, is_per_layer, rotation_plan, transform_tensor
from ..surgery.transitions import attach_transitions


class TrainableRotations(nn.Module):
    """A rotation set (names as in ``surgery.plan``) held as Parameters of ``dtype``."""

    def __init__(self, init: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.names = sorted(init)
        self.mats = nn.ParameterList([nn.Parameter(init[k].detach().to(dtype).clone()) for k in self.names])

    def as_dict(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.mats))

    @torch.no_grad()
    def export(self) -> dict[str, torch.Tensor]:
        """Detached copies, re-orthonormalised in float64 and stored as float32."""
        return {k: orthonormalize(v.detach().to(torch.float64)).to(torch.float32) for k, v in self.as_dict().items()}

    def max_orthogonality_error(self) -> float:
        """max over matrices of ``max |R.T R - I|``."""
        with torch.no_grad():
            return max((R.T @ R - torch.eye(R.shape[0], dtype=R.dtype, device=R.device)).abs().max().item()
                       for R in self.mats)


class RotatedWeight(nn.Module):
    """Parametrization ``W -> Q_w(transforms(W))`` with the current rotations (not a submodule of it);
    ``Q_w`` is per-output-channel RTN fake quant with a straight-through estimator, or nothing."""

    def __init__(self, transforms: list[tuple[Transform, str]], rotations: TrainableRotations,
                 weight_quant: QuantSpec | None = None) -> None:
        super().__init__()
        self.transforms = transforms
        self.current = rotations.as_dict  # a bound method, so the rotations are not registered twice
        self.weight_quant = weight_quant

    def forward(self, W: torch.Tensor) -> torch.Tensor:
        W = transform_tensor(W, self.transforms, self.current())
        if self.weight_quant is not None:
            q = self.weight_quant
            W = quantize_weight_rtn(W, q.w_bits, q.w_mse_clip, q.w_group_size)
        return W


def transition_delta(h: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """``h @ (src.T @ dst - I)``, the online transition's addend, for any compute dtype of ``h``.

    ``ΔT = src.T @ dst - I`` is formed from the rotation Parameters in their own dtype (at least float32;
    float64 if they or ``h`` are), ``h`` is promoted to it, and the result is cast back to ``h.dtype``.
    The two-product form ``(h @ src.T) @ dst - h`` in bf16 would round ``h``, ``src`` and ``dst`` by as
    much as the true (near-identity) transition moves ``h`` (DESIGN §1 precision). One formula for all
    dtypes; autograd reaches both rotations through ``ΔT``.
    """
    dtype = torch.promote_types(torch.promote_types(src.dtype, dst.dtype),
                                torch.promote_types(h.dtype, torch.float32))
    src, dst = src.to(device=h.device, dtype=dtype), dst.to(device=h.device, dtype=dtype)
    delta = src.T @ dst - torch.eye(src.shape[1], dtype=dtype, device=src.device)
    return (h.to(dtype) @ delta).to(h.dtype)


def parametrize_steps(steps: list[Step], rotations: TrainableRotations, weight_quant: QuantSpec | None = None,
                      unquantized: frozenset[int] = frozenset(), unsafe: bool = False) -> None:
    """Register ``RotatedWeight`` on every tensor of rotation-plan ``steps``; ``weight_quant`` acts on
    weights of modules whose ``id`` is not in ``unquantized``. ``unsafe`` skips torch's check (one
    transform per tensor), for a caller that registers on already-checked shapes."""
    if weight_quant is not None and weight_quant.w_bits >= OFF_BITS:
        weight_quant = None
    for module, attr, transforms in steps:
        wq = weight_quant if attr == "weight" and id(module) not in unquantized else None
        parametrize.register_parametrization(module, attr, RotatedWeight(transforms, rotations, wq), unsafe=unsafe)


def rotation_transitions(rotations: TrainableRotations) -> Callable[[str, torch.Tensor], torch.Tensor]:
    """The residual-add addend ``h @ (T - I)`` of a per-layer set, read from the live rotations
    (``transitions.attach_transitions``' ``apply``)."""

    def transition(key: str, h: torch.Tensor) -> torch.Tensor:
        site, i = key.split(".")
        r = rotations.as_dict()
        src, dst = (f"A.{i}", f"B.{i}") if site == "attn" else (f"B.{i}", f"A.{int(i) + 1}")
        return transition_delta(h, r[src], r[dst])

    return transition


def parametrize_rotations(model: nn.Module, adapter: DecoderAdapter, rotations: TrainableRotations,
                          weight_quant: QuantSpec | None = None) -> list[RemovableHandle]:
    """Freeze the model, fuse ``rotations`` into its weights on the fly; returns the transition hooks.

    With ``weight_quant`` (``train.quantize_weights``), every decoder linear's weight is also RTN
    fake-quantized (STE) after rotation; embedding and lm_head stay 16-bit, as at fuse.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    routers = [get_linear(layer, name) for layer in adapter.layers(model) for name in adapter.routers(layer)]
    unquantized = frozenset({id(adapter.embedding(model)), id(adapter.lm_head(model)), *map(id, routers)})
    parametrize_steps(rotation_plan(model, adapter), rotations, weight_quant, unquantized)
    if not is_per_layer(rotations.as_dict()):
        return []
    return attach_transitions(model, adapter, rotation_transitions(rotations))


def fold_rotations(model: nn.Module, handles: list[RemovableHandle]) -> None:
    """Remove every rotation parametrization (keeping the rotated values) and the transition hooks."""
    for module in list(model.modules()):
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    for h in handles:
        h.remove()


def enable_checkpointing(model: nn.Module) -> None:
    """HF activation (gradient) checkpointing: recompute each layer in backward to save memory.

    HF checkpoints only in training mode; our models have no dropout, so train() changes nothing else.
    """
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    model.train()
