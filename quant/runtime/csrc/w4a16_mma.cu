// W4A16 on tensor cores for 1-32 activation rows, Marlin's way: y[m, n] = sum_k x[m, k] * w[n, k] (+ y[m, n]) with
// w = float16((q - 8) * s[n, k / group]), through mma.sync.m16n8k16 (float16 operands, float32 sums). The weights
// are the MMA's A operand (16 output channels x 16 k) and the activations its B operand (16 k x 8 rows), so one MMA
// covers 256 weights and up to 8 rows with no padding rows (a decode batch of 1-8 wastes no A registers).
//
// Weight layout (made once at load, quant/runtime/cuda_ext.py: pack_w4m): int32 [N/64, K/16, 32, 4]. A tile of 64
// output channels holds the rows 32t..32t+31 (columns 0-31) and N/2 + 32t..N/2 + 32t + 31 (columns 32-63), so that
// a SiLU * gate pair of fc||gate meets in one tile (tile_row maps a column back). For tile t and step ks (16 k's),
// lane l's 16 bytes are its A fragments of the tile's four m16 tiles, word i for columns 16i..16i + 15, in the order
// gemv::dequant_word turns a word into half2: with g = l / 4, c = l % 4, nibble o + 2 h + 4 p holds q + 8 of column
// 16 i + 8 o + g at k = 16 ks + 2 c + 8 h + p (o, h, p in {0, 1}), i.e. dequant_word's pairs are the PTX ISA's
// fragment registers a0a1 (row g, k 2c, 2c + 1), a2a3 (row g + 8), a4a5 (row g, k 2c + 8, 2c + 9), a6a7 (row g + 8).
// A warp's load of one (t, ks) is 512 contiguous bytes; no shared-memory round trip before the MMA. Scales (pack_w4m
// too): float16 [N/64, K/group, 8, 8], [t][group][g][2 i + o] = the scale of column 16 i + 8 o + g, so a lane's
// eight columns' scales are one 16-byte load.
//
// Work (mma_common.cuh): block (t, split) of 4 warps takes tile t over the split-th of its K / 16 steps, each warp a
// contiguous quarter of those, with P steps' weights, scales and activations loaded ahead per warp (mma::ring); the
// warps' and splits' sums meet in a fixed order (mma::finish_tile): the same bits on every run and under CUDA-graph
// replay, for a given splits.
//
// Precision contract: each weight is (q - 8) * s rounded once to float16 (the dequantized float16 weight); products
// with x are exact in the MMA and summed in float32; the residual is added in float32 and rounded to float16 once.
#include <cuda_fp16.h>
#include <cstdint>

#include "mma_common.cuh"

