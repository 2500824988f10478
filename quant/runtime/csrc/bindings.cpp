// PyTorch bindings of the GEMV kernels (compiled apart from them, so the kernel files need no PyTorch headers).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "gemv_then.h"

cudaError_t w4a16_gemv_launch(int tile, int M, const void* x, int64_t ldx, const void* w, const void* s, void* y,
                              int64_t ldy, int N, int K, int gshift, bool accumulate, const void* pre,
                              const void* nw, float eps, int then, const gemv::ThenArgs& t, int grid, bool pdl,
                              bool batch, cudaStream_t stream);
cudaError_t w8_gemv_launch(int fmt, int tile, int M, const void* x, int64_t ldx, const void* w, const void* s,
                           void* y, int64_t ldy, int N, int K, bool accumulate, int then, const gemv::ThenArgs& t,
                           int grid, bool pdl, const void* nw, const void* pre, const float* act_scale, float eps,
                           cudaStream_t stream);
cudaError_t w4a16_mma_splits(int M, int depth, int N, int K, int requested, int& splits);
cudaError_t w4a16_mma_launch(int M, const void* x, int64_t ldx, const void* w, const void* s, const void* pre, void* y,
                             int64_t ldy, int N, int K, int gshift, bool accumulate, float* ws, unsigned* cnt,
                             int splits, int depth, int then, const gemv::ThenArgs& t, cudaStream_t stream);
cudaError_t w8_mma_splits(int fmt, int depth, int N, int K, int requested, int& splits);
cudaError_t w8_mma_launch(int fmt, int M, const void* x, int64_t ldx, const void* w, const void* s, void* y,
                          int64_t ldy, int N, int K, bool accumulate, float* ws, unsigned* cnt, int splits, int depth,
                          int then, const gemv::ThenArgs& t, cudaStream_t stream);

// The epilogue's work for the next linear (gemv_then.h), one row: then 0 none; 1 SiLU * gate of y's halves into xn
// [1, N / 2] (out unused); 2 RMSNorm of y after the residual add (accumulate) into xn [1, N], weight nw float16 [N],
// through the int32 counter cnt [1], zero before and after. xn float16, or (pre float16 [xn's N] or empty, a
// float32 [1], afmt 1 / 2) int8 / float8_e4m3fn. Checks what the launchers' contracts ask of these.
static gemv::ThenArgs then_args(const char* fn, int64_t then, int64_t M, int64_t N, const torch::Tensor& out,
                                bool accumulate, const torch::Tensor& nw, const torch::Tensor& xn,
                                const torch::Tensor& cnt, double eps, const torch::Tensor& pre,
                                const torch::Tensor& a, int64_t afmt) {
  TORCH_CHECK(then >= 0 && then <= 2, fn, ": then 0-2, got ", then);
  if (then == 0) {
    TORCH_CHECK(out.dim() == 2 && out.size(0) == M && out.size(1) == N && out.stride(1) == 1, fn, ": out [M, N]");
    return gemv::ThenArgs{nullptr, 0.f, nullptr, nullptr, nullptr, nullptr, 0};
  }
  TORCH_CHECK(M == 1, fn, ": then on one row only; got ", M);
  const int64_t cols = then == 1 ? N / 2 : N;
  TORCH_CHECK(then != 1 || (N % 2 == 0 && !accumulate), fn, ": then 1 takes an even N and no accumulate");
  TORCH_CHECK(afmt >= 0 && afmt <= 2, fn, ": afmt 0-2, got ", afmt);
  const at::ScalarType xt[] = {at::kHalf, at::kChar, at::kFloat8_e4m3fn};
  TORCH_CHECK(xn.device() == out.device() && xn.scalar_type() == xt[afmt] && xn.is_contiguous() && xn.numel() == cols,
              fn, ": result ", xt[afmt], " [1, ", cols, "]");
  TORCH_CHECK(pre.numel() == 0 || (pre.device() == xn.device() && pre.scalar_type() == at::kHalf &&
                                   pre.is_contiguous() && pre.numel() == cols), fn, ": pre float16 [", cols, "]");
  TORCH_CHECK(afmt == 0 || (a.device() == xn.device() && a.scalar_type() == at::kFloat && a.numel() == 1), fn,
              ": quantization scale float32 [1]");
  if (then == 2) {
    TORCH_CHECK(accumulate && out.dim() == 2 && out.size(0) == 1 && out.size(1) == N && out.stride(1) == 1, fn,
                ": then 2 (RMSNorm of the residual sum) adds to out [1, N]");
    TORCH_CHECK(nw.device() == out.device() && nw.scalar_type() == at::kHalf && nw.is_contiguous() && nw.numel() == N,
                fn, ": norm weight float16 [N]");
    TORCH_CHECK(cnt.device() == out.device() && cnt.scalar_type() == at::kInt && cnt.numel() >= 1, fn,
                ": counter int32 [1]");
  }
  return gemv::ThenArgs{then == 2 ? nw.data_ptr() : nullptr, static_cast<float>(eps),
                        then == 2 ? static_cast<unsigned*>(cnt.data_ptr()) : nullptr, xn.data_ptr(),
                        pre.numel() ? pre.data_ptr() : nullptr, afmt ? a.data_ptr<float>() : nullptr,
                        static_cast<int>(afmt)};
}

