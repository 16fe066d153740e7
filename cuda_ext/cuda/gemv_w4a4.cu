// W4A4 decode GEMV (M <= 16 tokens): the packed int4 weights streamed once with 16-byte loads and as
// many blocks as the GPU needs to keep its memory busy (split-K), int8 dot products (dp4a) on the
// nibbles, exact int32 sums.
//
// A packed 32-bit word holds 8 codes, byte j = (c[2j] & 0xF) | (c[2j+1] << 4). Its low nibbles
// (w & 0x0F0F0F0F) are the even-k codes and its high nibbles the odd-k codes, each as 4 unsigned bytes;
// __vsub4(n ^ 0x08080808, 0x08080808) sign-extends every byte without borrows between bytes. Splitting
// activations and weights the same way, sum_k a w = dp4a(a_even, w_even) + dp4a(a_odd, w_odd).
//
// Grid: (ceil(n / 32) row blocks, split_k K chunks); 8 warps per block, 4 weight rows per warp, each
// lane a 16-byte (32-code) slice per step, every token's partial sum in registers. One chunk: the warp
// sums are the dot products and the block applies the epilogue; several: they are added to an int32
// workspace with atomicAdd (integer addition is associative: the same exact sums in any order) and a
// second kernel applies the epilogue. Epilogue: float(acc - a_zero * w_sum) * a_scale * w_scale, the
// CPU reference's float arithmetic, float32 or float16 out (float32: the same bits).
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "common.cuh"
#include "w4a4.cuh"

namespace rsq {
namespace {

constexpr int kWarps = 8;
constexpr int kRowsPerWarp = 4;
constexpr int kRowsPerBlock = kWarps * kRowsPerWarp;
constexpr int kMaxTokens = 16;
constexpr int kCodesPerStep = 32;  // one 16-byte load of packed codes

__device__ __forceinline__ int sext_nibbles(unsigned int nibbles) {
  return static_cast<int>(__vsub4(nibbles ^ 0x08080808u, 0x08080808u));
}

// sum over the 32 codes of one 16-byte step: a and w as 4 packed words each
__device__ __forceinline__ int dot32(const uint4& a, const uint4& w) {
  const unsigned int aw[4] = {a.x, a.y, a.z, a.w}, ww[4] = {w.x, w.y, w.z, w.w};
  int acc = 0;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    acc = __dp4a(sext_nibbles(aw[i] & 0x0F0F0F0Fu), sext_nibbles(ww[i] & 0x0F0F0F0Fu), acc);
    acc = __dp4a(sext_nibbles((aw[i] >> 4) & 0x0F0F0F0Fu), sext_nibbles((ww[i] >> 4) & 0x0F0F0F0Fu), acc);
  }
  return acc;
}

template <typename OutT>
__device__ __forceinline__ void store_out(OutT* out, int64_t idx, int acc, const float* a_scale,
                                          const int32_t* a_zero, const float* w_scale, const int32_t* w_sum, int t,
                                          int row) {
  const float y = dequant(acc, a_scale[t], a_zero[t], w_scale[row], w_sum[row]);
  if constexpr (sizeof(OutT) == 4) {
    out[idx] = y;
  } else {
    out[idx] = __float2half_rn(y);
  }
}

// steps: K / 32 (16-byte steps per row); each chunk of the split covers [chunk * per, min(steps, ...)).
template <typename OutT>
__global__ void __launch_bounds__(kWarps * 32)
gemv_w4a4_kernel(const uint8_t* __restrict__ a, const float* __restrict__ a_scale, const int32_t* __restrict__ a_zero,
                 const uint8_t* __restrict__ w, const float* __restrict__ w_scale, const int32_t* __restrict__ w_sum,
                 OutT* __restrict__ out, int32_t* __restrict__ partial, int m, int n, int steps, int per_chunk) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int s0 = blockIdx.y * per_chunk, s1 = min(steps, s0 + per_chunk);
  const int64_t row_bytes = static_cast<int64_t>(steps) * 16;
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    const int row = blockIdx.x * kRowsPerBlock + warp * kRowsPerWarp + rr;
    if (row >= n) break;  // warp-uniform
    int acc[kMaxTokens];
#pragma unroll
    for (int t = 0; t < kMaxTokens; ++t) acc[t] = 0;
    const uint8_t* w_row = w + row * row_bytes;
    for (int s = s0 + lane; s < s1; s += 32) {
      const uint4 wv = __ldg(reinterpret_cast<const uint4*>(w_row + static_cast<int64_t>(s) * 16));
#pragma unroll
      for (int t = 0; t < kMaxTokens; ++t) {
        if (t < m) {
          const uint4 av = __ldg(reinterpret_cast<const uint4*>(a + t * row_bytes + static_cast<int64_t>(s) * 16));
          acc[t] += dot32(av, wv);
        }
      }
    }
#pragma unroll
    for (int t = 0; t < kMaxTokens; ++t) {
      if (t >= m) break;
      int v = acc[t];
#pragma unroll
      for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
      if (lane == 0) {
        const int64_t idx = static_cast<int64_t>(t) * n + row;
        if (partial != nullptr) {
          atomicAdd(partial + idx, v);
        } else {
          store_out(out, idx, v, a_scale, a_zero, w_scale, w_sum, t, row);
        }
      }
    }
  }
}

