// Weight-only prefill GEMM through CUTLASS's Hopper mixed-input kernel (sm_90a): y [M, N] = x [M, K] · (q · s)ᵀ
// for float16 x and an int8 [N, K] or int4 (K-packed, two k per byte, low nibble first: cutlass::int4b_t) weight,
// its scales s [K / group, N] (N contiguous; group == K: one scale a channel) applied in registers before the MMA —
// q · s rounded to float16, as the dequantize-then-cuBLAS path rounds it — and float32 accumulation.
// CUTLASS passes the narrow type through registers as the A operand, so the product is computed transposed
// (yᵀ = W · xᵀ, both operands K-major) with a column-major yᵀ, which is y row-major.
// Contract (quant/runtime/cuda_ext.py wq_gemm_ok; CUTLASS's can_implement refuses the rest): x, w, y contiguous,
// K a multiple of 16 (int8) or 32 (int4) and N of 8 (TMA's 16-byte rows), group == K or a multiple of 64 (the
// tile's K) dividing K.
// Each wq_gemm_tT.cu instantiates one tile of it (WQ_GEMM_DEFINE), so that the tiles compile in parallel.
#pragma once
#include <cstdint>

#include <cuda_runtime.h>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"

#include "gemm_run.cuh"
#include "wq_gemm.h"

using namespace cute;

namespace wq {

using Half = cutlass::half_t;
constexpr int kAlignH = 128 / cutlass::sizeof_bits<Half>::value;  // 16 bytes of float16
template <class Q>
constexpr int kAlignQ = 128 / cutlass::sizeof_bits<Q>::value;

template <class Q, class Mainloop, class Epilogue>
struct WqGemm {
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static typename Gemm::Arguments arguments(const WqGemmProblem& p) {
    using StrideW = typename Kernel::StrideA;
    using StrideX = typename Kernel::StrideB;
    using StrideY = typename Kernel::StrideD;
    using StrideS = typename Mainloop::StrideScale;
    auto dW = cutlass::make_cute_packed_stride(StrideW{}, cute::make_shape(p.n, p.k, 1));
    auto dX = cutlass::make_cute_packed_stride(StrideX{}, cute::make_shape(p.m, p.k, 1));
    auto dY = cutlass::make_cute_packed_stride(StrideY{}, cute::make_shape(p.n, p.m, 1));
    auto dS = cutlass::make_cute_packed_stride(StrideS{}, cute::make_shape(p.n, p.k / p.group, 1));
    Half* y = static_cast<Half*>(p.y);
    return typename Gemm::Arguments{
        cutlass::gemm::GemmUniversalMode::kGemm,
        {p.n, p.m, p.k, 1},
        {static_cast<const Q*>(p.w), dW, static_cast<const Half*>(p.x), dX, static_cast<const Half*>(p.s), dS,
         p.group},
        {{1.0f, 0.0f}, y, dY, y, dY}};
  }

  static size_t workspace(const WqGemmProblem& p) { return Gemm::get_workspace_size(arguments(p)); }

  static int run(const WqGemmProblem& p, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
    return run_gemm<Gemm>(arguments(p), workspace, workspace_bytes, stream);
  }
};

}  // namespace wq

// One tile, T of cuda_ext.WQ_GEMM_TILES (wq_gemm.h declares what it defines): (channels TM, rows TN, k 64) of the
// transposed product on a cluster of CM CTAs along the channels (which share x's tile: TMA multicasts it). k 64:
// float16's 128-byte TMA lines, and INT4's groups of 64 stay whole. The epilogue writes the column-major yᵀ (alpha
// 1, beta 0: C is not read); the mainloop takes the weight with its scale type as the register-sourced operand (its
// 16-byte alignment in elements), x K-major. (The builders outside a template: GCC 12 mis-parses their nested types
// there.)
#define WQ_MAINLOOP(NAME, Q)                                                                                       \
  using Mainloop##NAME = cutlass::gemm::collective::CollectiveBuilder<                                           \
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, cute::tuple<Q, Half>, cutlass::layout::RowMajor,     \
      kAlignQ<Q>, Half, cutlass::layout::ColumnMajor, kAlignH, float, TileShape, ClusterShape,                  \
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(Epilogue::SharedStorage))>,     \
      cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp;
// (Its types in an unnamed namespace: each wq_gemm_tT.cu defines the same names for its own tile.)
#define WQ_GEMM_DEFINE(T, TM, TN, CM)                                                                              \
  namespace wq {                                                                                                   \
  namespace {                                                                                                      \
  using TileShape = Shape<Int<TM>, Int<TN>, _64>;                                                                \
  using ClusterShape = Shape<Int<CM>, _1, _1>;                                                                   \
  using Epilogue = cutlass::epilogue::collective::CollectiveBuilder<                                             \
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,                              \
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, Half, cutlass::layout::ColumnMajor, kAlignH, \
      Half, cutlass::layout::ColumnMajor, kAlignH, cutlass::epilogue::TmaWarpSpecializedCooperative>::CollectiveOp; \
  WQ_MAINLOOP(Int8, int8_t)                                                                                      \
  WQ_MAINLOOP(Int4, cutlass::int4b_t)                                                                            \
  using Int8 = WqGemm<int8_t, MainloopInt8, Epilogue>;                                                           \
  using Int4 = WqGemm<cutlass::int4b_t, MainloopInt4, Epilogue>;                                                 \
  }                                                                                                                \
  }                                                                                                                \
  size_t wq_gemm_workspace_t##T(const WqGemmProblem& p) {                                                          \
    return p.bits == 8 ? wq::Int8::workspace(p) : wq::Int4::workspace(p);                                          \
  }                                                                                                                \
  int wq_gemm_run_t##T(const WqGemmProblem& p, void* workspace, size_t bytes, cudaStream_t stream) {              \
    return p.bits == 8 ? wq::Int8::run(p, workspace, bytes, stream) : wq::Int4::run(p, workspace, bytes, stream);  \
  }
