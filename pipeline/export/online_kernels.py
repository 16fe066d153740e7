"""``KernelOnlineAttention``: the R3 Hadamard and the 4-bit KV fake quant of ``online.OnlineAttention``
on the C++ CPU ops (``kernels.cpu_ops``: ``hadamard``, ``quantize_act_int8``), for the kernel backend.

Same bits as the torch ops it replaces: the C++ Hadamard is the same butterfly and division by
sqrt(n) as ``hadamard.fast_hadamard_transform``, and the 4-bit quantizer's codes and grid are
``quantize_asym``'s (``(codes - zero) * scale`` with ``codes - 8`` and ``zero - 8`` stored, exact in
float32, then its straight-through ``x + (q - x)``); both compute in float32 and round to the input's
dtype where the torch ops do (``tests/test_online_kernels.py``). Anything the C++ ops do not cover (a
CUDA tensor, autograd, float64, a head_dim with no Hadamard construction or not a multiple of 32, KV
bits other than 4) takes the torch ops.
"""
from __future__ import annotations

import torch

from ..rotation.hadamard import has_hadamard
from ..surgery.online import OnlineAttention
from .kernels import cpu_ops, hadamard_base


class KernelOnlineAttention(OnlineAttention):
    """``OnlineAttention`` whose ``rotate`` / ``quantize`` run on the C++ CPU ops (module doc), and whose
    decode steps transform only the new tokens.

    HF hands the whole cached (raw) K/V to each decode step. Without grad, the transformed K/V of the
    last call are kept; a call whose K/V begin with exactly the last call's K/V (``torch.equal``: a
    decode step on the same cache) transforms only the new tokens and appends them, the same numbers
    as transforming everything (rotation and quant act on each token's head alone) in time that does
    not grow with the context. Anything else (a new prompt or batch, a training step) transforms the
    whole K/V afresh. Memory: the transformed K/V, one more copy of the cache (what a quantized cache
    would hold, in the model's dtype), kept until the next call.
    """

    def __init__(self, r3: bool, kv_bits: int, kv_clip_ratio: float = 1.0) -> None:
        super().__init__(r3, kv_bits, kv_clip_ratio)
        self._memo: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # raw k, v; done k, v

    @classmethod
    def from_online(cls, online: OnlineAttention) -> "KernelOnlineAttention":
        return cls(online.r3, online.kv_bits, online.kv_clip_ratio)

    def _fast(self, x: torch.Tensor) -> bool:
        """Whether the C++ ops give the torch ops' bits here: CPU, no autograd, a float32 computation
        (float64 is computed in float64 by the torch ops), a head_dim they take."""
        n = x.shape[-1]
        return (not x.is_cuda and not torch.is_grad_enabled() and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
                and n % 32 == 0 and has_hadamard(n) and x.numel() > 0)

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        if not self._fast(x):
            return super().rotate(x)
        n = x.shape[-1]
        y = cpu_ops().hadamard(x.reshape(-1, n).to(torch.float32).contiguous(), hadamard_base(n))
        return y.reshape(x.shape).to(x.dtype)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if self.kv_bits != 4 or not self._fast(x):
            return super().quantize(x)
        n = x.shape[-1]
        codes, scale, zero = cpu_ops().quantize_act_int8(x.reshape(-1, n).to(torch.float32).contiguous(),
                                                         self.kv_clip_ratio)
        deq = ((codes.to(torch.float32) - zero[:, None].to(torch.float32)) * scale[:, None]).reshape(x.shape)
        deq = deq.to(x.dtype)
        return x + (deq - x)  # quantize_asym's straight-through form, for its exact bits

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.r3:
            q = self.rotate(q)
        if torch.is_grad_enabled():
            self._memo = None
            return (q, *self.transform_kv(k, v))
        memo = self._memo
        if (memo is not None and memo[0].shape[:-2] == k.shape[:-2] and memo[0].shape[-1] == k.shape[-1]
                and memo[0].shape[-2] < k.shape[-2] and memo[0].dtype == k.dtype and memo[0].device == k.device
                and torch.equal(k[..., : memo[0].shape[-2], :], memo[0])
                and torch.equal(v[..., : memo[1].shape[-2], :], memo[1])):
            t = memo[0].shape[-2]
            k_new, v_new = self.transform_kv(k[..., t:, :], v[..., t:, :])
            k_done, v_done = torch.cat((memo[2], k_new), dim=-2), torch.cat((memo[3], v_new), dim=-2)
        else:
            k_done, v_done = self.transform_kv(k, v)
        self._memo = (k, v, k_done, v_done)
        return q, k_done, v_done
