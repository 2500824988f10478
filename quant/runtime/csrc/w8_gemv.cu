// 8-bit GEMV for 1-4 activation rows, one kernel for the three 8-bit formats (F):
//   F_W8A16  x float16 [M, K], q int8 [N, K],  s float16 [N]:  y[m, n] = s[n] * sum_k x[m, k] q[n, k]
//   F_W8A8   x int8 [M, K],    q int8 [N, K],  s float32 [N]:  the same, sums exact in int32 (DP4A)
//   F_FP8    x e4m3 [M, K],    q e4m3 [N, K],  s float32 [1]:  y[m, n] = s[0] * sum_k x[m, k] q[n, k]
// (+ y[m, n] when accumulating). W8A8 and FP8 take activations already quantized (act_prep), as the Triton GEMV does;
// or, one row in the persistent form (KernelConfig.norm_prologue), the float16 residual stream, whose RMSNorm (times
// the norm weight, times the pre-quant scale, quantized by the static activation scale: act_prep's steps) every
// block computes into shared memory while its first weights are on their way (PRO_NORM, as w4a16_gemv.cu's), in
// place of the previous GEMV's serial THEN_NORM tail, with the same bits (gemv::stage_norm).
//
// Weight layout: the checkpoint's own, [N, K] row-major (no copy is made). Each lane streams 16 bytes (16 weights of
// one row) per chunk with non-caching loads, U chunks of R rows in flight before any arithmetic, as the W4A16 GEMV
// does (w4a16_gemv.cu).
//
// Precision contract: W8A16 puts each weight into float32 exactly (one PRMT: q ^ 0x80 into the mantissa of 2^23,
// minus 2^23 + 128) and multiplies in float32 (float16 products of int8 weights overflow at |x| ~ 500, which LLaMa's
// down_proj inputs reach); W8A8 sums int8 products in int32 (|sum| <= K * 2^14 < 2^31 for K < 131072); FP8 widens
// both operands to float32 exactly (e4m3 -> half2 -> float2) and sums in float32. The scale is applied once at the
// end in float32; the residual is added in float32 and rounded to float16 once.
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cstdint>
#include <type_traits>

#include "gemv_common.cuh"

namespace {

using gemv::WARPS, gemv::load_chunks, gemv::word, gemv::ThenArgs, gemv::THEN_NONE, gemv::THEN_SILU, gemv::THEN_NORM;
using gemv::F_W8A16, gemv::F_W8A8, gemv::F_FP8, gemv::row_scale;

// Byte b of a word of biased (unsigned) int8 weights as the float 2^23 + b: bytes [b, 0, 0, 0x4b].
template <int B>
__device__ __forceinline__ float biased_byte(uint32_t u) {
  return __uint_as_float(__byte_perm(u, 0x4b000000u, 0x7440 + B));
}

// Four e4m3 values (one word) as floats, exactly.
__device__ __forceinline__ void fp8x4_to_float(uint32_t v, float* f) {
  const __half2_raw lo = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(v & 0xffffu), __NV_E4M3);
  const __half2_raw hi = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(v >> 16), __NV_E4M3);
  const float2 a = __half22float2(*reinterpret_cast<const half2*>(&lo));
  const float2 b = __half22float2(*reinterpret_cast<const half2*>(&hi));
  f[0] = a.x; f[1] = a.y; f[2] = b.x; f[3] = b.y;
}

// One chunk of activations (k = 16c .. 16c + 15) of row m: float32 (W8A16, FP8) or the raw int8 words (W8A8).
template <int F>
struct Chunk {
  float f[16];
  uint32_t q[4];
};

// One 16-byte unit of activations as the chunk's floats (W8A16: its half h, 8 float16; FP8: 16 e4m3) or words (W8A8).
template <int F>
__device__ __forceinline__ void unpack_x(const uint4& xr, int h, Chunk<F>& out) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t w = word(xr, i);
    if constexpr (F == F_W8A16) {
      const float2 f = __half22float2(*reinterpret_cast<const half2*>(&w));
      out.f[h * 8 + 2 * i] = f.x;
      out.f[h * 8 + 2 * i + 1] = f.y;
    } else if constexpr (F == F_W8A8) {
      out.q[i] = w;
    } else {
      fp8x4_to_float(w, out.f + 4 * i);
    }
  }
}

