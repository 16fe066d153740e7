// gemm_w4a4 / gemm_int4: C (M, N) = A (M, K) @ W (N, K)^T on packed int4, int32 accumulation
// (exact), then the dequant epilogue. Both operands are K-contiguous, which is exactly the
// "row.col" operand order of mma.sync: A row-major, B = W^T column-major.
//
// Tiling (correctness first; see README for what tuning is left):
//   block tile BM x BN, K in stages of kBK = 128 values (64 bytes per row), kStages-deep cp.async
//   pipeline (16-byte copies, zero-filled past M, N or K: zeros add nothing to the sums);
//   shared-memory rows padded to 80 bytes, so the 32-bit fragment loads of a warp (8 rows g x 4
//   words t: word 20g + t mod 32) hit 32 distinct banks;
//   warps tile the block tile (WARPS_M x WARPS_N), each warp owns (WM / 16) x (WN / 8) m16n8 tiles;
//   the fragments are plain 32-bit shared loads in the m16n8k64 s4 layout (PTX ISA, "Matrix
//   Fragments for mma.m16n8k64"), groupID g = lane / 4, t = lane % 4:
//     A: a0 = row g, k 8t..8t+7 | a1 = row g+8, same k | a2 = row g, k 32+8t.. | a3 = row g+8, k 32+8t..
//     B: b0 = col (W row) g, k 8t..8t+7 | b1 = col g, k 32+8t..
//   and in each 32-bit register the 8 values run from the low nibble up: our byte layout as is.
//   C: c0, c1 = row g, cols 2t, 2t+1 | c2, c3 = row g+8, cols 2t, 2t+1.
//
// Paths (chosen on the host by compute capability; both are compiled for every arch >= sm_80):
//   MmaS4 (sm_80..sm_89): mma.sync.aligned.m16n8k64.row.col.s32.s4.s4.s32 on the fragments as loaded.
//   MmaS8 (sm_90+; Hopper has no int4 tensor-core path): each s4 register is split into two s8
//     registers (even / odd elements, sign-extended) and fed to two m16n8k32 s8 mmas. The s8
//     fragment of thread (g, t) holds k 4t..4t+3 and 16+4t..16+4t+3 of its rows; which real k those
//     are only has to agree between A and B, since a dot product does not care about the order of
//     its terms. We map (A and B alike): s8 k 4t+i <- real k 8t+2i, s8 k 16+4t+i <- real k 8t+2i+1.
//     mma.sync rather than wgmma for now: same fragments as the s4 path, simple and exact; an int8
//     (or int4 -> e4m3) wgmma kernel is the tuning step for Hopper (DESIGN §3).
#include "common.cuh"

