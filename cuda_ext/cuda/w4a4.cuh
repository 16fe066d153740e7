// Host API of the W4A4 CUDA ops. Plain C++ (no torch, no device code): the .cu files implement it,
// torch_bindings.cpp wraps it, and any other C++ caller can link against it.
//
// Layout (DESIGN §3): int4 two's complement, two per byte, K-contiguous for both operands
// (activations M x K -> uint8 M x K/2, weights N x K -> uint8 N x K/2), low nibble = even k.
// K must be a positive multiple of 32. All pointers are device pointers to contiguous row-major
// arrays; vectorized loads need the alignments stated per function (fresh CUDA allocations satisfy
// them). The ops and their arithmetic are those of the CPU reference, cuda_ext/cpu/w4a4_cpu.cpp.
//
// Every function returns cudaSuccess, or an error code with a one-line message naming the op and
// the bad argument in rsq_last_error() (per host thread). Kernels run asynchronously on `stream`.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

enum class RsqDtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };  // bf16: gemm_int8_sm90's output only

// Which tensor-core path gemm_w4a4 / gemm_int4 use. kAuto picks by compute capability: kS4 (int4
// mma m16n8k64) on sm_80..sm_89, kS8 (int4 sign-extended to int8 in registers, int8 mma m16n8k32)
// on sm_90+, where there is no int4 MMA. Forcing the other path is for validation only (both paths
// are built for every arch >= sm_80; int4 mma on Hopper is not a fast path).
enum class RsqGemmPath : int { kAuto = 0, kS4 = 1, kS8 = 2 };

// The message of the last failed call on this host thread ("" if none failed yet).
inline char* rsq_error_buffer() {
  static thread_local char buffer[512] = {0};
  return buffer;
}
inline const char* rsq_last_error() { return rsq_error_buffer(); }

// codes int8 (rows, k) in [-8, 7] -> packed uint8 (rows, k/2), byte j = (c[2j] & 0xF) | (c[2j+1] << 4).
// If `out_of_range` (a device int, may be null) is given, the kernel sets it to 1 when a code lies
// outside [-8, 7] (such codes are packed as their low nibble). codes 8-byte, packed 4-byte aligned.
cudaError_t rsq_pack_int4(const int8_t* codes, uint8_t* packed, int64_t rows, int64_t k, int* out_of_range,
                          cudaStream_t stream);

// packed uint8 (rows, k/2) -> int8 codes (rows, k), sign-extended. packed 4-byte, codes 8-byte aligned.
cudaError_t rsq_unpack_int4(const uint8_t* packed, int8_t* codes, int64_t rows, int64_t k, cudaStream_t stream);

// Per-token asymmetric int4, bit-exact with the fake quantizer (quantizers.quantize_asym, bits=4),
// computed in float32 per row of x (m, k):
//   xmin = min(min_k x, 0) * clip, xmax = max(max_k x, 0) * clip,
//   scale = max((xmax - xmin) / 15, 1e-8), zero = rint(-xmin / scale), q = clamp(rint(x / scale) + zero, 0, 15)
// -> packed codes q - 8 (m, k/2), scale float32 (m), zero_s = zero - 8 int32 (m), so x ~ scale * (code - zero_s).
// x 16-byte aligned, packed 4-byte aligned. clip in (0, 1].
cudaError_t rsq_quantize_act(const void* x, RsqDtype x_dtype, int64_t m, int64_t k, float clip, uint8_t* packed,
                             float* scale, int32_t* zero, cudaStream_t stream);

// out (m, n) = a_scale[i] * w_scale[j] * (acc[i, j] - a_zero[i] * w_sum[j]), acc = sum_k a[i, k] w[j, k]
// exact in int32 (a: packed activations (m, k/2), w: packed weights (n, k/2), w_sum[j] = sum_k w[j, k]).
// The float arithmetic is float(acc - a_zero * w_sum) * a_scale * w_scale, rounded once to out_dtype
// (float32: bit-identical to the CPU reference). a and w 16-byte aligned. k < 2^24.
cudaError_t rsq_gemm_w4a4(const uint8_t* a, const float* a_scale, const int32_t* a_zero, const uint8_t* w,
                          const float* w_scale, const int32_t* w_sum, void* out, RsqDtype out_dtype, int64_t m,
                          int64_t n, int64_t k, RsqGemmPath path, cudaStream_t stream);

