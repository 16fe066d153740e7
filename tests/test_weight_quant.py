"""Integer weight codes: packing layout, round trips, group scales, bad shapes."""
from __future__ import annotations

import pytest
import torch

from pipeline.infra.errors import PipelineError
from pipeline.quant.codes import dequantize, group_of, pack, rtn, unpack, weight_scale


def test_pack_layout_low_nibble_is_even_k():
    codes = torch.tensor([[1, -1, -8, 7]], dtype=torch.int8)
    packed = pack(codes, 4)
    assert packed.dtype == torch.uint8 and packed.shape == (1, 2)
    assert packed.tolist() == [[0x1 | (0xF << 4), 0x8 | (0x7 << 4)]]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_unpack_round_trip(bits):
    g = torch.Generator().manual_seed(bits)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    codes = torch.randint(lo, hi + 1, (37, 96), generator=g).to(torch.int8)
    assert torch.equal(unpack(pack(codes, bits), bits), codes)


def test_odd_input_size_cannot_pack():
    with pytest.raises(PipelineError, match="odd input size 5"):
        pack(torch.zeros(2, 5, dtype=torch.int8), 4)


@pytest.mark.parametrize("group", [0, 32])
@pytest.mark.parametrize("mse", [True, False])
def test_rtn_codes_dequantize_to_the_grid(group, mse):
    w = torch.randn(24, 128, generator=torch.Generator().manual_seed(1))
    codes, scale = rtn(w, 4, mse, group)
    assert scale.shape == (24, 128 // (group or 128))
    assert codes.min() >= -8 and codes.max() <= 7
    deq = dequantize(codes, scale, torch.float32)
    assert (deq - w).abs().max() <= scale.max() * (4 if mse else 0.5 + 1e-6)
    if not mse:  # absmax: the largest weight of each group maps exactly to +-7
        assert (codes.abs().reshape(24, -1, group or 128).amax(-1) == 7).all()


def test_groups_lower_error():
    w = torch.randn(16, 256, generator=torch.Generator().manual_seed(2)) * torch.linspace(0.1, 3, 256)
    err = lambda g: (dequantize(*rtn(w, 4, False, g), torch.float32) - w).pow(2).sum()  # noqa: E731
    assert err(32) < err(0)


def test_group_must_divide_input():
    with pytest.raises(PipelineError, match="w_group_size=48 does not divide the input size 128"):
        group_of(128, 48)
    with pytest.raises(PipelineError, match="does not divide"):
        weight_scale(torch.randn(4, 128), 4, True, 48)
