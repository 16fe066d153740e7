// W4A4 CPU reference ops (exact integer arithmetic), built on first use by pipeline/export/kernels.py through
// torch.utils.cpp_extension. The CUDA sources in ../cuda implement the same ops with the same
// semantics; tests compare both against pure-torch references (pipeline/export/kernels.py: reference_*).
//
// Layout (DESIGN §3): int4 two's complement, two per byte, K-contiguous for both operands
// (activations M x K -> uint8 M x K/2, weights N x K -> uint8 N x K/2), low nibble = even k.
// K must be a multiple of 32.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kAlign = 32;

void check_matrix(const at::Tensor& t, const char* op, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be on the CPU");
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
}

void check_k(int64_t K, const char* op) {
  TORCH_CHECK(K > 0 && K % kAlign == 0, op, ": K=", K, " must be a positive multiple of ", kAlign,
              " (int4 layout)");
}

void check_vector(const at::Tensor& t, const char* op, const char* name, at::ScalarType dtype, int64_t n) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be on the CPU");
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, op, ": ", name, " must have shape (", n, "), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
}

inline int8_t low_nibble(uint8_t b) { return static_cast<int8_t>(static_cast<int8_t>(b << 4) >> 4); }
inline int8_t high_nibble(uint8_t b) { return static_cast<int8_t>(static_cast<int8_t>(b) >> 4); }

// Sign-extend one packed row (K/2 bytes) into K int16 values.
inline void unpack_row16(const uint8_t* src, int64_t half_k, int16_t* dst) {
  for (int64_t j = 0; j < half_k; ++j) {
    dst[2 * j] = low_nibble(src[j]);
    dst[2 * j + 1] = high_nibble(src[j]);
  }
}

inline int32_t dot16(const int16_t* a, const int16_t* b, int64_t n) {
  int32_t acc = 0;
  for (int64_t k = 0; k < n; ++k) acc += static_cast<int32_t>(a[k]) * static_cast<int32_t>(b[k]);
  return acc;
}

}  // namespace

// int8 codes (R, K) in [-8, 7] -> packed uint8 (R, K/2).
at::Tensor pack_int4(const at::Tensor& codes) {
  check_matrix(codes, "pack_int4", "codes", at::kChar);
  const int64_t R = codes.size(0), K = codes.size(1);
  check_k(K, "pack_int4");
  auto c = codes.contiguous();
  auto out = at::empty({R, K / 2}, c.options().dtype(at::kByte));
  const int8_t* src = c.data_ptr<int8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  std::atomic<bool> out_of_range{false};
  at::parallel_for(0, R, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int8_t* row = src + r * K;
      for (int64_t j = 0; j < K / 2; ++j) {
        const int8_t lo = row[2 * j], hi = row[2 * j + 1];
        if (lo < -8 || lo > 7 || hi < -8 || hi > 7) out_of_range = true;
        dst[r * (K / 2) + j] = static_cast<uint8_t>((lo & 0xF) | ((hi & 0xF) << 4));
      }
    }
  });
  TORCH_CHECK(!out_of_range, "pack_int4: codes must lie in [-8, 7]");
  return out;
}

// packed uint8 (R, K/2) -> int8 codes (R, K), sign-extended.
at::Tensor unpack_int4(const at::Tensor& packed) {
  check_matrix(packed, "unpack_int4", "packed", at::kByte);
  const int64_t R = packed.size(0), half_k = packed.size(1);
  check_k(2 * half_k, "unpack_int4");
  auto p = packed.contiguous();
  auto out = at::empty({R, 2 * half_k}, p.options().dtype(at::kChar));
  const uint8_t* src = p.data_ptr<uint8_t>();
  int8_t* dst = out.data_ptr<int8_t>();
  at::parallel_for(0, R * half_k, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      dst[2 * i] = low_nibble(src[i]);
      dst[2 * i + 1] = high_nibble(src[i]);
    }
  });
  return out;
}

// Per-token asymmetric int4 quantization, the same float32 arithmetic as the fake quantizer
// (pipeline.quant.quantizers.quantize_asym, bits=4): x (M, K) float -> packed codes q - 8 (M, K/2) uint8,
// scale (M) float32, zero - 8 (M) int32, with x ~= scale * (code - zero_s).
// The per-token loop shared by quantize_act (packed int4 out) and quantize_act_int8 (one int8 code per
// element, for the int8 dot-product GEMM): store(m, k, code) writes code = q - 8 in -8..7.
template <typename Store>
void quantize_rows(const at::Tensor& x, double clip_ratio, float* sc, int32_t* zp, Store store) {
  const int64_t M = x.size(0), K = x.size(1);
  const float* src = x.data_ptr<float>();
  const float clip = static_cast<float>(clip_ratio);
  at::parallel_for(0, M, 8, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const float* row = src + m * K;
      float lo = row[0], hi = row[0];
      for (int64_t k = 1; k < K; ++k) {
        lo = std::min(lo, row[k]);
        hi = std::max(hi, row[k]);
      }
      const float xmin = std::min(lo, 0.0f) * clip, xmax = std::max(hi, 0.0f) * clip;
      const float s = std::max((xmax - xmin) / 15.0f, 1e-8f);
      const float z = std::nearbyint(-xmin / s);
      for (int64_t k = 0; k < K; ++k) {
        const float q = std::clamp(std::nearbyint(row[k] / s) + z, 0.0f, 15.0f);
        store(m, k, static_cast<int>(q) - 8);
      }
      sc[m] = s;
      zp[m] = static_cast<int32_t>(z) - 8;
    }
  });
}

