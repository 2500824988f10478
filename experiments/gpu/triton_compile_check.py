"""Compile the runtime's new Triton kernels for an H200 (sm_90) on a machine without a GPU: Triton lowers them to
PTX and runs its own ptxas, so a kernel that does not compile (a type change across a loop, a bad constexpr branch)
or an atomic without the intended ordering shows here before any GPU time is spent. Speed and results need the GPU
(tests/test_cuda.py) or Triton's interpreter (tests/test_triton_interpret.py).

    python experiments/gpu/triton_compile_check.py [NAME]  # one line per kernel variant (those whose name holds
                                                          # NAME): its cubin's size, registers a thread and
                                                          # stack bytes (spills); exit 1 on a failure
"""
from __future__ import annotations

import inspect
import itertools
import os
import re
import sys

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("unset TRITON_INTERPRET: the interpreter replaces the kernels this compiles")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from experiments.bench import INT8_GEMM_SWEEP, WQ_PREFILL_SWEEP  # noqa: E402
from quant.runtime import cuda_kernels as ck  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
MAX_SHARED = 232448  # bytes of shared memory one block may use on sm_90 (227 KiB): a kernel needing more cannot launch


# pointer types of the linear kernels' arguments (float16 x; SmoothQuant swaps in int8 x, float32 scales, int32 parts)
WQ_TYPES = {"x_ptr": "*fp16", "w_ptr": "*i8", "ws_ptr": "*fp16", "y_ptr": "*fp16", "part_ptr": "*fp32",
            "cnt_ptr": "*i32"}
SQ_TYPES = {**WQ_TYPES, "x_ptr": "*i8", "ws_ptr": "*fp32", "part_ptr": "*i32"}
W4K_TYPES = {"x_ptr": "*fp16", "w_ptr": "*i32", "s_ptr": "*fp16", "y_ptr": "*fp16"}
GEMV_TYPES = {"x_ptr": "*fp16", "w_ptr": "*fp16", "ws_ptr": "*fp16", "pre_ptr": "*fp16", "norm_ptr": "*fp16",
              "a_ptr": "*fp32", "y_ptr": "*fp16", "xn_ptr": "*fp16", "nw_ptr": "*fp16", "cnt_ptr": "*i32",
              "eps": "fp32", "tq_pre_ptr": "*fp16", "tq_a_ptr": "*fp32"}
# integer arguments that the 7B/8B shapes pass as multiples of 16 (sizes, row strides)
DIV16 = ("R", "K", "N", "K_SPLIT", "stride_xm", "stride_wn", "stride_sn", "stride_wsn", "stride_ym")


def compile_one(fn, types: dict, const: dict, div16: tuple[str, ...] = DIV16, **options):
    """``div16``: integer arguments the launch passes as multiples of 16, which Triton's JIT specializes on (as it
    does on 16-byte aligned pointers, all of them here), so that loads vectorize and pipeline as they do at run time
    (and take the shared memory they take then)."""
    params = inspect.signature(fn.fn).parameters
    names = list(params)
    const = {**{n: p.default for n, p in params.items()  # constexpr parameters left at their defaults
                if p.default is not inspect.Parameter.empty and "constexpr" in str(p.annotation)}, **const}
    sig = {n: "constexpr" if n in const else types.get(n, "i32") for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if n not in const and (sig[n].startswith("*") or n in div16)}
    return triton.compile(triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs),
                          target=TARGET, options=options)


def resources(k) -> str:
    """The cubin's registers a thread and stack bytes (where ptxas spills), as ``cuobjdump -res-usage`` reads them."""
    from experiments.gpu.sass_loop import cubin_tool  # (sass_loop imports this module)

    m = re.search(r"REG:(\d+) STACK:(\d+)", cubin_tool(k, "cuobjdump", "-res-usage"))
    return f"; {m[1]} registers, {m[2]} stack bytes" if m else ""


# the attention kernel's strides and head counts, multiples of 16 at the 7B / 8B shapes (as the JIT specializes them)
ATTN_DIV16 = ("stride_qb", "stride_cb", "stride_ch", "stride_ct", "stride_mb", "stride_ob", "H", "KVH")


