"""RMSNorm that computes in its input dtype (float64 stays float64).

HF's ``LlamaRMSNorm`` upcasts to float32 even for float64 inputs, which floors function-preservation
checks near 1e-7. After folding, every norm is replaced by this module; for other inputs it does what
HF's does (normalise in float32, cast back to the input dtype, then scale).
"""
from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """``y = x / rms(x) * weight`` over the last dim; ``(..., D) -> (..., D)``."""

    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x if x.dtype == torch.float64 else x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)

    @classmethod
    def from_hf(cls, norm: nn.Module) -> "RMSNorm":
        eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps")
        return cls(norm.weight, eps)