at::Tensor checked_act(const at::Tensor& x_in, double clip_ratio, const char* op) {
  TORCH_CHECK(x_in.dim() == 2, op, ": x must be 2-D (tokens, K), got ", x_in.sizes());
  TORCH_CHECK(x_in.device().is_cpu(), op, ": x must be on the CPU");
  TORCH_CHECK(at::isFloatingType(x_in.scalar_type()), op, ": x must be floating, got ", x_in.scalar_type());
  TORCH_CHECK(clip_ratio > 0.0 && clip_ratio <= 1.0, op, ": clip_ratio=", clip_ratio, " must be in (0, 1]");
  check_k(x_in.size(1), op);
  return x_in.to(at::kFloat).contiguous();
}

std::vector<at::Tensor> quantize_act(const at::Tensor& x_in, double clip_ratio) {
  auto x = checked_act(x_in, clip_ratio, "quantize_act");
  const int64_t M = x.size(0), K = x.size(1);
  auto packed = at::zeros({M, K / 2}, x.options().dtype(at::kByte));
  auto scale = at::empty({M}, x.options());
  auto zero = at::empty({M}, x.options().dtype(at::kInt));
  uint8_t* dst = packed.data_ptr<uint8_t>();
  quantize_rows(x, clip_ratio, scale.data_ptr<float>(), zero.data_ptr<int32_t>(), [&](int64_t m, int64_t k, int c) {
    dst[m * (K / 2) + k / 2] |= static_cast<uint8_t>((c & 0xF) << (4 * (k & 1)));
  });
  return {packed, scale, zero};
}

std::vector<at::Tensor> quantize_act_int8(const at::Tensor& x_in, double clip_ratio) {
  auto x = checked_act(x_in, clip_ratio, "quantize_act_int8");
  const int64_t M = x.size(0), K = x.size(1);
  auto codes = at::empty({M, K}, x.options().dtype(at::kChar));
  auto scale = at::empty({M}, x.options());
  auto zero = at::empty({M}, x.options().dtype(at::kInt));
  int8_t* dst = codes.data_ptr<int8_t>();
  quantize_rows(x, clip_ratio, scale.data_ptr<float>(), zero.data_ptr<int32_t>(), [&](int64_t m, int64_t k, int c) {
    dst[m * K + k] = static_cast<int8_t>(c);
  });
  return {codes, scale, zero};
}

// float32 (M, N) = a_scale[m] * w_scale[n] * (acc[m, n] - a_zero[m] * w_sum[n]): gemm_w4a4's epilogue,
// the same operations in the same order, on an int32 product computed elsewhere (torch._int_mm).
at::Tensor dequant_epilogue(const at::Tensor& acc_in, const at::Tensor& a_scale, const at::Tensor& a_zero,
                            const at::Tensor& w_scale, const at::Tensor& w_sum) {
  check_matrix(acc_in, "dequant_epilogue", "acc", at::kInt);
  const int64_t M = acc_in.size(0), N = acc_in.size(1);
  check_vector(a_scale, "dequant_epilogue", "a_scale", at::kFloat, M);
  check_vector(a_zero, "dequant_epilogue", "a_zero", at::kInt, M);
  check_vector(w_scale, "dequant_epilogue", "w_scale", at::kFloat, N);
  check_vector(w_sum, "dequant_epilogue", "w_sum", at::kInt, N);
  auto acc = acc_in.contiguous(), as = a_scale.contiguous(), az = a_zero.contiguous();
  auto ws = w_scale.contiguous(), wz = w_sum.contiguous();
  auto out = at::empty({M, N}, acc.options().dtype(at::kFloat));
  const int32_t* ap = acc.data_ptr<int32_t>();
  const float *asp = as.data_ptr<float>(), *wsp = ws.data_ptr<float>();
  const int32_t *azp = az.data_ptr<int32_t>(), *wzp = wz.data_ptr<int32_t>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, M, 1, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const int32_t* __restrict__ a = ap + m * N;
      const int32_t* __restrict__ wz_row = wzp;
      const float* __restrict__ ws_row = wsp;
      float* __restrict__ o = op + m * N;
      const int32_t zm = azp[m];
      const float sm = asp[m];
      for (int64_t n = 0; n < N; ++n) {  // vectorized; the same operations, in order, as gemm_w4a4's
        o[n] = static_cast<float>(a[n] - zm * wz_row[n]) * sm * ws_row[n];
      }
    }
  });
  return out;
}

