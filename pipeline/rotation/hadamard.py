"""Hadamard matrices and a fast Hadamard transform for rotation-based quantization.

Every order is built as ``H_n = kron(H_m, S_p)`` with ``n = m * p``, ``p = 2**j`` and ``S_p`` the
Sylvester matrix (``S_1 = [1]``, ``S_2p = [[S_p, S_p], [S_p, -S_p]]``, symmetric). The base ``H_m`` is
``[1]`` (``m = 1``) or a Paley matrix over GF(q), q an odd prime power:

* Paley I:  q = 3 (mod 4) gives order ``m = q + 1``,
* Paley II: q = 1 (mod 4) gives order ``m = 2 (q + 1)``.

Paley matrices are not symmetric in general, so ``H_n.T != H_n``: the fast transform applies exactly
``x @ H_n`` (not ``x @ H_n.T``). Nothing is tabulated; the largest power of two is split off first, so
the dense base factor that the fast transform multiplies by is as small as the constructions allow.
"""
from __future__ import annotations

import functools
import logging
import math

import torch

log = logging.getLogger(__name__)


class NoHadamardConstruction(ValueError):
    """No construction in this module yields a Hadamard matrix of the requested order."""


# --- finite fields -----------------------------------------------------------------------------------


def _prime_power(q: int) -> tuple[int, int] | None:
    """``(p, k)`` with ``q == p**k`` and p prime, or None when q is not a prime power (q >= 2)."""
    if q < 2:
        return None
    p = next((d for d in range(2, math.isqrt(q) + 1) if q % d == 0), q)  # smallest prime factor
    k = 0
    while q % p == 0:
        q //= p
        k += 1
    return (p, k) if q == 1 else None


def _poly_mod(a: list[int], f: list[int], p: int) -> list[int]:
    """Remainder of ``a`` modulo the monic ``f`` over GF(p); coefficients are low-degree first."""
    a = a[:]
    for top in range(len(a) - 1, len(f) - 2, -1):
        c = a[top]
        if c:
            shift = top - (len(f) - 1)
            for i, fi in enumerate(f):
                a[shift + i] = (a[shift + i] - c * fi) % p
    return a[: len(f) - 1]


