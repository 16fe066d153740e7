"""End-to-end ``generate()`` speed: a kernel-backed W4A4 checkpoint (``load_quantized(backend="kernel")``)
against the 16-bit HF model it was made from, prefill and decode, at each batch size.

One ``generate()`` call gives both numbers: a logits processor, called once per new token right
after the forward that produced its logits, stamps the clock, so the first stamp closes the prefill
(the ``prompt``-token forward that fills the KV cache) and the rest time the decode steps (one token
per sequence each). Greedy, ``min_new_tokens = max_new_tokens``: every run decodes the same number
of steps whatever the text. The models are timed round-robin, a slow phase of a noisy machine falling
on both alike.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from typing import Any

import torch
from torch import nn

from ..infra.errors import PipelineError
from .bench import Timing, device_name
from .checkpoint import load_quantized, save_quantized


class _Clock:
    """A ``LogitsProcessor`` that records ``time.perf_counter()`` at each call (one per generated token)."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.stamps.append(time.perf_counter())
        return scores


def timed_generate(model: nn.Module, ids: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """``(prefill_s, decode_s_per_step)`` of one greedy ``generate`` of ``new_tokens`` (>= 2) tokens after
    the prompt ``ids (B, T)``."""
    from transformers import LogitsProcessorList

    clock = _Clock()
    pad = model.generation_config.pad_token_id
    if pad is None:
        pad = model.generation_config.eos_token_id
    pad = pad[0] if isinstance(pad, list) else pad
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, logits_processor=LogitsProcessorList([clock]),
                             pad_token_id=pad)
    if out.shape[1] != ids.shape[1] + new_tokens or len(clock.stamps) != new_tokens:
        raise RuntimeError(f"generate made {out.shape[1] - ids.shape[1]} tokens in {len(clock.stamps)} steps, "
                           f"not {new_tokens}")
    return clock.stamps[0] - t0, (clock.stamps[-1] - clock.stamps[0]) / (new_tokens - 1)


def kernel_checkpoint(model: nn.Module, tokenizer: Any, fingerprint: str, folder: str) -> nn.Module:
    """QuaRot (random Hadamard R1/R2, online R3/R4) with RTN W4A4KV4 weights on ``model`` (changed in
    place), saved to ``folder`` and loaded back on the integer kernels: the checkpoint a user runs.
    Speed does not depend on which rotation was fused, so the untrained one stands for every method."""
    from ..methods import MethodSpec, make_rotations, prepare_model
    from ..quant.quantizers import QuantSpec

    method = MethodSpec(name="quarot", r1="random_hadamard", r2="random_hadamard", online_r3=True, online_r4=True)
    quant = QuantSpec(w_bits=4, a_bits=4, kv_bits=4)
    prepare_model(model, method, make_rotations(method, model), quant)
    save_quantized(folder, model, tokenizer, method, quant, fingerprint)
    return load_quantized(folder, backend="kernel")


def bench_generate(model_name: str, load_fn, prompt: int, new_tokens: int, batches: list[int],
                   timing: Timing) -> list[dict]:
    """Rows ``generate_prefill_{bf16,w4a4}`` (``M`` = batch x prompt tokens, ``ms`` the prefill: tokens/s
    = M / ms x 1000) and ``generate_decode_{bf16,w4a4}`` (``M`` = batch, ``ms`` per decode step, each
    giving M tokens) for each batch size; ``speedup`` = the bf16 model's time / the row's (the bench
    rows' schema; their baseline here is the bf16 HF model, not float32).

    ``load_fn()`` gives a fresh ``(model, tokenizer, fingerprint)`` of the HF model (called twice: the
    W4A4 checkpoint is made from one copy, the bf16 baseline is the other in bfloat16)."""
    from ..model.load import max_positions

    half, _, _ = load_fn()
    half = half.to(torch.bfloat16).eval()
    if prompt + new_tokens > max_positions(half):
        raise PipelineError(f"prompt {prompt} + {new_tokens} new tokens exceed the model's "
                            f"{max_positions(half)} positions")
    base, tok, fingerprint = load_fn()
    with tempfile.TemporaryDirectory(prefix="rsq_bench_") as folder:
        quant = kernel_checkpoint(base, tok, fingerprint, folder)
    del base
    vocab = half.config.vocab_size
    rows: list[dict] = []
    for batch in batches:
        gen = torch.Generator().manual_seed(batch)
        ids = torch.randint(100, vocab, (batch, prompt), generator=gen)
        for _ in range(timing.warmup):
            for model in (half, quant):
                timed_generate(model, ids[:, : min(prompt, 16)], 2)
        runs: dict[str, list[tuple[float, float]]] = {"bf16": [], "w4a4": []}
        for _ in range(timing.min_runs):
            for label, model in (("bf16", half), ("w4a4", quant)):
                runs[label].append(timed_generate(model, ids, new_tokens))
        pre = {k: statistics.median(p for p, _ in v) * 1e3 for k, v in runs.items()}
        dec = {k: statistics.median(d for _, d in v) * 1e3 for k, v in runs.items()}
        for label in ("bf16", "w4a4"):
            rows.append(_row(f"generate_prefill_{label}", model_name, f"batch={batch} prompt={prompt}",
                             batch * prompt, pre[label], pre["bf16"]))
            rows.append(_row(f"generate_decode_{label}", model_name,
                             f"batch={batch} context={prompt}+{new_tokens}", batch, dec[label], dec["bf16"]))
    return rows


def _row(op: str, model: str, shape: str, m: int, ms: float, baseline_ms: float) -> dict:
    return {"device": device_name(), "op": op, "model": model, "shape": shape, "M": m, "ms": round(ms, 4),
            "speedup": round(baseline_ms / ms, 4)}
