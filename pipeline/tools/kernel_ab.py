"""A/B of two versions of the C++ CPU kernels in one process: decode GEMM and the rank-r transition.

``python -m pipeline.tools.kernel_ab --old PATH [--m 1 4 16] [--seconds 3]`` builds ``PATH`` (another
version of cuda_ext/cpu/w4a4_cpu.cpp, e.g. ``git show HEAD~1:cuda_ext/cpu/w4a4_cpu.cpp > /tmp/old.cpp``)
beside the current one with the same flags, and times, round-robin so machine noise hits all alike:
``quantize_act`` + ``gemm_w4a4`` of each version against torch's bf16 matmul on Llama-3-8B's linear
shapes (random weights on the 4-bit grid, labelled random), then ``transition(h, Q, M, x)`` of the new
version (``transition(h + x, Q, M)`` where the old one has no ``x``) against a plain add at D = 576 and
4096, r = 32. Both versions' GEMM outputs must be bit-identical. Prints medians and ratios of this run.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from ..export.bench import LLAMA3_8B, device_name, linear_shapes
from ..export.kernels import CPU_CFLAGS, CPU_LDFLAGS, cpu_ops, staged_sources
from ..infra.errors import PipelineError, cli_errors_as_one_line


def _medians(fns: dict[str, Callable[[], object]], seconds: float) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times[next(iter(fns))]) < 3:
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def _run(args: argparse.Namespace) -> None:
    from torch.utils.cpp_extension import load

    path = Path(args.old)
    if not path.is_file():
        raise PipelineError(f"--old {path}: no such file")
    if any(m < 1 for m in args.m) or args.seconds <= 0:
        raise PipelineError("--m needs positive token counts and --seconds a positive budget")
    new = cpu_ops()
    name, sources = staged_sources("rsq_ab_old", [path], CPU_CFLAGS)
    old = load(name=name, sources=sources, extra_cflags=CPU_CFLAGS, extra_ldflags=CPU_LDFLAGS)
    print(f"{device_name()}; random weights on the 4-bit grid; medians in ms")
    gen = torch.Generator().manual_seed(0)
    for m in args.m:
        for shape, (k, n) in linear_shapes(LLAMA3_8B).items():
            x = torch.randn(m, k, generator=gen)
            codes = torch.randint(-8, 8, (n, k), generator=gen, dtype=torch.int8)
            packed, w_scale = new.pack_int4(codes), torch.rand(n, generator=gen) + 0.01
            w_sum = codes.to(torch.int32).sum(dim=1, dtype=torch.int32)
            w_bf16, x_bf16 = torch.randn(n, k, generator=gen, dtype=torch.bfloat16), x.bfloat16()

            def gemm(ops):
                return lambda: ops.gemm_w4a4(*ops.quantize_act(x, 1.0), packed, w_scale, w_sum)
            if not torch.equal(gemm(new)(), gemm(old)()):
                raise PipelineError(f"{shape} M={m}: the two versions give different outputs")
            t = _medians({"new": gemm(new), "old": gemm(old), "bf16": lambda: x_bf16 @ w_bf16.T}, args.seconds)
            print(f"gemm M={m:4d} {shape:8s} new {t['new']:8.3f}  old {t['old']:8.3f}  bf16 {t['bf16']:8.3f}  "
                  f"old/new {t['old'] / t['new']:.2f}  bf16/new {t['bf16'] / t['new']:.2f}", flush=True)
    for d in (576, LLAMA3_8B.hidden):
        q = torch.linalg.qr(torch.randn(d, 32, generator=gen, dtype=torch.float64))[0].float().contiguous()
        mat = torch.randn(32, 32, generator=gen) * 0.05
        for m in (1, 16, 256, 2048):
            h, x = torch.randn(m, d, generator=gen), torch.randn(m, d, generator=gen)
            t = _medians({"new": lambda: new.transition(h, q, mat, x=x), "old": lambda: old.transition(h + x, q, mat),
                          "add": lambda: h + x}, args.seconds)
            print(f"transition D={d} r=32 M={m:4d} new {t['new']:8.4f}  old {t['old']:8.4f}  add {t['add']:8.4f}  "
                  f"old/new {t['old'] / t['new']:.2f}  new/add {t['new'] / t['add']:.2f}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", required=True, help="the other version of w4a4_cpu.cpp")
    parser.add_argument("--m", type=int, nargs="+", default=[1, 4, 16], help="token counts of the GEMM rows")
    parser.add_argument("--seconds", type=float, default=3.0, help="timing budget per row")
    cli_errors_as_one_line(_run, parser.parse_args(argv))


if __name__ == "__main__":
    main()
