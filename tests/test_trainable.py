"""On-the-fly rotation (training) equals fused rotation (export), and gradients reach every rotation."""
from __future__ import annotations

import pytest
import torch

from conftest import model_cfg
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


def test_training_with_quantized_weights_sees_the_rtn_grid(tokens):
    """train.quantize_weights: decoder weights pass RTN fake quant (STE) after rotation, like the fused
    model's RTN weights; embedding and lm_head stay 16-bit; gradients still reach the rotations."""
    quant = QuantSpec(w_bits=4, a_bits=4, kv_bits=4)
    rotations = make_rotations(GLOBAL, load_model(model_cfg("tiny_llama"))[0])
    fused, adapter = _model("tiny_llama", GLOBAL, quant)
    apply_rotation_set(fused, adapter, rotations)
    from pipeline.methods import quantize_linear_weights

    quantize_linear_weights(fused, adapter, quant)
    trained, adapter2 = _model("tiny_llama", GLOBAL, quant)
    rot = TrainableRotations(rotations, torch.float64)
    parametrize_rotations(trained, adapter2, rot, quant)
    q_proj = trained.model.layers[0].self_attn.q_proj.linear.weight
    assert torch.allclose(q_proj, fused.model.layers[0].self_attn.q_proj.linear.weight, rtol=0, atol=1e-12)
    assert torch.allclose(trained.lm_head.weight, fused.lm_head.weight, rtol=0, atol=1e-12)  # not quantized
    trained(tokens, labels=tokens).loss.backward()
    assert all(R.grad is not None and R.grad.abs().sum() > 0 for R in rot.as_dict().values())
