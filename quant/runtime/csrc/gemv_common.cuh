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

template <uint32_t MASK>
__device__ __forceinline__ uint32_t and_or_1024(uint32_t a) {  // (a & MASK) | fp16x2(1024, 1024)
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(r) : "r"(a), "n"(MASK), "n"(0x64006400));
  return r;
}

__device__ __forceinline__ half2 as_h2(uint32_t u) { return *reinterpret_cast<half2*>(&u); }
__device__ __forceinline__ uint32_t as_u32(half2 h) { return *reinterpret_cast<uint32_t*>(&h); }

// Eight float16 products a * b, each rounded (the prologues' x * pre).
__device__ __forceinline__ uint4 hmul8(const uint4& a, const uint4& b) {
  return make_uint4(as_u32(__hmul2(as_h2(a.x), as_h2(b.x))), as_u32(__hmul2(as_h2(a.y), as_h2(b.y))),
                    as_u32(__hmul2(as_h2(a.z), as_h2(b.z))), as_u32(__hmul2(as_h2(a.w), as_h2(b.w))));
}

// INT4 (w4a16_gemv.cu, w4a16_mma.cu): one word of eight nibbles q + 8 -> 4 half2 of exact integers in [-8, 7], the
// nibble pairs (0, 4), (1, 5), (2, 6), (3, 7) (which k or which MMA fragment each pair is, is the caller's layout).
__device__ __forceinline__ void dequant_word(uint32_t q, half2 (&d)[4]) {
  const half2 sub = as_h2(0x64086408u);  // 1032 = 1024 + 8
  const half2 mul = as_h2(0x2c002c00u);  // 1/16
  const half2 add = as_h2(0xd480d480u);  // -72 = -(1024 / 16 + 8)
  d[0] = __hsub2(as_h2(and_or_1024<0x000f000fu>(q)), sub);
  d[1] = __hfma2(as_h2(and_or_1024<0x00f000f0u>(q)), mul, add);
  q >>= 8;
  d[2] = __hsub2(as_h2(and_or_1024<0x000f000fu>(q)), sub);
  d[3] = __hfma2(as_h2(and_or_1024<0x00f000f0u>(q)), mul, add);
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

// Programmatic dependent launch (sm_90; KernelConfig.gemv_pdl), for the persistent forms. A kernel launched with it
// (launch_persistent, pdl) may start while the kernel before it in the stream still runs: it issues its first
// weight loads (weights are never written by a kernel) and then waits here for that kernel's grid to complete,
// its writes visible, before it reads or writes anything else. `loaded`, a word of those loads, predicates the
// wait (both ways: it always waits): an acquire lets later loads move up but earlier ones down, and ptxas did sink
// the weight loads below a plain wait; with the dependency they stay above. So the kernels call it only when
// launched with it: otherwise it would hold the block until its first load returns.
__device__ __forceinline__ void wait_previous_grid(uint32_t loaded) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("{\n .reg .pred p;\n setp.ne.u32 p, %0, 0;\n @p griddepcontrol.wait;\n @!p griddepcontrol.wait;\n}"
               :: "r"(loaded) : "memory");
#endif
}
// Lets the next kernel (launched with the attribute) start as soon as every block of this grid has run this or
// exited: it then waits in wait_previous_grid, so running it first thing overlaps the next kernel's launch and
// first loads with this one's work. The next kernel's blocks take SM slots only as they free up, and only after all
// of this grid's blocks have started, so no block waits on one that cannot be scheduled.
__device__ __forceinline__ void allow_next_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;");
#endif
}

// Launches a persistent form on grid blocks of WARPS warps (host), with programmatic stream serialization when pdl
// (the previous kernel in the stream may still run when it starts: wait_previous_grid).
template <class... Params, class... Args>
cudaError_t launch_persistent(void (*kernel)(Params...), int grid, size_t smem, cudaStream_t stream, bool pdl,
                              Args... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(grid);
  cfg.blockDim = dim3(WARPS * 32);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, kernel, static_cast<Params>(args)...);
}

// The blocks of `kernel` (WARPS warps, smem bytes of dynamic shared memory) the current GPU holds at once (host): its
// SMs x the blocks an SM fits (registers, shared memory).
template <class Kernel>
cudaError_t resident_blocks(Kernel kernel, size_t smem, int& blocks) {
  int dev = 0, sms = 0, per_sm = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (err == cudaSuccess) err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, WARPS * 32, smem);
  blocks = sms * per_sm;
  return err;
}

