// W4A4 prefill GEMM for Hopper (sm_90a) on CUTLASS 3.x / CuTe: TMA loads, a warp-specialized
// (ping-pong) int8 wgmma main loop, int32 accumulation (exact: the int4 codes are sign-extended to
// int8, |acc| <= 64 K < 2^24), and the dequant epilogue as an epilogue visitor tree:
//
//   out[m, n] = ((float(acc) - float(a_zero[m]) * float(w_sum[n])) * a_scale[m]) * w_scale[n]
//
// in float32, rounded once to the output dtype. float(acc) and float(a_zero) * float(w_sum) are exact
// (both below 2^24 in magnitude), so the subtraction is exact and the two products are rounded as in
// the CPU reference's float(acc - a_zero * w_sum) * a_scale * w_scale: float32 output is the same bits.
//
// Operands: activation codes int8 (m, k) row-major (quantize_act_int8), weight codes int8 (n, k)
// row-major, i.e. K-major for both as int8 wgmma requires (the weights unpacked once at load: twice
// the packed bytes, half of bf16's). The CUTLASS headers come from the pinned nvidia-cutlass wheel
// (pipeline.export.kernels.cutlass_include). Built for every arch; the kernel body exists only in an
// sm_90a build (CUTLASS guards it), and the host refuses other devices with a one-line error.
#include <cuda_runtime_api.h>

#include <cstdint>

#include "common.cuh"
#include "w4a4.cuh"

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"

namespace {

using rsq::check_launch;
using rsq::fail;

using namespace cute;

using ElementA = int8_t;
using ElementB = int8_t;
using ElementAcc = int32_t;
using ElementCompute = float;
using LayoutA = cutlass::layout::RowMajor;     // (m, k), K contiguous
using LayoutB = cutlass::layout::ColumnMajor;  // (k, n) column-major = the (n, k) row-major weight codes
using LayoutD = cutlass::layout::RowMajor;
constexpr int kAlignAB = 16;  // elements (bytes) per TMA-aligned access: K must be a multiple of 16

// 128 x 128 output tiles, 128 of K per stage (int8 wgmma takes k = 32 per instruction), one CTA per
// cluster; the ping-pong schedule overlaps one consumer warp group's epilogue with the other's MMAs.
using TileShape = Shape<_128, _128, _128>;
using ClusterShape = Shape<_1, _1, _1>;
using MainloopSchedule = cutlass::gemm::KernelTmaWarpSpecializedPingpong;
using EpilogueSchedule = cutlass::epilogue::TmaWarpSpecialized;

using namespace cutlass::epilogue::fusion;
// Per-row (token) vectors broadcast along n, per-column (output channel) vectors along m; the int32
// vectors are converted to float in the visitor.
using AZero = Sm90ColBroadcast<0, TileShape, int32_t, ElementCompute, Stride<_1, _0, int64_t>>;
using AScale = Sm90ColBroadcast<0, TileShape, float, ElementCompute, Stride<_1, _0, int64_t>>;
using WSum = Sm90RowBroadcast<0, TileShape, int32_t, ElementCompute, Stride<_0, _1, int64_t>>;
using WScale = Sm90RowBroadcast<0, TileShape, float, ElementCompute, Stride<_0, _1, int64_t>>;
template <template <class> class Op, class Out = ElementCompute>
using Compute = Sm90Compute<Op, Out, ElementCompute, cutlass::FloatRoundStyle::round_to_nearest>;

using ZeroTerm = Sm90EVT<Compute<cutlass::multiplies>, AZero, WSum>;                    // a_zero * w_sum
using Centered = Sm90EVT<Compute<cutlass::minus>, Sm90AccFetch, ZeroTerm>;             // acc - that
using RowScaled = Sm90EVT<Compute<cutlass::multiplies>, Centered, AScale>;             // * a_scale
template <class ElementD>
using Dequant = Sm90EVT<Compute<cutlass::multiplies, ElementD>, RowScaled, WScale>;  // * w_scale -> out

template <class ElementD>
struct Sm90Gemm {
  static constexpr int kAlignD = 128 / cutlass::sizeof_bits<ElementD>::value;
  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, ElementAcc, ElementCompute, void, LayoutD, kAlignD,
      ElementD, LayoutD, kAlignD, EpilogueSchedule, Dequant<ElementD>>::CollectiveOp;
  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, ElementA, LayoutA, kAlignAB, ElementB, LayoutB, kAlignAB,
      ElementAcc, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      MainloopSchedule>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop, CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
};

template <class ElementD>
cudaError_t run(const int8_t* a, const float* a_scale, const int32_t* a_zero, const int8_t* w, const float* w_scale,
                const int32_t* w_sum, void* out, int m, int n, int k, cudaStream_t stream, const char* op) {
  using Gemm = typename Sm90Gemm<ElementD>::Gemm;
  using StrideA = typename Gemm::GemmKernel::StrideA;
  using StrideB = typename Gemm::GemmKernel::StrideB;
  using StrideD = typename Gemm::GemmKernel::StrideD;
  const auto stride_a = cutlass::make_cute_packed_stride(StrideA{}, cute::make_shape(m, k, 1));
  const auto stride_b = cutlass::make_cute_packed_stride(StrideB{}, cute::make_shape(n, k, 1));
  const auto stride_d = cutlass::make_cute_packed_stride(StrideD{}, cute::make_shape(m, n, 1));
  typename Gemm::Arguments args{cutlass::gemm::GemmUniversalMode::kGemm,
                                {m, n, k, 1},
                                {a, stride_a, w, stride_b},
                                {{}, nullptr, stride_d, static_cast<ElementD*>(out), stride_d}};
  // Each node's arguments: {first child's, ..., last child's, its own}; a broadcast's: {ptr, default, stride}.
  args.epilogue.thread = {
      {                                          // RowScaled
       {                                         // Centered
        {},                                      // acc
        {{a_zero, 0, {_1{}, _0{}, int64_t(m)}},  // ZeroTerm: a_zero
         {w_sum, 0, {_0{}, _1{}, int64_t(n)}},   //           w_sum
         {}},
        {}},
       {a_scale, 0.f, {_1{}, _0{}, int64_t(m)}},  // a_scale
       {}},
      {w_scale, 0.f, {_0{}, _1{}, int64_t(n)}},  // w_scale
      {}};
  Gemm gemm;
  if (gemm.can_implement(args) != cutlass::Status::kSuccess) {
    return fail(cudaErrorInvalidValue, "%s: CUTLASS cannot run M=%d N=%d K=%d (K must be a multiple of %d, N of %d)",
                op, m, n, k, kAlignAB, Sm90Gemm<ElementD>::kAlignD);
  }
  const size_t workspace_bytes = Gemm::get_workspace_size(args);
  void* workspace = nullptr;
  if (workspace_bytes > 0) {
    cudaError_t err = cudaMallocAsync(&workspace, workspace_bytes, stream);
    if (err != cudaSuccess) return fail(err, "%s: workspace: %s", op, cudaGetErrorString(err));
  }
  cutlass::Status status = gemm.initialize(args, workspace, stream);
  if (status == cutlass::Status::kSuccess) status = gemm.run(stream);
  if (workspace != nullptr) cudaFreeAsync(workspace, stream);
  if (status != cutlass::Status::kSuccess) {
    return fail(cudaErrorLaunchFailure, "%s: the CUTLASS kernel failed (%s): %s", op,
                cutlassGetStatusString(status), cudaGetErrorString(cudaGetLastError()));
  }
  return check_launch(op);
}

}  // namespace