def loads_before_wait(nbytes: int):
    """A check of a compiled kernel: its SASS issues ``nbytes`` (each thread's share, in 16-byte loads) before its
    first griddepcontrol.wait (ACQBULK), so that they overlap the kernel before; None when it does, else why not."""
    def check(k) -> str | None:
        from sass_loop import cubin_tool

        sass = cubin_tool(k, "cuobjdump", "-sass")
        if "ACQBULK" not in sass:
            return "a griddepcontrol.wait (ACQBULK)"
        before = len(re.findall(r"LDG[.]E[.]128", sass.split("ACQBULK", 1)[0]))
        want = nbytes // 16 // (32 * k.metadata.num_warps)
        return None if before == want else f"its {want} 16-byte loads a thread before the wait ({before} there)"
    return check


def loads_before_first_use(nloads: int):
    """A check of a compiled kernel: its first ``nloads`` 16-byte loads (LDG.E.128: a block of cached keys and values)
    are all issued before any instruction reads what one of them loaded, so that they cost one memory round trip,
    not one each (ptxas may interleave a load with the use of the one before, stage 23); None when they are."""
    def check(k) -> str | None:
        from sass_loop import INSTRUCTION, PREDICATE, cubin_tool

        pending, issued = set(), 0
        for line in cubin_tool(k, "cuobjdump", "-sass").splitlines():
            if not (m := INSTRUCTION.match(line)):
                continue
            op, _, operands = PREDICATE.sub("", m.group(2)).partition(" ")
            regs = [int(r) for r in re.findall(r"\bR(\d+)\b", operands)]
            if op.startswith("LDG.E.128"):
                pending |= set(range(regs[0], regs[0] + 4))
                issued += 1
                continue
            reads = regs if op.startswith(("ST", "RED", "ATOM")) else regs[1:]  # (a store's first operand is read)
            if pending & set(reads):
                break
        return None if issued >= nloads else f"its {nloads} 16-byte loads before the first use of one ({issued})"
    return check


def wgmma_a_from_registers(k) -> str | None:
    """None when the kernel's wgmma takes its A operand from registers (``{%r…}`` before B's descriptor), as the
    weight-only prefill's dequantized weight must be; else what it lacks."""
    ok = re.search(r"wgmma\.mma_async[^\n]*\}, \{%r\d+(,%r\d+)*\}, %rd\d+", k.asm["ptx"])
    return None if ok else "wgmma with A from registers"


