// The CUTLASS SmoothQuant GEMM's C++ interface (sq_gemm.cu states the contract), free of CUTLASS's and torch's
// headers so that the bindings compile without either.
#pragma once
#include <cstddef>

#include <cuda_runtime.h>

struct SqGemmProblem {
  int m, n, k;  // x's rows, channels, K
  const void* x;  // int8 [m, k]
  const void* w;  // int8 [n, k]
  const void* s;  // float32 [n]: activation scale · weight scale
  void* y;  // float16 [m, n]; with residual, the residual itself, read and written in place
  bool residual;
};

// Its workspace's bytes; its run on `stream` (0 done; the other codes: gemm_run.cuh)
size_t sq_gemm_workspace(const SqGemmProblem& p);
int sq_gemm_run(const SqGemmProblem& p, void* workspace, size_t bytes, cudaStream_t stream);