// Chunk c of row m: from x in global memory, or (STAGED, one row) from the row PRO_NORM staged in shared memory,
// where W8A16's half h of chunk c sits at unit h * C + c (gemv::stage_norm), so that a warp's lanes read consecutive
// 16 bytes.
template <int F, bool STAGED>
__device__ __forceinline__ void load_x(const void* x, int64_t ldx, int m, int c, int C, Chunk<F>& out) {
  if constexpr (F == F_W8A16) {
    const uint4* xp = reinterpret_cast<const uint4*>(static_cast<const half*>(x) + m * ldx + c * 16);
#pragma unroll
    for (int h = 0; h < 2; ++h) unpack_x<F>(STAGED ? static_cast<const uint4*>(x)[h * C + c] : __ldg(xp + h), h, out);
  } else {
    const uint4* xp = reinterpret_cast<const uint4*>(static_cast<const uint8_t*>(x) + m * ldx + c * 16);
    unpack_x<F>(STAGED ? static_cast<const uint4*>(x)[c] : __ldg(xp), 0, out);
  }
}

// Accumulator of one (row m, weight row r): float32, or int32 for W8A8.
template <int F>
using Acc = typename std::conditional<F == F_W8A8, int, float>::type;

// One weight word (k = 4j .. 4j + 3 of the chunk) against the chunk's activations.
template <int F>
__device__ __forceinline__ Acc<F> dot_word(uint32_t q, const Chunk<F>& x, int j, Acc<F> acc) {
  if constexpr (F == F_W8A16) {
    const uint32_t u = q ^ 0x80808080u;
    constexpr float BIAS = 8388608.f + 128.f;
    acc = fmaf(biased_byte<0>(u) - BIAS, x.f[4 * j], acc);
    acc = fmaf(biased_byte<1>(u) - BIAS, x.f[4 * j + 1], acc);
    acc = fmaf(biased_byte<2>(u) - BIAS, x.f[4 * j + 2], acc);
    acc = fmaf(biased_byte<3>(u) - BIAS, x.f[4 * j + 3], acc);
  } else if constexpr (F == F_W8A8) {
    acc = __dp4a(static_cast<int>(q), static_cast<int>(x.q[j]), acc);
  } else {
    float w[4];
    fp8x4_to_float(q, w);
#pragma unroll
    for (int i = 0; i < 4; ++i) acc = fmaf(w[i], x.f[4 * j + i], acc);
  }
  return acc;
}

// One lane round: chunks c0 + 32u + lane (u < U) of the R rows, already loaded into wv, against x's M rows.
template <int F, int M, int R, int U, bool STAGED = false>
__device__ __forceinline__ void mac_round(const uint4 (&wv)[U][R], const void* x, int64_t ldx, int C, int c0,
                                          int lane, Acc<F> (&acc)[M][R]) {
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int c = c0 + u * 32 + lane;
    if (c >= C) break;
#pragma unroll
    for (int m = 0; m < M; ++m) {
      Chunk<F> xc;
      load_x<F, STAGED>(x, ldx, m, c, C, xc);
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[m][r] = dot_word<F>(word(wv[u][r], j), xc, j, acc[m][r]);
    }
  }
}

