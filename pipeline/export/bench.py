"""Kernel benchmark on the CPU path: the W4A4 linear (activation quant + int4 GEMM + dequant) against
the float32 matmul of the same shape, the rank-r transition fused with the residual add against a
plain residual add, and a whole decoder layer.

Timing: warm-up runs, then the median of at least ``min_runs`` runs (more while the op's budget of
``max_seconds`` lasts), cycling through ``buffers`` distinct input tensors so no run reuses the
previous run's input in cache. Wall clock (``time.perf_counter``); a GPU run would use device events.
"""
from __future__ import annotations

import copy
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..model.adapters import Dims, adapter_for, get_linear, set_module
from .kernels import cpu_ops
from .linear4bit import Linear4bit
from ..quant.codes import dequantize, rtn

# Llama-3-8B's decoder sizes (the shapes papers report kernel speed on).
LLAMA3_8B = Dims(hidden=4096, intermediate=14336, n_heads=32, n_kv_heads=8, head_dim=128, n_layers=32, vocab=128256)


@dataclass(frozen=True)
class Timing:
    warmup: int = 1
    min_runs: int = 3
    max_seconds: float = 2.0
    buffers: int = 3


def median_ms(fn: Callable[[torch.Tensor], object], inputs: list[torch.Tensor], timing: Timing) -> float:
    """Median wall time of ``fn(x)`` in ms over rotating ``inputs`` (module doc)."""
    with torch.no_grad():
        for i in range(timing.warmup):
            fn(inputs[i % len(inputs)])
        times: list[float] = []
        start = time.perf_counter()
        while len(times) < timing.min_runs or (time.perf_counter() - start < timing.max_seconds and len(times) < 50):
            x = inputs[len(times) % len(inputs)]
            t0 = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def interleaved_ms(fns: list[Callable[[torch.Tensor], object]], inputs: list[torch.Tensor],
                   timing: Timing) -> list[float]:
    """Median wall time in ms of each of ``fns``, timed round-robin (one call of each per round, over
    rotating ``inputs``), so a slow phase of a noisy machine falls on every op alike."""
    with torch.no_grad():
        for i in range(timing.warmup):
            for fn in fns:
                fn(inputs[i % len(inputs)])
        times: list[list[float]] = [[] for _ in fns]
        start = time.perf_counter()
        while len(times[0]) < timing.min_runs or (time.perf_counter() - start < timing.max_seconds * len(fns)
                                                   and len(times[0]) < 50):
            x = inputs[len(times[0]) % len(inputs)]
            for fn, own in zip(fns, times):
                t0 = time.perf_counter()
                fn(x)
                own.append(time.perf_counter() - t0)
    return [statistics.median(t) * 1e3 for t in times]


def linear_shapes(d: Dims) -> dict[str, tuple[int, int]]:
    """``{name: (K, N)}`` of a decoder layer's linears, q/k/v and gate/up fused as inference runs them."""
    return {"qkv": (d.hidden, (d.n_heads + 2 * d.n_kv_heads) * d.head_dim), "o": (d.n_heads * d.head_dim, d.hidden),
            "gate_up": (d.hidden, 2 * d.intermediate), "down": (d.intermediate, d.hidden)}


def device_name() -> str:
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _inputs(shape: tuple[int, ...], n: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen) for _ in range(n)]