// The 8-bit formats' activation and scale dtypes (w8_gemv.cu's and w8_mma.cu's format 0 W8A16, 1 W8A8, 2 FP8).
static const at::ScalarType W8_X[] = {at::kHalf, at::kChar, at::kFloat8_e4m3fn};
static const at::ScalarType W8_S[] = {at::kHalf, at::kFloat, at::kFloat};

// Whether t is a float16 [K] vector on x's device that the kernels may load 16 bytes at a time (a prologue's
// pre-quant scale or norm weight).
static bool half_vector(const torch::Tensor& t, int64_t K, const torch::Tensor& x) {
  return t.device() == x.device() && t.scalar_type() == at::kHalf && t.is_contiguous() && t.numel() == K &&
         reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

// Programmatic dependent launch (gemv_common.cuh launch_persistent) is for the persistent form on an sm_90 GPU.
static void check_pdl(const char* name, bool pdl, int64_t grid, const torch::Tensor& x) {
  TORCH_CHECK(!pdl || grid != 0, name, ": pdl with the persistent form only (grid != 0)");
  int major = 0;
  TORCH_CHECK(!pdl || (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, x.device().index()) ==
                           cudaSuccess && major >= 9),
              name, ": pdl needs compute capability 9.0 or later");
}

// The float32 partial sums [splits, M, N] of a tensor-core kernel's K split (none with one split): from the caching
// allocator on this stream, so a CUDA graph captures it.
static torch::Tensor split_partials(int splits, int64_t M, int64_t N, const torch::Tensor& x) {
  return splits > 1 ? torch::empty({splits, M, N}, x.options().dtype(at::kFloat))
                    : torch::empty({0}, x.options().dtype(at::kFloat));
}

