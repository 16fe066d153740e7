// transition: out = h + ((h @ Q) @ M) @ Q^T for h (T, D), Q (D, r), M (r, r), r <= 128, float32
// compute, with no D x D matrix. Three launches, all with 256 threads and tiles of 16 tokens:
//   1. partial[s] = h[:, D_s] @ Q[D_s, :]   grid (token tiles, S): D is split in S contiguous
//      chunks so that even one token (decode) spreads the read of Q over many blocks;
//   2. V = (sum_s partial[s]) @ M          grid (token tiles): fixed summation order over s;
//   3. out = h + V @ Q^T                    grid (token tiles, D tiles of 128): the residual add is
//      the epilogue, so h is read once more and out written once.
// S depends on (T, D) only, so results are deterministic and the same on every device.
// Thread layout in 1 and 3: thread = (tg = tid / 32, cg = tid % 32) owns tokens {tg, tg + 8} and
// output columns {cg, cg + 32, cg + 64, cg + 96}: shared-memory reads are broadcasts (token side)
// or consecutive / padded (column side). Tuning left for later: tensor cores (tf32 or f16 mma)
// for the two products with Q, larger token tiles at prefill.
#include "common.cuh"

namespace rsq {
namespace {

constexpr int kTokTile = 16;   // tokens per block
constexpr int kThreads = 256;  // 8 warps: tg in 0..7 covers tokens tg and tg + 8
constexpr int kMaxR = 128;     // 4 columns per thread x 32 lanes
constexpr int kKChunk = 32;    // D per shared-memory step in kernel 1
constexpr int kDTile = 128;    // D per block in kernel 3
constexpr int kRChunk = 32;    // r per shared-memory step in kernel 3
constexpr int kTargetBlocks = 256;  // about two waves of kernel-1 blocks on a 132-SM H100

struct Split {
  int64_t parts;  // S
  int64_t chunk;  // D per part, a multiple of kKChunk
};

Split split_d(int64_t t, int64_t d) {
  const int64_t token_tiles = (t + kTokTile - 1) / kTokTile;
  const int64_t d_steps = (d + kKChunk - 1) / kKChunk;
  int64_t parts = (kTargetBlocks + token_tiles - 1) / token_tiles;
  parts = parts < 1 ? 1 : (parts > d_steps ? d_steps : parts);
  const int64_t chunk = ((d_steps + parts - 1) / parts) * kKChunk;
  return {(d + chunk - 1) / chunk, chunk};
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
transition_hq_kernel(const T* __restrict__ h, const float* __restrict__ q, float* __restrict__ partial, int t_total,
                     int d_total, int r, int d_chunk) {
  __shared__ float hs[kTokTile][kKChunk];
  __shared__ float qs[kKChunk][kMaxR];
  const int tid = threadIdx.x, tg = tid / 32, cg = tid % 32;
  const int t0 = blockIdx.x * kTokTile;
  const int d_begin = blockIdx.y * d_chunk;
  const int d_end = min(d_total, d_begin + d_chunk);

  float acc[2][4] = {};
  for (int d0 = d_begin; d0 < d_end; d0 += kKChunk) {
    for (int e = tid; e < kTokTile * kKChunk; e += kThreads) {
      const int tt = e / kKChunk, kk = e % kKChunk;
      const int tok = t0 + tt, dd = d0 + kk;
      hs[tt][kk] = (tok < t_total && dd < d_end) ? to_float(h[static_cast<int64_t>(tok) * d_total + dd]) : 0.0f;
    }
    // Rows d0 .. d0+31 of Q are one contiguous run of 32 * r floats.
    for (int e = tid; e < kKChunk * r; e += kThreads) {
      const int kk = e / r, c = e % r;
      qs[kk][c] = d0 + kk < d_end ? q[static_cast<int64_t>(d0) * r + e] : 0.0f;
    }
    __syncthreads();
#pragma unroll 4
    for (int kk = 0; kk < kKChunk; ++kk) {
      const float h0 = hs[tg][kk], h1 = hs[tg + 8][kk];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int c = cg + 32 * j;
        const float qv = c < r ? qs[kk][c] : 0.0f;
        acc[0][j] = fmaf(h0, qv, acc[0][j]);
        acc[1][j] = fmaf(h1, qv, acc[1][j]);
      }
    }
    __syncthreads();
  }
  float* out = partial + static_cast<int64_t>(blockIdx.y) * t_total * r;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int tok = t0 + tg + 8 * i;
    if (tok >= t_total) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int c = cg + 32 * j;
      if (c < r) out[static_cast<int64_t>(tok) * r + c] = acc[i][j];
    }
  }
}

__global__ void __launch_bounds__(kThreads)
transition_mix_kernel(const float* __restrict__ partial, int parts, const float* __restrict__ mix,
                      float* __restrict__ v, int t_total, int r) {
  __shared__ float us[kTokTile][kMaxR];
  const int tid = threadIdx.x, tg = tid / 32, cg = tid % 32;
  const int t0 = blockIdx.x * kTokTile;
  const int64_t part_stride = static_cast<int64_t>(t_total) * r;
  for (int e = tid; e < kTokTile * r; e += kThreads) {
    const int tt = e / r, c = e % r;
    const int tok = t0 + tt;
    float u = 0.0f;
    if (tok < t_total) {
      const float* src = partial + static_cast<int64_t>(tok) * r + c;
      for (int s = 0; s < parts; ++s) u += src[s * part_stride];
    }
    us[tt][c] = u;
  }
  __syncthreads();
  float acc[2][4] = {};
  for (int i = 0; i < r; ++i) {
    const float u0 = us[tg][i], u1 = us[tg + 8][i];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int c = cg + 32 * j;
      const float mv = c < r ? __ldg(mix + static_cast<int64_t>(i) * r + c) : 0.0f;
      acc[0][j] = fmaf(u0, mv, acc[0][j]);
      acc[1][j] = fmaf(u1, mv, acc[1][j]);
    }
  }
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int tok = t0 + tg + 8 * i;
    if (tok >= t_total) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int c = cg + 32 * j;
      if (c < r) v[static_cast<int64_t>(tok) * r + c] = acc[i][j];
    }
  }
}

