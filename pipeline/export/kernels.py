"""The W4A4 ops: the C++ CPU extension in ``cuda_ext/cpu`` (built on first use, cached), and the
pure-torch references every kernel is tested against.

Layout (DESIGN §3): int4 two's complement, two per byte, K-contiguous for both operands (activations
``(M, K)`` -> uint8 ``(M, K/2)``, weights ``(N, K)`` -> uint8 ``(N, K/2)``), low nibble = even k;
K a multiple of 32. Activation codes are per-token asymmetric (the fake quantizer's grid shifted to
-8..7), weight codes symmetric per output channel, so

    y[m, n] = a_scale[m] * w_scale[n] * (sum_k a[m, k] w[n, k] - a_zero[m] * w_sum[n])

with the sum exact in int32 and ``w_sum[n] = sum_k w[n, k]`` precomputed.
"""
from __future__ import annotations

import functools
import hashlib
import os
import shutil
import time
from pathlib import Path

import torch

from ..infra.errors import PipelineError
from ..rotation.hadamard import _base, _require_split

CPU_SOURCES = [Path(__file__).resolve().parents[2] / "cuda_ext" / "cpu" / "w4a4_cpu.cpp"]
ALIGN = 32


# -fopenmp: at::parallel_for is OpenMP inline code in the headers; without the flag every kernel ran on one
# thread (measured: the decode GEMV took the same time at 1 and 2 threads)
CPU_CFLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp"]
CPU_LDFLAGS = ["-fopenmp"]