namespace rsq {
namespace {

constexpr int kBK = 128;                 // K values per pipeline stage
constexpr int kRowBytes = kBK / 2;       // 64 bytes of each row per stage
constexpr int kStride = kRowBytes + 16;  // padded shared-memory row (see above)

template <int BM_, int BN_, int kWarpsM_, int kWarpsN_, int kStages_>
struct TileConfig {
  static constexpr int BM = BM_, BN = BN_, kWarpsM = kWarpsM_, kWarpsN = kWarpsN_, kStages = kStages_;
  static constexpr int kThreads = 32 * kWarpsM * kWarpsN;
  static constexpr int WM = BM / kWarpsM, WN = BN / kWarpsN;
  static constexpr int MT = WM / 16, NT = WN / 8;
  static constexpr size_t kSmemBytes = static_cast<size_t>(kStages) * (BM + BN) * kStride;
  static_assert(WM % 16 == 0 && WN % 8 == 0, "a warp tile is whole m16n8 tiles");
  static_assert(kStages >= 2, "the pipeline needs two stages");
};
using LargeTile = TileConfig<128, 128, 2, 4, 3>;  // M > 16: 8 warps of 64 x 32, 60 KiB shared
using SmallTile = TileConfig<16, 64, 1, 4, 3>;    // M <= 16 (decode): 4 warps of 16 x 16
constexpr int kSmallM = 16;

struct MmaS4 {
  struct AFrag {
    uint32_t r[4];
  };
  struct BFrag {
    uint32_t r[2];
  };
  __device__ __forceinline__ static AFrag a_from_s4(const uint32_t (&s4)[4]) { return {{s4[0], s4[1], s4[2], s4[3]}}; }
  __device__ __forceinline__ static BFrag b_from_s4(const uint32_t (&s4)[2]) { return {{s4[0], s4[1]}}; }
  __device__ __forceinline__ static void mma(int (&c)[4], const AFrag& a, const BFrag& b) {
    asm("mma.sync.aligned.m16n8k64.row.col.s32.s4.s4.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
        : "r"(a.r[0]), "r"(a.r[1]), "r"(a.r[2]), "r"(a.r[3]), "r"(b.r[0]), "r"(b.r[1]));
  }
};

struct MmaS8 {
  struct AFrag {
    uint32_t r[2][4];  // [half of the k64 slice][s8 register]
  };
  struct BFrag {
    uint32_t r[2][2];
  };
  // s4 registers 0/1 (rows g / g+8) cover real k 0..31 of the slice, 2/3 cover 32..63. s8 A
  // registers: 0 = row g, s8 k 4t..; 1 = row g+8, s8 k 4t..; 2 = row g, s8 k 16+4t..; 3 = row g+8.
  __device__ __forceinline__ static AFrag a_from_s4(const uint32_t (&s4)[4]) {
    AFrag f;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      uint32_t even_g, odd_g, even_g8, odd_g8;
      split_int4x8(s4[2 * h], even_g, odd_g);
      split_int4x8(s4[2 * h + 1], even_g8, odd_g8);
      f.r[h][0] = even_g;
      f.r[h][1] = even_g8;
      f.r[h][2] = odd_g;
      f.r[h][3] = odd_g8;
    }
    return f;
  }
  // s8 B registers: 0 = s8 k 4t.. (even elements), 1 = s8 k 16+4t.. (odd elements), column g.
  __device__ __forceinline__ static BFrag b_from_s4(const uint32_t (&s4)[2]) {
    BFrag f;
#pragma unroll
    for (int h = 0; h < 2; ++h) split_int4x8(s4[h], f.r[h][0], f.r[h][1]);
    return f;
  }
  __device__ __forceinline__ static void mma(int (&c)[4], const AFrag& a, const BFrag& b) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
          "{%0, %1, %2, %3};\n"
          : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
          : "r"(a.r[h][0]), "r"(a.r[h][1]), "r"(a.r[h][2]), "r"(a.r[h][3]), "r"(b.r[h][0]), "r"(b.r[h][1]));
    }
  }
};

enum class Epilogue { kInt32, kFloat32, kFloat16 };

struct GemmArgs {
  const uint8_t* a;  // (m, k/2)
  const uint8_t* w;  // (n, k/2)
  const float* a_scale;
  const int32_t* a_zero;
  const float* w_scale;
  const int32_t* w_sum;
  void* out;  // (m, n)
  int m, n, k;
  bool paired_store;  // n even and out aligned for 2-element stores
};

__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy; when !valid nothing is read and the destination is zero-filled.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

__device__ __forceinline__ uint32_t lds32(const uint8_t* p) { return *reinterpret_cast<const uint32_t*>(p); }

// Rows [row0, row0 + rows) of a packed (total_rows, row_bytes) matrix, bytes [kb0, kb0 + 64), into a
// padded shared tile.
template <int kRows, int kThreads>
__device__ __forceinline__ void load_tile(uint8_t* tile, const uint8_t* src, int row0, int total_rows, int row_bytes,
                                          int kb0) {
  constexpr int kChunks = kRows * (kRowBytes / 16);
#pragma unroll
  for (int c = threadIdx.x; c < kChunks; c += kThreads) {
    const int row = c / (kRowBytes / 16), part = c % (kRowBytes / 16);
    const int grow = row0 + row, kb = kb0 + 16 * part;
    const bool valid = grow < total_rows && kb < row_bytes;
    const uint8_t* from = valid ? src + static_cast<int64_t>(grow) * row_bytes + kb : src;
    cp_async16(shared_address(tile + row * kStride + 16 * part), from, valid);
  }
}