namespace {

using gemv::as_h2, gemv::as_u32, gemv::dequant_word, gemv::word, gemv::load_stream, gemv::ThenArgs;
using gemv::THEN_NONE, gemv::THEN_SILU, gemv::THEN_NORM;
using mma::WARPS, mma::TILE, mma::mma_16816, mma::Args;

// Lane (g, c)'s B fragments of one step for NB groups of 8 activation rows, x pointing at the step's k = 2c of
// row g (the PTX ISA's layout of B, 16 k x 8 rows: b0b1 k 2c, 2c + 1 of row g; b2b3 k 2c + 8, 2c + 9); rows from M
// on zero (ok[r]: row 8 r + g < M). PRE (one row): times the pre-quant scale at the same k, rounded to float16 as
// act_prep rounds x * pre.
template <int NB, bool PRE>
__device__ __forceinline__ void load_b(uint32_t (&b)[NB][2], const half* x, int64_t ldx, const half* pre,
                                       const bool (&ok)[NB]) {
#pragma unroll
  for (int r = 0; r < NB; ++r) {
    const uint32_t* xr = reinterpret_cast<const uint32_t*>(x + 8 * r * ldx);
    b[r][0] = ok[r] ? __ldg(xr) : 0u;
    b[r][1] = ok[r] ? __ldg(xr + 4) : 0u;
    if constexpr (PRE) {
      const uint32_t* pr = reinterpret_cast<const uint32_t*>(pre);
      b[r][0] = as_u32(__hmul2(as_h2(b[r][0]), as_h2(__ldg(pr))));
      b[r][1] = as_u32(__hmul2(as_h2(b[r][1]), as_h2(__ldg(pr + 4))));
    }
  }
}

// One step: the lane's 16 bytes of weights wv (four A fragments) and of scales sv against its B fragments; acc[i][r]
// is the C fragment of columns 16i.. and rows 8r.. (c0 c1: column g, rows 2c, 2c + 1; c2 c3: column g + 8).
template <int NB>
__device__ __forceinline__ void mma_step(float (&acc)[4][NB][4], const uint4& wv, const uint4& sv,
                                         const uint32_t (&b)[NB][2]) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    half2 d[4];
    dequant_word(word(wv, i), d);
    const half2 s0 = __low2half2(as_h2(word(sv, i))), s1 = __high2half2(as_h2(word(sv, i)));
    const uint32_t a[4] = {as_u32(__hmul2(d[0], s0)), as_u32(__hmul2(d[1], s1)), as_u32(__hmul2(d[2], s0)),
                           as_u32(__hmul2(d[3], s1))};
#pragma unroll
    for (int r = 0; r < NB; ++r) mma_16816(acc[i][r], a, b[r][0], b[r][1]);
  }
}

// ROWS: the most activation rows (8, 16 or 32: NB = ROWS / 8 B fragments a step), P steps loaded ahead per warp.
// PRE (M == 1): the input is x * pre (pre float16 [K]). THEN (M == 1): the next linear's prologue (gemv_then.h);
// THEN_SILU writes SiLU(f) * g of each tile's 32 pairs, THEN_NORM the RMSNorm of y after every tile.
template <int ROWS, int P, bool PRE, int THEN>
__global__ void __launch_bounds__(WARPS * 32) w4a16_mma_kernel(
    const half* __restrict__ x, int64_t ldx, int M, const uint4* __restrict__ w, const uint4* __restrict__ s,
    const half* __restrict__ pre, half* __restrict__ y, int64_t ldy, int N, int K, int gshift, bool accumulate,
    float* __restrict__ ws, unsigned* __restrict__ cnt, ThenArgs then) {
  constexpr int NB = ROWS / 8;
  __shared__ float red[WARPS][ROWS][TILE];
  const int t = blockIdx.x, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
  const int KS = K >> 4;
  int k0, n;  // this warp's steps
  mma::warp_steps(KS, k0, n);

  float acc[4][NB][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int r = 0; r < NB; ++r)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][r][e] = 0.f;
  bool ok[NB];
#pragma unroll
  for (int r = 0; r < NB; ++r) ok[r] = 8 * r + g < M;

  // the next step to load: its weights, its activations (row g, k = 16 step + 2c), and its scales' group
  const uint4* wn = w + (static_cast<int64_t>(t) * KS + k0) * 32 + lane;
  const half* xn = x + g * ldx + 16 * k0 + 2 * c;
  const half* pn = PRE ? pre + 16 * k0 + 2 * c : nullptr;
  const uint4* sp = s + static_cast<int64_t>(t) * (K >> gshift) * 8 + g;  // group q: sp[8 q]
  const unsigned sshift = gshift - 4;                                     // step -> group
  unsigned kn = k0;
  uint4 wb[P], sb[P];
  uint32_t bb[P][NB][2];
  mma::ring<P>(
      n,
      [&](int p) {
        wb[p] = load_stream(wn);
        sb[p] = __ldg(sp + ((kn >> sshift) << 3));
        load_b<NB, PRE>(bb[p], xn, ldx, pn, ok);
        wn += 32;
        xn += 16;
        if constexpr (PRE) pn += 16;
        ++kn;
      },
      [&](int p) { mma_step<NB>(acc, wb[p], sb[p], bb[p]); });
  mma::finish_tile<ROWS, THEN>(acc, red, M, N, y, ldy, accumulate, ws, cnt, then, [](float v, int) { return v; });
}

