"""The GPU scripts (experiments/gpu/*.sh) run on the lent machine only, where a mistake costs a call of ten
minutes. Here: every one parses, and the functions that carry a build or a cache from one call to the next
(ext_carry.sh) do so on folders made here."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

GPU = Path(__file__).resolve().parent.parent / "experiments" / "gpu"


@pytest.mark.parametrize("script", sorted(GPU.glob("*.sh")), ids=lambda p: p.name)
def test_script_parses(script):
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True).stderr == ""


def _carry(fn: str, cwd: Path, **env) -> str:
    done = subprocess.run(["bash", "-c", f"source {GPU / 'ext_carry.sh'} && {fn}"], cwd=cwd, capture_output=True,
                          text=True, env={**os.environ, **{k: str(v) for k, v in env.items()}})
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_inductor_cache_goes_out_with_one_call_and_in_with_the_next(tmp_path):
    cache, out, nxt = tmp_path / "cache", tmp_path / "out", tmp_path / "next"
    (cache / "fxgraph" / "ab").mkdir(parents=True)
    (cache / "fxgraph" / "ab" / "entry").write_bytes(b"compiled")
    said = _carry("inductor_save", tmp_path, TORCHINDUCTOR_CACHE_DIR=cache, OUT=out)
    assert "returned in inductor/cache.tgz" in said and (out / "inductor" / "cache.tgz").is_file()
    (nxt / ".inductor").mkdir(parents=True)  # what the next call carries in
    shutil.copy(out / "inductor" / "cache.tgz", nxt / ".inductor" / "cache.tgz")
    _carry("inductor_restore", nxt, TORCHINDUCTOR_CACHE_DIR=tmp_path / "cache2", OUT=out)
    assert (tmp_path / "cache2" / "fxgraph" / "ab" / "entry").read_bytes() == b"compiled"
    # over the limit: not returned (it would crowd the wheels and the build out of the next call's carry)
    (cache / "big").write_bytes(os.urandom(3 << 20))
    said = _carry("inductor_save", tmp_path, TORCHINDUCTOR_CACHE_DIR=cache, OUT=tmp_path / "out2",
                  INDUCTOR_MAX_MB=1)
    assert "over INDUCTOR_MAX_MB; not returned" in said and not (tmp_path / "out2" / "inductor").exists()
    # nothing carried in: an empty cache folder, no error
    _carry("inductor_restore", tmp_path / "out2", TORCHINDUCTOR_CACHE_DIR=tmp_path / "cache3", OUT=out)
    assert (tmp_path / "cache3").is_dir() and not any((tmp_path / "cache3").iterdir())


def test_kernel_bench_splits_a_step_by_linear_kind(monkeypatch):
    """kernel_bench --per-linear times each linear kind apart (by_kind): on handlers that build() makes for a tiny
    LLaMa shape (random weights, CPU), every group holds each layer's linear of that kind and only those."""
    import torch

    from experiments import kernel_bench as kb
    from quant.runtime.random_checkpoint import SHAPES
    from quant.runtime.schemes.base import KernelConfig

    monkeypatch.setitem(SHAPES, "tiny", {"hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4,
                                         "num_key_value_heads": 2})
    hs = kb.build("tiny", 3, {"fp16": (None, KernelConfig()), "int8": ("W8A16", KernelConfig())}, 32,
                  torch.device("cpu"), 0, lambda _: None)
    for handlers in hs.values():
        groups = kb.by_kind(handlers, "tiny")
        assert list(groups) == ["qkv", "o", "gate_up", "down"]
        for kind, group in groups.items():
            assert len(group) == 3
            assert {tuple(h.dequantized_weight().shape) for h, _ in group} == {kb.layer_linears("tiny")[kind]}