template <Epilogue kEpi>
__device__ __forceinline__ void store_pair(const GemmArgs& args, int row, int col, int v0, int v1, float a_scale,
                                           int a_zero) {
  const int64_t idx = static_cast<int64_t>(row) * args.n + col;
  const bool has1 = col + 1 < args.n;
  if constexpr (kEpi == Epilogue::kInt32) {
    int32_t* out = static_cast<int32_t*>(args.out) + idx;
    if (args.paired_store) {
      *reinterpret_cast<int2*>(out) = make_int2(v0, v1);
    } else {
      out[0] = v0;
      if (has1) out[1] = v1;
    }
  } else {
    const float f0 = dequant(v0, a_scale, a_zero, __ldg(args.w_scale + col), __ldg(args.w_sum + col));
    const float f1 = has1 ? dequant(v1, a_scale, a_zero, __ldg(args.w_scale + col + 1), __ldg(args.w_sum + col + 1))
                          : 0.0f;
    if constexpr (kEpi == Epilogue::kFloat32) {
      float* out = static_cast<float*>(args.out) + idx;
      if (args.paired_store) {
        *reinterpret_cast<float2*>(out) = make_float2(f0, f1);
      } else {
        out[0] = f0;
        if (has1) out[1] = f1;
      }
    } else {
      __half* out = static_cast<__half*>(args.out) + idx;
      if (args.paired_store) {
        *reinterpret_cast<__half2*>(out) = __halves2half2(__float2half_rn(f0), __float2half_rn(f1));
      } else {
        out[0] = __float2half_rn(f0);
        if (has1) out[1] = __float2half_rn(f1);
      }
    }
  }
}

template <class Cfg, class Mma, Epilogue kEpi>
__global__ void __launch_bounds__(Cfg::kThreads) gemm_w4a4_kernel(const GemmArgs args) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  extern __shared__ uint4 smem_u4[];
  uint8_t* const sa = reinterpret_cast<uint8_t*>(smem_u4);  // [kStages][BM][kStride]
  uint8_t* const sb = sa + Cfg::kStages * Cfg::BM * kStride;  // [kStages][BN][kStride]
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int warp_m = warp / Cfg::kWarpsN, warp_n = warp % Cfg::kWarpsN;
  const int g = lane / 4, t = lane % 4;
  const int m0 = blockIdx.y * Cfg::BM, n0 = blockIdx.x * Cfg::BN;
  const int row_bytes = args.k / 2;
  const int k_tiles = (args.k + kBK - 1) / kBK;

  auto load_stage = [&](int stage, int kt) {
    load_tile<Cfg::BM, Cfg::kThreads>(sa + stage * Cfg::BM * kStride, args.a, m0, args.m, row_bytes, kt * kRowBytes);
    load_tile<Cfg::BN, Cfg::kThreads>(sb + stage * Cfg::BN * kStride, args.w, n0, args.n, row_bytes, kt * kRowBytes);
  };

  int acc[Cfg::MT][Cfg::NT][4] = {};

  // Prologue: stages 0 .. kStages-2 in flight, one commit group each (empty past k_tiles).
