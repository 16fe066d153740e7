// Torch bindings of the W4A4 CUDA ops: check shapes, dtypes and devices (one clear message each),
// allocate outputs on the input's device, and call the host API of w4a4.cuh on the current stream.
// Built with torch.utils.cpp_extension together with the .cu files, where torch has CUDA. The
// functions mirror the CPU extension (cuda_ext/cpu/w4a4_cpu.cpp) name for name; the differences:
// gemm_w4a4 returns float16 by default (out_dtype=torch.float32 gives the CPU's float32, bit for bit),
// gemm_* take path="auto" | "s4" | "s8" (validation of the other tensor-core path), and
// hadamard_quantize_act exists only here (the CPU equivalent is quantize_act(hadamard(x.float(), base))).
#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <string>
#include <vector>

#include "w4a4.cuh"

namespace {

constexpr int64_t kAlign = 32;

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

void check_status(cudaError_t status) { TORCH_CHECK(status == cudaSuccess, rsq_last_error()); }

void check_cuda(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got one on ", t.device());
}

void check_on(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name) {
  check_cuda(t, op, name);
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but the input is on ", ref.device());
}

void check_matrix(const at::Tensor& t, const char* op, const char* name, at::ScalarType dtype) {
  check_cuda(t, op, name);
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
}

void check_vector(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name, at::ScalarType dtype,
                  int64_t n) {
  check_on(t, ref, op, name);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, op, ": ", name, " must have shape (", n, "), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
}

void check_k(int64_t k, const char* op) {
  TORCH_CHECK(k > 0 && k % kAlign == 0, op, ": K=", k, " must be a positive multiple of ", kAlign, " (int4 layout)");
}

void check_float_input(const at::Tensor& x, const char* op, const char* name) {
  check_cuda(x, op, name);
  TORCH_CHECK(x.dim() == 2, op, ": ", name, " must be 2-D (rows, features), got shape ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": ", name, " must be floating, got ", x.scalar_type());
}

// Contiguous and 16-byte aligned (the kernels' vector loads): a view at an odd offset is copied.
at::Tensor prepared(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  if (reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 != 0) c = c.clone(at::MemoryFormat::Contiguous);
  return c;
}

// The kernels read float32 and float16; other float dtypes (bfloat16, float64) go through float32.
at::Tensor kernel_float(const at::Tensor& x) {
  const auto dtype = x.scalar_type();
  return prepared(dtype == at::kFloat || dtype == at::kHalf ? x : x.to(at::kFloat));
}

RsqDtype rsq_dtype(const at::Tensor& t) { return t.scalar_type() == at::kHalf ? RsqDtype::kFloat16 : RsqDtype::kFloat32; }

RsqGemmPath parse_path(const std::string& path, const char* op) {
  if (path == "auto") return RsqGemmPath::kAuto;
  if (path == "s4") return RsqGemmPath::kS4;
  TORCH_CHECK(path == "s8", op, ": path must be 'auto', 's4' or 's8', got '", path, "'");
  return RsqGemmPath::kS8;
}

void check_gemm_operands(const at::Tensor& a, const at::Tensor& w, const char* op) {
  check_matrix(a, op, "a (packed activations)", at::kByte);
  check_matrix(w, op, "w (packed weights)", at::kByte);
  check_on(w, a, op, "w (packed weights)");
  check_k(2 * a.size(1), op);
  TORCH_CHECK(a.size(1) == w.size(1), op, ": a has K=", 2 * a.size(1), " but w has K=", 2 * w.size(1));
}

void check_base(const at::Tensor& base, const at::Tensor& x, int64_t n, const char* op) {
  check_on(base, x, op, "base");
  TORCH_CHECK(base.dim() == 2 && base.size(0) == base.size(1) && base.size(0) >= 1, op,
              ": base must be a square matrix, got shape ", base.sizes());
  TORCH_CHECK(base.scalar_type() == at::kFloat, op, ": base must be float32, got ", base.scalar_type());
  const int64_t m = base.size(0);
  TORCH_CHECK(n % m == 0, op, ": n=", n, " is not a multiple of the base order ", m);
  const int64_t p = n / m;
  TORCH_CHECK((p & (p - 1)) == 0, op, ": n / m = ", p, " must be a power of two");
}

// The dequant epilogue's vectors: a_scale float32 (M), a_zero int32 (M), w_scale float32 (N), w_sum int32 (N).
void check_epilogue_vectors(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& a_zero,
                            const at::Tensor& w_scale, const at::Tensor& w_sum, int64_t m, int64_t n, const char* op) {
  check_vector(a_scale, a, op, "a_scale", at::kFloat, m);
  check_vector(a_zero, a, op, "a_zero", at::kInt, m);
  check_vector(w_scale, a, op, "w_scale", at::kFloat, n);
  check_vector(w_sum, a, op, "w_sum", at::kInt, n);
}

void check_half_or_float(at::ScalarType out_dtype, const char* op) {
  TORCH_CHECK(out_dtype == at::kHalf || out_dtype == at::kFloat, op, ": out_dtype must be float16 or float32, got ",
              out_dtype);
}

}  // namespace

// int8 codes (R, K) in [-8, 7] -> packed uint8 (R, K/2). Synchronizes once to report out-of-range codes.
at::Tensor pack_int4(const at::Tensor& codes) {
  const char* op = "pack_int4";
  check_matrix(codes, op, "codes", at::kChar);
  check_k(codes.size(1), op);
  const c10::cuda::CUDAGuard guard(codes.device());
  const at::Tensor c = prepared(codes);
  const int64_t rows = c.size(0), k = c.size(1);
  at::Tensor out = at::empty({rows, k / 2}, c.options().dtype(at::kByte));
  at::Tensor out_of_range = at::zeros({1}, c.options().dtype(at::kInt));
  check_status(rsq_pack_int4(c.data_ptr<int8_t>(), out.data_ptr<uint8_t>(), rows, k, out_of_range.data_ptr<int>(),
                             current_stream()));
  TORCH_CHECK(out_of_range.item<int>() == 0, op, ": codes must lie in [-8, 7]");
  return out;
}

// packed uint8 (R, K/2) -> int8 codes (R, K), sign-extended.
at::Tensor unpack_int4(const at::Tensor& packed) {
  const char* op = "unpack_int4";
  check_matrix(packed, op, "packed", at::kByte);
  check_k(2 * packed.size(1), op);
  const c10::cuda::CUDAGuard guard(packed.device());
  const at::Tensor p = prepared(packed);
  const int64_t rows = p.size(0), k = 2 * p.size(1);
  at::Tensor out = at::empty({rows, k}, p.options().dtype(at::kChar));
  check_status(rsq_unpack_int4(p.data_ptr<uint8_t>(), out.data_ptr<int8_t>(), rows, k, current_stream()));
  return out;
}

// Per-token asymmetric int4 (the fake quantizer's arithmetic): x (M, K) -> [packed (M, K/2) uint8,
// scale (M) float32, zero - 8 (M) int32].
std::vector<at::Tensor> quantize_act(const at::Tensor& x_in, double clip_ratio) {
  const char* op = "quantize_act";
  check_float_input(x_in, op, "x");
  check_k(x_in.size(1), op);
  TORCH_CHECK(clip_ratio > 0.0 && clip_ratio <= 1.0, op, ": clip_ratio=", clip_ratio, " must be in (0, 1]");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = kernel_float(x_in);
  const int64_t m = x.size(0), k = x.size(1);
  at::Tensor packed = at::empty({m, k / 2}, x.options().dtype(at::kByte));
  at::Tensor scale = at::empty({m}, x.options().dtype(at::kFloat));
  at::Tensor zero = at::empty({m}, x.options().dtype(at::kInt));
  check_status(rsq_quantize_act(x.data_ptr(), rsq_dtype(x), m, k, static_cast<float>(clip_ratio),
                                packed.data_ptr<uint8_t>(), scale.data_ptr<float>(), zero.data_ptr<int32_t>(),
                                current_stream()));
  return {packed, scale, zero};
}

// int32 (M, N) = unpack(a) @ unpack(w)^T, exact.
at::Tensor gemm_int4(const at::Tensor& a_in, const at::Tensor& w_in, const std::string& path) {
  const char* op = "gemm_int4";
  check_gemm_operands(a_in, w_in, op);
  const RsqGemmPath gemm_path = parse_path(path, op);
  const c10::cuda::CUDAGuard guard(a_in.device());
  const at::Tensor a = prepared(a_in), w = prepared(w_in);
  const int64_t m = a.size(0), n = w.size(0), k = 2 * a.size(1);
  at::Tensor out = at::empty({m, n}, a.options().dtype(at::kInt));
  check_status(rsq_gemm_int4(a.data_ptr<uint8_t>(), w.data_ptr<uint8_t>(), out.data_ptr<int32_t>(), m, n, k, gemm_path,
                             current_stream()));
  return out;
}

// (M, N) = a_scale[m] * w_scale[n] * (acc[m, n] - a_zero[m] * w_sum[n]) in out_dtype (float16 or float32).
at::Tensor gemm_w4a4(const at::Tensor& a_in, const at::Tensor& a_scale, const at::Tensor& a_zero, const at::Tensor& w_in,
                     const at::Tensor& w_scale, const at::Tensor& w_sum, at::ScalarType out_dtype,
                     const std::string& path) {
  const char* op = "gemm_w4a4";
  check_gemm_operands(a_in, w_in, op);
  const int64_t m = a_in.size(0), n = w_in.size(0), k = 2 * a_in.size(1);
  check_epilogue_vectors(a_in, a_scale, a_zero, w_scale, w_sum, m, n, op);
  check_half_or_float(out_dtype, op);
  const RsqGemmPath gemm_path = parse_path(path, op);
  const c10::cuda::CUDAGuard guard(a_in.device());
  const at::Tensor a = prepared(a_in), w = prepared(w_in);
  const at::Tensor as = a_scale.contiguous(), az = a_zero.contiguous(), ws = w_scale.contiguous(), wz = w_sum.contiguous();
  at::Tensor out = at::empty({m, n}, a.options().dtype(out_dtype));
  check_status(rsq_gemm_w4a4(a.data_ptr<uint8_t>(), as.data_ptr<float>(), az.data_ptr<int32_t>(), w.data_ptr<uint8_t>(),
                             ws.data_ptr<float>(), wz.data_ptr<int32_t>(), out.data_ptr(),
                             out_dtype == at::kHalf ? RsqDtype::kFloat16 : RsqDtype::kFloat32, m, n, k, gemm_path,
                             current_stream()));
  return out;
}

// Decode (1 <= M <= 16): the same (M, N) as gemm_w4a4 by a split-K GEMV over the packed weights (dp4a on
// the nibbles, exact int32 partial sums); split_k <= 0 picks it from the GPU's SM count.
at::Tensor gemv_w4a4(const at::Tensor& a_in, const at::Tensor& a_scale, const at::Tensor& a_zero, const at::Tensor& w_in,
                     const at::Tensor& w_scale, const at::Tensor& w_sum, at::ScalarType out_dtype, int64_t split_k) {
  const char* op = "gemv_w4a4";
  check_gemm_operands(a_in, w_in, op);
  const int64_t m = a_in.size(0), n = w_in.size(0), k = 2 * a_in.size(1);
  check_epilogue_vectors(a_in, a_scale, a_zero, w_scale, w_sum, m, n, op);
  check_half_or_float(out_dtype, op);
  const c10::cuda::CUDAGuard guard(a_in.device());
  const at::Tensor a = prepared(a_in), w = prepared(w_in);
  const at::Tensor as = a_scale.contiguous(), az = a_zero.contiguous(), ws = w_scale.contiguous(), wz = w_sum.contiguous();
  if (split_k <= 0) {
    int sms = 0;
    TORCH_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, a.get_device()) == cudaSuccess, op,
                ": querying the SM count failed");
    split_k = rsq_gemv_split_k(n, k, sms);
  }
  at::Tensor out = at::empty({m, n}, a.options().dtype(out_dtype));
  const size_t workspace_bytes = rsq_gemv_workspace_bytes(m, n, static_cast<int>(split_k));
  at::Tensor workspace = at::empty({static_cast<int64_t>(workspace_bytes / 4) + 1}, a.options().dtype(at::kInt));
  check_status(rsq_gemv_w4a4(a.data_ptr<uint8_t>(), as.data_ptr<float>(), az.data_ptr<int32_t>(), w.data_ptr<uint8_t>(),
                             ws.data_ptr<float>(), wz.data_ptr<int32_t>(), out.data_ptr(),
                             out_dtype == at::kHalf ? RsqDtype::kFloat16 : RsqDtype::kFloat32, m, n, k,
                             static_cast<int>(split_k), workspace.data_ptr(), workspace_bytes, current_stream()));
  return out;
}