def main() -> int:
    failed = 0
    attn = {"q_ptr": "*fp16", "mask_ptr": "*u8", "slot_ptr": "*i64", "scale_ptr": "*fp32", "m_ptr": "*fp32",
            "l_ptr": "*fp32", "o_ptr": "*fp32", "cnt_ptr": "*i32", "out_ptr": "*fp16", "pos_ptr": "*i64",
            "freq_ptr": "*fp32", "rcp_ptr": "*fp32", "sm_scale": "fp32", "oq_pre_ptr": "*fp16", "oq_a_ptr": "*fp32"}
    cache = {0: "*fp16", 1: "*i8", 2: "*fp8e4nv"}
    jobs = []
    for kv in (0, 1, 2):
        for fused in (False, True):
            for rope in (False, True):
                const = dict(GQA=4, SPLIT=64, BLOCK_T=64, D=128, KV_QUANT=kv, FUSED_REDUCE=fused, NSPLIT_P2=16,
                             ROPE=rope)
                jobs.append((f"attention kv={kv} fused_reduce={fused} rope={rope}", ck._attn_split_kernel,
                             {**attn, "k_ptr": cache[kv], "v_ptr": cache[kv]}, const, {"num_warps": 4},
                             "atom.global.gpu.acq_rel" if fused else None))
    for kv in (0, 1):  # KernelConfig.attn_pdl: the first block's cache loads all issued before the grid wait
        const = dict(GQA=4, SPLIT=64, BLOCK_T=64, D=128, KV_QUANT=kv, FUSED_REDUCE=True, NSPLIT_P2=16, ROPE=True,
                     EARLY=True, GDC=True)
        jobs.append((f"attention early + grid wait kv={kv}", ck._attn_split_kernel,
                     {**attn, "k_ptr": cache[kv], "v_ptr": cache[kv]}, const,
                     {"num_warps": 4, "div16": ATTN_DIV16}, loads_before_wait(2 * 64 * 128 * (2 if kv == 0 else 1))))
    for afmt, out in ((ck.A_INT8, "*i8"), (ck.A_FP8, "*fp8e4nv")):  # the combine quantizing for the o_proj next
        jobs.append((f"attention fused_reduce rope quantized afmt={afmt}", ck._attn_split_kernel,
                     {**attn, "k_ptr": cache[0], "v_ptr": cache[0], "out_ptr": out},
                     dict(GQA=4, SPLIT=64, BLOCK_T=64, D=128, KV_QUANT=0, FUSED_REDUCE=True, NSPLIT_P2=16, ROPE=True,
                          OQ_PRE=True, OQ_AFMT=afmt), {"num_warps": 4}, "atom.global.gpu.acq_rel"))
    # attn_pdl's early form: the default tile's first block (64 keys of 128, 4 warps; 16 / 8 / 8 loads a thread for
    # float16 / int8 / fp8 caches) in one round trip. The form without it issues 16 / 2 / 2 of them before the first
    # use with Triton 3.6 (the GPU image's), 4 / 2 / 2 with Triton 3.9 (experiments/results/gpu/kernels stage 23).
    for kv, n in ((0, 16), (1, 8), (2, 8)):
        jobs.append((f"attention early: its first block's loads together kv={kv}", ck._attn_split_kernel,
                     {**attn, "k_ptr": cache[kv], "v_ptr": cache[kv]},
                     dict(GQA=4, SPLIT=64, BLOCK_T=64, D=128, KV_QUANT=kv, FUSED_REDUCE=True, NSPLIT_P2=16,
                          ROPE=True, EARLY=True, GDC=True), {"num_warps": 4, "div16": ATTN_DIV16},
                     loads_before_first_use(n)))
    jobs.append(("attention traced (attn_bench --trace)", ck._attn_split_kernel,  # the stamps' predicated reads
                 {**attn, "k_ptr": cache[0], "v_ptr": cache[0], "trace_ptr": "*i64"},
                 dict(GQA=4, SPLIT=64, BLOCK_T=64, D=128, KV_QUANT=0, FUSED_REDUCE=True, NSPLIT_P2=16, ROPE=True,
                      TRACE=True), {"num_warps": 4}, "@!p mov.u64 %rd"))
    for wfmt, w in ((ck.W_INT8, "*i8"), (ck.W_INT4, "*u8")):
        bm, br, bk, warps, stages = ck.WQ_PREFILL_CONFIG[wfmt]
        jobs.append((f"wq_mm prefill wfmt={wfmt}", ck._wq_mm_kernel, {**WQ_TYPES, "w_ptr": w},
                     dict(WFMT=wfmt, AFMT=0, GROUP=128, BLOCK_M=bm, BLOCK_R=br, BLOCK_K=bk, RESIDUAL=False),
                     {"num_warps": warps, "num_stages": stages}, None))
    # SmoothQuant's prefill: the default tile in the plain order, and every tile of the sweep grouped
    for (bm, br, bk, warps, stages), group in [(ck.INT8_GEMM_CONFIG, 0), *((t, 8) for t in INT8_GEMM_SWEEP)]:
        jobs.append((f"sq prefill tile {(bm, br, bk, warps, stages)} group_m={group}", ck._wq_mm_kernel, SQ_TYPES,
                     dict(WFMT=ck.W_INT8, AFMT=ck.A_INT8, GROUP=1, BLOCK_M=bm, BLOCK_R=br, BLOCK_K=bk, RESIDUAL=True,
                          GROUP_M=group), {"num_warps": warps, "num_stages": stages}, "wgmma"))
    # SmoothQuant's persistent TMA GEMM (KernelConfig.sq_prefill_gemm "tma") on every tile of the sweep
    for bm, bn, bk, warps, stages in dict.fromkeys([ck.INT8_GEMM_CONFIG, *INT8_GEMM_SWEEP]):
        jobs.append((f"sq prefill tma tile {(bm, bn, bk, warps, stages)}", ck._i8_tma_kernel,
                     {"x_desc": f"tensordesc<i8[{bm}, {bk}]>", "w_desc": f"tensordesc<i8[{bn}, {bk}]>",
                      "ws_ptr": "*fp32", "y_ptr": "*fp16"},
                     dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, RESIDUAL=True),
                     {"num_warps": warps, "num_stages": stages}, "cp.async.bulk.tensor"))
    # the weight-only prefill (KernelConfig.wq_prefill): every tile of the sweep, wgmma taking the weight from registers
    for (br, bm, bk, warps, stages), (wfmt, w) in itertools.product(
            dict.fromkeys([*ck.WQ_PREFILL_T_CONFIG.values(), *WQ_PREFILL_SWEEP]), ((ck.W_INT8, "*i8"), (ck.W_INT4, "*i8"))):
        jobs.append((f"wq_prefill_mm wfmt={wfmt} tile {(br, bm, bk, warps, stages)}", ck._wq_prefill_t_kernel,
                     {**WQ_TYPES, "w_ptr": w}, dict(WFMT=wfmt, GROUP=128, BLOCK_R=br, BLOCK_M=bm, BLOCK_K=bk, GROUP_M=8,
                                                    EVEN_K=True, RESIDUAL=True),
                     {"num_warps": warps, "num_stages": stages}, wgmma_a_from_registers))
        # its persistent TMA form (KernelConfig.wq_prefill_tma): TMA loads and the weight from registers
        jobs.append((f"wq_prefill_mm tma wfmt={wfmt} tile {(br, bm, bk, warps, stages)}", ck._wq_tma_kernel,
                     {"x_desc": f"tensordesc<fp16[{bm}, {bk}]>", "w_desc": f"tensordesc<i8[{br}, {bk}]>",
                      "ws_ptr": "*fp16", "y_ptr": "*fp16"},
                     dict(WFMT=wfmt, GROUP=128, BLOCK_R=br, BLOCK_M=bm, BLOCK_K=bk, GROUP_M=8, RESIDUAL=True),
                     {"num_warps": warps, "num_stages": stages},
                     lambda k: wgmma_a_from_registers(k) or (
                         None if "cp.async.bulk.tensor" in k.asm["ptx"] else "TMA loads")))
    for bm, table in ((16, ck.WQ_MM_CONFIG), (32, ck.WQ_MM_CONFIG_32), (64, ck.WQ_MM_CONFIG_32)):  # W8A16, cvt=1
        br, bk, warps, stages = table[ck.W_INT8]
        jobs.append((f"wq_mm int8 byte-permute rows<={bm}", ck._wq_mm_kernel, WQ_TYPES,
                     dict(WFMT=ck.W_INT8, AFMT=0, GROUP=1, BLOCK_M=bm, BLOCK_R=br, BLOCK_K=bk, RESIDUAL=True, CVT=1),
                     {"num_warps": warps, "num_stages": stages}, "prmt.b32"))
    for afmt, tiles in ck.WQ_WIDE_CONFIG.items():  # KernelConfig.wq_wide: K split, the last program adds
        types = WQ_TYPES if afmt == ck.A_FLOAT else SQ_TYPES
        for bm, (br, bk, warps, stages) in tiles.items():
            jobs.append((f"wq_mm int8 wide split afmt={afmt} rows<={bm}", ck._wq_mm_kernel, types,
                         dict(WFMT=ck.W_INT8, AFMT=afmt, GROUP=1, BLOCK_M=bm, BLOCK_R=br, BLOCK_K=bk, RESIDUAL=True,
                              CVT=int(afmt == ck.A_FLOAT), SPLIT=4), {"num_warps": warps, "num_stages": stages},
                         "atom.global.gpu.acq_rel"))
    for bm, (block_n, kw, warps, stages) in ck.W4K_TILES.items():  # the k-packed INT4 kernel, PTX conversion
        jobs.append((f"w4k_mm rows<={bm}", ck._w4k_mm_kernel, W4K_TYPES,
                     dict(GROUP=128, BLOCK_M=bm, BLOCK_N=block_n, KW=kw, RESIDUAL=True, EVEN_N=True, CVT=1),
                     {"num_warps": warps, "num_stages": stages}, "lop3.b32"))
    for wfmt, w in ((ck.W_FLOAT, "*fp16"), (ck.W_INT8, "*i32"), (ck.W_INT4, "*i32")):  # batch-1 GEMV, each epilogue
        br, bk, warps = ck.GEMV_CONFIG[wfmt]
        for then in (ck.THEN_NONE, ck.THEN_SILU, ck.THEN_NORM):
            jobs.append((f"gemv wfmt={wfmt} then={then}", ck._gemv_kernel, {**GEMV_TYPES, "w_ptr": w},
                         dict(WFMT=wfmt, AFMT=0, PRO=0, HAS_PRE=False, SCALE=int(wfmt == ck.W_INT8),
                              RESIDUAL=then == ck.THEN_NORM, GROUP=128, BLOCK_R=max(br, 2 if then else 1), BLOCK_K=bk,
                              CVT=ck.GEMV_CVT.get(wfmt, 0), THEN=then),
                         {"num_warps": warps}, "atom.global.gpu.acq_rel" if then == ck.THEN_NORM else None))
    br, bk, warps = ck.GEMV_CONFIG[ck.W_FLOAT]
    for then in (ck.THEN_SILU, ck.THEN_NORM):  # the epilogue quantizing for a SmoothQuant / FP8 linear next
        for afmt, xn in ((ck.A_INT8, "*i8"), (ck.A_FP8, "*fp8e4nv")):
            jobs.append((f"gemv then={then} quantized afmt={afmt}", ck._gemv_kernel, {**GEMV_TYPES, "xn_ptr": xn},
                         dict(WFMT=ck.W_FLOAT, AFMT=0, PRO=0, HAS_PRE=False, SCALE=0, RESIDUAL=then == ck.THEN_NORM,
                              GROUP=128, BLOCK_R=max(br, 2), BLOCK_K=bk, THEN=then, TQ_PRE=True, TQ_AFMT=afmt),
                         {"num_warps": warps}, None))
    for kv in (0, 1, 2):  # RoPE + cache write, the unfused path (batches above KernelConfig.attn_fused_batch)
        jobs.append((f"rope_cache_write kv={kv}", ck._rope_cache_kernel,
                     {"qkv_ptr": "*fp16", "pos_ptr": "*i64", "slot_ptr": "*i64", "freq_ptr": "*fp32",
                      "q_ptr": "*fp16", "k_ptr": cache[kv], "v_ptr": cache[kv], "rcp_ptr": "*fp32"},
                     dict(HALF=64, KV_QUANT=kv), {"num_warps": 1}, None))
        jobs.append((f"rope_cache_write prefill kv={kv}", ck._rope_cache_kernel,  # KernelConfig.prefill_rope
                     {"qkv_ptr": "*fp16", "pos_ptr": "*i64", "slot_ptr": "*i64", "freq_ptr": "*fp32",
                      "q_ptr": "*fp16", "k_ptr": cache[kv], "v_ptr": cache[kv], "rcp_ptr": "*fp32"},
                     dict(HALF=64, KV_QUANT=kv, PREFILL=True), {"num_warps": 1}, None))
    only = sys.argv[1] if len(sys.argv) > 1 else ""  # (a substring of the jobs' names to compile only those)
    for name, fn, types, const, options, must in (j for j in jobs if only in j[0]):
        try:
            k = compile_one(fn, types, const, **options)
            if callable(must):  # a check of the compiled code: None, or what it lacks
                must = must(k)
            ok = (must is None or must in k.asm["ptx"]) and k.metadata.shared <= MAX_SHARED
            if k.metadata.shared > MAX_SHARED:
                must = f"a block's shared memory: it needs {k.metadata.shared} bytes, sm_90 gives {MAX_SHARED}"
            mma = "wgmma" if "wgmma" in k.asm["ptx"] else "mma" if "mma.sync" in k.asm["ptx"] else "-"
            atoms = sorted(set(re.findall(r"atom[.][a-z0-9_.]+", k.asm["ptx"])))
            print(f"{name}: {'compiled' if ok else 'compiled WITHOUT ' + must}, to a cubin of "
                  f"{len(k.asm['cubin'])} bytes{resources(k)}; {mma}; atomics {atoms or 'none'}")
            failed += not ok
        except Exception as exc:
            print(f"{name}: FAILED {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
