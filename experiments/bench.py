"""``python -m experiments.bench``: the PyTorch runtime's CUDA path per recipe, against HF ``generate``, one run.

For a random-weight LLaMa of a given shape (default LLaMa-2-7B: hidden 4096, 32 layers, 32/32 heads, intermediate
11008, vocab 32000), built directly in each TRT-LLM checkpoint layout on the GPU
(:mod:`quant.runtime.random_checkpoint`), and each recipe, batch size and input length: TTFT (prefill + first
token), decode tokens/s (median CUDA-event time of a graph-replayed step), peak GPU memory, and the achieved
bandwidth of a decode step (weight bytes + KV bytes read at the mean context, over the step time) as a fraction
of the card's device-to-device copy bandwidth measured in the same run. HF transformers ``generate`` (eager
attention, fp16, ``LlamaForCausalLM(config)`` with random weights of the same shape) is the baseline. Prints a
Markdown table and the targets, and writes JSON after each recipe (so a run cut short keeps what it measured).

Recipes are those of :mod:`quant.runtime.random_checkpoint`; ``int4_awq@VARIANT`` picks W4A16 kernels other than the
default (:data:`KERNEL_VARIANTS`; targets take a recipe's best variant). ``--profile`` adds, per recipe, the device time
of each kernel in one batch-1 decode step (eager, from the PyTorch profiler) — where the step's time goes.

``--sweep`` times the per-format linear kernels alone on the 7B layer shapes (configs, alternatives) instead.
Its ``do_bench`` times include the host's launch of each call, which for kernels of 10–50 µs (Triton's Python
launcher especially) is most of it: use it to compare large-M kernels, and ``--profile`` for decode kernels.
"""
from __future__ import annotations

import dataclasses
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from experiments.environment import machine, versions
from experiments.latency import synthetic_prompts
from quant.errors import ArgumentParser, UserError, cli_entry, positive_int, seed_int
from quant.hardware import FP8_GEMM_ALGOS, fp8_refusal
from quant.runtime.linear import make_linear
from quant.runtime.random_checkpoint import RECIPES, SHAPES, _quantize, random_checkpoint, random_config
from quant.runtime.schemes.base import DEFAULT_KERNELS, INT4_KERNELS
from quant.runtime.torch_runtime import TorchRuntime, check_cuda

# What the benchmark reports against: decode speed-up over the project's FP16 at batch 1 (a quarter of FP16's
# weight bytes allows INT4 ~3x, a half allows 8-bit ~1.9x, at the same fraction of bandwidth)
TARGETS = {"int8_wo": 1.75, "int4_awq": 2.6, "fp8": 1.75, "smoothquant": 1.75}
PREFILL_TARGETS = {"smoothquant": 1.5, "fp8": 1.5}  # TTFT speed-up over FP16 at the longest input, batch 1
FP16_ROOFLINE_TARGET = 0.88
HF_SPEEDUP_TARGET = 15.0


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
                       "cuda": torch.version.cuda}
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
# (``kpack``: the default before the GEMV took batch 1), or the GEMV with the pre-quant scale in act_prep
KERNEL_VARIANTS = {**{k: {"int4_kernel": k, "w4g_rows": None} for k in INT4_KERNELS},
                   "w4g-unfused": {"w4g_fuse": False}}


def build_runtime(shape: str, recipe: str, device: torch.device, dtype: str, seed: int, group: int = 128):
    """``recipe`` may carry ``@VARIANT``, a kernel choice of :data:`KERNEL_VARIANTS` (default: KernelConfig's)."""
    name, _, kernel = recipe.partition("@")
    algo, kv = RECIPES[name]
    ckpt = random_checkpoint(random_config(shape, algo, kv, group_size=group), device=device, seed=seed,
                             path=f"<random {shape} {name}>")
    kernels = dataclasses.replace(DEFAULT_KERNELS, **KERNEL_VARIANTS[kernel]) if kernel else DEFAULT_KERNELS
    try:
        rt = TorchRuntime(ckpt, device=device, compute_dtype=dtype, kernels=kernels)
    finally:
        ckpt.tensors.clear()
    torch.cuda.empty_cache()
    return rt


def profile_decode(rt, prompts: list[list[int]], steps: int = 4, top: int = 14) -> dict:
    """Per-kernel device time of one decode step, eager (no graph: the kernels are the graph's): a profile of
    prefill + ``steps`` decode steps minus one of the prefill alone, per kernel name, divided by ``steps``."""
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
    return {"steps": steps, "eager_step_ms": [x * 1e3 for x in eager_steps],
            "kernel_us_per_step": sum(r["us_per_step"] for r in rows),
            "launches_per_step": sum(r["calls_per_step"] for r in rows), "top": rows[:top]}


