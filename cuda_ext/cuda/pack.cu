// pack_int4 / unpack_int4: elementwise, one thread per 8 codes (one packed 32-bit word) in a
// grid-stride loop; rows are contiguous and k is a multiple of 32, so the whole array is a flat
// sequence of words.
#include "common.cuh"

namespace rsq {
namespace {

constexpr int kThreads = 256;
constexpr unsigned int kMaxBlocks = 8192;

__global__ void __launch_bounds__(kThreads)
pack_int4_kernel(const uint2* __restrict__ codes, uint32_t* __restrict__ packed, int64_t words, int* out_of_range) {
  bool bad = false;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < words;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint2 v = codes[i];  // codes 8i .. 8i+7, little-endian: byte e of v is code 8i + e
    uint32_t word = 0;
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const int code = static_cast<int8_t>(((e < 4 ? v.x : v.y) >> (8 * (e % 4))) & 0xFFu);
      bad |= code < -8 || code > 7;
      word |= static_cast<uint32_t>(code & 0xF) << (4 * e);
    }
    packed[i] = word;
  }
  if (bad && out_of_range != nullptr) *out_of_range = 1;  // benign race: every writer stores 1
}

__global__ void __launch_bounds__(kThreads)
unpack_int4_kernel(const uint32_t* __restrict__ packed, uint2* __restrict__ codes, int64_t words) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < words;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    uint32_t even, odd;
    split_int4x8(packed[i], even, odd);
    // even = codes 0,2,4,6 and odd = codes 1,3,5,7 of this word; interleave bytes back in order.
    codes[i] = make_uint2(__byte_perm(even, odd, 0x5140), __byte_perm(even, odd, 0x7362));
  }
}

cudaError_t check_rows_k(int64_t rows, int64_t k, const char* op) {
  if (rows < 0) return fail(cudaErrorInvalidValue, "%s: rows=%lld must be >= 0", op, static_cast<long long>(rows));
  return check_k(k, op);
}

unsigned int grid_for(int64_t words) {
  const unsigned int blocks = ceil_div(words, kThreads);
  return blocks < kMaxBlocks ? blocks : kMaxBlocks;
}

}  // namespace
}  // namespace rsq

cudaError_t rsq_pack_int4(const int8_t* codes, uint8_t* packed, int64_t rows, int64_t k, int* out_of_range,
                          cudaStream_t stream) {
  using namespace rsq;
  const char* op = "pack_int4";
  cudaError_t err = check_rows_k(rows, k, op);
  if (err == cudaSuccess) err = check_aligned(codes, 8, op, "codes");
  if (err == cudaSuccess) err = check_aligned(packed, 4, op, "packed");
  if (err != cudaSuccess) return err;
  const int64_t words = rows * k / 8;
  if (words == 0) return cudaSuccess;
  pack_int4_kernel<<<grid_for(words), kThreads, 0, stream>>>(reinterpret_cast<const uint2*>(codes),
                                                              reinterpret_cast<uint32_t*>(packed), words,
                                                              out_of_range);
  return check_launch(op);
}

cudaError_t rsq_unpack_int4(const uint8_t* packed, int8_t* codes, int64_t rows, int64_t k, cudaStream_t stream) {
  using namespace rsq;
  const char* op = "unpack_int4";
  cudaError_t err = check_rows_k(rows, k, op);
  if (err == cudaSuccess) err = check_aligned(packed, 4, op, "packed");
  if (err == cudaSuccess) err = check_aligned(codes, 8, op, "codes");
  if (err != cudaSuccess) return err;
  const int64_t words = rows * k / 8;
  if (words == 0) return cudaSuccess;
  unpack_int4_kernel<<<grid_for(words), kThreads, 0, stream>>>(reinterpret_cast<const uint32_t*>(packed),
                                                                reinterpret_cast<uint2*>(codes), words);
  return check_launch(op);
}
