// hadamard and hadamard_quantize_act: one block per row, the row held in shared memory as float32.
//
// A row of n = m * p values is viewed as X (m, p). Steps, each separated by a barrier:
//   1. load (element i at thread i mod blockDim: coalesced for any n);
//   2. butterflies over each block of p, h = 1, 2, 4, ..., p/2: (a, b) -> (a + b, a - b);
//   3. m > 1: Y = base^T X, summed over l = 0 .. m-1 in order;
//      m <= 32: a thread owns whole columns j of X, reads X[:, j] into registers and writes
//               Y[:, j] in place (no other thread touches column j);
//      m > 32 (e.g. 40, 172, 344): Y goes to a second shared buffer of n floats;
//   4. / sqrt(n) (a correctly rounded division, as the CPU does: x * (1/sqrt(n)) differs by 1 ulp
//      for most n that are not a power of 4), then store (hadamard) or quantize + pack (hadamard_quantize_act, the same
//      arithmetic as quantize_act on the float32 Y, so no float16 rounding between the two).
// The operation order is the CPU reference's and no FMA is formed (explicit _rn intrinsics), so
// float32 results match it bit for bit. Tuning left for later: the first butterfly stages in
// registers, bank-conflict-free strides for h < 32, tensor cores for base^T X at large m.
#include <cmath>

#include "common.cuh"

