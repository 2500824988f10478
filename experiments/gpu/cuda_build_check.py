"""Build the runtime's compiled GEMVs (quant/runtime/csrc) for an H200 (sm_90) on a machine without a GPU, and check
what their code must have, before any GPU time is spent on them:

- both kernel files compile with ``nvcc`` for sm_90, no instantiation touching local memory in its main loop (the
  longest loop with the weight stream's load). Some epilogues keep a few bytes of stack: the call frame of the IEEE
  division's slow path (``__fdiv_rn``, the activation quantization's, bit-exact with act_prep's), outside that loop;
- the persistent forms compiled for programmatic dependent launch (KernelConfig.gemv_pdl): the trigger (PREEXIT)
  and the wait (ACQBULK), their first weight loads ahead of the wait (ptxas sank them below a plain one);
- the norm prologues (KernelConfig.norm_prologue; w4a16_gemv.cu's PRO_NORM, w8_gemv.cu's NORM): their first weight
  loads issued ahead of the row's L2 loads for the RMSNorm statistics, which they are meant to overlap;
- the epilogues for the next linear (KernelConfig.gemv_then) compiled with their ordering: the RMSNorm variants
  (THEN_NORM) count their blocks with an atomic after a GPU-scope fence (ATOMG, MEMBAR ... GPU), the SiLU·gate
  variants (THEN_SILU) meet a block's row pairs behind a barrier (BAR.SYNC);
- a report, not a check: the persistent GEMVs' loop in warp-instructions a weight (the row block's finish counted
  in, so an upper bound), the number that caps a GEMV below copy bandwidth where the SMs' issue rate runs out;
- the CUTLASS prefill GEMMs (csrc/cutlass, KernelConfig.wq_prefill_cutlass, sq_prefill_gemm "cutlass") compile for
  sm_90a with PyTorch's own nvcc flags: the weight-only one's int8 and int4 kernels of each tile on float16 wgmma
  with float32 sums, SmoothQuant's two on int8 wgmma, no stack (where the nvidia-cutlass package is installed, as
  make install does);
- the bindings are well-formed C++ against the installed torch's headers. ATen's CUDA context header needs the
  cuSPARSE / cuBLAS headers, which a CPU machine lacks, so CUDA's runtime header and two declarations stand in for
  it (the stream getter and the device guard): the only part not built as on the GPU.

    python experiments/gpu/cuda_build_check.py    # one line per kernel file and per check; exit 1 on a failure

Exit codes: 0 all checks hold; 1 a check fails (its line says which); 2 no nvcc or g++ here. Disassembled with the
tools Triton ships (experiments/gpu/sass_loop.py), as the Triton kernels' checks are.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

from experiments.gpu.sass_loop import binary_tool, main_loop

CSRC = Path(__file__).resolve().parents[2] / "quant" / "runtime" / "csrc"
ARCH = "-gencode=arch=compute_90,code=sm_90"
# each kernel's template arguments, in order (the files' own template parameter lists)
# the weight stream's load (gemv_common.cuh load_stream: ld.global.nc.L1::no_allocate.L2::256B.v4), which marks the
# main loop: a short stream loop can be shorter than an epilogue's
STREAM_LOAD = "LDG.E.NA.LTC256B.128.CONSTANT"
TEMPLATE = {"w8_gemv_kernel": ("F", "M", "R", "U", "THEN"), "w4a16_gemv_kernel": ("M", "R", "U", "PRO", "THEN"),
            "w4a16_gemv_persistent": ("R", "U", "PRO", "THEN"), "w8_gemv_persistent": ("F", "R", "U", "THEN", "NORM"),
            "w4a16_mma_kernel": ("ROWS", "P", "PRE", "THEN"), "w8_mma_kernel": ("F", "P", "THEN")}
THEN_SILU, THEN_NORM = 1, 2  # gemv_then.h's Then
PRO_NORM = 2  # w4a16_gemv.cu's Prologue (w8_gemv.cu's: NORM = 1)
ROW_LOAD = "LDG.E.128.STRONG.GPU"  # the residual row's 16-byte L2 loads (__ldcg)
# The tensor-core INT4 kernel's steady loop (P steps of 16 k x 64 channels a warp), warp-instructions per weight at
# most, per row tile: streaming INT4 at an H200's copy bandwidth takes ~8.4e12 weights/s of its ~1.05e12
# warp-instructions/s, so 0.08 is ~2/3 of the issue rate (experiments/results/gpu/kernels, stage 9).
W4M_PER_WEIGHT = {8: 0.08, 16: 0.09, 32: 0.12}
W8M_PER_WEIGHT = 0.06  # the 8-bit one (P steps of 32 k x 64 channels), half INT4's bytes a weight: ~2/3 again
# The GEMVs' persistent forms: weights in a lane's 16-byte chunk, for their static warp-instructions a weight (a
# report, not a check: Nsight Compute counted 0.11 executed for INT4 on an H100, experiments/results/gpu/kernels
# stage 21, where streaming at an H200's copy bandwidth leaves ~0.125 at the SMs' full issue rate)
GEMV_WEIGHTS_A_CHUNK = {"w4a16_gemv_persistent": 32, "w8_gemv_persistent": 16}
MMA_K_STEP = {"w4a16_mma_kernel": 16, "w8_mma_kernel": 32}  # the tensor-core kernels' k per step


def kernels(sass: str, res: str) -> list[dict]:
    """Per kernel instantiation (nvdisasm's and cuobjdump -res-usage's text of one cubin): its template arguments,
    registers, stack bytes, opcodes, and the spills in its main loop (sass_loop.main_loop)."""
    usage = {m.group(1): (int(m.group(2)), int(m.group(3)))
             for m in re.finditer(r"Function (\S+):\s*REG:(\d+) STACK:(\d+)", res)}
    out = []
    for part in re.split(r"\n//-+ \.text\.", sass)[1:]:
        name, body = part.split(" ", 1)
        kind = next((k for k in TEMPLATE if k in name), None)
        if kind is None:
            continue
        args = [int(a) for a in re.findall(r"L[ib](\d+)E", name.split(kind, 1)[1])[:len(TEMPLATE[kind])]]
        ops = set(re.findall(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", body))
        regs, stack = usage.get(name, (-1, -1))
        loop = main_loop(body, STREAM_LOAD)
        seq = re.findall(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", body)
        first = {op: next((i for i, o in enumerate(seq) if o.startswith(op)), None)
                 for op in ("PREEXIT", "ACQBULK", STREAM_LOAD, ROW_LOAD)}
        k = {"kind": kind, "args": dict(zip(TEMPLATE[kind], args)), "regs": regs, "stack": stack, "ops": ops,
             "loop_spills": loop.count("LDL") + loop.count("STL"), "first": first}
        if kind in MMA_K_STEP:  # the steady loop, beside the tail loop of the same steps
            k["per_weight"] = len(main_loop(body, STREAM_LOAD, pick=min)) / (k["args"]["P"] * MMA_K_STEP[kind] * 64)
        if kind in GEMV_WEIGHTS_A_CHUNK:  # the persistent walk: one lane round of R x U chunks a lane a pass, with
            # the row block's finish (taken once a row block) in the loop as compiled: an upper bound
            a = k["args"]
            k["gemv_per_weight"] = len(loop) / (a["R"] * a["U"] * 32 * GEMV_WEIGHTS_A_CHUNK[kind])
        out.append(k)
    return out


def check_kernels(cubin: Path) -> list[str]:
    """The failures of one compiled file (empty: all hold)."""
    found = kernels(binary_tool(str(cubin), "nvdisasm", "-c"), binary_tool(str(cubin), "cuobjdump", "-res-usage"))
    fails = [] if found else [f"{cubin.name}: no kernel found in its SASS"]
    for k in found:
        tag = f"{k['kind']}{tuple(k['args'].values())}"
        if k["loop_spills"]:
            fails.append(f"{tag}: {k['loop_spills']} local-memory accesses (spills) in its main loop")
        first = k["first"]
        if k["kind"].endswith("_persistent") and not (
                first["PREEXIT"] is not None and first["ACQBULK"] is not None
                and first["PREEXIT"] < first["ACQBULK"] and first[STREAM_LOAD] < first["ACQBULK"]):
            fails.append(f"{tag}: programmatic dependent launch without its trigger, or its first weight loads "
                         f"not ahead of its wait (gemv_common.cuh wait_previous_grid)")
        if (k["args"].get("PRO") == PRO_NORM or k["args"].get("NORM") == 1) and not (
                first[ROW_LOAD] is not None and first[STREAM_LOAD] < first[ROW_LOAD]):
            fails.append(f"{tag}: the norm prologue's row loads not behind the first weight loads")
        if not k["kind"].endswith("_persistent") and (first["PREEXIT"], first["ACQBULK"]) != (None, None):
            fails.append(f"{tag}: a grid-dependency instruction outside the persistent forms")
        then = k["args"]["THEN"]
        if then == THEN_NORM and not (any(o.startswith("ATOMG") for o in k["ops"])
                                      and any(o.startswith("MEMBAR") and "GPU" in o for o in k["ops"])):
            fails.append(f"{tag}: the RMSNorm epilogue without its GPU fence and atomic count")
        if then in (THEN_SILU, THEN_NORM) and not any(o.startswith("BAR.SYNC") for o in k["ops"]):
            fails.append(f"{tag}: the epilogue without its block barrier")
        if "per_weight" in k:  # the tensor-core kernels: their MMA, the K split's count after its fence
            want = "IMMA.16832.S8" if k["kind"] == "w8_mma_kernel" and k["args"]["F"] == 1 else "HMMA.16816.F32"
            if not any(o.startswith(want) for o in k["ops"]):
                fails.append(f"{tag}: no {want}")
            if not (any(o.startswith("ATOMG") for o in k["ops"]) and any(o.startswith("MEMBAR") and "GPU" in o
                                                                        for o in k["ops"])):
                fails.append(f"{tag}: the K split's reduction without its GPU fence and atomic count")
            most = W4M_PER_WEIGHT[k["args"]["ROWS"]] if "ROWS" in k["args"] else W8M_PER_WEIGHT
            if k["per_weight"] > most:
                fails.append(f"{tag}: {k['per_weight']:.3f} warp-instructions per weight in its steady loop, more "
                             f"than {most}")
    epi = [k for k in found if k["args"]["THEN"]]
    print(f"{cubin.stem}: {len(found)} kernels for sm_90 ({len(epi)} with an epilogue for the next linear), "
          f"registers {min(k['regs'] for k in found)}-{max(k['regs'] for k in found)}, "
          f"no spill in a main loop: {not any(k['loop_spills'] for k in found)}, stack ≤ "
          f"{max(k['stack'] for k in found)} bytes" if found else f"{cubin.stem}: nothing compiled")
    gemv = [k for k in found if "gemv_per_weight" in k and not k["args"]["THEN"] and not k["args"].get("NORM")
            and k["args"].get("PRO", 1) == 1]  # (no epilogue; INT4: x · pre staged)
    if gemv:
        names = [n for n in gemv[0]["args"] if n in ("F", "R", "U")]  # (F: the 8-bit GEMV's format)
        print(f"{cubin.stem}: persistent GEMV loop, warp-instructions a weight (at most), by ({', '.join(names)}): "
              + ", ".join(f"{tuple(k['args'][n] for n in names)} {k['gemv_per_weight']:.3f}" for k in gemv))
    mma = [k for k in found if "per_weight" in k]
    if mma:
        print(f"{cubin.stem}: warp-instructions per weight in the steady loop, by its template arguments: "
              + ", ".join(f"{tuple(k['args'].values())} {k['per_weight']:.3f}" for k in mma))
    return fails


def check_cutlass(tmp: Path) -> list[str]:
    """csrc/cutlass (KernelConfig.wq_prefill_cutlass, sq_prefill_gemm "cutlass") built with CUTLASS's headers and
    PyTorch's nvcc flags, as cuda_ext.load_cutlass builds it: the weight-only GEMM's two weight types on every tile
    (cuda_ext.WQ_GEMM_TILES) on float16 wgmma with float32 sums (HGMMA ...F32), the SmoothQuant GEMM's two epilogues
    (with and without the residual) on int8 wgmma (IGMMA ...S8.S8), nothing spilled (no stack), the bindings
    well-formed. Without the nvidia-cutlass package a line says so (make install installs it)."""
    from quant.runtime.cuda_ext import WQ_GEMM_TILES, cutlass_flags, cutlass_root, cutlass_sources

    src = CSRC / "cutlass"
    root = cutlass_root()
    if root is None:
        print("cutlass: not checked: CUTLASS's headers are not installed (the nvidia-cutlass package)")
        return []
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS  # (what PyTorch's builder adds: no half operators)

    files = cutlass_sources()
    procs = [subprocess.Popen(["nvcc", *COMMON_NVCC_FLAGS, "-O3", *cutlass_flags(root), "-cubin", str(f), "-o",
                               str(tmp / f"{f.stem}.cubin")], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, cwd=src) for f in files]  # (in parallel, as ninja builds them)
    for f, p in zip(files, procs):
        err = p.communicate()[1]
        if p.returncode != 0:
            print(f"cutlass/{f.name}: does not compile")
            return [f"cutlass/{f.name}: nvcc failed: {(err.strip().splitlines() or [''])[0][:300]}"]
    fails = []
    # (name, its files, kernels wanted, the MMA its kernels must run, that MMA's types: the pattern, what it finds)
    for name, group, want, mma, types, found in (
            ("wq_gemm", [f for f in files if f.stem.startswith("wq_gemm")], 2 * len(WQ_GEMM_TILES), "HGMMA",
             r"HGMMA\.\w+\.(\w+)", {"F32"}),
            ("sq_gemm", [f for f in files if f.stem == "sq_gemm"], 2, "IGMMA", r"IGMMA\.\w+\.(\w+\.\w+)", {"S8.S8"})):
        res, kernels = [], []
        for f in group:
            cubin = str(tmp / f"{f.stem}.cubin")
            res += re.findall(r"Function (\S+):\s*REG:(\d+) STACK:(\d+)",
                              binary_tool(cubin, "cuobjdump", "-res-usage"))
            kernels += [k for k in re.split(r"\n\s*Function : ", binary_tool(cubin, "cuobjdump", "-sass"))[1:]
                        if mma in k]
        if len(res) != want or len(kernels) != want:
            fails.append(f"cutlass/{name}: {len(res)} kernels, {len(kernels)} with {mma}; want {want}")
        fails += [f"cutlass/{name}: a kernel's MMA is not {mma} {found}: {set(m)}"
                  for m in (re.findall(types, k) for k in kernels) if set(m) != found]
        fails += [f"cutlass/{name}: {stack} bytes of stack (spills) in {fn[:80]}" for fn, _, stack in res
                  if stack != "0"]
        print(f"cutlass/{name}: compiled for sm_90a, {len(res)} kernels, registers "
              f"{sorted({int(r) for _, r, _ in res})}, stack {sorted({int(s) for _, _, s in res})}")
    return fails + check_bindings(tmp, src, "quant_cuda_cutlass")


def check_bindings(tmp: Path, src_dir: Path = CSRC, name: str = "quant_cuda_gemv") -> list[str]:
    """``src_dir``'s bindings.cpp well-formed against torch's headers, ATen's CUDA context stood in for (module
    docstring)."""
    import torch

    tmp = tmp / name
    tmp.mkdir()
    src = (src_dir / "bindings.cpp").read_text()
    stand_in = ("#include <cuda_runtime.h>\n#include <torch/extension.h>\n"
                "namespace at::cuda { inline cudaStream_t getCurrentCUDAStream() { return nullptr; } }\n"
                "namespace c10::cuda { struct CUDAGuard { explicit CUDAGuard(c10::Device) {} }; }\n")
    head = "#include <ATen/cuda/CUDAContext.h>\n#include <c10/cuda/CUDAGuard.h>\n#include <torch/extension.h>\n"
    if head not in src:
        return ["bindings.cpp: its includes changed; update this check's stand-in"]
    (tmp / "bindings.cpp").write_text(src.replace(head, stand_in))
    for header in src_dir.glob("*.h"):
        shutil.copy(header, tmp / header.name)
    inc = Path(torch.__file__).parent / "include"
    # the CUDA headers where nvcc itself finds them (its INCLUDES; nvcc may be a wrapper script elsewhere)
    dry = subprocess.run(["nvcc", "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull], capture_output=True,
                         text=True).stderr
    cuda_inc = next(iter(re.findall(r'INCLUDES="-I([^"]+)"', dry)), "/usr/local/cuda/include")
    cmd = ["g++", "-std=c++20", "-fsyntax-only", f"-DTORCH_EXTENSION_NAME={name}", f"-I{inc}",
           f"-I{inc / 'torch' / 'csrc' / 'api' / 'include'}", f"-I{cuda_inc}",
           f"-I{sysconfig.get_paths()['include']}", str(tmp / "bindings.cpp")]
    p = subprocess.run(cmd, capture_output=True, text=True)
    errors = [line for line in p.stderr.splitlines() if "error" in line]
    where = f"{src_dir.relative_to(CSRC.parent)}/bindings.cpp"
    print(f"{where}: {'well-formed' if p.returncode == 0 else 'does not compile'} against torch "
          f"{torch.__version__}'s headers")
    return [] if p.returncode == 0 else [f"{where}: {e}" for e in errors[:5]] or [f"{where}: g++ failed"]


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args(argv)  # --help; no flags (exit 2)
    missing = [name for name in ("nvcc", "g++") if shutil.which(name) is None]
    if missing:
        print(f"cuda_build_check: {', '.join(missing)} not found", file=sys.stderr)
        return 2
    fails = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for cu in ("w8_gemv.cu", "w4a16_gemv.cu", "w4a16_mma.cu", "w8_mma.cu"):
            cubin = tmp / (cu + ".cubin")
            p = subprocess.run(["nvcc", "-O3", ARCH, "-cubin", str(CSRC / cu), "-o", str(cubin)], capture_output=True,
                               text=True, cwd=CSRC)
            if p.returncode != 0:
                fails.append(f"{cu}: nvcc failed: {(p.stderr.strip().splitlines() or [''])[0][:300]}")
                print(f"{cu}: does not compile")
                continue
            fails += check_kernels(cubin)
        fails += check_bindings(tmp)
        fails += check_cutlass(tmp)
    for f in fails:
        print("FAILED " + f)
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