namespace {

// ---- decode GEMM (M <= kGemvRows tokens): int8 dot products straight on the packed int4 weights ------
// A weight code w in [-8, 7] is read as the unsigned u = w + 8 = nibble ^ 8 in [0, 15], so a packed byte
// needs no sign extension: (byte ^ 0x88) & 0x0F is the even k's u, ((byte ^ 0x88) >> 4) & 0x0F the odd
// k's. The activation codes a are sign-extended once per call into int8 (even k, odd k) rows, and
//   sum_k a w = sum_k u a - 8 sum_k a,
// exact in int32. u (unsigned) times a (signed) is what VPDPBUSD sums (u8 x s8 -> s32 in groups of 4;
// AVX-512 VNNI or AVX-VNNI), or VPMADDUBSW + VPMADDWD where it is missing (|15 * 8 * 2| fits int16:
// no saturation). The weights are read once per call from their packed bytes, a quarter of bf16's
// bytes: decode is bound by memory, not by unpacking. Chosen at build time (the extension is compiled
// with -march=native on the machine that runs it); other CPUs keep the portable loop.
constexpr int64_t kGemvRows = 16;

#if defined(__AVX512BW__) || defined(__AVX2__)
constexpr bool kHaveGemv = true;
#if defined(__AVX512BW__)
using vec_t = __m512i;
constexpr int64_t kVecBytes = 64;
inline vec_t vzero() { return _mm512_setzero_si512(); }
inline vec_t vload(const void* p, int64_t n) {  // n < 64: the rest is zero, nothing past p + n is read
  return n >= kVecBytes ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi8(_cvtu64_mask64((1ULL << n) - 1), p);
}
inline vec_t vlow(vec_t b) { return _mm512_and_si512(b, _mm512_set1_epi8(0x0F)); }
inline vec_t vhigh(vec_t b) { return _mm512_and_si512(_mm512_srli_epi16(b, 4), _mm512_set1_epi8(0x0F)); }
inline vec_t vflip(vec_t b) { return _mm512_xor_si512(b, _mm512_set1_epi8(static_cast<char>(0x88))); }
inline vec_t vdot(vec_t acc, vec_t u, vec_t s) {  // acc (16 x int32) += groups of 4 u8 * s8
#if defined(__AVX512VNNI__)
  return _mm512_dpbusd_epi32(acc, u, s);
#else
  return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(u, s), _mm512_set1_epi16(1)));
