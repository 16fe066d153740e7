"""The CUDA sources in cuda_ext/cuda compile, without warnings, for the archs they target.

Compile only (CI has nvcc but no GPU; running the kernels is the GPU session's job, see
cuda_ext/cuda/README.md): every .cu with nvcc for sm_80 and sm_90, warnings as errors; the GEMM's
PTX holds the tensor-core instruction of each arch's path (int4 m16n8k64 on sm_80, int8 m16n8k32 on
sm_90, where there is no int4 MMA); the host API header is plain C++; the torch bindings pass a g++
syntax check against torch's headers. Skipped, with the reason, where nvcc (or g++) is absent.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

CUDA_DIR = Path(__file__).resolve().parents[1] / "cuda_ext" / "cuda"
SOURCES = sorted(p.name for p in CUDA_DIR.glob("*.cu"))
GEMM = "gemm_w4a4.cu"
SM90_GEMM = "gemm_int8_sm90.cu"  # CUTLASS: TMA + warp-specialized int8 wgmma, sm_90a only at run time
# every file for Ampere, Ada and Hopper (sm_90a: wgmma and TMA need the arch-specific target), as the
# extension is built (kernels.CUDA_ARCHS)
TARGETS = [(src, arch) for src in SOURCES for arch in ("80", "89", "90a")]
# The flags torch.utils.cpp_extension adds for .cu files (no implicit half conversions, ...), so the
# extension build later sees no surprise, plus warnings as errors for nvcc and the host compiler.
TORCH_NVCC_FLAGS = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr"]
def _cutlass_flags() -> list[str]:
    """-isystem flags of the pinned nvidia-cutlass wheel's headers (a dev dependency), as the extension loader
    passes them; none where the wheel is missing (the CUTLASS file's compile then fails, saying so)."""
    from pipeline.export.kernels import cutlass_include
    from pipeline.infra.errors import PipelineError

    try:  # system headers: our warnings-as-errors apply to our code, not to CUTLASS's
        return [flag for p in cutlass_include() for flag in ("-isystem", str(p))]
    except PipelineError:
        return []


# the extension's own flags (kernels.CUDA_FLAGS: -DNDEBUG keeps CUTLASS's device asserts out of the wgmma
# loop) plus warnings as errors for nvcc, ptxas's performance notes included, and the host compiler
NVCC_FLAGS = ["-std=c++17", "-O2", "-DNDEBUG", *TORCH_NVCC_FLAGS, *_cutlass_flags(), "-Werror", "all-warnings",
              "-Xcompiler", "-fPIC,-Wall,-Wextra,-Werror"]
MMA_S4 = "mma.sync.aligned.m16n8k64.row.col.s32.s4.s4.s32"
MMA_S8 = "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32"
WGMMA_S8 = "wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8"  # the 64 x 128 x 32 int8 warpgroup MMA, K-major


def _cuda_roots() -> list[Path]:
    roots = [Path(os.environ[v]) for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    roots.append(Path("/usr/local/cuda"))
    versioned = Path("/usr/local").glob("cuda-*")
    roots += sorted(versioned, key=lambda p: [int(x) for x in re.findall(r"\d+", p.name)], reverse=True)
    return roots


def find_nvcc() -> str | None:
    """$CUDA_HOME (or $CUDA_PATH)/bin/nvcc, else nvcc on PATH, else /usr/local/cuda/bin, else the
    newest /usr/local/cuda-X.Y/bin."""
    env_roots = [Path(os.environ[v]) for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    on_path = shutil.which("nvcc")
    candidates = [r / "bin" / "nvcc" for r in env_roots]
    candidates += [Path(on_path)] if on_path else []
    candidates += [r / "bin" / "nvcc" for r in _cuda_roots()]
    return next((str(c) for c in candidates if c.is_file() and os.access(c, os.X_OK)), None)


def find_cuda_include() -> Path | None:
    """The toolkit's include dir (for the g++ checks; nvcc finds its own)."""
    roots = list(_cuda_roots())
    if NVCC:
        roots.insert(0, Path(NVCC).resolve().parents[1])
    return next((r / "include" for r in roots if (r / "include" / "cuda_runtime_api.h").is_file()), None)


NVCC = find_nvcc()
CXX = shutil.which("g++") or shutil.which("c++")
# CI's machines have nvcc 13.0: there a missing nvcc is a failure, not a skip.
needs_nvcc = pytest.mark.skipif(NVCC is None and not os.environ.get("CI"),
                                reason="nvcc not found ($CUDA_HOME/bin, PATH, /usr/local/cuda*/bin)")


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    log = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 0, f"{what} failed:\n$ {' '.join(cmd)}\n{log}"
    assert "warning" not in log.lower(), f"{what} warned:\n{log}"
    assert "performance loss" not in log.lower(), f"{what}: ptxas serialized the wgmma pipeline:\n{log}"


@pytest.fixture(scope="module")
def ptx(tmp_path_factory):
    """ptx(src, arch) -> PTX text, compiling `src` for sm_`arch` once (the object file is built too)."""
    root = tmp_path_factory.mktemp("nvcc")
    done: dict[tuple[str, str], str] = {}

    def build(src: str, arch: str) -> str:
        if (src, arch) not in done:
            keep = root / f"{Path(src).stem}_sm{arch}"
            keep.mkdir()
            _run([NVCC, *NVCC_FLAGS, "-c", str(CUDA_DIR / src), "-o", str(keep / "out.o"),
                  f"-gencode=arch=compute_{arch},code=sm_{arch}", "--keep", "--keep-dir", str(keep)],
                 f"nvcc {src} for sm_{arch}")
            done[(src, arch)] = (keep / f"{Path(src).stem}.ptx").read_text()
        return done[(src, arch)]

    return build


def test_the_sources_are_there():
    assert {"pack.cu", "quantize.cu", "hadamard.cu", GEMM, SM90_GEMM, "transition.cu"} <= set(SOURCES)
    assert (CUDA_DIR / "w4a4.cuh").is_file() and (CUDA_DIR / "torch_bindings.cpp").is_file()


@needs_nvcc
@pytest.mark.parametrize("src,arch", TARGETS)
def test_compiles_without_warnings(ptx, src, arch):
    text = ptx(src, arch)
    assert f".target sm_{arch}" in text
    assert ".entry" in text, f"{src} for sm_{arch} has no kernel: compiled away by an arch guard?"
    if src == SM90_GEMM:  # (checked here: one CUTLASS compile per arch, 45-150 s each on 2 cores)
        if arch == "90a":  # int8 wgmma, TMA bulk-tensor loads, the warp-specialized register split
            assert WGMMA_S8 in text and "cp.async.bulk.tensor" in text and "setmaxnreg" in text
        else:  # the host side compiles (it refuses the device at run time); no Hopper instruction
            assert "wgmma" not in text


@needs_nvcc
@pytest.mark.parametrize("arch,native", [("80", MMA_S4), ("89", MMA_S4), ("90a", MMA_S8)])
def test_gemm_holds_each_archs_tensor_core_path(ptx, arch, native):
    text = ptx(GEMM, arch)
    assert native in text, f"sm_{arch} GEMM lacks {native}"
    # Both paths are built for every arch (the other one can be forced for validation).
    assert MMA_S4 in text and MMA_S8 in text


def test_host_api_header_is_plain_cpp(tmp_path):
    include = find_cuda_include()
    if CXX is None or include is None:
        pytest.skip("needs g++ and the CUDA toolkit headers (cuda_runtime_api.h)")
    probe = tmp_path / "probe.cpp"
    probe.write_text('#include "w4a4.cuh"\nint main() { return rsq_last_error()[0]; }\n')
    _run([CXX, "-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-Werror", "-I", str(CUDA_DIR),
          "-isystem", str(include), str(probe)], "g++ w4a4.cuh")


def test_torch_bindings_pass_a_syntax_check():
    include = find_cuda_include()
    if CXX is None or include is None:
        pytest.skip("needs g++ and the CUDA toolkit headers (cuda_runtime_api.h)")
    from torch.utils.cpp_extension import include_paths

    torch_includes = [flag for p in include_paths() for flag in ("-isystem", p)]
    # A CPU torch wheel ships c10/cuda headers without their generated cmake config header.
    _run([CXX, "-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-Werror", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
          "-DTORCH_EXTENSION_NAME=rsq_w4a4_cuda", "-DTORCH_API_INCLUDE_EXTENSION_H", *torch_includes,
          "-isystem", sysconfig.get_paths()["include"], "-isystem", str(include), str(CUDA_DIR / "torch_bindings.cpp")],
         "g++ -fsyntax-only torch_bindings.cpp")
