"""Which rotation acts on which weight: one plan for every method (global R1 or per-layer bases).

Rotation sets (the ``rotations/*.safetensors`` artifacts) name their matrices:
- global (QuaRot, SpinQuant): ``R1`` (D, D) and ``R2.<i>`` (head_dim, head_dim);
- per-layer (exact layer-wise, ReSpinQuant): ``A.0 .. A.L`` and ``B.0 .. B.<L-1>`` (D, D), ``R2.<i>``.

Layer i's attention reads the stream in basis A_i and writes in B_i; its FFN reads in B_i and writes
in A_{i+1}; the embedding writes in A_0 and lm_head reads in A_L. A global set is the special case
A_i = B_i = R1. Each residual add then needs the skip path moved into the block's output basis:
``T_attn_i = A_i.T @ B_i``, ``T_ffn_i = B_i.T @ A_{i+1}`` (identity for a global set).

The same plan drives the float64 in-place fuse and the on-the-fly training parametrization.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..model.adapters import DecoderAdapter, get_linear
from .weights import bias_writer, head_bias, head_cols, head_rows, reader, writer

Transform = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# (module, tensor attribute, [(transform, rotation key), ...]) applied in order
Step = tuple[nn.Module, str, list[tuple[Transform, str]]]


def is_per_layer(rotations: dict[str, torch.Tensor]) -> bool:
    return any(k.startswith("A.") for k in rotations)


def basis(rotations: dict[str, torch.Tensor], key: str) -> torch.Tensor | None:
    """The matrix named ``key`` (``A.i``/``B.i`` fall back to ``R1`` for a global set; None = identity)."""
    if key in rotations:
        return rotations[key]
    if key[:2] in ("A.", "B.") and "R1" in rotations:
        return rotations["R1"]
    return None


def embedding_steps(model: nn.Module, adapter: DecoderAdapter) -> list[Step]:
    """The embedding writes the stream in basis ``A.0``."""
    return [(adapter.embedding(model), "weight", [(reader, "A.0")])]


def on_rows(fn: Transform, start: int, end: int) -> Transform:
    """``fn`` applied to rows ``start:end`` of a weight (or elements of a bias) only, the rest kept; out
    of place, so autograd (training) and the float64 fuse both take it."""
    def transform(t: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        return torch.cat([t[:start], fn(t[start:end], R), t[end:]])
    transform.__name__ = f"{fn.__name__}[{start}:{end}]"
    return transform


def layer_steps(layer: nn.Module, i: int, adapter: DecoderAdapter) -> list[Step]:
    """Decoder layer ``i``: attention reads in ``A.i`` and writes in ``B.i`` (R2 on v/o), the FFN reads
    in ``B.i`` and writes in ``A.<i+1>``."""
    a_in, b, a_out, r2 = f"A.{i}", f"B.{i}", f"A.{i + 1}", f"R2.{i}"
    steps: list[Step] = []
    v_rows = adapter.v_rows(layer)  # a fused qkv projection: R2 on its v rows only
    v_weight, v_bias = (head_rows, head_bias) if v_rows is None else (on_rows(head_rows, *v_rows), on_rows(head_bias, *v_rows))
    for name in adapter.ATTN_READERS:
        extra = [(v_weight, r2)] if name == adapter.V_PROJ else []
        steps.append((get_linear(layer, name), "weight", [(reader, a_in), *extra]))
        if name == adapter.V_PROJ and get_linear(layer, name).bias is not None:
            steps.append((get_linear(layer, name), "bias", [(v_bias, r2)]))
    o = get_linear(layer, adapter.ATTN_WRITER)
    steps.append((o, "weight", [(head_cols, r2), (writer, b)]))
    for name in adapter.mlp_readers(layer):  # a MoE router too
        steps.append((get_linear(layer, name), "weight", [(reader, b)]))
    downs = [get_linear(layer, name) for name in adapter.mlp_writers(layer)]  # every expert's in a MoE layer
    steps += [(down, "weight", [(writer, a_out)]) for down in downs]
    for linear, key in ((o, b), *((down, a_out) for down in downs)):
        if linear.bias is not None:
            steps.append((linear, "bias", [(bias_writer, key)]))
    return steps


def head_steps(model: nn.Module, adapter: DecoderAdapter) -> list[Step]:
    """lm_head reads the stream in basis ``A.L``."""
    return [(adapter.lm_head(model), "weight", [(reader, f"A.{adapter.dims(model).n_layers}")])]


def rotation_plan(model: nn.Module, adapter: DecoderAdapter) -> list[Step]:
    """Every weight/bias touched by the residual bases and R2, with its transforms and their keys.

    Keys a rotation set lacks are identities (``basis`` returns None): e.g. no ``R2.<i>`` for a method
    without R2, or nothing at all for RTN.
    """
    steps = embedding_steps(model, adapter)
    for i, layer in enumerate(adapter.layers(model)):
        steps += layer_steps(layer, i, adapter)
    return steps + head_steps(model, adapter)


def transform_tensor(t: torch.Tensor, transforms: list[tuple[Transform, str]],
                     rotations: dict[str, torch.Tensor]) -> torch.Tensor:
    """Apply one step's transforms to ``t`` (skipping identity bases)."""
    for fn, key in transforms:
        R = basis(rotations, key)
        if R is not None:
            t = fn(t, R.to(device=t.device, dtype=t.dtype))
    return t