// The persistent form's grid (host): requested > 0 caps it; -1 takes every block the GPU holds at once
// (resident_blocks), at least 1; never more than the row blocks.
template <class Kernel>
cudaError_t persistent_grid(Kernel kernel, size_t smem, int requested, int blocks, int& grid) {
  grid = requested;
  if (grid < 0) {
    const cudaError_t err = resident_blocks(kernel, smem, grid);
    if (err != cudaSuccess) return err;
  }
  grid = grid < 1 ? 1 : grid < blocks ? grid : blocks;
  return cudaSuccess;
}

// The weight row of slot r of this warp in row block vb (blockIdx.x, or a persistent block's current one).
// THEN_SILU: a block's P = WARPS * R / 2 slots [0, P) are first-half rows (outputs p of f), slots [P, 2P) their
// partners p + N/2 (g), so that each pair meets in one block; else the warp's R consecutive rows. Past the end: a
// valid row, whose result is not stored.
template <int R, int THEN>
__device__ __forceinline__ int weight_row(int r, int N, int vb) {
  const int warp = threadIdx.x >> 5;
  if constexpr (THEN == THEN_SILU) {
    constexpr int P = WARPS * R / 2;
    const int i = warp * R + r;
    const int p = min(vb * P + i % P, N / 2 - 1);
    return i < P ? p : p + N / 2;
  } else {
    return min((vb * WARPS + warp) * R + r, N - 1);
  }
}

// The persistent form's walk (one activation row; KernelConfig.w4g_persistent / w8g_persistent): gridDim.x blocks
// take the NB row blocks vb = blockIdx.x, + gridDim.x, ..., each row block's lane rounds (32 * U chunks of its C a
// row) as one sequence of steps, the weights of step i + 1 loaded before step i is computed: mac(cur, rows, c0), then
// finish(vb) after a row block's last round. On entry cur and rows hold step 0's (the caller loads them first, so
// that it can stage x meanwhile). vb and the round are the same across a block, so finish may hold a barrier. The
// steps are the one-block-per-row-block form's rounds in its order: the same sums, the same bits.
template <int R, int U, int THEN, class Mac, class Finish>
__device__ __forceinline__ void walk_row_blocks(const uint4* w, int N, int C, int NB, int lane, uint4 (&cur)[U][R],
                                                int (&rows)[R], Mac&& mac, Finish&& finish) {
  const int rounds = (C + 32 * U - 1) / (32 * U);
  int vb = blockIdx.x, round = 0;
  uint4 nxt[U][R];
  int nrows[R];
  while (true) {
    int nvb = vb, nround = round + 1;
    if (nround == rounds) {
      nround = 0;
      nvb += gridDim.x;
    }
    const bool more = nvb < NB;
    if (more) {
#pragma unroll
      for (int r = 0; r < R; ++r) nrows[r] = weight_row<R, THEN>(r, N, nvb);
      load_chunks(nxt, w, nrows, C, nround * 32 * U, lane);
    }
    mac(cur, rows, round * 32 * U);
    if (nround == 0) finish(vb);
    if (!more) return;
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int r = 0; r < R; ++r) cur[u][r] = nxt[u][r];
#pragma unroll
    for (int r = 0; r < R; ++r) rows[r] = nrows[r];
    vb = nvb;
    round = nround;
  }
}

// The 8-bit formats (cuda_ext.W8_FORMATS): x float16 / w int8 / s float16 [N]; x and w int8 / s float32 [N] (weight x
// activation scale); x and w e4m3 / s float32 [1].
enum Format { F_W8A16 = 0, F_W8A8 = 1, F_FP8 = 2 };

// Format F's scale of weight row n, in float32.
template <int F>
__device__ __forceinline__ float row_scale(const void* s, int n) {
  return F == F_W8A16 ? __half2float(static_cast<const half*>(s)[n]) : static_cast<const float*>(s)[F == F_FP8 ? 0 : n];
}

// xv quantized as the next linear's act_prep does: the division by the static scale a rounded to nearest, clamped,
// then int8 rounded half to even (afmt 1), e4m3 to nearest even (afmt 2).
__device__ __forceinline__ int8_t quant_int8(half xv, float a) {
  return static_cast<int8_t>(__float2int_rn(fminf(fmaxf(__fdiv_rn(__half2float(xv), a), -128.f), 127.f)));
}
__device__ __forceinline__ __nv_fp8_storage_t quant_e4m3(half xv, float a) {
  return __nv_cvt_float_to_fp8(fminf(fmaxf(__fdiv_rn(__half2float(xv), a), -448.f), 448.f), __NV_SATFINITE, __NV_E4M3);
}

