"""Latency measured on the machine at hand: TTFT, time per output token, throughput, peak memory.

The workload is fixed by (batch size, input length, output length): prompts are seeded random token ids of
exactly ``input_len`` tokens and generation ignores EOS, so every repeat does the same work. One warm-up run,
then ``repeats`` timed runs; medians are reported with min/max spread. The bandwidth figure is *implied*
(weight bytes read per decode step ÷ time per step), printed next to the measurement, never instead of it.
"""
from __future__ import annotations

import random
import statistics
from dataclasses import asdict, dataclass

import torch

from quant import faults


@dataclass
class LatencyResult:
    batch_size: int
    input_len: int
    output_len: int
    repeats: int
    ttft_ms: float
    ttft_ms_min: float
    ttft_ms_max: float
    tpot_ms: float  # time per output token (one decode step for the whole batch)
    tpot_ms_min: float
    tpot_ms_max: float
    e2e_ms: float
    tokens_per_s: float  # generated tokens of the whole batch / end-to-end time
    decode_tokens_per_s: float  # batch / tpot
    peak_memory_mb: float | None
    peak_memory_kind: str
    weight_bytes: int
    implied_bandwidth_gbs: float  # weight bytes / tpot: how hard decode pushes memory
    device: str
    emulated: bool

    def to_dict(self) -> dict:
        return asdict(self)


def _reset_peak_rss() -> bool:
    """Linux: writing 5 to clear_refs resets VmHWM, so the peak covers only the measured runs."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def synthetic_prompts(batch_size: int, input_len: int, vocab: int, seed: int = 0) -> list[list[int]]:
    # Skip the first 1000 ids: special and byte tokens; any ordinary token does the same work.
    rng = random.Random(seed)
    low = min(1000, vocab // 2)
    return [[rng.randrange(low, vocab) for _ in range(input_len)] for _ in range(batch_size)]


def measure(runtime, *, batch_size: int, input_len: int, output_len: int, repeats: int = 3,
            warmup: int = 1, seed: int = 0) -> LatencyResult:
    prompts = synthetic_prompts(batch_size, input_len, runtime.vocab, seed)
    cuda = runtime.device.type == "cuda"
    # On CUDA the warm-up runs the measured shape: the runtime captures its prefill and decode graphs per
    # (batch, prompt + budget), and a shorter warm-up left that capture (0.3-0.5 s) inside the first measured run.
    for _ in range(warmup):
        runtime.generate(prompts, output_len if cuda else min(output_len, 4), ignore_eos=True)
    faults.point("eval.latency")  # crash test: in the middle of the latency measurement
    # A runtime whose memory PyTorch's allocator never sees (TensorRT-LLM's engine and KV pool) reports its own.
    own_probe = getattr(runtime, "peak_memory_mb", None)
    if own_probe is not None:
        runtime.reset_peak_memory()
        kind = runtime.memory_kind
    elif cuda:
        torch.cuda.reset_peak_memory_stats(runtime.device)
        kind = "cuda max_memory_allocated"
    else:
        kind = "process peak RSS" if _reset_peak_rss() else "process peak RSS since start"
    ttft, tpot, e2e = [], [], []
    for _ in range(repeats):
        gen = runtime.generate(prompts, output_len, ignore_eos=True)
        ttft.append(gen.ttft_s * 1e3)
        steps = gen.step_s or [gen.ttft_s]
        tpot.append(statistics.median(steps) * 1e3)
        e2e.append((gen.ttft_s + sum(gen.step_s)) * 1e3)
    if own_probe is not None:
        peak = own_probe()
    else:
        peak = torch.cuda.max_memory_allocated(runtime.device) / 2**20 if cuda else _peak_rss_mb()
    tpot_med = statistics.median(tpot)
    e2e_med = statistics.median(e2e)
    info = runtime.describe()
    return LatencyResult(
        batch_size=batch_size, input_len=input_len, output_len=output_len, repeats=repeats,
        ttft_ms=statistics.median(ttft), ttft_ms_min=min(ttft), ttft_ms_max=max(ttft),
        tpot_ms=tpot_med, tpot_ms_min=min(tpot), tpot_ms_max=max(tpot), e2e_ms=e2e_med,
        tokens_per_s=batch_size * output_len / (e2e_med / 1e3),
        decode_tokens_per_s=batch_size / (tpot_med / 1e3),
        peak_memory_mb=peak, peak_memory_kind=kind, weight_bytes=runtime.weight_bytes,
        implied_bandwidth_gbs=runtime.weight_bytes / (tpot_med / 1e3) / 1e9,
        device=info["device"], emulated=info["emulated"],
    )
