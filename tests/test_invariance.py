"""Rotations and fusion preserve the function: float64, quantization off, vs the unrotated model."""
from __future__ import annotations

import pytest
import torch

from conftest import model_cfg
from pipeline.model.adapters import adapter_for
from pipeline.methods import MethodSpec, make_rotations, prepare_model
from pipeline.model.load import load_model
from pipeline.quant.quantizers import QuantSpec
from pipeline.surgery.weights import replace_norms

MODELS = ["tiny_llama", "tiny_qwen2", "tiny_mistral", "tiny_no_hadamard"]


def _f64_model(name: str):
    model, _ = load_model(model_cfg(name))
    return model.double()


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("r_kind", ["hadamard", "random_hadamard"])
def test_rotated_model_matches_original_float64(name, r_kind, tokens):
    reference = _f64_model(name)
    replace_norms(reference, adapter_for(reference))  # HF's norm floors float64 at ~1e-7
    ref = _logits(reference, tokens)

    model = _f64_model(name)
    method = MethodSpec(name="quarot", r1=r_kind, r2=r_kind, online_r3=True, online_r4=True, seed=3)
    prepare_model(model, method, make_rotations(method, model), QuantSpec())
    assert _max_rel(_logits(model, tokens), ref) <= 1e-9


@pytest.mark.parametrize("name", MODELS)
def test_rotation_really_changes_weights(name, tokens):
    """Guards the test above against a no-op: weights move, function does not."""
    model = _f64_model(name)
    before = adapter_for(model).layers(model)[0].self_attn.q_proj.weight.clone()
    method = MethodSpec(name="quarot", r1="random_hadamard", r2="random_hadamard", online_r3=True, online_r4=True)
    prepare_model(model, method, make_rotations(method, model), QuantSpec())
    after = adapter_for(model).layers(model)[0].self_attn.q_proj.linear.weight
    assert (after - before).abs().max() > 1e-3


def test_tied_embeddings_untied_after_rotation():
    model = _f64_model("tiny_llama")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    method = MethodSpec(name="quarot", r1="random_hadamard")
    prepare_model(model, method, make_rotations(method, model), QuantSpec())
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()


def test_sizes_without_hadamard_fall_back_and_say_so(caplog):
    from pipeline.rotation import hadamard

    hadamard._fallback_rotation.cache_clear()  # the online fallback warns once per process
    model = _f64_model("tiny_no_hadamard")
    method = MethodSpec(name="quarot", r1="hadamard", r2="hadamard", online_r3=True, online_r4=True)
    with caplog.at_level("WARNING"):
        prepare_model(model, method, make_rotations(method, model), QuantSpec())
    assert "n=30 has no Hadamard construction" in caplog.text  # head_dim: R2 and R3
    assert "n=330 has no Hadamard construction" in caplog.text


def _random_per_layer_set(model, seed: int) -> dict[str, torch.Tensor]:
    """Distinct random orthogonal A_i, B_i (so every transition is far from I) and R2 per layer."""
    from pipeline.rotation.cayley import orthonormalize

    dims = adapter_for(model).dims(model)
    g = torch.Generator().manual_seed(seed)
    rand = lambda n: orthonormalize(torch.randn(n, n, generator=g, dtype=torch.float64))  # noqa: E731
    rotations = {f"A.{i}": rand(dims.hidden) for i in range(dims.n_layers + 1)}
    rotations.update({f"B.{i}": rand(dims.hidden) for i in range(dims.n_layers)})
    rotations.update({f"R2.{i}": rand(dims.head_dim) for i in range(dims.n_layers)})
    return rotations


@pytest.mark.parametrize("name", MODELS)
def test_per_layer_bases_with_exact_transitions_match_original_float64(name, tokens):
    reference = _f64_model(name)
    replace_norms(reference, adapter_for(reference))
    ref = _logits(reference, tokens)
    model = _f64_model(name)
    method = MethodSpec(name="layerwise", r1="hadamard", r2="hadamard", online_r3=True, online_r4=True,
                        per_layer=True)
    prepare_model(model, method, _random_per_layer_set(model, seed=5), QuantSpec())
    assert _max_rel(_logits(model, tokens), ref) <= 1e-9


def test_per_layer_without_transitions_is_wrong(tokens):
    """The transitions are what make per-layer bases exact: without them the function changes."""
    reference = _f64_model("tiny_llama")
    replace_norms(reference, adapter_for(reference))
    model = _f64_model("tiny_llama")
    method = MethodSpec(name="layerwise", r1="hadamard", r2="hadamard", per_layer=True)
    prepare_model(model, method, _random_per_layer_set(model, seed=5), QuantSpec())
    for buf in model.rsq_transitions.buffers():
        buf.zero_()  # the buffers hold T - I: zero means no transition
    assert _max_rel(_logits(model, tokens), _logits(reference, tokens)) > 1e-2
