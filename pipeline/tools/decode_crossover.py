"""Where decode stops: the packed-int4 kernel against the int8 dot-product path, per token count.

``python -m pipeline.tools.decode_crossover [--m 1 8 16 24 32] [--seconds 2]`` times a ``Linear4bit``
on Llama-3-8B's qkv, o and down shapes (random weights on the 4-bit grid, labelled random) twice per
round, once forced onto each CPU GEMM (``cpu_gemm="int4"``: the C++ kernel on the packed weights;
``"int8"``: oneDNN int8 through ``torch._int_mm``), checks both give the same bits, and prints the median
of each and their ratio from this one run. ``linear4bit.DECODE_ROWS`` is set from it.
"""
from __future__ import annotations

import argparse

import torch

from ..export.bench import LLAMA3_8B, Timing, _grid_weight, _inputs, device_name, interleaved_ms, linear_shapes
from ..export.kernels import cpu_int8_ready
from ..export.linear4bit import Linear4bit
from ..infra.errors import PipelineError, cli_errors_as_one_line


def crossover(ms: list[int], seconds: float, shapes: tuple[str, ...] = ("qkv", "o", "down")) -> list[dict]:
    """One row per (shape, M): ``int4_ms``, ``int8_ms`` (medians, interleaved) and ``ratio`` = int8 / int4."""
    if not cpu_int8_ready():
        raise PipelineError("torch._int_mm does not run on this CPU: there is only the int4 kernel to time")
    rows = []
    timing = Timing(warmup=1, min_runs=3, max_seconds=seconds / 2, buffers=1)  # interleaved_ms: seconds in all
    for name in shapes:
        k, n = linear_shapes(LLAMA3_8B)[name]
        linear, scale = _grid_weight(n, k, seed=k + n)
        mods = {}
        for gemm in ("int4", "int8"):
            mods[gemm] = Linear4bit.from_float(linear, scale)
            mods[gemm].cpu_gemm = gemm
        for m in ms:
            xs = _inputs((m, k), 1, seed=m)
            with torch.no_grad():
                if not torch.equal(mods["int4"](xs[0]), mods["int8"](xs[0])):
                    raise PipelineError(f"{name} M={m}: the two paths disagree")
            int4, int8 = interleaved_ms([mods["int4"], mods["int8"]], xs, timing)
            rows.append({"shape": f"{name} {k}x{n}", "M": m, "int4_ms": round(int4, 4), "int8_ms": round(int8, 4),
                         "ratio": round(int8 / int4, 3)})
    return rows


def _main(argv: list[str] | None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, nargs="+", default=[1, 8, 16, 24, 32], help="token counts")
    parser.add_argument("--seconds", type=float, default=2.0, help="timing budget per (shape, M)")
    args = parser.parse_args(argv)
    if any(m < 1 for m in args.m) or args.seconds <= 0:
        raise PipelineError("--m needs positive token counts and --seconds a positive budget")
    print(f"{device_name()}; random weights on the 4-bit grid")
    for row in crossover(args.m, args.seconds):
        print(f"{row['shape']:16s} M={row['M']:3d}  int4 kernel {row['int4_ms']:8.3f} ms  int8 oneDNN "
              f"{row['int8_ms']:8.3f} ms  int8/int4 {row['ratio']:.2f}", flush=True)


def main(argv: list[str] | None = None) -> None:
    cli_errors_as_one_line(_main, argv)


if __name__ == "__main__":
    main()
