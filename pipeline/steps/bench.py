"""bench: W4A4 kernel speed against the float matmul, the fused transition against a residual add,
a whole decoder layer (``pipeline/export/bench.py``), for the configured model's shapes and
Llama-3-8B's, and ``generate()`` prefill / decode of the kernel-backed checkpoint against the bf16 HF
model (``pipeline/export/bench_generate.py``). It runs the C++ CPU path (the CUDA kernels are timed by hand on a GPU host, see
cuda_ext/cuda/README.md) and says so in every row's ``device`` and in ``backend``."""
from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from ..infra import devices, paths
from ..model.adapters import adapter_for
from ..infra.artifacts import write_json
from ..export.bench import (LLAMA3_8B, Timing, bench_layer, bench_linear, bench_transition, device_name, linear_shapes,
                            random_layer_model)
from ..infra.errors import PipelineError
from ..export.kernels import cpu_int8_ready, cpu_ops
from ..model.load import load_model, max_positions, model_fingerprint
from ..export.bench_generate import bench_generate
from ..infra.tracking import stage_run


def _positive_ints(values, what: str) -> list[int]:
    out = list(values or [])
    if not out or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in out):
        raise PipelineError(f"{what}={out}: give a non-empty list of positive integers")
    return out


def run(cfg: DictConfig) -> None:
    import mlflow

    b = cfg.bench
    ms, layer_ms = _positive_ints(b.m, "bench.m"), _positive_ints(b.layer_m, "bench.layer_m")
    rank = int(b.transition_rank)
    gen_batches = list(b.get("generate_batch") or [])
    if gen_batches:
        _positive_ints(gen_batches, "bench.generate_batch")
    prompt, new_tokens = int(b.get("generate_prompt", 2048)), int(b.get("generate_new_tokens", 16))
    if gen_batches and (prompt < 1 or new_tokens < 2):
        raise PipelineError(f"bench.generate_prompt={prompt} / bench.generate_new_tokens={new_tokens}: "
                            "need >= 1 / >= 2 (decode is timed between the first and the last new token)")
    timing = Timing(warmup=int(b.warmup), min_runs=int(b.min_runs), max_seconds=float(b.max_seconds))
    if timing.min_runs < 1 or timing.warmup < 0:
        raise PipelineError(f"bench.min_runs={timing.min_runs} / bench.warmup={timing.warmup}: need >= 1 / >= 0")
    # the device/dtype are checked like every stage's, but the timed path is the CPU one whatever the
    # device: the model (layer rows) stays on the CPU, and a CUDA device is said so, not timed
    device, _ = devices.setup(cfg.get("device"), cfg.model.get("dtype"))
    if device.type != "cpu":
        print(f"bench: device={device}: timing the CPU path only (CUDA kernels: cuda_ext/cuda/README.md)")
    # the layer rows compare the W4A4 layer against a float32 one (decoder_layer_fp32), whatever model.dtype
    model, _ = load_model(OmegaConf.merge(cfg.model, {"dtype": "float32"}))
    dims = adapter_for(model).dims(model)
    if not 1 <= rank <= dims.hidden:
        raise PipelineError(f"bench.transition_rank={rank}: must be in 1..{dims.hidden}")
    if gen_batches and prompt + new_tokens > max_positions(model):
        raise PipelineError(f"bench.generate_prompt={prompt}: prompt {prompt} + {new_tokens} new tokens exceed the "
                            f"model's {max_positions(model)} positions")
    cpu_ops()  # build before any timing
    shapes = {cfg.model.name: dims, **({"llama3_8b": LLAMA3_8B} if b.llama3_8b else {})}
    rows: list[dict] = []
    with stage_run(cfg, "bench"):
        for name, d in shapes.items():
            for op, (k, n) in linear_shapes(d).items():
                rows += bench_linear(op, k, n, ms, timing, name)
            rows += bench_transition(d.hidden, rank, ms, timing, name)
        rows += bench_layer(model, layer_ms, timing, cfg.model.name, rank)
        if b.get("llama3_8b_layer"):  # opt-in: Llama-3-8B's layer (random weights) at the largest layer M, ~75-150 s
            rows += bench_layer(random_layer_model(LLAMA3_8B), [max(layer_ms)], timing, "llama3_8b", rank,
                                shape="layer 0, random weights")
        if gen_batches:  # generate() of the kernel-backed checkpoint vs the bf16 HF model, this model only
            half_cfg = OmegaConf.merge(cfg.model, {"dtype": "bfloat16"})

            def load_half():
                m, tok = load_model(half_cfg)
                return m, tok, model_fingerprint(m)

            rows += bench_generate(cfg.model.name, load_half, prompt, new_tokens, gen_batches, timing)
        gemm = "int8 dot products (oneDNN, torch._int_mm)" if cpu_int8_ready() else "the C++ int4 kernel"
        note = (f"CPU path (W4A4 GEMM on {gemm}); speedup = float32 matmul (or plain add) ms / op ms; "
                "linear rows timed interleaved; generate_* rows: speedup = the bf16 HF model's ms / the row's")
        if device.type != "cpu":
            note += f"; device={device} was configured, but only the CPU path is timed here"
        result = {"device": device_name(), "backend": "cpu", "configured_device": str(device),
                  "note": note, "rows": rows}
        write_json(paths.bench_metrics(cfg), result)
        for row in rows:
            if row["op"] in ("linear_w4a4", "decoder_layer_w4a4") or "transition" in row["op"] or row["op"].endswith("_w4a4"):
                key = f"{row['model']}.{row['op']}.{row['shape'].split()[0]}.M{row['M']}".replace("=", "")
                mlflow.log_metric(f"speedup.{key}", row["speedup"])
        mlflow.log_artifact(str(paths.bench_metrics(cfg)))
