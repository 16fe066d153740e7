// Helpers shared by the .cu files (not part of the host API): error reporting, dtype dispatch,
// float/half conversion, int4 sign extension, block reductions, and the activation quantizer's
// per-row grid, whose float32 arithmetic must match the CPU reference bit for bit.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstring>

#include "w4a4.cuh"

namespace rsq {

constexpr int64_t kAlignK = 32;  // K granularity of the int4 layout (DESIGN §3)

// ---- host side --------------------------------------------------------------------------------

// Records the message for rsq_last_error() and returns `code`.
__attribute__((format(printf, 2, 3))) inline cudaError_t fail(cudaError_t code, const char* fmt, ...) {
  va_list args;
  va_start(args, fmt);
  vsnprintf(rsq_error_buffer(), 512, fmt, args);
  va_end(args);
  return code;
}

// After a launch: the launch error (bad configuration, no kernel image for this GPU, ...) if any.
inline cudaError_t check_launch(const char* op) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return fail(err, "%s: kernel launch failed: %s", op, cudaGetErrorString(err));
  return cudaSuccess;
}

inline bool is_aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

inline cudaError_t check_k(int64_t k, const char* op) {
  if (k <= 0 || k % kAlignK != 0) {
    return fail(cudaErrorInvalidValue, "%s: K=%lld must be a positive multiple of %lld (int4 layout)", op,
                static_cast<long long>(k), static_cast<long long>(kAlignK));
  }
  return cudaSuccess;
}

inline cudaError_t check_aligned(const void* p, size_t bytes, const char* op, const char* name) {
  if (!is_aligned(p, bytes)) {
    return fail(cudaErrorMisalignedAddress, "%s: %s must be %zu-byte aligned", op, name, bytes);
  }
  return cudaSuccess;
}

// Opt in to `bytes` of dynamic shared memory (above 48 KiB needs it), or say why the device cannot
// give that much next to the kernel's static shared memory.
template <typename Kernel>
cudaError_t reserve_shared_memory(Kernel kernel, size_t bytes, const char* op) {
  int device = 0, limit = 0;
  cudaFuncAttributes attributes{};
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err == cudaSuccess) err = cudaFuncGetAttributes(&attributes, kernel);
  if (err != cudaSuccess) return fail(err, "%s: querying the device failed: %s", op, cudaGetErrorString(err));
  if (bytes + attributes.sharedSizeBytes > static_cast<size_t>(limit)) {
    return fail(cudaErrorInvalidValue, "%s: needs %zu bytes of shared memory per block, the device allows %d", op,
                bytes + attributes.sharedSizeBytes, limit);
  }
  // Set on every call: the attribute is per device, and setting it costs about a microsecond.
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  if (err != cudaSuccess) return fail(err, "%s: cudaFuncSetAttribute failed: %s", op, cudaGetErrorString(err));
  return cudaSuccess;
}

// Calls f(float{}) or f(__half{}) so one generic lambda instantiates the kernel per element type.
template <typename F>
cudaError_t dispatch_dtype(RsqDtype dtype, const char* op, F&& f) {
  switch (dtype) {
    case RsqDtype::kFloat32: return f(float{});
    case RsqDtype::kFloat16: return f(__half{});
    case RsqDtype::kBFloat16: break;  // gemm_int8_sm90's output only
  }
  return fail(cudaErrorInvalidValue, "%s: unsupported dtype %d", op, static_cast<int>(dtype));
}

inline unsigned int ceil_div(int64_t a, int64_t b) { return static_cast<unsigned int>((a + b - 1) / b); }

// ---- device side ------------------------------------------------------------------------------

// The dequant epilogue of gemm_w4a4 and gemv_w4a4: float(acc - a_zero * w_sum) * a_scale * w_scale, each
// product rounded on its own (no FMA), as the CPU reference computes it.
__device__ __forceinline__ float dequant(int acc, float a_scale, int a_zero, float w_scale, int w_sum) {
  return __fmul_rn(__fmul_rn(__int2float_rn(acc - a_zero * w_sum), a_scale), w_scale);
}

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

