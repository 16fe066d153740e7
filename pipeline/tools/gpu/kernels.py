"""The ``kernels_*`` parts of ``gpu_check``: the CUDA extension built on the machine, every op checked
against the CPU extension, and the W4A4 linear timed against cuBLAS bf16.

- ``kernels_build``: waits for the background build ``gpu_check`` started first
  (``kernels.cuda_ops()`` with ``TORCH_CUDA_ARCH_LIST`` of this GPU only, e.g. ``9.0a``, and
  ``MAX_JOBS`` = the cores), then loads the cached extension; its log is ``kernel_build.log``.
- ``kernels_correctness``: fresh random inputs (the seed is in each row), each op called twice with
  its outputs' allocator blocks poisoned first (0x00, then 0xFF: an element the kernel never writes
  shows), compared bit for bit with the CPU extension (``cpu_ops``) or the exact integer product;
  the transition (FMA, split sums) within float32 rounding of the float64 reference, bound stated.
- ``kernels_timing``: Llama-3-8B's linears (qkv, o, gate_up, down with its online Hadamard) at M in
  {1, 16, 2048}: ``F.linear`` in bf16 (cuBLAS) against the W4A4 linear (activation quantization +
  int4 GEMM + dequant) and the GEMM alone; CUDA events around CUDA-graph replays of back-to-back calls
  after warm-up, weights cycled through enough copies to miss the L2, median of ``--repeats`` rounds.

On the CPU (``--device cpu``) the same code runs with the CPU extension on both sides, no poisoning,
small shapes and wall-clock timing: it checks the paths, not the arithmetic (``tests/test_kernels_cpu``
does that).
"""
from __future__ import annotations

import math
import os
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .harness import BUILD_LOG, Part
from ...export.kernels import cpu_ops, cuda_ops, hadamard_base, is_hopper, reference_transition
from ...export.linear4bit import Linear4bit

SEED_BYTES = 4


def ops_pair(ctx):
    """``(ops under test, CPU reference ops)``."""
    return (cuda_ops() if ctx.device.type == "cuda" else cpu_ops()), cpu_ops()


def build(ctx) -> None:
    """Wait for the background build (bounded by the budget), then load it."""
    from pathlib import Path

    started = ctx.cache.get("build")
    seconds = None
    if started is not None:
        proc, t0, log = started
        try:
            proc.wait(timeout=max(1.0, ctx.budget.left() - 30))
        except Exception:  # noqa: BLE001 - a build still running at the deadline is a failed build
            proc.kill()
            raise RuntimeError(f"the CUDA build did not finish within the budget (see {BUILD_LOG})") from None
        finally:
            log.close()
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            tail = (Path(ctx.args.out) / BUILD_LOG).read_text(errors="replace")[-1200:]
            raise RuntimeError(f"the CUDA build failed (exit {proc.returncode}): ...{tail}")
    start = time.perf_counter()
    ops, cpu = ops_pair(ctx)
    ctx.cache["ops"] = (ops, cpu)
    ctx.report.check("kernels", "build", True, "the extension builds and loads",
                     build_seconds=None if seconds is None else round(seconds, 1),
                     load_seconds=round(time.perf_counter() - start, 1),
                     arch_list=os.environ.get("TORCH_CUDA_ARCH_LIST"), library=getattr(ops, "__file__", None))


def poisoned(ctx, fn: Callable[[], object], like: list[torch.Tensor]) -> tuple[list[list[torch.Tensor]], float | None]:
    """``fn()`` twice; on CUDA each call follows freed blocks of the outputs' sizes (``like``) filled
    with 0x00 then 0xFF, so the caching allocator hands them to the op. Returns both calls' outputs and
    the share of outputs that landed in a poisoned block (None on the CPU)."""
    runs, hits = [], []
    for byte in (0x00, 0xFF):
        ptrs = set()
        if ctx.device.type == "cuda":
            torch.cuda.synchronize(ctx.device)
            blocks = [torch.empty(t.numel(), dtype=t.dtype, device=ctx.device) for t in like]
            for b in blocks:
                b.view(torch.uint8).fill_(byte)
            ptrs = {b.data_ptr() for b in blocks}
            del blocks
        out = fn()
        outs = list(out) if isinstance(out, (list, tuple)) else [out]
        if ctx.device.type == "cuda":
            torch.cuda.synchronize(ctx.device)
            hits.append(sum(o.data_ptr() in ptrs for o in outs) / len(outs))
        runs.append([o.detach().cpu().clone() for o in outs])
    return runs, (min(hits) if hits else None)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a.cpu(), b.cpu()))


