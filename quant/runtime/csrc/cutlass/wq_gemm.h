// The CUTLASS weight-only GEMM's C++ interface (wq_gemm.cuh states the contract), free of CUTLASS's and torch's
// headers so that the bindings compile without either.
#pragma once
#include <cstddef>

#include <cuda_runtime.h>

struct WqGemmProblem {
  int bits;  // 8: int8 weight; 4: int4 (cutlass::int4b_t, K-packed)
  int tile;  // [0, kWqGemmTiles)
  int m, n, k, group;  // x's rows, channels, K, k a scale (== k: one a channel)
  const void* x;  // float16 [m, k]
  const void* w;  // [n, k] int8, or [n, k / 2] bytes
  const void* s;  // float16 [k / group, n]
  void* y;  // float16 [m, n]
};

// Tile T's (wq_gemm_tT.cu; cuda_ext.WQ_GEMM_TILES[T] says which): its workspace's bytes; its run on `stream`
// (0 done; the other codes: gemm_run.cuh)
#define WQ_GEMM_DECLARE(T)                                                \
  size_t wq_gemm_workspace_t##T(const WqGemmProblem& p);                  \
  int wq_gemm_run_t##T(const WqGemmProblem& p, void* workspace, size_t bytes, cudaStream_t stream);
WQ_GEMM_DECLARE(0)
WQ_GEMM_DECLARE(1)
WQ_GEMM_DECLARE(2)
#undef WQ_GEMM_DECLARE
inline constexpr size_t (*kWqGemmWorkspace[])(const WqGemmProblem&) = {wq_gemm_workspace_t0, wq_gemm_workspace_t1,
                                                                      wq_gemm_workspace_t2};
inline constexpr int (*kWqGemmRun[])(const WqGemmProblem&, void*, size_t, cudaStream_t) = {
    wq_gemm_run_t0, wq_gemm_run_t1, wq_gemm_run_t2};
constexpr int kWqGemmTiles = sizeof(kWqGemmRun) / sizeof(kWqGemmRun[0]);
