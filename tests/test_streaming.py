"""Layer streaming: the streamed fuse writes the whole-model fuse's very bytes, holds at most two decoder
layers at once, and the layer-sequential perplexity equals the whole-model one; bad streamed inputs
are one line."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from conftest import ROOT, SHARED_DATA, model_cfg
from pipeline import load_quantized
from pipeline.eval.act_stats import activation_stats
from pipeline.model.adapters import adapter_for
from pipeline.export.checkpoint import INDEX, open_quantized, save_quantized, shard_name
from pipeline.infra.errors import PipelineError
from pipeline.methods import MethodSpec, make_rotations, prepare_model
from pipeline.model.load import WEIGHTS_ATTR, load_model, model_fingerprint, tag_weights
from pipeline.eval.perplexity import perplexity, perplexity_streamed
from pipeline.quant.quantizers import QuantSpec
from pipeline.fuse.streamed import fuse_streamed
from pipeline.model.streaming import SafetensorsSource, StateDictSource, empty_model, is_materialized, open_model
from helpers import LAYERWISE, QUAROT, RESPIN, low_rank_subspace, one_line_error, random_per_layer_set, run_stage

CALIB = torch.randint(0, 256, (3, 32), generator=torch.Generator().manual_seed(1))


def _rotations(name: str, method: MethodSpec, model):
    if method.per_layer:
        return random_per_layer_set(load_model(model_cfg(name))[0].double(), seed=3)
    return make_rotations(method, model)


def _whole_and_streamed(tmp_path, name, method, rank, quant, source_of=None):
    """The in-memory fuse saved, and the streamed fuse of the same weights, as two checkpoint folders."""
    model, tok = load_model(model_cfg(name))
    fingerprint = model_fingerprint(model)
    rotations = _rotations(name, method, model)
    sub = low_rank_subspace(model, rotations, rank) if rank is not None else None
    original = load_model(model_cfg(name))[0]
    prepare_model(model, method, rotations, quant, sub, CALIB)
    rows = activation_stats(model, CALIB[:2])
    save_quantized(tmp_path / "whole", model, tok, method, quant, fingerprint)
    config = copy.deepcopy(original.config)  # save_pretrained (source_of) adds keys to the config it saves
    source = source_of(original, tmp_path) if source_of else StateDictSource(original.state_dict())
    # what open_model does: a skeleton tagged with the source's weights_id (the same weights here)
    skeleton = tag_weights(empty_model(config, torch.float32), getattr(model, WEIGHTS_ATTR))
    assert model_fingerprint(skeleton) == fingerprint
    streamed_rows = fuse_streamed(tmp_path / "streamed", skeleton, tok, source, method, rotations, quant,
                                  fingerprint, sub, CALIB, CALIB[:2])
    return rows, streamed_rows


def _same_files(a, b) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.mark.parametrize("name,method,rank,weights", [
    ("tiny_llama", QUAROT, None, "rtn"), ("tiny_llama", RESPIN, 8, "gptq"), ("tiny_llama", LAYERWISE, None, "gptq"),
    ("tiny_qwen2", QUAROT, None, "gptq"), ("tiny_qwen2", RESPIN, "adaptive", "rtn"), ("tiny_qwen2", MethodSpec(name="rtn"), None, "rtn"),
    ("tiny_qwen3_moe", QUAROT, None, "gptq"), ("tiny_mixtral", RESPIN, 8, "gptq"),  # MoE: per-expert linears streamed
])
def test_streamed_fuse_writes_the_whole_model_bytes(tmp_path, name, method, rank, weights):
    quant = QuantSpec(w_bits=4, a_bits=4, kv_bits=4, weight_method=weights)
    rows, streamed_rows = _whole_and_streamed(tmp_path, name, method, rank, quant)
    _same_files(tmp_path / "whole", tmp_path / "streamed")
    assert rows == streamed_rows  # activation statistics taken layer by layer are the same numbers


def _saved_folder(model, tmp_path):
    model.save_pretrained(tmp_path / "hf", max_shard_size="200KB")  # sharded, with an index
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    return SafetensorsSource(tmp_path / "hf")


def test_streamed_fuse_from_sharded_safetensors(tmp_path):
    """A tied-embedding model saved as sharded safetensors (lm_head absent: it reads the embedding)."""
    quant = QuantSpec(w_bits=4, a_bits=4, kv_bits=4, weight_method="gptq")
    _whole_and_streamed(tmp_path, "tiny_llama", QUAROT, None, quant, source_of=_saved_folder)
    _same_files(tmp_path / "whole", tmp_path / "streamed")


def test_at_most_two_layers_materialised(tmp_path):
    """A layer-count probe: whenever a layer is loaded, no more than two decoder layers hold weights, and
    neither the embedding nor lm_head does."""
    cfg = model_cfg("tiny_llama")
    cfg.config.num_hidden_layers = cfg.num_hidden_layers = 5
    original, tok = load_model(cfg)
    fingerprint = model_fingerprint(original)
    skeleton = empty_model(original.config, torch.float32)
    layers = adapter_for(skeleton).layers(skeleton)
    counts = []

    adapter = adapter_for(skeleton)
    heads = []

    def probe(model, i):
        assert is_materialized(layers[i])
        counts.append(sum(is_materialized(layer) for layer in layers))
        heads.append((is_materialized(adapter.embedding(model)), is_materialized(adapter.lm_head(model))))

    quant = QuantSpec(w_bits=4, a_bits=4, kv_bits=4, weight_method="gptq")
    fuse_streamed(tmp_path / "ckpt", skeleton, tok, StateDictSource(original.state_dict()), RESPIN,
                  random_per_layer_set(original.double(), seed=1), quant, fingerprint,
                  low_rank_subspace(original, random_per_layer_set(original, seed=1), 4), CALIB, CALIB[:1], on_layer=probe)
    assert len(counts) == 5 and max(counts) <= 2
    assert not any(is_materialized(layer) for layer in layers)  # every layer freed at the end
    assert heads == [(False, False)] * 5  # the embedding is parked and lm_head not read during the layers
    assert not list(tmp_path.glob(".parked-*"))  # the parked embedding's folder is gone


@pytest.mark.parametrize("name,method,rank", [("tiny_llama", RESPIN, 4), ("tiny_qwen2", LAYERWISE, None)])
def test_layer_sequential_perplexity_equals_whole_model(tmp_path, name, method, rank):
    quant = QuantSpec(w_bits=4, a_bits=4, kv_bits=4)
    _whole_and_streamed(tmp_path, name, method, rank, quant)
    windows = torch.randint(0, 256, (3, 48), generator=torch.Generator().manual_seed(2))
    whole = perplexity(load_quantized(tmp_path / "streamed"), windows)
    model, reader = open_quantized(tmp_path / "streamed")
    layers = adapter_for(model).layers(model)
    assert not any(is_materialized(layer) for layer in layers)
    assert perplexity_streamed(model, reader, windows) == whole
    assert not any(is_materialized(layer) for layer in layers)


def test_open_model_streams_a_local_folder(tmp_path):
    original, _ = load_model(model_cfg("tiny_llama"))
    original.save_pretrained(tmp_path / "hf")
    from pipeline.model.load import byte_tokenizer

    byte_tokenizer().save_pretrained(tmp_path / "hf")
    cfg = model_cfg("tiny_llama")
    cfg.path = str(tmp_path / "hf")
    skeleton, tok, source = open_model(cfg, torch.float32)
    assert isinstance(source, SafetensorsSource) and not is_materialized(skeleton)
    # the streamed and the whole-model load of one folder agree (the weights_id names the files read)
    assert model_fingerprint(skeleton) == model_fingerprint(load_model(cfg)[0])


def test_missing_source_shard_is_one_line(tmp_path):
    original, _ = load_model(model_cfg("tiny_llama"))
    source = _saved_folder(original, tmp_path)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[-1]
    (tmp_path / "hf" / victim).unlink()
    with pytest.raises(PipelineError, match=f"{victim} is missing: the index"):
        SafetensorsSource(tmp_path / "hf")
    del source


def test_folder_without_safetensors_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(PipelineError, match="streaming reads safetensors only"):
        SafetensorsSource(tmp_path)


def test_streamed_checkpoint_missing_shard_refused_before_any_layer(tmp_path):
    quant = QuantSpec(w_bits=4, a_bits=4, kv_bits=4)
    _whole_and_streamed(tmp_path, "tiny_llama", QUAROT, None, quant)
    (tmp_path / "streamed" / shard_name(2, 2)).unlink()
    model, reader = open_quantized(tmp_path / "streamed")
    reader.load_layer(0)
    with pytest.raises(PipelineError, match=f"{shard_name(2, 2)} is missing"):
        reader.load_layer(1)
    index = json.loads((tmp_path / "streamed" / INDEX).read_text())
    assert shard_name(2, 2) in index["metadata"]["shard_sha256"]


def test_stage_level_bad_inputs_are_one_line(tmp_path):
    one_line_error(run_stage(tmp_path, "fuse.py", "+model=tiny_llama", "device=cuda"), "device=cuda: this host has no")
    one_line_error(run_stage(tmp_path, "eval.py", "+model=tiny_llama", "eval.stream=maybe"),
                    "eval.stream='maybe': choose true, false or auto")
    one_line_error(run_stage(tmp_path, "eval.py", "+model=tiny_llama", "eval.stream=true"),
                    "zero-shot needs the whole model in memory")
    assert not (tmp_path / "a").exists() and not (tmp_path / "m").exists()


def test_layer_sequential_activation_stats_equal_whole_model():
    from pipeline.eval.act_stats import activation_stats_streamed
    from pipeline.model.streaming import SourceLayers

    windows = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(4))
    for name in ("tiny_llama", "tiny_qwen2"):
        original, _ = load_model(model_cfg(name))
        skeleton = empty_model(copy.deepcopy(original.config), torch.float32)
        layers = SourceLayers(skeleton, StateDictSource(original.state_dict()), torch.device("cpu"))
        layers.load_head()
        assert activation_stats_streamed(skeleton, layers, windows) == activation_stats(original, windows)
        assert not any(is_materialized(layer) for layer in adapter_for(skeleton).layers(skeleton))


def test_lazy_rotation_set_approximates_like_the_loaded_one(tmp_path):
    from pipeline.infra.artifacts import open_tensors, save_tensors
    from pipeline.rotation.subspace import ApproxSpec, approximate_rotations

    model, _ = load_model(model_cfg("tiny_llama"))
    rotations = {k: v.to(torch.float32) for k, v in random_per_layer_set(model.double(), seed=2).items()}
    save_tensors(tmp_path / "set.safetensors", rotations, {"fingerprint": "x"})
    lazy, _ = open_tensors(tmp_path / "set.safetensors", "x")
    eager, rows = approximate_rotations(rotations, 2, ApproxSpec(rank=8), progress=False)
    streamed, lazy_rows = approximate_rotations(lazy, 2, ApproxSpec(rank=8), progress=False)
    assert rows == lazy_rows and all(torch.equal(eager[k], streamed[k]) for k in eager)


def test_scale_bench_runs_every_stage_on_a_random_shape(tmp_path):
    """The benchmark command on the tiny shape: a random checkpoint, every stage as its own process,
    one row each with the stage's own peak RSS (the Llama-3-8B run is a benchmark, not a test)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "RSQ_CACHE_DIR": str(tmp_path / "cache"), "RSQ_DATA_DIR": str(SHARED_DATA)}
    out = tmp_path / "scale.json"
    bench = [sys.executable, "-m", "pipeline.tools.scale_bench", "--shape", "tiny_llama", "--dtype", "float32",
             "--calib-seqlen", "64", "--eval-seqlen", "128", "--train-steps", "1", "--out", str(out)]
    proc = subprocess.run([*bench, "--method", "respinquant", "--train-stream", "true", "--weights", "rtn"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert [r["stage"] for r in rows] == ["calibrate", "rotate_global", "rotate_layerwise", "approximate", "fuse", "eval"]
    from pipeline.tools.scale_bench import applies  # QuaRot: neither per-layer stage applies

    assert not applies("rotate_layerwise", "quarot") and not applies("approximate", "quarot")
    assert applies("approximate", "respinquant") and not applies("approximate", "layerwise")
    assert all(r["weights"] == "random" and r["peak_rss_gib"] > 0 and r["seconds"] > 0 for r in rows)
    assert (tmp_path / "cache" / "random" / "tiny_llama-seed0" / "model.safetensors.index.json").is_file()


def test_large_tensors_fuse_in_row_chunks_with_the_whole_products_values(monkeypatch):
    """A (3000, 64) embedding over the chunk size goes through in 1024-row chunks (three float64
    products, none of the whole tensor) and ends equal to ``W @ R``; a writer (rows mixed) is whole."""
    import pipeline.methods as methods
    from pipeline.surgery.weights import reader, writer

    g = torch.Generator().manual_seed(0)
    emb, out = torch.nn.Embedding(3000, 64).double(), torch.nn.Linear(3000, 64, bias=False).double()
    W, V = emb.weight.detach().clone(), out.weight.detach().clone()
    R = torch.linalg.qr(torch.randn(64, 64, generator=g, dtype=torch.float64))[0]
    shapes = []
    real = methods.transform_tensor
    monkeypatch.setattr(methods, "transform_tensor", lambda t, *a: shapes.append(tuple(t.shape)) or real(t, *a))
    methods.fuse_steps([(emb, "weight", [(reader, "A.0")]), (out, "weight", [(writer, "A.0")])], {"A.0": R},
                       chunk_elements=64 * 1024)
    assert shapes == [(1024, 64), (1024, 64), (952, 64), (64, 3000)]
    torch.testing.assert_close(emb.weight, W @ R, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.weight, R.T @ V, rtol=0, atol=1e-12)
