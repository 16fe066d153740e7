"""On-the-fly rotation (training) equals fused rotation (export), and gradients reach every rotation."""
from __future__ import annotations

import pytest
import torch

from conftest import model_cfg
from pipeline.adapters import adapter_for
from pipeline.methods import MethodSpec, apply_rotation_set, make_rotations, prepare_base
from pipeline.models import load_model
from pipeline.quantizers import QuantSpec
from pipeline.trainable import TrainableRotations, fold_rotations, parametrize_rotations
from test_invariance import _random_per_layer_set

GLOBAL = MethodSpec(name="spinquant", r1="random_hadamard", r2="random_hadamard", online_r3=True, online_r4=True)
PER_LAYER = MethodSpec(name="layerwise", r1="random_hadamard", r2="random_hadamard", online_r3=True,
                       online_r4=True, per_layer=True)


def _model(name: str, method: MethodSpec, quant: QuantSpec):
    model, _ = load_model(model_cfg(name))
    model = model.double()
    return model, prepare_base(model, method, quant)


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_qwen2"])
@pytest.mark.parametrize("method", [GLOBAL, PER_LAYER])
def test_parametrized_equals_fused(name, method, tokens):
    quant = QuantSpec(a_bits=4, kv_bits=4)
    probe, _ = load_model(model_cfg(name))
    rotations = _random_per_layer_set(probe, 7) if method.per_layer else make_rotations(method, probe)

    fused, adapter = _model(name, method, quant)
    apply_rotation_set(fused, adapter, rotations)
    trained, adapter2 = _model(name, method, quant)
    handles = parametrize_rotations(trained, adapter2, TrainableRotations(rotations, torch.float64))
    with torch.no_grad():
        expected = fused(tokens).logits
        assert torch.allclose(trained(tokens).logits, expected, rtol=0, atol=1e-9 * expected.abs().max())
        fold_rotations(trained, handles)
        if method.per_layer:  # after folding, the fused model also needs its dense transitions
            return
        assert torch.allclose(trained(tokens).logits, expected, rtol=0, atol=1e-9 * expected.abs().max())


@pytest.mark.parametrize("method", [GLOBAL, PER_LAYER])
def test_gradients_reach_every_rotation(method, tokens):
    model, _ = load_model(model_cfg("tiny_llama"))
    adapter = prepare_base(model, method, QuantSpec(a_bits=4, kv_bits=4))
    rot = TrainableRotations(make_rotations(method, model))
    parametrize_rotations(model, adapter, rot)
    out = model(tokens, labels=tokens)
    out.loss.backward()
    for name, R in rot.as_dict().items():
        assert R.grad is not None and R.grad.abs().sum() > 0, name
    assert all(not p.requires_grad for n, p in model.named_parameters() if "original" in n)