// x [M, K] float16, w int32 [N, K / 8] (cuda_ext.pack_w4g), s float16 [N, K / group]; out [M, N] float16: written,
// or added to in place when accumulate. prequant float16 [K]: the input is x * prequant (one row; an empty tensor:
// none). norm float16 [K]: the input is RMSNorm(x) * norm (eps; then * prequant, if any), computed by every block
// (one row, grid != 0, not with then 2; an empty tensor: none). then ... then_afmt: then_args. grid (one row only
// unless 0): 0 one block per row block; -1 the persistent kernel on as many blocks as fit the GPU at once; n > 0 on
// at most n blocks. pdl: the persistent kernel launched with programmatic dependent launch (check_pdl).
// stage_batch (with prequant): x and prequant loaded for staging 8 units a thread at a time
// (KernelConfig.w4g_stage_batch). Returns out.
torch::Tensor w4a16_gemv(torch::Tensor x, torch::Tensor w, torch::Tensor s, int64_t group, torch::Tensor out,
                         bool accumulate, int64_t tile, torch::Tensor prequant, torch::Tensor norm, int64_t then,
                         torch::Tensor nw, torch::Tensor xn, torch::Tensor cnt, double eps, torch::Tensor then_pre,
                         torch::Tensor then_a, int64_t then_afmt, int64_t grid, bool pdl, bool stage_batch) {
  TORCH_CHECK(x.is_cuda() && w.device() == x.device() && s.device() == x.device() && out.device() == x.device(),
              "w4a16_gemv: tensors on one CUDA device");
  TORCH_CHECK(x.scalar_type() == at::kHalf && s.scalar_type() == at::kHalf && out.scalar_type() == at::kHalf &&
              w.scalar_type() == at::kInt, "w4a16_gemv: float16 x, s, out and int32 w");
  const int64_t M = x.size(0), N = w.size(0), K = w.size(1) * 8;
  const bool pre = prequant.numel() > 0, prenorm = norm.numel() > 0;
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.stride(0) % 8 == 0 && x.size(1) == K,
              "w4a16_gemv: x [M, K], rows 16-byte aligned");
  TORCH_CHECK(M >= 1 && M <= 4 && (!pre || M == 1), "w4a16_gemv: 1-4 rows, one with prequant; got ", M);
  TORCH_CHECK(grid >= -1 && grid < (1LL << 31) && (grid == 0 || M == 1),
              "w4a16_gemv: grid -1, 0 or n > 0, one row unless 0; got ", grid, " with ", M, " rows");
  check_pdl("w4a16_gemv", pdl, grid, x);
  TORCH_CHECK(!pre || K * 2 <= 48 * 1024, "w4a16_gemv: prequant stages K <= 24576 in shared memory");
  TORCH_CHECK(!prenorm || (M == 1 && grid != 0 && then != 2 && K * 2 <= 48 * 1024),
              "w4a16_gemv: norm takes one row, the persistent form (grid != 0), K <= 24576, and no then_norm");
  TORCH_CHECK(K > 0 && K % 32 == 0 && w.is_contiguous(), "w4a16_gemv: w [N, K / 8], K % 32 == 0, K > 0");
  TORCH_CHECK(group >= 32 && (group & (group - 1)) == 0 && K % group == 0, "w4a16_gemv: group a power of two >= 32");
  TORCH_CHECK(s.is_contiguous() && s.size(0) == N && s.size(1) * group == K, "w4a16_gemv: s [N, K / group]");
  const gemv::ThenArgs t = then_args("w4a16_gemv", then, M, N, out, accumulate, nw, xn, cnt, eps, then_pre, then_a,
                                      then_afmt);
  TORCH_CHECK(reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0 && reinterpret_cast<uintptr_t>(w.data_ptr()) % 16 == 0,
              "w4a16_gemv: x and w 16-byte aligned");
  TORCH_CHECK(!pre || half_vector(prequant, K, x), "w4a16_gemv: prequant float16 [K], 16-byte aligned");
  TORCH_CHECK(!prenorm || half_vector(norm, K, x), "w4a16_gemv: norm float16 [K], 16-byte aligned");
  const c10::cuda::CUDAGuard guard(x.device());
  const int gshift = __builtin_ctzll(group);
  const cudaError_t err = w4a16_gemv_launch(
      static_cast<int>(tile), static_cast<int>(M), x.data_ptr(), x.stride(0), w.data_ptr(), s.data_ptr(),
      out.data_ptr(), out.stride(0), static_cast<int>(N), static_cast<int>(K), gshift, accumulate,
      pre ? prequant.data_ptr() : nullptr, prenorm ? norm.data_ptr() : nullptr, static_cast<float>(eps),
      static_cast<int>(then), t, static_cast<int>(grid), pdl, stage_batch,
      at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "w4a16_gemv: ", cudaGetErrorString(err));
  return out;
}