// Row block vb done: the lanes' sums reduced, scaled and stored by lane 0 (added to y when accumulating) or,
// THEN_SILU, met with their partners (store_silu_pairs); acc is left zero for the next row block.
template <int F, int M, int R, int THEN>
__device__ __forceinline__ void finish_rows(Acc<F> (&acc)[M][R], const int (&rows)[R], const void* s, half* y,
                                            int64_t ldy, int N, bool accumulate, const ThenArgs& then, int vb,
                                            int lane) {
  const int n0 = (vb * WARPS + (threadIdx.x >> 5)) * R;  // warps past N computed a valid row: stored none
  float res[M][R], sc[R];
  if (THEN != THEN_SILU && lane == 0) {  // (loaded before the reduction: gemv::load_rows)
    if (accumulate) gemv::load_rows(res, y, ldy, n0, N);
#pragma unroll
    for (int r = 0; r < R; ++r) sc[r] = n0 + r < N ? row_scale<F>(s, n0 + r) : 0.f;
  }
  float total[M][R];
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int r = 0; r < R; ++r) {
      Acc<F> v = acc[m][r];
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
      total[m][r] = static_cast<float>(v);
      acc[m][r] = 0;
    }
  if constexpr (THEN == THEN_SILU) {
    float v[R];
#pragma unroll
    for (int r = 0; r < R; ++r) v[r] = row_scale<F>(s, rows[r]) * total[0][r];
    gemv::store_silu_pairs<R>(v, then, N, vb);
  } else if (lane == 0) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (n0 + r >= N) continue;
#pragma unroll
      for (int m = 0; m < M; ++m) {
        // rounded explicitly: a contraction into one FFMA, which nvcc chose for some tiles and not others, would
        // make the bits depend on the tile and the compiler
        const float v = __fmul_rn(sc[r], total[m][r]);
        y[m * ldy + n0 + r] = __float2half_rn(accumulate ? __fadd_rn(res[m][r], v) : v);
      }
    }
  }
}

// M activation rows, R weight rows per warp, U chunks of 16 k per lane in flight; one block per row block; THEN
// (M == 1): the epilogue's work for the next linear (gemv_common.cuh).
template <int F, int M, int R, int U, int THEN>
__global__ void __launch_bounds__(WARPS * 32) w8_gemv_kernel(
    const void* __restrict__ x, int64_t ldx, const uint4* __restrict__ w, const void* __restrict__ s,
    half* __restrict__ y, int64_t ldy, int N, int K, bool accumulate, ThenArgs then) {
  const int lane = threadIdx.x & 31;
  const int C = K >> 4;  // 16-weight chunks per row (uint4 per row)
  int rows[R];
#pragma unroll
  for (int r = 0; r < R; ++r) rows[r] = gemv::weight_row<R, THEN>(r, N, blockIdx.x);
  Acc<F> acc[M][R];
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int r = 0; r < R; ++r) acc[m][r] = 0;

  uint4 wv[U][R];
  for (int c0 = 0; c0 < C; c0 += 32 * U) {
    load_chunks(wv, w, rows, C, c0, lane);
    mac_round<F, M, R, U>(wv, x, ldx, C, c0, lane, acc);
  }
  finish_rows<F, M, R, THEN>(acc, rows, s, y, ldy, N, accumulate, then, blockIdx.x, lane);
  if constexpr (THEN == THEN_NORM) gemv::norm_by_last_block(y, then, N, gridDim.x);
}

