// SmoothQuant's prefill GEMM through CUTLASS's Hopper int8 kernel (sm_90a, KernelConfig.sq_prefill_gemm "cutlass"):
// y [M, N] = float16(float(x [M, K] · w [N, K]ᵀ in int32) · s[n]), or with a residual r [M, N] in place:
// r + that, added in float16. That is the arithmetic of the tl.dot path's epilogue (cuda_kernels._gemv_store), so
// the bits are the same: the int32 sums are exact, and the conversion to float32, the product and the rounding to
// float16 each round to nearest in both.
// Contract (quant/runtime/cuda_ext.py sq_gemm_ok; CUTLASS's can_implement refuses the rest): x, w, s, y contiguous,
// K a multiple of 16 and N of 8 (TMA's 16-byte rows).
// One tile: 128 × 128 × 128 (int8's 128-byte TMA lines) on clusters of 2 CTAs along M, which share the weight's
// tile (TMA multicasts it), with the ping-pong schedule: two consumer warp groups take alternate tiles, so one's
// epilogue runs under the other's MMAs. vLLM's choice for int8 on Hopper past 128 rows.
#include <cstdint>

#include <cuda_runtime.h>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"

#include "gemm_run.cuh"
#include "sq_gemm.h"

using namespace cute;

namespace {

using Half = cutlass::half_t;
using TileShape = Shape<_128, _128, _128>;
using ClusterShape = Shape<_2, _1, _1>;
constexpr auto kNearest = cutlass::FloatRoundStyle::round_to_nearest;
namespace fusion = cutlass::epilogue::fusion;

// float16(s[n] · float(acc)); with the residual C: C + that, in float16
using Scale = fusion::Sm90RowBroadcast<0, TileShape, float>;
using Scaled = fusion::Sm90EVT<fusion::Sm90Compute<cutlass::multiplies, Half, float, kNearest>, Scale,
                               fusion::Sm90AccFetch>;
using PlusResidual = fusion::Sm90EVT<fusion::Sm90Compute<cutlass::plus, Half, Half, kNearest>,
                                     fusion::Sm90SrcFetch<Half>, Scaled>;

// (The builders outside a template: GCC 12 mis-parses their nested types there; wq_gemm.cuh says the same.)
#define SQ_GEMM_TYPES(NAME, C, FUSION)                                                                             \
  using Epilogue##NAME = cutlass::epilogue::collective::CollectiveBuilder<                                        \
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,                              \
      cutlass::epilogue::collective::EpilogueTileAuto, int32_t, float, C, cutlass::layout::RowMajor, 8, Half,    \
      cutlass::layout::RowMajor, 8, cutlass::epilogue::TmaWarpSpecialized, FUSION>::CollectiveOp;                \
  using Mainloop##NAME = cutlass::gemm::collective::CollectiveBuilder<                                           \
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, int8_t, cutlass::layout::RowMajor, 16, int8_t,        \
      cutlass::layout::ColumnMajor, 16, int32_t, TileShape, ClusterShape,                                         \
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(                                         \
          sizeof(typename Epilogue##NAME::SharedStorage))>,                                                       \
      cutlass::gemm::KernelTmaWarpSpecializedPingpong>::CollectiveOp;
SQ_GEMM_TYPES(Plain, void, Scaled)
SQ_GEMM_TYPES(Residual, Half, PlusResidual)
#undef SQ_GEMM_TYPES

template <class Mainloop, class Epilogue>
struct SqGemm {
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  static constexpr bool kResidual = !std::is_void_v<typename Epilogue::ElementC>;

  static typename Gemm::Arguments arguments(const SqGemmProblem& p) {
    auto dX = cutlass::make_cute_packed_stride(typename Kernel::StrideA{}, make_shape(p.m, p.k, 1));
    auto dW = cutlass::make_cute_packed_stride(typename Kernel::StrideB{}, make_shape(p.n, p.k, 1));
    auto dY = cutlass::make_cute_packed_stride(typename Kernel::StrideD{}, make_shape(p.m, p.n, 1));
    typename Gemm::Arguments args{cutlass::gemm::GemmUniversalMode::kGemm,
                                  {p.m, p.n, p.k, 1},
                                  {static_cast<const int8_t*>(p.x), dX, static_cast<const int8_t*>(p.w), dW},
                                  {}};
    typename Scaled::Arguments scaled{{static_cast<const float*>(p.s)}, {}, {}};
    if constexpr (kResidual) {  // C = D = the residual: each tile read, then written
      args.epilogue = {{{}, scaled, {}}, static_cast<const Half*>(p.y), dY, static_cast<Half*>(p.y), dY};
    } else {
      args.epilogue = {scaled, nullptr, typename Kernel::StrideC{}, static_cast<Half*>(p.y), dY};
    }
    return args;
  }

  static size_t workspace(const SqGemmProblem& p) { return Gemm::get_workspace_size(arguments(p)); }

  static int run(const SqGemmProblem& p, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
    return run_gemm<Gemm>(arguments(p), workspace, workspace_bytes, stream);
  }
};

using Plain = SqGemm<MainloopPlain, EpiloguePlain>;
using Residual = SqGemm<MainloopResidual, EpilogueResidual>;
static_assert(Residual::kResidual && !Plain::kResidual);

}  // namespace

size_t sq_gemm_workspace(const SqGemmProblem& p) {
  return p.residual ? Residual::workspace(p) : Plain::workspace(p);
}

int sq_gemm_run(const SqGemmProblem& p, void* workspace, size_t bytes, cudaStream_t stream) {
  return p.residual ? Residual::run(p, workspace, bytes, stream) : Plain::run(p, workspace, bytes, stream);
}