def exact_check(ctx, name: str, fn: Callable[[], object], ref: list[torch.Tensor], seed: int, **info) -> None:
    """Both poisoned calls of ``fn`` equal ``ref`` bit for bit."""
    runs, hit = poisoned(ctx, fn, ref)
    per = [all(same(o, r) for o, r in zip(run, ref)) and len(run) == len(ref) for run in runs]
    unequal = 0
    if not all(per):
        unequal = max(int((o.cpu().float() != r.cpu().float()).sum()) for run in runs for o, r in zip(run, ref)
                      if o.shape == r.shape)
    ctx.report.check("kernels", name, all(per), "bit-exact, both poisoned calls", seed=seed, poison_hit=hit,
                     unequal_elements=unequal, **info)


def correctness(ctx) -> None:
    ops, cpu = ctx.cache.get("ops") or ops_pair(ctx)
    dev, tiny, cuda = ctx.device, ctx.tiny, ctx.device.type == "cuda"

    def gen() -> tuple[torch.Generator, int]:
        seed = int.from_bytes(os.urandom(SEED_BYTES), "little")
        return torch.Generator().manual_seed(seed), seed

    def codes(g, r: int, k: int) -> torch.Tensor:
        return torch.randint(-8, 8, (r, k), generator=g, dtype=torch.int8)

    for r, k in [(7, 64)] + ([] if tiny else [(1000, 4096)]):
        g, seed = gen()
        c = codes(g, r, k)
        packed = cpu.pack_int4(c)
        exact_check(ctx, f"pack_int4_{r}x{k}", lambda: ops.pack_int4(c.to(dev)), [packed], seed)
        exact_check(ctx, f"unpack_int4_{r}x{k}", lambda: ops.unpack_int4(packed.to(dev)), [c], seed)

    dtypes = [torch.float32, torch.bfloat16] + ([torch.float16] if cuda else [])
    for m, k in [(1, 32), (33, 576)] + ([] if tiny else [(2048, 4096), (5, 14336)]):
        for dtype in dtypes:
            for clip in (1.0, 0.9):
                g, seed = gen()
                x = (torch.randn(m, k, generator=g) * (torch.rand(m, 1, generator=g) * 10)).to(dtype)
                if m > 2:
                    x[1], x[2] = x[1].abs(), 0.0  # one-signed row, an all-zero row
                ref = list(cpu.quantize_act(x, clip))
                exact_check(ctx, f"quantize_act_{m}x{k}_{str(dtype)[6:]}_clip{clip}",
                            lambda: ops.quantize_act(x.to(dev), clip), ref, seed)

    for n in [64, 576] + ([] if tiny else [4096, 14336]):
        base = hadamard_base(n)
        for dtype in [torch.float32] + ([torch.float16] if cuda else []):
            rows = 2048 if n == 4096 and not tiny else 9
            g, seed = gen()
            x = torch.randn(rows, n, generator=g).to(dtype)
            ref = cpu.hadamard(x.float(), base).to(dtype)  # float32 arithmetic, rounded to x's dtype
            exact_check(ctx, f"hadamard_{rows}x{n}_{str(dtype)[6:]}", lambda: ops.hadamard(x.to(dev), base.to(dev)),
                        [ref], seed)
        g, seed = gen()
        x = torch.randn(33, n, generator=g)
        ref = list(cpu.quantize_act(cpu.hadamard(x, base), 0.9))
        fused = getattr(ops, "hadamard_quantize_act", None)
        run = (lambda: fused(x.to(dev), base.to(dev), 0.9)) if fused is not None else (
            lambda: ops.quantize_act(ops.hadamard(x, base), 0.9))
        exact_check(ctx, f"hadamard_quantize_act_33x{n}", run, ref, seed)

    shapes = [(1, 33, 32), (16, 64, 96), (17, 129, 96), (130, 131, 288)] + ([] if tiny else [(16, 4096, 4096),
                                                                                              (2048, 4096, 4096)])
    for m, n, k in shapes:
        g, seed = gen()
        a, w = codes(g, m, k), codes(g, n, k)
        if m > 1 and n > 1:
            a[1], w[1] = -8, -8  # the extreme product
        pa, pw = cpu.pack_int4(a), cpu.pack_int4(w)
        small = m * n * k <= 2**22
        acc = cpu.gemm_int4(pa, pw) if small else (a.to(dev).double() @ w.to(dev).double().T).to(torch.int32).cpu()
        a_scale = torch.rand(m, generator=g) + 0.01
        a_zero = torch.randint(-8, 8, (m,), generator=g, dtype=torch.int32)
        w_scale = torch.rand(n, generator=g) + 0.01
        w_sum = w.to(torch.int32).sum(dim=1, dtype=torch.int32)
        if small:
            ref32 = cpu.gemm_w4a4(pa, a_scale, a_zero, pw, w_scale, w_sum)
        else:  # the epilogue's float32 arithmetic, elementwise (IEEE, round to nearest)
            ref32 = ((acc - a_zero[:, None] * w_sum[None, :]).float() * a_scale[:, None]) * w_scale[None, :]
        args = [t.to(dev) for t in (pa, a_scale, a_zero, pw, w_scale, w_sum)]
        for path in (["s8", "s4"] if cuda else ["auto"]):
            if path == "s4" and not small:
                continue  # int4 mma is emulated on sm_90: a layout check on small shapes only
            info = {"path": path, "reference": "cpu_ops" if small else "exact float64 product on the device"}
            if cuda:
                exact_check(ctx, f"gemm_int4_{m}x{n}x{k}_{path}", lambda: ops.gemm_int4(args[0], args[3], path), [acc],
                            seed, **info)
                exact_check(ctx, f"gemm_w4a4_f32_{m}x{n}x{k}_{path}",
                            lambda: ops.gemm_w4a4(*args, out_dtype=torch.float32, path=path), [ref32], seed, **info)
                exact_check(ctx, f"gemm_w4a4_f16_{m}x{n}x{k}_{path}",
                            lambda: ops.gemm_w4a4(*args, out_dtype=torch.float16, path=path), [ref32.half()], seed, **info)
            else:
                exact_check(ctx, f"gemm_int4_{m}x{n}x{k}", lambda: ops.gemm_int4(args[0], args[3]), [acc], seed, **info)
                exact_check(ctx, f"gemm_w4a4_f32_{m}x{n}x{k}", lambda: ops.gemm_w4a4(*args), [ref32], seed, **info)
        if cuda and m <= 16:  # the decode GEMV: split-K picked from the SM count, and one chunk
            for split in (0, 1):
                info = {"path": f"gemv_split{split or 'auto'}",
                        "reference": "cpu_ops" if small else "exact float64 product on the device"}
                exact_check(ctx, f"gemv_w4a4_f32_{m}x{n}x{k}_split{split or 'auto'}",
                            lambda split=split: ops.gemv_w4a4(*args, out_dtype=torch.float32, split_k=split), [ref32],
                            seed, **info)
        if cuda and is_hopper(args[0]) and n % 8 == 0:  # CUTLASS's TMA + wgmma GEMM on the int8 codes
            int8_args = [a.to(dev), args[1], args[2], w.to(dev), args[4], args[5]]
            info = {"path": "cutlass_sm90", "reference": "cpu_ops" if small else "exact float64 product on the device"}
            for out_dtype, ref in ((torch.float32, ref32), (torch.float16, ref32.half()), (torch.bfloat16, ref32.bfloat16())):
                exact_check(ctx, f"gemm_int8_sm90_{str(out_dtype)[6:]}_{m}x{n}x{k}",
                            lambda out_dtype=out_dtype: ops.gemm_int8_sm90(*int8_args, out_dtype=out_dtype), [ref], seed,
                            **info)

    for t, d, r in [(1, 64, 1), (13, 576, 32)] + ([] if tiny else [(7, 4096, 128), (2048, 4096, 32)]):
        g, seed = gen()
        h = torch.randn(t, d, generator=g)
        Q = torch.linalg.qr(torch.randn(d, r, generator=g, dtype=torch.float64))[0].float()
        M = torch.randn(r, r, generator=g) * 0.1
        runs, hit = poisoned(ctx, lambda: ops.transition(h.to(dev), Q.to(dev), M.to(dev)), [h])
        ref = reference_transition(h, Q, M)
        err = max(float((run[0].double() - ref).abs().max()) for run in runs)
        bound = 1e-5 + 1e-5 * float(ref.abs().max())
        ok = err <= bound and same(runs[0][0], runs[1][0])
        ctx.report.check("kernels", f"transition_{t}x{d}_r{r}", ok,
                         "float32: max |out - float64 reference| <= 1e-5 (1 + max |ref|); both calls equal",
                         seed=seed, poison_hit=hit, max_abs=err, bound_value=bound)
        x = torch.randn(t, d, generator=g)  # the residual add fused: h + x + ((h Q) M) Q^T
        runs, hit = poisoned(ctx, lambda: ops.transition(h.to(dev), Q.to(dev), M.to(dev), x=x.to(dev)), [h])
        err = max(float((run[0].double() - (ref + x.double())).abs().max()) for run in runs)
        ok = err <= bound + 1e-5 * float(x.abs().max()) and same(runs[0][0], runs[1][0])
        ctx.report.check("kernels", f"transition_add_{t}x{d}_r{r}", ok,
                         "float32: max |out - (float64 reference + x)| within the bound; both calls equal",
                         seed=seed, poison_hit=hit, max_abs=err, bound_value=bound)

    # Linear4bit (what load_quantized(backend="kernel") runs) on the device against the same layer on the CPU
    for m, k, n, rotate in [(3, 64, 40, False), (17, 576, 96, True)] + ([] if tiny else [(33, 4096, 1024, True)]):
        g, seed = gen()
        scale = torch.rand(n, generator=g) * 0.02 + 0.005
        linear = nn.Linear(k, n, bias=True)
        with torch.no_grad():
            linear.weight.copy_(codes(g, n, k).float() * scale[:, None])
            linear.bias.copy_(torch.randn(n, generator=g))
        layer = Linear4bit.from_float(linear, scale, 0.9, rotate)
        x = torch.randn(m, k, generator=g, dtype=torch.bfloat16)
        ref = layer(x)
        on_dev = Linear4bit.from_float(linear.to(dev), scale.to(dev), 0.9, rotate)
        exact_check(ctx, f"linear4bit_{m}x{k}x{n}{'_hadamard' if rotate else ''}", lambda: on_dev(x.to(dev)), [ref],
                    seed, reference="Linear4bit on the CPU")


