// The 8-bit formats on tensor cores for 1-8 activation rows (decode): y[m, n] = (sum_k x[m, k] * w[n, k]) * s (+
// y[m, n]), the weights as the MMA's A operand (16 output channels x 32 k), the activations as its B operand.
//   W8A16 (fmt 0): x float16, w int8, s float16 [N]: int8 -> float16 by one byte permute against the float16 exponent
//     of 1024 and one subtraction per two weights (exact), two mma.m16n8k16 per 32 k, float32 sums.
//   W8A8 (fmt 1, SmoothQuant): x int8 (quantized by act_prep or the previous linear's epilogue), w int8, s float32
//     [N] (weight x activation scale): mma.m16n8k32 on int8, exact int32 sums per warp.
//   FP8 (fmt 2): x and w e4m3, s float32 [1]: e4m3 -> float16 by cvt (exact: every e4m3 value is a float16), two
//     mma.m16n8k16, products exact, float32 sums.
//
// Weight layout (made once at load, quant/runtime/cuda_ext.py: pack_w8m): bytes [N/64, K/32, 4, 32, 16]. A tile of
// 64 output channels interleaves the halves as the INT4 kernel's (mma::tile_row); column 16 i + 8 o + g of the tile
// is row o of m16 tile i. For step ks (32 k's) and m16 tile i, lane l = 4 g + c holds 16 bytes, the PTX ISA's A
// fragment of mma.m16n8k32 for 8-bit types: word 2 h + o = column 16 i + 8 o + g at k = 32 ks + 16 h + 4 c + j,
// byte j (W8A16: each byte q ^ 0x80). A warp's load of one (ks, i) is 512 contiguous bytes. For the float16 MMAs
// the same words serve, k relabelled (mma_step): the first m16n8k16 takes words 0-1 (k 4c..4c + 3), the second
// words 2-3 (16 + 4c..), each with its B pair in one load of x.
//
// Work, sums and epilogues: mma_common.cuh (the K split, the ring, the fixed-order tile end; SiLU * gate and RMSNorm
// for the next linear at one row). The scale multiplies each output's float32 sum once (__fmul_rn), then the
// residual is added in float32 (__fadd_rn) and the result rounded to float16 once, as the 8-bit GEMV (w8_gemv.cu).
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cstdint>

#include "mma_common.cuh"

namespace {

using gemv::as_h2, gemv::as_u32, gemv::load_stream, gemv::ThenArgs;
using gemv::THEN_NONE, gemv::THEN_SILU, gemv::THEN_NORM;
using mma::WARPS, mma::TILE, mma::mma_16816, mma::Args;
using gemv::row_scale;
constexpr int W8A16 = gemv::F_W8A16, W8A8 = gemv::F_W8A8, FP8 = gemv::F_FP8;

constexpr int ROWS = 8;  // activation rows a block takes (one B fragment)

// d += a * b: mma.sync m16n8k32 on int8 (a: 16 x 32, b: 32 x 8), int32 sums.
__device__ __forceinline__ void mma_16832_s8(int (&d)[4], const uint4& a, uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b0), "r"(b1));
}

// Bytes half (0: bytes 0-1, 1: bytes 2-3) of v as float16 pairs: W8A16 (stored q ^ 0x80 = q + 128) by byte permute
// into the mantissa of 1024, minus 1152 (exact); FP8 by cvt from e4m3 (exact).
template <int FMT>
__device__ __forceinline__ uint32_t to_half2(uint32_t v, int half) {
  if constexpr (FMT == W8A16) {
    const uint32_t h = __byte_perm(v, 0x64646464u, half ? 0x7362 : 0x5140);
    return as_u32(__hsub2(as_h2(h), as_h2(0x64806480u)));
  } else {
    const __half2_raw r = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(half ? v >> 16 : v & 0xffffu),
                                                     __NV_E4M3);
    return static_cast<uint32_t>(r.x) | (static_cast<uint32_t>(r.y) << 16);
  }
}

