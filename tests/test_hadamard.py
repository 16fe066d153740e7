"""Hadamard constructions, the fast transform and the orthogonal (random-sign / fallback) rotations."""
from __future__ import annotations

import logging
import math

import pytest
import torch

from pipeline.rotation.hadamard import (
    NoHadamardConstruction,
    fast_hadamard_transform,
    hadamard_matrix,
    has_hadamard,
    orthogonal_hadamard,
)

# Sizes the pipeline's models need (hidden, intermediate, head dims of the supported families).
REQUIRED = [192, 320, 576, 896, 1536, 3584, 4096, 5120, 11008, 14336, 18944]
# Non-power-of-two base orders from each construction: Paley I over a prime (12, 20) and over GF(27),
# GF(7^3) (28, 344), Paley II over a prime (36, 148) and over GF(25) (52).
PALEY = [12, 20, 28, 36, 52, 148, 344]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _signs(n: int, cols: int, seed: int) -> torch.Tensor:
    """``(n, cols)`` float64 random ±1."""
    return torch.randint(0, 2, (n, cols), generator=_gen(seed)).to(torch.float64) * 2 - 1


def _assert_hadamard(H: torch.Tensor, n: int) -> None:
    """±1 entries and ``H @ H.T == n I`` exactly. Above 256 a full product costs too much across the
    sweep, so Freivalds' check with 16 random ±1 columns is used instead: with integer entries up to
    n^2 < 2^53 it is exact arithmetic, and a wrong H passes with probability <= 2^-16."""
    assert H.shape == (n, n) and H.dtype == torch.float64
    assert bool((H.abs() == 1).all()), f"n={n}: entries not ±1"
    if n <= 256:
        assert torch.equal(H @ H.T, n * torch.eye(n, dtype=torch.float64)), f"n={n}: H H^T != nI"
    else:
        V = _signs(n, 16, seed=n)
        assert torch.equal(H @ (H.T @ V), n * V), f"n={n}: H H^T != nI"


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


# --- constructions -----------------------------------------------------------------------------------


def test_every_constructible_order_up_to_1024():
    # Building every (n, n) matrix up to 4096 alone takes ~40 s on 2 cores (memory-bound), so larger
    # orders get the sample below and the largest required sizes go through the fast transform.
    orders = [n for n in range(1, 1025) if has_hadamard(n)]
    assert len(orders) == 200  # guards against has_hadamard silently shrinking
    for n in orders:
        _assert_hadamard(hadamard_matrix(n), n)


@pytest.mark.parametrize("n", [1332, 1536, 1684, 2048, 2188, 2560, 3584, 3700, 4092, 4096])
def test_large_orders(n):
    # Paley I over GF(11^3) (1332), GF(3^7) (2188) and the largest prime q < 4096 (4092); Paley II over
    # GF(29^2) (1684), GF(43^2) (3700); Kronecker products 12*128, 20*128, 28*128; Sylvester.
    assert has_hadamard(n)
    _assert_hadamard(hadamard_matrix(n), n)


@pytest.mark.parametrize("n", PALEY)
def test_paley_base_orders(n):
    # The fast-transform tests below rely on some bases being non-symmetric (so orientation matters).
    H = hadamard_matrix(n)
    _assert_hadamard(H, n)
    if n in (12, 20, 28, 344):  # Paley I: I + skew, never symmetric
        assert not torch.equal(H, H.T)


def test_required_sizes_are_constructible():
    missing = [n for n in REQUIRED if not has_hadamard(n)]
    assert missing == []


@pytest.mark.parametrize("n", [0, -4, 3, 5, 6, 10, 14, 18])
def test_impossible_orders(n):
    # Hadamard orders > 2 are multiples of 4, so none of these can exist.
    assert not has_hadamard(n)


def test_hadamard_matrix_raises_one_line():
    with pytest.raises(NoHadamardConstruction) as info:
        hadamard_matrix(6)
    msg = str(info.value)
    assert "6" in msg and "\n" not in msg
    assert isinstance(info.value, ValueError)


def test_callers_cannot_mutate_the_cache():
    H = hadamard_matrix(12)
    expected = H.clone()
    H.fill_(7.0)
    assert torch.equal(hadamard_matrix(12), expected)
    x = torch.randn(2, 12, generator=_gen(), dtype=torch.float64)
    assert _rel_err(fast_hadamard_transform(x), x @ expected / math.sqrt(12)) < 1e-12


