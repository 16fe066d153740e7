// quantize_act: one block per row. Pass 1 reduces the row's min and max, pass 2 re-reads the row
// (from L1/L2) and writes one packed 32-bit word per 8 values. Each thread handles chunks of 8
// consecutive values (two float4 or one 16-byte half load), chunk c at thread c mod blockDim.
// Tuning left for later: keep the row in registers between the passes, several rows per block for
// small k.
#include "common.cuh"

namespace rsq {
namespace {

template <typename T>
__global__ void __launch_bounds__(256)
quantize_act_kernel(const T* __restrict__ x, int64_t k, float clip, uint32_t* __restrict__ packed,
                    float* __restrict__ scale, int32_t* __restrict__ zero) {
  __shared__ float scratch[64];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * k;
  const int chunks = static_cast<int>(k / 8);

  float lo = INFINITY, hi = -INFINITY;
  for (int c = threadIdx.x; c < chunks; c += blockDim.x) {
    float v[8];
    load8(xr + 8 * c, v);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      lo = fminf(lo, v[i]);
      hi = fmaxf(hi, v[i]);
    }
  }
  block_min_max(lo, hi, scratch);
  const ActGrid grid = act_grid(lo, hi, clip);

  uint32_t* pr = packed + row * (k / 8);
  for (int c = threadIdx.x; c < chunks; c += blockDim.x) {
    float v[8];
    load8(xr + 8 * c, v);
    pr[c] = quantize8(v, grid);
  }
  if (threadIdx.x == 0) {
    scale[row] = grid.scale;
    zero[row] = static_cast<int32_t>(grid.zero) - 8;
  }
}

}  // namespace
}  // namespace rsq

cudaError_t rsq_quantize_act(const void* x, RsqDtype x_dtype, int64_t m, int64_t k, float clip, uint8_t* packed,
                             float* scale, int32_t* zero, cudaStream_t stream) {
  using namespace rsq;
  const char* op = "quantize_act";
  cudaError_t err = check_k(k, op);
  if (err != cudaSuccess) return err;
  if (m < 0 || m > INT32_MAX) return fail(cudaErrorInvalidValue, "%s: M=%lld out of range", op, static_cast<long long>(m));
  if (k / 8 > INT32_MAX) return fail(cudaErrorInvalidValue, "%s: K=%lld too large", op, static_cast<long long>(k));
  if (!(clip > 0.0f && clip <= 1.0f)) return fail(cudaErrorInvalidValue, "%s: clip_ratio=%g must be in (0, 1]", op, clip);
  err = check_aligned(x, 16, op, "x");
  if (err == cudaSuccess) err = check_aligned(packed, 4, op, "packed");
  if (err != cudaSuccess) return err;
  if (m == 0) return cudaSuccess;
  // One chunk of 8 per thread up to 256 threads; at least one warp (k >= 32 gives >= 4 chunks).
  const int64_t chunks = k / 8;
  const unsigned int threads = chunks >= 256 ? 256u : 32u * ceil_div(chunks, 32);
  return dispatch_dtype(x_dtype, op, [&](auto tag) {
    using T = decltype(tag);
    quantize_act_kernel<T><<<static_cast<unsigned int>(m), threads, 0, stream>>>(
        static_cast<const T*>(x), k, clip, reinterpret_cast<uint32_t*>(packed), scale, zero);
    return check_launch(op);
  });
}
