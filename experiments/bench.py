"""``python -m experiments.bench``: the PyTorch runtime's CUDA path per recipe against FP16 and peers, interleaved.

For a random-weight LLaMa of a given shape (default LLaMa-2-7B: hidden 4096, 32 layers, 32/32 heads, intermediate
11008, vocab 32000; also Llama-3-8B), built directly in each TRT-LLM checkpoint layout on the GPU
(:mod:`quant.runtime.random_checkpoint`), and each recipe, batch size and input length: TTFT (prefill + first
token), time per output token (median of a generate's CUDA-event step times), peak GPU memory, and the achieved
bandwidth of a decode step (weight bytes + KV bytes read at the mean context, over the step time) as a fraction
of the card's device-to-device copy bandwidth measured in the same run.

Ratios to FP16 come from one run, interleaved: the project's FP16 runtime stays built, every other engine is
built in turn and, per (input, batch) cell, timed in ``--rounds`` rounds beside it (their order alternating);
the speed-up is FP16's time over the engine's, paired by round, with its 95 % t interval (of the mean log
ratio). FP16's own row pools its rounds of every pairing. Peers (``--peers``, :mod:`experiments.peers`: HF static
cache + ``torch.compile``, torchao, GemLite) are timed the same way, at ``--peer-batch-sizes``, each by default in a
process of its own beside its own build of the project's FP16 (``--peer-process own``): a library's process-wide
compiler settings or a fault that loses the CUDA context then reach neither the other peers nor the project's
engines (both happened on an H200). A peer's speed-up is then over that FP16, and the project-vs-peer ratio of a
format is the quotient of the two speed-ups, its interval bounded by the quotient of their intervals' ends.
HF ``generate`` (eager attention) is the slow baseline of the FP16 speed-up target. Prints a Markdown table, the
batch from which INT4 is slower than FP16, and the targets; writes JSON after each engine (a run cut short keeps what
it measured).

Recipes are those of :mod:`quant.runtime.random_checkpoint`; ``int4_awq@VARIANT`` picks W4A16 kernels other than the
default (:data:`KERNEL_VARIANTS`; targets take a recipe's best variant, over ``fp16@VARIANT`` where that was run too).
``--profile`` adds, per recipe, the device time of each kernel in one batch-1 decode step and in the prefill (eager,
from the PyTorch profiler) — where the time goes.

``--sweep`` times the per-format linear kernels alone on ``--shape``'s layer shapes (configs, alternatives) instead.
Its ``do_bench`` times include the host's launch of each call, which for kernels of 10–50 µs (Triton's Python
launcher especially) is most of it: use it to compare large-M kernels, and ``--profile`` for decode kernels.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from experiments.environment import machine, versions
from experiments.latency import synthetic_prompts
from experiments.peers import PEERS, HFPeer, hf_config
from experiments.stats import ratio_ci
from quant.errors import ArgumentParser, UserError, cli_entry, positive_int, seed_int
from quant.hardware import FP8_GEMM_ALGOS, fp8_refusal
from quant.runtime.linear import make_linear
from quant.runtime.random_checkpoint import RECIPES, SHAPES, _quantize, random_checkpoint, random_config
from quant.runtime.schemes.base import ALGO_KEYS, CARD_KERNELS, DEFAULT_KERNELS, INT4_KERNELS, card_kernels
from quant.runtime.torch_runtime import TorchRuntime, check_cuda

# What the benchmark reports against: decode speed-up over the project's FP16 at batch 1 (a quarter of FP16's
# weight bytes allows INT4 ~3x, a half allows 8-bit ~1.9x, at the same fraction of bandwidth)
TARGETS = {"int8_wo": 1.75, "int4_awq": 2.6, "fp8": 1.75, "smoothquant": 1.75}
# TTFT speed-up over FP16 at the longest input, batch 1: the activation-quantized formats faster, the weight-only
# ones no slower
PREFILL_TARGETS = {"smoothquant": 1.5, "fp8": 1.5, "int8_wo": 1.0, "int4_awq": 1.0}
FP16_ROOFLINE_TARGET = 0.88
HF_SPEEDUP_TARGET = 15.0
INT4_BATCH_FLOOR = (4, 8, 16)  # INT4 never slower than FP16 at these batches
PEER_TARGET = 1.5  # each format at batch 1 over the best peer row of that format


class Budget:
    """``--budget``: the whole command's wall-clock seconds (None: no limit). No engine or peer starts with less
    than START_S left (a project recipe takes ~30-40 s at five batch sizes on an H100, a peer's compile minutes),
    a peer's own process is stopped when it runs out, and END_S is kept for the table and the record."""

    START_S, END_S = 60, 15

    def __init__(self, seconds: int | None, clock=time.monotonic):
        self.seconds, self.clock, self.started = seconds, clock, clock()

    def left(self) -> float:
        if self.seconds is None:
            return float("inf")
        return self.seconds - self.END_S - (self.clock() - self.started)

    def refusal(self) -> str | None:
        """Why nothing more may start (None: it may)."""
        left = self.left()
        if left >= self.START_S:
            return None
        return f"not started: {max(0.0, left):.0f} s of --budget {self.seconds} s left"

    def peer_limit(self, peer_timeout: int) -> tuple[float, str]:
        """(seconds, the flag that set them) a peer's process may take."""
        return min((float(peer_timeout), "--peer-timeout"), (self.left(), "--budget"))


def _ints(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x]
    except ValueError:
        raise UserError(f"expected a comma-separated list of integers, got {text!r}") from None
    if not out or any(x <= 0 for x in out):
        raise UserError(f"expected positive integers, got {text!r}")
    return out


def environment(device: torch.device) -> dict:
    info = {"machine": machine(), "versions": versions()}
    try:
        import triton

        info["versions"]["triton"] = triton.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                       "memory_gib": round(props.total_memory / 2**30, 1), "sms": props.multi_processor_count,
                       "cuda": torch.version.cuda, "card_kernels": card_kernels(device)[0]}
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,clocks.max.mem",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            info["gpu"]["nvidia_smi"] = out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return info


def copy_bandwidth(device: torch.device, nbytes: int = 4 << 30, reps: int = 20) -> dict:
    """Device-to-device copy of ``nbytes`` (random bytes), counting bytes read + written; median of ``reps``."""
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    t = statistics.median(times)
    assert torch.equal(dst[:4096], src[:4096])
    del src, dst
    torch.cuda.empty_cache()
    return {"bytes": nbytes, "median_s": t, "gbs": 2 * nbytes / t / 1e9, "min_s": min(times), "max_s": max(times)}


