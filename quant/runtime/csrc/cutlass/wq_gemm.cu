// Weight-only prefill GEMM through CUTLASS's Hopper mixed-input kernel (sm_90a): y [M, N] = x [M, K] · (q · s)ᵀ
// for float16 x and an int8 [N, K] or int4 (K-packed, two k per byte, low nibble first: cutlass::int4b_t) weight,
// its scales s [K / group, N] (N contiguous; group == K: one scale a channel) applied in registers before the MMA —
// q · s rounded to float16, as the dequantize-then-cuBLAS path rounds it — and float32 accumulation.
// CUTLASS passes the narrow type through registers as the A operand, so the product is computed transposed
// (yᵀ = W · xᵀ, both operands K-major) with a column-major yᵀ, which is y row-major.
// Contract (quant/runtime/cuda_ext.py wq_gemm_ok; CUTLASS's can_implement refuses the rest): x, w, y contiguous,
// K a multiple of 16 (int8) or 32 (int4) and N of 8 (TMA's 16-byte rows), group == K or a multiple of 64 (the
// tile's K) dividing K.
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

#include "wq_gemm.h"

using namespace cute;

namespace {

using Half = cutlass::half_t;
using TileShape = Shape<_128, _128, _64>;  // (channels, rows, k): 64 k of float16 = 128 bytes, TMA's whole lines
using ClusterShape = Shape<_1, _1, _1>;

constexpr int kAlignH = 128 / cutlass::sizeof_bits<Half>::value;  // 16 bytes of float16
// (y of the transposed product: column-major yᵀ [N, M], alpha 1 and beta 0: C is not read)
using Epilogue = cutlass::epilogue::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
    cutlass::epilogue::collective::EpilogueTileAuto, float, float,
    Half, cutlass::layout::ColumnMajor, kAlignH, Half, cutlass::layout::ColumnMajor, kAlignH,
    cutlass::epilogue::TmaWarpSpecializedCooperative>::CollectiveOp;

// The mainloop per weight type: the weight with its scale type as the register-sourced operand (its 16-byte
// alignment in elements), x K-major. (Built outside a template: GCC 12 mis-parses the builders' nested types there.)
template <class Q>
constexpr int kAlignQ = 128 / cutlass::sizeof_bits<Q>::value;
#define WQ_MAINLOOP(Q)                                                                                             \
  cutlass::gemm::collective::CollectiveBuilder<                                                                  \
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, cute::tuple<Q, Half>, cutlass::layout::RowMajor,     \
      kAlignQ<Q>, Half, cutlass::layout::ColumnMajor, kAlignH, float, TileShape, ClusterShape,                  \
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(Epilogue::SharedStorage))>,     \
      cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp
using MainloopInt8 = WQ_MAINLOOP(int8_t);
using MainloopInt4 = WQ_MAINLOOP(cutlass::int4b_t);
#undef WQ_MAINLOOP

template <class Q, class Mainloop>
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
};

template <class G>
int run(const WqGemmProblem& p, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  typename G::Gemm gemm;
  auto args = G::arguments(p);
  if (G::Gemm::get_workspace_size(args) > workspace_bytes) return 2;
  if (gemm.can_implement(args) != cutlass::Status::kSuccess) return 1;
  if (gemm.initialize(args, workspace, stream) != cutlass::Status::kSuccess) return 3;
  return gemm.run(stream) == cutlass::Status::kSuccess ? 0 : 4;
}

template <class G>
size_t workspace(const WqGemmProblem& p) {
  return G::Gemm::get_workspace_size(G::arguments(p));
}

using GemmInt8 = WqGemm<int8_t, MainloopInt8>;
using GemmInt4 = WqGemm<cutlass::int4b_t, MainloopInt4>;

}  // namespace

size_t wq_gemm_workspace(const WqGemmProblem& p) {
  return p.bits == 8 ? workspace<GemmInt8>(p) : workspace<GemmInt4>(p);
}

int wq_gemm_run(const WqGemmProblem& p, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  return p.bits == 8 ? run<GemmInt8>(p, workspace, workspace_bytes, stream)
                     : run<GemmInt4>(p, workspace, workspace_bytes, stream);
}
