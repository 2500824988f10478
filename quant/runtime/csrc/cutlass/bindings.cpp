// Python bindings of the CUTLASS GEMMs (wq_gemm.cuh, sq_gemm.cu): their own extension, built only where a KernelConfig
// asks for one (quant/runtime/cuda_ext.py load_cutlass), as CUTLASS's templates take a minute or more to compile.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "sq_gemm.h"
#include "wq_gemm.h"

// Problem p of a CUTLASS GEMM (its workspace and run functions: wq_gemm.h, sq_gemm.h) on the current stream, with a
// workspace of its own on `device`; a refusal or failure is one error naming the GEMM and `problem()` (called then
// only: no string is built on the prefill's path).
template <class P, class Describe>
void run_cutlass(const char* gemm, size_t (*workspace_bytes)(const P&),
                 int (*run)(const P&, void*, size_t, cudaStream_t), const P& p, const torch::Device& device,
                 Describe problem) {
  const size_t bytes = workspace_bytes(p);
  auto workspace = torch::empty({static_cast<int64_t>(bytes)}, torch::dtype(torch::kUInt8).device(device));
  const int rc = run(p, workspace.data_ptr(), bytes, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(rc == 0, gemm, ": CUTLASS ", rc == 1 ? "cannot take" : "failed on", " ", problem(), " (code ", rc, ")");
}

// y [M, N] float16 = x [M, K] float16 · (q · s)ᵀ: w int8 [N, K] (bits 8) or its int4 values two a byte along K, low
// nibble first ([N, K / 2], bits 4); s float16 [K / group, N]; tile: which of wq_gemm.h's kWqGemmTiles.
torch::Tensor wq_gemm(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& s, int64_t bits,
                      int64_t group, int64_t tile) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.scalar_type() == torch::kHalf && x.is_contiguous(),
              "wq_gemm: x must be contiguous float16 [M, K] on the GPU");
  const int64_t m = x.size(0), k = x.size(1), n = w.size(0);
  TORCH_CHECK(bits == 8 || bits == 4, "wq_gemm: bits must be 8 or 4, got ", bits);
  TORCH_CHECK(w.device() == x.device() && w.dim() == 2 && w.scalar_type() == torch::kInt8 && w.is_contiguous() &&
                  w.size(1) * (bits == 4 ? 2 : 1) == k,
              "wq_gemm: w must be contiguous int8 [N, K] (bits 8) or [N, K / 2] (bits 4) beside x");
  TORCH_CHECK(tile >= 0 && tile < kWqGemmTiles, "wq_gemm: tile ", tile, " is not one of the ", kWqGemmTiles);
  TORCH_CHECK(group > 0 && k % group == 0, "wq_gemm: group ", group, " does not divide K ", k);
  TORCH_CHECK(s.device() == x.device() && s.scalar_type() == torch::kHalf && s.is_contiguous() &&
                  s.numel() == (k / group) * n,
              "wq_gemm: s must be contiguous float16 [K / group, N]");
  const c10::cuda::CUDAGuard guard(x.device());
  auto y = torch::empty({m, n}, x.options());
  const WqGemmProblem p{static_cast<int>(bits), static_cast<int>(tile), static_cast<int>(m), static_cast<int>(n),
                        static_cast<int>(k), static_cast<int>(group), x.data_ptr(), w.data_ptr(), s.data_ptr(),
                        y.data_ptr()};
  run_cutlass("wq_gemm", kWqGemmWorkspace[tile], kWqGemmRun[tile], p, x.device(),
              [&] { return c10::str("M ", m, " N ", n, " K ", k, " group ", group, " tile ", tile); });
  return y;
}

// y [M, N] float16 = (x [M, K] int8 · w [N, K]ᵀ int8 in int32) · s [N] float32, rounded to float16; with residual
// (float16 [M, N]): residual + y, in place, and residual returned.
torch::Tensor sq_gemm(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& s,
                      const c10::optional<torch::Tensor>& residual) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.scalar_type() == torch::kInt8 && x.is_contiguous(),
              "sq_gemm: x must be contiguous int8 [M, K] on the GPU");
  const int64_t m = x.size(0), k = x.size(1), n = w.size(0);
  TORCH_CHECK(w.device() == x.device() && w.dim() == 2 && w.scalar_type() == torch::kInt8 && w.is_contiguous() &&
                  w.size(1) == k,
              "sq_gemm: w must be contiguous int8 [N, K] beside x");
  TORCH_CHECK(s.device() == x.device() && s.scalar_type() == torch::kFloat && s.is_contiguous() && s.numel() == n,
              "sq_gemm: s must be contiguous float32 [N]");
  if (residual) {
    TORCH_CHECK(residual->device() == x.device() && residual->scalar_type() == torch::kHalf &&
                    residual->is_contiguous() && residual->size(0) == m && residual->size(1) == n,
                "sq_gemm: residual must be contiguous float16 [M, N]");
  }
  const c10::cuda::CUDAGuard guard(x.device());
  auto y = residual ? *residual : torch::empty({m, n}, x.options().dtype(torch::kHalf));
  const SqGemmProblem p{static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), x.data_ptr(), w.data_ptr(),
                        s.data_ptr(), y.data_ptr(), residual.has_value()};
  run_cutlass("sq_gemm", sq_gemm_workspace, sq_gemm_run, p, x.device(),
              [&] { return c10::str("M ", m, " N ", n, " K ", k); });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("wq_gemm", &wq_gemm, "weight-only GEMM through CUTLASS's Hopper mixed-input kernel");
  m.def("sq_gemm", &sq_gemm, "SmoothQuant's int8 GEMM through CUTLASS's Hopper kernel");
}