namespace rsq {
namespace {

constexpr int kMaxRegisterM = 32;

struct HadamardArgs {
  const float* base;  // (m, m), device
  int m;              // base order
  int p;              // power of two, n = m * p
  int n;
  float norm;         // sqrt(n) rounded to float32 from a double sqrt, as the CPU reference computes it
  float clip;         // quantizer only
  uint32_t* packed;   // quantizer only: (rows, n / 8) words
  float* scale;
  int32_t* zero;
};

// Steps 1-3 on this block's row; returns the buffer holding Y (still to be divided by `post`).
template <typename T, bool kWideBase>
__device__ __forceinline__ const float* transform_row(const T* __restrict__ xr, const HadamardArgs& args, float* buf,
                                                      float* out, float* base_s, float& post) {
  const int n = args.n, m = args.m, p = args.p;
  for (int i = threadIdx.x; i < n; i += blockDim.x) buf[i] = to_float(xr[i]);
  if (!kWideBase && m > 1) {  // small base: copy to shared memory
    for (int i = threadIdx.x; i < m * m; i += blockDim.x) base_s[i] = args.base[i];
  }
  __syncthreads();

  // Blocks of p are contiguous and h < p, so pair q of the whole row is (j, j + h) with
  // j = (q / h) * 2h + q % h, never straddling two blocks.
  for (int h = 1; h < p; h *= 2) {
    for (int q = threadIdx.x; q < n / 2; q += blockDim.x) {
      const int j = (q / h) * 2 * h + q % h;
      const float a = buf[j], b = buf[j + h];
      buf[j] = __fadd_rn(a, b);
      buf[j + h] = __fsub_rn(a, b);
    }
    __syncthreads();
  }

  if (m == 1) {
    post = args.norm;
    return buf;
  }
  post = 1.0f;
  if constexpr (!kWideBase) {
    for (int j = threadIdx.x; j < p; j += blockDim.x) {
      float col[kMaxRegisterM];
#pragma unroll
      for (int l = 0; l < kMaxRegisterM; ++l) col[l] = l < m ? buf[l * p + j] : 0.0f;
      for (int i = 0; i < m; ++i) {
        float acc = 0.0f;
#pragma unroll
        for (int l = 0; l < kMaxRegisterM; ++l) {
          if (l < m) acc = __fadd_rn(acc, __fmul_rn(base_s[l * m + i], col[l]));
        }
        buf[i * p + j] = __fdiv_rn(acc, args.norm);
      }
    }
    __syncthreads();
    return buf;
  } else {
    // Consecutive threads take consecutive j of one i (for p >= 32): the base reads are a broadcast.
    for (int idx = threadIdx.x; idx < n; idx += blockDim.x) {
      const int i = idx / p, j = idx % p;
      float acc = 0.0f;
      for (int l = 0; l < m; ++l) acc = __fadd_rn(acc, __fmul_rn(__ldg(args.base + l * m + i), buf[l * p + j]));
      out[idx] = __fdiv_rn(acc, args.norm);
    }
    __syncthreads();
    return out;
  }
}

// Dynamic shared memory: [buf: n][out: n if kWideBase][base: m*m if !kWideBase]; scratch is static.
template <typename T, bool kWideBase>
__global__ void __launch_bounds__(512) hadamard_kernel(const T* x, T* y, HadamardArgs args) {
  extern __shared__ float4 smem_f4[];
  float* buf = reinterpret_cast<float*>(smem_f4);
  float* out = buf + args.n;
  float* base_s = kWideBase ? nullptr : buf + args.n;
  const int64_t row = blockIdx.x;
  float post = 1.0f;
  const float* res = transform_row<T, kWideBase>(x + row * args.n, args, buf, out, base_s, post);
  T* yr = y + row * args.n;
  for (int i = threadIdx.x; i < args.n; i += blockDim.x) yr[i] = from_float<T>(__fdiv_rn(res[i], post));
}

template <typename T, bool kWideBase>
__global__ void __launch_bounds__(512) hadamard_quantize_kernel(const T* __restrict__ x, HadamardArgs args) {
  extern __shared__ float4 smem_f4[];
  __shared__ float scratch[64];
  float* buf = reinterpret_cast<float*>(smem_f4);
  float* out = buf + args.n;
  float* base_s = kWideBase ? nullptr : buf + args.n;
  const int64_t row = blockIdx.x;
  float post = 1.0f;
  const float* res = transform_row<T, kWideBase>(x + row * args.n, args, buf, out, base_s, post);

  const int chunks = args.n / 8;
  float lo = INFINITY, hi = -INFINITY;
  for (int c = threadIdx.x; c < chunks; c += blockDim.x) {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const float v = __fdiv_rn(res[8 * c + i], post);
      lo = fminf(lo, v);
      hi = fmaxf(hi, v);
    }
  }
  block_min_max(lo, hi, scratch);
  const ActGrid grid = act_grid(lo, hi, args.clip);
  uint32_t* pr = args.packed + row * chunks;
  for (int c = threadIdx.x; c < chunks; c += blockDim.x) {
    float v[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = __fdiv_rn(res[8 * c + i], post);
    pr[c] = quantize8(v, grid);
  }
  if (threadIdx.x == 0) {
    args.scale[row] = grid.scale;
    args.zero[row] = static_cast<int32_t>(grid.zero) - 8;
  }
}

cudaError_t check_hadamard(int64_t rows, int64_t n, const float* base, int64_t bm, const char* op) {
  if (rows < 0 || rows > INT32_MAX) {
    return fail(cudaErrorInvalidValue, "%s: rows=%lld out of range", op, static_cast<long long>(rows));
  }
  if (n <= 0 || n > (1 << 24)) return fail(cudaErrorInvalidValue, "%s: n=%lld out of range", op, static_cast<long long>(n));
  if (bm < 1 || n % bm != 0) {
    return fail(cudaErrorInvalidValue, "%s: n=%lld is not a multiple of the base order %lld", op,
                static_cast<long long>(n), static_cast<long long>(bm));
  }
  const int64_t p = n / bm;
  if ((p & (p - 1)) != 0) {
    return fail(cudaErrorInvalidValue, "%s: n / m = %lld must be a power of two", op, static_cast<long long>(p));
  }
  if (base == nullptr && bm > 1) return fail(cudaErrorInvalidValue, "%s: base is null", op);
  return cudaSuccess;
}

HadamardArgs make_args(int64_t n, const float* base, int64_t bm) {
  HadamardArgs args{};
  args.base = base;
  args.m = static_cast<int>(bm);
  args.p = static_cast<int>(n / bm);
  args.n = static_cast<int>(n);
  args.norm = static_cast<float>(std::sqrt(static_cast<double>(n)));
  return args;
}

size_t shared_bytes(const HadamardArgs& args, bool wide) {
  const size_t n = static_cast<size_t>(args.n), m = static_cast<size_t>(args.m);
  return sizeof(float) * (wide ? 2 * n : n + (m > 1 ? m * m : 0));
}

unsigned int block_threads(int64_t n) {
  const int64_t warps = (n + 8 * 32 - 1) / (8 * 32);  // about 8 values per thread
  return 32u * static_cast<unsigned int>(warps < 2 ? 2 : (warps > 16 ? 16 : warps));
}

// Launch kernel<T, wide> for the row count, with the shared memory it needs.
template <typename T, bool kWide, typename Kernel, typename... Extra>
cudaError_t launch(Kernel kernel, int64_t rows, const HadamardArgs& args, cudaStream_t stream, const char* op,
                   Extra... extra) {
  const size_t smem = shared_bytes(args, kWide);
  cudaError_t err = reserve_shared_memory(kernel, smem, op);
  if (err != cudaSuccess) return err;
  kernel<<<static_cast<unsigned int>(rows), block_threads(args.n), smem, stream>>>(extra..., args);
  return check_launch(op);
}

}  // namespace
}  // namespace rsq

