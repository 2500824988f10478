// A CUTLASS device GEMM (GemmUniversalAdapter) run on its arguments, with the return codes wq_gemm.h and sq_gemm.h
// document: 0 done, 1 CUTLASS cannot take the problem, 2 workspace too small, 3 / 4 initialize / launch failed.
#pragma once
#include <cstddef>

#include <cuda_runtime.h>

#include "cutlass/cutlass.h"

template <class Gemm>
int run_gemm(const typename Gemm::Arguments& args, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  Gemm gemm;
  if (Gemm::get_workspace_size(args) > workspace_bytes) return 2;
  if (gemm.can_implement(args) != cutlass::Status::kSuccess) return 1;
  if (gemm.initialize(args, workspace, stream) != cutlass::Status::kSuccess) return 3;
  return gemm.run(stream) == cutlass::Status::kSuccess ? 0 : 4;
}