// Lane (g, c)'s activations of one step for row g (zero from row M on): k = 4c..4c + 3 and 16 + 4c..16 + 4c + 3 of
// the step, as two 8-byte loads (float16: b[0..1], b[2..3]) or two 4-byte loads (8-bit: b[0], b[1]).
template <int FMT>
__device__ __forceinline__ void load_b(uint32_t (&b)[4], const void* x, bool ok) {
  if constexpr (FMT == W8A16) {
    const uint2* xr = static_cast<const uint2*>(x);
    const uint2 lo = ok ? __ldg(xr) : make_uint2(0, 0), hi = ok ? __ldg(xr + 4) : make_uint2(0, 0);  // k + 16
    b[0] = lo.x, b[1] = lo.y, b[2] = hi.x, b[3] = hi.y;
  } else {
    const uint32_t* xr = static_cast<const uint32_t*>(x);
    b[0] = ok ? __ldg(xr) : 0u, b[1] = ok ? __ldg(xr + 4) : 0u, b[2] = b[3] = 0u;  // k + 16
  }
}

// One step: four m16 tiles' A fragments wv[i] against the B fragments b. For the float16 MMAs, MMA h takes k 16h +
// 4c..16h + 4c + 3 of the step as its k 2c, 2c + 1 (a0a1: bytes 0-1 of word 2h, row g; a2a3: of word 2h + 1, row g +
// 8) and 8 + 2c, 8 + 2c + 1 (a4a5, a6a7: bytes 2-3 of the same words), so its B pair is one 8-byte (float16) or one
// 4-byte (e4m3) load of x.
template <int FMT>
__device__ __forceinline__ void mma_step(float (&acc)[4][1][4], int (&iacc)[4][4], const uint4 (&wv)[4],
                                         const uint32_t (&b)[4]) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if constexpr (FMT == W8A8) {
      mma_16832_s8(iacc[i], wv[i], b[0], b[1]);
    } else {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const uint32_t lo = h ? wv[i].z : wv[i].x, hi = h ? wv[i].w : wv[i].y;  // rows g and g + 8
        const uint32_t a[4] = {to_half2<FMT>(lo, 0), to_half2<FMT>(hi, 0), to_half2<FMT>(lo, 1),
                               to_half2<FMT>(hi, 1)};
        mma_16816(acc[i][0], a, b[2 * h], b[2 * h + 1]);
      }
    }
  }
}

// FP8's activations as float16 pairs once a step (b[0], b[1]: k 4c.. and 16 + 4c.. as e4m3 bytes) in the float16
// MMAs' B order, as W8A16's load gives them; the other formats' as loaded.
template <int FMT>
__device__ __forceinline__ void b_operands(uint32_t (&b)[4]) {
  if constexpr (FMT == FP8) {
    const uint32_t b0 = b[0], b1 = b[1];
    b[0] = to_half2<FMT>(b0, 0), b[1] = to_half2<FMT>(b0, 1), b[2] = to_half2<FMT>(b1, 0), b[3] = to_half2<FMT>(b1, 1);
  }
}

// FMT: the format; P steps (32 k) loaded ahead per warp. THEN (M == 1): the next linear's prologue (gemv_then.h).
template <int FMT, int P, int THEN>
__global__ void __launch_bounds__(WARPS * 32) w8_mma_kernel(
    const void* __restrict__ x, int64_t ldx, int M, const uint4* __restrict__ w, const void* __restrict__ s,
    half* __restrict__ y, int64_t ldy, int N, int K, bool accumulate, float* __restrict__ ws,
    unsigned* __restrict__ cnt, ThenArgs then) {
  __shared__ float red[WARPS][ROWS][TILE];
  const int t = blockIdx.x, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
  const int KS = K >> 5;
  int k0, n;  // this warp's steps
  mma::warp_steps(KS, k0, n);
  float acc[4][1][4];
  int iacc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[i][0][e] = 0.f, iacc[i][e] = 0;
  const bool ok = g < M;
  constexpr int XB = FMT == W8A16 ? 2 : 1;  // bytes per activation
  const uint4* wn = w + (static_cast<int64_t>(t) * KS + k0) * 128 + lane;  // step ks, tile i: wn[128 ks + 32 i]
  const char* xn = static_cast<const char*>(x) + (g * ldx + 32 * k0 + 4 * c) * XB;
  uint4 wb[P][4];
  uint32_t bb[P][4];
  mma::ring<P>(
      n,
      [&](int p) {
#pragma unroll
        for (int i = 0; i < 4; ++i) wb[p][i] = load_stream(wn + 32 * i);
        load_b<FMT>(bb[p], xn, ok);
        wn += 128;
        xn += 32 * XB;
      },
      [&](int p) {
        b_operands<FMT>(bb[p]);
        mma_step<FMT>(acc, iacc, wb[p], bb[p]);
      });
  if constexpr (FMT == W8A8) {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][0][e] = __int2float_rn(iacc[i][e]);
  }
  mma::finish_tile<ROWS, THEN>(acc, red, M, N, y, ldy, accumulate, ws, cnt, then,
                                [s](float v, int o) { return __fmul_rn(row_scale<FMT>(s, o), v); });
}

