"""The C++ CPU kernels against the pure-torch references, on fresh random inputs each run.

Integer parts (packing, activation codes, int32 GEMM) must be bit-exact; float parts (epilogue,
Hadamard, transition) within float32 rounding. Odd M and N, K multiples of 32; a layout violation
is one clear error.
"""
from __future__ import annotations

import os

import pytest
import torch

from pipeline.rotation.hadamard import fast_hadamard_transform
from pipeline.export.kernels import (cpu_ops, hadamard_base, reference_gemm_int4, reference_gemm_w4a4,
                              reference_quantize_act, reference_transition)
from pipeline.quant.quantizers import quantize_asym
from pipeline.quant.codes import pack, unpack

SEED = int.from_bytes(os.urandom(4), "little")
SHAPES = [(1, 33, 32), (7, 5, 64), (17, 129, 96), (33, 31, 576)]  # (M, N, K)


@pytest.fixture(scope="module")
def ops():
    return cpu_ops()


def _gen(offset: int) -> torch.Generator:
    return torch.Generator().manual_seed(SEED + offset)


def _codes(rows: int, k: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(-8, 8, (rows, k), generator=gen, dtype=torch.int8)


@pytest.mark.parametrize("M,N,K", SHAPES)
def test_pack_unpack_bit_exact(ops, M, N, K):
    codes = _codes(N, K, _gen(K + N))
    packed = ops.pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (N, K // 2)
    assert torch.equal(packed, pack(codes, 4)), f"seed {SEED}"  # the checkpoint's layout
    assert torch.equal(ops.unpack_int4(packed), codes), f"seed {SEED}"
    assert torch.equal(unpack(packed, 4), codes)
    assert int(packed[0, 0]) == (int(codes[0, 0]) & 0xF) | ((int(codes[0, 1]) & 0xF) << 4)  # low nibble = even k


@pytest.mark.parametrize("M,N,K", SHAPES)
@pytest.mark.parametrize("clip", [1.0, 0.9])
def test_quantize_act_matches_the_fake_quantizer(ops, M, N, K, clip):
    gen = _gen(M * K)
    x = torch.randn(M, K, generator=gen) * torch.rand(M, 1, generator=gen) * 10
    x[0, :3] = torch.tensor([0.0, 5.0, -5.0])
    if M > 1:
        x[1] = x[1].abs()  # all positive: xmin clamps to 0
    packed, scale, zero = ops.quantize_act(x, clip)
    codes, ref_scale, ref_zero = reference_quantize_act(x, clip)
    assert torch.equal(ops.unpack_int4(packed), codes), f"seed {SEED}"
    unpacked, scale8, zero8 = ops.quantize_act_int8(x, clip)  # the int8 path's codes: one per byte
    assert unpacked.dtype == torch.int8 and torch.equal(unpacked, codes), f"seed {SEED}"
    assert torch.equal(scale8, ref_scale) and torch.equal(zero8, ref_zero)
    assert torch.equal(scale, ref_scale) and torch.equal(zero, ref_zero), f"seed {SEED}"
    deq = (codes.float() - zero[:, None].float()) * scale[:, None]
    assert torch.equal(deq, quantize_asym(x, 4, clip)), f"seed {SEED}"  # the same grid as the model
    half, _, _ = ops.quantize_act(x.half(), clip)  # fp16 input is computed in float32
    assert torch.equal(half, ops.quantize_act(x.half().float(), clip)[0])


# decode shapes (M <= 16: the packed-weight dot-product kernel): every token-group remainder, odd N, K/2
# below, at and past whole vectors
DECODE_SHAPES = [(16, 97, 1024), (3, 33, 4096), (5, 64, 160), (2, 7, 32), (14, 3, 256)]


@pytest.mark.parametrize("M,N,K", [*SHAPES, *DECODE_SHAPES])
def test_int4_gemm_bit_exact_and_epilogue(ops, M, N, K):
    gen = _gen(M + N + K)
    a, w = _codes(M, K, gen), _codes(N, K, gen)
    pa, pw = ops.pack_int4(a), ops.pack_int4(w)
    acc = ops.gemm_int4(pa, pw)
    assert acc.dtype == torch.int32 and torch.equal(acc, reference_gemm_int4(a, w)), f"seed {SEED}"
    extreme = ops.gemm_int4(ops.pack_int4(torch.full((M, K), -8, dtype=torch.int8)),
                            ops.pack_int4(torch.full((N, K), -8, dtype=torch.int8)))
    assert torch.all(extreme == 64 * K)
    a_scale = torch.rand(M, generator=gen) + 0.01
    a_zero = torch.randint(-8, 8, (M,), generator=gen, dtype=torch.int32)
    w_scale = torch.rand(N, generator=gen) + 0.01
    w_sum = w.to(torch.int32).sum(dim=1, dtype=torch.int32)
    out = ops.gemm_w4a4(pa, a_scale, a_zero, pw, w_scale, w_sum)
    ref = reference_gemm_w4a4(a, a_scale, a_zero, w, w_scale)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6 * ref.abs().max().item(), msg=f"seed {SEED}")


@pytest.mark.parametrize("M,N,K", [*SHAPES, (1, 4096, 256), (16, 97, 1024), (65, 257, 160)])
def test_int8_dot_product_path_equals_the_int4_kernel_bit_for_bit(ops, M, N, K):
    """``gemm_w4a4_int8`` (oneDNN int8 dot products) gives the C++ int4 kernel's output bits, fresh
    random inputs each run, odd M and N (decode M = 1 too), extreme codes included."""
    from pipeline.export.kernels import cpu_int8_ready, gemm_w4a4_int8

    if not cpu_int8_ready():
        pytest.skip("torch._int_mm does not run on this CPU: Linear4bit stays on the int4 kernel")
    gen = _gen(3 * M + N + K)
    x = torch.randn(M, K, generator=gen) * 4
    w = _codes(N, K, gen)
    w[0] = -8  # the extreme product -8 * -8 on every k of one row
    packed, scale, zero = ops.quantize_act(x, 0.9)
    codes, _, _ = reference_quantize_act(x, 0.9)
    codes[0, :] = -8
    packed = ops.pack_int4(codes)
    w_scale = torch.rand(N, generator=gen) + 0.01
    w_sum = w.to(torch.int32).sum(dim=1, dtype=torch.int32)
    expected = ops.gemm_w4a4(packed, scale, zero, ops.pack_int4(w), w_scale, w_sum)
    got = gemm_w4a4_int8(codes, scale, zero, w.T.contiguous(), w_scale, w_sum)
    assert got.dtype == torch.float32 and torch.equal(got, expected), f"seed {SEED}"


def test_linear4bit_int8_and_int4_paths_give_the_same_bits():
    from torch import nn

    from pipeline.export.kernels import cpu_int8_ready
    from pipeline.export.linear4bit import Linear4bit

    if not cpu_int8_ready():
        pytest.skip("torch._int_mm does not run on this CPU")
    gen = _gen(11)
    n, k = 96, 320
    scale = torch.rand(n, generator=gen) * 0.01 + 0.001
    linear = nn.Linear(k, n, bias=True)
    with torch.no_grad():
        linear.weight.copy_(_codes(n, k, gen).float() * scale[:, None])
    for rotate in (False, True):
        lin = Linear4bit.from_float(linear, scale, clip_ratio=0.9, rotate_input=rotate)
        x = torch.randn(2, 9, k, generator=gen)
        outs = []
        for path in ("int4", "int8"):
            lin.cpu_gemm = path
            outs.append(lin(x))
        assert torch.equal(outs[0], outs[1]), f"seed {SEED}"


@pytest.mark.parametrize("n", [32, 64, 576, 1536, 2048])
def test_hadamard_matches_the_fast_transform(ops, n):
    x = torch.randn(9, n, generator=_gen(n))
    y = ops.hadamard(x, hadamard_base(n))
    torch.testing.assert_close(y, fast_hadamard_transform(x), rtol=1e-5, atol=1e-5, msg=f"seed {SEED}")
    torch.testing.assert_close(y.double().norm(dim=1), x.double().norm(dim=1), rtol=1e-5, atol=0)


@pytest.mark.parametrize("T,D,r", [(1, 64, 1), (13, 576, 32), (5, 192, 128), (11, 200, 32), (9, 1024, 64), (1, 4096, 32), (2, 1000, 64), (1, 48, 16), (20, 72, 16), (17, 200, 7), (9, 96, 0)])
def test_transition_fused_with_the_residual_add(ops, T, D, r):
    gen = _gen(T * D + r)
    h = torch.randn(T, D, generator=gen)
    Q = torch.linalg.qr(torch.randn(D, r, generator=gen, dtype=torch.float64))[0].float()
    M = (torch.randn(r, r, generator=gen) * 0.1)
    out = ops.transition(h, Q, M)
    torch.testing.assert_close(out.double(), reference_transition(h, Q, M), rtol=1e-5, atol=1e-5, msg=f"seed {SEED}")
    x = torch.randn(T, D, generator=gen)  # the block output: the whole residual add in the same pass
    out = ops.transition(h, Q, M, x=x)
    torch.testing.assert_close(out.double(), reference_transition(h, Q, M) + x.double(), rtol=1e-5, atol=1e-5, msg=f"seed {SEED}")
    bf16 = ops.transition(h.bfloat16(), Q, M, x=x.bfloat16())  # any float dtype in, the same dtype out
    assert bf16.dtype == torch.bfloat16
    torch.testing.assert_close(bf16.double(), reference_transition(h.bfloat16(), Q, M) + x.bfloat16().double(),
                               rtol=1e-2, atol=1e-2, msg=f"seed {SEED}")


@pytest.mark.parametrize("call,message", [
    (lambda ops: ops.pack_int4(torch.zeros(3, 48, dtype=torch.int8)), "K=48 must be a positive multiple of 32"),
    (lambda ops: ops.pack_int4(torch.full((1, 32), 9, dtype=torch.int8)), "codes must lie in [-8, 7]"),
    (lambda ops: ops.pack_int4(torch.zeros(3, 32)), "codes must be Char"),
    (lambda ops: ops.quantize_act(torch.zeros(3, 40), 1.0), "K=40 must be a positive multiple of 32"),
    (lambda ops: ops.gemm_int4(torch.zeros(2, 16, dtype=torch.uint8), torch.zeros(3, 32, dtype=torch.uint8)),
     "a has K=32 but w has K=64"),
    (lambda ops: ops.gemm_w4a4(torch.zeros(2, 16, dtype=torch.uint8), torch.zeros(3), torch.zeros(2, dtype=torch.int32),
                               torch.zeros(3, 16, dtype=torch.uint8), torch.zeros(3), torch.zeros(3, dtype=torch.int32)),
     "a_scale must have shape (2)"),
    (lambda ops: ops.hadamard(torch.zeros(2, 48), hadamard_base(32)), "n / m = 48 must be a power of two"),
    (lambda ops: ops.transition(torch.zeros(2, 64), torch.zeros(64, 4), torch.zeros(3, 3)), "M must be (4, 4)"),
    (lambda ops: ops.transition(torch.zeros(2, 64), torch.zeros(64, 4), torch.zeros(4, 4), x=torch.zeros(3, 64)),
     "x must have h's shape"),
])
def test_bad_shapes_are_one_clear_error(ops, call, message):
    with pytest.raises(RuntimeError) as info:
        call(ops)
    assert message in str(info.value).splitlines()[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA host builds the CUDA kernels instead")
def test_cuda_ops_refused_in_one_line_without_cuda():
    from pipeline.infra.errors import PipelineError
    from pipeline.export.kernels import cuda_ops

    with pytest.raises(PipelineError, match="the CUDA kernels need a CUDA build of torch and a GPU"):
        cuda_ops()


def test_staged_sources_are_content_addressed(tmp_path, monkeypatch):
    """Two checkouts of the same kernel sources share one build (same name and compiled paths); a
    changed header or flag gives a new one; the staged copy is never rewritten."""
    from pipeline.export.kernels import staged_sources

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    checkouts = []
    for clone in ("a", "b"):
        folder = tmp_path / clone / "cpu"
        folder.mkdir(parents=True)
        (folder / "k.cpp").write_text('#include "k.h"\nint f() { return K; }\n')
        (folder / "k.h").write_text("#define K 1\n")
        checkouts.append(folder)
    first = staged_sources("rsq_t", [checkouts[0] / "k.cpp"], ["-O3"])
    staged = tmp_path / "ext" / "rsq_t-src" / first[0].split("_")[-1]
    assert first[1] == [str(staged / "k.cpp")] and (staged / "k.h").read_text() == "#define K 1\n"
    mtime = (staged / "k.cpp").stat().st_mtime_ns
    assert staged_sources("rsq_t", [checkouts[1] / "k.cpp"], ["-O3"]) == first
    assert (staged / "k.cpp").stat().st_mtime_ns == mtime
    assert staged_sources("rsq_t", [checkouts[1] / "k.cpp"], ["-O2"])[0] != first[0]
    (checkouts[1] / "k.h").write_text("#define K 2\n")
    assert staged_sources("rsq_t", [checkouts[1] / "k.cpp"], ["-O3"])[0] != first[0]
    import pipeline.export.kernels as kernels  # a -march=native build is keyed by the CPU too
    native = [staged_sources("rsq_t", [checkouts[1] / "k.cpp"], ["-march=native"])[0]]
    monkeypatch.setattr(kernels, "native_cpu_id", lambda: "model name: another CPU\nflags: sse2\n")
    native.append(staged_sources("rsq_t", [checkouts[1] / "k.cpp"], ["-march=native"])[0])
    assert native[0] != native[1] and staged_sources("rsq_t", [checkouts[1] / "k.cpp"], ["-O3"])[0] != first[0]
    from pipeline.infra.errors import PipelineError
    with pytest.raises(PipelineError, match="sources are missing"):
        staged_sources("rsq_t", [tmp_path / "nowhere.cpp"], ["-O3"])


def test_linear4bit_dispatch_decode_rows_to_the_int4_kernel(monkeypatch):
    """``cpu_gemm="auto"``: up to DECODE_ROWS tokens the packed int4 kernel (a GEMV that reads the packed
    weights), more tokens the int8 dot products where they run."""
    from torch import nn

    import pipeline.export.linear4bit as l4
    from pipeline.export.kernels import cpu_int8_ready

    calls = []
    real = l4.gemm_w4a4_int8
    monkeypatch.setattr(l4, "gemm_w4a4_int8", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    scale = torch.full((8,), 0.01)
    linear = nn.Linear(64, 8, bias=False)
    with torch.no_grad():
        linear.weight.copy_(_codes(8, 64, _gen(5)).float() * 0.01)
    lin = l4.Linear4bit.from_float(linear, scale)
    for rows in (1, l4.DECODE_ROWS, l4.DECODE_ROWS + 1):
        lin(torch.randn(rows, 64))
    assert calls == ([l4.DECODE_ROWS + 1] if cpu_int8_ready() else [])


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


@pytest.mark.skipif("avx512bw" not in _cpu_flags(), reason="this CPU has no AVX-512: the native build is the AVX2 path")
def test_decode_kernel_avx2_path_is_exact_too():
    """The decode kernel is chosen at build time (-march=native): an AVX-512 host tests its own path above;
    this builds the AVX2 one (VPMADDUBSW + VPMADDWD, the AMD-without-AVX-512 machines') and checks it
    bit for bit too, every token-group remainder, odd N, K/2 below and past whole vectors."""
    from torch.utils.cpp_extension import load

    from pipeline.export.kernels import CPU_CFLAGS, CPU_LDFLAGS, CPU_SOURCES, staged_sources

    flags = [("-march=x86-64-v3" if f == "-march=native" else f) for f in CPU_CFLAGS]
    name, sources = staged_sources("rsq_w4a4_cpu_avx2", CPU_SOURCES, flags)
    avx2 = load(name=name, sources=sources, extra_cflags=flags, extra_ldflags=CPU_LDFLAGS)
    gen = _gen(11)
    for M, N, K in [(1, 33, 32), *DECODE_SHAPES, (7, 5, 576)]:
        a, w = _codes(M, K, gen), _codes(N, K, gen)
        a[0], w[0] = -8, -8
        got = avx2.gemm_int4(avx2.pack_int4(a), avx2.pack_int4(w))
        assert torch.equal(got, reference_gemm_int4(a, w)), f"seed {SEED}, shape {(M, N, K)}"


def test_decode_crossover_times_both_paths_and_refuses_bad_input(capsys):
    """pipeline.tools.decode_crossover (what DECODE_ROWS is set from): both CPU GEMMs on one shape, the
    same bits (checked inside), a row per M; bad input is one line and exit 2."""
    from pipeline.export.kernels import cpu_int8_ready
    from pipeline.tools import decode_crossover

    with pytest.raises(SystemExit) as exit_:
        decode_crossover.main(["--m", "0"])
    assert exit_.value.code == 2 and "--m needs positive token counts" in capsys.readouterr().err
    if not cpu_int8_ready():
        pytest.skip("torch._int_mm does not run on this CPU")
    rows = decode_crossover.crossover([1, 17], 0.01, shapes=("o",))
    assert [(r["shape"], r["M"]) for r in rows] == [("o 4096x4096", 1), ("o 4096x4096", 17)]
    assert all(r["int4_ms"] > 0 and r["int8_ms"] > 0 and r["ratio"] > 0 for r in rows)


def test_stale_build_lock_is_cleared_and_a_fresh_one_kept(tmp_path, monkeypatch):
    """A ``lock`` a killed build left (older than the limit) is removed, so ``load`` does not wait for
    ever; a fresh one (a build under way in another process) is kept."""
    import os
    import time

    from pipeline.export.kernels import clear_stale_build_lock

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    folder = tmp_path / "rsq_lock_test"
    folder.mkdir()
    lock = folder / "lock"
    assert not clear_stale_build_lock("rsq_lock_test")  # none there
    lock.write_text("")
    assert not clear_stale_build_lock("rsq_lock_test", max_age=60) and lock.exists()
    old = time.time() - 3600
    os.utime(lock, (old, old))
    assert clear_stale_build_lock("rsq_lock_test", max_age=60) and not lock.exists()