template <typename OutT>
__global__ void __launch_bounds__(256)
gemv_epilogue_kernel(const int32_t* __restrict__ partial, const float* __restrict__ a_scale,
                     const int32_t* __restrict__ a_zero, const float* __restrict__ w_scale,
                     const int32_t* __restrict__ w_sum, OutT* __restrict__ out, int m, int n) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= static_cast<int64_t>(m) * n) return;
  const int t = static_cast<int>(idx / n), row = static_cast<int>(idx % n);
  store_out(out, idx, partial[idx], a_scale, a_zero, w_scale, w_sum, t, row);
}

}  // namespace
}  // namespace rsq

int rsq_gemv_split_k(int64_t n, int64_t k, int sm_count) {
  const int64_t row_blocks = (n + rsq::kRowsPerBlock - 1) / rsq::kRowsPerBlock;
  const int64_t steps = k / rsq::kCodesPerStep;
  // about four blocks per SM in flight; each chunk keeps at least 32 steps (one per lane)
  int64_t split = (4 * static_cast<int64_t>(sm_count) + row_blocks - 1) / row_blocks;
  split = split < 1 ? 1 : split;
  const int64_t most = steps / 32 < 1 ? 1 : steps / 32;
  return static_cast<int>(split > most ? most : split);
}

size_t rsq_gemv_workspace_bytes(int64_t m, int64_t n, int split_k) {
  return split_k > 1 ? sizeof(int32_t) * static_cast<size_t>(m * n) : 0;
}

cudaError_t rsq_gemv_w4a4(const uint8_t* a, const float* a_scale, const int32_t* a_zero, const uint8_t* w,
                          const float* w_scale, const int32_t* w_sum, void* out, RsqDtype out_dtype, int64_t m,
                          int64_t n, int64_t k, int split_k, void* workspace, size_t workspace_bytes,
                          cudaStream_t stream) {
  using namespace rsq;
  const char* op = "gemv_w4a4";
  cudaError_t err = check_k(k, op);
  if (err != cudaSuccess) return err;
  if (m < 1 || m > kMaxTokens || n < 1 || n > INT32_MAX / 2 || k >= (int64_t(1) << 24)) {
    return fail(cudaErrorInvalidValue, "%s: M=%lld must be in [1, %d] (decode), N=%lld, K=%lld < 2^24", op,
                static_cast<long long>(m), kMaxTokens, static_cast<long long>(n), static_cast<long long>(k));
  }
  if ((err = check_aligned(a, 16, op, "a")) != cudaSuccess || (err = check_aligned(w, 16, op, "w")) != cudaSuccess) {
    return err;
  }
  const int steps = static_cast<int>(k / kCodesPerStep);
  if (split_k < 1 || split_k > steps) {
    return fail(cudaErrorInvalidValue, "%s: split_k=%d must be in [1, K/32=%d]", op, split_k, steps);
  }
  const size_t need = rsq_gemv_workspace_bytes(m, n, split_k);
  if (need > 0 && (workspace == nullptr || workspace_bytes < need)) {
    return fail(cudaErrorInvalidValue, "%s: workspace of %zu bytes given, %zu needed", op, workspace_bytes, need);
  }
  const int per_chunk = (steps + split_k - 1) / split_k;
  const dim3 grid(ceil_div(n, kRowsPerBlock), static_cast<unsigned int>((steps + per_chunk - 1) / per_chunk));
  int32_t* partial = need > 0 ? static_cast<int32_t*>(workspace) : nullptr;
  if (partial != nullptr) {
    err = cudaMemsetAsync(partial, 0, need, stream);
    if (err != cudaSuccess) return fail(err, "%s: clearing the workspace failed: %s", op, cudaGetErrorString(err));
  }
  const int mi = static_cast<int>(m), ni = static_cast<int>(n);
  auto launch = [&](auto tag) -> cudaError_t {
    using OutT = decltype(tag);
    OutT* o = static_cast<OutT*>(out);
    gemv_w4a4_kernel<OutT><<<grid, kWarps * 32, 0, stream>>>(a, a_scale, a_zero, w, w_scale, w_sum, o, partial, mi,
                                                             ni, steps, per_chunk);
    cudaError_t e = check_launch(op);
    if (e != cudaSuccess || partial == nullptr) return e;
    gemv_epilogue_kernel<OutT><<<ceil_div(m * n, 256), 256, 0, stream>>>(partial, a_scale, a_zero, w_scale, w_sum, o,
                                                                          mi, ni);
    return check_launch(op);
  };
  switch (out_dtype) {
    case RsqDtype::kFloat32: return launch(float{});
    case RsqDtype::kFloat16: return launch(__half{});
    case RsqDtype::kBFloat16: break;
  }
  return fail(cudaErrorInvalidValue, "%s: unsupported output dtype %d", op, static_cast<int>(out_dtype));
}