// h (and x) and out may alias: each element is read by the thread that writes it, after kernel 1.
// out = h (+ x, the block output: the residual add fused) + V Q^T.
template <typename T>
__global__ void __launch_bounds__(kThreads)
transition_apply_kernel(const T* h, const T* x, const float* __restrict__ q, const float* __restrict__ v, T* out,
                        int t_total, int d_total, int r) {
  __shared__ float vs[kTokTile][kMaxR];
  __shared__ float qs[kDTile][kRChunk + 1];  // +1: column reads qs[d][c] over d are conflict-free
  const int tid = threadIdx.x, tg = tid / 32, dg = tid % 32;
  const int t0 = blockIdx.x * kTokTile;
  const int d0 = blockIdx.y * kDTile;
  for (int e = tid; e < kTokTile * r; e += kThreads) {
    const int tt = e / r, c = e % r;
    vs[tt][c] = t0 + tt < t_total ? v[static_cast<int64_t>(t0 + tt) * r + c] : 0.0f;
  }
  float acc[2][4] = {};
  for (int c0 = 0; c0 < r; c0 += kRChunk) {
    __syncthreads();  // vs written (first step) / previous qs consumed
    for (int e = tid; e < kDTile * kRChunk; e += kThreads) {
      const int dd = e / kRChunk, cc = e % kRChunk;
      const bool ok = d0 + dd < d_total && c0 + cc < r;
      qs[dd][cc] = ok ? q[static_cast<int64_t>(d0 + dd) * r + c0 + cc] : 0.0f;
    }
    __syncthreads();
    const int steps = min(kRChunk, r - c0);
    for (int cc = 0; cc < steps; ++cc) {
      const float v0 = vs[tg][c0 + cc], v1 = vs[tg + 8][c0 + cc];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float qv = qs[dg + 32 * j][cc];
        acc[0][j] = fmaf(v0, qv, acc[0][j]);
        acc[1][j] = fmaf(v1, qv, acc[1][j]);
      }
    }
  }
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int tok = t0 + tg + 8 * i;
    if (tok >= t_total) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int d = d0 + dg + 32 * j;
      if (d >= d_total) continue;
      const int64_t idx = static_cast<int64_t>(tok) * d_total + d;
      const float base = x == nullptr ? to_float(h[idx]) : to_float(h[idx]) + to_float(x[idx]);
      out[idx] = from_float<T>(base + acc[i][j]);
    }
  }
}

}  // namespace
}  // namespace rsq

size_t rsq_transition_workspace_bytes(int64_t t, int64_t d, int64_t r) {
  if (t <= 0 || d <= 0 || r <= 0) return 0;
  const rsq::Split split = rsq::split_d(t, d);
  return sizeof(float) * static_cast<size_t>((split.parts + 1) * t * r);
}

cudaError_t rsq_transition(const void* h, const void* x, void* out, RsqDtype dtype, int64_t t, int64_t d,
                           const float* q, const float* mix, int64_t r, void* workspace, size_t workspace_bytes,
                           cudaStream_t stream) {
  using namespace rsq;
  const char* op = "transition";
  if (r < 1 || r > kMaxR) {
    return fail(cudaErrorInvalidValue, "%s: rank r=%lld must be in [1, %d]", op, static_cast<long long>(r), kMaxR);
  }
  if (t < 0 || d < 1 || t > INT32_MAX / 2 || d > INT32_MAX / 2 || t * r > INT32_MAX) {
    return fail(cudaErrorInvalidValue, "%s: shape (T=%lld, D=%lld) out of range", op, static_cast<long long>(t),
                static_cast<long long>(d));
  }
  if (t == 0) return cudaSuccess;
  const size_t need = rsq_transition_workspace_bytes(t, d, r);
  if (workspace == nullptr || workspace_bytes < need) {
    return fail(cudaErrorInvalidValue, "%s: workspace of %zu bytes given, %zu needed", op, workspace_bytes, need);
  }
  const Split split = split_d(t, d);
  float* partial = static_cast<float*>(workspace);
  float* v = partial + split.parts * t * r;
  const unsigned int token_tiles = ceil_div(t, kTokTile);
  const int ti = static_cast<int>(t), di = static_cast<int>(d), ri = static_cast<int>(r);
  return dispatch_dtype(dtype, op, [&](auto tag) {
    using T = decltype(tag);
    const T* hs = static_cast<const T*>(h);
    transition_hq_kernel<T><<<dim3(token_tiles, static_cast<unsigned int>(split.parts)), kThreads, 0, stream>>>(
        hs, q, partial, ti, di, ri, static_cast<int>(split.chunk));
    cudaError_t err = check_launch(op);
    if (err != cudaSuccess) return err;
    transition_mix_kernel<<<token_tiles, kThreads, 0, stream>>>(partial, static_cast<int>(split.parts), mix, v, ti, ri);
    err = check_launch(op);
    if (err != cudaSuccess) return err;
    transition_apply_kernel<T><<<dim3(token_tiles, ceil_div(d, kDTile)), kThreads, 0, stream>>>(
        hs, static_cast<const T*>(x), q, v, static_cast<T*>(out), ti, di, ri);
    return check_launch(op);
  });
}