LLAMA3_8B_LINEARS = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}
L2_DEFEAT_BYTES = 128 * 2**20  # weights cycled per timed batch: over twice the H200's 50 MB L2


def time_cuda(step: Callable[[int], object], repeats: int, n_inner: int = 20) -> tuple[float, str]:
    """Per-call ms of ``step(i)``, i = 0..n_inner-1 back to back: one CUDA graph of the calls (eager if
    capture fails), 3 warm-up calls, CUDA events around ``reps`` replays, median of ``repeats`` rounds."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(3):
            step(i)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    mode = "cuda graph"
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(n_inner):
                step(i)
        run = graph.replay
    except Exception as exc:  # noqa: BLE001 - timed eagerly instead, and said so in the row
        mode = f"eager ({type(exc).__name__})"

        def run() -> None:
            for i in range(n_inner):
                step(i)
    run()
    torch.cuda.synchronize()
    times = []
    reps = 5
    for _ in range(repeats):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for _ in range(reps):
            run()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) / (reps * n_inner))
    return statistics.median(times), mode


def time_cpu(step: Callable[[int], object], repeats: int) -> tuple[float, str]:
    step(0)
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        step(i)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), "wall clock"


def timing(ctx) -> None:
    ops, _ = ctx.cache.get("ops") or ops_pair(ctx)

    dev, cuda = ctx.device, ctx.device.type == "cuda"
    shapes = {"qkv": (256, 384), "down": (512, 256)} if ctx.tiny else LLAMA3_8B_LINEARS
    ms_list = [1, 16] if ctx.tiny else [1, 16, 2048]
    timer = (lambda f: time_cuda(f, ctx.args.repeats)) if cuda else (lambda f: time_cpu(f, ctx.args.repeats))
    g = torch.Generator().manual_seed(0)
    out_dtype = torch.float16 if cuda else torch.float32
    for name, (k, n) in shapes.items():
        copies16 = max(1, math.ceil(L2_DEFEAT_BYTES / (n * k * 2))) if cuda else 1
        copies4 = max(1, math.ceil(L2_DEFEAT_BYTES / (n * k // 2))) if cuda else 1
        w16 = [(torch.randn(n, k, generator=g) * 0.02).to(dev, torch.bfloat16) for _ in range(copies16)]
        w4 = [torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8).to(dev) for _ in range(copies4)]
        w_scale = (torch.rand(n, generator=g) * 0.01).to(dev)
        w_sum = torch.randint(-100, 100, (n,), generator=g, dtype=torch.int32).to(dev)
        base = hadamard_base(k).to(dev) if name == "down" else None
        for m in ms_list:
            x = torch.randn(m, k, generator=g).to(dev, torch.bfloat16)
            shape = f"{name} {k}x{n}"

            def linear_w4a4(i: int, x=x, base=base):
                if base is None:
                    p, s, z = ops.quantize_act(x, 0.9)
                elif hasattr(ops, "hadamard_quantize_act"):  # R4: the online Hadamard fused with the quantizer
                    p, s, z = ops.hadamard_quantize_act(x, base, 0.9)
                else:
                    p, s, z = ops.quantize_act(ops.hadamard(x, base), 0.9)
                if cuda:
                    return ops.gemm_w4a4(p, s, z, w4[i % copies4], w_scale, w_sum, out_dtype=out_dtype)
                return ops.gemm_w4a4(p, s, z, w4[i % copies4], w_scale, w_sum)

            p, s, z = ops.quantize_act(x, 0.9)

            def gemm_only(i: int, p=p, s=s, z=z):
                if cuda:
                    return ops.gemm_w4a4(p, s, z, w4[i % copies4], w_scale, w_sum, out_dtype=out_dtype)
                return ops.gemm_w4a4(p, s, z, w4[i % copies4], w_scale, w_sum)

            timed = [("linear_w4a4", linear_w4a4), ("gemm_w4a4", gemm_only)]
            if cuda and m <= 16:  # the split-K decode GEMV on the same packed operands
                timed.append(("gemv_w4a4", lambda i, p=p, s=s, z=z: ops.gemv_w4a4(p, s, z, w4[i % copies4], w_scale,
                                                                                  w_sum, out_dtype=out_dtype)))
            if cuda and is_hopper(x):  # the CUTLASS int8 wgmma GEMM on unpacked codes, bf16 out
                w8 = [ops.unpack_int4(w) for w in w4]
                a8 = ops.unpack_int4(p)

                def gemm_sm90(i: int, a8=a8, s=s, z=z, w8=w8):
                    return ops.gemm_int8_sm90(a8, s, z, w8[i % copies4], w_scale, w_sum, out_dtype=torch.bfloat16)

                def linear_sm90(i: int, x=x, base=base, w8=w8):
                    p_, s_, z_ = ops.quantize_act(x, 0.9) if base is None else ops.hadamard_quantize_act(x, base, 0.9)
                    return ops.gemm_int8_sm90(ops.unpack_int4(p_), s_, z_, w8[i % copies4], w_scale, w_sum,
                                              out_dtype=torch.bfloat16)

                timed += [("linear_w4a4_sm90", linear_sm90), ("gemm_int8_sm90", gemm_sm90)]
            base_ms, mode = timer(lambda i, x=x: F.linear(x, w16[i % copies16]))
            rows = [("linear_bf16", base_ms, mode)]
            for op, fn in timed:
                try:
                    t, mode = timer(fn)
                    rows.append((op, t, mode))
                except Exception as exc:  # noqa: BLE001 - one op's failure is its row
                    ctx.report.bench(bench_row(ctx, op, shape, m, None, base_ms, error=f"{type(exc).__name__}: "
                                                                                      f"{str(exc).splitlines()[0][:200]}"))
            for op, t, mode in rows:
                ctx.report.bench(bench_row(ctx, op, shape, m, t, base_ms, timing=mode,
                                           tflops=round(2 * m * n * k / (t * 1e-3) / 1e12, 2)))
        del w16, w4
        if cuda:
            torch.cuda.empty_cache()


def bench_row(ctx, op: str, shape: str, m: int, ms: float | None, baseline_ms: float, **extra) -> dict:
    """A ``metrics/bench.json`` row (``device, op, model, shape, M, ms, speedup``) plus ``gpu``."""
    return {"device": ctx.device.type, "gpu": ctx.gpu, "op": op,
            "model": "tiny_shapes" if ctx.tiny else "llama3_8b", "shape": shape, "M": m,
            "ms": None if ms is None else round(ms, 4),
            "speedup": None if ms is None else round(baseline_ms / ms, 4),
            "baseline": "linear_bf16 (cuBLAS)" if ctx.device.type == "cuda" else "linear_bf16 (torch CPU)", **extra}


PARTS = [
    Part("kernels_build", build, 20, 2),
    Part("kernels_correctness", correctness, 40, 3),
    Part("kernels_timing", timing, 30, 2),
]
