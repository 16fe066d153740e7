"""Perplexity over seeds and windows: mean ± std, and paired-bootstrap intervals of ppl ratios.

The input of one variant is ``nll`` (S, W): the mean NLL of each of W evaluation windows (the same
windows for every variant and seed) under each of S seeds. A seed's perplexity is
``exp(mean_w nll[s])``; a variant's is the mean of its seeds' perplexities.

The ratio of variant a to variant b is ``mean_s ppl_a(s) / mean_s ppl_b(s)`` over the seeds both have.
Its interval is a paired two-level bootstrap: each draw resamples the seeds and the windows with
replacement, the same draw for both variants (a seed pairs a's and b's runs of that seed, a window
the same text), and recomputes the ratio; the interval is the percentile interval of the draws.
A difference is called significant when the interval excludes 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import PipelineError


def seed_ppls(nll: torch.Tensor) -> torch.Tensor:
    """(S,) perplexity of each seed from ``nll`` (S, W)."""
    return nll.to(torch.float64).mean(dim=1).exp()


def mean_std(nll: torch.Tensor) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof 1; None for one seed) of the seeds' perplexities."""
    ppl = seed_ppls(nll)
    return ppl.mean().item(), (ppl.std(unbiased=True).item() if ppl.numel() > 1 else None)


@dataclass(frozen=True)
class Ratio:
    """``ratio`` of two variants' mean perplexities, its bootstrap interval and whether it excludes 1."""

    ratio: float
    low: float
    high: float
    seeds: int
    windows: int

    @property
    def significant(self) -> bool:
        return self.low > 1.0 or self.high < 1.0


def paired_ratio(nll_a: torch.Tensor, nll_b: torch.Tensor, draws: int = 2000, level: float = 0.95,
                 seed: int = 0) -> Ratio:
    """Ratio of a's to b's mean perplexity with its paired-bootstrap interval (module doc).

    ``nll_a``, ``nll_b``: (S, W), row s of both from seed s, column w from window w.
    """
    if nll_a.shape != nll_b.shape or nll_a.dim() != 2 or 0 in nll_a.shape:
        raise PipelineError(f"paired ratio needs two equal (seeds, windows) tables, got {tuple(nll_a.shape)} "
                            f"and {tuple(nll_b.shape)}")
    if not 0.0 < level < 1.0:
        raise PipelineError(f"report.level={level}: must be in (0, 1)")
    if draws < 1:
        raise PipelineError(f"report.bootstrap={draws}: must be at least 1")
    a, b = nll_a.to(torch.float64), nll_b.to(torch.float64)
    S, W = a.shape
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, S, (draws, S, 1), generator=gen)
    cols = torch.randint(0, W, (draws, 1, W), generator=gen)

    def resampled(t: torch.Tensor) -> torch.Tensor:  # (draws,) mean ppl over the resampled seeds
        return t[rows, cols].mean(dim=2).exp().mean(dim=1)

    ratios = resampled(a) / resampled(b)
    alpha = (1.0 - level) / 2.0
    low, high = torch.quantile(ratios, torch.tensor([alpha, 1.0 - alpha], dtype=torch.float64)).tolist()
    ratio = seed_ppls(a).mean().item() / seed_ppls(b).mean().item()
    if not all(math.isfinite(v) for v in (ratio, low, high)):
        raise PipelineError("a perplexity ratio is not finite: the per-window NLLs are broken")
    return Ratio(ratio, low, high, S, W)
