// The CUTLASS weight-only GEMM on tile 0 of cuda_ext.WQ_GEMM_TILES (wq_gemm.cuh).
#include "wq_gemm.cuh"

WQ_GEMM_DEFINE(0, 128, 128, 1)