// 8 consecutive elements from a 16-byte aligned address.
__device__ __forceinline__ void load8(const float* p, float (&v)[8]) {
  const float4 lo = *reinterpret_cast<const float4*>(p);
  const float4 hi = *reinterpret_cast<const float4*>(p + 4);
  v[0] = lo.x; v[1] = lo.y; v[2] = lo.z; v[3] = lo.w;
  v[4] = hi.x; v[5] = hi.y; v[6] = hi.z; v[7] = hi.w;
}
__device__ __forceinline__ void load8(const __half* p, float (&v)[8]) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    __half2 pair;
    memcpy(&pair, &words[i], sizeof(pair));
    const float2 f = __half22float2(pair);
    v[2 * i] = f.x;
    v[2 * i + 1] = f.y;
  }
}

// Sign-extend the four 4-bit values held in the low nibbles of the bytes of x (high nibbles zero)
// to four int8 bytes: a byte with bit 3 set gets 0xF0 or-ed in (0x08 * 0x1E = 0xF0, no carries).
__device__ __forceinline__ uint32_t sext_nibbles(uint32_t x) { return x | ((x & 0x08080808u) * 0x1Eu); }

// The 8 int4 values of a packed word (nibble i = element i) as int8: `even` holds elements
// 0, 2, 4, 6 (bytes 0..3), `odd` elements 1, 3, 5, 7.
__device__ __forceinline__ void split_int4x8(uint32_t w, uint32_t& even, uint32_t& odd) {
  even = sext_nibbles(w & 0x0F0F0F0Fu);
  odd = sext_nibbles((w >> 4) & 0x0F0F0F0Fu);
}

__device__ __forceinline__ float warp_min(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v = fminf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// Block-wide min and max; every thread gets the result. `scratch` holds 64 floats. blockDim.x must
// be a multiple of 32. Ends with a barrier, so scratch may be reused right after.
__device__ __forceinline__ void block_min_max(float& lo, float& hi, float* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  lo = warp_min(lo);
  hi = warp_max(hi);
  if (lane == 0) {
    scratch[warp] = lo;
    scratch[32 + warp] = hi;
  }
  __syncthreads();
  lo = scratch[0];
  hi = scratch[32];
  for (int i = 1; i < warps; ++i) {
    lo = fminf(lo, scratch[i]);
    hi = fmaxf(hi, scratch[32 + i]);
  }
  __syncthreads();
}

// The per-row grid of the asymmetric 4-bit activation quantizer. Explicit _rn intrinsics: the
// compiler must not contract (xmax - xmin) into an FMA with the clip products, or the codes would
// differ from the CPU's. The min/max of a row is order-independent, so the grid is bit-exact.
struct ActGrid {
  float scale;
  float zero;  // in 0..15, an integer value
};

__device__ __forceinline__ ActGrid act_grid(float row_min, float row_max, float clip) {
  const float xmin = __fmul_rn(fminf(row_min, 0.0f), clip);
  const float xmax = __fmul_rn(fmaxf(row_max, 0.0f), clip);
  const float scale = fmaxf(__fdiv_rn(__fsub_rn(xmax, xmin), 15.0f), 1e-8f);
  return {scale, rintf(__fdiv_rn(-xmin, scale))};
}

// Quantize 8 consecutive values to one packed word (nibble i = code of value i, code = q - 8).
__device__ __forceinline__ uint32_t quantize8(const float (&v)[8], ActGrid grid) {
  uint32_t word = 0;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const float q = fminf(fmaxf(__fadd_rn(rintf(__fdiv_rn(v[i], grid.scale)), grid.zero), 0.0f), 15.0f);
    const int code = static_cast<int>(q) - 8;
    word |= static_cast<uint32_t>(code & 0xF) << (4 * i);
  }
  return word;
}

}  // namespace rsq
