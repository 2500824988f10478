// What the tensor-core decode kernels share (w4a16_mma.cu, w8_mma.cu): the tile of 64 output channels and its
// interleave of the two halves, the float16 MMA, the K split, the ring of registers, and a tile's end (the warps'
// and splits' sums in a fixed order, then the store or the next linear's prologue).
#pragma once
#include <cuda_fp16.h>
#include <cstdint>

#include "gemv_common.cuh"

namespace mma {

using gemv::WARPS;          // warps per block, as the GEMVs'
constexpr int TILE = 64;  // output channels per tile

// The weight row that column c (0-63) of tile t holds: rows 32t..32t+31, then N/2 + 32t..: fc||gate's SiLU * gate
// pairs meet in one tile (cuda_ext.mma_tile_rows).
__device__ __forceinline__ int tile_row(int t, int c, int N) {
  return c < 32 ? 32 * t + c : N / 2 + 32 * t + (c - 32);
}

// d += a * b: mma.sync m16n8k16, float16 operands (a: 16 x 16 row-major fragment, b: 16 x 8), float32 sums.
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// This warp's steps [k0, k0 + n) of the KS steps of its tile: block split (blockIdx.y of gridDim.y) takes its share,
// each warp a contiguous quarter of that.
__device__ __forceinline__ void warp_steps(int KS, int& k0, int& n) {
  const int split = blockIdx.y, splits = gridDim.y, warp = threadIdx.x >> 5;
  const int b0 = static_cast<int>(static_cast<int64_t>(KS) * split / splits);
  const int b1 = static_cast<int>(static_cast<int64_t>(KS) * (split + 1) / splits);
  k0 = b0 + (b1 - b0) * warp / WARPS;
  n = b0 + (b1 - b0) * (warp + 1) / WARPS - k0;
}

// n steps through a ring of P register slots: load(p) puts the next step into slot p; step(p) computes slot p's.
// Each slot is computed, then reloaded with the step P on: P - 1 steps stay in flight while one is computed, and
// the ring needs no register copies (loading first would). Every step is loaded once and computed once, in order.
template <int P, class Load, class Step>
__device__ __forceinline__ void ring(int n, Load&& load, Step&& step) {
#pragma unroll
  for (int p = 0; p < P; ++p)
    if (p < n) load(p);
  int i = 0;
  for (; i + 2 * P <= n; i += P) {  // every slot's step has a step P on to load
#pragma unroll
    for (int p = 0; p < P; ++p) {
      step(p);
      load(p);
    }
  }
  for (; i < n; i += P) {  // the last 1 .. 2P - 1 steps
#pragma unroll
    for (int p = 0; p < P; ++p)
      if (i + p < n) {
        step(p);
        if (i + p + P < n) load(p);
      }
  }
}

// A launch's arguments (host): the kernels' own, the grid's K split, the stream. pre and gshift: INT4's (the pre-quant
// scale or null; log2 of the group), unused by the 8-bit kernel.
struct Args {
  int M;
  const void *x, *w, *s, *pre;
  void* y;
  int64_t ldx, ldy;
  int N, K, gshift;
  bool accumulate;
  float* ws;
  unsigned* cnt;
  int splits;
  gemv::ThenArgs then;
  cudaStream_t stream;
};

// The K split (host): requested > 0 taken as it is; 0 fills the GPU once, as many splits as make the tiles' blocks
// fit on it at once (SMs x the blocks an SM holds of `kernel`: the caller passes one instantiation whatever the
// depth, pre-quant scale or epilogue, so that those give the same sums), at least 1. Either way at most `most` (a
// step for each warp) and 65535 (the grid's y). The same shape on the same GPU gets the same splits, so the same bits.
template <class Kernel>
cudaError_t splits_for(Kernel kernel, int N, int most, int requested, int& splits) {
  most = most < 1 ? 1 : most < 65535 ? most : 65535;
  splits = requested;
  if (splits <= 0) {
    int resident = 0;
    const cudaError_t err = gemv::resident_blocks(kernel, 0, resident);
    if (err != cudaSuccess) return err;
    splits = resident / (N / TILE);
  }
  splits = splits < 1 ? 1 : splits > most ? most : splits;
  return cudaSuccess;
}

// The end of tile t = blockIdx.x: acc[i][r] is this warp's C fragment of columns 16i.. and activation rows 8r.. (c0 c1:
// column g, rows 2c, 2c + 1; c2 c3: column g + 8). The warps' sums meet in red in warp order; with more than one
// split, each block writes its partial to ws [splits, M, N] and the last block of the tile to arrive (cnt[t], CUDA's
// threadfence-reduction pattern; left 0 for the next launch) adds the partials in split order. That block then
// stores value(sum, n) for output n (rounded to float16; added to y in float32 first when accumulating), or, THEN
// (one row), SiLU * gate of the tile's 32 pairs / the RMSNorm of y after every tile (gemv_then.h).
template <int ROWS, int THEN, class Value>
__device__ __forceinline__ void finish_tile(const float (&acc)[4][ROWS / 8][4], float (&red)[WARPS][ROWS][TILE],
                                            int M, int N, half* y, int64_t ldy, bool accumulate, float* ws,
                                            unsigned* cnt, const gemv::ThenArgs& then, Value&& value) {
  const int t = blockIdx.x, split = blockIdx.y, splits = gridDim.y;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, c = lane & 3;
#pragma unroll
  for (int r = 0; r < ROWS / 8; ++r)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int row = 8 * r + 2 * c + e;
      if (row < M) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          red[warp][row][16 * i + g] = acc[i][r][e];
          red[warp][row][16 * i + 8 + g] = acc[i][r][2 + e];
        }
      }
    }
  __syncthreads();
  float* tot = &red[0][0][0];  // [M][TILE]: each (row, column) read and rewritten by one thread
  for (int j = threadIdx.x; j < M * TILE; j += WARPS * 32) {
    const int row = j / TILE, col = j % TILE;
    float v = red[0][row][col];
#pragma unroll
    for (int w = 1; w < WARPS; ++w) v += red[w][row][col];
    if (splits == 1)
      tot[j] = v;
    else
      ws[(static_cast<int64_t>(split) * M + row) * N + TILE * t + col] = v;
  }
  if (splits > 1) {
    __shared__ bool last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(cnt + t, 1u) == static_cast<unsigned>(splits) - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    for (int j = threadIdx.x; j < M * TILE; j += WARPS * 32) {
      const int row = j / TILE, col = j % TILE;
      float v = 0.f;
      for (int q = 0; q < splits; ++q) v += __ldcg(ws + (static_cast<int64_t>(q) * M + row) * N + TILE * t + col);
      tot[j] = v;
    }
    if (threadIdx.x == 0) cnt[t] = 0u;
  }
  __syncthreads();
  if constexpr (THEN == gemv::THEN_SILU) {
    const int p = threadIdx.x;
    if (p < 32) {
      const int n = 32 * t + p;
      gemv::store_act(then, n, gemv::silu_gate(value(tot[p], n), value(tot[p + 32], N / 2 + n)));
    }
  } else {
    for (int j = threadIdx.x; j < M * TILE; j += WARPS * 32) {
      const int n = tile_row(t, j % TILE, N);
      half* out = y + (j / TILE) * ldy + n;
      const float v = value(tot[j], n);
      *out = __float2half_rn(accumulate ? __fadd_rn(__half2float(*out), v) : v);
    }
    if constexpr (THEN == gemv::THEN_NORM) gemv::norm_by_last_block(y, then, N, gridDim.x);
  }
}

}  // namespace mma
