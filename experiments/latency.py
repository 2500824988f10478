"""Latency measured on the machine at hand: TTFT, time per output token, throughput, peak memory.

The workload is fixed by (batch size, input length, output length): prompts are seeded random token ids of
exactly ``input_len`` tokens and generation ignores EOS, so every repeat does the same work. One warm-up run,
then ``repeats`` timed runs; medians are reported with min/max spread. The bandwidth figure is *implied*
(weight bytes read per decode step ÷ time per step), printed next to the measurement, never instead of it.
"""
from __future__ import annotations

import os
import random
import statistics
import time
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
    tpot_runs_ms: list[float]  # each timed run's median step: the CI comes from these
    load: dict  # what else used the machine while this was measured (LoadProbe)

    def to_dict(self) -> dict:
        return asdict(self)


class LoadProbe:
    """CPU time other processes took while we measured, in cores, and the load average before and after.

    A latency measured while other work shares the cores is not a property of the recipe (on a 2-core box, 35 times
    the quiet time: docs/architecture.md, measured choices): the search flags such measurements. Foreign CPU
    = busy jiffies of the whole machine (/proc/stat) minus this process's own (/proc/self/stat, all threads)."""

    def __init__(self) -> None:
        self.cores = os.cpu_count() or 1
        self.before = _loadavg()
        self._t0, self._busy0, self._self0 = time.monotonic(), _machine_busy(), _self_busy()

    def stop(self) -> dict:
        wall = time.monotonic() - self._t0
        busy, me = _machine_busy(), _self_busy()
        foreign = foreign_s = None
        if None not in (busy, me, self._busy0, self._self0) and wall > 0:
            foreign_s = max(0.0, ((busy - self._busy0) - (me - self._self0)) / _CLK)
            foreign = foreign_s / wall
        return {"cores": self.cores, "wall_s": wall, "loadavg_before": self.before, "loadavg_after": _loadavg(),
                "foreign_cores": foreign, "loaded": is_loaded(foreign, foreign_s, self.cores)}


def is_loaded(foreign_cores: float | None, foreign_s: float | None, cores: int) -> bool:
    """Other processes took a quarter of a core (or a tenth of the machine, whichever is more) while we measured,
    and at least 0.2 s of CPU in all: the counters tick in jiffies (10 ms), so a shorter window cannot tell."""
    return foreign_cores is not None and foreign_s >= 0.2 and foreign_cores >= max(0.25, 0.1 * cores)


_CLK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _machine_busy() -> int | None:
    try:
        with open("/proc/stat") as fh:
            fields = [int(v) for v in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal ...: busy = all but idle and iowait
    return sum(fields[:8]) - fields[3] - fields[4]


def _self_busy() -> int | None:
    try:
        with open("/proc/self/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[11]) + int(fields[12])  # utime + stime of every thread of the process


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


def warm_up(runtime, prompts, output_len: int, runs: int = 1) -> None:
    # On CUDA the warm-up runs the measured shape: the runtime captures its prefill and decode graphs per
    # (batch, prompt + budget), and a shorter warm-up left that capture (0.3-0.5 s) inside the first measured run.
    cuda = runtime.device.type == "cuda"
    for _ in range(runs):
        runtime.generate(prompts, output_len if cuda else min(output_len, 4), ignore_eos=True)


def timed_run(runtime, prompts, output_len: int) -> tuple[float, float, float]:
    """One generation of the workload: (TTFT, time per output token = median decode step, end to end), in ms."""
    gen = runtime.generate(prompts, output_len, ignore_eos=True)
    steps = gen.step_s or [gen.ttft_s]
    return gen.ttft_s * 1e3, statistics.median(steps) * 1e3, (gen.ttft_s + sum(gen.step_s)) * 1e3


def measure(runtime, *, batch_size: int, input_len: int, output_len: int, repeats: int = 3,
            warmup: int = 1, seed: int = 0) -> LatencyResult:
    prompts = synthetic_prompts(batch_size, input_len, runtime.vocab, seed)
    cuda = runtime.device.type == "cuda"
    warm_up(runtime, prompts, output_len, warmup)
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
    probe = LoadProbe()
    for _ in range(repeats):
        a, b, c = timed_run(runtime, prompts, output_len)
        ttft.append(a)
        tpot.append(b)
        e2e.append(c)
    load = probe.stop()
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
        device=info["device"], emulated=info["emulated"], tpot_runs_ms=tpot, load=load,
    )