// Element i of the result, xv, times pre and stored as the next linear's act_prep would (quant_int8 / quant_e4m3).
__device__ __forceinline__ void store_act(const ThenArgs& t, int i, half xv) {
  if (t.pre != nullptr) xv = __hmul(xv, static_cast<const half*>(t.pre)[i]);
  if (t.afmt == 0)
    static_cast<half*>(t.xn)[i] = xv;
  else if (t.afmt == 1)
    static_cast<int8_t*>(t.xn)[i] = quant_int8(xv, *t.a);
  else
    static_cast<__nv_fp8_storage_t*>(t.xn)[i] = quant_e4m3(xv, *t.a);
}

// Eight float16 values x8 in the next linear's activation type, as its act_prep would write them: afmt 0 x8 itself;
// 1 / 2 quantized by the static scale a (quant_int8 / quant_e4m3) into the first 8 bytes.
__device__ __forceinline__ uint4 quant8(uint4 x8, int afmt, float a) {
  if (afmt == 0) return x8;
  const half* x = reinterpret_cast<const half*>(&x8);
  uint4 q = make_uint4(0, 0, 0, 0);
  uint8_t* b = reinterpret_cast<uint8_t*>(&q);
#pragma unroll
  for (int k = 0; k < 8; ++k)
    b[k] = afmt == 1 ? static_cast<uint8_t>(quant_int8(x[k], a)) : static_cast<uint8_t>(quant_e4m3(x[k], a));
  return q;
}

// store_act of elements 8j .. 8j + 7 at once (xn, pre 16-byte aligned): pre8 their pre (ignored without pre), a the
// static scale (ignored for float16): one 16- or 8-byte store.
__device__ __forceinline__ void store_act8(const ThenArgs& t, int j, uint4 x8, const uint4& pre8, float a) {
  half* x = reinterpret_cast<half*>(&x8);
  const half* p = reinterpret_cast<const half*>(&pre8);
  if (t.pre != nullptr) {
#pragma unroll
    for (int k = 0; k < 8; ++k) x[k] = __hmul(x[k], p[k]);
  }
  const uint4 v = quant8(x8, t.afmt, a);
  if (t.afmt == 0) static_cast<uint4*>(t.xn)[j] = v;
  else static_cast<uint2*>(t.xn)[j] = make_uint2(v.x, v.y);
}

// Lane 0's view of the rows it stores at the end of a row block: res[m][r] = y[m][n0 + r] as float32 for rows n0 + r
// < N (the residual it adds to), all loaded before any is used, so that the loads go out together and their L2
// round trip overlaps the warp's reduction. (Loaded one by one beside their stores, nvcc kept each behind the
// previous row's store: R serial round trips at the end of every row block.)
template <int M, int R>
__device__ __forceinline__ void load_rows(float (&res)[M][R], const half* y, int64_t ldy, int n0, int N) {
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int r = 0; r < R; ++r) res[m][r] = n0 + r < N ? __half2float(y[m * ldy + n0 + r]) : 0.f;
}

// SiLU(f) * g of one output pair's float32 sums, f and g rounded to float16 first, as the unfused GEMV + act_prep
// round them.
__device__ __forceinline__ half silu_gate(float f, float g) {
  const float a = __half2float(__float2half_rn(f));
  return __hmul(__float2half_rn(a / (1.f + __expf(-a))), __float2half_rn(g));
}

// THEN_SILU's store of row block vb: v[r], this warp's finished outputs (scale applied), meet their partners in
// shared memory; result [N/2] = SiLU(f) * g with f and g rounded to float16 first, as the unfused GEMV + act_prep
// round them. The first barrier lets a persistent block reuse tot for its next row block.
template <int R>
__device__ __forceinline__ void store_silu_pairs(const float (&v)[R], const ThenArgs& then, int N, int vb) {
  constexpr int P = WARPS * R / 2;
  __shared__ float tot[2 * P];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < R; ++r) tot[warp * R + r] = v[r];
  }
  __syncthreads();
  const int t = threadIdx.x, p = vb * P + t;
  if (t < P && p < N / 2) {
    store_act(then, p, silu_gate(tot[t], tot[t + P]));
  }
}

// ss += the squares of the eight float16 values of v, in order (float32). block_rstd's and stage_norm's one order.
__device__ __forceinline__ void add_squares(const uint4& v, float& ss) {
  const half2* h = reinterpret_cast<const half2*>(&v);
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const float2 f = __half22float2(h[k]);
    ss = fmaf(f.y, f.y, fmaf(f.x, f.x, ss));
  }
}