template <int FMT, int P, int THEN>
cudaError_t launch(const Args& a) {
  w8_mma_kernel<FMT, P, THEN><<<dim3(a.N / TILE, a.splits), WARPS * 32, 0, a.stream>>>(
      a.x, a.ldx, a.M, static_cast<const uint4*>(a.w), a.s, static_cast<half*>(a.y), a.ldy, a.N, a.K, a.accumulate,
      a.ws, a.cnt, a.then);
  return cudaGetLastError();
}

template <int FMT, int P>
cudaError_t launch_then(int then, const Args& a) {
  switch (then) {
    case THEN_NONE: return launch<FMT, P, THEN_NONE>(a);
    case THEN_SILU: return launch<FMT, P, THEN_SILU>(a);
    case THEN_NORM: return launch<FMT, P, THEN_NORM>(a);
    default: return cudaErrorInvalidValue;
  }
}

template <int FMT>
cudaError_t launch_depth(int depth, int then, const Args& a) {
  switch (depth) {
    case 2: return launch_then<FMT, 2>(then, a);
    case 4: return launch_then<FMT, 4>(then, a);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

// The K split (host, mma::splits_for): at most K / 128 (a step for each warp); the occupancy of the format's plain
// kernel at this depth decides the rule's count (its epilogues then split the same way).
cudaError_t w8_mma_splits(int fmt, int depth, int N, int K, int requested, int& splits) {
  const int most = K / (32 * WARPS);
#define W8M_SPLITS(F) \
  (depth == 4 ? mma::splits_for(w8_mma_kernel<F, 4, THEN_NONE>, N, most, requested, splits) \
              : mma::splits_for(w8_mma_kernel<F, 2, THEN_NONE>, N, most, requested, splits))
  switch (fmt) {
    case W8A16: return W8M_SPLITS(W8A16);
    case W8A8: return W8M_SPLITS(W8A8);
    case FP8: return W8M_SPLITS(FP8);
    default: return cudaErrorInvalidValue;
  }
#undef W8M_SPLITS
}

// The contract of the launcher (checked by the binding): fmt 0-2 with x, w, s as w8_mma.cu's header says; M in
// 1..8; N % 64 == 0; K % 32 == 0; x [M, ldx], rows 16-byte aligned; w as pack_w8m made it, 16-byte aligned; y [M,
// ldy] float16. splits from w8_mma_splits; with splits > 1, ws float32 [splits, M, N] and cnt N / 64 unsigned zeros
// (left zero). depth: 2 or 4 steps loaded ahead per warp. then other than THEN_NONE: M == 1, as w8_gemv's.
cudaError_t w8_mma_launch(int fmt, int M, const void* x, int64_t ldx, const void* w, const void* s, void* y,
                          int64_t ldy, int N, int K, bool accumulate, float* ws, unsigned* cnt, int splits, int depth,
                          int then, const ThenArgs& t, cudaStream_t stream) {
  const Args a{M, x, w, s, nullptr, y, ldx, ldy, N, K, 0, accumulate, ws, cnt, splits, t, stream};
  if ((then != THEN_NONE && M != 1) || M < 1 || M > ROWS) return cudaErrorInvalidValue;
  switch (fmt) {
    case W8A16: return launch_depth<W8A16>(depth, then, a);
    case W8A8: return launch_depth<W8A8>(depth, then, a);
    case FP8: return launch_depth<FP8>(depth, then, a);
    default: return cudaErrorInvalidValue;
  }
}
