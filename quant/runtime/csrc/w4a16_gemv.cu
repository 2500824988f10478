// W4A16 GEMV for 1-4 activation rows: y[m, n] = sum_k x[m, k] * q[n, k] * s[n, k / group] (+ y[m, n]).
//
// Weight layout (made once at load, quant/runtime/cuda_ext.py: pack_w4g): int32 words [N, K/8]; word j of row n
// holds k = 8j..8j+7 as unsigned nibbles q + 8, nibble p holding k offset {0,2,4,6,1,3,5,7}[p], so that one LOP3
// against the float16 exponent of 1024 puts two consecutive k's into a half2 (Marlin's dequantization): the low
// nibbles of each 16-bit half are (k0, k1) and, after >> 8, (k4, k5); the second nibbles, 16x, are (k2, k3) and
// (k6, k7). Each lane streams 16 bytes (32 weights, within one group because group >= 32) per row per chunk with
// non-caching loads, U chunks of R rows in flight before any arithmetic.
//
// One row (decode at batch 1) can bring the pre-quant scale along (PRO_PREQUANT): every block first writes x * pre
// into shared memory, rounded as act_prep rounds it (cuda_kernels._prologue), which saves that launch; or the
// residual stream's RMSNorm as well (PRO_NORM, KernelConfig.norm_prologue): every block computes the row's
// statistics itself while its first weights are on their way, in place of the previous GEMV's serial THEN_NORM
// tail, with the same bits (gemv::stage_norm). (In the Triton GEMV, where nothing overlaps them,
// RMSNorm and SiLU * gate done that way measured slower end to end than one act_prep launch:
// experiments/results/gpu/kernels.)
//
// Precision contract: products x * q are summed in half2 over one word (4 per half, |x * q| <= 8 |x|, so no
// overflow below |x| ~ 2000), then in float32; the group scale is applied in float32 once per chunk; the residual
// is added in float32 and rounded to float16 once.
#include <cuda_fp16.h>
#include <cstdint>

#include "gemv_common.cuh"

