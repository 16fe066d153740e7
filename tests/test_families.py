"""Families beyond Llama/Qwen2/Mistral, one adapter each (no forked model file): Qwen3 (q_norm / k_norm
inside attention, biases), Llama-3.2 (tied embeddings, llama3 rope scaling) and Phi-3 (fused qkv_proj
and gate_up_proj: R2 on the v rows only). Float64 invariance of
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

FAMILIES = ["tiny_qwen3", "tiny_llama32", "tiny_phi3", "tiny_qwen3_moe", "tiny_olmoe", "tiny_mixtral"]


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


@pytest.mark.parametrize("model,method", [("tiny_qwen3", "quarot"), ("tiny_phi3", "spinquant"), ("tiny_qwen3_moe", "spinquant")])
def test_stages_run_with_the_family_configs(tmp_path, model, method):
    """python stages/fuse.py +model=<family> (after calibrate and rotate_global), as a user runs it;
    Phi-3 with SpinQuant training, whose R2 gradient flows through the v-row slice of qkv_proj."""
    args = (f"+model={model}", f"method={method}", "calib.n_windows=2", "calib.seqlen=32", "calib.stats_windows=1",
            "train.steps=1", "train.batch_size=1", "train.checkpoint_every=0")
    for script in ("calibrate.py", "train_rotation.py", "fuse.py"):
        proc = run_stage(tmp_path, script, *args)
        assert proc.returncode == 0, proc.stderr[-2000:]
    name, cfg = hand_run(tmp_path, *args)
    assert (paths.fused(cfg, name) / "rsq_config.json").is_file()


def test_phi3_r2_rotates_only_the_v_rows_of_the_fused_qkv():
    """An R2-only set (no R1) leaves qkv_proj's q and k rows bit-identical and changes its v rows; the
    model's function is unchanged (float64)."""
    from helpers import f64_model, max_rel_error, model_logits

    from pipeline.methods import MethodSpec, make_rotations, prepare_model
    from pipeline.model.adapters import adapter_for, get_linear
    from pipeline.surgery.weights import replace_norms

    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    method = MethodSpec(name="r2only", r1="none", r2="random_hadamard")
    reference = f64_model("tiny_phi3")
    replace_norms(reference, adapter_for(reference))  # HF's norm floors float64 at ~1e-7
    ref = model_logits(reference, tokens)
    fused = {}
    for which in ("identity", "random"):  # the same code path; R2 = I folds the norms and nothing else
        model = f64_model("tiny_phi3")
        adapter = adapter_for(model)
        rotations = make_rotations(method, model)
        if which == "identity":
            rotations = {k: torch.eye(v.shape[0], dtype=v.dtype) for k, v in rotations.items()}
        prepare_model(model, method, rotations, QuantSpec())
        assert max_rel_error(model_logits(model, tokens), ref) <= 1e-9
        layer = adapter.layers(model)[0]
        fused[which] = get_linear(layer, adapter.V_PROJ).weight.detach()
    start, end = adapter.v_rows(layer)
    assert (start, end) == (6 * 32 + 2 * 32, 6 * 32 + 4 * 32) == (start, fused["random"].shape[0])
    assert torch.equal(fused["random"][:start], fused["identity"][:start])  # q and k rows untouched
    assert (fused["random"][start:] - fused["identity"][start:]).abs().max() > 1e-3
