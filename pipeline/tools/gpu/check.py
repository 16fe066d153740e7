"""One-run GPU check: every stage on CUDA against the CPU, Llama-3-8B-shaped timings, the CUDA kernels.

    python -m pipeline.tools.gpu.check --out DIR [--budget 330] [--device cuda]
    python -m pipeline.tools.gpu.check --device cpu --tiny --out DIR     # the same code paths, seconds, on a CPU

Parts, most valuable first, each in its own try/except (a failure is a row with its error; the rest
still runs), each skipped with a ``skipped: budget`` row when its estimate exceeds what is left of
``--budget`` seconds. ``DIR/gpu_check.json`` is rewritten after every part, so a killed run still
leaves what it measured:

1. ``env``: torch, CUDA and driver versions, the GPU, its free memory (``meta.env``).
2. ``stages`` (``stages``): calibrate, global and per-layer training, approximate, fuse (RTN, GPTQ),
   perplexity and the checkpoint round trip on a tiny random model, on ``--device`` and on the CPU from
   the same inputs; each artifact compared with its bound stated (``checks`` rows).
3. ``scale_*`` (``scale``): a Llama-3-8B-shaped model with **random weights**: per-step time and
   peak GPU memory of training, approximate, the streamed GPTQ fuse and layer-sequential eval, projected
   to 32 layers and to the paper protocol (``scale`` rows, the ``docs/scale.json`` schema).
4. ``kernels_*`` (``kernels``): the CUDA extension built for this GPU only (in a background process
   started first, so nvcc runs while the GPU works), every op bit-exact against the CPU extension with
   poisoned outputs, and the W4A4 linear timed against cuBLAS bf16 (``bench`` rows, the
   ``metrics/bench.json`` schema, and ``checks`` rows).

It imports no Hydra, MLflow, DVC, lm-eval or datasets (the GPU machine has none of them); omegaconf
travels as a wheel (``python -m pipeline.tools.gpu.prepare``). ``python -m pipeline.tools.gpu.merge`` publishes a
returned file.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ...infra.devices import resolve_device
from ...infra.errors import PipelineError
from . import kernels as gpu_kernels, scale as gpu_scale, stages as gpu_stages
from .harness import BUILD_LOG, RESULT_FILE, Budget, Context, Part, Report, error_line, run_part


def environment(device: torch.device) -> dict[str, Any]:
    """Versions, the GPU and its free memory (the ``env`` part)."""
    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "torch_cuda": torch.version.cuda, "cpu_threads": torch.get_num_threads(),
                           "host": platform.machine(), "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError as exc:
        env["transformers"] = error_line(exc)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        free, total = torch.cuda.mem_get_info(device)
        env.update(gpu=props.name, compute_capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                   gpu_total_gib=round(total / 2**30, 1), gpu_free_gib=round(free / 2**30, 1))
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            env["driver"] = smi.stdout.strip() or smi.stderr.strip()[:200]
        except (OSError, subprocess.TimeoutExpired) as exc:
            env["driver"] = error_line(exc)
        try:
            nvcc = subprocess.run(["nvcc", "--version"], capture_output=True, text=True, timeout=20)
            env["nvcc"] = (nvcc.stdout.strip().splitlines() or ["?"])[-1]
        except (OSError, subprocess.TimeoutExpired) as exc:
            env["nvcc"] = error_line(exc)
    return env


def start_kernel_build(ctx: Context) -> None:
    """Build the CUDA extension in a background process now (nvcc on the CPUs while the GPU parts run);
    ``kernels`` waits for it and then loads the cached build."""
    if ctx.device.type != "cuda" or "kernels" not in ctx.args.parts:
        return
    log = open(Path(ctx.args.out) / BUILD_LOG, "w")
    code = "from pipeline.export.kernels import cpu_ops, cuda_ops; cpu_ops(); cuda_ops(); print('built', flush=True)"
    env = {**os.environ, "RSQ_VERBOSE_BUILD": "1"}
    ctx.cache["build"] = (subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT,
                                           env=env, cwd=Path(__file__).resolve().parents[3]), time.perf_counter(), log)


# Most valuable first; the kernels come after the first 8B parts, by when their background build is done.
ORDER = ("stages", "scale_train_global", "scale_approximate", "scale_fuse_gptq", "kernels_build",
         "kernels_correctness", "kernels_timing", "scale_eval", "scale_train_layerwise", "scale_projection")


def parts_for(selected: list[str]) -> list[Part]:
    """The parts of the ``selected`` groups, in ``ORDER``."""
    groups = {"stages": [Part("stages", gpu_stages.run, 60, 30)], "scale": gpu_scale.PARTS,
              "kernels": gpu_kernels.PARTS}
    chosen = {p.name: p for name in selected for p in groups[name]}
    return [chosen[name] for name in ORDER if name in chosen]


PART_GROUPS = ("stages", "scale", "kernels")


class OneLineParser(argparse.ArgumentParser):
    """Bad command-line input: one line on stderr, exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {message}\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineParser(prog="python -m pipeline.tools.gpu.check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help=f"folder of {RESULT_FILE} (and {BUILD_LOG})")
    parser.add_argument("--device", default=None, help="cuda (default when there is one) | cuda:N | cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes everywhere (the test suite's run)")
    parser.add_argument("--budget", type=float, default=330.0, help="seconds for the whole check (default 330)")
    parser.add_argument("--parts", nargs="+", default=list(PART_GROUPS), help=f"any of {' '.join(PART_GROUPS)}")
    parser.add_argument("--layers", type=int, default=2,
                        help="decoder layers of the 8B shape actually run by approximate, fuse and eval (projected to 32)")
    parser.add_argument("--train-steps", type=int, default=2, help="timed training steps (after one warm-up step)")
    parser.add_argument("--seqlen", type=int, default=2048, help="tokens per window of the 8B-shaped parts")
    parser.add_argument("--calib-windows", type=int, default=128, help="GPTQ calibration windows of the 8B fuse")
    parser.add_argument("--repeats", type=int, default=5, help="timing rounds of each kernel (median)")
    args = parser.parse_args(argv)
    bad = [p for p in args.parts if p not in PART_GROUPS]
    if bad:
        raise PipelineError(f"--parts {' '.join(bad)}: choose from {' '.join(PART_GROUPS)}")
    for name in ("layers", "train_steps", "seqlen", "calib_windows", "repeats"):
        if getattr(args, name) < 1:
            raise PipelineError(f"--{name.replace('_', '-')}={getattr(args, name)}: must be at least 1")
    if args.layers > 32:
        raise PipelineError(f"--layers={args.layers}: Llama-3-8B has 32 decoder layers")
    if not args.budget > 0:
        raise PipelineError(f"--budget={args.budget}: must be a positive number of seconds")
    return args


def resolve(args: argparse.Namespace) -> torch.device:
    name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    device = resolve_device(name, "--device")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = resolve(args)
    budget = Budget(args.budget)
    # this GPU only: a 4x faster build than the default arch list (kernels.CUDA_ARCHS)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", f"{major}.{minor}{'a' if (major, minor) == (9, 0) else ''}")
        os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 8))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"tool": "python -m pipeline.tools.gpu.check", "argv": sys.argv[1:] if argv is None else argv,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": device.type, "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "tiny": args.tiny, "budget_s": args.budget, "weights": "random",
            "env": environment(device)}
    report = Report(out / RESULT_FILE, meta)
    report.part("env", "ok", budget.elapsed())
    report.write(budget.elapsed())
    with tempfile.TemporaryDirectory(prefix="rsq-gpu-check-") as work:
        ctx = Context(device, args.tiny, args, budget, report, Path(work))
        start_kernel_build(ctx)
        try:
            for part in parts_for(args.parts):
                run_part(ctx, part)
        finally:
            build = ctx.cache.get("build")
            if build is not None and build[0].poll() is None:
                build[0].kill()
    meta["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    report.write(budget.elapsed())
    failed = [p["part"] for p in report.data["parts"] if p["status"] == "failed"]
    bad = [f"{c['part']}/{c['name']}" for c in report.data["checks"] if not c["ok"]]
    print(f"done in {budget.elapsed():.0f} s: {len(report.data['checks']) - len(bad)} checks passed, {len(bad)} failed"
          f"{' (' + ', '.join(bad[:10]) + ')' if bad else ''}; failed parts: {', '.join(failed) or 'none'}; "
          f"results in {out / RESULT_FILE}", flush=True)
    return 1 if failed or bad else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