namespace {

using gemv::WARPS, gemv::load_chunks, gemv::word, gemv::ThenArgs, gemv::THEN_NONE, gemv::THEN_SILU, gemv::THEN_NORM;
using gemv::as_h2, gemv::as_u32, gemv::dequant_word;

// PRO_GLOBAL: x read as given; PRO_PREQUANT: x * pre staged; PRO_NORM: RMSNorm(x) * nw (* pre, if any) staged
enum Prologue { PRO_GLOBAL = 0, PRO_PREQUANT = 1, PRO_NORM = 2 };

// The staged row x * pre in shared memory: the 16-byte unit j (k = 32c + 8j .. + 7) of chunk c sits at unit
// j * C + c, so that the lanes of a warp, reading consecutive chunks' unit j, read consecutive 16 bytes (no bank
// conflicts). batch (KernelConfig.w4g_stage_batch): a thread's loads of x and pre issued STAGE_BATCH units at a time,
// all before any is used; else the plain loop, which nvcc issues four units at a time: a memory round trip per four
// units a thread, ~5 one after the other at down_proj's K = 11008 (Nsight Compute, experiments/results/gpu/kernels
// stage 26).
constexpr int STAGE_BATCH = 8;
// Where unit u of the row (chunk u >> 2, its 16 bytes j = u & 3) sits in the staged row of C chunks
__device__ __forceinline__ int staged_at(int u, int C) { return (u & 3) * C + (u >> 2); }
__device__ __forceinline__ void stage_row(uint4* xs, const half* x, const half* pre, int K, bool batch) {
  constexpr int T = WARPS * 32;
  const int C = K >> 5, units = K >> 3;
  const uint4 *x8 = reinterpret_cast<const uint4*>(x), *p8 = reinterpret_cast<const uint4*>(pre);
  if (batch) {
    for (int u0 = threadIdx.x; u0 < units; u0 += STAGE_BATCH * T) {
      uint4 a[STAGE_BATCH], b[STAGE_BATCH];
#pragma unroll
      for (int h = 0; h < STAGE_BATCH; ++h) {
        const int u = u0 + h * T;
        if (u < units) {
          a[h] = __ldg(x8 + u);
          b[h] = __ldg(p8 + u);
        }
      }
#pragma unroll
      for (int h = 0; h < STAGE_BATCH; ++h) {
        const int u = u0 + h * T;
        if (u < units) xs[staged_at(u, C)] = gemv::hmul8(a[h], b[h]);
      }
    }
  } else {
    for (int u = threadIdx.x; u < units; u += T) xs[staged_at(u, C)] = gemv::hmul8(__ldg(x8 + u), __ldg(p8 + u));
  }
  __syncthreads();
}

// The prologue's staging (PRO_PREQUANT, PRO_NORM), after the first weight loads were issued.
template <int PRO>
__device__ __forceinline__ void stage(uint4* xs, const half* x, const half* pre, const half* nw, int K, float eps,
                                      bool batch) {
  if constexpr (PRO == PRO_PREQUANT) stage_row(xs, x, pre, K, batch);
  // PRO_NORM: xs as stage_row's, of (nw * (x * rstd rounded)) * pre, as the tail and then PRO_PREQUANT round them
  if constexpr (PRO == PRO_NORM)
    gemv::stage_norm(x, nw, pre, K, eps, 0, 1.f, [&](int u, const uint4& v) { xs[staged_at(u, K >> 5)] = v; });
}

// One lane round: chunks c0 + 32u + lane (u < U) of the R rows, already loaded into wv, against x (or the staged
// row), into acc[m][r] (float32, the group scale applied once per chunk).
template <int M, int R, int U, int PRO>
__device__ __forceinline__ void mac_round(const uint4 (&wv)[U][R], const half* x, int64_t ldx, const uint4* xs,
                                          const half* s, const int (&rows)[R], int C, int G, int cshift, int c0,
                                          int lane, float (&acc)[M][R]) {
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int c = c0 + u * 32 + lane;
    if (c >= C) break;
    float part[M][R];
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
      for (int r = 0; r < R; ++r) part[m][r] = 0.f;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      half2 xv[M][4];
#pragma unroll
      for (int m = 0; m < M; ++m) {
        const uint4 xr = PRO != PRO_GLOBAL ? xs[j * C + c]
                                           : __ldg(reinterpret_cast<const uint4*>(x + m * ldx + c * 32 + j * 8));
        xv[m][0] = as_h2(xr.x); xv[m][1] = as_h2(xr.y); xv[m][2] = as_h2(xr.z); xv[m][3] = as_h2(xr.w);
      }
#pragma unroll
      for (int r = 0; r < R; ++r) {
        half2 d[4];
        dequant_word(word(wv[u][r], j), d);
#pragma unroll
        for (int m = 0; m < M; ++m) {
          half2 a = __hmul2(d[0], xv[m][0]);
          a = __hfma2(d[1], xv[m][1], a);
          a = __hfma2(d[2], xv[m][2], a);
          a = __hfma2(d[3], xv[m][3], a);
          const float2 f = __half22float2(a);
          part[m][r] += f.x + f.y;
        }
      }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const float sc = __half2float(s[(int64_t)rows[r] * G + (c >> cshift)]);
#pragma unroll
      for (int m = 0; m < M; ++m) acc[m][r] = fmaf(sc, part[m][r], acc[m][r]);
    }
  }
}