# recipe@VARIANT → what it changes in KernelConfig: one W4A16 kernel for 1–64 rows without the compiled GEMV
# (``kpack``: the default before the GEMV took batch 1), the GEMV with the pre-quant scale in act_prep, the
# k-packed tensor-core kernel at 2–16 rows instead of 2–64 (``int4_awq@w4k16``), or the
# 8-bit formats' batch 1 on the Triton GEMV instead of the compiled one (``int8_wo@triton8``, ``fp8@triton8``, …),
# or the weight-only prefill through the tl.dot kernel (``int8_wo@wqprefill``, ``int4_awq@wqprefill``) or CUTLASS's
# mixed-input GEMM (``@wqcutlass``; on cuda_ext.WQ_GEMM_TILES[T], at most M rows: ``@wqcutlassT[mM]``), or their
# default prefill with each weight's float16 copy written on a second stream during the GEMM before (``@wqahead``;
# two linears ahead: ``@wqahead2``), or W8A16's 2–64-row tl.dot kernel on Triton's int8 conversion and 32-channel
# tiles (``int8_wo@wqplain``), or converting by byte permute on those tiles (``int8_wo@wqnarrow``), or both int8
# formats on the wide tiles with K split
# (``smoothquant@wqwide``; the default takes them for W8A16 only), or decode
# attention at every batch combining its splits in its last program (``@attnreduce``), doing RoPE + the cache write
# itself (``@attnrope``), or both (``fp16@attnfused``; the default does both at batch 1 only), or neither at any
# batch (``@attnsplit``: a reduce launch and a RoPE launch per layer), or its split kernel launched with programmatic
# dependent launch behind every format's qkv linear (``@attnpdl``) or none (``@noattnpdl``; the default: INT4's), or
# batch 1 with each linear's epilogue doing
# the next one's RMSNorm, SiLU·gate and activation quantization (the default) or not (``fp16@nothen``, …: an act_prep
# launch before each linear that needs one), or INT4's batch-1 GEMV in its one-block-per-row-block form on tiles of
# (2, 4) (``int4_awq@now4gp``; the default is its persistent form on (4, 1)), or persistent on (2, 4) or (2, 2)
# (``@w4gp24``, ``@w4gp22``),
# or the 8-bit formats' GEMV persistent (``@w8gp``), or the persistent GEMVs (the 8-bit ones made persistent) launched
# with programmatic dependent launch (``@pdl``), or the previous GEMV's RMSNorm tail in place of INT4's batch-1 GEMV
# normalizing its own input (``int4_awq@nonormpro``), or the 8-bit formats' batch-1 GEMVs normalizing theirs
# (``int8_wo@w8normpro``; persistent for those calls) and attention launched with PDL behind that qkv GEMV, which
# lets it start early as INT4's does (``@w8normpdl``),
# or INT4 on the tensor-core kernel (csrc/w4a16_mma.cu) at 1–32 rows (``int4_awq@w4m``; the default takes it at
# 2–16), at batch 1 only (``@w4m1``), at 1–8 rows with 8 steps loaded ahead per warp (``@w4m8``), or not at all
# (``@now4m``: rows 2–64 on the k-packed kernel, the default before), or the 8-bit formats' batch 1 on their
# tensor-core kernel (csrc/w8_mma.cu; ``int8_wo@w8m``, with 4 steps ahead ``@w8m4``), or INT4's prefill from the
# stored layout, kept beside the k-packed copy (``int4_awq@nokprefill``; the default dequantizes the k-packed copy),
# or INT4's pre-quant staging loads issued four units a thread at a time, as nvcc does the plain loop
# (``int4_awq@now4gsb``; the default issues eight),
# or prefill's tl.dot GEMM taking its output tiles in the plain order (``smoothquant@nopg``; the default groups them
# by 8 tiles of x's rows), or SmoothQuant's prefill through cuBLASLt (``@sqintmm``) or on another tile
# (``@sqpBMxBRxBKwWsS``, in the plain order; ``g8`` after it: grouped) or on the persistent TMA GEMM (``@sqtma``;
# on another tile, grouped: ``@sqtmaBMxBRxBKwWsS``) or CUTLASS's int8 GEMM (``@sqcutlass``), or FP8's prefill with
# cuBLASLt's fast accumulation (``fp8@fastacc``), or prefill's RoPE and cache write in torch ops
# (``fp16@noprerope``; the default: one kernel),
# or KernelConfig's defaults where this card's CARD_KERNELS entry changes them (``int8_wo@nocard``). Every variant
# changes the card's defaults (schemes.base.card_kernels), which the unadorned recipe runs.
KERNEL_VARIANTS = {**{k: {"int4_kernel": k, "w4g_rows": None, "w4m_rows": None} for k in INT4_KERNELS},
                   "w4g-unfused": {"w4g_fuse": False}, "w4k16": {"w4k_rows": (2, 16)},
                   "triton8": {"w8g": frozenset()},
                   "wqprefill": {"wq_prefill": frozenset({"W8A16", "W4A16_AWQ"})},
                   "wqtma": {"wq_prefill": frozenset({"W8A16", "W4A16_AWQ"}), "wq_prefill_tma": True},
                   "wqcutlass": {"wq_prefill_cutlass": frozenset({"W8A16", "W4A16_AWQ"})},
                   "wqahead": {"wq_prefill_ahead": frozenset({"W8A16", "W4A16_AWQ"})},
                   "wqahead2": {"wq_prefill_ahead": frozenset({"W8A16", "W4A16_AWQ"}), "wq_ahead_depth": 2},
                   "wqplain": {"wq_cvt": False, "wq_wide": frozenset()}, "wqnarrow": {"wq_wide": frozenset()},
                   "wqwide": {"wq_cvt": True, "wq_wide": frozenset({"W8A16", "W8A8_SQ_PER_CHANNEL"})},
                   "attnreduce": {"attn_rope_fused": False, "attn_fused_batch": None},
                   "attnrope": {"attn_fused_reduce": False, "attn_fused_batch": None},
                   "attnfused": {"attn_fused_batch": None},
                   "attnsplit": {"attn_fused_reduce": False, "attn_rope_fused": False},
                   "noattnpdl": {"attn_pdl": frozenset()}, "attnpdl": {"attn_pdl": frozenset(ALGO_KEYS)},
                   "nothen": {"gemv_then": False}, "now4gp": {"w4g_persistent": False, "w4g_tile": (2, 4)},
                   "w4gp24": {"w4g_tile": (2, 4)}, "w4gp22": {"w4g_tile": (2, 2)},
                   "w8gp": {"w8g_persistent": DEFAULT_KERNELS.w8g},
                   "pdl": {"w8g_persistent": DEFAULT_KERNELS.w8g, "gemv_pdl": DEFAULT_KERNELS.w8g | {"W4A16_AWQ"}},
                   "nonormpro": {"norm_prologue": frozenset()},
                   "w8normpro": {"norm_prologue": DEFAULT_KERNELS.norm_prologue | DEFAULT_KERNELS.w8g},
                   "w8normpdl": {"norm_prologue": DEFAULT_KERNELS.norm_prologue | DEFAULT_KERNELS.w8g,
                                 "attn_pdl": DEFAULT_KERNELS.attn_pdl | DEFAULT_KERNELS.w8g},
                   "w4m": {"w4m_rows": (1, 32)},
                   "w4m1": {"w4m_rows": (1, 1)}, "w4m8": {"w4m_rows": (1, 8), "w4m_depth": 8},
                   "now4m": {"w4m_rows": None},
                   "w8m": {"w8m": DEFAULT_KERNELS.w8g}, "w8m4": {"w8m": DEFAULT_KERNELS.w8g, "w8m_depth": 4},
                   "nokprefill": {"w4k_prefill": False}, "now4gsb": {"w4g_stage_batch": False},
                   "nopg": {"prefill_group": 0}, "sqintmm": {"sq_prefill_gemm": "int_mm"},
                   "sqtma": {"sq_prefill_gemm": "tma"}, "sqcutlass": {"sq_prefill_gemm": "cutlass"},
                   "fastacc": {"fp8_fast_accum": True}, "noprerope": {"prefill_rope": False},
                   "nocard": {f: getattr(DEFAULT_KERNELS, f) for _, fields in CARD_KERNELS for f in fields}}
