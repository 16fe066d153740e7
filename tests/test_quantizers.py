"""Quantizer properties: grid levels, clipping, MSE clip search, STE gradient, config validation."""
from __future__ import annotations

import pytest
import torch

from pipeline.quant.codes import sym_scale_mse
from pipeline.quant.quantizers import QuantSpec, quantize_asym, quantize_weight_rtn


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_asym_levels_per_row(bits):
    x = torch.randn(7, 64, generator=_gen()) * torch.linspace(0.1, 10, 7).unsqueeze(1)
    q = quantize_asym(x, bits)
    for row, qrow in zip(x, q):
        levels = torch.unique(qrow)
        assert len(levels) <= 2**bits
        step = (row.max().clamp(min=0) - row.min().clamp(max=0)) / (2**bits - 1)
        # values sit on a uniform grid of the row's step (up to float rounding)
        k = (levels - levels[0]) / step
        assert torch.allclose(k, k.round(), atol=1e-3)
        assert (qrow - row).abs().max() <= step / 2 + 1e-5


def test_asym_clip_ratio_clips_extremes():
    x = torch.linspace(-1, 3, 101).unsqueeze(0)
    q = quantize_asym(x, 4, clip_ratio=0.5)
    step = 2.0 / 15  # clipped range [-0.5, 1.5] on 16 levels; the rounded zero point shifts by < 1 step
    assert q.max() <= 1.5 + step and q.min() >= -0.5 - step
    assert q.max() > 1.5 - step and len(torch.unique(q)) == 16


def test_sixteen_bits_is_off():
    x = torch.randn(3, 8, generator=_gen())
    assert quantize_asym(x, 16) is x
    assert quantize_weight_rtn(x, 16) is x


@pytest.mark.parametrize("bits", [3, 4])
def test_weight_rtn_symmetric_levels(bits):
    w = torch.randn(16, 128, generator=_gen(1))
    q = quantize_weight_rtn(w, bits)
    scale = sym_scale_mse(w, bits)
    codes = q / scale
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    codes = codes.round()
    assert codes.min() >= -(2 ** (bits - 1)) and codes.max() <= 2 ** (bits - 1) - 1


def test_mse_clip_search_beats_absmax():
    w = torch.randn(32, 256, generator=_gen(2))
    w[:, 0] *= 8  # an outlier column: absmax scaling wastes the grid on it
    err_mse = (quantize_weight_rtn(w, 4, mse_clip=True) - w).pow(2).sum()
    err_max = (quantize_weight_rtn(w, 4, mse_clip=False) - w).pow(2).sum()
    assert err_mse < err_max


def test_ste_gradient_is_identity():
    x = torch.randn(4, 32, generator=_gen(3), requires_grad=True)
    g = torch.randn(4, 32, generator=_gen(4))
    (quantize_asym(x, 4) * g).sum().backward()
    assert torch.equal(x.grad, g)
    w = torch.randn(8, 32, generator=_gen(5), requires_grad=True)
    (quantize_weight_rtn(w, 4) * g[:, :32].repeat(2, 1)).sum().backward()
    assert torch.equal(w.grad, g[:, :32].repeat(2, 1))


@pytest.mark.parametrize("bad", [{"w_bits": 1}, {"a_bits": 12}, {"a_clip_ratio": 0.0}, {"kv_clip_ratio": 1.5}])
def test_quant_spec_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="quant\\."):
        QuantSpec(**bad)