// Row block vb done: the lanes' sums reduced, then stored by lane 0 (added to y when accumulating) or, THEN_SILU,
// met with their partners (store_silu_pairs); acc is left zero for the next row block.
template <int M, int R, int THEN>
__device__ __forceinline__ void finish_rows(float (&acc)[M][R], half* y, int64_t ldy, int N, bool accumulate,
                                            const ThenArgs& then, int vb, int lane) {
  const int n0 = (vb * WARPS + (threadIdx.x >> 5)) * R;  // warps past N computed a valid row: stored none
  float res[M][R];
  if (THEN != THEN_SILU && accumulate && lane == 0) gemv::load_rows(res, y, ldy, n0, N);
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int r = 0; r < R; ++r) {
      float v = acc[m][r];
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
      acc[m][r] = v;
    }
  if constexpr (THEN == THEN_SILU) {
    gemv::store_silu_pairs<R>(acc[0], then, N, vb);
  } else if (lane == 0) {
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
      for (int r = 0; r < R; ++r)
        if (n0 + r < N) y[m * ldy + n0 + r] = __float2half_rn(accumulate ? res[m][r] + acc[m][r] : acc[m][r]);
  }
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int r = 0; r < R; ++r) acc[m][r] = 0.f;
}

// M activation rows, R weight rows per warp, U chunks of 32 k per lane in flight; one block per row block;
// PRO_PREQUANT: M == 1, the row staged in shared memory (K * 2 bytes, dynamic); THEN (M == 1): the epilogue's work
// for the next linear (gemv_common.cuh). (PRO_NORM: the persistent form only.)
template <int M, int R, int U, int PRO, int THEN>
__global__ void __launch_bounds__(WARPS * 32) w4a16_gemv_kernel(
    const half* __restrict__ x, int64_t ldx, const uint4* __restrict__ w, const half* __restrict__ s,
    half* __restrict__ y, int64_t ldy, int N, int K, int gshift, bool accumulate, const half* __restrict__ pre,
    ThenArgs then, bool batch) {
  static_assert(PRO != PRO_NORM, "PRO_NORM: the persistent form only");
  extern __shared__ uint4 xs[];
  const int lane = threadIdx.x & 31;
  const int C = K >> 5;                 // 32-weight chunks per row (uint4 per row)
  const int G = K >> gshift;            // scales per row
  int rows[R];
#pragma unroll
  for (int r = 0; r < R; ++r) rows[r] = gemv::weight_row<R, THEN>(r, N, blockIdx.x);
  float acc[M][R];
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int r = 0; r < R; ++r) acc[m][r] = 0.f;

  uint4 wv[U][R];
  load_chunks(wv, w, rows, C, 0, lane);  // the first weights on their way while the block stages x
  stage<PRO>(xs, x, pre, nullptr, K, 0.f, batch);
  for (int c0 = 0; c0 < C; c0 += 32 * U) {
    if (c0 > 0) load_chunks(wv, w, rows, C, c0, lane);
    mac_round<M, R, U, PRO>(wv, x, ldx, xs, s, rows, C, G, gshift - 5, c0, lane, acc);
  }
  finish_rows<M, R, THEN>(acc, y, ldy, N, accumulate, then, blockIdx.x, lane);
  if constexpr (THEN == THEN_NORM) gemv::norm_by_last_block(y, then, N, gridDim.x);
}

