// What the GEMV kernels share (w4a16_gemv.cu, w8_gemv.cu): the block shape and the streaming weight loads.
#pragma once
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cstdint>

#include "gemv_then.h"

namespace gemv {

constexpr int WARPS = 4;  // warps per block, one group of R weight rows each

__device__ __forceinline__ uint4 load_stream(const uint4* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

__device__ __forceinline__ uint32_t word(const uint4& v, int j) {
  return j == 0 ? v.x : j == 1 ? v.y : j == 2 ? v.z : v.w;
}

// U chunks of 16 bytes for each of R weight rows (C chunks per row), chunk c0 + 32u + lane for this lane, all
// issued before any is used; chunks past the row read as zeros.
template <int U, int R>
__device__ __forceinline__ void load_chunks(uint4 (&wv)[U][R], const uint4* w, const int (&rows)[R], int C, int c0,
                                            int lane) {
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int c = c0 + u * 32 + lane;
#pragma unroll
    for (int r = 0; r < R; ++r)
      wv[u][r] = c < C ? load_stream(w + (int64_t)rows[r] * C + c) : make_uint4(0, 0, 0, 0);
  }
}

// The weight row of slot r of this warp. THEN_SILU: a block's P = WARPS * R / 2 slots [0, P) are first-half rows
// (outputs p of f), slots [P, 2P) their partners p + N/2 (g), so that each pair meets in one block; else the
// warp's R consecutive rows. Past the end: a valid row, whose result is not stored.
template <int R, int THEN>
__device__ __forceinline__ int weight_row(int r, int N) {
  const int warp = threadIdx.x >> 5;
  if constexpr (THEN == THEN_SILU) {
    constexpr int P = WARPS * R / 2;
    const int i = warp * R + r;
    const int p = min(static_cast<int>(blockIdx.x) * P + i % P, N / 2 - 1);
    return i < P ? p : p + N / 2;
  } else {
    return min((static_cast<int>(blockIdx.x) * WARPS + warp) * R + r, N - 1);
  }
}

// Element i of the result, xv, times pre and quantized as the next linear's act_prep does: the division rounded to
// nearest, clamped, then int8 rounded half to even, e4m3 to nearest even.
__device__ __forceinline__ void store_act(const ThenArgs& t, int i, half xv) {
  if (t.pre != nullptr) xv = __hmul(xv, static_cast<const half*>(t.pre)[i]);
  if (t.afmt == 0) {
    static_cast<half*>(t.xn)[i] = xv;
    return;
  }
  const float v = __fdiv_rn(__half2float(xv), *t.a);
  if (t.afmt == 1)
    static_cast<int8_t*>(t.xn)[i] = static_cast<int8_t>(__float2int_rn(fminf(fmaxf(v, -128.f), 127.f)));
  else
    static_cast<__nv_fp8_storage_t*>(t.xn)[i] = __nv_cvt_float_to_fp8(fminf(fmaxf(v, -448.f), 448.f), __NV_SATFINITE,
                                                                     __NV_E4M3);
}

// THEN_SILU's store: v[r], this warp's finished outputs (scale applied), meet their partners in shared memory;
// result [N/2] = SiLU(f) * g with f and g rounded to float16 first, as the unfused GEMV + act_prep round them.
template <int R>
__device__ __forceinline__ void store_silu_pairs(const float (&v)[R], const ThenArgs& then, int N) {
  constexpr int P = WARPS * R / 2;
  __shared__ float tot[2 * P];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < R; ++r) tot[warp * R + r] = v[r];
  }
  __syncthreads();
  const int t = threadIdx.x, p = blockIdx.x * P + t;
  if (t < P && p < N / 2) {
    const float a = __half2float(__float2half_rn(tot[t]));
    store_act(then, p, __hmul(__float2half_rn(a / (1.f + __expf(-a))), __float2half_rn(tot[t + P])));
  }
}

// THEN_NORM, after every block stored its part of y [N]: the last block to finish (cnt, which it resets to 0 for the
// next launch) writes nw * (y * rsqrt(mean(y^2) + eps)), float32 statistics, y * rstd rounded to float16 first
// (act_prep's RMSNorm), through store_act. The other blocks' stores reach it through their fence before the count
// and L2 loads (__ldcg) after it, CUDA's threadfence-reduction pattern.
__device__ __forceinline__ void norm_by_last_block(const half* y, const ThenArgs& then, int N) {
  __shared__ bool last;
  __shared__ float part[WARPS];
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(then.cnt, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float ss = 0.f;
  for (int i = threadIdx.x; i < N; i += WARPS * 32) {
    const float h = __half2float(__ldcg(y + i));
    ss = fmaf(h, h, ss);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
  if (lane == 0) part[warp] = ss;
  __syncthreads();
  float total = 0.f;
#pragma unroll
  for (int w = 0; w < WARPS; ++w) total += part[w];
  const float rstd = rsqrtf(total / N + then.eps);
  for (int i = threadIdx.x; i < N; i += WARPS * 32)
    store_act(then, i, __hmul(static_cast<const half*>(then.nw)[i],
                              __float2half_rn(__half2float(__ldcg(y + i)) * rstd)));
  if (threadIdx.x == 0) *then.cnt = 0u;
}

}  // namespace gemv