#endif
}
inline int32_t vsum(vec_t v) { return _mm512_reduce_add_epi32(v); }
#else
using vec_t = __m256i;
constexpr int64_t kVecBytes = 32;
inline vec_t vzero() { return _mm256_setzero_si256(); }
inline vec_t vload(const void* p, int64_t n) {
  if (n >= kVecBytes) return _mm256_loadu_si256(static_cast<const __m256i*>(p));
  alignas(32) uint8_t buf[kVecBytes] = {};
  std::memcpy(buf, p, static_cast<size_t>(n));
  return _mm256_load_si256(reinterpret_cast<const __m256i*>(buf));
}
inline vec_t vlow(vec_t b) { return _mm256_and_si256(b, _mm256_set1_epi8(0x0F)); }
inline vec_t vhigh(vec_t b) { return _mm256_and_si256(_mm256_srli_epi16(b, 4), _mm256_set1_epi8(0x0F)); }
inline vec_t vflip(vec_t b) { return _mm256_xor_si256(b, _mm256_set1_epi8(static_cast<char>(0x88))); }
inline vec_t vdot(vec_t acc, vec_t u, vec_t s) {
#if defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(acc, u, s);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}
inline int32_t vsum(vec_t v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}
#endif

// acc (MT, NR): sum_k u w-row(n0 + r) * a-row(m0 + t), both parities, for NR weight rows and MT tokens.
// even, odd: (M, K/2) int8 activation codes of even / odd k.
template <int NR, int MT>
inline void gemv_block(const uint8_t* wp, const int8_t* even, const int8_t* odd, int64_t m0, int64_t n0,
                       int64_t half_k, int32_t (&acc)[MT][NR]) {
  vec_t sums[MT][NR];
  for (int t = 0; t < MT; ++t)
    for (int r = 0; r < NR; ++r) sums[t][r] = vzero();
  for (int64_t j = 0; j < half_k; j += kVecBytes) {
    const int64_t n = std::min(kVecBytes, half_k - j);
    vec_t wl[NR], wh[NR];
    for (int r = 0; r < NR; ++r) {  // the next block's bytes (NR rows on) are fetched while this one runs
      _mm_prefetch(reinterpret_cast<const char*>(wp + (n0 + 2 * NR + r) * half_k + j), _MM_HINT_T0);
      const vec_t b = vflip(vload(wp + (n0 + r) * half_k + j, n));
      wl[r] = vlow(b);
      wh[r] = vhigh(b);
    }
    for (int t = 0; t < MT; ++t) {
      const vec_t ae = vload(even + (m0 + t) * half_k + j, n), ao = vload(odd + (m0 + t) * half_k + j, n);
      for (int r = 0; r < NR; ++r) sums[t][r] = vdot(vdot(sums[t][r], wl[r], ae), wh[r], ao);
    }
  }
  for (int t = 0; t < MT; ++t)
    for (int r = 0; r < NR; ++r) acc[t][r] = vsum(sums[t][r]);
}

// MT tokens from m0 against NR rows from n0, written through the epilogue.
template <int NR, int MT, typename Out, typename Epilogue>
inline void gemv_tile(const uint8_t* wp, const int8_t* even, const int8_t* odd, const int32_t* asum, int64_t m0,
                      int64_t n0, int64_t N, int64_t half_k, Out* out, Epilogue& epilogue) {
  int32_t acc[MT][NR];
  gemv_block<NR, MT>(wp, even, odd, m0, n0, half_k, acc);
  for (int t = 0; t < MT; ++t)
    for (int r = 0; r < NR; ++r)
      out[(m0 + t) * N + n0 + r] = epilogue(m0 + t, n0 + r, acc[t][r] - 8 * asum[m0 + t]);
}

template <int NR, typename Out, typename Epilogue>
inline void gemv_rows(const uint8_t* wp, const int8_t* even, const int8_t* odd, const int32_t* asum, int64_t M,
                      int64_t n0, int64_t N, int64_t half_k, Out* out, Epilogue& epilogue) {
  int64_t m0 = 0;  // tokens in groups of 4 (the weight rows stay in L1 between groups)
  for (; m0 + 4 <= M; m0 += 4) gemv_tile<NR, 4>(wp, even, odd, asum, m0, n0, N, half_k, out, epilogue);
  switch (M - m0) {
    case 3: gemv_tile<NR, 3>(wp, even, odd, asum, m0, n0, N, half_k, out, epilogue); break;
    case 2: gemv_tile<NR, 2>(wp, even, odd, asum, m0, n0, N, half_k, out, epilogue); break;
    case 1: gemv_tile<NR, 1>(wp, even, odd, asum, m0, n0, N, half_k, out, epilogue); break;
    default: break;
  }
}

template <typename Out, typename Epilogue>
void int4_gemv(const at::Tensor& a, const at::Tensor& w, Out* out, Epilogue epilogue) {
  const int64_t M = a.size(0), N = w.size(0), half_k = a.size(1);
  const uint8_t* ap = a.data_ptr<uint8_t>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  std::vector<int8_t> even(static_cast<size_t>(M * half_k)), odd(even.size());
  std::vector<int32_t> asum(static_cast<size_t>(M));
  for (int64_t m = 0; m < M; ++m) {
    int32_t s = 0;
    for (int64_t j = 0; j < half_k; ++j) {
      const uint8_t b = ap[m * half_k + j];
      even[m * half_k + j] = low_nibble(b);
      odd[m * half_k + j] = high_nibble(b);
      s += low_nibble(b) + high_nibble(b);
    }
    asum[m] = s;
  }
  constexpr int64_t kRows = kVecBytes == 64 ? 4 : 2;  // weight rows per block: 4 x 4 accumulators + 8 weight vectors fit 32 zmm
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(half_k, 1));  // about 32 KiB of weights per task
  at::parallel_for(0, (N + kRows - 1) / kRows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t n0 = blk * kRows;
      if (n0 + kRows <= N) {
        gemv_rows<kRows>(wp, even.data(), odd.data(), asum.data(), M, n0, N, half_k, out, epilogue);
      } else {
        for (int64_t n = n0; n < N; ++n)
          gemv_rows<1>(wp, even.data(), odd.data(), asum.data(), M, n, N, half_k, out, epilogue);
      }
    }
  });
}
#else
constexpr bool kHaveGemv = false;
template <typename Out, typename Epilogue>
void int4_gemv(const at::Tensor&, const at::Tensor&, Out*, Epilogue) {}
#endif

// acc (M, N) int32 = A_codes (M, K) @ W_codes (N, K)^T, then epilogue(m, n, acc) -> out.
template <typename Out, typename Epilogue>
void int4_gemm(const at::Tensor& a, const at::Tensor& w, Out* out, Epilogue epilogue) {
  const int64_t M = a.size(0), N = w.size(0), half_k = a.size(1), K = 2 * half_k;
  if (kHaveGemv && M <= kGemvRows) return int4_gemv(a, w, out, epilogue);
  const uint8_t* ap = a.data_ptr<uint8_t>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  // A is unpacked once (M x K int16); each W row is unpacked once per task, blocks of N rows.
  std::vector<int16_t> a16(static_cast<size_t>(M * K));
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) unpack_row16(ap + m * half_k, half_k, a16.data() + m * K);
  });
  constexpr int64_t kBlockN = 8;
  at::parallel_for(0, (N + kBlockN - 1) / kBlockN, 1, [&](int64_t begin, int64_t end) {
    std::vector<int16_t> w16(static_cast<size_t>(kBlockN * K));
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t n0 = blk * kBlockN, n1 = std::min(N, n0 + kBlockN);
      for (int64_t n = n0; n < n1; ++n) unpack_row16(wp + n * half_k, half_k, w16.data() + (n - n0) * K);
      for (int64_t m = 0; m < M; ++m) {
        const int16_t* arow = a16.data() + m * K;
        for (int64_t n = n0; n < n1; ++n) {
          out[m * N + n] = epilogue(m, n, dot16(arow, w16.data() + (n - n0) * K, K));
        }
      }
    }
  });
}