// fmt 0 (W8A16): x float16, w int8, s float16 [N]; 1 (W8A8): x int8, w int8, s float32 [N]; 2 (FP8): x and w
// float8_e4m3fn, s float32 [1]. x [M, K], w [N, K] (the checkpoint's layout); out [M, N] float16: written, or added
// to in place when accumulate. then ... then_afmt: then_args. grid and pdl: as w4a16_gemv's. norm float16 [K]
// (or empty): x is the float16 residual stream [1, K] and the input is RMSNorm(x) * norm (eps), times prequant
// (float16 [K] or empty) and quantized by act_scale (float32 [1]; W8A8, FP8) as act_prep would, computed by every
// block of the persistent form (grid != 0), not with then 2. Returns out.
torch::Tensor w8_gemv(torch::Tensor x, torch::Tensor w, torch::Tensor s, int64_t fmt, torch::Tensor out,
                      bool accumulate, int64_t tile, int64_t then, torch::Tensor nw, torch::Tensor xn,
                      torch::Tensor cnt, double eps, torch::Tensor then_pre, torch::Tensor then_a, int64_t then_afmt,
                      int64_t grid, bool pdl, torch::Tensor norm, torch::Tensor prequant, torch::Tensor act_scale) {
  TORCH_CHECK(x.is_cuda() && w.device() == x.device() && s.device() == x.device() && out.device() == x.device(),
              "w8_gemv: tensors on one CUDA device");
  TORCH_CHECK(fmt >= 0 && fmt <= 2, "w8_gemv: format 0-2, got ", fmt);
  const at::ScalarType wt[] = {at::kChar, at::kChar, at::kFloat8_e4m3fn};
  const bool prenorm = norm.numel() > 0, pre = prequant.numel() > 0;
  const at::ScalarType xt = prenorm ? at::kHalf : W8_X[fmt];
  TORCH_CHECK(x.scalar_type() == xt && w.scalar_type() == wt[fmt] && s.scalar_type() == W8_S[fmt] &&
              out.scalar_type() == at::kHalf, "w8_gemv: dtypes of format ", fmt, ": x ", xt, ", w ", wt[fmt],
              ", s ", W8_S[fmt], ", out Half");
  const int64_t M = x.size(0), N = w.size(0), K = w.size(1);
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && (x.stride(0) * x.element_size()) % 16 == 0 && x.size(1) == K,
              "w8_gemv: x [M, K], rows 16-byte aligned");
  TORCH_CHECK(M >= 1 && M <= 4, "w8_gemv: 1-4 rows; got ", M);
  TORCH_CHECK(grid >= -1 && grid < (1LL << 31) && (grid == 0 || M == 1),
              "w8_gemv: grid -1, 0 or n > 0, one row unless 0; got ", grid, " with ", M, " rows");
  check_pdl("w8_gemv", pdl, grid, x);
  TORCH_CHECK(K > 0 && K % 16 == 0 && w.dim() == 2 && w.is_contiguous(),
              "w8_gemv: w [N, K] contiguous, K % 16 == 0, K > 0");
  TORCH_CHECK(s.is_contiguous() && s.numel() == (fmt == 2 ? 1 : N), "w8_gemv: s [N] (FP8: [1])");
  TORCH_CHECK(!prenorm || (M == 1 && grid != 0 && then != 2 && K * (fmt == 0 ? 2 : 1) <= 48 * 1024),
              "w8_gemv: norm takes one row, the persistent form (grid != 0), K * its activation bytes <= 48 KiB, "
              "and no then_norm");
  TORCH_CHECK(!prenorm || half_vector(norm, K, x), "w8_gemv: norm float16 [K], 16-byte aligned");
  TORCH_CHECK(!pre || (prenorm && fmt != 0 && half_vector(prequant, K, x)),
              "w8_gemv: prequant (with norm, W8A8 / FP8) float16 [K], 16-byte aligned");
  TORCH_CHECK(!prenorm || fmt == 0 || (act_scale.device() == x.device() && act_scale.scalar_type() == at::kFloat &&
                                       act_scale.numel() == 1),
              "w8_gemv: act_scale (with norm, W8A8 / FP8) float32 [1]");
  const gemv::ThenArgs t = then_args("w8_gemv", then, M, N, out, accumulate, nw, xn, cnt, eps, then_pre, then_a,
                                      then_afmt);
  TORCH_CHECK(reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0 && reinterpret_cast<uintptr_t>(w.data_ptr()) % 16 == 0,
              "w8_gemv: x and w 16-byte aligned");
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaError_t err = w8_gemv_launch(
      static_cast<int>(fmt), static_cast<int>(tile), static_cast<int>(M), x.data_ptr(), x.stride(0), w.data_ptr(),
      s.data_ptr(), out.data_ptr(), out.stride(0), static_cast<int>(N), static_cast<int>(K), accumulate,
      static_cast<int>(then), t, static_cast<int>(grid), pdl, prenorm ? norm.data_ptr() : nullptr,
      pre ? prequant.data_ptr() : nullptr, prenorm && fmt != 0 ? act_scale.data_ptr<float>() : nullptr,
      static_cast<float>(eps), at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "w8_gemv: ", cudaGetErrorString(err));
  return out;
}