def _irreducible_poly(p: int, k: int) -> list[int]:
    """The first monic polynomial of degree k over GF(p) (coefficients low-degree first) that no monic
    polynomial of degree 1..k//2 divides, i.e. an irreducible one: GF(p^k) = GF(p)[x] / f."""

    def monic(deg: int):
        for code in range(p**deg):
            yield [(code // p**i) % p for i in range(deg)] + [1]

    divisors = [g for d in range(1, k // 2 + 1) for g in monic(d)]
    return next(f for f in monic(k) if all(any(_poly_mod(f, g, p)) for g in divisors))


def _quadratic_character(p: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GF(p^k) with elements numbered ``0 .. q-1`` by their base-p digits (polynomial coefficients).

    Returns:
        digits: ``(q, k)`` int64, digit t of element a is its coefficient of ``x**t``.
        chi: ``(q,)`` int64 quadratic character: 0 at 0, +1 on nonzero squares, -1 otherwise.
    """
    q = p**k
    f = torch.tensor(_irreducible_poly(p, k), dtype=torch.int64)
    digits = (torch.arange(q)[:, None] // p ** torch.arange(k)) % p
    # Square every element at once: polynomial self-product, then reduce x**d (d >= k) with
    # x**k = -(f_0 + ... + f_{k-1} x**(k-1)), highest degree first.
    sq = torch.zeros(q, 2 * k - 1, dtype=torch.int64)
    for i in range(k):
        for j in range(k):
            sq[:, i + j] += digits[:, i] * digits[:, j]
    for d in range(2 * k - 2, k - 1, -1):
        sq[:, d - k : d] -= sq[:, d : d + 1] * f[:k]
    squares = (sq[:, :k] % p) @ (p ** torch.arange(k))
    chi = torch.full((q,), -1, dtype=torch.int64)
    chi[squares] = 1
    chi[0] = 0
    return digits, chi


def _jacobsthal(q: int) -> torch.Tensor:
    """Jacobsthal matrix ``Q[a, b] = chi(a - b)`` over GF(q), q an odd prime power; ``(q, q)`` float64.

    ``Q @ Q.T = q I - J``, rows sum to 0, and ``Q.T = chi(-1) Q``.
    """
    pk = _prime_power(q)
    assert pk is not None and pk[0] != 2, f"q={q} is not an odd prime power"
    p, k = pk
    digits, chi = _quadratic_character(p, k)
    chi = chi.to(torch.float64)
    if k == 1:
        # GF(q) = Z/q, so Q is circulant. With ext[i] = chi(i - (q-1)), Q[a, q-1-j] = ext[a + j]: a
        # strided window, which is several times faster than q*q lookups for the large test orders.
        ext = chi[torch.arange(-(q - 1), q) % q]
        return ext.as_strided((q, q), (1, 1)).flip(1)
    diff = torch.zeros(q, q, dtype=torch.int64)  # element number of a - b, digit by digit
    for t in range(k):
        diff += ((digits[:, None, t] - digits[None, :, t]) % p) * p**t
    return chi[diff]


# --- constructions -----------------------------------------------------------------------------------


def _paley(m: int) -> tuple[str, int] | None:
    """``("I", q)`` or ``("II", q)`` when a Paley construction gives order m, else None."""
    for kind, q in (("I", m - 1), ("II", m // 2 - 1 if m % 2 == 0 else -1)):
        # q % 4 in {1, 3} also excludes even q, where the quadratic character is not defined.
        if _prime_power(q) is not None and q % 4 == (3 if kind == "I" else 1):
            return kind, q
    return None


@functools.lru_cache(maxsize=None)
def _split(n: int) -> tuple[int, int] | None:
    """``(m, p)`` with ``n = m * p``, ``p = 2**j`` as large as possible and m = 1 or a Paley order."""
    if n < 1:
        return None
    j = (n & -n).bit_length() - 1  # 2**j is the largest power of two dividing n
    for i in range(j, -1, -1):
        m = n >> i
        if m == 1 or _paley(m) is not None:
            return m, 1 << i
    return None


@functools.lru_cache(maxsize=16)
def _base(m: int) -> torch.Tensor:
    """The ``(m, m)`` float64 base factor (``[1]`` or Paley). Cached and shared: never mutate it."""
    if m == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    kind, q = _paley(m)
    # S = [[0, 1^T], [±1, Q]] (bordered Jacobsthal), filled in place to avoid extra (m, m) copies.
    S = torch.empty(q + 1, q + 1, dtype=torch.float64)
    S[0, 0] = 0.0
    S[0, 1:] = 1.0
    S[1:, 0] = -1.0 if kind == "I" else 1.0
    S[1:, 1:] = _jacobsthal(q)
    if kind == "I":
        # Q is skew, so S is skew with S S^T = q I, and (I + S)(I + S)^T = (q + 1) I.
        S.diagonal().add_(1.0)
        return S
    # Q is symmetric, so S is a symmetric conference matrix (S S^T = q I). Replacing its ±1 by ±A and
    # its zero diagonal by B gives H H^T = 2(q + 1) I, since A A^T = B B^T = 2I and A B^T + B A^T = 0.
    A = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    B = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    H = torch.kron(S, A)
    H.view(q + 1, 2, q + 1, 2).diagonal(dim1=0, dim2=2).copy_(B[:, :, None].expand(2, 2, q + 1))
    return H


@functools.lru_cache(maxsize=32)
def _base_as(m: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``_base(m)`` on ``device`` in ``dtype``, cached so online transforms don't copy it every call."""
    return _base(m).to(device=device, dtype=dtype)


def _sylvester(p: int) -> torch.Tensor:
    """Sylvester matrix of order ``p = 2**j``; ``(p, p)`` float64, symmetric."""
    S = torch.ones(1, 1, dtype=torch.float64)
    while S.shape[0] < p:
        S = torch.cat([torch.cat([S, S], 1), torch.cat([S, -S], 1)])
    return S


def _require_split(n: int) -> tuple[int, int]:
    split = _split(n)
    if split is None:
        raise NoHadamardConstruction(
            f"no Hadamard construction for order n={n} (needs n = 2^j * m with m = 1, q+1 for a prime "
            f"power q = 3 mod 4, or 2(q+1) for a prime power q = 1 mod 4)"
        )
    return split


def has_hadamard(n: int) -> bool:
    """True iff :func:`hadamard_matrix` can build order n."""
    return _split(n) is not None


def hadamard_matrix(n: int) -> torch.Tensor:
    """Unnormalised ±1 Hadamard matrix of order n, float64, shape ``(n, n)``, ``H @ H.T == n * I``.

    ``H = kron(H_m, S_p)`` for the split ``n = m * p`` of the module docstring (a fresh tensor each
    call; only the small base ``H_m`` is cached). Raises NoHadamardConstruction (one-line message
    naming n) when no construction covers n.
    """
    m, p = _require_split(n)
    return torch.kron(_base(m), _sylvester(p))


def orthogonal_hadamard(n: int, seed: int | None = None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Orthogonal ``(n, n)`` matrix ``H / sqrt(n)`` with H = :func:`hadamard_matrix` (n).

    With a seed: the random-sign Hadamard ``diag(s) @ H / sqrt(n)`` (QuaRot-style), s in {±1}^n drawn
    from a ``torch.Generator`` seeded with ``seed``. If n has no construction: a seeded random orthogonal
    matrix (QR of a Gaussian with the sign fix that makes it Haar-distributed, seed ``seed or 0``) and
    a warning on this module's logger.
    """
    if n < 1:
        raise ValueError(f"orthogonal_hadamard needs n >= 1, got n={n}")
    gen = torch.Generator().manual_seed(seed or 0)
    if not has_hadamard(n):
        log.warning("n=%d has no Hadamard construction; using a random orthogonal matrix (seed=%d)", n, seed or 0)
        Q, R = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
        sign = torch.where(torch.diagonal(R) < 0, -1.0, 1.0).to(torch.float64)
        return (Q * sign).to(dtype)
    # In place on the fresh matrix: at n = 18944 every extra copy is 2.9 GB.
    H = hadamard_matrix(n).div_(math.sqrt(n))
    if seed is not None:
        s = torch.randint(0, 2, (n,), generator=gen, dtype=torch.int64).to(torch.float64) * 2 - 1
        H.mul_(s[:, None])
    return H.to(dtype)


def fast_hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """``y = x @ (hadamard_matrix(n) / sqrt(n))`` along the last dim, ``n = x.shape[-1]``.

    Args:
        x: ``(..., n)`` floating tensor, any leading dims, any device.
    Returns:
        ``(..., n)``, same dtype. float16/bfloat16 are computed in float32 and cast back.

    With ``H_n = kron(H_m, S_p)`` and x viewed as ``X: (..., m, p)``, ``x @ H_n`` is ``H_m.T @ X @ S_p``:
    the ``S_p`` part is a log2(p)-step butterfly (no p x p matrix) and the ``H_m`` part one small
    ``(m, m)`` matmul. Plain out-of-place torch ops, so autograd differentiates it. Raises
    NoHadamardConstruction if n has no construction.
    """
    if not x.is_floating_point():
        raise TypeError(f"fast_hadamard_transform needs a floating tensor, got {x.dtype}")
    n = x.shape[-1]
    m, p = _require_split(n)
    lead = x.shape[:-1]
    compute = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    y = x.to(compute)
    # Butterfly: S_p = S_2 ⊗ ... ⊗ S_2, one factor per binary digit of the column index; step h
    # mixes columns that differ by h, which is x @ S_2 on that digit.
    h = 1
    while h < p:
        y = y.reshape(*lead, m * p // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2)
        h *= 2
    y = y.reshape(*lead, m, p)
    if m > 1:
        y = _base_as(m, y.device, compute).T @ y
    return (y.reshape(*lead, n) / math.sqrt(n)).to(x.dtype)


@functools.lru_cache(maxsize=8)
def _fallback_rotation(n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return orthogonal_hadamard(n).to(device=device, dtype=dtype)


def online_hadamard(x: torch.Tensor) -> torch.Tensor:
    """The online rotation of R3/R4: ``x @ H_n / sqrt(n)`` along the last dim by the fast transform.

    For an ``n`` with no Hadamard construction: ``x @ Q`` with the seeded random orthogonal
    ``Q = orthogonal_hadamard(n)`` (warned once, cached), so weight fusion and the online op agree.
    ``x``: ``(..., n)`` -> ``(..., n)``.
    """
    n = x.shape[-1]
    if has_hadamard(n):
        return fast_hadamard_transform(x)
    return x @ _fallback_rotation(n, x.device, x.dtype)