# ``@attnBxSwW``: decode attention's split kernel on the tile (B keys a loop step, S keys a split, W warps;
# KernelConfig.attn_tile), e.g. ``fp16@attn32x64w2``
_ATTN_TILE_VARIANT = re.compile(r"attn(\d+)x(\d+)w(\d+)")
# ``@sqpBMxBRxBKwWsS[gG]``: SmoothQuant's prefill GEMM on that tile (KernelConfig.sq_prefill_tile), its output tiles
# in groups of G tiles of x's rows (prefill_group), e.g. ``smoothquant@sqp128x256x128w8s3g8``
_SQ_TILE_VARIANT = re.compile(r"sqp(\d+)x(\d+)x(\d+)w(\d+)s(\d+)(?:g(\d+))?")
# ``@sqtmaBMxBNxBKwWsS``: SmoothQuant's prefill on the persistent TMA GEMM (sq_prefill_gemm "tma") on that tile,
# grouped as the default (prefill_group), e.g. ``smoothquant@sqtma128x256x128w8s3``
_SQ_TMA_VARIANT = re.compile(r"sqtma(\d+)x(\d+)x(\d+)w(\d+)s(\d+)")
# ``@wqtBRxBMxBKwWsS``: the weight-only formats' prefill through cuda_kernels.wq_prefill_mm (KernelConfig.wq_prefill)
# on that tile (wq_prefill_tile), e.g. ``int8_wo@wqt128x128x64w4s4``; ``@wqtmaBRxBMxBKwWsS``: its persistent TMA form
_WQ_TILE_VARIANT = re.compile(r"wqt(ma)?(\d+)x(\d+)x(\d+)w(\d+)s(\d+)")
_WQ_CUTLASS_VARIANT = re.compile(r"wqcutlass(\d)(?:m(\d+))?")


def kernel_variant(name: str) -> dict:
    """The KernelConfig fields a variant name changes (KERNEL_VARIANTS, or an ``attnBxSwW`` / ``sqp…`` / ``sqtma…`` /
    ``wqt…`` / ``wqtma…`` / ``wqcutlassT[mM]`` tile); KeyError if it names none. The tile's own limits are
    KernelConfig's to check."""
    if m := _ATTN_TILE_VARIANT.fullmatch(name):
        return {"attn_tile": tuple(int(g) for g in m.groups())}
    if m := _SQ_TILE_VARIANT.fullmatch(name):
        return {"sq_prefill_tile": tuple(int(g) for g in m.groups()[:5]), "prefill_group": int(m.group(6) or 0)}
    if m := _SQ_TMA_VARIANT.fullmatch(name):
        return {"sq_prefill_gemm": "tma", "sq_prefill_tile": tuple(int(g) for g in m.groups())}
    if m := _WQ_TILE_VARIANT.fullmatch(name):
        return {**KERNEL_VARIANTS["wqtma" if m.group(1) else "wqprefill"],
                "wq_prefill_tile": tuple(int(g) for g in m.groups()[1:])}
    if m := _WQ_CUTLASS_VARIANT.fullmatch(name):
        return {**KERNEL_VARIANTS["wqcutlass"], "wq_cutlass_tile": int(m.group(1)),
                "wq_cutlass_max_m": m.group(2) and int(m.group(2))}
    return KERNEL_VARIANTS[name]


def known_variant(name: str) -> bool:
    """Whether ``name`` is a variant KernelConfig takes (the empty name: none, the defaults)."""
    try:
        return not name or bool(dataclasses.replace(DEFAULT_KERNELS, **kernel_variant(name)))
    except (KeyError, ValueError):
        return False


def build_runtime(shape: str, recipe: str, device: torch.device, dtype: str, seed: int, group: int = 128):
    """``recipe`` may carry ``@VARIANT``, a kernel choice of :data:`KERNEL_VARIANTS` (default: KernelConfig's)."""
    name, _, kernel = recipe.partition("@")
    algo, kv = RECIPES[name]
    ckpt = random_checkpoint(random_config(shape, algo, kv, group_size=group), device=device, seed=seed,
                             path=f"<random {shape} {name}>")
    kernels = dataclasses.replace(card_kernels(device)[1], **kernel_variant(kernel)) if kernel else None
    try:
        rt = TorchRuntime(ckpt, device=device, compute_dtype=dtype, kernels=kernels)
    finally:
        ckpt.tensors.clear()
    torch.cuda.empty_cache()
    return rt


def profile_decode(rt, prompts: list[list[int]], steps: int = 4, top: int = 14) -> dict:
    """Per-kernel device time of one decode step, eager (no graph: the kernels are the graph's): a profile of
    prefill + ``steps`` decode steps minus one of the prefill alone, per kernel name, divided by ``steps``; and
    (``prefill``) that of the prefill alone (with its first token's step: TTFT's kernels)."""
    from torch.profiler import ProfilerActivity, profile

    def kernels(n: int) -> tuple[dict, list[float]]:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            gen = rt.generate(prompts, n, ignore_eos=True)
            torch.cuda.synchronize()
        out = {}
        for ev in prof.key_averages():
            t = getattr(ev, "device_time_total", None)
            if t is None:
                t = getattr(ev, "cuda_time_total", 0)
            if t > 0 and ev.device_type == torch.autograd.DeviceType.CUDA:
                c, tt = out.get(ev.key, (0, 0.0))
                out[ev.key] = (c + ev.count, tt + t)
        return out, gen.step_s

    rt.cuda_graphs = False
    try:
        rt.generate(prompts, 2, ignore_eos=True)
        pre, _ = kernels(1)
        full, eager_steps = kernels(steps + 1)
    finally:
        rt.cuda_graphs = True
    rows = []
    for k, (c, t) in full.items():
        c0, t0 = pre.get(k, (0, 0.0))
        if c - c0 > 0:
            rows.append({"kernel": k[:120], "calls_per_step": (c - c0) / steps, "us_per_step": (t - t0) / steps})
    rows.sort(key=lambda r: -r["us_per_step"])
    first = sorted(({"kernel": k[:120], "calls": c, "us": t} for k, (c, t) in pre.items()), key=lambda r: -r["us"])
    return {"prefill": {"kernel_us": sum(r["us"] for r in first), "launches": sum(r["calls"] for r in first),
                        "top": first[:top]},
            "steps": steps, "eager_step_ms": [x * 1e3 for x in eager_steps],
            "kernel_us_per_step": sum(r["us_per_step"] for r in rows),
            "launches_per_step": sum(r["calls_per_step"] for r in rows), "top": rows[:top]}