cudaError_t rsq_gemm_int8_sm90(const int8_t* a, const float* a_scale, const int32_t* a_zero, const int8_t* w,
                               const float* w_scale, const int32_t* w_sum, void* out, RsqDtype out_dtype, int64_t m,
                               int64_t n, int64_t k, cudaStream_t stream) {
  using rsq::fail;
  const char* op = "gemm_int8_sm90";
  if (m < 1 || n < 1 || k < 1 || m > INT32_MAX || n > INT32_MAX || k >= (int64_t(1) << 24)) {
    return fail(cudaErrorInvalidValue, "%s: M=%lld N=%lld K=%lld out of range (K < 2^24)", op,
                static_cast<long long>(m), static_cast<long long>(n), static_cast<long long>(k));
  }
  int device = 0, major = 0, minor = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  if (err != cudaSuccess) return fail(err, "%s: querying the device failed: %s", op, cudaGetErrorString(err));
  if (major != 9 || minor != 0) {
    return fail(cudaErrorNotSupported, "%s: needs an sm_90a device (H100/H200), this one is sm_%d%d", op, major, minor);
  }
  const int mi = static_cast<int>(m), ni = static_cast<int>(n), ki = static_cast<int>(k);
  switch (out_dtype) {
    case RsqDtype::kFloat32:
      return run<float>(a, a_scale, a_zero, w, w_scale, w_sum, out, mi, ni, ki, stream, op);
    case RsqDtype::kFloat16:
      return run<cutlass::half_t>(a, a_scale, a_zero, w, w_scale, w_sum, out, mi, ni, ki, stream, op);
    case RsqDtype::kBFloat16:
      return run<cutlass::bfloat16_t>(a, a_scale, a_zero, w, w_scale, w_sum, out, mi, ni, ki, stream, op);
  }
  return fail(cudaErrorInvalidValue, "%s: unsupported output dtype %d", op, static_cast<int>(out_dtype));
}
