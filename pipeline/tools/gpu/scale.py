"""The ``scale_*`` parts of ``gpu_check``: time and peak GPU memory of each stage on a Llama-3-8B-shaped
model with **random weights** (generated on the machine; speed and memory do not depend on the values,
and no quality figure of such a model is reported).

- ``scale_train_global`` / ``scale_train_layerwise``: ``train_profile.profile`` on the whole 32-layer
  model with ``train=paper``'s settings (windows of ``--seqlen`` 2048 tokens, gradient checkpointing,
  W16A4KV4 fake quantization, Cayley SGD); per window and per optimizer step, projected to the paper's
  800 windows in 100 steps of 8.
- ``scale_approximate``: the residual subspace (rank 32) of the transitions of ``--layers`` decoder
  layers of random per-layer bases, on the device, projected to the 64 transitions of 32 layers.
- ``scale_fuse_gptq``: ``fuse.streamed.fuse_streamed`` (ReSpinQuant, W4A4KV4, GPTQ on ``--calib-windows``
  x ``--seqlen`` tokens) of the shape cut to ``--layers`` layers, weights read from host memory layer by
  layer; time per layer, projected to 32 layers.
- ``scale_eval``: layer-sequential perplexity of 1 window through that checkpoint, projected to 32.
- ``scale_projection``: the paper protocol's total (both trainings, approximate, fuse) against the
  paper's 42 min on one H100.

Rows follow ``docs/scale.json`` (``shape, weights, stage, device, dtype, method, quant_weights,
peak_rss_gib, peak_gpu_gib, seconds, command``) plus ``gpu``, ``measured`` (what ``seconds`` timed),
``layers`` (decoder layers run) and ``projected_seconds`` (the whole stage at 32 layers / the paper's
windows).
"""
from __future__ import annotations

import gc
import resource
import shlex
import time
from dataclasses import replace

import torch

from .harness import PAPER_MINUTES_H100, Part
from .stages import MICRO_SHAPE
from ...methods import MethodSpec, per_layer_bases, transition_keys
from ...quant.quantizers import QuantSpec
from ...rotation.subspace import ApproxSpec, approximate_rotations
from ..train_profile import SHAPES, profile
from ...rotation.hadamard import orthogonal_hadamard
from ...model.load import build_random_model, model_fingerprint
from ...fuse.streamed import fuse_streamed
from ...model.streaming import StateDictSource, empty_model
from ...export.checkpoint import open_quantized
from ...eval.perplexity import perplexity_streamed

METHOD = MethodSpec(name="respinquant", r1="random_hadamard", r2="random_hadamard", online_r3=True, online_r4=True,
                    per_layer=True, train=True, seed=0, transition="low_rank")
QUANT = QuantSpec(w_bits=4, a_bits=4, kv_bits=4, a_clip_ratio=0.9, kv_clip_ratio=0.95, weight_method="gptq")
PAPER_WINDOWS = 800
FULL_LAYERS = 32


def shape_of(ctx) -> tuple[str, dict]:
    """``(name, HF config dict)``: Llama-3-8B's sizes, or a micro Llama's with ``--tiny``."""
    if ctx.tiny:
        return "micro_llama", dict(MICRO_SHAPE)
    return "llama3_8b", dict(SHAPES["llama3_8b"])


def sizes(ctx) -> dict[str, int]:
    """Window length, windows of GPTQ, layers run and timed training steps (small with ``--tiny``)."""
    a = ctx.args
    if ctx.tiny:
        return {"seqlen": 32, "calib": 2, "layers": 2, "steps": 1}
    return {"seqlen": a.seqlen, "calib": a.calib_windows, "layers": a.layers, "steps": a.train_steps}


def dtype_of(ctx) -> torch.dtype:
    return torch.bfloat16 if ctx.device.type == "cuda" else torch.float32