def resident(build):
    """``build()`` and the device memory its result holds (measured around the build)."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    engine = build()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return engine, torch.cuda.memory_allocated() - base


def time_cell(engines: list, prompts: list[list[int]], output_len: int, rounds: int) -> list[dict]:
    """Per engine: TTFT and median time per output token of each round, the engines timed in turn within each round
    and their order rotated from round to round (interleaved: the machine's drift falls on all of them alike), and
    the device memory its warm-up added (KV cache, buffers, graph) over what the others held."""
    out = []
    for e in engines:
        e.free_decode_state()  # the previous cell's: its memory would hide this cell's from the peak below
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        e.generate(prompts, output_len, ignore_eos=True)  # warm-up: compiles, allocates, captures the graph
        torch.cuda.synchronize()
        out.append({"ttft": [], "tpot": [], "extra_bytes": torch.cuda.max_memory_allocated() - base})
    order = list(range(len(engines)))
    for r in range(rounds):
        k = r % len(engines)
        for i in order[k:] + order[:k]:
            g = engines[i].generate(prompts, output_len, ignore_eos=True)
            out[i]["ttft"].append(g.ttft_s)
            out[i]["tpot"].append(statistics.median(g.step_s))
    return out


def cell_row(engine: str, recipe: str, e, P: int, B: int, output_len: int, t: dict, held: int, copy_gbs: float,
             ref: dict | None) -> dict:
    """One row: medians over the rounds and, against the FP16 reference timed in the same rounds, the speed-ups
    (reference time / this time, paired by round) with their 95 % intervals."""
    t_step, ttft = statistics.median(t["tpot"]), statistics.median(t["ttft"])
    kv_bytes = 2 * e.n_layers * B * e.n_kv * (P + output_len / 2) * e.head_dim * (1 if e.kv_algo else 2)
    step_bytes = e.weight_bytes + kv_bytes
    row = {"engine": engine, "recipe": recipe, "batch_size": B, "input_len": P, "output_len": output_len,
           "rounds": len(t["tpot"]), "ttft_ms": ttft * 1e3, "ttft_ms_spread": (max(t["ttft"]) - min(t["ttft"])) * 1e3,
           "tpot_ms": t_step * 1e3, "tpot_ms_spread": (max(t["tpot"]) - min(t["tpot"])) * 1e3,
           "decode_tok_s": B / t_step, "prefill_tok_s": B * P / ttft,
           "peak_memory_gib": (held + t["extra_bytes"]) / 2**30, "weight_bytes": e.weight_bytes,
           "kv_bytes_per_step": kv_bytes, "achieved_gbs": step_bytes / t_step / 1e9,
           "roofline_fraction": step_bytes / t_step / 1e9 / copy_gbs}
    if ref is not None and len(t["tpot"]) > 1:
        for key, name in (("tpot", "speedup"), ("ttft", "ttft_speedup")):
            q = ratio_ci(t[key], ref[key])  # this / reference time: its inverse is the speed-up
            row[name], row[name + "_ci"] = 1 / q.ratio, [1 / q.high, 1 / q.low]
    return row


def bench_hf(shape: str, batch_sizes: list[int], input_lens: list[int], output_len: int, repeats: int,
             device: torch.device, log) -> list[dict]:
    """HF ``generate``, eager attention, fp16 random weights of the same shape. TTFT = a 1-token generate;
    time per output token = (full − 1-token) / (output_len − 1), as experiments/bench_runtime.py measures it."""
    from transformers import LlamaForCausalLM

    d = SHAPES[shape]
    config = hf_config(shape)
    config._attn_implementation = "eager"
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(old)
    model.config._attn_implementation = "eager"
    rows = []

    def run(ids, n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    for P in input_lens:
        for B in batch_sizes:
            ids = torch.tensor(synthetic_prompts(B, P, d["vocab_size"], seed=0), device=device)
            run(ids, 2)
            torch.cuda.reset_peak_memory_stats(device)
            first = [run(ids, 1) for _ in range(repeats)]
            full = [run(ids, output_len) for _ in range(repeats)]
            ttft, tot = statistics.median(first), statistics.median(full)
            tpot = (tot - ttft) / (output_len - 1)
            row = {"engine": "hf-generate-eager", "recipe": "fp16", "batch_size": B, "input_len": P,
                   "output_len": output_len, "ttft_ms": ttft * 1e3, "tpot_ms": tpot * 1e3, "decode_tok_s": B / tpot,
                   "prefill_tok_s": B * P / ttft, "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30}
            rows.append(row)
            log(f"{'hf-generate (eager)':20s} B={B:<3d} in={P:<5d} TTFT {row['ttft_ms']:8.1f} ms  TPOT "
                f"{row['tpot_ms']:7.3f} ms  {row['decode_tok_s']:8.1f} tok/s")
    del model
    torch.cuda.empty_cache()
    return rows


def merge_peer(record: dict, child: dict, peer: str, end: str) -> list[dict]:
    """A peer's rows from the record its own process wrote (``child``, {} if none), marked ``process: own``; that
    process's FP16 rows go to ``record["peer_references"]``, its description to ``record["describe"]``, and a peer
    with no row to ``record["failed"]`` (its own reason, else how its process ended: ``end``)."""
    rows = [dict(r, process="own") for r in child.get("rows", []) if r["engine"] == peer]
    record["peer_references"][peer] = [r for r in child.get("rows", []) if r["engine"] == "quant-runtime"]
    if peer in child.get("describe", {}):
        record["describe"][peer] = child["describe"][peer]
    if not rows:
        record["failed"][peer] = child.get("failed", {}).get(peer) or f"its process ended ({end}) with no row"
    return rows


def same_variant_fp16(rows: list[dict]) -> list[dict]:
    """``rows`` with each quantized ``recipe@kernel`` row's speed-ups taken over ``fp16@kernel`` where that row was
    measured at the same batch and input (both over FP16, so the quotient; its interval from the two intervals'
    ends, as a peer's): a kernel variant that speeds FP16 as much (the prefill's RoPE, say) is not the format's
    gain. A row so divided names its divisor in ``over``."""
    fp16 = {(r["engine"], r["recipe"].partition("@")[2], r["batch_size"], r["input_len"]): r for r in rows
            if r["recipe"].partition("@")[0] == "fp16"}
    out = []
    for r in rows:
        recipe, _, kernel = r["recipe"].partition("@")
        f = fp16.get((r["engine"], kernel, r["batch_size"], r["input_len"])) if kernel and recipe != "fp16" else None
        if f is not None:
            r = {**r, "over": f["recipe"]}
            for key in ("speedup", "ttft_speedup"):
                if key in r and key in f:
                    (lo, hi), (flo, fhi) = r[key + "_ci"], f[key + "_ci"]
                    r[key], r[key + "_ci"] = r[key] / f[key], [lo / fhi, hi / flo]
        out.append(r)
    return out


def targets(rows: list[dict]) -> list[dict]:
    """The issue's targets, from the rows of this run: speed-ups over FP16 from interleaved rounds (with the
    interval's low end beside the point value), batch 1 unless a target names its batch. A recipe's best kernel
    variant counts, over FP16 with the same variant where that was measured (:func:`same_variant_fp16`); each
    target names the row it took (``row``, and ``over`` where the FP16 was a variant)."""
    raw, rows = rows, same_variant_fp16(rows)

    def best(engine, recipe, P, B=1, by="speedup", among=None):
        """A recipe's row at (P, B); of its kernel variants (recipe@kernel) the one with the highest ``by``."""
        cands = [r for r in (among or rows) if r["engine"] == engine and r["recipe"].partition("@")[0] == recipe
                 and r["batch_size"] == B and r["input_len"] == P]
        return max(cands, key=lambda r: r.get(by, 0.0)) if cands else None

    out = []

    def add(target, measured, required, low=None, row=None):
        out.append({"target": target, "measured": measured, "required": required, "ci_low": low,
                    "row": row["recipe"] if row else None, "over": row.get("over", "fp16") if row else None})

    lens = sorted({r["input_len"] for r in rows if r["engine"] == "quant-runtime"})
    for P in lens:
        if f := best("quant-runtime", "fp16", P):
            add(f"fp16 b1 decode, in {P}: fraction of copy-bandwidth roofline", f["roofline_fraction"],
                FP16_ROOFLINE_TARGET, row={"recipe": f["recipe"], "over": "copy bandwidth"})
            if hf := best("hf-generate-eager", "fp16", P):
                add(f"fp16 b1 decode, in {P}: × HF eager generate", f["decode_tok_s"] / hf["decode_tok_s"],
                    HF_SPEEDUP_TARGET)
        for recipe, need in TARGETS.items():
            if (r := best("quant-runtime", recipe, P)) and "speedup" in r:
                add(f"{recipe} b1 decode, in {P}: × fp16", r["speedup"], need, r["speedup_ci"][0], r)
        for B in INT4_BATCH_FLOOR:
            if (r := best("quant-runtime", "int4_awq", P, B)) and "speedup" in r:
                add(f"int4_awq b{B} decode, in {P}: × fp16", r["speedup"], 1.0, r["speedup_ci"][0], r)
        # a peer whose CUDA graphs inductor skipped is not on its fast path: no target against it
        for peer in sorted({r["engine"] for r in rows if r["engine"] in PEERS and not r.get("cuda_graph_skips")}):
            # FP16 is the reference itself: 1× exactly, and the quotient's interval is the peer's alone. Both over
            # the same FP16 (the peer's reference): our rows undivided
            ours = ({"speedup": 1.0, "speedup_ci": [1.0, 1.0]} if PEERS[peer].recipe == "fp16"
                    else best("quant-runtime", PEERS[peer].recipe, P, among=raw))
            theirs = best(peer, PEERS[peer].recipe, P)
            if ours and theirs and "speedup" in ours and "speedup" in theirs:
                add(f"{PEERS[peer].recipe} b1 decode, in {P}: × {peer} (both over fp16)",
                    ours["speedup"] / theirs["speedup"], PEER_TARGET, ours["speedup_ci"][0] / theirs["speedup_ci"][1])
    if lens:
        P = max(lens)
        for recipe, need in PREFILL_TARGETS.items():
            if (r := best("quant-runtime", recipe, P, by="ttft_speedup")) and "ttft_speedup" in r:
                add(f"{recipe} b1 prefill (TTFT), in {P}: × fp16", r["ttft_speedup"], need, r["ttft_speedup_ci"][0],
                    r)
    for t in out:
        t["met"] = t["measured"] >= t["required"]
        t["shortfall"] = 0.0 if t["met"] else 1 - t["measured"] / t["required"]
    return out


def crossover(rows: list[dict], recipe: str = "int4_awq") -> dict:
    """Per input length, the smallest batch at which ``recipe``'s best variant is slower than FP16 (its speed-up's
    interval wholly below 1; over FP16 with the same variant where measured), or None where it never is among the
    batches measured."""
    out = {}
    rows = same_variant_fp16(rows)
    for P in sorted({r["input_len"] for r in rows if r["recipe"].partition("@")[0] == recipe}):
        by_batch = {}
        for r in rows:
            if r["engine"] == "quant-runtime" and r["recipe"].partition("@")[0] == recipe and r["input_len"] == P \
                    and "speedup" in r:
                by_batch[r["batch_size"]] = max(by_batch.get(r["batch_size"], 0.0), r["speedup_ci"][1])
        out[P] = next((B for B in sorted(by_batch) if by_batch[B] < 1.0), None)
    return out


def table(rows: list[dict], tgts: list[dict], copy: dict | None) -> str:
    def ci(r, key):
        return f"{r[key]:.2f} [{r[key + '_ci'][0]:.2f}, {r[key + '_ci'][1]:.2f}]" if key in r else "–"

    lines = ["| engine | recipe | batch | input | TTFT ms | TPOT ms | × fp16 decode [95 % CI] | × fp16 TTFT | "
             "decode tok/s | achieved GB/s | of copy BW | peak GiB |", "|" + "---|" * 12]
    for r in rows:
        bw = f"{r['achieved_gbs']:.0f}" if "achieved_gbs" in r else "–"
        frac = f"{r['roofline_fraction']:.0%}" if "roofline_fraction" in r else "–"
        engine = (r["engine"] + (" ¹" if r.get("process") == "own" else "")
                  + (" ²" if r.get("cuda_graph_skips") else ""))
        lines.append(f"| {engine} | {r['recipe']} | {r['batch_size']} | {r['input_len']} | {r['ttft_ms']:.1f} "
                     f"| {r['tpot_ms']:.3f} | {ci(r, 'speedup')} | {ci(r, 'ttft_speedup')} | {r['decode_tok_s']:.1f} "
                     f"| {bw} | {frac} | {r['peak_memory_gib']:.1f} |")
    notes = (["¹ timed in a process of its own: its × fp16 is over the project's FP16 built and timed there"]
             if any(r.get("process") == "own" for r in rows) else []) + (
        ["² inductor did not capture its decode step as a CUDA graph (reason in its log): not its fast path, so no "
         "target is taken against it"] if any(r.get("cuda_graph_skips") for r in rows) else [])
    if notes:
        lines.append("\n" + "\n".join(notes))
    if copy:
        lines.append(f"\ncopy bandwidth (device to device, read + write): {copy['gbs']:.0f} GB/s")
    cross = crossover(rows)
    if cross:
        lines.append("int4_awq slower than fp16 (interval below 1) from batch: " + ", ".join(
            f"input {P}: {B if B else 'never, among those measured'}" for P, B in cross.items()))
    if tgts:
        lines += ["", "| target | measured | interval low | required | met | short by | row / over |",
                  "|---|---|---|---|---|---|---|"]
        for t in tgts:
            short = "" if t["met"] else f"{t['shortfall']:.0%}"
            low = "–" if t["ci_low"] is None else f"{t['ci_low']:.2f}"
            src = f"{t['row']} / {t['over']}" if t.get("row") else "–"
            lines.append(f"| {t['target']} | {t['measured']:.2f} | {low} | {t['required']:.2f} | "
                         f"{'yes' if t['met'] else 'NO'} | {short} | {src} |")
    return "\n".join(lines)


# -- kernel sweep ----------------------------------------------------------------------------------------------------
GEMV_SWEEP = {  # (BLOCK_R, BLOCK_K, num_warps) of the batch-1 GEMV
    "fp16": [(2, 1024, 4), (4, 1024, 4), (4, 2048, 8), (8, 512, 4), (2, 2048, 4)],
    "W8A16": [(4, 1024, 4), (8, 1024, 4), (2, 2048, 4), (4, 2048, 8), (8, 512, 4), (16, 512, 4)],
    "FP8": [(4, 1024, 4), (8, 1024, 4), (2, 2048, 4), (8, 512, 4)],
    "W4A16_AWQ": [(2, 1024, 4), (4, 1024, 4), (4, 512, 4), (8, 512, 4), (2, 2048, 4), (8, 1024, 8)],
    "W8A8_SQ_PER_CHANNEL": [(4, 1024, 4), (8, 1024, 4), (2, 2048, 4), (8, 512, 4)],
}
WQ_SWEEP = [(16, 128, 4, 4), (16, 256, 4, 4), (32, 128, 4, 4), (32, 256, 4, 3), (16, 512, 4, 3), (64, 128, 4, 4)]
# SmoothQuant's prefill tiles (BM, BR, BK, warps, stages), each in both program orders (KernelConfig.prefill_group)
INT8_GEMM_SWEEP = [(128, 128, 64, 4, 4), (128, 128, 128, 8, 4), (128, 256, 128, 8, 3), (64, 128, 128, 4, 4),
                   (128, 256, 64, 8, 4), (256, 128, 64, 8, 4), (128, 128, 128, 4, 4), (128, 256, 128, 8, 4)]
# The weight-only prefill kernel's tiles (BLOCK_R stored rows, BLOCK_M, BLOCK_K, warps, stages), each in the plain
# order (g1) and grouped (g8), and on its persistent TMA form (grouped); INT4's BLOCK_K is cut to its group
WQ_PREFILL_SWEEP = [(128, 128, 64, 4, 4), (128, 128, 128, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3),
                    (64, 128, 64, 4, 4), (64, 256, 64, 4, 3), (128, 64, 64, 4, 4), (64, 128, 128, 4, 3)]
SWEEP_ALGOS = (None, "W8A16", "W4A16_AWQ", "FP8", "W8A8_SQ_PER_CHANNEL")


def sweep(device: torch.device, log, ms: list[int], shape: str = "llama2-7b",
          algos: tuple[str | None, ...] = SWEEP_ALGOS, variants: tuple[str, ...] = ()) -> list[dict]:
    """Each format's linear kernels alone on the layer shapes of ``shape``: Triton configs vs the library path.

    ``variants``: the row labels' starts to time (e.g. ``("auto", "cutlass")``); empty: every row. A row left out is
    neither compiled nor run, so a short device call times what it needs."""
    import triton

    from quant.runtime import cuda_ext
    from quant.runtime import cuda_kernels as ck
    from quant.runtime.random_checkpoint import SHAPES
    from quant.runtime.schemes.base import unpack_int4_rows

    c = SHAPES[shape]
    H, head = c["hidden_size"], c["hidden_size"] // c["num_attention_heads"]
    shapes = {"qkv": ((c["num_attention_heads"] + 2 * c["num_key_value_heads"]) * head, H), "dense": (H, H),
              "fc_gate": (2 * c["intermediate_size"], H), "proj": (H, c["intermediate_size"]),
              "lm_head": (c["vocab_size"], H)}
    wf = {None: ck.W_FLOAT, "W8A16": ck.W_INT8, "W4A16_AWQ": ck.W_INT4, "FP8": ck.W_FP8,
          "W8A8_SQ_PER_CHANNEL": ck.W_INT8}
    out = []
    gen = torch.Generator(device=device).manual_seed(0)

    def wanted(label: str) -> bool:
        return not variants or label.startswith(variants)

    def cutlass_rows(algo, name, M) -> bool:
        """Whether the CUTLASS rows are asked for and the CUTLASS build is there (else why not is logged); a row
        left out is not built."""
        if not wanted("cutlass"):
            return False
        if isinstance(built := cuda_ext.load_cutlass(), str):
            log(f"sweep {algo} {name} M={M} cutlass: {built}")
            return False
        return True

    def bench(label, fn, algo, name, N, K, M, nbytes):
        if not wanted(label):
            return
        try:
            t = triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median") * 1e-3
        except Exception as exc:  # a config that does not compile/run is reported, not fatal
            log(f"sweep {algo} {name} M={M} {label}: {type(exc).__name__}: {str(exc)[:300]}")
            return
        row = {"algo": algo or "fp16", "linear": name, "N": N, "K": K, "M": M, "variant": label, "us": t * 1e6,
               "gbs": nbytes / t / 1e9, "tflops": 2 * M * N * K / t / 1e12}
        out.append(row)
        log(f"sweep {row['algo']:20s} {name:8s} M={M:<5d} {label:28s} {row['us']:9.1f} us {row['gbs']:7.0f} GB/s "
            f"{row['tflops']:7.1f} TFLOP/s")

    for algo in algos:
        key = algo or "fp16"
        for name, (N, K) in shapes.items():
            if name == "lm_head" and algo is not None:
                continue
            t, h = _sweep_linear(algo, N, K, gen, device)
            nbytes = h.nbytes
            for M in ms:
                x = torch.randn(M, K, generator=gen, device=device).half()
                bench("auto", lambda: h.fused(x), algo, name, N, K, M, nbytes)
                if M == 1:  # the handler's kernel choice, varied as a value (h.kernels), restored after
                    base, k = h.kernels, h.algo_key
                    h.kernels = dataclasses.replace(base, gemv=base.gemv - {k})
                    bench("library/tl.dot", lambda: h.fused(x), algo, name, N, K, M, nbytes)
                    if algo in ("W8A16", "FP8"):  # the other weight conversion (PTX sequences vs bit moves)
                        other = 1 - ck.GEMV_CVT[wf[algo]]
                        h.kernels = dataclasses.replace(base, gemv_cvt=((k, other),))
                        bench(f"gemv cvt={other}", lambda: h.fused(x), algo, name, N, K, M, nbytes)
                    for cfg in GEMV_SWEEP[key]:
                        h.kernels = dataclasses.replace(base, gemv_tile=((k, cfg),))
                        bench(f"gemv{cfg}", lambda: h.fused(x), algo, name, N, K, M, nbytes)
                    h.kernels = base
                elif M <= ck.WQ_MM_MAX_M and algo in ("W8A16", "W4A16_AWQ", "W8A8_SQ_PER_CHANNEL"):
                    sq = algo == "W8A8_SQ_PER_CHANNEL"
                    xa = (x * 10).clamp(-127, 127).to(torch.int8) if sq else x
                    ws = h.out_scale if sq else h.scale if algo == "W8A16" else h.scales
                    for cfg, cvt in itertools.product(WQ_SWEEP, (0, 1) if algo == "W8A16" else (0,)):
                        bench(f"tl.dot{cfg}" + " cvt=1" * cvt,  # cvt=1: KernelConfig.wq_cvt
                              lambda: ck.wq_mm(xa, h.weight, ws, wfmt=wf[algo], group=128,
                                               afmt=ck.A_INT8 if sq else ck.A_FLOAT, dtype=torch.float16,
                                               config=cfg, cvt=cvt),
                              algo, name, N, K, M, nbytes)
                elif M > ck.WQ_MM_MAX_M and algo == "W8A8_SQ_PER_CHANNEL":
                    xa = (x * 10).clamp(-127, 127).to(torch.int8)
                    bench("int_mm only", lambda: torch._int_mm(xa, h.weight_t), algo, name, N, K, M, nbytes)
                    for cfg, group in itertools.product(INT8_GEMM_SWEEP, (0, 8)):
                        bench(f"triton-int8{cfg}" + f" g{group}" * bool(group),
                              lambda: ck.wq_mm(xa, h.weight, h.out_scale, wfmt=ck.W_INT8, afmt=ck.A_INT8,
                                               dtype=torch.float16, config=cfg, group_m=group),
                              algo, name, N, K, M, nbytes)
                    for cfg in INT8_GEMM_SWEEP:  # the persistent TMA GEMM (KernelConfig.sq_prefill_gemm "tma")
                        bench(f"tma-int8{cfg} g8", lambda: ck.i8_tma_mm(xa, h.weight, h.out_scale, dtype=torch.float16,
                                                                        config=cfg, group_m=8),
                              algo, name, N, K, M, nbytes)
                    if cutlass_rows(algo, name, M):  # KernelConfig.sq_prefill_gemm "cutlass"
                        bench("cutlass-int8", lambda: cuda_ext.sq_gemm(xa, h.weight, h.out_scale),
                              algo, name, N, K, M, nbytes)
                elif M > ck.WQ_MM_MAX_M and algo in ("W8A16", "W4A16_AWQ"):  # KernelConfig.wq_prefill's kernel
                    ws = h.scale if algo == "W8A16" else h.scales
                    wq = t["weight"].to(device)  # the stored layout (INT4's handler may keep only its k-packed copy)
                    for cfg, group in itertools.product(WQ_PREFILL_SWEEP, (1, 8)):
                        bench(f"wqt{cfg} g{group}", lambda: ck.wq_prefill_mm(x, wq, ws, wfmt=wf[algo], group=128,
                                                                            config=cfg, group_m=group),
                              algo, name, N, K, M, nbytes)
                    for cfg in WQ_PREFILL_SWEEP:  # KernelConfig.wq_prefill_tma
                        bench(f"wqtma{cfg} g8", lambda: ck.wq_prefill_mm(x, wq, ws, wfmt=wf[algo], group=128,
                                                                        config=cfg, group_m=8, tma=True),
                              algo, name, N, K, M, nbytes)
                    if cutlass_rows(algo, name, M):  # KernelConfig.wq_prefill_cutlass: each of its tiles
                        wc, sc, bits, g = (wq, ws, 8, K) if algo == "W8A16" else (
                            cuda_ext.pack_int4_cutlass(unpack_int4_rows(wq)), ws.t().contiguous(), 4, 128)
                        for i, tile in enumerate(cuda_ext.WQ_GEMM_TILES):
                            bench(f"cutlass{tile}", lambda: cuda_ext.wq_gemm(x, wc, sc, bits=bits, group=g, tile=i),
                                  algo, name, N, K, M, nbytes)
                        del wc, sc
                elif M > ck.WQ_MM_MAX_M and algo == "FP8":  # the other accumulation (KernelConfig.fp8_fast_accum)
                    base = h.kernels
                    h.kernels = dataclasses.replace(base, fp8_fast_accum=not base.fp8_fast_accum)
                    bench(f"fast_accum={h.kernels.fp8_fast_accum}", lambda: h.fused(x), algo, name, N, K, M, nbytes)
                    h.kernels = base
                del x
            del h, t
            torch.cuda.empty_cache()
        if algo in ("W8A16", "W4A16_AWQ") and wanted("layer"):
            _sweep_layer(bench, algo, shapes, [M for M in ms if M > ck.WQ_MM_MAX_M], gen, device)
    return out


def _sweep_linear(algo: str | None, N: int, K: int, gen, device: torch.device):
    """(the checkpoint tensors, the handler) of a random [N, K] linear in ``algo``'s format (group 128, float16)."""
    w = torch.randn(N, K, generator=gen, device=device) * K ** -0.5
    pre = torch.exp(0.3 * torch.randn(K, generator=gen, device=device)).half()
    t = _quantize(algo, w, pre, 128)
    return t, make_linear(algo, t, dtype=torch.float16, device=device, group_size=128)


def _sweep_layer(bench, algo: str, shapes: dict, ms: list[int], gen, device: torch.device) -> None:
    """A weight-only layer's four linears (qkv, dense, fc‖gate, proj) in a forward's order, as one row, at prefill's
    rows: ``layer default`` (each float16 copy written on the GEMMs' stream) and ``layer aheadD``
    (KernelConfig.wq_prefill_ahead: each written on a second stream during the GEMMs before, D linears ahead; the
    chain wraps round from proj to qkv, as the next layer's qkv follows in a forward, so every copy but the first
    call's is ahead)."""
    from quant.runtime.schemes.base import DequantAhead

    names = ("qkv", "dense", "fc_gate", "proj")
    hs = [_sweep_linear(algo, *shapes[name], gen, device)[1] for name in names]
    nbytes, flop_n_k = sum(h.nbytes for h in hs), sum(shapes[n][0] * shapes[n][1] for n in names)
    for M in ms:
        xs = [torch.randn(M, shapes[n][1], generator=gen, device=device).half() for n in names]

        def layer():
            for h, x in zip(hs, xs):
                h.fused(x)

        # (N · K of the four as one: the row's TFLOP/s are the layer's)
        bench("layer default", layer, algo, "layer", flop_n_k, 1, M, nbytes)
        for depth in (1, 2):
            ahead = DequantAhead([*hs, hs[0]], device, torch.float16, depth)
            bench(f"layer ahead{depth}", layer, algo, "layer", flop_n_k, 1, M, nbytes)
            ahead.release()
            del ahead
        del xs
    del hs
    torch.cuda.empty_cache()


@cli_entry
def main(argv: list[str] | None = None) -> int:
    from quant.runtime.random_checkpoint import RECIPES, SHAPES

    p = ArgumentParser(prog="python -m experiments.bench", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--shape", default="llama2-7b", choices=sorted(SHAPES))
    p.add_argument("--recipes", default="fp16,int8_wo,smoothquant,int4_awq,fp8,smoothquant_kv_int8,fp8_kv_fp8")
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--input-lens", default="512,1024")
    p.add_argument("--output-len", type=positive_int, default=64)
    p.add_argument("--rounds", type=positive_int, default=5,
                   help="interleaved rounds per cell (each engine timed once per round beside the fp16 reference)")
    p.add_argument("--peers", default="", help=f"peer engines, comma-separated: {', '.join(PEERS)}")
    p.add_argument("--peer-batch-sizes", default="1", help="batch sizes the peers run (each compiles once per batch)")
    p.add_argument("--peer-process", default="own", choices=["own", "same"],
                   help="each peer in a process of its own beside its own FP16 (default), or all in this one")
    p.add_argument("--peer-timeout", type=positive_int, default=900,
                   help="seconds a peer's own process may take (compiling included); past it the peer is failed")
    p.add_argument("--compute-dtype", default="float16", choices=["float16", "bfloat16"])
    p.add_argument("--hf-batch-sizes", default="1", help="HF generate baseline batch sizes ('' or --no-hf: none)")
    p.add_argument("--hf-output-len", type=positive_int, default=32)
    p.add_argument("--no-hf", action="store_true")
    p.add_argument("--profile", action="store_true",
                   help="per-kernel profile of eager b1 prefill and decode per recipe")
    p.add_argument("--sweep", action="store_true", help="time the linear kernels alone (--shape's layers) and exit")
    p.add_argument("--sweep-m", default="1,8,32,1024,8192")
    p.add_argument("--sweep-formats", default="",
                   help="the formats --sweep times, comma-separated (fp16 and quant_algo names; default: all)")
    p.add_argument("--sweep-variants", default="",
                   help="the rows --sweep times, comma-separated starts of their labels (e.g. auto,cutlass,wqt; "
                        "default: all)")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--out", type=Path, default=Path("results/bench_gpu.json"))
    p.add_argument("--budget", type=positive_int, default=None, metavar="SECONDS",
                   help="wall-clock seconds for the whole command: a peer's own process gets at most what is left, "
                        f"and nothing starts with less than {Budget.START_S} s left (recorded as not started), so a "
                        "limited machine ends the run with its table instead of killing it mid-peer")
    args = p.parse_args(argv)
    budget = Budget(args.budget)

    device = torch.device(args.device)
    if device.type != "cuda":
        raise UserError(f"experiments.bench measures the CUDA path; --device {args.device} is not a CUDA device")
    recipes = [r for r in args.recipes.split(",") if r]
    unknown = [r for r in recipes if r.partition("@")[0] not in RECIPES or not known_variant(r.partition("@")[2])]
    if unknown:
        raise UserError(f"unknown recipe(s) {', '.join(unknown)} (choose from {', '.join(RECIPES)}; a kernel "
                        f"variant may follow: @{', @'.join(KERNEL_VARIANTS)}, or @attnBxSwW, an attention tile, "
                        f"@sqpBMxBRxBKwWsS[gG] / @sqtmaBMxBNxBKwWsS, SmoothQuant's prefill tile, or "
                        f"@wqt[ma]BRxBMxBKwWsS, the weight-only prefill's, or @wqcutlassT[mM], its CUTLASS tile T "
                        f"up to M rows)")
    peers = [x for x in args.peers.split(",") if x]
    if bad := [x for x in peers if x not in PEERS]:
        raise UserError(f"unknown peer(s) {', '.join(bad)} (choose from {', '.join(PEERS)})")
    names = {a or "fp16": a for a in SWEEP_ALGOS}
    if bad := [f for f in args.sweep_formats.split(",") if f and f not in names]:
        raise UserError(f"unknown --sweep-formats {', '.join(bad)} (choose from {', '.join(names)})")
    sweep_formats = tuple(names[f] for f in args.sweep_formats.split(",") if f) or SWEEP_ALGOS
    check_cuda(device)  # after the names: a typo is told on any machine
    fp8 = [r for r in recipes if RECIPES[r.partition("@")[0]][0] in FP8_GEMM_ALGOS or
           RECIPES[r.partition("@")[0]][1] == "FP8"]
    fp8 += [x for x in peers if PEERS[x].recipe == "fp8"]
    if fp8 and (why := fp8_refusal(device)):
        raise UserError(f"recipe(s) {', '.join(fp8)} use FP8: {why}")
    batch_sizes, input_lens = _ints(args.batch_sizes), _ints(args.input_lens)
    peer_batches = _ints(args.peer_batch_sizes)
    hf_batches = [] if args.no_hf or not args.hf_batch_sizes else _ints(args.hf_batch_sizes)
    if args.output_len < 2 or args.hf_output_len < 2:
        raise UserError("--output-len and --hf-output-len must be >= 2 (decode needs a second token)")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    record = {"command": "python -m experiments.bench " + " ".join(argv if argv is not None else sys.argv[1:]),
              "created": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "shape": args.shape, "shape_dims": SHAPES[args.shape],
              "compute_dtype": args.compute_dtype, "output_len": args.output_len, "rounds": args.rounds,
              **environment(device), "rows": [], "profiles": {}, "describe": {}, "failed": {}, "peer_references": {}}
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        record["targets"] = targets(record["rows"])
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1, default=str))
        tmp.replace(args.out)

    log(f"GPU: {record.get('gpu')}")
    record["copy_bandwidth"] = copy = copy_bandwidth(device)
    log(f"copy bandwidth: {copy['gbs']:.0f} GB/s (read + write, {copy['bytes'] / 2**30:.0f} GiB)")
    if args.sweep:
        variants = tuple(v for v in args.sweep_variants.split(",") if v)
        record["sweep"] = sweep(device, log, _ints(args.sweep_m), args.shape, sweep_formats, variants)
        if variants and not record["sweep"]:  # (a typo: nothing to save)
            raise UserError(f"no sweep row's label starts with {', '.join(variants)} (see a full sweep's labels)")
        save()
        return 0
    ref_times: dict[tuple[int, int], dict] = {}  # (input, batch) → the fp16 reference's rounds, all pairings
    measured: list[dict] = []

    def ref_rows() -> list[dict]:
        return [cell_row("quant-runtime", "fp16", ref, P, B, args.output_len, t, ref_held, copy["gbs"], None)
                for (P, B), t in sorted(ref_times.items())]

    def save_rows() -> None:
        record["rows"] = hf_rows + ref_rows() + measured
        save()

    def time_cells(engine, recipe, key, cand, held, batches) -> None:
        """Every (input, batch) cell of one engine, in rounds beside the FP16 reference (pooled)."""
        for P in input_lens:
            for B in batches:
                prompts = synthetic_prompts(B, P, ref.vocab, seed=0)
                t = time_cell([ref] + ([cand] if cand is not None else []), prompts, args.output_len, args.rounds)
                pooled = ref_times.setdefault((P, B), {"ttft": [], "tpot": [], "extra_bytes": 0})
                pooled["ttft"] += t[0]["ttft"]
                pooled["tpot"] += t[0]["tpot"]
                pooled["extra_bytes"] = max(pooled["extra_bytes"], t[0]["extra_bytes"])
                if cand is not None:
                    row = cell_row(engine, recipe, cand, P, B, args.output_len, t[1], held, copy["gbs"], t[0])
                    measured.append(row)
                    log(f"{key:22s} B={B:<3d} in={P:<5d} TPOT {row['tpot_ms']:7.3f} ms  × fp16 "
                        f"{row.get('speedup', float('nan')):.2f} {row.get('speedup_ci', '')}  TTFT × "
                        f"{row.get('ttft_speedup', float('nan')):.2f}  BW {row['roofline_fraction']:.0%}")

    def time_engine(engine: str, recipe: str, key: str, build, batches: list[int]) -> None:
        """Build one engine, time its cells beside the FP16 reference, free it."""
        t0 = time.perf_counter()
        cand, held = resident(build)
        try:
            record["describe"][key] = cand.describe()
            log(f"{key}: built in {time.perf_counter() - t0:.1f} s, {cand.weight_bytes / 2**30:.2f} GiB per step, "
                f"{cand.describe()}")
            time_cells(engine, recipe, key, cand, held, batches)
            record["describe"][key] = desc = cand.describe()  # what timing revealed (a peer's CUDA graph skips)
            if desc.get("cuda_graph_skips"):
                for r in measured:
                    if r["engine"] == engine:
                        r["cuda_graph_skips"] = desc["cuda_graph_skips"]
                log(f"{key}: inductor skipped {desc['cuda_graph_skips']} CUDA graph(s): not its fast path, "
                    f"kept out of the targets")
            if args.profile and engine == "quant-runtime":
                record["profiles"][key] = profile_decode(cand, synthetic_prompts(1, input_lens[0], cand.vocab))
            log(f"{key}: done in {time.perf_counter() - t0:.1f} s")
        finally:
            del cand
            torch.cuda.empty_cache()
            save_rows()

    def out_of_budget(key: str) -> bool:
        """Whether too little of --budget is left to start ``key`` (then recorded as not started)."""
        if (why := budget.refusal()) is None:
            return False
        record["failed"][key] = why
        log(f"{key}: {why}")
        return True

    def peer_process(peer: str) -> None:
        """One peer in a child ``experiments.bench`` beside its own FP16; its rows join this record, marked."""
        out = args.out.with_name(f"{args.out.stem}.{peer}.json")
        cmd = [sys.executable, "-m", "experiments.bench", "--device", args.device, "--shape", args.shape,
               "--recipes", "fp16", "--peers", peer, "--peer-process", "same",
               "--peer-batch-sizes", args.peer_batch_sizes, "--input-lens", args.input_lens,
               "--output-len", str(args.output_len), "--rounds", str(args.rounds), "--compute-dtype",
               args.compute_dtype, "--no-hf", "--seed", str(args.seed), "--out", str(out)]
        log(f"{peer}: in its own process (log: {out.with_suffix('.log')})")
        out.unlink(missing_ok=True)
        limit, why = budget.peer_limit(args.peer_timeout)
        with open(out.with_suffix(".log"), "w") as f:
            try:
                rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=limit).returncode
                end = f"exit {rc}"
            except subprocess.TimeoutExpired:
                end = f"stopped after {limit:.0f} s ({why})"
        rows = merge_peer(record, json.loads(out.read_text()) if out.exists() else {}, peer, end)
        measured.extend(rows)
        for r in rows:
            log(f"{peer:22s} B={r['batch_size']:<3d} in={r['input_len']:<5d} TPOT {r['tpot_ms']:7.3f} ms  × its fp16 "
                f"{r.get('speedup', float('nan')):.2f} {r.get('speedup_ci', '')}")
        if not rows:
            log(f"{peer}: failed ({record['failed'][peer]})")

    hf_rows: list[dict] = []
    try:
        if hf_batches:
            hf_rows = bench_hf(args.shape, hf_batches, input_lens, args.hf_output_len, max(2, args.rounds - 1),
                               device, log)
            save_rows()
        # The fp16 reference stays built; each other engine is built in turn and timed in rounds alternating with it.
        ref, ref_held = resident(lambda: build_runtime(args.shape, "fp16", device, args.compute_dtype, args.seed))
        record["describe"]["fp16"] = ref.describe()
        others = [r for r in recipes if r != "fp16"]
        if not others and not peers:
            time_cells(None, None, "fp16", None, 0, batch_sizes)  # fp16 alone
        for recipe in others:
            if out_of_budget(recipe):
                continue
            build = lambda r=recipe: build_runtime(args.shape, r, device, args.compute_dtype, args.seed)  # noqa: E731
            time_engine("quant-runtime", recipe, recipe, build, batch_sizes)
        for peer in peers:
            if out_of_budget(peer):
                continue
            if args.peer_process == "own":
                peer_process(peer)
                save_rows()
                continue
            try:
                time_engine(peer, PEERS[peer].recipe, peer, lambda p=peer: HFPeer(
                    args.shape, p, device, seed=args.seed, max_len=max(input_lens) + args.output_len), peer_batches)
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as exc:  # a peer that fails (a library's compile, an op it lacks) is reported, not fatal
                first = (str(exc).strip().splitlines() or [""])[0]
                record["failed"][peer] = f"{type(exc).__name__}: {first[:300]}"
                log(f"{peer}: failed ({record['failed'][peer]})")
                save_rows()
        if args.profile:
            record["profiles"]["fp16"] = profile_decode(ref, synthetic_prompts(1, input_lens[0], ref.vocab))
    except torch.cuda.OutOfMemoryError as exc:
        save_rows()
        raise UserError(f"out of GPU memory during the benchmark ({str(exc).splitlines()[0][:200]})") from None
    save_rows()
    print(table(record["rows"], record["targets"], copy))
    for engine, why in record["failed"].items():
        print(f"{engine}: failed, not in the table ({why})")
    print(f"\nGPU: {record['gpu']['name']} ({record['gpu'].get('nvidia_smi', '')}); record: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
