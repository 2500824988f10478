// The CUTLASS weight-only GEMM's C++ interface (wq_gemm.cu states the contract), free of CUTLASS's and torch's
// headers so that the bindings compile without either.
#pragma once
#include <cstddef>

#include <cuda_runtime.h>

// The tiles wq_gemm.cu instantiates, in its WQ_TILE order (quant/runtime/cuda_ext.py WQ_GEMM_TILES names them)
constexpr int kWqGemmTiles = 3;

struct WqGemmProblem {
  int bits;  // 8: int8 weight; 4: int4 (cutlass::int4b_t, K-packed)
  int tile;  // [0, kWqGemmTiles)
  int m, n, k, group;  // x's rows, channels, K, k a scale (== k: one a channel)
  const void* x;  // float16 [m, k]
  const void* w;  // [n, k] int8, or [n, k / 2] bytes
  const void* s;  // float16 [k / group, n]
  void* y;  // float16 [m, n]
};

size_t wq_gemm_workspace(const WqGemmProblem& p);
// 0: done; 1: CUTLASS cannot take the problem; 2: workspace too small; 3, 4: initialize / launch failed
int wq_gemm_run(const WqGemmProblem& p, void* workspace, size_t workspace_bytes, cudaStream_t stream);
