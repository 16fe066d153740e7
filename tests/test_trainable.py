"""On-the-fly rotation (training) equals fused rotation (export), and gradients reach every rotation."""
from __future__ import annotations

import pytest
import torch

import pipeline.train.trainable as trainable
from conftest import model_cfg
from pipeline.model.adapters import adapter_for
from pipeline.rotation.cayley import orthonormalize
from pipeline.rotation.hadamard import orthogonal_hadamard
from pipeline.methods import MethodSpec, apply_rotation_set, make_rotations, prepare_base
from pipeline.model.load import load_model
from pipeline.quant.quantizers import QuantSpec
from pipeline.train.trainable import TrainableRotations, fold_rotations, parametrize_rotations, transition_delta
from helpers import random_per_layer_set

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
    rotations = random_per_layer_set(probe, 7) if method.per_layer else make_rotations(method, probe)

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


def _near_identity_per_layer_set(model, seed: int, angle: float = 1e-2) -> dict[str, torch.Tensor]:
    """A.i = R1 and B.i = R1 @ exp(small skew): every transition is within ~``angle`` of I."""
    dims = adapter_for(model).dims(model)
    g = torch.Generator().manual_seed(seed)
    R1 = orthogonal_hadamard(dims.hidden, seed=seed, dtype=torch.float64)

    def small() -> torch.Tensor:
        S = torch.randn(dims.hidden, dims.hidden, generator=g, dtype=torch.float64) * angle / dims.hidden ** 0.5
        return torch.linalg.matrix_exp(S - S.T)

    rotations = {f"A.{i}": R1.clone() for i in range(dims.n_layers + 1)}
    rotations.update({f"B.{i}": R1 @ small() for i in range(dims.n_layers)})
    rotations.update({f"R2.{i}": orthogonal_hadamard(dims.head_dim, seed=seed + i, dtype=torch.float64)
                      for i in range(dims.n_layers)})
    return rotations


def test_bf16_transition_forms_delta_in_float32(monkeypatch):
    """DESIGN §1 precision: in a bf16 model the hook's ΔT form is far closer to the float64 value of
    h @ (AᵀB - I) than the old bf16 two-product form (h @ Aᵀ) @ B - h, on near-identity transitions."""
    model, _ = load_model(model_cfg("tiny_llama"))
    adapter = prepare_base(model, PER_LAYER, QuantSpec())
    model = model.to(torch.bfloat16)
    rot = TrainableRotations(_near_identity_per_layer_set(model, seed=3))  # float32 Parameters
    calls = []
    real = trainable.transition_delta

    def recording(h, src, dst):
        out = real(h, src, dst)
        calls.append((h.detach(), src.detach(), dst.detach(), out.detach()))
        return out

    monkeypatch.setattr(trainable, "transition_delta", recording)
    parametrize_rotations(model, adapter, rot)
    fresh = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1234))
    with torch.no_grad():
        model(fresh)
    assert len(calls) == 2 * adapter.dims(model).n_layers  # every attn and ffn add
    new_err = old_err = 0.0
    for h, src, dst, out in calls:
        assert out.dtype == torch.bfloat16
        h64, eye = h.double(), torch.eye(src.shape[0], dtype=torch.float64)
        ref = h64 @ (src.double().T @ dst.double() - eye)
        old = (h @ src.T.to(h.dtype)) @ dst.to(h.dtype) - h
        scale = ref.norm().item()
        assert scale > 0
        new_err = max(new_err, (out.double() - ref).norm().item() / scale)
        old_err = max(old_err, (old.double() - ref).norm().item() / scale)
    assert new_err < 1e-2  # bf16 rounding of the result only (measured 1.7e-3)
    assert old_err > 10 * new_err  # measured 0.24: the bf16 rounding of h, A, B swamps h @ ΔT


def test_transition_gradients_reach_both_rotations_like_float64():
    """Autograd through ``transition_delta`` (float32 rotations, bf16 and float32 h) gives the float64
    gradients of the same expression, for both A and B."""
    g = torch.Generator().manual_seed(0)
    D = 32
    A64 = orthonormalize(torch.randn(D, D, generator=g, dtype=torch.float64))
    B64 = A64 @ orthonormalize(torch.eye(D, dtype=torch.float64) + 0.05 * torch.randn(D, D, generator=g,
                                                                                       dtype=torch.float64))
    h32 = torch.randn(5, 7, D, generator=g)
    # a generic linear functional of the output, exact in bf16 (a bf16 output's gradient arrives in bf16)
    w = torch.randn(5, 7, D, generator=g).to(torch.bfloat16).double()
    for h_dtype in (torch.float32, torch.bfloat16):
        h = h32.to(h_dtype)
        A, B = (torch.nn.Parameter(M.float()) for M in (A64, B64))
        out = transition_delta(h, A, B)
        assert out.dtype == h_dtype
        (out.double() * w).sum().backward()
        Ar, Br = (M.float().double().requires_grad_() for M in (A64, B64))
        ref = h.double() @ (Ar.T @ Br - torch.eye(D, dtype=torch.float64))
        (ref * w).sum().backward()
        for P, R in ((A, Ar), (B, Br)):
            assert P.grad is not None and P.grad.abs().sum() > 0
            assert torch.allclose(P.grad.double(), R.grad, rtol=0, atol=1e-5 * R.grad.abs().max().item())
