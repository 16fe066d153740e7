"""Fake quantizers with a straight-through estimator (STE).

Conventions: weights are ``(out, in)`` as in ``nn.Linear`` (``y = x @ W.T``); activations are row
vectors, quantized along the last dim. Every function returns the dequantized tensor (same shape and
dtype as its input), so the quantized model is an ordinary float model whose values lie on the grid.
The STE makes ``d(out)/d(in) = identity`` so rotation training can back-propagate through them.
"""
from __future__ import annotations

import math

from dataclasses import dataclass

import torch
from torch import nn

from .codes import dequantize, rtn

OFF_BITS = 16  # a bit-width of 16 means "not quantized"
WEIGHT_METHODS = ("rtn", "gptq")


def _ste(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Forward ``q``, backward identity to ``x``."""
    return x + (q - x).detach()


def quantize_asym(x: torch.Tensor, bits: int, clip_ratio: float = 1.0) -> torch.Tensor:
    """Asymmetric min/max fake quant along the last dim (one scale + zero point per row).

    Args:
        x: ``(..., n)``; each row (e.g. a token, or a token's head) gets its own grid.
        bits: grid has ``2**bits`` levels ``0 .. 2**bits - 1``.
        clip_ratio: shrink the row's range by this factor before quantizing (1.0 = no clip).
    Returns:
        ``(..., n)`` dequantized values, gradient passed straight through.
    """
    if bits >= OFF_BITS:
        return x
    qmax = 2**bits - 1
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    xmin = xf.detach().amin(dim=-1, keepdim=True).clamp(max=0) * clip_ratio
    xmax = xf.detach().amax(dim=-1, keepdim=True).clamp(min=0) * clip_ratio
    scale = ((xmax - xmin) / qmax).clamp(min=1e-8)
    zero = torch.round(-xmin / scale)
    q = torch.clamp(torch.round(xf.detach() / scale) + zero, 0, qmax)
    deq = ((q - zero) * scale).to(x.dtype)
    return _ste(x, deq)


def quantize_weight_rtn(w: torch.Tensor, bits: int, mse_clip: bool = True, group_size: int = 0) -> torch.Tensor:
    """Symmetric round-to-nearest fake quant of a ``(out, in)`` weight, per output channel (or per
    group of ``group_size`` inputs), with STE: the same grid as ``codes.rtn``, which makes the
    integer codes of a fused model."""
    if bits >= OFF_BITS:
        return w
    codes, scale = rtn(w, bits, mse_clip, group_size)
    return _ste(w, dequantize(codes, scale, w.dtype))


@dataclass(frozen=True)
class QuantSpec:
    """Bit-widths and clip ratios of one quantization setting (16 = off)."""

    w_bits: int = 16
    a_bits: int = 16
    kv_bits: int = 16
    a_clip_ratio: float = 1.0
    kv_clip_ratio: float = 1.0
    w_mse_clip: bool = True
    weight_method: str = "rtn"  # rtn | gptq
    w_group_size: int = 0  # 0 = one scale per output channel
    gptq_damp: float = 0.01
    gptq_block: int = 128
    gptq_act_order: bool = False

    def __post_init__(self) -> None:
        if self.weight_method not in WEIGHT_METHODS:
            raise ValueError(f"quant.weight_method={self.weight_method}: choose one of {', '.join(WEIGHT_METHODS)}")
        for name in ("w_group_size", "gptq_block"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "w_group_size" else 1):
                raise ValueError(f"quant.{name}={value}: must be an integer >= {0 if name == 'w_group_size' else 1}")
        damp = self.gptq_damp
        if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not math.isfinite(damp) or damp <= 0:
            raise ValueError(f"quant.gptq_damp={damp}: must be a finite number > 0")
        for name in ("w_bits", "a_bits", "kv_bits"):
            bits = getattr(self, name)
            if isinstance(bits, bool) or not isinstance(bits, int) or not (2 <= bits <= 8 or bits == OFF_BITS):
                raise ValueError(f"quant.{name}={bits}: must be 2..8 or 16 (off)")
        for name in ("a_clip_ratio", "kv_clip_ratio"):
            ratio = getattr(self, name)
            if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < ratio <= 1.0:
                raise ValueError(f"quant.{name}={ratio}: must be in (0, 1]")


class ActQuantizer(nn.Module):
    """Per-token asymmetric activation fake quant: ``(..., n) -> (..., n)``."""

    def __init__(self, bits: int, clip_ratio: float = 1.0) -> None:
        super().__init__()
        self.bits = bits
        self.clip_ratio = clip_ratio

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantize_asym(x, self.bits, self.clip_ratio)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, clip_ratio={self.clip_ratio}"