// Hopper (sm_90a): the same (M, N) as gemm_w4a4 from int8 codes (one per byte, in [-8, 7]): a (M, K),
// w (N, K) (unpack_int4 of the packed ones), on CUTLASS's TMA + warp-specialized int8 wgmma GEMM;
// out_dtype float32 (the CPU reference's bits), float16 or bfloat16. Any other GPU: a clear error.
at::Tensor gemm_int8_sm90(const at::Tensor& a_in, const at::Tensor& a_scale, const at::Tensor& a_zero,
                          const at::Tensor& w_in, const at::Tensor& w_scale, const at::Tensor& w_sum,
                          at::ScalarType out_dtype) {
  const char* op = "gemm_int8_sm90";
  check_matrix(a_in, op, "a", at::kChar);
  check_matrix(w_in, op, "w", at::kChar);
  check_on(w_in, a_in, op, "w");
  TORCH_CHECK(a_in.size(1) == w_in.size(1), op, ": a is (M, ", a_in.size(1), ") but w is (N, ", w_in.size(1), ")");
  const int64_t m = a_in.size(0), n = w_in.size(0), k = a_in.size(1);
  check_epilogue_vectors(a_in, a_scale, a_zero, w_scale, w_sum, m, n, op);
  TORCH_CHECK(out_dtype == at::kHalf || out_dtype == at::kFloat || out_dtype == at::kBFloat16, op,
              ": out_dtype must be float32, float16 or bfloat16, got ", out_dtype);
  const c10::cuda::CUDAGuard guard(a_in.device());
  const at::Tensor a = a_in.contiguous(), w = w_in.contiguous();
  const at::Tensor as = a_scale.contiguous(), az = a_zero.contiguous(), ws = w_scale.contiguous(), wz = w_sum.contiguous();
  at::Tensor out = at::empty({m, n}, a.options().dtype(out_dtype));
  const RsqDtype dtype = out_dtype == at::kHalf ? RsqDtype::kFloat16
                         : out_dtype == at::kBFloat16 ? RsqDtype::kBFloat16 : RsqDtype::kFloat32;
  check_status(rsq_gemm_int8_sm90(a.data_ptr<int8_t>(), as.data_ptr<float>(), az.data_ptr<int32_t>(),
                                  w.data_ptr<int8_t>(), ws.data_ptr<float>(), wz.data_ptr<int32_t>(), out.data_ptr(),
                                  dtype, m, n, k, current_stream()));
  return out;
}