void check_gemm_operands(const at::Tensor& a, const at::Tensor& w, const char* op) {
  check_matrix(a, op, "a (packed activations)", at::kByte);
  check_matrix(w, op, "w (packed weights)", at::kByte);
  check_k(2 * a.size(1), op);
  TORCH_CHECK(a.size(1) == w.size(1), op, ": a has K=", 2 * a.size(1), " but w has K=", 2 * w.size(1));
  TORCH_CHECK(a.is_contiguous() && w.is_contiguous(), op, ": a and w must be contiguous");
}

}  // namespace

// int32 (M, N) = unpack(a) @ unpack(w)^T, exact.
at::Tensor gemm_int4(const at::Tensor& a, const at::Tensor& w) {
  check_gemm_operands(a, w, "gemm_int4");
  auto out = at::empty({a.size(0), w.size(0)}, a.options().dtype(at::kInt));
  int4_gemm(a, w, out.data_ptr<int32_t>(), [](int64_t, int64_t, int32_t acc) { return acc; });
  return out;
}

// float32 (M, N) = a_scale[m] * w_scale[n] * (acc[m, n] - a_zero[m] * w_sum[n]), acc exact in int32.
at::Tensor gemm_w4a4(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& a_zero,
                     const at::Tensor& w, const at::Tensor& w_scale, const at::Tensor& w_sum) {
  check_gemm_operands(a, w, "gemm_w4a4");
  const int64_t M = a.size(0), N = w.size(0);
  check_vector(a_scale, "gemm_w4a4", "a_scale", at::kFloat, M);
  check_vector(a_zero, "gemm_w4a4", "a_zero", at::kInt, M);
  check_vector(w_scale, "gemm_w4a4", "w_scale", at::kFloat, N);
  check_vector(w_sum, "gemm_w4a4", "w_sum", at::kInt, N);
  auto as = a_scale.contiguous(), az = a_zero.contiguous(), ws = w_scale.contiguous(), wz = w_sum.contiguous();
  const float* asp = as.data_ptr<float>();
  const int32_t* azp = az.data_ptr<int32_t>();
  const float* wsp = ws.data_ptr<float>();
  const int32_t* wzp = wz.data_ptr<int32_t>();
  auto out = at::empty({M, N}, a.options().dtype(at::kFloat));
  int4_gemm(a, w, out.data_ptr<float>(), [&](int64_t m, int64_t n, int32_t acc) {
    return static_cast<float>(acc - azp[m] * wzp[n]) * asp[m] * wsp[n];
  });
  return out;
}

// y = x @ H_n / sqrt(n) along the last dim, H_n = kron(base (m x m), Sylvester(p)), n = m * p, p = 2^j.
at::Tensor hadamard(const at::Tensor& x_in, const at::Tensor& base_in) {
  TORCH_CHECK(x_in.dim() == 2, "hadamard: x must be 2-D (rows, n), got ", x_in.sizes());
  TORCH_CHECK(x_in.device().is_cpu() && base_in.device().is_cpu(), "hadamard: tensors must be on the CPU");
  check_matrix(base_in, "hadamard", "base", at::kFloat);
  const int64_t R = x_in.size(0), n = x_in.size(1), m = base_in.size(0);
  TORCH_CHECK(base_in.size(1) == m && m >= 1, "hadamard: base must be square, got ", base_in.sizes());
  TORCH_CHECK(n % m == 0, "hadamard: n=", n, " is not a multiple of the base order ", m);
  const int64_t p = n / m;
  TORCH_CHECK((p & (p - 1)) == 0, "hadamard: n / m = ", p, " must be a power of two");
  auto x = x_in.to(at::kFloat).contiguous();
  auto base = base_in.contiguous();
  auto out = at::empty_like(x);
  const float* src = x.data_ptr<float>();
  const float* b = base.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  // divide (not multiply by 1/sqrt(n)): the same rounding as pipeline.rotation.hadamard.fast_hadamard_transform
  const float norm = static_cast<float>(std::sqrt(static_cast<double>(n)));
  at::parallel_for(0, R, 4, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(static_cast<size_t>(n));
    for (int64_t r = begin; r < end; ++r) {
      std::copy(src + r * n, src + (r + 1) * n, buf.begin());
      for (int64_t l = 0; l < m; ++l) {  // butterfly over the p columns of each of the m blocks
        float* blk = buf.data() + l * p;
        for (int64_t h = 1; h < p; h *= 2) {
          for (int64_t i = 0; i < p; i += 2 * h) {
            for (int64_t j = i; j < i + h; ++j) {
              const float a = blk[j], c = blk[j + h];
              blk[j] = a + c;
              blk[j + h] = a - c;
            }
          }
        }
      }
      float* y = dst + r * n;
      if (m == 1) {
        for (int64_t j = 0; j < n; ++j) y[j] = buf[j] / norm;
        continue;
      }
      for (int64_t i = 0; i < m; ++i) {  // Y = base^T X
        for (int64_t j = 0; j < p; ++j) {
          float acc = 0.0f;
          for (int64_t l = 0; l < m; ++l) acc += b[l * m + i] * buf[l * p + j];
          y[i * p + j] = acc / norm;
        }
      }
    }
  });
  return out.to(x_in.scalar_type());
}

