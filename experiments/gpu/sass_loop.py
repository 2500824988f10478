"""Static cost of the runtime's Triton decode kernels for an H200 (sm_90), on a machine without a GPU: each kernel
is compiled as Triton's JIT would compile it for the 7B/8B shapes (16-aligned pointers and strides), its SASS
disassembled, and its main loop (the longest backward branch) counted. What that gives:

- warp-instructions per weight: the SM issues 4 warp-instructions a clock, so a step's linears cannot take less than
  weights × that / (4 · SMs · clock) — set beside bytes / copy bandwidth, it says whether a kernel can reach the
  memory roofline at all, or is bound by its own instruction stream (conversion, layout shuffles);
- spills (LDL/STL in the loop), registers, shared memory and the CTAs per SM they allow, and the CTAs each linear
  of the shape launches (a grid under one wave of 132 SMs cannot hide latency whatever its tile).

Counts, not times: they rank variants worth the GPU's time and explain a measured ratio, they do not replace one.
Compile with the Triton the GPU image runs (3.6.0 on the lent H200; ``pip install triton==3.6.0``)::

    python experiments/gpu/sass_loop.py [--shape llama2-7b] [--sweep-w4k] [--out table.md]

Exit 0; 1 (one line on stderr) when the disassembler is missing or --out cannot be written; 2 on bad arguments.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("unset TRITON_INTERPRET: the interpreter replaces the kernels this compiles")

import triton  # noqa: E402

from experiments.gpu.triton_compile_check import SQ_TYPES, W4K_TYPES, WQ_TYPES, compile_one  # noqa: E402
from experiments.kernel_bench import layer_linears  # noqa: E402
from quant.runtime import cuda_kernels as ck  # noqa: E402

# H200 SXM: SMs, max SM clock (experiments/results/gpu/*/gpu.txt), copy bandwidth (stage 4, both shapes' runs),
# registers and shared memory per SM (sm_90 limits)
SMS, CLOCK_HZ, COPY_BPS, REGS_PER_SM, SMEM_PER_SM, THREADS_PER_SM = 132, 1.98e9, 4.2e12, 65536, 233472, 2048


def binary_tool(path: str, tool: str, flag: str) -> str:
    """The output of one of the CUDA binary tools Triton ships (nvdisasm, cuobjdump) on a cubin file."""
    exe = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)
    return subprocess.run([exe, flag, path], capture_output=True, text=True, check=True).stdout


def cubin_tool(kernel, tool: str, flag: str) -> str:
    """:func:`binary_tool` on a compiled Triton kernel's cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        return binary_tool(f.name, tool, flag)