def bench_recipe(rt, recipe: str, batch_sizes: list[int], input_lens: list[int], output_len: int, repeats: int,
                 copy_gbs: float, log) -> list[dict]:
    rows = []
    kv_elem = 1 if rt.kv_algo is not None else rt.embedding.element_size()
    for P in input_lens:
        for B in batch_sizes:
            prompts = synthetic_prompts(B, P, rt.vocab, seed=0)
            rt.generate(prompts, output_len, ignore_eos=True)  # warm-up: compiles, allocates, captures the graph
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(rt.device)
            ttft, tpot = [], []
            for _ in range(repeats):
                g = rt.generate(prompts, output_len, ignore_eos=True)
                ttft.append(g.ttft_s)
                tpot.append(statistics.median(g.step_s))
            peak = torch.cuda.max_memory_allocated(rt.device)
            t_step = statistics.median(tpot)
            ctx = P + output_len / 2
            kv_bytes = 2 * rt.n_layers * B * rt.n_kv * ctx * rt.head_dim * kv_elem
            step_bytes = rt.weight_bytes + kv_bytes
            row = {"engine": "quant-runtime", "recipe": recipe, "batch_size": B, "input_len": P,
                   "output_len": output_len, "ttft_ms": statistics.median(ttft) * 1e3,
                   "ttft_ms_spread": (max(ttft) - min(ttft)) * 1e3, "tpot_ms": t_step * 1e3,
                   "tpot_ms_spread": (max(tpot) - min(tpot)) * 1e3, "decode_tok_s": B / t_step,
                   "prefill_tok_s": B * P / statistics.median(ttft), "peak_memory_gib": peak / 2**30,
                   "weight_bytes": rt.weight_bytes, "kv_bytes_per_step": kv_bytes,
                   "achieved_gbs": step_bytes / t_step / 1e9, "roofline_fraction": step_bytes / t_step / 1e9 / copy_gbs}
            rows.append(row)
            log(f"{recipe:20s} B={B:<3d} in={P:<5d} TTFT {row['ttft_ms']:8.1f} ms  TPOT {row['tpot_ms']:7.3f} ms  "
                f"{row['decode_tok_s']:8.1f} tok/s  BW {row['achieved_gbs']:6.0f} GB/s "
                f"({row['roofline_fraction']:.0%})  peak {row['peak_memory_gib']:.1f} GiB")
    return rows


def bench_hf(shape: str, batch_sizes: list[int], input_lens: list[int], output_len: int, repeats: int,
             device: torch.device, log) -> list[dict]:
    """HF ``generate``, eager attention, fp16 random weights of the same shape. TTFT = a 1-token generate;
    time per output token = (full − 1-token) / (output_len − 1), as experiments/bench_runtime.py measures it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    d = SHAPES[shape]
    config = LlamaConfig(hidden_size=d["hidden_size"], num_hidden_layers=d["num_hidden_layers"],
                         num_attention_heads=d["num_attention_heads"], num_key_value_heads=d["num_key_value_heads"],
                         intermediate_size=d["intermediate_size"], vocab_size=d["vocab_size"],
                         max_position_embeddings=4096, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0, tie_word_embeddings=False)
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


def targets(rows: list[dict]) -> list[dict]:
    """The issue's targets, from the rows of this run (batch 1)."""
    def get(engine, recipe, P, key):
        """A recipe's value; of its kernel variants (recipe@kernel) the best one's, named in the target."""
        cands = [r for r in rows if r["engine"] == engine and r["recipe"].partition("@")[0] == recipe
                 and r["batch_size"] == 1 and r["input_len"] == P]
        if not cands:
            return None
        best = max(cands, key=lambda r: -r[key] if key == "ttft_ms" else r[key])
        return best[key]

    out = []
    lens = sorted({r["input_len"] for r in rows if r["engine"] == "quant-runtime"})
    for P in lens:
        f = get("quant-runtime", "fp16", P, "roofline_fraction")
        if f is not None:
            out.append({"target": f"fp16 b1 decode, in {P}: fraction of copy-bandwidth roofline", "measured": f,
                        "required": FP16_ROOFLINE_TARGET})
        ours, hf = get("quant-runtime", "fp16", P, "decode_tok_s"), get("hf-generate-eager", "fp16", P, "decode_tok_s")
        if ours and hf:
            out.append({"target": f"fp16 b1 decode, in {P}: × HF eager generate", "measured": ours / hf,
                        "required": HF_SPEEDUP_TARGET})
        base = get("quant-runtime", "fp16", P, "decode_tok_s")
        for recipe, need in TARGETS.items():
            v = get("quant-runtime", recipe, P, "decode_tok_s")
            if v and base:
                out.append({"target": f"{recipe} b1 decode, in {P}: × fp16", "measured": v / base, "required": need})
    if lens:
        P = max(lens)
        base = get("quant-runtime", "fp16", P, "ttft_ms")
        for recipe, need in PREFILL_TARGETS.items():
            v = get("quant-runtime", recipe, P, "ttft_ms")
            if v and base:
                out.append({"target": f"{recipe} b1 prefill (TTFT), in {P}: × fp16", "measured": base / v,
                            "required": need})
    for t in out:
        t["met"] = t["measured"] >= t["required"]
        t["shortfall"] = 0.0 if t["met"] else 1 - t["measured"] / t["required"]
    return out