// out = h + ((h @ Q) @ M) @ Q^T per row, float32, fused with the residual add (no D x D matrix).
namespace {

constexpr int64_t kTransitionTile = 8;    // tokens per tile: Q is read once per tile, not per token
constexpr int64_t kTransitionBlock = 64;  // output columns per register block of the expansion

#if defined(__AVX512F__)
// AVX-512 forms of the tile's two long products, for r = 16 RV (RV = 1, 2, 4), TT tokens: the
// accumulators stay in registers (TT * RV <= 16 zmm), columns past D masked.
inline __mmask16 tail_mask(int64_t left) { return left >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1); }

// u (TT, 16 RV) = h (TT, D) Q (D, 16 RV).
template <int RV, int TT>
void project_avx512(const float* __restrict h, const float* __restrict q, int64_t D, float* __restrict u) {
  __m512 acc[TT][RV];
  for (int t = 0; t < TT; ++t)
    for (int k = 0; k < RV; ++k) acc[t][k] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; ++d) {
    __m512 qv[RV];
    for (int k = 0; k < RV; ++k) qv[k] = _mm512_loadu_ps(q + d * 16 * RV + 16 * k);
    for (int t = 0; t < TT; ++t) {
      const __m512 hb = _mm512_set1_ps(h[t * D + d]);
      for (int k = 0; k < RV; ++k) acc[t][k] = _mm512_fmadd_ps(hb, qv[k], acc[t][k]);
    }
  }
  for (int t = 0; t < TT; ++t)
    for (int k = 0; k < RV; ++k) _mm512_storeu_ps(u + t * 16 * RV + 16 * k, acc[t][k]);
}

// y (TT, D) = h (+ x) + v (TT, 16 RV) Q^T, qt = Q^T (16 RV, D): 16 columns at a time.
template <int RV, int TT>
void expand_avx512(const float* __restrict h, const float* __restrict x, const float* __restrict v,
                   const float* __restrict qt, int64_t D, float* __restrict y) {
  constexpr int R = 16 * RV;
  for (int64_t d0 = 0; d0 < D; d0 += 16) {
    const __mmask16 k = tail_mask(D - d0);
    __m512 acc[TT];
    for (int t = 0; t < TT; ++t) {
      acc[t] = _mm512_maskz_loadu_ps(k, h + t * D + d0);
      if (x != nullptr) acc[t] = _mm512_add_ps(acc[t], _mm512_maskz_loadu_ps(k, x + t * D + d0));
    }
    for (int j = 0; j < R; ++j) {
      const __m512 qv = _mm512_maskz_loadu_ps(k, qt + j * D + d0);
      for (int t = 0; t < TT; ++t) acc[t] = _mm512_fmadd_ps(_mm512_set1_ps(v[t * R + j]), qv, acc[t]);
    }
    for (int t = 0; t < TT; ++t) _mm512_mask_storeu_ps(y + t * D + d0, k, acc[t]);
  }
}

template <int RV>
bool tile_avx512_rv(const float* h, const float* x, const float* q, const float* qt, const float* m, float* y,
                    int64_t rows, int64_t D, float* u, float* v) {
  constexpr int64_t R = 16 * RV, step = RV <= 2 ? 8 : 4;  // tokens per register block
  for (int64_t t0 = 0; t0 < rows; t0 += step) {
    const int64_t tt = std::min(step, rows - t0);
    const float* ht = h + t0 * D;
    float* ut = u + t0 * R;
    switch (tt) {
#define RSQ_PROJECT(N) case N: project_avx512<RV, N>(ht, q, D, ut); break;
      RSQ_PROJECT(1) RSQ_PROJECT(2) RSQ_PROJECT(3) RSQ_PROJECT(4)
      RSQ_PROJECT(5) RSQ_PROJECT(6) RSQ_PROJECT(7) RSQ_PROJECT(8)
#undef RSQ_PROJECT
      default: return false;
    }
  }
  std::fill(v, v + rows * R, 0.0f);
  for (int64_t t = 0; t < rows; ++t)  // v = u M (r x r: small)
    for (int64_t i = 0; i < R; ++i) {
      const float ui = u[t * R + i];
      const float* mrow = m + i * R;
      for (int64_t j = 0; j < R; ++j) v[t * R + j] = std::fma(ui, mrow[j], v[t * R + j]);
    }
  for (int64_t t0 = 0; t0 < rows; t0 += 8) {
    const int64_t tt = std::min<int64_t>(8, rows - t0);
    const float* xt = x == nullptr ? nullptr : x + t0 * D;
    switch (tt) {
#define RSQ_EXPAND(N) case N: expand_avx512<RV, N>(h + t0 * D, xt, v + t0 * R, qt, D, y + t0 * D); break;
      RSQ_EXPAND(1) RSQ_EXPAND(2) RSQ_EXPAND(3) RSQ_EXPAND(4)
      RSQ_EXPAND(5) RSQ_EXPAND(6) RSQ_EXPAND(7) RSQ_EXPAND(8)
#undef RSQ_EXPAND
      default: return false;
    }
  }
  return true;
}

