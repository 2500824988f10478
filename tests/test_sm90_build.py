"""The runtime's Triton kernels compiled for an H200 (sm_90) on this CPU box, as Triton's JIT compiles them for the
7B/8B shapes: Triton lowers them to PTX and runs the ptxas it ships, so a kernel that does not compile, or needs more
shared memory than an sm_90 block has (it could not launch there), fails here before any GPU time is spent
(experiments/gpu/triton_compile_check.py). The static cost table (experiments/gpu/sass_loop.py) is checked for what
the runtime's comments rely on. The compiled CUDA GEMVs (quant/runtime/csrc) are built with nvcc for sm_90 and
checked the same way (experiments/gpu/cuda_build_check.py: no spill in a main loop, the epilogues' fences and
barriers, the tensor-core kernels' MMAs (float32-accumulating HMMA, int8 IMMA), their K split's fenced count and
their steady loop's instructions per weight, the INT4 GEMV's loop reported per tile, the bindings well-formed). All
run as subprocesses: this test session runs Triton's interpreter (tests/conftest.py), which replaces the kernels
these compile. About 2 minutes on a 2-core box."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run([sys.executable, str(ROOT / "experiments" / "gpu" / script), *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout


def test_every_kernel_compiles_for_sm90_within_its_shared_memory():
    lines = [line for line in _run("triton_compile_check.py").splitlines() if line.strip()]
    assert len(lines) >= 20 and all(": compiled, to a cubin" in line for line in lines), "\n".join(lines)
    for bm in (16, 32, 64):  # every row tile of the k-packed INT4 kernel, at its W4K_TILES tile
        assert any(line.startswith(f"w4k_mm rows<={bm}:") for line in lines)


def test_static_cost_table_backs_the_kernel_choices():
    rows = {}
    for line in _run("sass_loop.py").splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 11 and re.match(r"\d+$", cells[1]):
            rows[cells[0]] = {"per_weight": float(cells[2]), "spills": int(cells[5]), "ctas": int(cells[8])}
    assert len(rows) == 18, rows
    for bm in (16, 32, 64):
        # the byte-permute conversion (KernelConfig.wq_cvt) issues fewer instructions per weight than Triton's,
        # and on the wide tiles (wq_wide) fewer again, without spills
        cost = [rows[f"W8A16 tl.dot rows≤{bm} {v}"] for v in ("cvt=0", "cvt=1", "wide, K split")]
        assert cost[0]["per_weight"] > cost[1]["per_weight"] > cost[2]["per_weight"] and not cost[2]["spills"], cost
        assert not rows[f"SmoothQuant tl.dot rows≤{bm} wide, K split"]["spills"]
        int4 = next(v for k, v in rows.items() if k.startswith(f"INT4 k-packed rows≤{bm} "))
        assert int4["spills"] == 0 and int4["ctas"] >= 1, int4  # W4K_TILES: no spill, and a block fits an SM


@pytest.mark.skipif(shutil.which("nvcc") is None or shutil.which("g++") is None, reason="needs nvcc and g++")
def test_compiled_gemvs_build_for_sm90_with_their_epilogues_ordered():
    lines = _run("cuda_build_check.py").splitlines()
    assert any(line.startswith("w8_gemv.cu: 198 kernels for sm_90 (90 with an epilogue") for line in lines), lines
    assert any(line.startswith("w4a16_gemv.cu: 102 kernels for sm_90 (54 with an epilogue") for line in lines), lines
    assert any(line.startswith("w4a16_mma.cu: 14 kernels for sm_90 (8 with an epilogue") for line in lines), lines
    assert any(line.startswith("w4a16_mma.cu: warp-instructions per weight") for line in lines), lines
    assert any(line.startswith("w8_mma.cu: 18 kernels for sm_90 (12 with an epilogue") for line in lines), lines
    # the INT4 GEMV's loop reported for every tile, as an upper bound of what Nsight Compute counted executed on an
    # H100 for the default tile (0.11 warp-instructions a weight, experiments/results/gpu/kernels stage 21)
    from quant.runtime.cuda_ext import GEMV_TILES, WQ_GEMM_TILES

    w4 = next(line for line in lines if line.startswith("w4a16_gemv.cu: persistent GEMV loop"))
    cost = {(int(r), int(u)): float(v) for r, u, v in re.findall(r"\((\d), (\d)\) (\d\.\d+)", w4)}
    assert set(cost) == set(GEMV_TILES) and 0.11 <= cost[(4, 1)] < 0.2, w4
    assert "bindings.cpp: well-formed" in "\n".join(lines) and not any("FAILED" in line for line in lines)
    # the CUTLASS prefill GEMMs (csrc/cutlass; make install brings CUTLASS's headers): both weight-only formats'
    # kernels on each of its tiles, SmoothQuant's with and without the residual, no spill
    assert f"cutlass/wq_gemm: compiled for sm_90a, {2 * len(WQ_GEMM_TILES)} kernels" in "\n".join(lines), lines
    assert "cutlass/sq_gemm: compiled for sm_90a, 2 kernels" in "\n".join(lines), lines
    assert "csrc/cutlass/bindings.cpp: well-formed" in "\n".join(lines), lines