// The persistent form, one row (KernelConfig.w4g_persistent): gemv::walk_row_blocks over the NB row blocks, so a
// warp's loads overlap its own arithmetic (the one-block-per-row-block form waits on each round's loads; at 7B's K
// = 4096 a warp has a single round, nothing of its own to overlap). PRO_PREQUANT / PRO_NORM stage x once per
// block. THEN_NORM counts the physical blocks (gridDim.x), each once, after its last store. Launched with
// programmatic dependent launch (gemv::launch_persistent), only the first weight loads come before
// gemv::wait_previous_grid.
template <int R, int U, int PRO, int THEN>
__global__ void __launch_bounds__(WARPS * 32) w4a16_gemv_persistent(
    const half* __restrict__ x, const uint4* __restrict__ w, const half* __restrict__ s, half* __restrict__ y,
    int N, int K, int gshift, bool accumulate, const half* __restrict__ pre, const half* __restrict__ nw, float eps,
    ThenArgs then, int NB, bool pdl, bool batch) {
  extern __shared__ uint4 xs[];
  const int lane = threadIdx.x & 31;
  const int C = K >> 5, G = K >> gshift;
  int rows[R];
#pragma unroll
  for (int r = 0; r < R; ++r) rows[r] = gemv::weight_row<R, THEN>(r, N, blockIdx.x);
  float acc[1][R];
#pragma unroll
  for (int r = 0; r < R; ++r) acc[0][r] = 0.f;
  gemv::allow_next_grid();
  uint4 cur[U][R];
  load_chunks(cur, w, rows, C, 0, lane);
  if (pdl) gemv::wait_previous_grid(cur[0][0].x);  // (launched without it: no wait on the loads)
  stage<PRO>(xs, x, pre, nw, K, eps, batch);
  gemv::walk_row_blocks<R, U, THEN>(
      w, N, C, NB, lane, cur, rows,
      [&](const uint4 (&wv)[U][R], const int (&rw)[R], int c0) {
        mac_round<1, R, U, PRO>(wv, x, 0, xs, s, rw, C, G, gshift - 5, c0, lane, acc);
      },
      [&](int vb) { finish_rows<1, R, THEN>(acc, y, 0, N, accumulate, then, vb, lane); });
  if constexpr (THEN == THEN_NORM) gemv::norm_by_last_block(y, then, N, gridDim.x);
}

struct Args {
  const void *x, *w, *s, *pre, *nw;  // nw: PRO_NORM's norm weight
  void* y;
  int64_t ldx, ldy;
  int N, K, gshift;
  bool accumulate;
  float eps;  // PRO_NORM's
  int then;
  ThenArgs then_args;
  int grid;  // 0: one block per row block; -1: persistent, as many blocks as fit at once; > 0: persistent, at most
  bool pdl;  // the persistent form with programmatic dependent launch
  bool batch;  // PRO_PREQUANT's staging loads issued STAGE_BATCH units a thread at a time (stage_row)
  cudaStream_t stream;
};

template <int M, int R, int U, int PRO, int THEN>
cudaError_t launch(const Args& a) {
  // THEN_SILU: a block's warps take P = WARPS * R / 2 outputs' row pairs; else R rows each
  const int blocks = THEN == THEN_SILU ? (a.N / 2 + WARPS * R / 2 - 1) / (WARPS * R / 2)
                                       : ((a.N + R - 1) / R + WARPS - 1) / WARPS;
  const size_t smem = PRO == PRO_GLOBAL ? 0 : a.K * sizeof(half);
  if constexpr (M == 1) {
    if (a.grid != 0) {
      const auto kernel = w4a16_gemv_persistent<R, U, PRO, THEN>;
      int grid = 0;
      const cudaError_t err = gemv::persistent_grid(kernel, smem, a.grid, blocks, grid);
      if (err != cudaSuccess) return err;
      return gemv::launch_persistent(kernel, grid, smem, a.stream, a.pdl, a.x, a.w, a.s, a.y, a.N, a.K, a.gshift,
                                     a.accumulate, a.pre, a.nw, a.eps, a.then_args, blocks, a.pdl, a.batch);
    }
  }
  if constexpr (PRO == PRO_NORM) return cudaErrorInvalidValue;  // (built in the persistent form only)
  else {
    w4a16_gemv_kernel<M, R, U, PRO, THEN><<<blocks, WARPS * 32, smem, a.stream>>>(
        static_cast<const half*>(a.x), a.ldx, static_cast<const uint4*>(a.w), static_cast<const half*>(a.s),
        static_cast<half*>(a.y), a.ldy, a.N, a.K, a.gshift, a.accumulate, static_cast<const half*>(a.pre),
        a.then_args, a.batch);
    return cudaGetLastError();
  }
}