// The K split w4a16_mma takes for M rows of [N, K] at depth on this GPU: requested > 0 (at most K / 64), or 0: its
// rule (w4a16_mma.cu). For the tests and the benchmark's records.
int64_t w4a16_mma_splits_of(int64_t M, int64_t depth, int64_t N, int64_t K, int64_t requested) {
  TORCH_CHECK(M >= 1 && M <= 32 && (depth == 4 || (depth == 8 && M <= 8)) && N > 0 && N % 64 == 0 && K > 0 &&
              K % 16 == 0 && requested >= 0,
              "w4a16_mma_splits: 1-32 rows, depth 4 (or 8 up to 8 rows), N % 64 == 0, K % 16 == 0, requested >= 0");
  int splits = 0;
  const cudaError_t err = w4a16_mma_splits(static_cast<int>(M), static_cast<int>(depth), static_cast<int>(N),
                                           static_cast<int>(K), static_cast<int>(requested), splits);
  TORCH_CHECK(err == cudaSuccess, "w4a16_mma_splits: ", cudaGetErrorString(err));
  return splits;
}

// x [M <= 32, K] float16; w int32 [N / 64, K / 16, 32, 4] and s float16 [N / 64, K / group, 8, 8] (cuda_ext.pack_w4m);
// out [M, N] float16: written, or added to in place when accumulate. cnt int32 [N / 64] zeros, left zero (the K
// split's tiles); splits 0 (the rule) or n; depth 4 or 8 (8: up to 8 rows). prequant float16 [K]: the input is
// x * prequant (one row; an empty tensor: none). then ... then_afmt: then_args (one row). Returns out.
torch::Tensor w4a16_mma(torch::Tensor x, torch::Tensor w, torch::Tensor s, int64_t group, torch::Tensor out,
                        bool accumulate, torch::Tensor cnt, int64_t splits, int64_t depth, torch::Tensor prequant,
                        int64_t then, torch::Tensor nw, torch::Tensor xn, torch::Tensor then_cnt, double eps,
                        torch::Tensor then_pre, torch::Tensor then_a, int64_t then_afmt) {
  TORCH_CHECK(x.is_cuda() && w.device() == x.device() && s.device() == x.device() && out.device() == x.device() &&
              cnt.device() == x.device(), "w4a16_mma: tensors on one CUDA device");
  TORCH_CHECK(x.scalar_type() == at::kHalf && s.scalar_type() == at::kHalf && out.scalar_type() == at::kHalf &&
              w.scalar_type() == at::kInt && cnt.scalar_type() == at::kInt,
              "w4a16_mma: float16 x, s, out; int32 w and cnt");
  TORCH_CHECK(w.dim() == 4 && w.size(0) > 0 && w.size(2) == 32 && w.size(3) == 4 && w.is_contiguous(),
              "w4a16_mma: w [N / 64, K / 16, 32, 4] (cuda_ext.pack_w4m), N > 0");
  const int64_t M = x.size(0), N = w.size(0) * 64, K = w.size(1) * 16;
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.stride(0) % 2 == 0 && x.size(1) == K &&
              reinterpret_cast<uintptr_t>(x.data_ptr()) % 4 == 0, "w4a16_mma: x [M, K], rows 4-byte aligned");
  TORCH_CHECK(M >= 1 && M <= 32, "w4a16_mma: 1-32 rows; got ", M);
  TORCH_CHECK(K > 0 && group >= 16 && (group & (group - 1)) == 0 && K % group == 0,
              "w4a16_mma: group a power of two >= 16 that divides K");
  TORCH_CHECK(s.dim() == 4 && s.size(0) == N / 64 && s.size(1) * group == K && s.size(2) == 8 && s.size(3) == 8 &&
              s.is_contiguous(), "w4a16_mma: s [N / 64, K / group, 8, 8] (cuda_ext.pack_w4m)");
  TORCH_CHECK(cnt.is_contiguous() && cnt.numel() >= N / 64, "w4a16_mma: cnt int32 [N / 64]");
  TORCH_CHECK(depth == 4 || (depth == 8 && M <= 8), "w4a16_mma: depth 4, or 8 up to 8 rows; got ", depth);
  const bool pre = prequant.numel() > 0;
  TORCH_CHECK(!pre || (M == 1 && prequant.device() == x.device() && prequant.scalar_type() == at::kHalf &&
                       prequant.is_contiguous() && prequant.numel() == K &&
                       reinterpret_cast<uintptr_t>(prequant.data_ptr()) % 4 == 0),
              "w4a16_mma: prequant float16 [K], 4-byte aligned, with one row");
  TORCH_CHECK(splits >= 0, "w4a16_mma: splits 0 (the rule) or n > 0");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(w.data_ptr()) % 16 == 0 && reinterpret_cast<uintptr_t>(s.data_ptr()) % 16 == 0,
              "w4a16_mma: w and s 16-byte aligned");
  const gemv::ThenArgs t = then_args("w4a16_mma", then, M, N, out, accumulate, nw, xn, then_cnt, eps, then_pre,
                                      then_a, then_afmt);
  const c10::cuda::CUDAGuard guard(x.device());
  const int k_splits = static_cast<int>(w4a16_mma_splits_of(M, depth, N, K, splits));
  const torch::Tensor ws = split_partials(k_splits, M, N, x);
  const cudaError_t err = w4a16_mma_launch(static_cast<int>(M), x.data_ptr(), x.stride(0), w.data_ptr(), s.data_ptr(),
                         pre ? prequant.data_ptr() : nullptr, out.data_ptr(), out.stride(0), static_cast<int>(N),
                         static_cast<int>(K), __builtin_ctzll(group), accumulate,
                         ws.data_ptr<float>(), static_cast<unsigned*>(cnt.data_ptr()), k_splits,
                         static_cast<int>(depth), static_cast<int>(then), t, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "w4a16_mma: ", cudaGetErrorString(err));
  return out;
}

