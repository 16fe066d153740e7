"""The quantized checkpoint: packed export, self-contained load, exact logits, refusals."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from conftest import model_cfg
from pipeline import load_quantized, load_tokenizer
from pipeline.infra.artifacts import file_sha256
from pipeline.export.checkpoint import CONFIG, FORMAT, INDEX, save_quantized, shard_name
from pipeline.infra.errors import PipelineError
from pipeline.methods import MethodSpec, make_rotations, prepare_model
from pipeline.model.load import load_model
from pipeline.quant.quantizers import QuantSpec
from helpers import LAYERWISE, QUAROT, RESPIN, W4A4, prepared_model


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_qwen2"])
@pytest.mark.parametrize("method,rank", [(QUAROT, None), (MethodSpec(name="rtn"), None), (LAYERWISE, None),
                                         (RESPIN, 0), (RESPIN, 8), (RESPIN, "adaptive")])
@pytest.mark.parametrize("weights", ["rtn", "gptq"])
def test_round_trip_exact(tmp_path, name, method, rank, weights, tokens):
    quant = QuantSpec(w_bits=4, a_bits=4, kv_bits=4, weight_method=weights)
    model, tok, fingerprint = prepared_model(name, method, quant, rank)
    save_quantized(tmp_path / "ckpt", model, tok, method, quant, fingerprint)
    loaded = load_quantized(tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, model(tokens).logits)
    assert load_tokenizer(tmp_path / "ckpt")("ab")["input_ids"] == tok("ab")["input_ids"]
    save_quantized(tmp_path / "ckpt", model, tok, method, quant, fingerprint)  # overwrite in place works
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_weights_are_packed_int4_with_scales(tmp_path):
    quant = QuantSpec(w_bits=4, a_bits=4, kv_bits=4, w_group_size=32)
    model, tok, fingerprint = prepared_model("tiny_llama", RESPIN, quant, rank=8)
    save_quantized(tmp_path / "ckpt", model, tok, RESPIN, quant, fingerprint)
    with safe_open(str(tmp_path / "ckpt" / shard_name(1, 2)), "pt") as f:
        keys = set(f.keys())
        q = f.get_tensor("model.layers.0.mlp.down_proj.linear.qweight")
        s = f.get_tensor("model.layers.0.mlp.down_proj.weight_scale")
    with safe_open(str(tmp_path / "ckpt" / shard_name(2, 2)), "pt") as f:
        assert f.get_tensor("rsq_transitions.Q_ffn_1").shape == (192, 8)  # layer 1's adds live in its shard
    assert q.dtype == torch.uint8 and q.shape == (192, 320 // 2) and s.shape == (192, 320 // 32)
    assert not any(k.endswith("proj.linear.weight") for k in keys)  # no float copy of a quantized weight
    config = json.loads((tmp_path / "ckpt" / CONFIG).read_text())
    assert config["online"] == {"r3_hadamard_size": 32, "r4_hadamard_size": 320, "transitions": "low_rank",
                                "transition_ranks": {f"{s}_{i}": 8 for i in range(2) for s in ("attn", "ffn")}}


def test_weights_off_the_grid_are_refused(tmp_path):
    model, tok, fingerprint = prepared_model("tiny_llama", QUAROT, W4A4)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.linear.weight[0, 0] += 1e-3
    with pytest.raises(PipelineError, match="not on their quantization grid"):
        save_quantized(tmp_path / "ckpt", model, tok, QUAROT, W4A4, fingerprint)
    assert not (tmp_path / "ckpt").exists()


def test_checkpoint_for_another_model_refused(tmp_path):
    model, tok, fingerprint = prepared_model("tiny_llama", QUAROT, W4A4)
    save_quantized(tmp_path / "ckpt", model, tok, QUAROT, W4A4, fingerprint)
    hf = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    hf["num_hidden_layers"] = 3
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(hf))
    with pytest.raises(PipelineError, match="config.json is missing or does not match the sha256"):
        load_quantized(tmp_path / "ckpt")  # the edit itself is caught by the index's hashes
    index = json.loads((tmp_path / "ckpt" / INDEX).read_text())  # an edit that re-hashes the file too
    index["metadata"]["file_sha256"]["config.json"] = file_sha256(tmp_path / "ckpt" / "config.json")
    (tmp_path / "ckpt" / INDEX).write_text(json.dumps(index))
    with pytest.raises(PipelineError, match="was made for another model"):
        load_quantized(tmp_path / "ckpt")  # is still refused by the fingerprint


@pytest.mark.parametrize("cut", [0.5, 0.999])
def test_truncated_weights_refused(tmp_path, cut):
    model, tok, fingerprint = prepared_model("tiny_llama", QUAROT, W4A4)
    save_quantized(tmp_path / "ckpt", model, tok, QUAROT, W4A4, fingerprint)
    path = tmp_path / "ckpt" / shard_name(1, 2)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(PipelineError, match="does not match the sha256 recorded"):
        load_quantized(tmp_path / "ckpt")


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(PipelineError, match="is not a quantized checkpoint"):
        load_quantized(tmp_path)
    (tmp_path / CONFIG).write_text("{broken")
    with pytest.raises(PipelineError, match="is not valid JSON"):
        load_quantized(tmp_path)
    (tmp_path / CONFIG).write_text(json.dumps({"format": 1}))
    with pytest.raises(PipelineError, match="has checkpoint format 1"):
        load_quantized(tmp_path)
    (tmp_path / CONFIG).write_text(json.dumps({"format": FORMAT}))
    with pytest.raises(PipelineError, match="index.json is missing"):
        load_quantized(tmp_path)


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


def test_gptq_needs_calibration_windows():
    model, _ = load_model(model_cfg("tiny_llama"))
    with pytest.raises(PipelineError, match="gptq needs calibration windows"):
        prepare_model(model, QUAROT, make_rotations(QUAROT, model), QuantSpec(w_bits=4, weight_method="gptq"))


def test_missing_transitions_refused(tmp_path):
    """A shard rewritten without its transitions (and its hash updated to match) is still refused."""
    model, tok, fingerprint = prepared_model("tiny_llama", RESPIN, W4A4, rank=4)
    save_quantized(tmp_path / "ckpt", model, tok, RESPIN, W4A4, fingerprint)
    def drop(tensors):
        del tensors["rsq_transitions.Q_ffn_1"], tensors["rsq_transitions.M_ffn_1"]

    _rewrite_shard(tmp_path / "ckpt", shard_name(2, 2), drop)
    with pytest.raises(PipelineError, match="does not hold the transitions of layer 1"):
        load_quantized(tmp_path / "ckpt")


def _rewrite_shard(folder, name: str, edit) -> None:
    """Rewrite shard ``name`` after ``edit(tensors)`` and record its new sha256 in the index, as a
    consistent (not accidental) change would."""
    from safetensors.torch import save_file

    from pipeline.infra.artifacts import file_sha256, load_tensors

    tensors, meta = load_tensors(folder / name, digests=False)
    edit(tensors)
    save_file(tensors, str(folder / name), metadata=meta)  # a tamperer's writer: no finite check
    index = json.loads((folder / INDEX).read_text())
    index["metadata"]["shard_sha256"][name] = file_sha256(folder / name)
    (folder / INDEX).write_text(json.dumps(index))


def _tamper(path, offset_from_end: int = 64) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x5A
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("edit", ["a_bits", "method", "online_r4"])
def test_edited_config_refused(tmp_path, edit):
    """Editing rsq_config.json (a W4A4 checkpoint relabelled W4A16, another method, R4 off) changes the
    online ops the weights were fused for: refused in one line naming the file."""
    model, tok, fingerprint = prepared_model("tiny_llama", QUAROT, W4A4)
    save_quantized(tmp_path / "ckpt", model, tok, QUAROT, W4A4, fingerprint)
    path = tmp_path / "ckpt" / CONFIG
    config = json.loads(path.read_text())
    if edit == "a_bits":
        config["quant"]["a_bits"] = config["quant"]["kv_bits"] = 16
    elif edit == "method":
        config["method"] = {**config["method"], "name": "rtn", "r1": "none", "r2": "none",
                            "online_r3": False, "online_r4": False}
    else:
        config["method"]["online_r4"] = False
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    with pytest.raises(PipelineError, match=f"{CONFIG} does not match the sha256 recorded"):
        load_quantized(tmp_path / "ckpt")


def test_flipped_tensor_bytes_refused(tmp_path):
    """Flipped bytes inside tensor data (not the header) are caught by the shard's sha256."""
    model, tok, fingerprint = prepared_model("tiny_llama", QUAROT, W4A4)
    save_quantized(tmp_path / "ckpt", model, tok, QUAROT, W4A4, fingerprint)
    shard = tmp_path / "ckpt" / shard_name(2, 2)
    _tamper(shard)
    with pytest.raises(PipelineError, match=f"{shard.name} does not match the sha256 recorded"):
        load_quantized(tmp_path / "ckpt")