def _grid_weight(n: int, k: int, seed: int) -> tuple[nn.Linear, torch.Tensor]:
    """A linear whose weight lies on a random symmetric 4-bit grid, and its scales ``(N,)``."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.rand(n, generator=gen) * 0.01 + 0.001
    linear = nn.Linear(k, n, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randint(-8, 8, (n, k), generator=gen).float() * scale[:, None])
    return linear, scale


def bench_linear(name: str, k: int, n: int, ms: list[int], timing: Timing, model: str) -> list[dict]:
    """fp32 matmul, bf16 matmul and W4A4 linear rows for one ``(K, N)`` at each M, timed interleaved;
    ``speedup`` is against the fp32 row (W4A4 against bf16: the two rows' ``ms``)."""
    linear, scale = _grid_weight(n, k, seed=k + n)
    w4a4 = Linear4bit.from_float(linear, scale)
    half = nn.Linear(k, n, bias=False, dtype=torch.bfloat16)
    with torch.no_grad():
        half.weight.copy_(linear.weight)
    rows = []
    for m in ms:
        xs = _inputs((m, k), timing.buffers, seed=m)
        base, bf16, quant = interleaved_ms([linear, lambda x: half(x.to(torch.bfloat16)), w4a4], xs, timing)
        shape = f"{name} {k}x{n}"
        rows.append(_row("linear_fp32", model, shape, m, base, base))
        rows.append(_row("linear_bf16", model, shape, m, bf16, base))
        rows.append(_row("linear_w4a4", model, shape, m, quant, base))
    return rows


def bench_transition(d: int, rank: int, ms: list[int], timing: Timing, model: str) -> list[dict]:
    """Residual add ``a + b`` against the same add with the rank-r transition of the residual ``b``
    fused into it (``ops.transition(b, Q, M, x=a)``: ``a + b + ((b Q) M) Qᵀ`` in one pass)."""
    ops = cpu_ops()
    gen = torch.Generator().manual_seed(d + rank)
    Q = torch.linalg.qr(torch.randn(d, rank, generator=gen, dtype=torch.float64))[0].float().contiguous()
    M = (torch.randn(rank, rank, generator=gen) * 0.05).contiguous()
    rows = []
    for m in ms:
        pairs = [(a, b) for a, b in zip(_inputs((m, d), timing.buffers, 1), _inputs((m, d), timing.buffers, 2))]
        add = median_ms(lambda p: p[0] + p[1], pairs, timing)
        fused = median_ms(lambda p: ops.transition(p[1], Q, M, x=p[0]), pairs, timing)
        rows.append(_row("residual_add", model, f"D={d}", m, add, add))
        rows.append(_row(f"residual_add_transition_r{rank}", model, f"D={d} r={rank}", m, fused, add))
    return rows


def quantized_layer(layer: nn.Module, adapter) -> nn.Module:
    """A copy of a decoder layer with every linear replaced by a ``Linear4bit`` (per-channel absmax RTN
    weights; down_proj's input Hadamard-rotated online, as R4 does)."""
    layer = copy.deepcopy(layer)
    writers = adapter.mlp_writers(layer)
    for name in adapter.layer_linear_names(layer):
        linear = get_linear(layer, name)
        codes, scale = rtn(linear.weight.detach().float(), 4, mse_clip=False)
        with torch.no_grad():
            linear.weight.copy_(dequantize(codes, scale, linear.weight.dtype))
        set_module(layer, name, Linear4bit.from_float(linear, scale, rotate_input=name in writers))
    return layer


def random_layer_model(d: Dims, seed: int = 0) -> nn.Module:
    """A one-layer Llama model of ``d``'s decoder sizes with random weights (labelled random in the rows'
    model name by the caller), a 256-token vocabulary: the layer rows need its decoder layer and rotary
    embedding, not Llama-3-8B's 128k-row embedding."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=d.hidden, intermediate_size=d.intermediate, num_attention_heads=d.n_heads,
                         num_key_value_heads=d.n_kv_heads, head_dim=d.head_dim, num_hidden_layers=1, vocab_size=256,
                         max_position_embeddings=8192, tie_word_embeddings=True)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def bench_layer(model: nn.Module, ms: list[int], timing: Timing, model_name: str, rank: int,
                shape: str = "layer 0") -> list[dict]:
    """One decoder layer (prefill of M tokens, batch 1), timed interleaved on the same inputs: float32 (the
    rows' baseline), bf16, W4A4 (a global rotation: no transitions), and W4A4 plus the two transitions a
    per-layer method adds, ReSpinQuant's rank-r one fused with the residual add (``ops.transition``) and
    exact layer-wise's dense D x D one (``addmm``). The W4A4 layers run as the kernel-backed checkpoint
    does: their linears on the integer kernels, the rest (norms, RoPE, attention, residuals,
    transitions) in bf16. The transitions run on the layer's output, so the layer's own two residual
    adds are counted as well: an upper bound by two plain adds."""
    adapter = adapter_for(model)
    layer = adapter.layers(model)[0]
    half = copy.deepcopy(layer).to(torch.bfloat16)
    qlayer = quantized_layer(half, adapter)
    d = model.config.hidden_size
    ops = cpu_ops()
    gen = torch.Generator().manual_seed(d + rank)
    q = torch.linalg.qr(torch.randn(d, rank, generator=gen, dtype=torch.float64))[0].float().contiguous()
    m_r = (torch.randn(rank, rank, generator=gen) * 0.05).contiguous()
    dense = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))[0].to(torch.bfloat16).contiguous()
    rows = []
    for m in ms:
        pos = torch.arange(m)[None]
        xs = _inputs((1, m, d), timing.buffers, seed=m)
        rope = model.model.rotary_emb(xs[0], pos)
        rope16 = tuple(r.to(torch.bfloat16) for r in rope)

        def out(mod, x, emb):
            y = mod(x, position_embeddings=emb, position_ids=pos)
            return (y[0] if isinstance(y, tuple) else y).reshape(m, d)

        def low_rank(x):
            h = out(qlayer, x.to(torch.bfloat16), rope16)
            for _ in range(2):
                h = ops.transition(h, q, m_r, x=h)
            return h

        def exact(x):
            h = out(qlayer, x.to(torch.bfloat16), rope16)
            for _ in range(2):
                h = torch.addmm(h, h, dense)
            return h

        times = interleaved_ms([lambda x: out(layer, x, rope), lambda x: out(half, x.to(torch.bfloat16), rope16),
                                lambda x: out(qlayer, x.to(torch.bfloat16), rope16), low_rank, exact], xs, timing)
        base = times[0]
        for op, ms_op in zip(("decoder_layer_fp32", "decoder_layer_bf16", "decoder_layer_w4a4",
                              f"decoder_layer_w4a4_transition_r{rank}", "decoder_layer_w4a4_transition_dense"), times):
            rows.append(_row(op, model_name, shape, m, ms_op, base))
    return rows


def _row(op: str, model: str, shape: str, m: int, ms: float, baseline_ms: float) -> dict:
    return {"device": device_name(), "op": op, "model": model, "shape": shape, "M": m,
            "ms": round(ms, 4), "speedup": round(baseline_ms / ms, 4)}
