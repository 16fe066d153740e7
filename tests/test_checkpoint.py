"""Fused checkpoint export/load round trip: the loaded model's logits equal the in-memory model's."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import model_cfg
from pipeline.checkpoint import CONFIG, load_fused, save_fused
from pipeline.errors import PipelineError
from pipeline.methods import MethodSpec, make_rotations, prepare_model
from pipeline.models import load_model, model_fingerprint
from pipeline.quantizers import QuantSpec


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_qwen2"])
@pytest.mark.parametrize("method", [
    MethodSpec(name="quarot", r1="random_hadamard", r2="random_hadamard", online_r3=True, online_r4=True),
    MethodSpec(name="rtn"),
])
def test_round_trip_exact(tmp_path, name, method, tokens):
    cfg = model_cfg(name)
    model, _ = load_model(cfg)
    fingerprint = model_fingerprint(model)
    quant = QuantSpec(w_bits=4, a_bits=4, kv_bits=4)
    prepare_model(model, method, make_rotations(method, model), quant)
    save_fused(tmp_path / "ckpt", model, method, quant, cfg, fingerprint)
    loaded, _ = load_fused(tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, model(tokens).logits)
    save_fused(tmp_path / "ckpt", model, method, quant, cfg, fingerprint)  # overwrite in place works
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_checkpoint_for_another_model_refused(tmp_path):
    model, _ = load_model(model_cfg("tiny_llama"))
    method, quant = MethodSpec(name="rtn"), QuantSpec()
    prepare_model(model, method, {}, quant)
    save_fused(tmp_path / "ckpt", model, method, quant, model_cfg("tiny_llama"), model_fingerprint(model))
    with pytest.raises(PipelineError, match="was made for another model"):
        load_fused(tmp_path / "ckpt", model_cfg("tiny_qwen2"))


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(PipelineError, match="is not a fused checkpoint"):
        load_fused(tmp_path)
    (tmp_path / CONFIG).write_text("{broken")
    with pytest.raises(PipelineError, match="is not valid JSON"):
        load_fused(tmp_path)


def test_rotation_set_must_match_method():
    model, _ = load_model(model_cfg("tiny_llama"))
    method = MethodSpec(name="quarot", r1="random_hadamard")
    with pytest.raises(PipelineError, match="lacks R1"):
        prepare_model(model, method, {}, QuantSpec())
    with pytest.raises(PipelineError, match="R1 has shape \\(8, 8\\), this model needs \\(192, 192\\)"):
        prepare_model(model, method, {"R1": torch.eye(8)}, QuantSpec())


def test_r2_set_must_match_method_and_head_dim():
    model, _ = load_model(model_cfg("tiny_llama"))
    with pytest.raises(PipelineError, match="does not fit method rtn: has unexpected R2.0"):
        prepare_model(model, MethodSpec(name="rtn"), {"R2.0": torch.eye(32)}, QuantSpec())
    method = MethodSpec(name="q", r2="hadamard")
    bad = {"R2.0": torch.eye(32), "R2.1": torch.eye(16)}
    with pytest.raises(PipelineError, match="R2.1 has shape \\(16, 16\\), this model needs \\(32, 32\\)"):
        prepare_model(model, method, bad, QuantSpec())