# One instruction line of ``cuobjdump -sass``: its address and its text (predicate, opcode, operands), and the
# predicate (``@P0``, ``@!UP1``) that may lead the text.
INSTRUCTION = re.compile(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
PREDICATE = re.compile(r"^@!?U?P\w+\s+")


def main_loop(sass: str, marker: str | None = None, pick=max) -> list[str]:
    """The opcodes of the longest loop (from a backward branch's target label to the branch); with ``marker``, of
    the longest loop holding an instruction that contains it (the weight stream's load, where an epilogue's loop can
    be longer than a short stream loop). ``pick=min``: the shortest such loop instead (a steady-state loop beside
    its longer tail loop of the same steps with their bounds checks)."""
    ins, labels, pending = [], {}, []
    for line in sass.splitlines():
        if m := re.match(r"^\s*(\.L_x_\d+):", line):
            pending.append(m.group(1))
        elif m := INSTRUCTION.match(line):
            addr = int(m.group(1), 16)
            labels.update((p, addr) for p in pending)
            pending = []
            ins.append((addr, m.group(2)))
    loops = []
    for addr, op in ins:
        if (m := re.search(r"BRA\s+`\((\.L_x_\d+)\)", op)) and labels.get(m.group(1), addr) < addr:
            start = labels[m.group(1)]
            body = [o for a, o in ins if start <= a <= addr]
            if marker is not None and not any(marker in o for o in body):
                continue
            loops.append([PREDICATE.sub("", o).split()[0].split(".")[0] for o in body])  # bare opcode
    return pick(loops, key=len) if loops else []


def variants(sweep_w4k: bool):
    """(label, kernel, types, constexprs, options, weights per loop trip per CTA, bytes per weight, rows per CTA)"""
    for bm in (16, 32, 64):
        table = ck.WQ_MM_CONFIG if bm == 16 else ck.WQ_MM_CONFIG_32
        br, bk, warps, stages = table[ck.W_INT8]
        for cvt in (0, 1):
            yield (f"W8A16 tl.dot rows≤{bm} cvt={cvt}", ck._wq_mm_kernel, WQ_TYPES,
                   dict(WFMT=ck.W_INT8, AFMT=ck.A_FLOAT, GROUP=1, BLOCK_M=bm, BLOCK_R=br, BLOCK_K=bk, RESIDUAL=False,
                        CVT=cvt), dict(num_warps=warps, num_stages=stages), br * bk, 1.0, br)
        br, bk, warps, stages = ck.WQ_WIDE_CONFIG[ck.A_FLOAT][bm]
        yield (f"W8A16 tl.dot rows≤{bm} wide, K split", ck._wq_mm_kernel, WQ_TYPES,
               dict(WFMT=ck.W_INT8, AFMT=ck.A_FLOAT, GROUP=1, BLOCK_M=bm, BLOCK_R=br, BLOCK_K=bk, RESIDUAL=False,
                    CVT=1, SPLIT=4), dict(num_warps=warps, num_stages=stages), br * bk, 1.0, br)
        for label, (br, bk, warps, stages), split in (("", table[ck.A_INT8], 1),
                                                       (" wide, K split", ck.WQ_WIDE_CONFIG[ck.A_INT8][bm], 4)):
            yield (f"SmoothQuant tl.dot rows≤{bm}{label}", ck._wq_mm_kernel, SQ_TYPES,
                   dict(WFMT=ck.W_INT8, AFMT=ck.A_INT8, GROUP=1, BLOCK_M=bm, BLOCK_R=br, BLOCK_K=bk, RESIDUAL=False,
                        SPLIT=split), dict(num_warps=warps, num_stages=stages), br * bk, 1.0, br)
        tiles = ck.W4K_TILES[bm] if not sweep_w4k else [
            (n, kw, w, s) for n in (16, 32, 64) for kw in (16, 32, 64) for w in (2, 4, 8) for s in (2, 3, 4)]
        for block_n, kw, warps, stages in ([tiles] if not sweep_w4k else tiles):  # the packing's KW is W4K_KW
            yield (f"INT4 k-packed rows≤{bm} tile ({block_n}, {kw}, {warps}, {stages})", ck._w4k_mm_kernel, W4K_TYPES,
                   dict(GROUP=128, BLOCK_M=bm, BLOCK_N=block_n, KW=kw, RESIDUAL=False, EVEN_N=True, CVT=1),
                   dict(num_warps=warps, num_stages=stages), block_n * kw * 8, 0.5, block_n)


def analyse(shape: str, sweep_w4k: bool):
    linears = layer_linears(shape)
    weights = sum(n * k for n, k in linears.values())  # one layer; × layers below
    from quant.runtime.random_checkpoint import SHAPES

    weights *= SHAPES[shape]["num_hidden_layers"]
    rows = []
    for label, fn, types, const, options, per_trip, bpw, cta_rows in variants(sweep_w4k):
        try:
            k = compile_one(fn, types, const, **options)
        except Exception as exc:  # a tile that does not compile (shared memory, layout): say so, go on
            rows.append((label, f"does not compile: {type(exc).__name__}"))
            continue
        loop = main_loop(cubin_tool(k, "nvdisasm", "-c"))
        ops = collections.Counter(loop)
        threads = options["num_warps"] * 32
        # registers per thread from the cubin (a compiled kernel learns them only when loaded on a GPU)
        regs = int(re.search(r"REG:(\d+)", cubin_tool(k, "cuobjdump", "-res-usage")).group(1))
        smem = k.metadata.shared
        ctas = min(REGS_PER_SM // max(1, regs * threads), SMEM_PER_SM // max(1, smem + 1024),
                   THREADS_PER_SM // threads, 32)
        per_weight = len(loop) * options["num_warps"] / per_trip
        issue_ms = weights * per_weight / (4 * SMS * CLOCK_HZ) * 1e3
        memory_ms = weights * bpw / COPY_BPS * 1e3
        grids = "/".join(  # output tiles, × the K splits where the kernel splits K (as wq_mm does)
            str(-(-n // cta_rows) * (ck.wq_fill_split(-(-n // cta_rows), SMS, const["BLOCK_M"], k)
                                     if const.get("SPLIT", 1) > 1 else 1)) for n, k in linears.values())
        rows.append((label, f"{len(loop)}", f"{per_weight:.3f}", f"{issue_ms:.2f}", f"{memory_ms:.2f}",
                     f"{ops['LDL'] + ops['STL']}", f"{regs}", f"{smem // 1024}", f"{ctas}", grids,
                     ", ".join(f"{o} {c}" for o, c in ops.most_common(6))))
    return weights, rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="llama2-7b", choices=["llama2-7b", "llama3-8b"])
    p.add_argument("--sweep-w4k", action="store_true", help="every k-packed INT4 tile at each row tile")
    p.add_argument("--out", help="also write the table here (markdown)")
    args = p.parse_args(argv)
    try:
        weights, rows = analyse(args.shape, args.sweep_w4k)
    except (OSError, subprocess.CalledProcessError) as exc:  # Triton's nvdisasm / cuobjdump missing or failing
        print(f"sass_loop: cannot disassemble with the tools Triton ships: {exc}", file=sys.stderr)
        return 1
    head = (f"Triton {triton.__version__}, sm_90, {args.shape}: {weights / 1e9:.2f} G linear weights a step; "
            f"issue bound = weights × warp-instr per weight / (4 × {SMS} SMs × {CLOCK_HZ / 1e9:.2f} GHz), "
            f"memory bound = their bytes / {COPY_BPS / 1e12:.1f} TB/s\n\n"
            "| kernel | loop instr / warp | warp-instr / weight | issue bound ms | memory bound ms | spills in loop "
            "| regs | smem KiB | CTAs / SM | CTAs per linear (qkv/o/gate‖up/down) | loop's top opcodes |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|\n")
    text = head + "".join("| " + " | ".join(r) + " |\n" for r in rows)
    print(text, end="")
    if args.out:  # whole or not at all: a temporary file beside it, renamed over it
        try:
            tmp = f"{args.out}.tmp{os.getpid()}"
            with open(tmp, "w") as f:
                f.write(text)
            os.replace(tmp, args.out)
        except OSError as exc:
            print(f"sass_loop: cannot write {args.out}: {exc.strerror}", file=sys.stderr)
            if os.path.exists(tmp):
                os.remove(tmp)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