def test_missing_shard_refused(tmp_path):
    model, tok, fingerprint = prepared_model("tiny_llama", QUAROT, W4A4)
    save_quantized(tmp_path / "ckpt", model, tok, QUAROT, W4A4, fingerprint)
    (tmp_path / "ckpt" / shard_name(1, 2)).unlink()
    with pytest.raises(PipelineError, match=f"{shard_name(1, 2)} is missing"):
        load_quantized(tmp_path / "ckpt")


def test_nan_scale_refused_even_with_a_matching_hash(tmp_path):
    """A NaN weight scale written consistently (shard and index both rewritten) is still refused."""
    model, tok, fingerprint = prepared_model("tiny_llama", QUAROT, W4A4)
    save_quantized(tmp_path / "ckpt", model, tok, QUAROT, W4A4, fingerprint)
    def poison(tensors):
        tensors["model.layers.0.mlp.down_proj.weight_scale"][3] = float("nan")

    _rewrite_shard(tmp_path / "ckpt", shard_name(1, 2), poison)
    with pytest.raises(PipelineError, match="down_proj.weight_scale holds non-finite values"):
        load_quantized(tmp_path / "ckpt")


def test_identical_saves_write_identical_bytes(tmp_path):
    model, tok, fingerprint = prepared_model("tiny_llama", RESPIN, W4A4, rank=4)
    save_quantized(tmp_path / "a", model, tok, RESPIN, W4A4, fingerprint)
    save_quantized(tmp_path / "b", model, tok, RESPIN, W4A4, fingerprint)
    for path in sorted((tmp_path / "a").iterdir()):
        assert path.read_bytes() == (tmp_path / "b" / path.name).read_bytes(), path.name