// Hopper (sm_90a) prefill GEMM on CUTLASS (TMA, warp-specialized int8 wgmma): the same out as
// rsq_gemm_w4a4, from int8 codes (one per byte, in [-8, 7]) instead of packed ones: a (m, k) and
// w (n, k), both row-major. float32, float16 or bfloat16 out; float32 is the CPU reference's bits.
// k a multiple of 16 and < 2^24; n a multiple of 16 / sizeof(out) * 2 (8 for 16-bit out, 4 for
// float32). Any other device: cudaErrorNotSupported with a message.
cudaError_t rsq_gemm_int8_sm90(const int8_t* a, const float* a_scale, const int32_t* a_zero, const int8_t* w,
                               const float* w_scale, const int32_t* w_sum, void* out, RsqDtype out_dtype, int64_t m,
                               int64_t n, int64_t k, cudaStream_t stream);

// Decode (1 <= m <= 16 tokens): the same out as rsq_gemm_w4a4 (float32: the same bits) by a GEMV that
// streams the packed weights once with 16-byte loads, dp4a on the nibbles, split over K into split_k
// chunks (rsq_gemv_split_k: enough blocks to keep the memory busy) whose exact int32 partial sums meet in
// a workspace of rsq_gemv_workspace_bytes (cleared here; none for split_k = 1). a, w 16-byte aligned.
int rsq_gemv_split_k(int64_t n, int64_t k, int sm_count);
size_t rsq_gemv_workspace_bytes(int64_t m, int64_t n, int split_k);
cudaError_t rsq_gemv_w4a4(const uint8_t* a, const float* a_scale, const int32_t* a_zero, const uint8_t* w,
                          const float* w_scale, const int32_t* w_sum, void* out, RsqDtype out_dtype, int64_t m,
                          int64_t n, int64_t k, int split_k, void* workspace, size_t workspace_bytes,
                          cudaStream_t stream);

// out int32 (m, n) = acc only (the exactness check of the integer part).
cudaError_t rsq_gemm_int4(const uint8_t* a, const uint8_t* w, int32_t* out, int64_t m, int64_t n, int64_t k,
                          RsqGemmPath path, cudaStream_t stream);

// y = x @ H_n / sqrt(n) along rows of x (rows, n), H_n = kron(base (bm, bm), Sylvester(n / bm)) with
// n / bm a power of two and base a ±1 matrix (float32, device). float32 compute; y has x's dtype and
// may alias x. The operation order is the CPU reference's (butterflies h = 1, 2, 4, ..., then
// Y = base^T X summed over l in order, then * (1 / sqrt(n))), without fused multiply-adds.
cudaError_t rsq_hadamard(const void* x, void* y, RsqDtype dtype, int64_t rows, int64_t n, const float* base,
                         int64_t bm, cudaStream_t stream);

// rsq_hadamard then rsq_quantize_act on the float32 result, in one launch (n is the quantizer's k:
// a positive multiple of 32). packed 4-byte aligned.
cudaError_t rsq_hadamard_quantize_act(const void* x, RsqDtype x_dtype, int64_t rows, int64_t n, const float* base,
                                      int64_t bm, float clip, uint8_t* packed, float* scale, int32_t* zero,
                                      cudaStream_t stream);

// out = h + ((h @ q) @ mix) @ q^T per row of h (t, d), q float32 (d, r), mix float32 (r, r), 1 <= r <= 128,
// float32 compute, out in h's dtype (may alias h). No d x d matrix is formed. Needs a device workspace
// of rsq_transition_workspace_bytes(t, d, r) bytes (16-byte aligned); the split of d, and so the float
// summation order, depends on the shapes only (deterministic across runs and devices).
size_t rsq_transition_workspace_bytes(int64_t t, int64_t d, int64_t r);
// x (may be null): another (t, d) tensor of h's dtype added in the same pass, out = h + x + ... (the
// residual add of the block output x fused, as the CPU op's x=).
cudaError_t rsq_transition(const void* h, const void* x, void* out, RsqDtype dtype, int64_t t, int64_t d,
                           const float* q, const float* mix, int64_t r, void* workspace, size_t workspace_bytes,
                           cudaStream_t stream);
