// The CUTLASS weight-only GEMM on tile 1 of cuda_ext.WQ_GEMM_TILES (wq_gemm.cuh).
#include "wq_gemm.cuh"

WQ_GEMM_DEFINE(1, 128, 256, 1)