def test_attn_pick_names_the_fastest_tile_above_the_default_or_none(tmp_path):
    """attn_pick.py (w4g.sh's attn_e2e stage): the fastest tile whose interval lies above the default's, as a bench
    variant; none when every interval reaches 1 (then the stage times nothing end to end); never a tile whose output
    is wrong."""
    import json
    import sys

    def pick(rows) -> str:
        (tmp_path / "r.json").write_text(json.dumps({"rows": rows}))
        return subprocess.run([sys.executable, str(GPU / "attn_pick.py"), str(tmp_path / "r.json")],
                              capture_output=True, text=True, check=True).stdout.strip()

    default = {"name": "default", "tile": [64, 0, 4], "speedup": 1.0, "ci": [1.0, 1.0]}
    peer = {"name": "torch sdpa", "speedup": 3.0, "ci": [2.9, 3.1]}  # (no tile: not a choice)
    fast = {"name": "32x64w2", "tile": [32, 64, 2], "speedup": 1.3, "ci": [1.2, 1.4]}
    faster_but_unsure = {"name": "16x0w1", "tile": [16, 0, 1], "speedup": 1.5, "ci": [0.9, 2.1]}
    assert pick([default, peer, fast, faster_but_unsure]) == "attn32x64w2"
    assert pick([default, peer, faster_but_unsure]) == ""
    # a tile whose output is wrong (NaN, or far from the default's) is never picked, however fast
    nan = {**fast, "name": "32x0w2", "tile": [32, 0, 2], "speedup": 3.0, "max_abs_diff": float("nan")}
    off = {**fast, "name": "16x64w1", "tile": [16, 64, 1], "speedup": 1.6, "max_abs_diff": 0.5}
    assert pick([default, peer, fast, nan, off]) == "attn32x64w2"
    assert pick([default, nan, off]) == ""


def test_ncu_source_summarizes_stall_samples_per_instruction(tmp_path):
    """ncu_source.py (w4g.sh's gemv_ncu and attn_ncu stages) on an export shaped as Nsight Compute writes it (a
    kernel-name line, then the per-instruction table): the instructions by share of samples, the shares by opcode
    (predicate dropped) and by stall reason; exit 1 with the file's first lines where it has no sample column, 2
    where it cannot be read."""
    import sys

    def run(path):
        return subprocess.run([sys.executable, str(GPU / "ncu_source.py"), str(path), "--top", "2"],
                              capture_output=True, text=True)

    (tmp_path / "src.csv").write_text(
        '"Kernel Name","void k(int)",\n'
        '"Address","Source","Warp Stall Sampling (All Samples)","Warp Stall Sampling (Not-issued Samples)",'
        '"stall_long_sb","stall_barrier"\n'
        '"0x10","LDG.E.128 R4, desc[UR4][R2.64]","10","8","0","0"\n'
        '"0x20","@P0 HFMA2 R1, R2, R3, R4","30","20","25","0"\n'
        '"0x30","BAR.SYNC.DEFER_BLOCKING 0x0","1,060","60","0","60"\n')
    out = run(tmp_path / "src.csv")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "3 instructions, 1100 warp-stall samples"
    assert "0x30" in lines[2] and "96.4 %" in lines[2] and "0x20" in lines[3] and len(lines) == 6
    assert lines[4] == "by opcode: BAR 96.4 %, HFMA2 2.7 %, LDG 0.9 %"
    assert lines[5] == "by stall reason: stall_barrier 5.5 %, stall_long_sb 2.3 %"
    (tmp_path / "other.csv").write_text("no table here\n")
    bad = run(tmp_path / "other.csv")
    assert bad.returncode == 1 and "no table here" in bad.stderr and bad.stdout == ""
    assert run(tmp_path / "missing.csv").returncode == 2


def test_extension_builds_go_out_with_one_call_and_in_with_the_next(tmp_path):
    """ext_save returns each build a call made (the GEMVs' and CUTLASS's, in their own key folders), not one the call
    carried in; ext_restore puts the carried ones where cuda_ext.load looks."""
    cache, out = tmp_path / "cache", tmp_path / "out"
    for key, name in (("k1", "quant_cuda_gemv.so"), ("k1-sm90a-cutlass", "quant_cuda_cutlass.so"),
                      ("old", "quant_cuda_gemv.so")):
        (cache / "torch-extensions" / key).mkdir(parents=True, exist_ok=True)
        (cache / "torch-extensions" / key / name).write_bytes(key.encode())
    (tmp_path / ".ext" / "old").mkdir(parents=True)  # carried in by this call: not sent back
    (tmp_path / ".ext" / "old" / "quant_cuda_gemv.so").write_bytes(b"old")
    _carry("ext_save", tmp_path, QUANT_SUITE_CACHE=cache, OUT=out)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.so")) == [
        "ext/k1-sm90a-cutlass/quant_cuda_cutlass.so", "ext/k1/quant_cuda_gemv.so"]
    nxt = tmp_path / "next"
    shutil.copytree(out / "ext", nxt / ".ext")
    _carry("ext_restore", nxt, QUANT_SUITE_CACHE=tmp_path / "cache2")
    assert (tmp_path / "cache2" / "torch-extensions" / "k1-sm90a-cutlass" / "quant_cuda_cutlass.so").read_bytes() \
        == b"k1-sm90a-cutlass"