// y = x @ kron(base, Sylvester(n / m)) / sqrt(n) along the last dim, in x's dtype.
at::Tensor hadamard(const at::Tensor& x_in, const at::Tensor& base_in) {
  const char* op = "hadamard";
  check_float_input(x_in, op, "x");
  const int64_t n = x_in.size(1);
  check_base(base_in, x_in, n, op);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = kernel_float(x_in), base = base_in.contiguous();
  at::Tensor y = at::empty_like(x);
  check_status(rsq_hadamard(x.data_ptr(), y.data_ptr(), rsq_dtype(x), x.size(0), n, base.data_ptr<float>(),
                            base.size(0), current_stream()));
  return y.scalar_type() == x_in.scalar_type() ? y : y.to(x_in.scalar_type());
}

// quantize_act of the float32 hadamard(x, base), one launch: [packed, scale, zero - 8].
std::vector<at::Tensor> hadamard_quantize_act(const at::Tensor& x_in, const at::Tensor& base_in, double clip_ratio) {
  const char* op = "hadamard_quantize_act";
  check_float_input(x_in, op, "x");
  const int64_t n = x_in.size(1);
  check_k(n, op);
  check_base(base_in, x_in, n, op);
  TORCH_CHECK(clip_ratio > 0.0 && clip_ratio <= 1.0, op, ": clip_ratio=", clip_ratio, " must be in (0, 1]");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = kernel_float(x_in), base = base_in.contiguous();
  const int64_t m = x.size(0);
  at::Tensor packed = at::empty({m, n / 2}, x.options().dtype(at::kByte));
  at::Tensor scale = at::empty({m}, x.options().dtype(at::kFloat));
  at::Tensor zero = at::empty({m}, x.options().dtype(at::kInt));
  check_status(rsq_hadamard_quantize_act(x.data_ptr(), rsq_dtype(x), m, n, base.data_ptr<float>(), base.size(0),
                                         static_cast<float>(clip_ratio), packed.data_ptr<uint8_t>(),
                                         scale.data_ptr<float>(), zero.data_ptr<int32_t>(), current_stream()));
  return {packed, scale, zero};
}

