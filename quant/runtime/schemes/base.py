"""What every format's handler shares: the base class, the kernel choice (:class:`KernelConfig`), int4 packing."""
from __future__ import annotations

import collections
import dataclasses
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from quant.runtime import cuda_ext

FP8_E4M3 = torch.float8_e4m3fn
FP8_MAX = 448.0
INT4_KERNEL_GROUPS = (256, 128, 64, 32)  # what _weight_int4pack_mm_for_cpu accepts, largest first
INT4_KERNEL_ROW_MULTIPLE = 16  # _convert_weight_to_int4pack_for_cpu: out-features must be divisible by this
W4K_MAX_M = 64  # cuda_kernels.W4K_MAX_M, here without importing Triton (a test holds them equal)


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def unpack_int4_rows(packed: torch.Tensor) -> torch.Tensor:
    """int8 [out/2, in] (two signed int4 per byte, even out-row in the low nibble) → int8 [out, in] in [-8, 7]."""
    low = torch.bitwise_right_shift(torch.bitwise_left_shift(packed, 4), 4)  # arithmetic shift sign-extends
    high = torch.bitwise_right_shift(packed, 4)
    return torch.stack((low, high), dim=1).reshape(packed.shape[0] * 2, packed.shape[1])


def pack_int4_rows(q: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`unpack_int4_rows` (ModelOpt's layout): int [out, in] in [-8, 7] → int8 [out/2, in]."""
    q = q.to(torch.int16)
    return ((q[0::2] & 0xF) | (q[1::2] << 4)).to(torch.uint8).view(torch.int8)


def _gemm_tile(tile: tuple) -> bool:
    """A prefill GEMM's tile as KernelConfig takes it: four powers of two (three block sizes, warps), stages >= 1."""
    return len(tile) == 5 and all(v > 0 and v & (v - 1) == 0 for v in tile[:4]) and tile[4] >= 1


def _cuda_kernels():
    from quant.runtime import cuda_kernels

    return cuda_kernels


INT4_KERNELS = ("tinygemm", "triton", "kpack")
ALGO_KEYS = ("dense", "W8A16", "W8A8_SQ_PER_CHANNEL", "W4A16_AWQ", "FP8")


@dataclass(frozen=True)
class KernelConfig:
    """Which kernel each CUDA path takes: a value handed to the runtime (``TorchRuntime(..., kernels=)``) and on to
    every handler, never a module global. The defaults were chosen with ``python -m experiments.bench --sweep``
    on an H200; a card that measured otherwise changes them in :data:`CARD_KERNELS`, which the runtime applies when
    it is given no config. The benchmark and the tests make variants with :func:`dataclasses.replace`. The CPU path
    has one kernel per format and ignores this."""

    # Formats whose batch-1 rows take the fused Triton GEMV (else a prologue kernel, then the M > 1 path:
    # cuBLAS / _int_mm / _scaled_mm / tl.dot).
    gemv: frozenset[str] = frozenset(ALGO_KEYS)
    # Batch-1 GEMV: RMSNorm / SiLU·gate / activation quantization inside the GEMV (one launch, but every program
    # recomputes them for the whole row) or in one act_prep kernel before it (False: faster for SmoothQuant
    # and FP8 on an H200, whose per-element division and fp8 rounding per program cost more than a launch).
    fuse_prologue: bool = False
    # SmoothQuant above 64 rows (prefill): "triton" (tl.dot int8, epilogue fused), "tma" (the same epilogue on a
    # persistent GEMM whose operands come through TMA descriptors, cuda_kernels.i8_tma_mm; built, not yet timed on a
    # GPU: experiments.bench RECIPE@sqtma), "cutlass" (CUTLASS's Hopper int8 GEMM, warp-specialized ping-pong, the
    # same epilogue as an EVT, cuda_ext.sq_gemm; float16, on Hopper, else "triton"; built, not yet run on a GPU:
    # RECIPE@sqcutlass) or "int_mm" (cuBLASLt). Why CUTLASS: at 1024 rows on an H100 (7B layer, stage 27) FP8's
    # cuBLASLt GEMMs took 383 µs a layer and the int8 tl.dot 425, on tensor cores of the same peak rate.
    sq_prefill_gemm: str = "triton"
    # Its tile (BM, BR, BK, warps, stages) for "triton" / "tma"; None: cuda_kernels.INT8_GEMM_CONFIG.
    sq_prefill_tile: tuple[int, int, int, int, int] | None = None
    # The tl.dot prefill (SmoothQuant's "triton"; wq_prefill's formats): the output tiles taken in groups of this
    # many tiles of x's rows, those fastest, so that the programs resident together share each weight tile
    # (cuda_kernels.wq_mm group_m); 0: x's row tile slowest, each weight tile read from memory once per tile of
    # rows. The same bits. SmoothQuant's TTFT at input 1024, batch 1, on an H100 (5 interleaved rounds, 2026-12-07;
    # experiments/results/gpu/kernels stage 27) went from 1.02× FP16 to 1.17× on LLaMa-2-7B (two runs) and from
    # 0.98× to 1.19× on Llama-3-8B (experiments.bench RECIPE@nopg: the plain order; on the larger tile
    # @sqp128x256x128w8s4g8, 1.18× / 1.22×: cuda_kernels.INT8_GEMM_CONFIG says why it is not the default). Not yet
    # timed on an H200.
    prefill_group: int = 8
    # Prefill (the CUDA path's forward over T tokens): q and k rotated and k, v stored into the KV cache by one kernel
    # (cuda_kernels.rope_cache_write with a slot per token, decode's RoPE), instead of torch ops on cos / sin tables
    # and a copy into the cache (~5.2 ms of FP16's 25.3 ms of prefill kernels at input 1024 on an H100, 7B, 448
    # launches). It rounds once, as decode does (torch's ops round each step). On an H100 (2026-12-07, 5 interleaved
    # rounds; experiments/results/gpu/kernels stage 28) it shortened the TTFT of every recipe at inputs 512 / 1024
    # and batches 1 / 8 on both shapes: FP16 × 1.13–1.19 (7B) and 1.08–1.12 (8B), FP8 and SmoothQuant more;
    # decode unchanged. Off (experiments.bench RECIPE@noprerope): the torch ops, the CPU path's arithmetic.
    prefill_rope: bool = True
    # FP8 prefill: cuBLASLt's fast accumulation in _scaled_mm (use_fast_accum: the tensor cores' partial sums are not
    # promoted to float32 along K). Off: on an H100 (same run) TTFT × FP16 at input 1024 went 1.39–1.40 → 1.42–1.43
    # (7B) and 1.46 → 1.50 (8B), but the GEMM's error against float64 grew from 1.3e-4 to 1.3e-3 – 2.9e-3 (K 4096 –
    # 14336, M 1024, relative), and the default model's quality on CUDA was not measured with it
    # (experiments.bench RECIPE@fastacc: on).
    fp8_fast_accum: bool = False
    # W4A16 for 1–64 rows: "tinygemm" (aten._weight_int4pack_mm, repacked at load: int4 through tensor cores),
    # "triton" (the GEMV / tl.dot on the stored layout, nibble → float on the CUDA cores), or "kpack" (float16, the
    # rows of ``w4k_rows``: int4 → half2 in registers, tensor cores, on a k-packed copy made at load,
    # cuda_kernels.w4k_mm; the other rows: tinygemm). Default "kpack" over rows 2–16: on an H200 (7B/8B layer
    # shapes, experiments/results/gpu/kernels) it holds 1.26–1.36× FP16 cuBLAS at 2–16 rows where tinygemm falls to
    # 0.44–1.09×; at 1 row tinygemm is faster (1.36–1.41× vs 1.25–1.31×). The kernel takes up to W4K_MAX_M rows
    # (17–64 in tiles of 32 / 64 rows, each weight read once; their tiles chosen from the compiled code alone,
    # cuda_kernels.W4K_TILES). Rows 2–64: end to end on an H200 (7B, input 512, interleaved, 2026-12-05) batch 32
    # took 0.87× FP16 where tinygemm took 0.43×, batches 4 and 16 the same (experiments.bench RECIPE@w4k16 the
    # old 2–16). Rows that w4g_rows or w4m_rows take (1 and 2–16 by default) go to those kernels first.
    int4_kernel: str = "kpack"
    w4k_rows: tuple[int, int] = (2, 64)
    # Per format (an ALGO_KEYS entry), overriding the GEMV kernel's tuned tables (cuda_kernels.GEMV_CVT and
    # GEMV_CONFIG): the weight-conversion variant, and the (BLOCK_R, BLOCK_K, warps) tile.
    gemv_cvt: tuple[tuple[str, int], ...] = ()
    gemv_tile: tuple[tuple[str, tuple[int, int, int]], ...] = ()
    # The k-packed INT4 kernel's (BLOCK_N, KW, warps, stages) at every row tile; None: its tuned tile per row tile
    # (cuda_kernels.W4K_TILES).
    w4k_tile: tuple[int, int, int, int] | None = None
    # INT4 prefill (more than 64 rows) dequantizes the k-packed copy (cuda_kernels.dequant_int4_k) rather than the
    # stored layout, which is then not kept where every row up to 64 has a kernel of its own: one copy of the
    # weights less (0.5 byte a weight), the same bits. On an H200 (7B, input 512, interleaved, 2026-12-05) TTFT went
    # from 0.49× to 0.74× FP16's and peak memory at batch 1 from 13.3 to 10.3 GiB, decode unchanged
    # (experiments.bench RECIPE@nokprefill: the stored layout's prefill).
    w4k_prefill: bool = True
    # INT4 rows (1–4) that take the compiled CUDA GEMV (cuda_ext.w4a16_gemv: float16, on a copy reordered at load,
    # ahead of w4k_rows and tinygemm); None: off. Where the extension cannot be built, the other kernels run.
    w4g_rows: tuple[int, int] | None = (1, 1)
    # Its (weight rows per warp, chunks in flight per lane), one of cuda_ext.GEMV_TILES; None: cuda_ext.W4G_TILE.
    # (4, 1) with the persistent form (double-buffered registers: two chunks in flight a lane). Each linear kind
    # timed alone on an H100 (experiments.kernel_bench --sweep-w4g --per-linear, 2026-12-06), all linears of a
    # step: 1.713 ms on (4, 1) against 1.739 on (2, 2) for LLaMa-2-7B, 1.810 against 1.838 for Llama-3-8B; (2, 2)
    # stays 0.3–0.4 µs a call faster on down_proj alone (K 11008 / 14336), too little for a tile per K.
    w4g_tile: tuple[int, int] | None = (4, 1)
    # Its persistent form at one row: as many blocks as the GPU holds at once walk the row blocks, each warp loading
    # its next weights before computing the current ones (w4a16_gemv.cu), the same sums in the same order as the
    # one-block-per-row-block form. On an H200 (7B, batch 1, interleaved, 2026-12-05) 1.81× FP16 on tile (2, 2)
    # and 1.78× on (2, 4) against that form's 1.73× on (2, 4) (experiments.bench RECIPE@now4gp: that form).
    w4g_persistent: bool = True
    # Its pre-quant staging (o_proj, down_proj: x · pre into shared memory once a block) with a thread's loads of x
    # and pre issued eight units at a time, all before any is used, instead of the plain loop that nvcc issues four
    # units at a time: ~5 memory round trips one after the other at down_proj's K = 11008, where Nsight Compute's
    # stall samples put ~18 % of its warp time on an H100. The same bits. End to end on an H100 (batch 1, input 512,
    # two interleaved runs, 2026-12-07; experiments/results/gpu/kernels stage 26) INT4 went from 2.154 / 2.156 to
    # 2.140 / 2.143 ms a token on LLaMa-2-7B (2.40 → 2.42× FP16) and from 2.450 / 2.450 to 2.438 / 2.443 on
    # Llama-3-8B (2.31 → 2.32×): small, but in all four pairings, and in a third run (experiments.bench
    # RECIPE@now4gsb: the plain loop). Not yet timed on an H200.
    w4g_stage_batch: bool = True
    # INT4 rows (1–32) that take the tensor-core kernel (cuda_ext.w4a16_mma: float16, N a multiple of 64, on a copy
    # whose 16 bytes a lane are its MMA fragments, made at load; ahead of w4g_rows, w4k_rows and tinygemm; batch 1
    # with the gemv_then epilogues); None: off. Rows 2–16: end to end on an H100 (input 512, interleaved, 2026-12-05,
    # docs/architecture.md) it took batches 4 / 8 / 16 to 1.93 / 1.69 / 1.46× FP16 on LLaMa-2-7B and 1.91 / 1.74 /
    # 1.48× on Llama-3-8B, where the k-packed kernel took 1.53 / 1.48 / 1.41× and 1.57 / 1.50 / 1.43×; at batch 32
    # it won on 7B (1.08 vs 1.02×) and lost on 8B (1.04 vs 1.08×), so 17–64 stay on the k-packed kernel; at batch 1
    # the GEMV stays (2.00× against its 1.70×). It costs one more copy of the weights (experiments.bench
    # RECIPE@now4m: without it; @w4m: 1–32 rows).
    w4m_rows: tuple[int, int] | None = (2, 16)
    # Its steps of 16 k loaded ahead per warp: 4, or 8 (up to 8 rows).
    w4m_depth: int = 4
    # At one row with no RMSNorm / SiLU·gate in front: the pre-quant scale inside the GEMV instead of an act_prep
    # launch (RMSNorm and SiLU·gate stay in act_prep: inside the GEMV, every block recomputing them, they measured
    # slower end to end on an H200).
    w4g_fuse: bool = True
    # 8-bit formats (keys of cuda_ext.W8_FORMATS) whose batch-1 rows take the compiled CUDA GEMV (cuda_ext.w8_gemv,
    # float16 output, on the stored [N, K] weights: no copy) instead of the Triton one; SmoothQuant and FP8
    # quantize the row in act_prep first. All three by default: on an H200 (7B linears, each format's best tile)
    # 1.80 / 1.61 / 1.58× FP16 cuBLAS against the Triton GEMV's 1.74 / 1.51 / 1.32× (experiments/results/gpu/
    # kernels). Where the extension cannot be built, the Triton GEMV runs.
    w8g: frozenset[str] = frozenset(cuda_ext.W8_FORMATS)
    # Its (weight rows per warp, chunks in flight per lane), one of cuda_ext.GEMV_TILES; None: the format's
    # cuda_ext.W8G_TILES entry.
    w8g_tile: tuple[int, int] | None = None
    # Formats whose batch-1 row takes that GEMV's persistent form (as w4g_persistent). Empty: on an H200 (7B, batch 1,
    # interleaved, 2026-12-05) it was no faster (int8_wo 1.42× against 1.48×, SmoothQuant and FP8 within 0.01;
    # experiments.bench RECIPE@w8gp).
    w8g_persistent: frozenset[str] = frozenset()
    # Formats whose persistent GEMV (w4g_persistent, w8g_persistent) is launched with programmatic dependent launch
    # (compute capability ≥ 9.0): it starts, and issues its first weight loads, while the kernel before it finishes,
    # then waits for that kernel's writes (csrc/gemv_common.cuh); the same bits. Empty: end to end on an H100 (7B,
    # batch 1, interleaved, 2026-12-05; experiments.bench RECIPE@pdl) INT4 went 2.09× → 1.86× FP16, INT8 weight-only
    # and FP8 lost 0.03–0.05, SmoothQuant gained 0.05 (stage 2's attempt, before the persistent form, was slower too).
    gemv_pdl: frozenset[str] = frozenset()
    # Formats whose batch-1 GEMV normalizes its own input: the o / down projections before it end in the residual add
    # alone, and every block of this one computes RMSNorm of the residual stream while its first weights are on
    # their way (csrc/w4a16_gemv.cu PRO_NORM), instead of their serial THEN_NORM tail (one block, after the whole
    # GEMV: ~4.5 µs a call on an H100, 2026-12-05 profile). INT4's compiled GEMV (w4g) in its persistent form only
    # (w4g_persistent); the 8-bit GEMV (w8g; csrc/w8_gemv.cu PRO_NORM, quantizing the row for SmoothQuant and FP8
    # too) takes its persistent form for those calls whatever w8g_persistent says. The same bits. End to end on an
    # H200 (batch 1, input 512, interleaved, 2026-12-06, the row staged from registers) INT4 went from 1.84× to
    # 1.95× FP16 on LLaMa-2-7B and from 1.79× to 1.95× on Llama-3-8B (experiments.bench RECIPE@nonormpro: the tail).
    # The 8-bit formats, same run (RECIPE@w8normpro): slower or level, so off: INT8 weight-only 1.48 → 1.46 / 1.51 →
    # 1.46 (7B / 8B), FP8 1.53 → 1.46 / 1.49 → 1.47, SmoothQuant 1.54 → 1.52 / 1.49 → 1.52 (their prologue also
    # brings the persistent form, by itself no faster for them). On an H100 (two runs, 2026-12-06) INT8 weight-only
    # went the other way, 1.61 → 1.70 (7B) and 1.60 → 1.66 / 1.67 (8B), the persistent form alone level, and 1.72 /
    # 1.68 with attention PDL-launched behind it (RECIPE@w8normpdl): on there for INT8 weight-only and SmoothQuant
    # (CARD_KERNELS).
    norm_prologue: frozenset[str] = frozenset({"W4A16_AWQ"})
    # 8-bit formats whose batch-1 row takes the tensor-core kernel instead (cuda_ext.w8_mma: float16 output, N a
    # multiple of 64, K of 32, on a copy in the MMA's fragment layout made at load; the gemv_then epilogues), with
    # w8m_depth steps of 32 k loaded ahead per warp (2 or 4). Empty until timed end to end (experiments.bench
    # RECIPE@w8m, @w8m4).
    w8m: frozenset[str] = frozenset()
    w8m_depth: int = 2
    # Weight-only formats ("W8A16", "W4A16_AWQ") whose prefill (more than 64 rows) multiplies the stored weights
    # through cuda_kernels.wq_prefill_mm, dequantized in registers as the tensor cores' A operand (the product
    # transposed), instead of writing a float16 copy of each weight per call for cuBLAS; INT4 then keeps its stored
    # layout for it (no k-packed prefill). Its tile: wq_prefill_tile (BLOCK_R, BLOCK_M, BLOCK_K, warps, stages), None
    # = cuda_kernels.WQ_PREFILL_T_CONFIG. Empty: the linears alone on an H100 (7B, 1024 rows; experiments.bench
    # --sweep) took 840 µs a layer (W8A16, its fastest tile) and 1186 (INT4) against 789 / 802 for the dequantize-
    # then-cuBLAS default (cuda_kernels.WQ_PREFILL_T_CONFIG says why). experiments.bench RECIPE@wqprefill,
    # @wqtBRxBMxBKwWsS. The form before it (stage 4, the dequantized weight as the B operand) took TTFT on an H200
    # (7B, input 512) from 0.73× to 0.53× FP16's (int8) and from 0.48× to 0.26× (int4).
    wq_prefill: frozenset[str] = frozenset()
    wq_prefill_tile: tuple[int, int, int, int, int] | None = None
    # wq_prefill through the persistent, TMA-fed form of that kernel (cuda_kernels.wq_prefill_mm tma: INT4 with one
    # accumulator) where the operands allow. Off: the same sweep on an H200 took 1003 µs a layer (W8A16, its fastest
    # tile) and 1377 (INT4) against 726 / 798 for the default (experiments.bench RECIPE@wqtma, @wqtmaBRxBMxBKwWsS).
    wq_prefill_tma: bool = False
    # Weight-only formats ("W8A16", "W4A16_AWQ") whose prefill (more than 64 rows; float16, on Hopper) multiplies
    # the weights through CUTLASS's mixed-input GEMM (cuda_ext.wq_gemm: TMA-fed, warp-specialized, the weight
    # converted and scaled in registers before the tensor cores; csrc/cutlass) instead of a float16 copy for cuBLAS.
    # INT4 keeps a K-packed copy for it (cuda_ext.pack_int4_cutlass). Ahead of wq_prefill where both list a format.
    # Off: on an H100 (7B, 1024 rows, 2026-12-07) its 128 × 128 tile took 735 µs a layer (W8A16) and 794 (INT4)
    # against 789 / 790 for the default and 573 for FP16; end to end (input 1024) W8A16's TTFT × FP16 0.82 against
    # the default's 0.76 at batch 1 but 0.77 against 0.97 at batch 8 (experiments.bench RECIPE@wqcutlass,
    # @wqcutlassT[mM]; experiments/results/gpu/kernels stage 30).
    # wq_cutlass_tile: an index of cuda_ext.WQ_GEMM_TILES; wq_cutlass_max_m: the most rows it takes (None: any
    # prefill) — past them the default's float16 copy of the weight, written once a call, costs less than
    # converting it in every tile.
    wq_prefill_cutlass: frozenset[str] = frozenset()
    wq_cutlass_tile: int = 0
    wq_cutlass_max_m: int | None = None
    # Weight-only formats ("W8A16", "W4A16_AWQ") whose prefill's float16 copy of a weight (the default path: one
    # dequantizing kernel, then cuBLAS) is written one linear ahead, on a second stream, while the GEMM before it runs
    # (DequantAhead): the copy is bound by memory (2.5–3 bytes moved a weight), a GEMM of 1024 rows or more by its
    # tensor cores, so each can take what the other leaves. Costs wq_ahead_depth + 1 buffers of the largest weight in
    # float16. The same bits as without. Empty until timed end to end (experiments.bench RECIPE@wqahead): the default's copies took
    # 216 µs of a 7B layer's 789 at 1024 rows on an H100, FP16's GEMMs 573 (stage 30).
    # wq_ahead_depth: how many linears ahead the copies run (1–3; depth + 1 buffers). 2 lets fc‖gate's copy, the
    # largest, start during qkv's GEMM and attention rather than during o's GEMM alone (7B at 1024 rows on an H100,
    # estimated from stage 30's rows: copy ~100 µs, o's GEMM 50). experiments.bench RECIPE@wqahead2.
    wq_prefill_ahead: frozenset[str] = frozenset()
    wq_ahead_depth: int = 1
    # The int8 formats' tl.dot kernel at 2–64 rows (cuda_kernels.wq_mm). Compiled for sm_90, its loop issues, per
    # weight, 0.18–0.32 warp-instructions for W8A16 (Triton's int8 → half: one I2F per weight) and 0.04–0.09 for
    # SmoothQuant (int8 × int8), on tiles of 32 output channels whose o / down projections launch 128 programs on
    # 132 SMs (experiments/gpu/sass_loop.py): W8A16 is bound by its instructions at 17–32 rows and nearly at 2–16
    # (measured 0.78–0.81× FP16 at batch 32, 1.06–1.09× at 4–16), both lack programs to hide latency.
    # wq_cvt: W8A16's int8 → float16 by one PTX byte permute and one half2 subtraction per two weights (0.13–0.23;
    # prefill under wq_prefill too; float16 only). wq_wide: the formats that take 128-channel tiles
    # (cuda_kernels.WQ_WIDE_CONFIG) with K split so that their programs fill every SM twice (W8A16 with wq_cvt:
    # 0.08–0.11). End to end on an H200 (7B, input 512, interleaved, 2026-12-05), × FP16 at batches 4 / 16 / 32:
    # W8A16 1.09 / 1.09 / 0.79 with neither, 1.28 / 1.21 / 0.94 with wq_cvt, 1.31 / 1.19 / 1.04 with both (taken:
    # the most over the three); SmoothQuant 1.33 / 1.24 / 1.13 narrow, 1.33 / 1.21 / 1.02 wide (stays narrow).
    # experiments.bench RECIPE@wqplain (neither), @wqnarrow (wq_cvt only), @wqwide (both formats wide).
    wq_cvt: bool = True
    wq_wide: frozenset[str] = frozenset({"W8A16"})
    # Decode attention (cuda_kernels.DecodeAttention): the last split of each (row, head) combines the splits, and
    # RoPE + the KV-cache write happen inside the split kernel: one launch per layer fewer each. Both apply at
    # decode batches up to attn_fused_batch (None: every batch). On an H200 (7B, RECIPE@attnfused against the
    # default in one interleaved run) both together were 1.02–1.04× faster at batch 1 in every recipe and input
    # measured, and 0.95–0.99× at batch 8, hence batch 1 only; batches 2–7 were not measured.
    attn_fused_reduce: bool = True
    attn_rope_fused: bool = True
    attn_fused_batch: int | None = 1
    # Its split kernel's tile: (keys a loop step, a power of two 16–256; keys a split, 0: as many splits as fill the
    # card twice over; warps a program, 1–16); None: cuda_kernels.ATTN_TILE.
    attn_tile: tuple[int, int, int] | None = None
    # Formats whose qkv linear is followed by decode attention's split kernel launched with programmatic dependent
    # launch (compute capability >= 9.0; where RoPE is fused: attn_rope_fused, up to attn_fused_batch; not behind a
    # qkv GEMV launched with it itself, gemv_pdl): the kernel loads each split's first keys / values before it reads
    # q and waits for the qkv GEMV's writes in between, so those loads are issued while that GEMV finishes. The same
    # bits. Only the compiled GEMVs' persistent forms (INT4's by default; the 8-bit ones under norm_prologue or
    # w8g_persistent) let the next kernel start as they start; the others let it start as they end. End to end on an
    # H100 (batch 1, input 512, interleaved, 2026-12-06): INT4 2.29 → 2.35× FP16 (LLaMa-2-7B) and 2.23 → 2.27×
    # (Llama-3-8B); FP16 0.99 / 1.00× and INT8 weight-only 1.61 → 1.60 / 1.60 → 1.61 with it, so INT4 only
    # (experiments.bench RECIPE@noattnpdl: off; @attnpdl: every format); on an H100 the 8-bit formats whose GEMV
    # normalizes its input take it too (CARD_KERNELS). Not yet timed on an H200.
    attn_pdl: frozenset[str] = frozenset({"W4A16_AWQ"})
    # Batch-1 decode: each linear's epilogue does the next linear's prologue, so that the step launches no act_prep
    # between linears (3 per layer, 4 for SmoothQuant / FP8): fc‖gate writes SiLU(fc) · gate, the o / down
    # projections after the residual add RMSNorm of the residual stream (their last program to finish, so no
    # program recomputes the row's statistics, as the in-GEMV prologue that measured slower did), each quantized
    # for a SmoothQuant / FP8 linear next (_Handler.input_quant), and the fused attention's combine quantizes
    # o_proj's input likewise. In the Triton GEMV and the compiled ones (w8g, w4g); not behind INT4's k-packed
    # kernel at batch 1 (its row runs act_prep as before). On an H200 (7B, input 512, each recipe with and without
    # it in one interleaved run, 2026-12-05; docs/architecture.md, measured choices): FP16 1.03× [1.02, 1.03], INT4
    # AWQ 1.05×, SmoothQuant 1.09×, FP8 1.10×, INT8 weight-only 1.004× (a tie: on, one default for all).
    # experiments.bench RECIPE@nothen is the alternative.
    gemv_then: bool = True

    def __post_init__(self) -> None:
        if self.wq_wide - {"W8A16", "W8A8_SQ_PER_CHANNEL"}:
            raise ValueError(f"wq_wide takes W8A16 and W8A8_SQ_PER_CHANNEL; got {sorted(self.wq_wide)}")
        if self.sq_prefill_gemm not in ("triton", "tma", "cutlass", "int_mm"):
            raise ValueError(f"sq_prefill_gemm must be 'triton', 'tma', 'cutlass' or 'int_mm', "
                             f"got {self.sq_prefill_gemm!r}")
        if self.sq_prefill_tile is not None and not _gemm_tile(self.sq_prefill_tile):
            raise ValueError(f"sq_prefill_tile must be (BM, BR, BK, warps: powers of two, stages >= 1) or None, "
                             f"got {self.sq_prefill_tile}")
        if self.prefill_group < 0:
            raise ValueError(f"prefill_group must be >= 0 (0: off), got {self.prefill_group}")
        if not 1 <= self.w4k_rows[0] <= self.w4k_rows[1] <= W4K_MAX_M:
            raise ValueError(f"w4k_rows must be 1 <= low <= high <= {W4K_MAX_M} (the kernel's rows), "
                             f"got {self.w4k_rows}")
        if self.w4g_rows is not None and not 1 <= self.w4g_rows[0] <= self.w4g_rows[1] <= 4:
            raise ValueError(f"w4g_rows must be 1 <= low <= high <= 4 (the GEMV's rows) or None, got {self.w4g_rows}")
        if self.w4m_rows is not None and not 1 <= self.w4m_rows[0] <= self.w4m_rows[1] <= cuda_ext.W4M_MAX_ROWS:
            raise ValueError(f"w4m_rows must be 1 <= low <= high <= {cuda_ext.W4M_MAX_ROWS} (the kernel's rows) or "
                             f"None, got {self.w4m_rows}")
        if self.w4m_depth not in cuda_ext.W4M_DEPTHS or (
                self.w4m_depth != 4 and self.w4m_rows is not None and self.w4m_rows[1] > 8):
            raise ValueError(f"w4m_depth must be 4, or 8 with w4m_rows up to 8; got {self.w4m_depth} "
                             f"with {self.w4m_rows}")
        for name in ("wq_prefill", "wq_prefill_cutlass", "wq_prefill_ahead"):
            if getattr(self, name) - {"W8A16", "W4A16_AWQ"}:
                raise ValueError(f"{name} takes W8A16 and W4A16_AWQ; got {sorted(getattr(self, name))}")
        if self.wq_ahead_depth not in (1, 2, 3):
            raise ValueError(f"wq_ahead_depth must be 1, 2 or 3, got {self.wq_ahead_depth}")
        if not 0 <= self.wq_cutlass_tile < len(cuda_ext.WQ_GEMM_TILES) or (
                self.wq_cutlass_max_m is not None and self.wq_cutlass_max_m < 1):
            raise ValueError(f"wq_cutlass_tile must index cuda_ext.WQ_GEMM_TILES (0-{len(cuda_ext.WQ_GEMM_TILES) - 1}) "
                             f"and wq_cutlass_max_m be >= 1 or None; got {self.wq_cutlass_tile}, "
                             f"{self.wq_cutlass_max_m}")
        if self.wq_prefill_tile is not None and not (
                _gemm_tile(self.wq_prefill_tile) and self.wq_prefill_tile[0] >= 16 * self.wq_prefill_tile[3]):
            raise ValueError(f"wq_prefill_tile must be (BLOCK_R, BLOCK_M, BLOCK_K, warps: powers of two, BLOCK_R >= "
                             f"16 · warps, stages >= 1) or None, got {self.wq_prefill_tile}")
        if self.attn_tile is not None and not (
                len(self.attn_tile) == 3 and self.attn_tile[0] in (16, 32, 64, 128, 256) and self.attn_tile[1] >= 0
                and self.attn_tile[2] in (1, 2, 4, 8, 16)):
            raise ValueError(f"attn_tile must be (keys a step: a power of two 16-256, keys a split >= 0, warps 1-16) "
                             f"or None, got {self.attn_tile}")
        if self.attn_fused_batch is not None and self.attn_fused_batch < 1:
            raise ValueError(f"attn_fused_batch must be >= 1 or None (every batch), got {self.attn_fused_batch}")
        if self.w8m_depth not in cuda_ext.W8M_DEPTHS:
            raise ValueError(f"w8m_depth must be one of {cuda_ext.W8M_DEPTHS}, got {self.w8m_depth}")
        for name in ("w8g", "w8g_persistent", "w8m"):
            if getattr(self, name) - set(cuda_ext.W8_FORMATS):
                raise ValueError(f"{name} takes the 8-bit formats {', '.join(cuda_ext.W8_FORMATS)}; got "
                                 f"{sorted(getattr(self, name))}")
        if self.int4_kernel not in INT4_KERNELS:
            raise ValueError(f"int4_kernel must be one of {', '.join(INT4_KERNELS)}, got {self.int4_kernel!r}")
        if self.norm_prologue - {"W4A16_AWQ", *cuda_ext.W8_FORMATS}:
            raise ValueError(f"norm_prologue takes W4A16_AWQ and the 8-bit formats (the compiled GEMVs); got "
                             f"{sorted(self.norm_prologue)}")
        unknown = (set(self.gemv) | set(self.gemv_pdl) | set(self.attn_pdl)
                   | {k for k, _ in (*self.gemv_cvt, *self.gemv_tile)})
        if unknown - set(ALGO_KEYS):
            raise ValueError(f"unknown format(s) {sorted(unknown - set(ALGO_KEYS))}; known: {', '.join(ALGO_KEYS)}")

    def attn_fusions(self, batch: int) -> tuple[bool, bool]:
        """(splits combined in the split kernel, RoPE + cache write in it) for decode attention at ``batch``."""
        on = self.attn_fused_batch is None or batch <= self.attn_fused_batch
        return self.attn_fused_reduce and on, self.attn_rope_fused and on

    @functools.lru_cache(maxsize=None)  # called on every batch-1 GEMV: computed once per (config, format)
    def gemv_options(self, algo_key: str) -> dict:
        """The GEMV kernel's ``cvt`` and ``config`` for a format (None: the kernel's tuned default). Read-only."""
        return {"cvt": dict(self.gemv_cvt).get(algo_key), "config": dict(self.gemv_tile).get(algo_key)}


DEFAULT_KERNELS = KernelConfig()

# Where a card measured a different fastest choice than the H200 that KernelConfig's defaults were chosen on: (part of
# the CUDA device's name, the fields it changes). Only cards named here were measured; any other takes the defaults.
CARD_KERNELS: tuple[tuple[str, dict], ...] = (
    # The H100 SXM (80 GB HBM3): INT8 weight-only and SmoothQuant's batch-1 GEMVs normalize their own input
    # (norm_prologue), and attention is PDL-launched behind their qkv GEMV (attn_pdl), as INT4's. End to end
    # (batch 1, input 512, interleaved, 2026-12-06, experiments/results/gpu/kernels stage 17: RECIPE@w8normpro and
    # @w8normpdl against the defaults): INT8 weight-only 1.61 → 1.72 / 1.72 (LLaMa-2-7B, two runs) and 1.60 → 1.68
    # (Llama-3-8B); SmoothQuant 1.62 → 1.64 (7B), 1.56 → 1.62 (8B). Confirmed with this entry against
    # RECIPE@nocard (the defaults; stage 18): INT8 weight-only 1.73 against 1.62 (7B), 1.69 against 1.61 (8B);
    # SmoothQuant 1.64 against 1.62, 1.62 against 1.57. FP8 stays out: 1.63 → 1.60 / 1.61 (7B; 1.57 → 1.60 on 8B).
    # The H200's one run had the prologue slower (norm_prologue's comment).
    ("H100 80GB HBM3", {"norm_prologue": frozenset({"W4A16_AWQ", "W8A16", "W8A8_SQ_PER_CHANNEL"}),
                        "attn_pdl": frozenset({"W4A16_AWQ", "W8A16", "W8A8_SQ_PER_CHANNEL"})}),
)


def card_kernels(device: torch.device) -> tuple[str | None, KernelConfig]:
    """(the CARD_KERNELS entry of this device, or None; the KernelConfig its runtime takes unless told otherwise):
    DEFAULT_KERNELS with the first entry whose name is part of the CUDA device's name. No GPU to ask (a CPU device,
    or CUDA asked for where there is none, which the caller refuses in its own words): the defaults."""
    if device.type == "cuda" and torch.cuda.is_available():
        name = torch.cuda.get_device_name(device)
        for card, fields in CARD_KERNELS:
            if card in name:
                return card, dataclasses.replace(DEFAULT_KERNELS, **fields)
    return None, DEFAULT_KERNELS


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


class _Handler:
    kernel = "?"
    emulated = False
    gemv_unavailable = None  # why a compiled GEMV the kernel config asks for is missing (cuda_ext.load's reason)
    algo_key = "dense"
    # The batch-1 path runs the prologue itself, in one act_prep with what it adds (SmoothQuant/FP8: the int8/fp8
    # quantization; INT4 k-packed: the pre-quant scale)
    own_prologue = False
    # Tensors that must be equal for two linears reading the same input (fc and gate) to run as one, stacked
    # along out; the others are stacked.
    shared_inputs: tuple[str, ...] = ()

    def __init__(self, dtype: torch.dtype, device: torch.device, kernels: KernelConfig = DEFAULT_KERNELS):
        self.dtype, self.kernels = dtype, kernels
        self.device = torch.device(device)
        self.native = self.device.type == "cpu"
        self.cuda = self.device.type == "cuda"
        # the GEMV's then_norm counter (one int32 that every call leaves zero, so a CUDA graph can replay it)
        self.then_counter = torch.zeros(1, dtype=torch.int32, device=device) if self.cuda and kernels.gemv_then \
            else None
        # this format's persistent GEMV launched with programmatic dependent launch (KernelConfig.gemv_pdl), where
        # the GPU has it: decided here, not on every call
        self.gemv_pdl = self.cuda and self.algo_key in kernels.gemv_pdl and cuda_ext.pdl_ok(self.device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        y = self.fused(x2.contiguous()) if self.cuda else self._mm(x2)
        return y.reshape(*lead, y.shape[-1])

    # -- the CUDA path: y = W · f(x) (+ residual in place) ------------------------------------------------------
    def fused(self, x: torch.Tensor, *, norm: torch.Tensor | None = None, eps: float = 1e-6, silu: bool = False,
              residual: torch.Tensor | None = None, **then) -> torch.Tensor:
        """x [M, K] (silu: [M, 2K], SiLU(x[:, :K]) · x[:, K:]); norm: RMSNorm x first (float32 statistics, as the
        runtime's ``_rmsnorm``); residual [M, N]: add y to it in place and return it. On CUDA the small-M case
        is one fused kernel; elsewhere these are the runtime's own tensor ops. ``then`` (only where
        :meth:`chains`): the next linear's prologue in this one's epilogue, ``then_silu=True`` (return SiLU ·
        gate of y's two halves) or ``then_norm=w`` (with residual: return RMSNorm(residual) · w after the add),
        with ``then_quant`` (the next linear's :meth:`input_quant`) that quantized for it."""
        if self.cuda:
            if self._takes_gemv(x.shape[0]):
                if then:
                    assert self.chains(x.shape[0]), "then_silu / then_norm where chains() is False"
                    then = {**then, "counter": self.then_counter}
                if norm is not None and not silu and self.takes_norm(x.shape[0]):
                    return self._normed_gemv(x, norm, eps, residual, **then)
                if not self.kernels.fuse_prologue and (norm is not None or silu) and not self.own_prologue:
                    x, norm, silu = self._prep(x, norm, eps, silu), None, False
                return self._gemv(x, norm=norm, eps=eps, silu=silu, residual=residual, **then)
            y = self._mm_cuda(x, norm=norm, eps=eps, silu=silu)
            if residual is None and y.dtype != self.dtype:  # (tinygemm computes in bf16)
                y = y.to(self.dtype)
        else:
            if norm is not None:
                xf = x.float()
                x = norm * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
            if silu:
                k = x.shape[-1] // 2
                x = F.silu(x[:, :k]) * x[:, k:]
            y = self._mm(x)
        if residual is not None:
            return residual.add_(y)
        return y

    def _gemv_ok(self) -> bool:
        return True

    def _takes_gemv(self, rows: int) -> bool:
        """Whether ``rows`` rows (on CUDA) take this format's batch-1 GEMV entry (``_gemv``)."""
        return rows <= _cuda_kernels().GEMV_MAX_M and self.algo_key in self.kernels.gemv and self._gemv_ok()

    def chains(self, rows: int) -> bool:
        """Whether :meth:`fused` takes ``then_silu`` / ``then_norm`` at ``rows`` (KernelConfig.gemv_then): rows a
        batch-1 GEMV runs whose epilogue does them."""
        return self.then_counter is not None and self._takes_gemv(rows) and self._gemv_then_ok()

    def takes_norm(self, rows: int) -> bool:
        """Whether :meth:`fused` at ``rows`` takes ``norm`` inside its own GEMV (KernelConfig.norm_prologue:
        :meth:`_normed_gemv`), so that the linear before it ends in the residual add, with no ``then_norm``. Here:
        the 8-bit GEMV (w8g, not its tensor-core kernel)."""
        return (rows == 1 and self.w8g and self.w8m is None and self.algo_key in self.kernels.norm_prologue
                and self.then_counter is not None and self._takes_gemv(1) and cuda_ext.fuses(1, self.weight.shape[1]))

    def _normed_gemv(self, x: torch.Tensor, norm: torch.Tensor, eps: float, residual: torch.Tensor | None,
                     **then) -> torch.Tensor:
        """The batch-1 GEMV on the float16 residual stream x, normalizing it itself (where :meth:`takes_norm`). Here:
        the 8-bit GEMV (_w8g_gemv)."""
        return self._w8g_gemv(x, residual, eps, norm=norm, **then)

    # 1 / 2: the format quantizes its input to int8 / e4m3 by a static act_scale after its prequant (SmoothQuant,
    # FP8), which a producer's epilogue may do for it (input_quant)
    input_afmt = 0

    def input_quant(self, rows: int) -> tuple | None:
        """What the previous linear's epilogue (then_quant, KernelConfig.gemv_then) may do for this one's input at
        ``rows``: (prequant or None, act_scale [1], input_afmt), where its batch-1 GEMV then takes that quantized
        row as it is; else None."""
        if self.input_afmt and self.then_counter is not None and self._takes_gemv(rows):
            return self.prequant, self.act_scale.reshape(1), self.input_afmt
        return None

    def _gemv_then_ok(self) -> bool:
        """Whether this format's batch-1 kernel has the then_silu / then_norm epilogue (the Triton GEMV and the
        compiled ones do)."""
        return True

    # batch 1 takes a compiled 8-bit kernel (the 8-bit formats, on CUDA: _setup_w8g): the GEMV, or where w8m holds
    # its copy of the weights (cuda_ext.pack_w8m), the tensor-core kernel
    w8g = False
    w8m = None

    def _setup_w8g(self, inp: int, scale: torch.Tensor) -> None:
        """Whether batch 1 takes the compiled 8-bit GEMV: the kernel config lists this format, float16 output, K a
        multiple of 16, and the extension built (else its reason is kept and the Triton GEMV runs); or, where
        KernelConfig.w8m lists it and the shape fits, the 8-bit tensor-core kernel in its place."""
        out = self.weight.shape[0]
        if self.algo_key in self.kernels.w8m and cuda_ext.w8m_ok(out, inp, self.dtype) and self._extension_built():
            self.w8m = cuda_ext.pack_w8m(self.weight, self.algo_key)
            self.w8m_counter = cuda_ext.tile_counter(out, self.device)
            self.w8g, self.kernel = True, "w8m-mma|" + self.kernel
        elif self.algo_key in self.kernels.w8g and cuda_ext.w8g_ok(inp, self.dtype) and self._extension_built():
            self.w8g, self.kernel = True, "w8g-cuda|" + self.kernel
        self.w8g_scale = scale  # what the 8-bit kernels scale their sums by (per channel or per tensor)

    # int32 zeros, one per output tile of 16 channels or more, when wq_wide lists the format: handed to wq_mm, whose
    # 2–64-row calls then take the wide tiles with K split (its split programs' counter)
    wq_counter = None

    def _setup_wq_wide(self) -> None:
        if self.algo_key in self.kernels.wq_wide and self.dtype != torch.float32:
            self.wq_counter = torch.zeros(-(-self.weight.shape[0] // 16), dtype=torch.int32, device=self.device)

    def _extension_built(self, load=cuda_ext.load) -> bool:
        """Whether the compiled kernels (cuda_ext; ``load``: which build) are there; if not, their reason is kept
        (describe() shows it)."""
        built = load()
        if isinstance(built, str):
            self.gemv_unavailable = built
            return False
        return True

    def _cutlass_takes(self, out: int, inp: int, group: int, bits: int) -> bool:
        """Whether prefill goes through CUTLASS's mixed-input GEMM (KernelConfig.wq_prefill_cutlass)."""
        return (self.algo_key in self.kernels.wq_prefill_cutlass and cuda_ext.wq_gemm_ok(out, inp, group, self.dtype,
                                                                                        bits)
                and self._extension_built(cuda_ext.load_cutlass))

    def _cutlass_mm(self, x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, bits: int, group: int):
        """x's prefill through CUTLASS (where _cutlass_takes said so), or None past wq_cutlass_max_m's rows."""
        m, cap = x.shape[0], self.kernels.wq_cutlass_max_m
        if m <= _cuda_kernels().WQ_MM_MAX_M or (cap is not None and m > cap):
            return None
        return cuda_ext.wq_gemm(x, w, s, bits=bits, group=group, tile=self.kernels.wq_cutlass_tile)

    # the runtime's DequantAhead, where KernelConfig.wq_prefill_ahead lists this format and prefill_shape is not None
    ahead: DequantAhead | None = None

    def prefill_shape(self) -> tuple[int, int] | None:
        """The shape of the weight copy in the compute dtype that this format's default prefill writes for cuBLAS
        (prefill_dequant), or None where its prefill writes none."""
        return None

    def prefill_dequant(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """That copy, q · s in float32 rounded once to the compute dtype, written into ``out`` (contiguous, of
        prefill_shape) where given, else into a tensor of its own."""
        raise NotImplementedError

    def _prefill_weight(self) -> torch.Tensor:
        """prefill_dequant's copy for this call's GEMM: DequantAhead's, written while the linear before ran, where
        the runtime has one for this linear."""
        return self.ahead.take(self) if self.ahead is not None else self.prefill_dequant()

    def _w8g_gemv(self, x: torch.Tensor, residual: torch.Tensor | None, eps: float = 1e-6,
                  norm: torch.Tensor | None = None, **then) -> torch.Tensor:
        """The compiled 8-bit kernel at batch 1 on x as the format takes it (quantized for W8A8 / FP8), or, with
        ``norm`` (where :meth:`takes_norm`), on the float16 residual stream, which the GEMV's persistent form
        normalizes (and quantizes as act_prep would) itself."""
        if self.w8m is not None:
            return cuda_ext.w8_mma(x, self.w8m, self.w8g_scale, fmt=self.algo_key, tile_counter=self.w8m_counter,
                                   residual=residual, depth=self.kernels.w8m_depth, eps=eps, **then)
        pro = {} if norm is None else {"norm": norm}
        if norm is not None and self.input_afmt:
            pro.update(prequant=self.prequant, act_scale=self.act_scale.reshape(1))
        grid = cuda_ext.grid(self.algo_key in self.kernels.w8g_persistent or norm is not None, x.shape[0])
        return cuda_ext.w8_gemv(x, self.weight, self.w8g_scale, fmt=self.algo_key, residual=residual,
                                tile=self.kernels.w8g_tile, eps=eps, grid=grid,
                                pdl=self.gemv_pdl and grid != 0, **pro, **then)

    def _ck_gemv(self, *args, **kwargs) -> torch.Tensor:
        """The batch-1 GEMV kernel with this handler's kernel options."""
        return _cuda_kernels().gemv(*args, **kwargs, **self.kernels.gemv_options(self.algo_key))

    def _prep(self, x, norm, eps, silu, *, prequant=None, act_scale=None, afmt=0, rows=None, out_dtype=None):
        """The prologue as its own kernel, when a library GEMM follows (or nothing is to be done: x itself, also
        when x is quantized already, by the previous linear's epilogue: input_quant)."""
        if norm is None and not silu and rows is None and (
                (prequant is None and afmt == 0 and out_dtype in (None, x.dtype))
                or (afmt and x.dtype == cuda_ext.ACT_QUANT_DTYPE[afmt])):
            return x
        return _cuda_kernels().act_prep(x, norm=norm, eps=eps, silu=silu, prequant=prequant, act_scale=act_scale,
                                        afmt=afmt, rows=rows, out_dtype=out_dtype)

    def _mm(self, x2d: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _held(self) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        return _nbytes(*self._held())

    def dequantized_weight(self) -> torch.Tensor:
        raise NotImplementedError


class DequantAhead:
    """KernelConfig.wq_prefill_ahead on one runtime's weight-only linears (``chain``, in the order a forward calls
    them): each one's float16 copy for the prefill's GEMM is written on a second stream while the GEMMs before it run,
    up to ``depth`` linears ahead, in a ring of depth + 1 buffers of the largest weight.

    take(lin), where lin's GEMM needs its copy: the copy written ahead when it is lin's, else (the first linear of a
    forward, or one whose predecessor took another path) written now on the caller's stream; then copies are started
    on the second stream until ``depth`` are in flight, each after the caller's stream reaches this point. A buffer is
    taken again only depth + 1 copies later, in a later take, so after the caller enqueued the GEMM that read it,
    which the second stream waits for. Copies started are waited for by the caller's stream when taken, or, used or
    not, at settle(): a forward settles at its end, so that a CUDA graph captured around it joins the second stream,
    and no copy outlives the forward that started it."""

    def __init__(self, chain: list[_Handler], device: torch.device, dtype: torch.dtype, depth: int = 1):
        self.device, self.depth = device, depth
        self.stream = torch.cuda.Stream(device)
        numel = max(a * b for a, b in (h.prefill_shape() for h in chain))
        self.buffers = [torch.empty(numel, dtype=dtype, device=device) for _ in range(depth + 1)]
        self.events = [torch.cuda.Event() for _ in self.buffers]
        self.linears = tuple(dict.fromkeys(chain))
        self.after = dict(zip(chain, chain[1:]))
        self.slot = 0  # the ring's next buffer
        # in flight, in chain order: (linear, its copy, the event recorded after it)
        self.queue: collections.deque[tuple[_Handler, torch.Tensor, torch.cuda.Event]] = collections.deque()
        for h in self.linears:
            h.ahead = self

    def release(self) -> None:
        """Settle, and hand the linears back to their own copies (prefill_dequant on the caller's stream)."""
        self.settle()
        for h in self.linears:
            h.ahead = None

    @property
    def nbytes(self) -> int:
        return _nbytes(*self.buffers)

    def _next_buffer(self, lin: _Handler) -> torch.Tensor:
        """The ring's next buffer, its front viewed as lin's copy."""
        b, self.slot = self.slot, (self.slot + 1) % len(self.buffers)
        rows, cols = lin.prefill_shape()
        return self.buffers[b][:rows * cols].view(rows, cols)

    def take(self, lin: _Handler) -> torch.Tensor:
        main = torch.cuda.current_stream(self.device)
        if self.queue and self.queue[0][0] is lin:
            _, w, event = self.queue.popleft()
            main.wait_event(event)
        else:
            self.settle()
            w = lin.prefill_dequant(self._next_buffer(lin))
        last = self.queue[-1][0] if self.queue else lin
        while len(self.queue) < self.depth and (last := self.after.get(last)) is not None:
            event = self.events[self.slot]
            self.stream.wait_stream(main)
            with torch.cuda.stream(self.stream):
                copy = last.prefill_dequant(self._next_buffer(last))
                event.record(self.stream)
            self.queue.append((last, copy, event))
        return w

    def settle(self) -> None:
        """The caller's stream waits for the copies in flight, if any (the last: the second stream runs them in
        order), which are then dropped (the end of a forward: see the class)."""
        if self.queue:
            torch.cuda.current_stream(self.device).wait_event(self.queue[-1][2])
            self.queue.clear()
