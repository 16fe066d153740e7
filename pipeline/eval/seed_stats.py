"""Perplexity over seeds: mean ± std, and paired t-intervals of ppl ratios over seeds.

The input of one variant is ``nll`` (S, W): the mean NLL of each of W evaluation windows (the same
windows for every variant and seed) under each of S seeds. A seed's perplexity is
``exp(mean_w nll[s])``; a variant's is the mean of its seeds' perplexities.

The ratio of variant a to variant b is compared seed by seed: ``d_s = log ppl_a(s) - log ppl_b(s) =
mean_w nll_a[s] - mean_w nll_b[s]`` over the S seeds both have, the ratio is ``exp(mean_s d_s)`` (the
geometric mean of the per-seed ratios) and its interval ``exp(mean d ± t_{S-1, 1-α/2} sd(d) / sqrt(S))``.
A difference is called significant when the interval excludes 1; with fewer than 2 seeds there is no
interval and no verdict (``low``, ``high``, ``significant`` are None).

Why over seeds and not windows: a seed (calibration sample, Hadamard signs, batch order) moves a
method's whole row of window NLLs at once, and that shift is what a second run of the method would
change. Windows are a fixed test set shared by both rows: resampling them (the former two-level
bootstrap) measures only the test-set noise, so at one seed every difference looked significant and at
3-5 seeds far more than α did (tests/test_seed_stats.py simulates both). The window noise still
reaches the interval through each seed's mean, and the t quantile holds the level with few seeds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from ..infra.errors import PipelineError


def seed_ppls(nll: torch.Tensor) -> torch.Tensor:
    """(S,) perplexity of each seed from ``nll`` (S, W)."""
    return nll.to(torch.float64).mean(dim=1).exp()


def mean_std(nll: torch.Tensor) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof 1; None for one seed) of the seeds' perplexities."""
    ppl = seed_ppls(nll)
    return ppl.mean().item(), (ppl.std(unbiased=True).item() if ppl.numel() > 1 else None)


def _incomplete_beta_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the regularized incomplete beta (modified Lentz, Numerical Recipes 6.4)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def incomplete_beta(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b) for a, b > 0, 0 <= x <= 1."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):  # the fraction converges fast here; else use the symmetry
        return math.exp(log_front) * _incomplete_beta_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _incomplete_beta_fraction(b, a, 1.0 - x) / b


def student_t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    tail = 0.5 * incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


@lru_cache(maxsize=256)
def student_t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (bisection on the cdf, |error| < 1e-10)."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise PipelineError(f"t quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
    if p < 0.5:
        return -student_t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while student_t_cdf(high, df) < p:
        low, high = high, 2.0 * high
    while high - low > 1e-10 * max(1.0, high):
        mid = 0.5 * (low + high)
        low, high = (mid, high) if student_t_cdf(mid, df) < p else (low, mid)
    return 0.5 * (low + high)


@dataclass(frozen=True)
class Ratio:
    """``ratio`` of two variants' perplexities (geometric mean over seeds of the per-seed ratios), its
    paired t-interval over seeds (None below 2 seeds) and whether that interval excludes 1."""

    ratio: float
    low: float | None
    high: float | None
    seeds: int
    windows: int

    @property
    def significant(self) -> bool | None:
        """The interval excludes 1; None (no verdict) without an interval."""
        if self.low is None or self.high is None:
            return None
        return self.low > 1.0 or self.high < 1.0


def paired_ratio(nll_a: torch.Tensor, nll_b: torch.Tensor, level: float = 0.95) -> Ratio:
    """Ratio of a's to b's perplexity with its paired t-interval over seeds (module doc).

    ``nll_a``, ``nll_b``: (S, W), row s of both from seed s, column w from window w.
    """
    if nll_a.shape != nll_b.shape or nll_a.dim() != 2 or 0 in nll_a.shape:
        raise PipelineError(f"paired ratio needs two equal (seeds, windows) tables, got {tuple(nll_a.shape)} "
                            f"and {tuple(nll_b.shape)}")
    if not 0.0 < level < 1.0:
        raise PipelineError(f"report.level={level}: must be in (0, 1)")
    S, W = nll_a.shape
    d = nll_a.to(torch.float64).mean(dim=1) - nll_b.to(torch.float64).mean(dim=1)  # (S,) log ppl ratio per seed
    mean = d.mean().item()
    low = high = None
    half = 0.0
    if S >= 2:
        half = student_t_quantile(0.5 + level / 2.0, S - 1) * d.std(unbiased=True).item() / math.sqrt(S)
        low, high = math.exp(mean - half), math.exp(mean + half)
    if not all(math.isfinite(v) for v in (mean, half)):
        raise PipelineError("a perplexity ratio is not finite: the per-window NLLs are broken")
    return Ratio(math.exp(mean), low, high, S, W)
