// What the GEMV kernels share (w4a16_gemv.cu, w8_gemv.cu): the block shape and the streaming weight loads.
#pragma once
#include <cstdint>

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

}  // namespace gemv
