"""The bench stage on a tiny model: every row carries device, op, shape, M, ms and speedup."""
from __future__ import annotations

import json
from helpers import one_line_error, run_stage


TINY = ("+model=tiny_llama", "bench.m=[1,3]", "bench.layer_m=[8]", "bench.llama3_8b=false",
        "bench.min_runs=1", "bench.max_seconds=0", "bench.transition_rank=8", "bench.generate_batch=[1,2]",
        "bench.generate_prompt=12", "bench.generate_new_tokens=3")


def test_bench_stage_writes_every_row(tmp_path):
    proc = run_stage(tmp_path, "bench.py", *TINY)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "m" / "bench.json").read_text())
    assert result["backend"] == "cpu" and result["device"].startswith("cpu")
    rows = result["rows"]
    ops = {r["op"] for r in rows}
    assert ops == {"linear_fp32", "linear_bf16", "linear_w4a4", "residual_add", "residual_add_transition_r8",
                   "decoder_layer_fp32", "decoder_layer_bf16", "decoder_layer_w4a4", "decoder_layer_w4a4_transition_r8",
                   "decoder_layer_w4a4_transition_dense", "generate_prefill_bf16", "generate_prefill_w4a4",
                   "generate_decode_bf16", "generate_decode_w4a4"}
    shapes = {r["shape"] for r in rows if r["op"] == "linear_w4a4"}
    assert shapes == {"qkv 192x320", "o 192x192", "gate_up 192x640", "down 320x192"}
    assert {r["M"] for r in rows if r["op"] == "linear_w4a4"} == {1, 3}
    keys = lambda op: {(r["model"], r["shape"], r["M"]) for r in rows if r["op"] == op}  # noqa: E731
    assert keys("linear_bf16") == keys("linear_w4a4") == keys("linear_fp32")  # one bf16 row per W4A4 row
    for r in rows:
        assert set(r) == {"device", "op", "model", "shape", "M", "ms", "speedup"} and r["ms"] > 0 and r["speedup"] > 0
        if r["op"] in ("linear_fp32", "residual_add", "decoder_layer_fp32") or r["op"].endswith("_bf16") and "generate" in r["op"]:
            assert r["speedup"] == 1.0
    gen = {(r["op"], r["shape"]): r["M"] for r in rows if r["op"].startswith("generate")}
    assert gen[("generate_prefill_w4a4", "batch=2 prompt=12")] == 24 and gen[("generate_decode_w4a4", "batch=2 context=12+3")] == 2
    assert len(gen) == 8


def test_bench_bad_settings_are_one_line(tmp_path):
    one_line_error(run_stage(tmp_path, "bench.py", *TINY, "bench.m=[0,4]"), "bench.m=[0, 4]: give a non-empty list of positive integers")
    one_line_error(run_stage(tmp_path, "bench.py", *TINY, "bench.transition_rank=999"), "bench.transition_rank=999: must be in 1..192")
    one_line_error(run_stage(tmp_path, "bench.py", *TINY, "bench.generate_batch=[0]"),
                   "bench.generate_batch=[0]: give a non-empty list of positive integers")
    one_line_error(run_stage(tmp_path, "bench.py", *TINY, "bench.generate_new_tokens=1"),
                   "bench.generate_prompt=12 / bench.generate_new_tokens=1: need >= 1 / >= 2")
    one_line_error(run_stage(tmp_path, "bench.py", *TINY, "bench.generate_prompt=600"),
                   "prompt 600 + 3 new tokens exceed the model's 512 positions")
    assert not (tmp_path / "m" / "bench.json").exists()


def test_layer_rows_of_a_random_model_of_given_sizes():
    """The Llama-3-8B layer rows' model (bench.llama3_8b), at small sizes: one random layer of those sizes,
    and the five layer rows, each against the float32 layer."""
    from pipeline.export.bench import Timing, bench_layer, random_layer_model
    from pipeline.model.adapters import Dims

    dims = Dims(hidden=128, intermediate=256, n_heads=4, n_kv_heads=2, head_dim=32, n_layers=1, vocab=256)
    model = random_layer_model(dims)
    layer = model.model.layers[0]
    assert len(model.model.layers) == 1 and layer.mlp.down_proj.weight.shape == (128, 256)
    assert layer.self_attn.k_proj.weight.shape == (64, 128)
    rows = bench_layer(model, [5], Timing(warmup=0, min_runs=1, max_seconds=0, buffers=1), "m", 16, shape="layer 0, random")
    assert [r["op"] for r in rows] == ["decoder_layer_fp32", "decoder_layer_bf16", "decoder_layer_w4a4",
                                       "decoder_layer_w4a4_transition_r16", "decoder_layer_w4a4_transition_dense"]
    assert all(r["shape"] == "layer 0, random" and r["M"] == 5 and r["ms"] > 0 for r in rows) and rows[0]["speedup"] == 1.0