def row(ctx, stage: str, seconds: float, measured: str, layers: int, projected: float | None, **extra) -> dict:
    name, _ = shape_of(ctx)
    return {"shape": name, "weights": "random", "stage": stage, "device": ctx.device.type, "gpu": ctx.gpu,
            "dtype": str(dtype_of(ctx)).removeprefix("torch."), "method": METHOD.name, "quant_weights": "gptq",
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            "peak_gpu_gib": ctx.peak_gpu_gib(), "seconds": round(seconds, 3), "measured": measured,
            "layers": layers, "projected_seconds": None if projected is None else round(projected, 1),
            "command": shlex.join(["python", "-m", "pipeline.tools.gpu.check", *ctx.report.data["meta"]["argv"]]), **extra}


def _release(ctx) -> None:
    gc.collect()
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()


def train(ctx, mode: str) -> None:
    name, config = shape_of(ctx)
    s = sizes(ctx)
    _release(ctx)
    ctx.reset_peak()
    out = profile(name, mode, s["seqlen"], s["steps"], ctx.device, dtype_of(ctx), True, PAPER_WINDOWS, config)
    _release(ctx)
    projected = out["paper_projection_minutes"] * 60
    ctx.cache[f"projected_{mode}"] = projected
    ctx.report.scale(row(ctx, f"rotate_{mode}", out["step_seconds"],
                         f"median of {s['steps']} steps of 1 window x {s['seqlen']} tokens (after 1 warm-up step), "
                         "forward + backward + Cayley step", config["num_hidden_layers"], projected,
                         optimizer_seconds=round(out["optimizer_seconds"], 3), n_rotations=out["n_rotations"],
                         tokens_per_second=round(out["tokens_per_second"], 1),
                         projection=f"{PAPER_WINDOWS} windows, {PAPER_WINDOWS // 8} optimizer steps (train=paper)"))


def train_global(ctx) -> None:
    train(ctx, "global")


def train_layerwise(ctx) -> None:
    train(ctx, "layerwise")