#pragma unroll
  for (int s = 0; s < Cfg::kStages - 1; ++s) {
    if (s < k_tiles) load_stage(s, s);
    cp_async_commit();
  }
  for (int kt = 0; kt < k_tiles; ++kt) {
    // Groups 0 .. kt are complete once at most kStages-2 remain pending. The barrier also tells
    // every thread that stage (kt-1) % kStages, about to be refilled, has been consumed.
    cp_async_wait<Cfg::kStages - 2>();
    __syncthreads();
    const int next = kt + Cfg::kStages - 1;
    if (next < k_tiles) load_stage(next % Cfg::kStages, next);
    cp_async_commit();

    const int stage = kt % Cfg::kStages;
    const uint8_t* a_s = sa + (stage * Cfg::BM + warp_m * Cfg::WM + g) * kStride + 4 * t;
    const uint8_t* b_s = sb + (stage * Cfg::BN + warp_n * Cfg::WN + g) * kStride + 4 * t;
#pragma unroll
    for (int ks = 0; ks < kBK / 64; ++ks) {  // k64 slices: bytes 32 ks .. 32 ks + 31 of the stage
      typename Mma::AFrag af[Cfg::MT];
      typename Mma::BFrag bf[Cfg::NT];
#pragma unroll
      for (int mt = 0; mt < Cfg::MT; ++mt) {
        const uint8_t* p = a_s + mt * 16 * kStride + 32 * ks;
        const uint32_t s4[4] = {lds32(p), lds32(p + 8 * kStride), lds32(p + 16), lds32(p + 8 * kStride + 16)};
        af[mt] = Mma::a_from_s4(s4);
      }
#pragma unroll
      for (int nt = 0; nt < Cfg::NT; ++nt) {
        const uint8_t* p = b_s + nt * 8 * kStride + 32 * ks;
        const uint32_t s4[2] = {lds32(p), lds32(p + 16)};
        bf[nt] = Mma::b_from_s4(s4);
      }
#pragma unroll
      for (int mt = 0; mt < Cfg::MT; ++mt) {
#pragma unroll
        for (int nt = 0; nt < Cfg::NT; ++nt) Mma::mma(acc[mt][nt], af[mt], bf[nt]);
      }
    }
  }
  cp_async_wait<0>();  // no copy may still target shared memory when the block exits

#pragma unroll
  for (int mt = 0; mt < Cfg::MT; ++mt) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = m0 + warp_m * Cfg::WM + mt * 16 + g + 8 * half;
      if (row >= args.m) continue;
      float a_scale = 0.0f;
      int a_zero = 0;
      if constexpr (kEpi != Epilogue::kInt32) {
        a_scale = __ldg(args.a_scale + row);
        a_zero = __ldg(args.a_zero + row);
      }
#pragma unroll
      for (int nt = 0; nt < Cfg::NT; ++nt) {
        const int col = n0 + warp_n * Cfg::WN + nt * 8 + 2 * t;
        if (col < args.n) store_pair<kEpi>(args, row, col, acc[mt][nt][2 * half], acc[mt][nt][2 * half + 1], a_scale, a_zero);
      }
    }
  }
#else
  __trap();  // built for an arch without int8/int4 mma.sync; the host refuses such devices first
#endif
}

template <class Cfg, class Mma, Epilogue kEpi>
cudaError_t launch_tile(const GemmArgs& args, cudaStream_t stream, const char* op) {
  const auto kernel = gemm_w4a4_kernel<Cfg, Mma, kEpi>;
  const unsigned int m_tiles = ceil_div(args.m, Cfg::BM);
  if (m_tiles > 65535u) return fail(cudaErrorInvalidValue, "%s: M=%d too large for one launch", op, args.m);
  cudaError_t err = reserve_shared_memory(kernel, Cfg::kSmemBytes, op);
  if (err != cudaSuccess) return err;
  const dim3 grid(ceil_div(args.n, Cfg::BN), m_tiles);
  kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(args);
  return check_launch(op);
}

template <class Mma, Epilogue kEpi>
cudaError_t launch_mma(const GemmArgs& args, cudaStream_t stream, const char* op) {
  if (args.m <= kSmallM) return launch_tile<SmallTile, Mma, kEpi>(args, stream, op);
  return launch_tile<LargeTile, Mma, kEpi>(args, stream, op);
}

template <Epilogue kEpi>
cudaError_t launch_gemm(const GemmArgs& args, RsqGemmPath path, cudaStream_t stream, const char* op) {
  int device = 0, major = 0, minor = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  if (err != cudaSuccess) return fail(err, "%s: querying the device failed: %s", op, cudaGetErrorString(err));
  if (major < 8) {
    return fail(cudaErrorNoKernelImageForDevice, "%s: needs compute capability 8.0 or newer (int mma.sync), got %d.%d",
                op, major, minor);
  }
  if (path == RsqGemmPath::kAuto) path = major >= 9 ? RsqGemmPath::kS8 : RsqGemmPath::kS4;
  switch (path) {
    case RsqGemmPath::kS4: return launch_mma<MmaS4, kEpi>(args, stream, op);
    case RsqGemmPath::kS8: return launch_mma<MmaS8, kEpi>(args, stream, op);
    case RsqGemmPath::kAuto: break;
  }
  return fail(cudaErrorInvalidValue, "%s: unknown gemm path %d", op, static_cast<int>(path));
}