template <int ROWS, int P, bool PRE, int THEN>
cudaError_t launch(const Args& a) {
  w4a16_mma_kernel<ROWS, P, PRE, THEN><<<dim3(a.N / TILE, a.splits), WARPS * 32, 0, a.stream>>>(
      static_cast<const half*>(a.x), a.ldx, a.M, static_cast<const uint4*>(a.w), static_cast<const uint4*>(a.s),
      static_cast<const half*>(a.pre), static_cast<half*>(a.y), a.ldy, a.N, a.K, a.gshift, a.accumulate, a.ws, a.cnt,
      a.then);
  return cudaGetLastError();
}

template <int P, bool PRE>
cudaError_t launch_then(int then, const Args& a) {
  switch (then) {
    case THEN_NONE: return launch<8, P, PRE, THEN_NONE>(a);
    case THEN_SILU: return launch<8, P, PRE, THEN_SILU>(a);
    case THEN_NORM: return launch<8, P, PRE, THEN_NORM>(a);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

// The K split (host, mma::splits_for): at most K / 64 (a step for each warp); the occupancy of the plain kernel for
// these rows at this depth decides the rule's count (its pre-quant scale and epilogues then split the same way).
cudaError_t w4a16_mma_splits(int M, int depth, int N, int K, int requested, int& splits) {
  const int most = K / (16 * WARPS);
  if (M <= 8 && depth == 8)
    return mma::splits_for(w4a16_mma_kernel<8, 8, false, THEN_NONE>, N, most, requested, splits);
  return mma::splits_for(M <= 8    ? w4a16_mma_kernel<8, 4, false, THEN_NONE>
                         : M <= 16 ? w4a16_mma_kernel<16, 4, false, THEN_NONE>
                                   : w4a16_mma_kernel<32, 4, false, THEN_NONE>,
                         N, most, requested, splits);
}

// The contract of the launcher (checked by the binding): M in 1..32; N % 64 == 0; K % 16 == 0; group a power of two
// >= 16 that divides K (gshift its log2); x [M, ldx] float16, ldx even, 4-byte aligned; w and s as pack_w4m made
// them, 16-byte aligned; y [M, ldy] float16. splits from w4a16_mma_splits; with splits > 1, ws float32 [splits, M,
// N] and cnt N / 64 unsigned zeros (left zero). depth: 4 or 8 steps loaded ahead per warp (8: up to 8 rows). pre
// [K] float16 (the input is x * pre) or null: M == 1. then other than THEN_NONE: M == 1, as w4a16_gemv's
// (THEN_SILU: the pairs of the layout's tiles; THEN_NORM: accumulate).
cudaError_t w4a16_mma_launch(int M, const void* x, int64_t ldx, const void* w, const void* s, const void* pre, void* y,
                             int64_t ldy, int N, int K, int gshift, bool accumulate, float* ws, unsigned* cnt,
                             int splits, int depth, int then, const ThenArgs& t, cudaStream_t stream) {
  const Args a{M, x, w, s, pre, y, ldx, ldy, N, K, gshift, accumulate, ws, cnt, splits, t, stream};
  if ((then != THEN_NONE || pre != nullptr) && M != 1) return cudaErrorInvalidValue;
  if (M > 8) {
    if (depth != 4) return cudaErrorInvalidValue;
    return M > 16 ? launch<32, 4, false, THEN_NONE>(a) : launch<16, 4, false, THEN_NONE>(a);
  }
  if (depth == 4) return pre ? launch_then<4, true>(then, a) : launch_then<4, false>(then, a);
  if (depth == 8) return pre ? launch_then<8, true>(then, a) : launch_then<8, false>(then, a);
  return cudaErrorInvalidValue;
}