// The tile on AVX-512 where r is 16, 32 or 64; false (nothing written) otherwise.
bool transition_tile_avx512(const float* h, const float* x, const float* q, const float* qt, const float* m,
                            float* y, int64_t rows, int64_t D, int64_t r, float* u, float* v) {
  switch (r) {
    case 16: return tile_avx512_rv<1>(h, x, q, qt, m, y, rows, D, u, v);
    case 32: return tile_avx512_rv<2>(h, x, q, qt, m, y, rows, D, u, v);
    case 64: return tile_avx512_rv<4>(h, x, q, qt, m, y, rows, D, u, v);
    default: return false;
  }
}
// One token without Q^T (decode: transposing Q would cost more than the token): y[d] = h[d] (+ x[d]) +
// <Q[d, :], v>, a register dot product per d.
template <int RV>
void transition_row_avx512(const float* __restrict h, const float* __restrict x, const float* __restrict q,
                           const float* __restrict m, int64_t D, float* __restrict y) {
  constexpr int R = 16 * RV;
  alignas(64) float u[R], v[R];
  project_avx512<RV, 1>(h, q, D, u);
  std::fill(v, v + R, 0.0f);
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < R; ++j) v[j] = std::fma(u[i], m[i * R + j], v[j]);
  __m512 vv[RV];
  for (int k = 0; k < RV; ++k) vv[k] = _mm512_load_ps(v + 16 * k);
  for (int64_t d = 0; d < D; ++d) {
    __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(q + d * R), vv[0]);
    for (int k = 1; k < RV; ++k) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + d * R + 16 * k), vv[k], acc);
    y[d] = (x != nullptr ? h[d] + x[d] : h[d]) + _mm512_reduce_add_ps(acc);
  }
}

// Few tokens (<= 2) with r = 16, 32 or 64 on AVX-512: true when done.
bool transition_rows_avx512(const float* h, const float* x, const float* q, const float* m, float* y, int64_t T,
                            int64_t D, int64_t r) {
  if (T > 2 || (r != 16 && r != 32 && r != 64)) return false;
  for (int64_t t = 0; t < T; ++t) {
    const float* xt = x == nullptr ? nullptr : x + t * D;
    if (r == 16) transition_row_avx512<1>(h + t * D, xt, q, m, D, y + t * D);
    if (r == 32) transition_row_avx512<2>(h + t * D, xt, q, m, D, y + t * D);
    if (r == 64) transition_row_avx512<4>(h + t * D, xt, q, m, D, y + t * D);
  }
  return true;
}
#endif

// One tile of ``rows`` tokens: y = h (+ x) + ((h Q) M) Q^T. Tolerance-checked against float64 (not a
// bit-exact reference), so it uses fused multiply-adds (std::fma, vectorised) where the file does not.
// u, v: (rows, r) scratch. h, x, y: (rows, D) row-major; q (D, r); qt (r, D); m (r, r).
void transition_tile(const float* __restrict h, const float* __restrict x, const float* __restrict q,
                     const float* __restrict qt, const float* __restrict m, float* __restrict y,
                     int64_t rows, int64_t D, int64_t r, float* __restrict u, float* __restrict v) {
#if defined(__AVX512F__)
  if (transition_tile_avx512(h, x, q, qt, m, y, rows, D, r, u, v)) return;
#endif
  std::fill(u, u + rows * r, 0.0f);
  for (int64_t d = 0; d < D; ++d) {  // u = h Q: Q's row d serves every token of the tile
    const float* qrow = q + d * r;
    for (int64_t t = 0; t < rows; ++t) {
      const float hd = h[t * D + d];
      float* ut = u + t * r;
      for (int64_t j = 0; j < r; ++j) ut[j] = std::fma(hd, qrow[j], ut[j]);
    }
  }
  std::fill(v, v + rows * r, 0.0f);
  for (int64_t t = 0; t < rows; ++t)  // v = u M
    for (int64_t i = 0; i < r; ++i) {
      const float ui = u[t * r + i];
      const float* mrow = m + i * r;
      for (int64_t j = 0; j < r; ++j) v[t * r + j] = std::fma(ui, mrow[j], v[t * r + j]);
    }
  for (int64_t d0 = 0; d0 < D; d0 += kTransitionBlock) {  // y = h (+ x) + v Q^T, one column block at a time
    const int64_t n = std::min(kTransitionBlock, D - d0);
    for (int64_t t = 0; t < rows; ++t) {
      float acc[kTransitionBlock];
      const float* ht = h + t * D + d0;
      if (x != nullptr) {
        const float* xt = x + t * D + d0;
        for (int64_t k = 0; k < n; ++k) acc[k] = ht[k] + xt[k];
      } else {
        for (int64_t k = 0; k < n; ++k) acc[k] = ht[k];
      }
      const float* vt = v + t * r;
      if (n == kTransitionBlock) {  // full block: a fixed trip count the compiler keeps in registers
        for (int64_t j = 0; j < r; ++j) {
          const float vj = vt[j];
          const float* qtj = qt + j * D + d0;
          for (int64_t k = 0; k < kTransitionBlock; ++k) acc[k] = std::fma(vj, qtj[k], acc[k]);
        }
      } else {
        for (int64_t j = 0; j < r; ++j) {
          const float vj = vt[j];
          const float* qtj = qt + j * D + d0;
          for (int64_t k = 0; k < n; ++k) acc[k] = std::fma(vj, qtj[k], acc[k]);
        }
      }
      std::copy(acc, acc + n, y + t * D + d0);
    }
  }
}

}  // namespace