def table(rows: list[dict], tgts: list[dict], copy: dict | None) -> str:
    lines = ["| engine | recipe | batch | input | TTFT ms | TPOT ms | decode tok/s | prefill tok/s | achieved GB/s "
             "| of copy BW | peak GiB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        bw = f"{r['achieved_gbs']:.0f}" if "achieved_gbs" in r else "–"
        frac = f"{r['roofline_fraction']:.0%}" if "roofline_fraction" in r else "–"
        lines.append(f"| {r['engine']} | {r['recipe']} | {r['batch_size']} | {r['input_len']} | {r['ttft_ms']:.1f} "
                     f"| {r['tpot_ms']:.3f} | {r['decode_tok_s']:.1f} | {r['prefill_tok_s']:.0f} | {bw} | {frac} "
                     f"| {r['peak_memory_gib']:.1f} |")
    if copy:
        lines.append(f"\ncopy bandwidth (device to device, read + write): {copy['gbs']:.0f} GB/s")
    if tgts:
        lines += ["", "| target | measured | required | met | short by |", "|---|---|---|---|---|"]
        for t in tgts:
            short = "" if t["met"] else f"{t['shortfall']:.0%}"
            lines.append(f"| {t['target']} | {t['measured']:.2f} | {t['required']:.2f} | "
                         f"{'yes' if t['met'] else 'NO'} | {short} |")
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
INT8_GEMM_SWEEP = [(128, 128, 128, 8, 4), (128, 256, 128, 8, 3), (64, 128, 128, 4, 4), (128, 128, 64, 4, 4)]


def sweep(device: torch.device, log, ms: list[int]) -> list[dict]:
    """Each format's linear kernels alone on the 7B layer shapes: Triton configs vs the library path."""
    import triton

    from quant.runtime import cuda_kernels as ck

    shapes = {"qkv": (12288, 4096), "dense": (4096, 4096), "fc_gate": (22016, 4096), "proj": (4096, 11008),
              "lm_head": (32000, 4096)}
    algos = [None, "W8A16", "W4A16_AWQ", "FP8", "W8A8_SQ_PER_CHANNEL"]
    wf = {None: ck.W_FLOAT, "W8A16": ck.W_INT8, "W4A16_AWQ": ck.W_INT4, "FP8": ck.W_FP8,
          "W8A8_SQ_PER_CHANNEL": ck.W_INT8}
    out = []
    gen = torch.Generator(device=device).manual_seed(0)

    def bench(label, fn, algo, name, N, K, M, nbytes):
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
            w = torch.randn(N, K, generator=gen, device=device) * K ** -0.5
            pre = torch.exp(0.3 * torch.randn(K, generator=gen, device=device)).half()
            h = make_linear(algo, _quantize(algo, w, pre, 128), dtype=torch.float16, device=device, group_size=128)
            del w
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
                    for cfg in WQ_SWEEP:
                        bench(f"tl.dot{cfg}", lambda: ck.wq_mm(xa, h.weight, ws, wfmt=wf[algo], group=128,
                                                             afmt=ck.A_INT8 if sq else ck.A_FLOAT,
                                                             dtype=torch.float16, config=cfg),
                              algo, name, N, K, M, nbytes)
                elif M > ck.WQ_MM_MAX_M and algo == "W8A8_SQ_PER_CHANNEL":
                    xa = (x * 10).clamp(-127, 127).to(torch.int8)
                    bench("int_mm only", lambda: torch._int_mm(xa, h.weight_t), algo, name, N, K, M, nbytes)
                    for cfg in INT8_GEMM_SWEEP:
                        bench(f"triton-int8{cfg}", lambda: ck.wq_mm(xa, h.weight, h.out_scale, wfmt=ck.W_INT8,
                                                                  afmt=ck.A_INT8, dtype=torch.float16, config=cfg),
                              algo, name, N, K, M, nbytes)
                del x
            del h
            torch.cuda.empty_cache()
    return out


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
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--compute-dtype", default="float16", choices=["float16", "bfloat16"])
    p.add_argument("--hf-batch-sizes", default="1", help="HF generate baseline batch sizes ('' or --no-hf: none)")
    p.add_argument("--hf-output-len", type=positive_int, default=32)
    p.add_argument("--no-hf", action="store_true")
    p.add_argument("--profile", action="store_true", help="per-kernel profile of eager b1 decode per recipe")
    p.add_argument("--sweep", action="store_true", help="time the linear kernels alone (7B shapes) and exit")
    p.add_argument("--sweep-m", default="1,8,32,1024,8192")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--out", type=Path, default=Path("results/bench_gpu.json"))
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if device.type != "cuda":
        raise UserError(f"experiments.bench measures the CUDA path; --device {args.device} is not a CUDA device")
    check_cuda(device)
    recipes = [r for r in args.recipes.split(",") if r]
    unknown = [r for r in recipes if r.partition("@")[0] not in RECIPES or r.partition("@")[2] not in
               ("", *KERNEL_VARIANTS)]
    if unknown:
        raise UserError(f"unknown recipe(s) {', '.join(unknown)} (choose from {', '.join(RECIPES)}; a W4A16 one may "
                        f"add @{', @'.join(KERNEL_VARIANTS)})")
    fp8 = [r for r in recipes if RECIPES[r.partition("@")[0]][0] in FP8_GEMM_ALGOS or
           RECIPES[r.partition("@")[0]][1] == "FP8"]
    if fp8 and (why := fp8_refusal(device)):
        raise UserError(f"recipe(s) {', '.join(fp8)} use FP8: {why}")
    batch_sizes, input_lens = _ints(args.batch_sizes), _ints(args.input_lens)
    hf_batches = [] if args.no_hf or not args.hf_batch_sizes else _ints(args.hf_batch_sizes)
    if args.output_len < 2 or args.hf_output_len < 2:
        raise UserError("--output-len and --hf-output-len must be >= 2 (decode needs a second token)")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    record = {"command": "python -m experiments.bench " + " ".join(argv if argv is not None else sys.argv[1:]),
              "created": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "shape": args.shape, "shape_dims": SHAPES[args.shape],
              "compute_dtype": args.compute_dtype, "output_len": args.output_len, "repeats": args.repeats,
              **environment(device), "rows": [], "profiles": {}, "describe": {}}
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
        record["sweep"] = sweep(device, log, _ints(args.sweep_m))
        save()
        return 0
    try:
        if hf_batches:
            record["rows"] += bench_hf(args.shape, hf_batches, input_lens, args.hf_output_len, max(2, args.repeats - 1),
                                       device, log)
            save()
        for recipe in recipes:
            t0 = time.perf_counter()
            rt = build_runtime(args.shape, recipe, device, args.compute_dtype, args.seed)
            record["describe"][recipe] = rt.describe()
            log(f"{recipe}: built in {time.perf_counter() - t0:.1f} s, {rt.weight_bytes / 2**30:.2f} GiB per step, "
                f"kernels {rt.describe()['kernels']}, kv {rt.describe()['kv_cache']}")
            record["rows"] += bench_recipe(rt, recipe, batch_sizes, input_lens, args.output_len, args.repeats,
                                           copy["gbs"], log)
            if args.profile:
                from experiments.latency import synthetic_prompts

                record["profiles"][recipe] = profile_decode(rt, synthetic_prompts(1, input_lens[0], rt.vocab))
            save()
            log(f"{recipe}: done in {time.perf_counter() - t0:.1f} s")
            del rt
            torch.cuda.empty_cache()
    except torch.cuda.OutOfMemoryError as exc:
        save()
        raise UserError(f"out of GPU memory during the benchmark ({str(exc).splitlines()[0][:200]})") from None
    save()
    print(table(record["rows"], record["targets"], copy))
    print(f"\nGPU: {record['gpu']['name']} ({record['gpu'].get('nvidia_smi', '')}); record: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