template <int M, int PRO, int THEN>
cudaError_t launch_tile(int tile, const Args& a) {
  switch (tile) {  // (R, U): the tiles of cuda_ext.GEMV_TILES, in order
    case 0: return launch<M, 1, 2, PRO, THEN>(a);
    case 1: return launch<M, 1, 4, PRO, THEN>(a);
    case 2: return launch<M, 2, 2, PRO, THEN>(a);
    case 3: return launch<M, 2, 4, PRO, THEN>(a);
    case 4: return launch<M, 4, 1, PRO, THEN>(a);
    case 5: return launch<M, 4, 2, PRO, THEN>(a);
    default: return cudaErrorInvalidValue;
  }
}

// PRO_NORM is built in the persistent form only (the default at one row), and with the epilogues of the linears
// that follow a norm only (qkv: none; fc||gate: SiLU * gate).
template <int PRO>
cudaError_t launch_one_row(int tile, const Args& a) {
  switch (a.then) {
    case THEN_NONE: return launch_tile<1, PRO, THEN_NONE>(tile, a);
    case THEN_SILU: return launch_tile<1, PRO, THEN_SILU>(tile, a);
    case THEN_NORM:
      if constexpr (PRO == PRO_NORM) return cudaErrorInvalidValue;
      else return launch_tile<1, PRO, THEN_NORM>(tile, a);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

// The contract of the launcher (checked by the binding): M in 1..4; K % 32 == 0; group a power of two >= 32 that
// divides K; x, w and s 16-byte aligned with row strides ldx (elements, a multiple of 8) and K / 8 words and K /
// group scales; y [M, ldy] float16. pre [K] float16 (x * pre is the input) or null: M == 1 and K * 2 bytes of
// shared memory (<= 48 KiB); with more rows the pre-quant scale must already be applied. nw [K] float16, 16-byte
// aligned (RMSNorm(x) * nw, eps, then * pre if any, is the input) or null: M == 1, grid != 0, K * 2 bytes of
// shared memory, then not THEN_NORM. then (gemv::Then) other
// than THEN_NONE: M == 1, the result in t.xn (gemv::ThenArgs); THEN_SILU: N even, xn [N/2], y unused, not
// accumulate; THEN_NORM: accumulate, nw and xn [N], cnt one unsigned that is 0 (and is left 0). grid (Args): M == 1
// unless 0; pdl: grid != 0, an sm_90 GPU.
cudaError_t w4a16_gemv_launch(int tile, int M, const void* x, int64_t ldx, const void* w, const void* s, void* y,
                              int64_t ldy, int N, int K, int gshift, bool accumulate, const void* pre,
                              const void* nw, float eps, int then, const ThenArgs& t, int grid, bool pdl,
                              bool batch, cudaStream_t stream) {
  const Args a{x, w, s, pre, nw, y, ldx, ldy, N, K, gshift, accumulate, eps, then, t, grid, pdl, batch, stream};
  if ((grid != 0 && M != 1) || (pdl && grid == 0)) return cudaErrorInvalidValue;
  if (nw != nullptr) return M == 1 ? launch_one_row<PRO_NORM>(tile, a) : cudaErrorInvalidValue;
  if (pre != nullptr) return M == 1 ? launch_one_row<PRO_PREQUANT>(tile, a) : cudaErrorInvalidValue;
  if (M == 1) return launch_one_row<PRO_GLOBAL>(tile, a);
  if (then != THEN_NONE) return cudaErrorInvalidValue;
  switch (M) {
    case 2: return launch_tile<2, PRO_GLOBAL, THEN_NONE>(tile, a);
    case 3: return launch_tile<3, PRO_GLOBAL, THEN_NONE>(tile, a);
    case 4: return launch_tile<4, PRO_GLOBAL, THEN_NONE>(tile, a);
    default: return cudaErrorInvalidValue;
  }
}
