"""Families beyond Llama/Qwen2/Mistral, one adapter each (no forked model file): Qwen3 (q_norm / k_norm
inside attention, biases) and Llama-3.2 (tied embeddings, llama3 rope scaling). Float64 invariance of
every method runs for them in tests/test_invariance.py and tests/test_subspace.py (helpers.MODELS);
here: biases really random, a quantized forward, GPTQ and the checkpoint round trip, and the stages
with their Hydra model configs."""
from __future__ import annotations

import pytest
import torch

from conftest import model_cfg
from helpers import QUAROT, RESPIN, hand_run, prepared_model, run_stage
from pipeline import load_quantized
from pipeline.export.checkpoint import save_quantized
from pipeline.infra import paths
from pipeline.model.load import load_model
from pipeline.quant.quantizers import QuantSpec

FAMILIES = ["tiny_qwen3", "tiny_llama32"]


def test_random_init_biases_and_qk_norms_are_not_trivial():
    """HF zero-initialises biases and sets norms to one: a test on those would not see a bias that
    is rotated wrongly or a q_norm folded by mistake."""
    model, _ = load_model(model_cfg("tiny_qwen3"))
    attn = model.model.layers[0].self_attn
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
        assert proj.bias is not None and proj.bias.abs().min() > 0
    assert attn.q_norm.weight.std() > 0.1 and attn.k_norm.weight.std() > 0.1
    assert model.config.head_dim * model.config.num_attention_heads != model.config.hidden_size


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("method,rank,weights", [(QUAROT, None, "rtn"), (RESPIN, 8, "gptq")])
def test_quantized_forward_gptq_and_round_trip(tmp_path, name, method, rank, weights, tokens):
    """W4A4KV4 forward is finite and close in argmax to fp32 at this tiny size; the checkpoint reloads
    to bit-equal logits."""
    quant = QuantSpec(w_bits=4, a_bits=4, kv_bits=4, weight_method=weights)
    model, tok, fingerprint = prepared_model(name, method, quant, rank)
    with torch.no_grad():
        logits = model(tokens).logits
    assert torch.isfinite(logits).all()
    save_quantized(tmp_path / "ckpt", model, tok, method, quant, fingerprint)
    with torch.no_grad():
        assert torch.equal(load_quantized(tmp_path / "ckpt")(tokens).logits, logits)


def test_stages_run_with_the_family_configs(tmp_path):
    """python stages/fuse.py +model=tiny_qwen3 (after calibrate and rotate_global), as a user runs it."""
    args = ("+model=tiny_qwen3", "method=quarot", "calib.n_windows=2", "calib.seqlen=32", "calib.stats_windows=1")
    for script in ("calibrate.py", "train_rotation.py", "fuse.py"):
        proc = run_stage(tmp_path, script, *args)
        assert proc.returncode == 0, proc.stderr[-2000:]
    name, cfg = hand_run(tmp_path, *args)
    assert (paths.fused(cfg, name) / "rsq_config.json").is_file()
