"""Online (run-time) operators attached to the stock HF model, without forking its modeling code.

- ``QuantLinear``: ``Sequential(optional online Hadamard, activation fake quant, Linear)`` in one
  module; replaces an ``nn.Linear`` of a decoder layer. R4 is its online Hadamard on down_proj.
- ``OnlineAttention``: R3 (Hadamard on Q and K after RoPE) and KV-cache fake quant. It lives as a child
  ``rsq_online`` of an attention module and is called from the ``rsq_sdpa`` attention function, which is
  registered through transformers' public ``AttentionInterface`` (its extension point for custom
  attention) and otherwise is HF's own SDPA attention.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from ..rotation.hadamard import online_hadamard
from ..quant.quantizers import ActQuantizer, quantize_asym

ATTN_IMPL = "rsq_sdpa"


class QuantLinear(nn.Module):
    """``y = Linear(Q_a(x @ H))``: online Hadamard (optional), activation quant (optional), linear.

    ``x``: ``(..., in)`` -> ``(..., out)``. ``linear.weight`` holds the (fake-)quantized weight; once
    weights are quantized, the buffer ``weight_scale`` (out, G) holds their scales (None before), so
    ``linear.weight / weight_scale`` are the integer codes the checkpoint packs.
    """

    def __init__(self, linear: nn.Linear, act_quant: ActQuantizer | None, rotate_input: bool) -> None:
        super().__init__()
        self.linear = linear
        self.act_quant = act_quant
        self.rotate_input = rotate_input
        self.register_buffer("weight_scale", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rotate_input:
            x = online_hadamard(x)
        if self.act_quant is not None:
            x = self.act_quant(x)
        return self.linear(x)

    def extra_repr(self) -> str:
        return f"rotate_input={self.rotate_input}"


class OnlineAttention(nn.Module):
    """R3 and KV-cache fake quant on ``(batch, heads, seq, head_dim)`` Q/K/V after RoPE.

    HF updates its cache before calling the attention function, so the cache holds full-precision,
    unrotated K/V and these ops re-apply to the whole cached K/V at each step: identical numbers to a
    quantized cache (rotation and per-token quant are deterministic), not its memory saving. The kernel
    backend's ``KernelOnlineAttention`` transforms only a decode step's new tokens.
    """

    def __init__(self, r3: bool, kv_bits: int, kv_clip_ratio: float = 1.0) -> None:
        super().__init__()
        self.r3 = r3
        self.kv_bits = kv_bits
        self.kv_clip_ratio = kv_clip_ratio

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """R3: ``x @ H / sqrt(hd)`` along the last dim (``KernelOnlineAttention`` runs it in C++, same bits)."""
        return online_hadamard(x)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """KV fake quant, one asymmetric grid per (token, head) row (``KernelOnlineAttention``: C++, same bits)."""
        return quantize_asym(x, self.kv_bits, self.kv_clip_ratio)

    def transform_kv(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """R3 on K, then per (token, head) asymmetric fake quant of K and V: ``(B, H, T, hd)`` each."""
        if self.r3:
            k = self.rotate(k)
        return self.quantize(k), self.quantize(v)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.r3:  # q @ H and k @ H leave q @ k.T unchanged (H orthogonal)
            q = self.rotate(q)
        return (q, *self.transform_kv(k, v))

    def extra_repr(self) -> str:
        return f"r3={self.r3}, kv_bits={self.kv_bits}, kv_clip_ratio={self.kv_clip_ratio}"


def rsq_sdpa_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """HF's SDPA attention, preceded by the module's ``rsq_online`` ops when it has them."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    online = getattr(module, "rsq_online", None)
    if online is not None:
        query, key, value = online(query, key, value)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


@functools.cache
def _register_attention() -> None:
    """Register ``rsq_sdpa`` with transformers, once, on first use (importing transformers costs
    seconds, which a stage that stops at a bad setting should not pay)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_IMPL, rsq_sdpa_attention)
    AttentionMaskInterface.register(ATTN_IMPL, sdpa_mask)


def use_online_attention(model: nn.Module) -> None:
    """Route ``model``'s attention through ``rsq_sdpa`` (same maths as ``sdpa`` until ops attach)."""
    _register_attention()
    model.config._attn_implementation = ATTN_IMPL