// rsqrt(sum / N + eps), sum the block's (WARPS warps) partial sums ss, reduced in one fixed order. Called once per
// kernel (its partials' shared array).
__device__ __forceinline__ float block_rsqrt_mean(float ss, int N, float eps) {
  __shared__ float part[WARPS];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
  if (lane == 0) part[warp] = ss;
  __syncthreads();
  float total = 0.f;
#pragma unroll
  for (int w = 0; w < WARPS; ++w) total += part[w];
  return rsqrtf(total / N + eps);
}

// rsqrt(mean(y^2) + eps) of y [N] (written by other blocks or kernels: read from L2), float32 statistics, computed
// by the whole block (WARPS warps) in one fixed order: thread t sums the 16-byte units t, t + T, t + 2T, ... in turn
// (add_squares), then block_rsqrt_mean; so that the places that normalize a row, a GEMV's THEN_NORM tail and the
// PRO_NORM prologues (w4a16_gemv.cu, w8_gemv.cu; stage_norm, which keeps that order), give the same bits. `vec`: y
// loaded in 16-byte chunks (N % 8 == 0, 16-byte aligned); the elements past 8 * (N / 8) of a vec row, or all of
// another, one by one. Each thread issues NV 16-byte loads before using any: latency counts in both places (the tail
// is serial; the prologue waits on it before its first arithmetic). NV = 2, not 4: the W8A16 kernel's registers go
// 30 -> 48 (66 at 4, 7 blocks an SM: a second wave for 7B's 1024 blocks).
__device__ __forceinline__ float block_rstd(const half* y, int N, float eps, bool vec) {
  constexpr int T = WARPS * 32, NV = 2;
  const int n8 = vec ? N / 8 : 0;
  const uint4* y8 = reinterpret_cast<const uint4*>(y);
  const uint4 zero = make_uint4(0, 0, 0, 0);
  float ss = 0.f;
  for (int j0 = threadIdx.x; j0 < n8; j0 += NV * T) {
    uint4 v[NV];
#pragma unroll
    for (int u = 0; u < NV; ++u) v[u] = j0 + u * T < n8 ? __ldcg(y8 + j0 + u * T) : zero;
#pragma unroll
    for (int u = 0; u < NV; ++u) add_squares(v[u], ss);
  }
  for (int i = 8 * n8 + threadIdx.x; i < N; i += T) {
    const float h = __half2float(__ldcg(y + i));
    ss = fmaf(h, h, ss);
  }
  return block_rsqrt_mean(ss, N, eps);
}

// One 16-byte unit of the normalized row: g * (y * rstd rounded to float16), each product rounded (act_prep's
// RMSNorm; block_rstd's rstd).
__device__ __forceinline__ uint4 norm8(uint4 v, const uint4& g8, float rstd) {
  half* h = reinterpret_cast<half*>(&v);
  const half* g = reinterpret_cast<const half*>(&g8);
#pragma unroll
  for (int k = 0; k < 8; ++k) h[k] = __hmul(g[k], __float2half_rn(__half2float(h[k]) * rstd));
  return v;
}

// A row of up to HELD * WARPS * 32 16-byte units (K <= 4096) is staged from registers: each thread issues all its
// loads of x and nw at once, one L2 round trip before the statistics, in place of block_rstd's K / 2048 dependent
// rounds and then a loop over x again (the prologue cost ~2-3 us a call: stage 15's profile). Longer rows take that
// way. 4, not more: the INT4 kernel's registers went 64 -> 72 with it (7 blocks an SM, not 8).
constexpr int HELD = 4;