// The persistent form, one row (KernelConfig.w8g_persistent): gemv::walk_row_blocks over the NB row blocks, a
// warp's next round loaded while it computes the current one (the one-block-per-row-block form waits on each of its
// K / (512 U) rounds). THEN_NORM counts the physical blocks (gridDim.x), each once, after its last store. Launched with
// programmatic dependent launch (gemv::launch_persistent), only the first weight loads come before
// gemv::wait_previous_grid. NORM (PRO_NORM): x is the float16 residual stream, staged normalized (gemv::stage_norm)
// after the first weight loads: the row in the format's activation type, W8A16's unit u at load_x's
// (u & 1) * C + (u >> 1).
template <int F, int R, int U, int THEN, bool NORM>
__global__ void __launch_bounds__(WARPS * 32) w8_gemv_persistent(
    const void* __restrict__ x, const uint4* __restrict__ w, const void* __restrict__ s, half* __restrict__ y, int N,
    int K, bool accumulate, ThenArgs then, int NB, bool pdl, const half* __restrict__ nw,
    const half* __restrict__ pre, const float* __restrict__ a, float eps) {
  extern __shared__ uint4 xs[];
  const int lane = threadIdx.x & 31;
  const int C = K >> 4;
  int rows[R];
#pragma unroll
  for (int r = 0; r < R; ++r) rows[r] = gemv::weight_row<R, THEN>(r, N, blockIdx.x);
  Acc<F> acc[1][R];
#pragma unroll
  for (int r = 0; r < R; ++r) acc[0][r] = 0;
  gemv::allow_next_grid();
  uint4 cur[U][R];
  load_chunks(cur, w, rows, C, 0, lane);
  if (pdl) gemv::wait_previous_grid(cur[0][0].x);  // (launched without it: no wait on the loads)
  if constexpr (NORM)
    gemv::stage_norm(static_cast<const half*>(x), nw, pre, K, eps, F == F_W8A16 ? 0 : F == F_W8A8 ? 1 : 2,
                     F == F_W8A16 ? 1.f : *a, [&](int u, const uint4& v) {
                       if constexpr (F == F_W8A16) xs[(u & 1) * C + (u >> 1)] = v;
                       else reinterpret_cast<uint2*>(xs)[u] = make_uint2(v.x, v.y);
                     });
  gemv::walk_row_blocks<R, U, THEN>(
      w, N, C, NB, lane, cur, rows,
      [&](const uint4 (&wv)[U][R], const int (&)[R], int c0) {
        if constexpr (NORM) mac_round<F, 1, R, U, true>(wv, xs, 0, C, c0, lane, acc);
        else mac_round<F, 1, R, U>(wv, x, 0, C, c0, lane, acc);
      },
      [&](int vb) { finish_rows<F, 1, R, THEN>(acc, rows, s, y, 0, N, accumulate, then, vb, lane); });
  if constexpr (THEN == THEN_NORM) gemv::norm_by_last_block(y, then, N, gridDim.x);
}

struct Args {
  const void *x, *w, *s;
  void* y;
  int64_t ldx, ldy;
  int N, K;
  bool accumulate;
  int then;
  ThenArgs then_args;
  int grid;  // as w4a16_gemv.cu's: 0 one block per row block; -1 persistent on what fits at once; > 0 at most
  bool pdl;  // the persistent form with programmatic dependent launch
  const void *nw, *pre;  // PRO_NORM (nw not null): the norm weight, the pre-quant scale or null,
  const float* act_scale;  // the static activation scale (W8A8, FP8),
  float eps;  // and eps
  cudaStream_t stream;
};

template <int F, int M, int R, int U, int THEN, bool NORM>
cudaError_t launch(const Args& a) {
  // THEN_SILU: a block's warps take P = WARPS * R / 2 outputs' row pairs; else R rows each
  const int blocks = THEN == THEN_SILU ? (a.N / 2 + WARPS * R / 2 - 1) / (WARPS * R / 2)
                                       : ((a.N + R - 1) / R + WARPS - 1) / WARPS;
  if constexpr (M == 1) {
    if (a.grid != 0) {
      const auto kernel = w8_gemv_persistent<F, R, U, THEN, NORM>;
      const size_t smem = NORM ? a.K * (F == F_W8A16 ? sizeof(half) : 1) : 0;
      int grid = 0;
      const cudaError_t err = gemv::persistent_grid(kernel, smem, a.grid, blocks, grid);
      if (err != cudaSuccess) return err;
      return gemv::launch_persistent(kernel, grid, smem, a.stream, a.pdl, a.x, a.w, a.s, a.y, a.N, a.K,
                                     a.accumulate, a.then_args, blocks, a.pdl, a.nw, a.pre, a.act_scale, a.eps);
    }
  }
  if constexpr (NORM) return cudaErrorInvalidValue;  // (built in the persistent form only)
  else {
    w8_gemv_kernel<F, M, R, U, THEN><<<blocks, WARPS * 32, 0, a.stream>>>(
        a.x, a.ldx, static_cast<const uint4*>(a.w), a.s, static_cast<half*>(a.y), a.ldy, a.N, a.K, a.accumulate,
        a.then_args);
    return cudaGetLastError();
  }
}