// The K split w8_mma takes for format fmt, depth and [N, K] on this GPU: requested > 0 (at most K / 128), or 0: its
// rule.
int64_t w8_mma_splits_of(int64_t fmt, int64_t depth, int64_t N, int64_t K, int64_t requested) {
  TORCH_CHECK(fmt >= 0 && fmt <= 2 && (depth == 2 || depth == 4) && N > 0 && N % 64 == 0 && K > 0 && K % 32 == 0 &&
              requested >= 0, "w8_mma_splits: format 0-2, depth 2 or 4, N % 64 == 0, K % 32 == 0, requested >= 0");
  int splits = 0;
  const cudaError_t err = w8_mma_splits(static_cast<int>(fmt), static_cast<int>(depth), static_cast<int>(N),
                                        static_cast<int>(K), static_cast<int>(requested), splits);
  TORCH_CHECK(err == cudaSuccess, "w8_mma_splits: ", cudaGetErrorString(err));
  return splits;
}

// fmt 0 (W8A16): x float16, s float16 [N]; 1 (W8A8): x int8, s float32 [N]; 2 (FP8): x float8_e4m3fn, s float32 [1].
// x [M <= 8, K]; w uint8 [N / 64, K / 32, 4, 32, 16] (cuda_ext.pack_w8m); out [M, N] float16: written, or added to in
// place when accumulate. cnt int32 [N / 64] zeros, left zero; splits 0 (the rule) or n; depth 2 or 4. then ...
// then_afmt: then_args (one row). Returns out.
torch::Tensor w8_mma(torch::Tensor x, torch::Tensor w, torch::Tensor s, int64_t fmt, torch::Tensor out, bool accumulate,
                     torch::Tensor cnt, int64_t splits, int64_t depth, int64_t then, torch::Tensor nw, torch::Tensor xn,
                     torch::Tensor then_cnt, double eps, torch::Tensor then_pre, torch::Tensor then_a,
                     int64_t then_afmt) {
  TORCH_CHECK(x.is_cuda() && w.device() == x.device() && s.device() == x.device() && out.device() == x.device() &&
              cnt.device() == x.device(), "w8_mma: tensors on one CUDA device");
  TORCH_CHECK(fmt >= 0 && fmt <= 2, "w8_mma: format 0-2, got ", fmt);
  TORCH_CHECK(x.scalar_type() == W8_X[fmt] && s.scalar_type() == W8_S[fmt] && out.scalar_type() == at::kHalf &&
              w.scalar_type() == at::kByte && cnt.scalar_type() == at::kInt,
              "w8_mma: dtypes of format ", fmt, ": x ", W8_X[fmt], ", s ", W8_S[fmt], ", w uint8, out Half, cnt int32");
  TORCH_CHECK(w.dim() == 5 && w.size(0) > 0 && w.size(2) == 4 && w.size(3) == 32 && w.size(4) == 16 &&
              w.is_contiguous(), "w8_mma: w [N / 64, K / 32, 4, 32, 16] (cuda_ext.pack_w8m), N > 0");
  const int64_t M = x.size(0), N = w.size(0) * 64, K = w.size(1) * 32;
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && (x.stride(0) * x.element_size()) % 16 == 0 && x.size(1) == K &&
              reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0, "w8_mma: x [M, K], rows 16-byte aligned");
  TORCH_CHECK(M >= 1 && M <= 8, "w8_mma: 1-8 rows; got ", M);
  TORCH_CHECK(s.is_contiguous() && s.numel() == (fmt == 2 ? 1 : N), "w8_mma: s [N] (FP8: [1])");
  TORCH_CHECK(cnt.is_contiguous() && cnt.numel() >= N / 64, "w8_mma: cnt int32 [N / 64]");
  TORCH_CHECK(depth == 2 || depth == 4, "w8_mma: depth 2 or 4; got ", depth);
  TORCH_CHECK(splits >= 0, "w8_mma: splits 0 (the rule) or n > 0");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(w.data_ptr()) % 16 == 0, "w8_mma: w 16-byte aligned");
  const gemv::ThenArgs t = then_args("w8_mma", then, M, N, out, accumulate, nw, xn, then_cnt, eps, then_pre, then_a,
                                      then_afmt);
  const c10::cuda::CUDAGuard guard(x.device());
  const int k_splits = static_cast<int>(w8_mma_splits_of(fmt, depth, N, K, splits));
  const torch::Tensor ws = split_partials(k_splits, M, N, x);
  const cudaError_t err = w8_mma_launch(static_cast<int>(fmt), static_cast<int>(M), x.data_ptr(), x.stride(0), w.data_ptr(),
                      s.data_ptr(), out.data_ptr(), out.stride(0), static_cast<int>(N), static_cast<int>(K), accumulate,
                      ws.data_ptr<float>(), static_cast<unsigned*>(cnt.data_ptr()), k_splits, static_cast<int>(depth),
                      static_cast<int>(then), t, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "w8_mma: ", cudaGetErrorString(err));
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("w4a16_gemv", &w4a16_gemv, "W4A16 GEMV, 1-4 rows (w4a16_gemv.cu)");
  m.def("w4a16_mma", &w4a16_mma, "W4A16 on tensor cores, 1-32 rows (w4a16_mma.cu)");
  m.def("w4a16_mma_splits", &w4a16_mma_splits_of, "the K split w4a16_mma takes (w4a16_mma.cu)");
  m.def("w8_mma", &w8_mma, "the 8-bit formats on tensor cores, 1-8 rows (w8_mma.cu)");
  m.def("w8_mma_splits", &w8_mma_splits_of, "the K split w8_mma takes (w8_mma.cu)");
  m.def("w8_gemv", &w8_gemv, "8-bit GEMV (W8A16, W8A8, FP8), 1-4 rows (w8_gemv.cu)");
}
