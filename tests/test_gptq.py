"""GPTQ: lower layer-output error than RTN on correlated inputs; the same codes when H is diagonal."""
from __future__ import annotations

import pytest
import torch

from pipeline.quant.gptq import gptq
from pipeline.quant.codes import dequantize, rtn


def _correlated_layer(seed: int, n: int = 4096, k: int = 256, out: int = 64):
    """Inputs with strongly correlated channels and a few large ones, a random weight, their Hessian."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    X = torch.randn(n, k, generator=g) @ mix
    X[:, :8] *= 6.0
    W = torch.randn(out, k, generator=g) / k**0.5
    return X, W, 2.0 / n * X.T @ X


def _output_error(X, W, codes, scale) -> float:
    return (X @ dequantize(codes, scale, torch.float32).T - X @ W.T).pow(2).sum().item()


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group", [0, 64])
@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_beats_rtn_on_correlated_inputs(act_order, group, bits):
    X, W, H = _correlated_layer(seed=bits)
    err_rtn = _output_error(X, W, *rtn(W, bits, True, group))
    codes, scale = gptq(W, H, bits, mse_clip=True, group_size=group, act_order=act_order, block=64)
    assert codes.dtype == torch.int8 and codes.min() >= -(2 ** (bits - 1)) and codes.max() <= 2 ** (bits - 1) - 1
    assert _output_error(X, W, codes, scale) < 0.7 * err_rtn


def test_diagonal_hessian_gives_rtn_codes():
    """With uncorrelated inputs there is no error to spread: GPTQ rounds to nearest on the same grid."""
    W = torch.randn(32, 128, generator=torch.Generator().manual_seed(0))
    H = torch.diag(torch.rand(128, generator=torch.Generator().manual_seed(1)) + 0.5)
    codes, scale = gptq(W, H, 4, mse_clip=True)
    rtn_codes, rtn_scale = rtn(W, 4, True)
    assert torch.equal(scale, rtn_scale) and torch.equal(codes, rtn_codes)


def test_dead_inputs_get_zero_codes():
    X, W, H = _correlated_layer(seed=0)
    H[5, :] = 0
    H[:, 5] = 0
    codes, _ = gptq(W, H, 4)
    assert (codes[:, 5] == 0).all()


def test_hessians_of_an_early_stopped_forward_equal_the_whole_layers():
    """``collect_hessians`` stops each window's forward once the group's linears have seen it: the
    Hessians are bit-equal to those of the whole layer's forward, and the later linears never run."""
    from helpers import QUAROT, W4A4, prepared_model

    from pipeline.model.adapters import adapter_for, get_linear
    from pipeline.model.streaming import layer_inputs, run_layer
    from pipeline.quant.gptq import _Hessian, collect_hessians

    model, _, _ = prepared_model("tiny_llama", QUAROT, W4A4)
    adapter = adapter_for(model)
    layer = adapter.layers(model)[0]
    windows = torch.randint(0, 256, (3, 40), generator=torch.Generator().manual_seed(5))
    inputs, kwargs = layer_inputs(model, layer, windows)
    writer_calls = []
    probe = get_linear(layer, adapter.MLP_WRITER).register_forward_pre_hook(lambda m, a: writer_calls.append(1))
    for group in (adapter.ATTN_READERS, (adapter.ATTN_WRITER,), adapter.MLP_READERS, (adapter.MLP_WRITER,)):
        whole = {name: _Hessian() for name in group}
        handles = [get_linear(layer, n).register_forward_pre_hook(whole[n].add) for n in group]
        run_layer(layer, inputs, kwargs)
        for h in handles:
            h.remove()
        writer_calls.clear()
        early = collect_hessians(layer, group, inputs, kwargs)
        for name in group:
            assert early[name].n == whole[name].n > 0
            assert torch.equal(early[name].take(), whole[name].take()), (group, name)
        assert len(writer_calls) == (len(inputs) if group == (adapter.MLP_WRITER,) else 0)
    probe.remove()