cudaError_t check_gemm(const uint8_t* a, const uint8_t* w, const void* out, int64_t m, int64_t n, int64_t k,
                       const char* op) {
  cudaError_t err = check_k(k, op);
  if (err != cudaSuccess) return err;
  if (k >= (int64_t{1} << 24)) {
    return fail(cudaErrorInvalidValue, "%s: K=%lld must be < 2^24 (int32 accumulation)", op, static_cast<long long>(k));
  }
  if (m < 0 || n < 0 || m > INT32_MAX || n > INT32_MAX) {
    return fail(cudaErrorInvalidValue, "%s: shape (M=%lld, N=%lld) out of range", op, static_cast<long long>(m),
                static_cast<long long>(n));
  }
  if (m > 0 && n > 0 && (a == nullptr || w == nullptr || out == nullptr)) {
    return fail(cudaErrorInvalidValue, "%s: null operand", op);
  }
  err = check_aligned(a, 16, op, "a (packed activations)");
  if (err == cudaSuccess) err = check_aligned(w, 16, op, "w (packed weights)");
  return err;
}

GemmArgs make_args(const uint8_t* a, const uint8_t* w, void* out, int64_t m, int64_t n, int64_t k, size_t pair_bytes) {
  GemmArgs args{};
  args.a = a;
  args.w = w;
  args.out = out;
  args.m = static_cast<int>(m);
  args.n = static_cast<int>(n);
  args.k = static_cast<int>(k);
  args.paired_store = n % 2 == 0 && is_aligned(out, pair_bytes);
  return args;
}

}  // namespace
}  // namespace rsq

cudaError_t rsq_gemm_w4a4(const uint8_t* a, const float* a_scale, const int32_t* a_zero, const uint8_t* w,
                          const float* w_scale, const int32_t* w_sum, void* out, RsqDtype out_dtype, int64_t m,
                          int64_t n, int64_t k, RsqGemmPath path, cudaStream_t stream) {
  using namespace rsq;
  const char* op = "gemm_w4a4";
  cudaError_t err = check_gemm(a, w, out, m, n, k, op);
  if (err != cudaSuccess) return err;
  if (m == 0 || n == 0) return cudaSuccess;
  if (a_scale == nullptr || a_zero == nullptr || w_scale == nullptr || w_sum == nullptr) {
    return fail(cudaErrorInvalidValue, "%s: null scale, zero point or weight sum", op);
  }
  switch (out_dtype) {
    case RsqDtype::kFloat32: {
      GemmArgs args = make_args(a, w, out, m, n, k, sizeof(float2));
      args.a_scale = a_scale;
      args.a_zero = a_zero;
      args.w_scale = w_scale;
      args.w_sum = w_sum;
      return launch_gemm<Epilogue::kFloat32>(args, path, stream, op);
    }
    case RsqDtype::kFloat16: {
      GemmArgs args = make_args(a, w, out, m, n, k, sizeof(__half2));
      args.a_scale = a_scale;
      args.a_zero = a_zero;
      args.w_scale = w_scale;
      args.w_sum = w_sum;
      return launch_gemm<Epilogue::kFloat16>(args, path, stream, op);
    }
    case RsqDtype::kBFloat16: break;  // gemm_int8_sm90 only
  }
  return fail(cudaErrorInvalidValue, "%s: unsupported output dtype %d", op, static_cast<int>(out_dtype));
}

cudaError_t rsq_gemm_int4(const uint8_t* a, const uint8_t* w, int32_t* out, int64_t m, int64_t n, int64_t k,
                          RsqGemmPath path, cudaStream_t stream) {
  using namespace rsq;
  const char* op = "gemm_int4";
  cudaError_t err = check_gemm(a, w, out, m, n, k, op);
  if (err != cudaSuccess) return err;
  if (m == 0 || n == 0) return cudaSuccess;
  return launch_gemm<Epilogue::kInt32>(make_args(a, w, out, m, n, k, sizeof(int2)), path, stream, op);
}
