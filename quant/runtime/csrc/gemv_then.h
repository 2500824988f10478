// What a GEMV's epilogue does for the next linear (one activation row; cuda_kernels.THEN_* the same codes), and its
// arguments: shared by the kernels (gemv_common.cuh) and the bindings, so host code only (no CUDA types).
#pragma once

namespace gemv {

// Nothing; SiLU(f) * g of the output's two halves f = y[:N/2], g = y[N/2:]; or, after the residual add, RMSNorm of y.
enum Then { THEN_NONE = 0, THEN_SILU = 1, THEN_NORM = 2 };

// The norm weight (float16 [N]), eps, the counter (one unsigned, 0 before and after), and where the result goes as
// the next linear's act_prep would write it: times pre (float16, or null), then afmt 0: float16; 1: int8; 2: e4m3,
// quantized by the static scale *a (float32; cuda_kernels._act_quant).
struct ThenArgs {
  const void* nw;
  float eps;
  unsigned* cnt;
  void* xn;
  const void* pre;
  const float* a;
  int afmt;
};

}  // namespace gemv
