// W4A4 CPU reference ops (exact integer arithmetic), built on first use by pipeline/export/kernels.py through
// torch.utils.cpp_extension. The CUDA sources in ../cuda implement the same ops with the same
// semantics; tests compare both against pure-torch references (pipeline/export/kernels.py: reference_*).
//
// Layout (DESIGN §3): int4 two's complement, two per byte, K-contiguous for both operands
// (activations M x K -> uint8 M x K/2, weights N x K -> uint8 N x K/2), low nibble = even k.
// K must be a multiple of 32.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
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

// acc (M, N) int32 = A_codes (M, K) @ W_codes (N, K)^T, then epilogue(m, n, acc) -> out.
template <typename Out, typename Epilogue>
void int4_gemm(const at::Tensor& a, const at::Tensor& w, Out* out, Epilogue epilogue) {
  const int64_t M = a.size(0), N = w.size(0), half_k = a.size(1), K = 2 * half_k;
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
at::Tensor transition(const at::Tensor& h_in, const at::Tensor& q_in, const at::Tensor& m_in) {
  TORCH_CHECK(h_in.dim() == 2, "transition: h must be 2-D (tokens, D), got ", h_in.sizes());
  TORCH_CHECK(h_in.device().is_cpu(), "transition: h must be on the CPU");
  check_matrix(q_in, "transition", "Q", at::kFloat);
  check_matrix(m_in, "transition", "M", at::kFloat);
  const int64_t T = h_in.size(0), D = h_in.size(1), r = q_in.size(1);
  TORCH_CHECK(q_in.size(0) == D, "transition: Q must be (", D, ", r), got ", q_in.sizes());
  TORCH_CHECK(m_in.size(0) == r && m_in.size(1) == r, "transition: M must be (", r, ", ", r, "), got ", m_in.sizes());
  auto h = h_in.to(at::kFloat).contiguous();
  auto q = q_in.contiguous(), mm = m_in.contiguous();
  auto out = at::empty_like(h);
  const float* hp = h.data_ptr<float>();
  const float* qp = q.data_ptr<float>();
  const float* mp = mm.data_ptr<float>();
  float* op = out.data_ptr<float>();
  // Q^T (r, D), so the last product runs along contiguous d (vectorisable without reassociation:
  // each y[d] still sums j = 0 .. r-1 in order, as the per-row dot product would).
  std::vector<float> qt(static_cast<size_t>(r * D));
  for (int64_t d0 = 0; d0 < D; d0 += 64) {  // in blocks of 64 rows of Q, so reads and writes stay in cache
    const int64_t d1 = std::min(D, d0 + 64);
    for (int64_t j = 0; j < r; ++j)
      for (int64_t d = d0; d < d1; ++d) qt[j * D + d] = qp[d * r + j];
  }
  at::parallel_for(0, T, 8, [&](int64_t begin, int64_t end) {
    std::vector<float> u(static_cast<size_t>(r)), v(static_cast<size_t>(r)), acc(static_cast<size_t>(D));
    for (int64_t t = begin; t < end; ++t) {
      const float* row = hp + t * D;
      std::fill(u.begin(), u.end(), 0.0f);
      for (int64_t d = 0; d < D; ++d) {  // u = h Q
        const float hd = row[d];
        const float* qrow = qp + d * r;
        for (int64_t j = 0; j < r; ++j) u[j] += hd * qrow[j];
      }
      std::fill(v.begin(), v.end(), 0.0f);
      for (int64_t i = 0; i < r; ++i) {  // v = u M
        const float ui = u[i];
        const float* mrow = mp + i * r;
        for (int64_t j = 0; j < r; ++j) v[j] += ui * mrow[j];
      }
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t j = 0; j < r; ++j) {  // acc = v Q^T
        const float vj = v[j];
        const float* qtrow = qt.data() + j * D;
        for (int64_t d = 0; d < D; ++d) acc[d] += vj * qtrow[d];
      }
      float* y = op + t * D;
      for (int64_t d = 0; d < D; ++d) y[d] = row[d] + acc[d];  // y = h + v Q^T
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
  m.def("transition", &transition, "h + ((h @ Q) @ M) @ Q^T per row");
}