// out = h (+ x) + ((h @ Q) @ M) @ Q^T per row, float32 compute, in h's dtype (no D x D matrix); x, where
// given, is added in the same pass (the residual add of the block output).
at::Tensor transition(const at::Tensor& h_in, const at::Tensor& q_in, const at::Tensor& m_in,
                      const c10::optional<at::Tensor>& x_in) {
  const char* op = "transition";
  check_float_input(h_in, op, "h");
  check_on(q_in, h_in, op, "Q");
  check_on(m_in, h_in, op, "M");
  TORCH_CHECK(q_in.dim() == 2 && q_in.scalar_type() == at::kFloat, op, ": Q must be a 2-D float32 matrix, got ",
              q_in.scalar_type(), " of shape ", q_in.sizes());
  TORCH_CHECK(m_in.scalar_type() == at::kFloat, op, ": M must be float32, got ", m_in.scalar_type());
  const int64_t t = h_in.size(0), d = h_in.size(1), r = q_in.size(1);
  TORCH_CHECK(q_in.size(0) == d, op, ": Q must be (", d, ", r), got ", q_in.sizes());
  TORCH_CHECK(m_in.dim() == 2 && m_in.size(0) == r && m_in.size(1) == r, op, ": M must be (", r, ", ", r, "), got ",
              m_in.sizes());
  TORCH_CHECK(r >= 1 && r <= 128, op, ": rank r=", r, " must be in [1, 128]");
  const c10::cuda::CUDAGuard guard(h_in.device());
  const at::Tensor h = kernel_float(h_in), q = q_in.contiguous(), mix = m_in.contiguous();
  at::Tensor x;
  if (x_in.has_value() && x_in->defined()) {
    check_on(*x_in, h_in, op, "x");
    TORCH_CHECK(x_in->sizes() == h_in.sizes(), op, ": x must have h's shape ", h_in.sizes(), ", got ", x_in->sizes());
    x = x_in->to(h.scalar_type()).contiguous();
  }
  at::Tensor out = at::empty_like(h);
  const size_t workspace_bytes = rsq_transition_workspace_bytes(t, d, r);
  at::Tensor workspace = at::empty({static_cast<int64_t>((workspace_bytes + 3) / 4)}, h.options().dtype(at::kFloat));
  check_status(rsq_transition(h.data_ptr(), x.defined() ? x.data_ptr() : nullptr, out.data_ptr(), rsq_dtype(h), t, d,
                              q.data_ptr<float>(),
                              mix.data_ptr<float>(), r, workspace.data_ptr(), workspace_bytes, current_stream()));
  return out.scalar_type() == h_in.scalar_type() ? out : out.to(h_in.scalar_type());
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "W4A4 CUDA ops (int4 pack/unpack, activation quant, int4 GEMM, Hadamard, transition)";
  m.def("pack_int4", &pack_int4, "int8 codes (R, K) -> packed uint8 (R, K/2), low nibble = even k", py::arg("codes"));
  m.def("unpack_int4", &unpack_int4, "packed uint8 (R, K/2) -> int8 codes (R, K)", py::arg("packed"));
  m.def("quantize_act", &quantize_act, "per-token asymmetric int4: x (M, K) -> [packed, scale, zero]", py::arg("x"),
        py::arg("clip_ratio") = 1.0);
  m.def("gemm_int4", &gemm_int4, "int32 (M, N) = A (M, K) @ W (N, K)^T on packed int4", py::arg("a"), py::arg("w"),
        py::arg("path") = std::string("auto"));
  m.def("gemm_w4a4", &gemm_w4a4, "(M, N) int4 GEMM with the dequant epilogue, float16 (default) or float32",
        py::arg("a"), py::arg("a_scale"), py::arg("a_zero"), py::arg("w"), py::arg("w_scale"), py::arg("w_sum"),
        py::arg("out_dtype") = at::kHalf, py::arg("path") = std::string("auto"));
  m.def("gemv_w4a4", &gemv_w4a4, "(M <= 16, N) decode GEMV on packed int4, split-K, dequant epilogue", py::arg("a"),
        py::arg("a_scale"), py::arg("a_zero"), py::arg("w"), py::arg("w_scale"), py::arg("w_sum"),
        py::arg("out_dtype") = at::kHalf, py::arg("split_k") = 0);
  m.def("gemm_int8_sm90", &gemm_int8_sm90, "(M, N) from int8 codes on Hopper's int8 wgmma (CUTLASS), dequant epilogue",
        py::arg("a"), py::arg("a_scale"), py::arg("a_zero"), py::arg("w"), py::arg("w_scale"), py::arg("w_sum"),
        py::arg("out_dtype") = at::kBFloat16);
  m.def("hadamard", &hadamard, "x @ kron(base, Sylvester) / sqrt(n) along the last dim", py::arg("x"), py::arg("base"));
  m.def("hadamard_quantize_act", &hadamard_quantize_act, "quantize_act(hadamard(x, base)) in one launch", py::arg("x"),
        py::arg("base"), py::arg("clip_ratio") = 1.0);
  m.def("transition", &transition, "h (+ x) + ((h @ Q) @ M) @ Q^T per row", py::arg("h"), py::arg("Q"), py::arg("M"),
        py::arg("x") = py::none());
}
