"""RMSNorm that computes in its input dtype (float64 stays float64).

HF's ``LlamaRMSNorm`` upcasts to float32 even for float64 inputs, which floors function-preservation
checks near 1e-7. After folding, every norm is replaced by this module; for float32/bf16 inputs it is
numerically HF's norm (float32 inside, cast back).
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
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        h = x.to(compute)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.to(compute) * h).to(x.dtype)

    @classmethod
    def from_hf(cls, norm: nn.Module) -> "RMSNorm":
        eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps")
        return cls(norm.weight, eps)