template <int F, int M, int THEN, bool NORM = false>
cudaError_t launch_tile(int tile, const Args& a) {
  switch (tile) {  // (R, U): the tiles of cuda_ext.GEMV_TILES, in order
    case 0: return launch<F, M, 1, 2, THEN, NORM>(a);
    case 1: return launch<F, M, 1, 4, THEN, NORM>(a);
    case 2: return launch<F, M, 2, 2, THEN, NORM>(a);
    case 3: return launch<F, M, 2, 4, THEN, NORM>(a);
    case 4: return launch<F, M, 4, 1, THEN, NORM>(a);
    case 5: return launch<F, M, 4, 2, THEN, NORM>(a);
    default: return cudaErrorInvalidValue;
  }
}

// PRO_NORM is built in the persistent form only, and with the epilogues of the linears that follow a norm only
// (qkv: none; fc||gate: SiLU * gate), as w4a16_gemv.cu's.
template <int F>
cudaError_t launch_rows(int tile, int M, const Args& a) {
  if (a.nw != nullptr) {
    if (M != 1 || a.grid == 0) return cudaErrorInvalidValue;
    return a.then == THEN_NONE ? launch_tile<F, 1, THEN_NONE, true>(tile, a)
         : a.then == THEN_SILU ? launch_tile<F, 1, THEN_SILU, true>(tile, a) : cudaErrorInvalidValue;
  }
  if (a.then != THEN_NONE) {
    if (M != 1) return cudaErrorInvalidValue;
    return a.then == THEN_SILU ? launch_tile<F, 1, THEN_SILU>(tile, a)
         : a.then == THEN_NORM ? launch_tile<F, 1, THEN_NORM>(tile, a) : cudaErrorInvalidValue;
  }
  switch (M) {
    case 1: return launch_tile<F, 1, THEN_NONE>(tile, a);
    case 2: return launch_tile<F, 2, THEN_NONE>(tile, a);
    case 3: return launch_tile<F, 3, THEN_NONE>(tile, a);
    case 4: return launch_tile<F, 4, THEN_NONE>(tile, a);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

// The contract of the launcher (checked by the binding): fmt one of Format; M in 1..4; K % 16 == 0; x and w 16-byte
// aligned with row strides ldx (elements, so that rows stay 16-byte aligned) and K bytes; s as the format says;
// y [M, ldy] float16. then (gemv::Then) other than THEN_NONE: M == 1, the result in t.xn (gemv::ThenArgs);
// THEN_SILU: N even, xn [N/2], y unused, not accumulate; THEN_NORM: accumulate, nw and xn [N], cnt one unsigned
// that is 0 (and is left 0). grid (Args): M == 1 unless 0; pdl: grid != 0, an sm_90 GPU. nw [K] float16 (PRO_NORM:
// x float16 [1, K], the input quant8(RMSNorm(x) * nw * pre) with eps, pre [K] float16 or null, act_scale float32 [1]
// for W8A8 / FP8), all 16-byte aligned, or null: M == 1, grid != 0, K * (2 for W8A16, else 1) bytes of shared
// memory (<= 48 KiB), then not THEN_NORM.
cudaError_t w8_gemv_launch(int fmt, int tile, int M, const void* x, int64_t ldx, const void* w, const void* s,
                           void* y, int64_t ldy, int N, int K, bool accumulate, int then, const ThenArgs& t,
                           int grid, bool pdl, const void* nw, const void* pre, const float* act_scale, float eps,
                           cudaStream_t stream) {
  const Args a{x, w, s, y, ldx, ldy, N, K, accumulate, then, t, grid, pdl, nw, pre, act_scale, eps, stream};
  if ((grid != 0 && M != 1) || (pdl && grid == 0)) return cudaErrorInvalidValue;
  switch (fmt) {
    case F_W8A16: return launch_rows<F_W8A16>(tile, M, a);
    case F_W8A8: return launch_rows<F_W8A8>(tile, M, a);
    case F_FP8: return launch_rows<F_FP8>(tile, M, a);
    default: return cudaErrorInvalidValue;
  }
}