def native_cpu_id() -> str:
    """The CPU a ``-march=native`` build is for (model name and feature flags from /proc/cpuinfo): part
    of the build key, so a build cache shared between machines never runs AVX-512 code on a CPU without it."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags"))]
    except OSError:
        return ""
    return "".join(sorted(set(lines)))


def staged_sources(name: str, sources: list[Path], flags: list[str]) -> tuple[str, list[str]]:
    """``(extension name, source paths to compile)``, content-addressed: every file of the sources'
    folder (headers too) is copied once under the extension build root as ``<name>-src/<digest>/``,
    and the name carries the digest. Every checkout of the same sources (a second clone, the DVC
    test's copy of the repo) then gives the same command lines in the same build folder, so the
    compiled library is reused instead of rebuilt."""
    from torch.utils.cpp_extension import get_default_build_root

    missing = [str(p) for p in sources if not p.is_file()]
    if missing:
        raise PipelineError(f"the kernels' sources are missing: {', '.join(missing)}")
    files = sorted(p for p in sources[0].parent.iterdir() if p.is_file() and p.suffix in (".cpp", ".h", ".cu", ".cuh"))
    digest = hashlib.sha256()
    for part in [*flags, *(p.name for p in sources), *([native_cpu_id()] if "-march=native" in flags else [])]:
        digest.update(part.encode() + b"\0")
    for p in files:
        digest.update(p.name.encode() + b"\0" + p.read_bytes())
    key = digest.hexdigest()[:16]
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()  # where load() builds
    folder = Path(root) / f"{name}-src" / key
    folder.mkdir(parents=True, exist_ok=True)
    for p in files:
        target = folder / p.name
        if not target.is_file():  # never rewritten: a new mtime would make ninja rebuild
            tmp = folder / f".{p.name}.{os.getpid()}"
            shutil.copyfile(p, tmp)
            os.replace(tmp, target)
    return f"{name}_{key}", [str(folder / p.name) for p in sources]


STALE_LOCK_SECONDS = 900  # a build takes 1-3 min; a lock file this old was left by a killed build


def clear_stale_build_lock(name: str, max_age: float = STALE_LOCK_SECONDS) -> bool:
    """Remove the ``lock`` file a killed build left in extension ``name``'s build folder, if it is older
    than ``max_age`` seconds: torch's ``load`` waits for it for ever (it holds no pid to check). A
    younger lock is a build under way (another process) and is waited for. Returns whether one went."""
    from torch.utils.cpp_extension import _get_build_directory

    lock = Path(_get_build_directory(name, False)) / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except OSError:
        return False
    if age < max_age:
        return False
    print(f"kernels: removing {lock}, left {age / 60:.0f} min ago by a build that did not finish")
    lock.unlink(missing_ok=True)
    return True


@functools.lru_cache(maxsize=1)
def cpu_ops():
    """The compiled CPU extension (``torch.utils.cpp_extension.load``; cached under
    ``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``, keyed by the sources' content)."""
    from torch.utils.cpp_extension import load

    try:
        name, sources = staged_sources("rsq_w4a4_cpu", CPU_SOURCES, CPU_CFLAGS)
        clear_stale_build_lock(name)
        return load(name=name, sources=sources, extra_cflags=CPU_CFLAGS, extra_ldflags=CPU_LDFLAGS, verbose=bool(os.environ.get("RSQ_VERBOSE_BUILD")))
    except (RuntimeError, OSError) as exc:
        raise PipelineError(f"building the CPU kernels failed (a C++ compiler is needed): {str(exc).splitlines()[0]}") from None


CUDA_DIR = Path(__file__).resolve().parents[2] / "cuda_ext" / "cuda"
# 9.0a: Hopper's wgmma / TMA (gemm_int8_sm90.cu) exist only in an arch-specific sm_90a build
CUDA_ARCHS = "8.0;8.6;8.9;9.0a"
CUTLASS_WHEEL = "nvidia-cutlass==4.2.0.0"  # the CUTLASS / CuTe headers (pyproject's cuda and dev extras pin it)
# NDEBUG: CUTLASS's device asserts are calls inside the wgmma main loop, which make ptxas serialize it (C7510)
CUDA_FLAGS = ["-O3", "-std=c++17", "-DNDEBUG", "--expt-relaxed-constexpr"]


def cutlass_include() -> list[Path]:
    """The include folders of the pinned ``nvidia-cutlass`` wheel (CUTLASS and CuTe; the util headers
    for ``packed_stride.hpp``); a one-line error naming the wheel when it is not installed."""
    import importlib.util

    spec = importlib.util.find_spec("cutlass_library")
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    source = next((Path(r) / "source" for r in roots if (Path(r) / "source" / "include" / "cute").is_dir()), None)
    if source is None:
        raise PipelineError(f"the CUDA kernels need the CUTLASS headers: pip install {CUTLASS_WHEEL}")
    return [source / "include", source / "tools" / "util" / "include"]


@functools.lru_cache(maxsize=1)
def cuda_ops():
    """The CUDA extension (``cuda_ext/cuda``: every ``.cu`` plus ``torch_bindings.cpp``), built for
    sm_80/86/89/90a where torch has CUDA, with the CUTLASS headers of the pinned wheel. The int4 GEMM
    picks the int4 (sm_8x) or int8 (sm_90) mma.sync path by compute capability; on sm_90 ``Linear4bit``
    runs prefill on ``gemm_int8_sm90`` (CUTLASS, TMA + warp-specialized wgmma). No ``--use_fast_math``:
    the quantizer needs IEEE division."""
    if not torch.cuda.is_available():
        raise PipelineError("the CUDA kernels need a CUDA build of torch and a GPU; use the CPU kernels (cpu_ops)")
    from torch.utils.cpp_extension import load

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", CUDA_ARCHS)
    include = [str(p) for p in cutlass_include()]
    sources = sorted(str(p) for p in CUDA_DIR.glob("*.cu")) + [str(CUDA_DIR / "torch_bindings.cpp")]
    return load(name="rsq_w4a4_cuda", sources=sources, extra_cflags=["-O3"], extra_cuda_cflags=CUDA_FLAGS,
                extra_include_paths=include, verbose=bool(os.environ.get("RSQ_VERBOSE_BUILD")))


def is_hopper(t: torch.Tensor) -> bool:
    """Whether ``t`` lives on an sm_90 GPU (H100/H200), where the W4A4 prefill GEMM is CUTLASS's int8 wgmma."""
    return t.is_cuda and torch.cuda.get_device_capability(t.device) == (9, 0)


def ops_for(t: torch.Tensor):
    """The kernels for ``t``'s device: the CUDA extension for a CUDA tensor, the CPU extension otherwise."""
    return cuda_ops() if t.is_cuda else cpu_ops()


# ---- the CPU int8 dot-product path (oneDNN through torch._int_mm) ----------------------------------
# The int4 codes are int8 values in [-8, 7]: an int8 x int8 -> int32 GEMM on them is the same exact sum
# the int4 kernel takes. oneDNN picks the CPU's int8 units at run time (AMX tiles, AVX-512 VNNI,
# AVX2); the activation codes come from the C++ quantizer (``quantize_act_int8``: one code per byte,
# the same loop as ``quantize_act``) and ``dequant_epilogue`` is ``gemm_w4a4``'s float32 epilogue, the
# same operations in order, so the output bits are the int4 kernel's.


@functools.lru_cache(maxsize=1)
def cpu_int8_ready() -> bool:
    """Whether ``torch._int_mm`` runs on this CPU and gives the exact int32 product (checked once on
    odd sizes); else Linear4bit stays on the C++ int4 kernel. ``RSQ_CPU_GEMM=int4`` forces the latter."""
    if os.environ.get("RSQ_CPU_GEMM", "auto") == "int4":
        return False
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(-8, 8, (3, 64), generator=gen, dtype=torch.int8)
    w = torch.randint(-8, 8, (64, 5), generator=gen, dtype=torch.int8)
    try:
        return torch.equal(torch._int_mm(a, w), reference_gemm_int4(a, w.T.contiguous()))
    except (RuntimeError, AttributeError):
        return False


def gemm_w4a4_int8(codes: torch.Tensor, a_scale: torch.Tensor, a_zero: torch.Tensor, w_t: torch.Tensor,
                   w_scale: torch.Tensor, w_sum: torch.Tensor) -> torch.Tensor:
    """float32 ``(M, N)`` = the CPU ``gemm_w4a4``, bit for bit: ``codes`` int8 ``(M, K)`` (``q - 8``),
    ``w_t`` int8 ``(K, N)`` (the weight codes transposed, contiguous), scales and zeros as there."""
    return cpu_ops().dequant_epilogue(torch._int_mm(codes, w_t), a_scale, a_zero, w_scale, w_sum)


def check_k(k: int, what: str) -> None:
    """One clear line for a K the int4 layout cannot hold."""
    if k <= 0 or k % ALIGN:
        raise PipelineError(f"{what}: K={k} must be a positive multiple of {ALIGN} (int4 layout)")


# ---- pure-torch references (the specification) ------------------------------------------------
# Packing: the checkpoint's own ``quant.codes.pack`` / ``unpack`` (bits=4) are the reference.

def reference_quantize_act(x: torch.Tensor, clip_ratio: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fake quantizer's arithmetic (``quantizers.quantize_asym``, 4 bits) on ``x (M, K)``:
    codes ``q - 8`` int8 ``(M, K)``, scale float32 ``(M,)``, zero ``- 8`` int32 ``(M,)``."""
    xf = x.float()
    xmin = xf.amin(dim=-1, keepdim=True).clamp(max=0) * clip_ratio
    xmax = xf.amax(dim=-1, keepdim=True).clamp(min=0) * clip_ratio
    scale = ((xmax - xmin) / 15).clamp(min=1e-8)
    zero = torch.round(-xmin / scale)
    q = torch.clamp(torch.round(xf / scale) + zero, 0, 15)
    return (q - 8).to(torch.int8), scale[:, 0], (zero[:, 0] - 8).to(torch.int32)


def reference_gemm_int4(a_codes: torch.Tensor, w_codes: torch.Tensor) -> torch.Tensor:
    """int32 ``(M, N)`` = ``a (M, K) @ w (N, K).T``, exact (int64 matmul)."""
    return (a_codes.to(torch.int64) @ w_codes.to(torch.int64).T).to(torch.int32)


def reference_gemm_w4a4(a_codes, a_scale, a_zero, w_codes, w_scale) -> torch.Tensor:
    """float64 ``(M, N)`` = ``(a_scale (a - a_zero)) @ (w_scale w).T``: the exact dequantized product."""
    a = (a_codes.double() - a_zero.double()[:, None]) * a_scale.double()[:, None]
    w = w_codes.double() * w_scale.double()[:, None]
    return a @ w.T


def reference_transition(h: torch.Tensor, Q: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """``h + ((h @ Q) @ M) @ Q.T`` in float64."""
    h64 = h.double()
    return h64 + ((h64 @ Q.double()) @ M.double()) @ Q.double().T


def hadamard_base(n: int) -> torch.Tensor:
    """The ``(m, m)`` float32 base factor of ``H_n = kron(base, Sylvester(n / m))`` (``m = 1`` for a
    power of two); raises NoHadamardConstruction when n has none."""
    m, _ = _require_split(n)
    return _base(m).to(torch.float32).contiguous()
