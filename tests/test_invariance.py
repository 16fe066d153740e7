"""Rotations and fusion preserve the function: float64, quantization off, vs the unrotated model."""
from __future__ import annotations

import pytest

from pipeline.model.adapters import adapter_for, get_linear
from pipeline.methods import MethodSpec, make_rotations, prepare_model
from pipeline.quant.quantizers import QuantSpec
from pipeline.surgery.weights import replace_norms
from helpers import MODELS, f64_model, max_rel_error, model_logits, random_per_layer_set


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("r_kind", ["hadamard", "random_hadamard"])
def test_rotated_model_matches_original_float64(name, r_kind, tokens):
    reference = f64_model(name)
    replace_norms(reference, adapter_for(reference))  # HF's norm floors float64 at ~1e-7
    ref = model_logits(reference, tokens)

    model = f64_model(name)
    method = MethodSpec(name="quarot", r1=r_kind, r2=r_kind, online_r3=True, online_r4=True, seed=3)
    prepare_model(model, method, make_rotations(method, model), QuantSpec())
    assert max_rel_error(model_logits(model, tokens), ref) <= 1e-9


@pytest.mark.parametrize("name", MODELS)
def test_rotation_really_changes_weights(name, tokens):
    """Guards the test above against a no-op: weights move, function does not."""
    model = f64_model(name)
    adapter = adapter_for(model)
    first = adapter.ATTN_READERS[0]  # q_proj, or a fused qkv_proj
    before = get_linear(adapter.layers(model)[0], first).weight.clone()
    method = MethodSpec(name="quarot", r1="random_hadamard", r2="random_hadamard", online_r3=True, online_r4=True)
    prepare_model(model, method, make_rotations(method, model), QuantSpec())
    after = get_linear(adapter.layers(model)[0], first).weight
    assert (after - before).abs().max() > 1e-3


def test_tied_embeddings_untied_after_rotation():
    model = f64_model("tiny_llama")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    method = MethodSpec(name="quarot", r1="random_hadamard")
    prepare_model(model, method, make_rotations(method, model), QuantSpec())
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()


def test_sizes_without_hadamard_fall_back_and_say_so(caplog):
    from pipeline.rotation import hadamard

    hadamard._fallback_rotation.cache_clear()  # the online fallback warns once per process
    model = f64_model("tiny_no_hadamard")
    method = MethodSpec(name="quarot", r1="hadamard", r2="hadamard", online_r3=True, online_r4=True)
    with caplog.at_level("WARNING"):
        prepare_model(model, method, make_rotations(method, model), QuantSpec())
    assert "n=30 has no Hadamard construction" in caplog.text  # head_dim: R2 and R3
    assert "n=330 has no Hadamard construction" in caplog.text


@pytest.mark.parametrize("name", MODELS)
def test_per_layer_bases_with_exact_transitions_match_original_float64(name, tokens):
    reference = f64_model(name)
    replace_norms(reference, adapter_for(reference))
    ref = model_logits(reference, tokens)
    model = f64_model(name)
    method = MethodSpec(name="layerwise", r1="hadamard", r2="hadamard", online_r3=True, online_r4=True,
                        per_layer=True)
    prepare_model(model, method, random_per_layer_set(model, seed=5), QuantSpec())
    assert max_rel_error(model_logits(model, tokens), ref) <= 1e-9


def test_per_layer_without_transitions_is_wrong(tokens):
    """The transitions are what make per-layer bases exact: without them the function changes."""
    reference = f64_model("tiny_llama")
    replace_norms(reference, adapter_for(reference))
    model = f64_model("tiny_llama")
    method = MethodSpec(name="layerwise", r1="hadamard", r2="hadamard", per_layer=True)
    prepare_model(model, method, random_per_layer_set(model, seed=5), QuantSpec())
    for buf in model.rsq_transitions.buffers():
        buf.zero_()  # the buffers hold T - I: zero means no transition
    assert max_rel_error(model_logits(model, tokens), model_logits(reference, tokens)) > 1e-2
