"""The kernel backend's online attention ops (R3 Hadamard, KV fake quant on the C++ CPU ops) give the
torch ops' bits, and the KV memo (decode steps transform only the new tokens) gives the full
transform's bits."""
from __future__ import annotations

import pytest
import torch

from pipeline.export.online_kernels import KernelOnlineAttention
from pipeline.surgery.online import OnlineAttention


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("head_dim,kv_bits", [(64, 4), (128, 4), (96, 4), (64, 8), (48, 4)])
def test_kernel_online_attention_same_bits(dtype, head_dim, kv_bits):
    gen = torch.Generator().manual_seed(head_dim + kv_bits)
    q = (torch.randn(2, 6, 37, head_dim, generator=gen) * 3).to(dtype)
    k = (torch.randn(2, 2, 37, head_dim, generator=gen) * 3).to(dtype)
    v = torch.randn(2, 2, 37, head_dim, generator=gen).to(dtype)
    k[0, 1, 5] = 0  # an all-zero row: the scale's floor
    ref, fast = OnlineAttention(True, kv_bits, 0.95), KernelOnlineAttention(True, kv_bits, 0.95)
    with torch.no_grad():
        assert fast._fast(q) == (head_dim % 32 == 0 and dtype != torch.float64)  # 48, float64: the torch ops
        for a, b in zip(ref(q, k, v), fast(q, k, v)):
            assert a.dtype == b.dtype == dtype
            assert torch.equal(a, b)


def test_kv_memo_matches_full_transform():
    """A decode sequence (cache grows by one token) through the memo equals transforming everything each
    time, and a cache that does not extend the last one (new prompt) is transformed afresh."""
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(1, 2, 9, 64, generator=gen, dtype=torch.bfloat16)
    v = torch.randn(1, 2, 9, 64, generator=gen, dtype=torch.bfloat16)
    online, fresh = KernelOnlineAttention(True, 4), KernelOnlineAttention(True, 4)
    with torch.no_grad():
        for t in range(4, 10):
            q = torch.randn(1, 6, 1, 64, generator=gen, dtype=torch.bfloat16)
            got = online(q, k[..., :t, :], v[..., :t, :])
            fresh._memo = None
            want = fresh(q, k[..., :t, :], v[..., :t, :])
            assert all(torch.equal(a, b) for a, b in zip(got, want))
            assert online._memo[2].shape[-2] == t
        other = k.flip(-2)  # same length + 1 would extend; a different prefix must not reuse the memo
        got = online(q, torch.cat((other, other[..., :1, :]), -2), torch.cat((v, v[..., :1, :]), -2))
        fresh._memo = None
        want = fresh(q, torch.cat((other, other[..., :1, :]), -2), torch.cat((v, v[..., :1, :]), -2))
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    with torch.enable_grad():  # training never keeps a memo
        online(q, k.requires_grad_(), v)
        assert online._memo is None
