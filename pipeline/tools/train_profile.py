"""Step time and peak memory of rotation training on a model *shape* with random weights.

Speed does not depend on weight values, so a random-init model of a real shape (e.g. Llama-3-8B,
bf16, seqlen 2048) measures what the real one would cost without its weights:

    python -m pipeline.tools.train_profile --shape llama3_8b --seqlen 2048 --steps 3 --mode global layerwise

Reports, per mode, the median step time (one window per step, after a warm-up step), the Cayley
optimizer's share of it, peak GPU memory (or peak RSS on CPU), and the projected time of the paper
protocol (``--paper-windows`` windows per run, 800 by default = 100 steps x 8 windows).
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch

from ..rotation.cayley import CayleySGD
from ..infra.devices import dtype_name
from ..methods import MethodSpec, make_rotations, prepare_base
from ..model.load import build_random_model
from ..quant.quantizers import QuantSpec
from ..train.loop import window_loss
from ..train.trainable import TrainableRotations, enable_checkpointing, parametrize_rotations

SHAPES = {
    "llama3_8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                      max_position_embeddings=8192, tie_word_embeddings=False),
    "smollm2_135m": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                         max_position_embeddings=8192, tie_word_embeddings=True),
    "tiny_llama": dict(model_type="llama", vocab_size=257, hidden_size=192, intermediate_size=320,
                       num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2, head_dim=32,
                       max_position_embeddings=512, tie_word_embeddings=True),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile(shape: str, mode: str, seqlen: int, steps: int, device: torch.device, dtype: torch.dtype,
            grad_checkpointing: bool, paper_windows: int, config: dict | None = None) -> dict:
    """Train ``steps`` + 1 warm-up steps of one window on random tokens; return timings and memory.
    ``config`` (an HF config dict) replaces ``SHAPES[shape]`` (e.g. a shape cut to fewer layers)."""
    config = dict(SHAPES[shape] if config is None else config)
    model, _ = build_random_model({"config": dict(config), "seed": 0}, dtype, device)
    method = MethodSpec(name=mode, r1="random_hadamard", r2="random_hadamard", online_r3=True, online_r4=True,
                        per_layer=mode == "layerwise", train=True)
    adapter = prepare_base(model, method, QuantSpec(w_bits=16, a_bits=4, kv_bits=4))
    if grad_checkpointing:
        enable_checkpointing(model)
    rotations = TrainableRotations(make_rotations(method, model)).to(device)
    parametrize_rotations(model, adapter, rotations)
    opt = CayleySGD(list(rotations.mats), lr=1.5)
    vocab = config["vocab_size"]
    gen = torch.Generator().manual_seed(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step_s, opt_s = [], []
    for _ in range(steps + 1):
        ids = torch.randint(0, vocab, (seqlen,), generator=gen).to(device)
        _sync(device)
        t0 = time.perf_counter()
        window_loss(model, ids).backward()
        _sync(device)
        t1 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        t2 = time.perf_counter()
        step_s.append(t2 - t0)
        opt_s.append(t2 - t1)
    step, optimizer = statistics.median(step_s[1:]), statistics.median(opt_s[1:])
    out = {
        "shape": shape, "mode": mode, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": dtype_name(dtype), "seqlen": seqlen, "timed_steps": steps,
        "n_rotations": len(rotations.names), "step_seconds": step, "optimizer_seconds": optimizer,
        "tokens_per_second": seqlen / step,
        # paper protocol: every window is one forward/backward; the optimizer runs once per step of 8
        "paper_projection_minutes": (paper_windows * (step - optimizer) + paper_windows / 8 * optimizer) / 60,
    }
    if device.type == "cuda":
        out["peak_gpu_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3_8b")
    parser.add_argument("--mode", nargs="+", choices=["global", "layerwise"], default=["global", "layerwise"])
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-grad-checkpointing", action="store_true")
    parser.add_argument("--paper-windows", type=int, default=800)
    args = parser.parse_args(argv)
    for mode in args.mode:
        result = profile(args.shape, mode, args.seqlen, args.steps, torch.device(args.device),
                         getattr(torch, args.dtype), not args.no_grad_checkpointing, args.paper_windows)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
