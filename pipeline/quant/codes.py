"""Integer weight codes: symmetric per-output-channel (or per-group) scales, codes, dequant, packing.

A quantized weight ``W`` (out, in) is ``codes * scale`` with ``codes`` integers in
``[-2**(b-1), 2**(b-1) - 1]`` and ``scale`` (out, in // group) (``group = in`` for per-channel).
``dequantize`` is the one formula used both when quantizing in memory and when loading a checkpoint,
so a loaded model's weights equal the in-memory ones bit for bit.

Packing (DESIGN §3): bits <= 4 store two's complement nibbles, two per byte along K (``in``), the low
nibble holding the even k; wider codes are stored as int8.
"""
from __future__ import annotations

import torch

from ..infra.errors import PipelineError


def sym_scale_mse(
    w: torch.Tensor, bits: int, grid: int = 100, max_shrink: float = 0.8, norm: float = 2.4
) -> torch.Tensor:
    """Per-row symmetric scale with MSE clip search (QuaRot/GPTQ protocol).

    Tries clip ratios ``1, 1 - max_shrink/grid, ...`` down to ``1 - max_shrink`` and keeps, per row,
    the one minimising ``sum |w - q(w)|**norm``.

    Args:
        w: ``(out, in)`` weight.
    Returns:
        ``(out, 1)`` scale such that ``q = clamp(round(w / scale), -2**(bits-1), 2**(bits-1) - 1)``.
    """
    qmax = 2 ** (bits - 1) - 1
    wd = w.detach()
    absmax = wd.abs().amax(dim=1, keepdim=True).clamp(min=1e-8)
    best_err = torch.full_like(absmax, float("inf"))
    best_scale = absmax / qmax
    for i in range(int(max_shrink * grid) + 1):
        ratio = 1.0 - i / grid
        scale = absmax * ratio / qmax
        q = torch.clamp(torch.round(wd / scale), -qmax - 1, qmax) * scale
        err = (q - wd).abs().pow(norm).sum(dim=1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
    return best_scale


def group_of(in_features: int, group_size: int) -> int:
    """The group length along ``in`` (``group_size`` 0 = the whole row); it must divide ``in``."""
    group = group_size or in_features
    if in_features % group:
        raise PipelineError(f"quant.w_group_size={group_size} does not divide the input size {in_features}")
    return group


def weight_scale(w: torch.Tensor, bits: int, mse_clip: bool, group_size: int = 0) -> torch.Tensor:
    """Symmetric scales of ``w`` (out, in): (out, in // group), MSE clip search or absmax."""
    out, k = w.shape
    group = group_of(k, group_size)
    rows = w.detach().reshape(out * (k // group), group)
    if mse_clip:
        scale = sym_scale_mse(rows, bits)
    else:
        scale = (rows.abs().amax(dim=1, keepdim=True) / (2 ** (bits - 1) - 1)).clamp(min=1e-8)
    return scale.reshape(out, k // group)


def expand(scale: torch.Tensor, in_features: int) -> torch.Tensor:
    """(out, G) scales -> (out, in), each group's scale repeated over its columns."""
    return scale.repeat_interleave(in_features // scale.shape[1], dim=1)


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """int8 codes of ``w`` (out, in); ``scale`` is (out, G) or already expanded to ``w``'s shape."""
    qmax = 2 ** (bits - 1) - 1
    s = scale if scale.shape == w.shape else expand(scale, w.shape[1])
    return torch.clamp(torch.round(w / s), -qmax - 1, qmax).to(torch.int8)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``codes * scale`` in ``dtype``: (out, in)."""
    return codes.to(dtype) * expand(scale, codes.shape[1]).to(dtype)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """int8 codes (out, in) -> storage: uint8 (out, in // 2) nibbles for bits <= 4, else the int8 codes."""
    if bits > 4:
        return codes.to(torch.int8).contiguous()
    if codes.shape[1] % 2:
        raise PipelineError(f"cannot pack int4 codes with an odd input size {codes.shape[1]}")
    nib = (codes.to(torch.int16) & 0xF).to(torch.uint8)
    return (nib[:, 0::2] | (nib[:, 1::2] << 4)).contiguous()


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of ``pack``: int8 codes (out, in)."""
    if bits > 4:
        return packed.to(torch.int8)
    low = (packed & 0xF).to(torch.int16)
    high = (packed >> 4).to(torch.int16)
    both = torch.stack((low, high), dim=-1).reshape(packed.shape[0], -1)
    return torch.where(both >= 8, both - 16, both).to(torch.int8)


@torch.no_grad()
def rtn(w: torch.Tensor, bits: int, mse_clip: bool, group_size: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest: ``(codes int8 (out, in), scale (out, G))`` for ``w`` (out, in)."""
    scale = weight_scale(w, bits, mse_clip, group_size)
    return quantize_codes(w, scale, bits), scale