# --- fast transform ----------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 8, 64, 192, 320, 576, 896, 1536, *PALEY])
def test_fast_transform_matches_dense(n):
    M = orthogonal_hadamard(n)
    x = torch.randn(3, 5, n, generator=_gen(n), dtype=torch.float64)
    y = fast_hadamard_transform(x)
    assert y.shape == x.shape and y.dtype == torch.float64
    assert _rel_err(y, x @ M) < 1e-12
    # M need not be symmetric: undo with M.T, never by applying the transform twice.
    assert _rel_err(y @ M.T, x) < 1e-12

    x32 = x.to(torch.float32)
    y32 = fast_hadamard_transform(x32)
    assert y32.dtype == torch.float32
    assert _rel_err(y32, x32.double() @ M) < 1e-5


def test_fast_transform_orientation():
    # For a non-symmetric H the transform is x @ H / sqrt(n), not x @ H.T / sqrt(n).
    n = 12
    H = hadamard_matrix(n)
    x = torch.randn(4, n, generator=_gen(), dtype=torch.float64)
    y = fast_hadamard_transform(x)
    assert _rel_err(y, x @ H / math.sqrt(n)) < 1e-12
    assert _rel_err(y, x @ H.T / math.sqrt(n)) > 1e-3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fast_transform_low_precision(dtype):
    n = 576
    x = torch.randn(2, 3, n, generator=_gen(), dtype=torch.float64)
    y = fast_hadamard_transform(x.to(dtype))
    assert y.dtype == dtype
    assert _rel_err(y, x @ orthogonal_hadamard(n)) < 2e-2


@pytest.mark.parametrize("n", [5120, 3584, 11008, 14336, 18944])
def test_fast_transform_required_large_sizes(n):
    # Dense (n, n) matrices this big are too slow to build here, so check the defining properties of
    # M = H / sqrt(n) through the transform: sampled rows of M are ±1/sqrt(n), and M preserves inner
    # products (X M M^T X^T == X X^T for random X is zero-probability to hold when M M^T != I).
    rows = torch.randint(0, n, (8,), generator=_gen(n))
    unit = torch.zeros(8, n, dtype=torch.float64)
    unit[torch.arange(8), rows] = 1.0
    M_rows = fast_hadamard_transform(unit)
    assert torch.allclose(M_rows.abs() * math.sqrt(n), torch.ones_like(M_rows), rtol=0, atol=1e-9)
    x = torch.randn(6, n, generator=_gen(n), dtype=torch.float64)
    y = fast_hadamard_transform(x)
    assert _rel_err(y @ y.T, x @ x.T) < 1e-12


@pytest.mark.parametrize("n", [1, 8, 12, 24])
def test_fast_transform_gradcheck(n):
    x = torch.randn(2, n, generator=_gen(), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fast_hadamard_transform, (x,))


def test_fast_transform_rejects_unconstructible_size():
    with pytest.raises(NoHadamardConstruction):
        fast_hadamard_transform(torch.zeros(2, 10))


# --- orthogonal rotations ----------------------------------------------------------------------------


@pytest.mark.parametrize("n", [12, 64, 576])
def test_orthogonal_hadamard_random_signs(n):
    eye = torch.eye(n, dtype=torch.float64)
    Q0, Q1, Q1b, Q2 = (orthogonal_hadamard(n, seed=s) for s in (None, 1, 1, 2))
    for Q in (Q0, Q1, Q2):
        assert (Q @ Q.T - eye).abs().max() < 1e-12
    assert torch.equal(Q0, hadamard_matrix(n) / math.sqrt(n))
    assert torch.equal(Q1, Q1b)
    assert not torch.equal(Q1, Q2)
    # diag(s) @ H / sqrt(n): each row of the seeded matrix is ± the same row of the plain one.
    ratio = Q1 / Q0
    assert torch.equal(ratio, ratio[:, :1].expand(n, n)) and bool((ratio.abs() == 1).all())
    assert orthogonal_hadamard(n, seed=1, dtype=torch.float32).dtype == torch.float32


@pytest.mark.parametrize("n", [6, 10])
def test_orthogonal_fallback_warns(n, caplog):
    with caplog.at_level(logging.WARNING, logger="pipeline.rotation.hadamard"):
        Q = orthogonal_hadamard(n, seed=3)
    assert (Q @ Q.T - torch.eye(n, dtype=torch.float64)).abs().max() < 1e-12
    assert any(f"n={n}" in r.getMessage() and "random orthogonal" in r.getMessage() for r in caplog.records)
    assert torch.equal(Q, orthogonal_hadamard(n, seed=3))
    assert not torch.equal(Q, orthogonal_hadamard(n, seed=4))
    assert torch.equal(orthogonal_hadamard(n), orthogonal_hadamard(n, seed=0))
