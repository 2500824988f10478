// W8A16 GEMV for 1-4 activation rows: y[m, n] = s[n] * sum_k x[m, k] * q[n, k] (+ y[m, n]).
//
// Weight layout: the checkpoint's own, int8 [N, K] row-major (no copy is made). Each lane streams 16 bytes (16
// weights of one row) per chunk with non-caching loads, U chunks of R rows in flight before any arithmetic, as the
// W4A16 GEMV does (w4a16_gemv.cu).
//
// Dequantization: one PRMT per weight puts the byte, biased to unsigned (q ^ 0x80), into the mantissa of the
// float32 2^23; subtracting 2^23 + 128 gives q exactly. Products and sums are float32 (fp16 products of int8
// weights overflow at |x| ~ 500, which LLaMa's down_proj inputs reach); the per-channel scale is applied once
// at the end, the residual added in float32 and rounded to float16 once.
#include <cuda_fp16.h>
#include <cstdint>

namespace {

constexpr int WARPS = 4;

__device__ __forceinline__ uint4 load_stream(const uint4* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

// Byte b of a word of biased (unsigned) weights as the float 2^23 + b: bytes [b, 0, 0, 0x4b].
template <int B>
__device__ __forceinline__ float biased_byte(uint32_t u) {
  return __uint_as_float(__byte_perm(u, 0x4b000000u, 0x7440 + B));
}

// One word (4 weights, k .. k + 3) against 4 floats of x, summed into acc.
__device__ __forceinline__ float dot_word(uint32_t q, const float* x, float acc) {
  const uint32_t u = q ^ 0x80808080u;
  constexpr float BIAS = 8388608.f + 128.f;
  acc = fmaf(biased_byte<0>(u) - BIAS, x[0], acc);
  acc = fmaf(biased_byte<1>(u) - BIAS, x[1], acc);
  acc = fmaf(biased_byte<2>(u) - BIAS, x[2], acc);
  acc = fmaf(biased_byte<3>(u) - BIAS, x[3], acc);
  return acc;
}

__device__ __forceinline__ uint32_t word(const uint4& v, int j) {
  return j == 0 ? v.x : j == 1 ? v.y : j == 2 ? v.z : v.w;
}

// M activation rows, R weight rows per warp, U chunks of 16 k per lane in flight.
template <int M, int R, int U>
__global__ void __launch_bounds__(WARPS * 32) w8a16_gemv_kernel(
    const half* __restrict__ x, int64_t ldx, const uint4* __restrict__ w, const half* __restrict__ s,
    half* __restrict__ y, int64_t ldy, int N, int K, bool accumulate) {
  const int lane = threadIdx.x & 31;
  const int n0 = (blockIdx.x * WARPS + (threadIdx.x >> 5)) * R;  // warps past N compute a valid row, store none
  const int C = K >> 4;  // 16-weight chunks per row (uint4 per row)
  int rows[R];
#pragma unroll
  for (int r = 0; r < R; ++r) rows[r] = min(n0 + r, N - 1);
  float acc[M][R];
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int r = 0; r < R; ++r) acc[m][r] = 0.f;

  uint4 wv[U][R];
  for (int c0 = 0; c0 < C; c0 += 32 * U) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = c0 + u * 32 + lane;
#pragma unroll
      for (int r = 0; r < R; ++r)
        wv[u][r] = c < C ? load_stream(w + (int64_t)rows[r] * C + c) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = c0 + u * 32 + lane;
      if (c >= C) break;
#pragma unroll
      for (int m = 0; m < M; ++m) {
        float xf[16];
        const uint4* xp = reinterpret_cast<const uint4*>(x + m * ldx + c * 16);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const uint4 xr = __ldg(xp + h);
          const uint32_t xw[4] = {xr.x, xr.y, xr.z, xr.w};
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const float2 f = __half22float2(*reinterpret_cast<const half2*>(&xw[i]));
            xf[h * 8 + 2 * i] = f.x;
            xf[h * 8 + 2 * i + 1] = f.y;
          }
        }
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[m][r] = dot_word(word(wv[u][r], j), xf + 4 * j, acc[m][r]);
      }
    }
  }
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int r = 0; r < R; ++r) {
      float v = acc[m][r];
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
      acc[m][r] = v;
    }
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int n = n0 + r;
      if (n >= N) continue;
      const float sc = __half2float(s[n]);
#pragma unroll
      for (int m = 0; m < M; ++m) {
        half* out = y + m * ldy + n;
        const float v = sc * acc[m][r];
        *out = __float2half_rn(accumulate ? __half2float(*out) + v : v);
      }
    }
  }
}

template <int M, int R, int U>
cudaError_t launch(const void* x, int64_t ldx, const void* w, const void* s, void* y, int64_t ldy, int N, int K,
                   bool accumulate, cudaStream_t stream) {
  const int warps = (N + R - 1) / R;
  w8a16_gemv_kernel<M, R, U><<<(warps + WARPS - 1) / WARPS, WARPS * 32, 0, stream>>>(
      static_cast<const half*>(x), ldx, static_cast<const uint4*>(w), static_cast<const half*>(s),
      static_cast<half*>(y), ldy, N, K, accumulate);
  return cudaGetLastError();
}

template <int M>
cudaError_t launch_tile(int tile, const void* x, int64_t ldx, const void* w, const void* s, void* y, int64_t ldy,
                        int N, int K, bool accumulate, cudaStream_t stream) {
  switch (tile) {  // (R, U): the tiles of cuda_ext.GEMV_TILES, in order
    case 0: return launch<M, 1, 2>(x, ldx, w, s, y, ldy, N, K, accumulate, stream);
    case 1: return launch<M, 1, 4>(x, ldx, w, s, y, ldy, N, K, accumulate, stream);
    case 2: return launch<M, 2, 2>(x, ldx, w, s, y, ldy, N, K, accumulate, stream);
    case 3: return launch<M, 2, 4>(x, ldx, w, s, y, ldy, N, K, accumulate, stream);
    case 4: return launch<M, 4, 1>(x, ldx, w, s, y, ldy, N, K, accumulate, stream);
    case 5: return launch<M, 4, 2>(x, ldx, w, s, y, ldy, N, K, accumulate, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

// The contract of the launcher (checked by the binding): M in 1..4; K % 16 == 0; x and w 16-byte aligned with row
// strides ldx (elements, a multiple of 8) and K bytes; s float16 [N]; y [M, ldy] float16.
cudaError_t w8a16_gemv_launch(int tile, int M, const void* x, int64_t ldx, const void* w, const void* s, void* y,
                              int64_t ldy, int N, int K, bool accumulate, cudaStream_t stream) {
  switch (M) {
    case 1: return launch_tile<1>(tile, x, ldx, w, s, y, ldy, N, K, accumulate, stream);
    case 2: return launch_tile<2>(tile, x, ldx, w, s, y, ldy, N, K, accumulate, stream);
    case 3: return launch_tile<3>(tile, x, ldx, w, s, y, ldy, N, K, accumulate, stream);
    case 4: return launch_tile<4>(tile, x, ldx, w, s, y, ldy, N, K, accumulate, stream);
    default: return cudaErrorInvalidValue;
  }
}