def random_layerwise_set(hidden: int, head_dim: int, n_layers: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Per-layer bases ``A.0..A.L``, ``B.0..B.<L-1>`` (D, D): a random Hadamard R1 times a random
    rotation near the identity each (so every transition is a real one), and ``R2.<i>``; float32 on the
    CPU, as a trained set is stored."""
    gen = torch.Generator(device=device).manual_seed(0)
    R1 = orthogonal_hadamard(hidden, seed=0).to(device)
    bases = {}
    for key in per_layer_bases(torch.empty(0), n_layers):
        noise = torch.eye(hidden, dtype=torch.float64, device=device)
        noise += 0.05 * torch.randn(hidden, hidden, generator=gen, dtype=torch.float64, device=device)
        bases[key] = (R1 @ torch.linalg.qr(noise)[0]).to("cpu", torch.float32)
    for i in range(n_layers):
        bases[f"R2.{i}"] = orthogonal_hadamard(head_dim, seed=1 + i).float()
    return bases


def approximate(ctx) -> None:
    _, config = shape_of(ctx)
    n = sizes(ctx)["layers"]
    _release(ctx)
    ctx.reset_peak()
    rotations = random_layerwise_set(config["hidden_size"], config["head_dim"], n, ctx.device)
    ctx.sync()
    start = time.perf_counter()
    with ctx.device:
        subspace, rows = approximate_rotations(rotations, n, ApproxSpec(rank=32), progress=False, device=ctx.device)
    ctx.sync()
    seconds = time.perf_counter() - start
    ctx.cache["layerwise_set"] = rotations
    ctx.cache["subspace"] = {k: v.to("cpu", torch.float32) for k, v in subspace.items()}
    per = seconds / len(rows)
    projected = per * len(transition_keys(FULL_LAYERS))
    ctx.cache["projected_approximate"] = projected
    ctx.report.scale(row(ctx, "approximate", seconds, f"{len(rows)} transitions of {n} layers (rank 32, float64 on "
                         f"the device)", n, projected, seconds_per_transition=round(per, 3)))


def fuse(ctx) -> None:
    _, config = shape_of(ctx)
    s = sizes(ctx)
    n = s["layers"]
    config["num_hidden_layers"] = n
    dtype = dtype_of(ctx)
    _release(ctx)
    model, tok = build_random_model({"config": config, "seed": 0}, dtype, ctx.device)
    source = StateDictSource({k: v.to("cpu") for k, v in model.state_dict().items()})  # host memory, as streamed
    hf_config = model.config
    del model
    rotations = ctx.cache.get("layerwise_set")
    if rotations is None or f"A.{n}" not in rotations:
        rotations = random_layerwise_set(config["hidden_size"], config["head_dim"], n, ctx.device)
    subspace = ctx.cache.get("subspace")
    if subspace is None:
        with ctx.device:
            subspace = approximate_rotations(rotations, n, ApproxSpec(rank=32), progress=False, device=ctx.device)[0]
        subspace = {k: v.to("cpu", torch.float32) for k, v in subspace.items()}
    calib = torch.randint(0, config["vocab_size"], (s["calib"], s["seqlen"]), generator=torch.Generator().manual_seed(0))
    skeleton = empty_model(hf_config, dtype)
    stamps: list[float] = []

    def on_layer(_model, _i) -> None:
        ctx.sync()
        stamps.append(time.perf_counter())

    _release(ctx)
    ctx.reset_peak()
    folder = ctx.work / "fused-8b"
    start = time.perf_counter()
    quant = replace(QUANT, w_mse_clip=False) if ctx.tiny else QUANT
    fuse_streamed(folder, skeleton, tok, source, METHOD, rotations, quant, model_fingerprint(skeleton), subspace,
                  calib, None, ctx.device, {"model_name": "random", "variant": "gpu_check"}, on_layer=on_layer)
    ctx.sync()
    seconds = time.perf_counter() - start
    per_layer = [b - a for a, b in zip(stamps, stamps[1:])] or [stamps[0] - start]
    last = per_layer[-1]
    projected = seconds + (FULL_LAYERS - n) * last
    ctx.cache["projected_fuse"] = projected
    ctx.cache["fused_folder"] = folder
    ctx.report.scale(row(ctx, "fuse", seconds, f"streamed fuse of {n} layers, GPTQ on {s['calib']} x {s['seqlen']} "
                         "tokens, embedding and lm_head included", n, projected,
                         seconds_per_layer=[round(t, 2) for t in per_layer],
                         projection=f"measured + {FULL_LAYERS - n} x the last layer's time"))


def evaluate(ctx) -> None:
    folder = ctx.cache.get("fused_folder")
    if folder is None:
        raise RuntimeError("no checkpoint: the scale_fuse_gptq part did not finish")
    s = sizes(ctx)
    _, config = shape_of(ctx)
    _release(ctx)
    ctx.reset_peak()
    start = time.perf_counter()
    model, reader = open_quantized(folder, ctx.device)
    window = torch.randint(0, config["vocab_size"], (1, s["seqlen"]), generator=torch.Generator().manual_seed(1))
    perplexity_streamed(model, reader, window, desc="eval (random weights)")  # the value means nothing
    ctx.sync()
    seconds = time.perf_counter() - start
    n = reader.n_layers
    per = seconds / n
    ctx.report.scale(row(ctx, "eval", seconds, f"layer-sequential perplexity of 1 window x {s['seqlen']} tokens, "
                         f"{n} layers read from the checkpoint", n, per * FULL_LAYERS,
                         projection=f"{FULL_LAYERS} x (time / layers run)"))


def projection(ctx) -> None:
    parts = {"rotate_global": "projected_global", "rotate_layerwise": "projected_layerwise",
             "approximate": "projected_approximate", "fuse": "projected_fuse"}
    have = {k: ctx.cache[v] for k, v in parts.items() if v in ctx.cache}
    missing = sorted(set(parts) - set(have))
    total = sum(have.values())
    paper = PAPER_MINUTES_H100 * 60
    ctx.report.scale(row(ctx, "paper_protocol_total", total, "sum of the projected stages", FULL_LAYERS, total,
                         included=sorted(have), missing=missing, paper_seconds_h100=paper,
                         ratio_to_paper=round(total / paper, 3) if not missing else None,
                         note="calibration statistics and evaluation not included; random weights"))


PARTS = [
    Part("scale_train_global", train_global, 45, 5),
    Part("scale_approximate", approximate, 25, 2),
    Part("scale_fuse_gptq", fuse, 60, 5),
    Part("scale_eval", evaluate, 15, 2),
    Part("scale_train_layerwise", train_layerwise, 45, 5),
    Part("scale_projection", projection, 0, 0),
]