// A PRO_NORM prologue's staging of the row (w4a16_gemv.cu, w8_gemv.cu): each 16-byte unit u of x [K] (the residual
// stream, written by the previous kernel: read from L2) as quant8((nw * (x * rstd rounded)) * pre, afmt, a), each step
// rounded as the previous GEMV's THEN_NORM tail (norm_by_last_block, store_act8) rounds it, rstd summed in
// block_rstd's order; handed to store(u, unit) (the kernel's shared-memory layout); then a barrier. x, nw, pre (or
// null) 16-byte aligned, K % 8 == 0.
template <class Store>
__device__ __forceinline__ void stage_norm(const half* x, const half* nw, const half* pre, int K, float eps,
                                           int afmt, float a, Store&& store) {
  constexpr int T = WARPS * 32;
  const int units = K >> 3;
  const uint4 *x8 = reinterpret_cast<const uint4*>(x), *nw8 = reinterpret_cast<const uint4*>(nw),
              *pre8 = reinterpret_cast<const uint4*>(pre);
  if (units <= HELD * T) {
    const uint4 zero = make_uint4(0, 0, 0, 0);
    uint4 v[HELD], g[HELD];
#pragma unroll
    for (int h = 0; h < HELD; ++h) {
      const int u = threadIdx.x + h * T;
      v[h] = u < units ? __ldcg(x8 + u) : zero;
      g[h] = u < units ? __ldg(nw8 + u) : zero;
    }
    float ss = 0.f;  // zeros past the row add nothing, as block_rstd's
#pragma unroll
    for (int h = 0; h < HELD; ++h) add_squares(v[h], ss);
    const float rstd = block_rsqrt_mean(ss, K, eps);
#pragma unroll
    for (int h = 0; h < HELD; ++h) v[h] = norm8(v[h], g[h], rstd);
    if (pre != nullptr) {  // (loaded here, not with x: 16 registers fewer at the peak)
#pragma unroll
      for (int h = 0; h < HELD; ++h) g[h] = threadIdx.x + h * T < units ? __ldg(pre8 + threadIdx.x + h * T) : zero;
#pragma unroll
      for (int h = 0; h < HELD; ++h) v[h] = hmul8(v[h], g[h]);
    }
#pragma unroll
    for (int h = 0; h < HELD; ++h) {
      const int u = threadIdx.x + h * T;
      if (u >= units) break;
      store(u, quant8(v[h], afmt, a));
    }
  } else {
    const float rstd = block_rstd(x, K, eps, true);
    for (int u = threadIdx.x; u < units; u += T) {
      uint4 r = norm8(__ldcg(x8 + u), __ldg(nw8 + u), rstd);
      if (pre != nullptr) r = hmul8(r, __ldg(pre8 + u));
      store(u, quant8(r, afmt, a));
    }
  }
  __syncthreads();
}

// THEN_NORM, after each of `arrivals` blocks stored its part of y [N]: the last of them to finish (cnt, which it
// resets to 0 for the next launch) writes nw * (y * rsqrt(mean(y^2) + eps)) (block_rstd, norm8) through store_act.
// The other blocks' stores reach it through their fence before the count and L2 loads (__ldcg) after it, CUDA's
// threadfence-reduction pattern. This tail is serial (one block, after the whole GEMV), so its loads go NV at a
// time, as block_rstd's; a loop of 2-byte loads took ~15 us a norm on an H200 (2026-12-05 profile, 7B). A row whose
// length or pointers do not allow 16-byte loads takes the scalar loop.
__device__ __forceinline__ void norm_by_last_block(const half* y, const ThenArgs& then, int N, unsigned arrivals) {
  constexpr int T = WARPS * 32, NV = 2;
  __shared__ bool last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(then.cnt, 1u) == arrivals - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  const uintptr_t addr = reinterpret_cast<uintptr_t>(y) | reinterpret_cast<uintptr_t>(then.nw) |
                         reinterpret_cast<uintptr_t>(then.xn) | reinterpret_cast<uintptr_t>(then.pre);
  const bool vec = N % 8 == 0 && (addr & 15) == 0;
  const int n8 = vec ? N / 8 : 0;  // 16-byte chunks; elements from 8 * n8 on take the scalar loop
  const float rstd = block_rstd(y, N, then.eps, vec), a = then.afmt ? *then.a : 1.f;
  const uint4* y8 = reinterpret_cast<const uint4*>(y);
  const uint4 zero = make_uint4(0, 0, 0, 0);
  const half* nw = static_cast<const half*>(then.nw);
  for (int j0 = threadIdx.x; j0 < n8; j0 += NV * T) {
    uint4 v[NV], w[NV], p[NV];
#pragma unroll
    for (int u = 0; u < NV; ++u) {
      const bool in = j0 + u * T < n8;
      v[u] = in ? __ldcg(y8 + j0 + u * T) : zero;
      w[u] = in ? __ldg(reinterpret_cast<const uint4*>(nw) + j0 + u * T) : zero;
      p[u] = in && then.pre != nullptr ? __ldg(static_cast<const uint4*>(then.pre) + j0 + u * T) : zero;
    }
#pragma unroll
    for (int u = 0; u < NV; ++u) {
      if (j0 + u * T >= n8) break;
      store_act8(then, j0 + u * T, norm8(v[u], w[u], rstd), p[u], a);
    }
  }
  for (int i = 8 * n8 + threadIdx.x; i < N; i += T)
    store_act(then, i, __hmul(nw[i], __float2half_rn(__half2float(__ldcg(y + i)) * rstd)));
  if (threadIdx.x == 0) *then.cnt = 0u;
}

}  // namespace gemv