cudaError_t rsq_hadamard(const void* x, void* y, RsqDtype dtype, int64_t rows, int64_t n, const float* base,
                         int64_t bm, cudaStream_t stream) {
  using namespace rsq;
  const char* op = "hadamard";
  cudaError_t err = check_hadamard(rows, n, base, bm, op);
  if (err != cudaSuccess) return err;
  if (rows == 0) return cudaSuccess;
  const HadamardArgs args = make_args(n, base, bm);
  return dispatch_dtype(dtype, op, [&](auto tag) {
    using T = decltype(tag);
    const T* xs = static_cast<const T*>(x);
    T* ys = static_cast<T*>(y);
    if (bm > kMaxRegisterM) return launch<T, true>(hadamard_kernel<T, true>, rows, args, stream, op, xs, ys);
    return launch<T, false>(hadamard_kernel<T, false>, rows, args, stream, op, xs, ys);
  });
}

cudaError_t rsq_hadamard_quantize_act(const void* x, RsqDtype x_dtype, int64_t rows, int64_t n, const float* base,
                                      int64_t bm, float clip, uint8_t* packed, float* scale, int32_t* zero,
                                      cudaStream_t stream) {
  using namespace rsq;
  const char* op = "hadamard_quantize_act";
  cudaError_t err = check_hadamard(rows, n, base, bm, op);
  if (err == cudaSuccess) err = check_k(n, op);
  if (err == cudaSuccess) err = check_aligned(packed, 4, op, "packed");
  if (err != cudaSuccess) return err;
  if (!(clip > 0.0f && clip <= 1.0f)) return fail(cudaErrorInvalidValue, "%s: clip_ratio=%g must be in (0, 1]", op, clip);
  if (rows == 0) return cudaSuccess;
  HadamardArgs args = make_args(n, base, bm);
  args.clip = clip;
  args.packed = reinterpret_cast<uint32_t*>(packed);
  args.scale = scale;
  args.zero = zero;
  return dispatch_dtype(x_dtype, op, [&](auto tag) {
    using T = decltype(tag);
    const T* xs = static_cast<const T*>(x);
    if (bm > kMaxRegisterM) return launch<T, true>(hadamard_quantize_kernel<T, true>, rows, args, stream, op, xs);
    return launch<T, false>(hadamard_quantize_kernel<T, false>, rows, args, stream, op, xs);
  });
}
