"""The decode GEMV's integer trick (cuda_ext/cuda/gemv_w4a4.cu), emulated on the CPU since CI has no GPU:
a packed word's low / high nibbles are its even / odd codes, ``__vsub4(n ^ 0x08080808, 0x08080808)``
sign-extends each byte without borrows, and two ``dp4a`` per word give the exact dot product of the
packed codes, for every code pair (-8..7) and on random rows."""
from __future__ import annotations

import numpy as np
import torch

from pipeline.export.kernels import cpu_ops


def vsub4(a: np.ndarray, b: int) -> np.ndarray:
    """Per-byte subtraction mod 256 of uint32 words (CUDA's __vsub4)."""
    out = np.zeros_like(a)
    for j in range(4):
        x = (a >> (8 * j)) & 0xFF
        y = (b >> (8 * j)) & 0xFF
        out |= ((x - y) & 0xFF) << (8 * j)
    return out


def dp4a(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Sum over the 4 bytes of each word pair, as signed int8 products (CUDA's __dp4a, s32)."""
    a8 = a.astype("<u4").view(np.int8).reshape(*a.shape, 4).astype(np.int64)
    b8 = b.astype("<u4").view(np.int8).reshape(*b.shape, 4).astype(np.int64)
    return (a8 * b8).sum(-1)


def sext(nibbles: np.ndarray) -> np.ndarray:
    return vsub4(nibbles ^ np.uint32(0x08080808), 0x08080808)


def emulated_dot(pa: np.ndarray, pw: np.ndarray) -> np.ndarray:
    """Dot products of packed rows (bytes, K/2 each) as the kernel computes them: (M, N) int64."""
    wa, ww = pa.view("<u4"), pw.view("<u4")  # 8 codes per word
    lo = np.uint32(0x0F0F0F0F)
    out = np.zeros((wa.shape[0], ww.shape[0]), dtype=np.int64)
    for i in range(wa.shape[0]):
        for j in range(ww.shape[0]):
            even = dp4a(sext(wa[i] & lo), sext(ww[j] & lo))
            odd = dp4a(sext((wa[i] >> 4) & lo), sext((ww[j] >> 4) & lo))
            out[i, j] = (even + odd).sum()
    return out


def test_every_code_pair_and_random_rows_are_exact():
    ops = cpu_ops()
    codes = torch.arange(-8, 8, dtype=torch.int8)
    a = codes.repeat_interleave(16)[None].repeat(1, 2)  # every (a, w) pair of codes, twice over (K = 512)
    w = codes.repeat(16)[None].repeat(1, 2)
    gen = torch.Generator().manual_seed(0)
    ra = torch.randint(-8, 8, (5, 96), generator=gen, dtype=torch.int8)
    rw = torch.randint(-8, 8, (7, 96), generator=gen, dtype=torch.int8)
    for x, y in ((a, w), (ra, rw)):
        got = emulated_dot(ops.pack_int4(x).numpy(), ops.pack_int4(y).numpy())
        want = (x.to(torch.int64) @ y.to(torch.int64).T).numpy()
        assert np.array_equal(got, want)