// h + ((h Q) M) Q^T per row (ReSpinQuant's rank-r transition), plus x where given (the block output:
// the whole residual add in one pass). h, x: (T, D) any float dtype; Q (D, r), M (r, r) float32.
at::Tensor transition(const at::Tensor& h_in, const at::Tensor& q_in, const at::Tensor& m_in,
                      const c10::optional<at::Tensor>& x_in) {
  TORCH_CHECK(h_in.dim() == 2, "transition: h must be 2-D (tokens, D), got ", h_in.sizes());
  TORCH_CHECK(h_in.device().is_cpu(), "transition: h must be on the CPU");
  check_matrix(q_in, "transition", "Q", at::kFloat);
  check_matrix(m_in, "transition", "M", at::kFloat);
  const int64_t T = h_in.size(0), D = h_in.size(1), r = q_in.size(1);
  TORCH_CHECK(q_in.size(0) == D, "transition: Q must be (", D, ", r), got ", q_in.sizes());
  TORCH_CHECK(m_in.size(0) == r && m_in.size(1) == r, "transition: M must be (", r, ", ", r, "), got ", m_in.sizes());
  at::Tensor x;
  if (x_in.has_value()) {
    TORCH_CHECK(x_in->device().is_cpu(), "transition: x must be on the CPU");
    TORCH_CHECK(x_in->sizes() == h_in.sizes(), "transition: x must have h's shape ", h_in.sizes(), ", got ",
                x_in->sizes());
    x = x_in->to(at::kFloat).contiguous();
  }
  auto h = h_in.to(at::kFloat).contiguous();
  auto q = q_in.contiguous(), mm = m_in.contiguous();
  auto out = at::empty({T, D}, h.options());
  const float* hp = h.data_ptr<float>();
  const float* xp = x.defined() ? x.data_ptr<float>() : nullptr;
  const float* qp = q.data_ptr<float>();
  const float* mp = mm.data_ptr<float>();
  float* op = out.data_ptr<float>();
#if defined(__AVX512F__)
  if (transition_rows_avx512(hp, xp, qp, mp, op, T, D, r)) return out.to(h_in.scalar_type());
#endif
  auto qt = q.t().contiguous();  // (r, D): the expansion runs along contiguous d
  const float* qtp = qt.data_ptr<float>();
  const int64_t tiles = (T + kTransitionTile - 1) / kTransitionTile;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> u(static_cast<size_t>(kTransitionTile * std::max<int64_t>(r, 1)));
    std::vector<float> v(u.size());
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t t0 = tile * kTransitionTile, rows = std::min(kTransitionTile, T - t0);
      transition_tile(hp + t0 * D, xp == nullptr ? nullptr : xp + t0 * D, qp, qtp, mp, op + t0 * D, rows, D, r,
                      u.data(), v.data());
    }
  });
  return out.to(h_in.scalar_type());
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "W4A4 CPU reference ops (int4 pack/unpack, activation quant, int4 GEMM, Hadamard, transition)";
  m.def("pack_int4", &pack_int4, "int8 codes (R, K) -> packed uint8 (R, K/2), low nibble = even k");
  m.def("unpack_int4", &unpack_int4, "packed uint8 (R, K/2) -> int8 codes (R, K)");
  m.def("quantize_act", &quantize_act, "per-token asymmetric int4: x (M, K) -> [packed, scale, zero]");
  m.def("quantize_act_int8", &quantize_act_int8, "quantize_act with one int8 code per element: [codes, scale, zero]");
  m.def("dequant_epilogue", &dequant_epilogue, "float32 (M, N): gemm_w4a4's epilogue on an int32 product");
  m.def("gemm_int4", &gemm_int4, "int32 (M, N) = A (M, K) @ W (N, K)^T on packed int4");
  m.def("gemm_w4a4", &gemm_w4a4, "float32 (M, N): int4 GEMM with the dequant epilogue");
  m.def("hadamard", &hadamard, "x @ kron(base, Sylvester) / sqrt(n) along the last dim");
  m.def("transition", &transition, "h + ((h @ Q) @ M) @ Q^T (+ x) per row", py::arg("h"), py::arg("Q"), py::arg("M"),
        py::arg("x") = py::none());
}
