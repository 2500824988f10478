"""``python -m experiments.kernel_bench``: the linears of one decode step, per kernel, timed interleaved on a GPU.

For a shape (``llama2-7b``, ``llama3-8b``), every layer's linears in the runtime's stacked shapes (qkv, o,
gate‖up, down) with distinct random weights, so that a step streams them from memory as decode does (not from
the 60 MB L2). Per kernel variant and batch size, one CUDA graph runs all of them on an M-row input through the
runtime's own handlers (``h.fused``: the prologue kernels they launch included). Rounds replay every graph in a
rotating order; each variant's time is divided by FP16 cuBLAS's of the same round, and the mean log ratio's
t interval gives the ratio's CI (experiments/stats.py), so machine drift between rounds cancels. Achieved
bandwidth = bytes the variant's handlers hold for that batch size / time, as a fraction of the device-to-device
copy bandwidth measured at the start of the same run.

``--sweep`` first times the k-packed INT4 kernel's tiles (BLOCK_N, KW, warps, stages) at each batch size up to 64
on the same weights, logs the fastest per batch size, and times the smallest batch size's fastest in the table as
well (``int4 kpack*``, at every batch size); ``--sweep-w4g`` the same for the compiled
GEMV's tiles (``int4 w4g*``), at one row in both its forms (one block per row block, persistent). ``--sweep-w8g``
times each 8-bit ``… runtime`` variant (the compiled 8-bit GEMV, at its format's tile) at every other tile of
cuda_ext.GEMV_TILES as variants of their own (``… w8g 2x4``), interleaved with the rest, prologues included.
``--per-linear`` also times each linear kind alone (qkv, o, gate_up, down: one graph of every layer's), in the same
rounds, and prints a second table of µs a call and share of copy bandwidth per kind: which linear falls short.
"""
from __future__ import annotations

import dataclasses
import itertools
import statistics
import sys
import time
from pathlib import Path

import torch

from experiments.bench import _ints, copy_bandwidth, environment
from experiments.stats import ratio_ci
from quant.atomic import atomic_write_json, ensure_writable_file
from quant.errors import ArgumentParser, UserError, cli_entry, positive_int, seed_int
from quant.runtime.linear import make_linear
from quant.runtime.random_checkpoint import SHAPES, _quantize
from quant.runtime.schemes.base import KernelConfig
from quant.runtime.torch_runtime import check_cuda

# label → (quant_algo, kernels); the first is the reference of every ratio
VARIANTS = {
    "fp16 cuBLAS": (None, KernelConfig(gemv=frozenset())),
    "fp16 runtime": (None, KernelConfig()),
    # the 8-bit formats' default: the compiled GEMV at batch 1; W8A16 at 2–64 rows: int8 → float16 by byte permute,
    # wide tiles with K split
    "int8_wo runtime": ("W8A16", KernelConfig()),
    "int8_wo triton": ("W8A16", KernelConfig(w8g=frozenset())),
    "int8_wo wqplain": ("W8A16", KernelConfig(wq_cvt=False, wq_wide=frozenset())),  # Triton's conversion, narrow
    "int8_wo wqnarrow": ("W8A16", KernelConfig(wq_wide=frozenset())),  # byte permute on 32-channel tiles
    "smoothquant runtime": ("W8A8_SQ_PER_CHANNEL", KernelConfig()),
    "smoothquant triton": ("W8A8_SQ_PER_CHANNEL", KernelConfig(w8g=frozenset())),
    "smoothquant wqwide": ("W8A8_SQ_PER_CHANNEL", KernelConfig(wq_wide=frozenset({"W8A8_SQ_PER_CHANNEL"}))),
    "fp8 runtime": ("FP8", KernelConfig()),
    "fp8 triton": ("FP8", KernelConfig(w8g=frozenset())),
    # (each INT4 kernel alone at the rows it names: w4m_rows=None, else the tensor-core kernel takes 2–16)
    "int4 tinygemm": ("W4A16_AWQ", KernelConfig(int4_kernel="tinygemm", w4g_rows=None, w4m_rows=None)),
    "int4 triton (stored layout)": ("W4A16_AWQ", KernelConfig(int4_kernel="triton", w4g_rows=None, w4m_rows=None)),
    "int4 kpack": ("W4A16_AWQ", KernelConfig(int4_kernel="kpack", w4k_rows=(1, 64), w4g_rows=None, w4m_rows=None)),
    "int4 w4g": ("W4A16_AWQ", KernelConfig(w4g_rows=(1, 4), w4m_rows=None)),
    "int4 w4g unfused": ("W4A16_AWQ", KernelConfig(w4g_rows=(1, 4), w4g_fuse=False, w4m_rows=None)),
    "int4 default": ("W4A16_AWQ", KernelConfig()),
    "int4 plain staging": ("W4A16_AWQ", KernelConfig(w4g_stage_batch=False)),  # staging loads 4 units at a time
    # the compiled GEMVs' other form at one row: INT4's one block per row block (its default is persistent), the
    # 8-bit formats' persistent (KernelConfig.w4g_persistent / w8g_persistent)
    "int4 w4g per row block": ("W4A16_AWQ", KernelConfig(w4g_persistent=False, w4g_tile=(2, 4))),
    "int8_wo persistent": ("W8A16", KernelConfig(w8g_persistent=frozenset({"W8A16"}))),
    "smoothquant persistent": ("W8A8_SQ_PER_CHANNEL",
                               KernelConfig(w8g_persistent=frozenset({"W8A8_SQ_PER_CHANNEL"}))),
    "fp8 persistent": ("FP8", KernelConfig(w8g_persistent=frozenset({"FP8"}))),
    # the persistent forms launched with programmatic dependent launch (KernelConfig.gemv_pdl): a graph of one kind's
    # linears back to back is where a kernel's launch and first loads overlap the one before
    "int4 pdl": ("W4A16_AWQ", KernelConfig(gemv_pdl=frozenset({"W4A16_AWQ"}))),
    "int8_wo pdl": ("W8A16", KernelConfig(w8g_persistent=frozenset({"W8A16"}), gemv_pdl=frozenset({"W8A16"}))),
    "fp8 pdl": ("FP8", KernelConfig(w8g_persistent=frozenset({"FP8"}), gemv_pdl=frozenset({"FP8"}))),
    # INT4 on tensor cores (KernelConfig.w4m_rows; csrc/w4a16_mma.cu), 4 or 8 steps loaded ahead per warp
    "int4 w4m": ("W4A16_AWQ", KernelConfig(w4m_rows=(1, 32))),
    "int4 w4m depth8": ("W4A16_AWQ", KernelConfig(w4m_rows=(1, 8), w4m_depth=8)),
    # the 8-bit formats on tensor cores at one row (KernelConfig.w8m; csrc/w8_mma.cu)
    "int8_wo w8m": ("W8A16", KernelConfig(w8m=frozenset({"W8A16"}))),
    "smoothquant w8m": ("W8A8_SQ_PER_CHANNEL", KernelConfig(w8m=frozenset({"W8A8_SQ_PER_CHANNEL"}))),
    "fp8 w8m": ("FP8", KernelConfig(w8m=frozenset({"FP8"}))),
}
SWEEP = list(itertools.product((16, 32, 64), (16, 32, 64), (2, 4), (2, 4)))  # (BLOCK_N, KW, warps, stages)


def layer_linears(shape: str) -> dict[str, tuple[int, int]]:
    d = SHAPES[shape]
    h, i = d["hidden_size"], d["intermediate_size"]
    kv = h // d["num_attention_heads"] * d["num_key_value_heads"]
    return {"qkv": (h + 2 * kv, h), "o": (h, h), "gate_up": (2 * i, h), "down": (h, i)}


def build(shape: str, layers: int, variants: dict, group: int, device, seed: int, log) -> dict[str, list]:
    """label → [(handler, in-features) per linear of every layer]; a linear's float weights are quantized once per
    format. The weights follow from `seed` alone: a variant built in a later call gets the same ones (the sweeps')."""
    gen = torch.Generator(device=device).manual_seed(seed)
    out: dict[str, list] = {v: [] for v in variants}
    for _ in range(layers):
        for n, k in layer_linears(shape).values():
            w = torch.randn(n, k, generator=gen, device=device) * k ** -0.5
            pre = torch.exp(0.3 * torch.randn(k, generator=gen, device=device)).half()
            tensors = {}
            for label, (algo, kernels) in variants.items():
                if algo not in tensors:
                    tensors[algo] = _quantize(algo, w, pre, group)
                out[label].append((make_linear(algo, tensors[algo], dtype=torch.float16, device=device,
                                               group_size=group, kernels=kernels), k))
            del w, tensors
    log(f"built {layers} layers × {len(layer_linears(shape))} linears for {len(variants)} variants; "
        f"GPU memory {torch.cuda.memory_allocated(device) / 2**30:.1f} GiB")
    return out


def graph(fn) -> torch.cuda.CUDAGraph:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g


def time_graph(g: torch.cuda.CUDAGraph, reps: int = 3) -> float:
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        g.replay()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / reps  # ms


def interleaved(graphs: dict, rounds: int) -> dict[object, list[float]]:
    """name → ms of each round: every round replays every graph, the order rotating by one a round, so that the
    machine's drift falls on all of them alike (ratios paired by round cancel it)."""
    names = list(graphs)
    times: dict = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            times[n].append(time_graph(graphs[n]))
    return times


def step_fn(handlers: list, xs: dict[int, torch.Tensor]):
    def run():
        for h, k in handlers:
            h.fused(xs[k])
    return run


def sweep_kpack(handlers: list, group: int, xs_by_m: dict, log) -> list[dict]:
    """The k-packed tensor-core kernel alone over :data:`SWEEP` at each row count of ``xs_by_m`` (up to
    W4K_MAX_M), on the int4 handlers' weights (repacked per KW); its prologue (the pre-quant scale) is left out."""
    from quant.runtime import cuda_kernels as ck
    from quant.runtime.schemes.base import unpack_int4_rows

    rows = []
    handlers = [h for h, _ in handlers]
    qs = [unpack_int4_rows(h.weight) for h in handlers]
    for kw_req in sorted({t[1] for t in SWEEP}):
        kws = [ck.w4k_kw(q.shape[1], group, kw_req) for q in qs]
        packed = [ck.pack_int4_k(q, kw) for q, kw in zip(qs, kws)]
        rows_xs = [(m, xs) for m, xs in sorted(xs_by_m.items()) if m <= ck.W4K_MAX_M]
        for (m, xs), tile in itertools.product(rows_xs, [t for t in SWEEP if t[1] == kw_req]):
            def run(tile=tile, xs=xs):
                for h, w, kw in zip(handlers, packed, kws):
                    ck.w4k_mm(xs[h.inp], w, h.scales, group=group, kw=kw, tile=tile)
            try:
                g = graph(run)
                ms = statistics.median(time_graph(g) for _ in range(5))
            except Exception as exc:  # a tile that does not compile or run (shared memory) is reported, not fatal
                log(f"sweep M={m} {tile}: {type(exc).__name__}: {str(exc)[:200]}")
                continue
            rows.append({"M": m, "tile": list(tile), "ms": ms})
            log(f"sweep kpack M={m} {tile}: {ms * 1e3:8.1f} us per step")
            del g
        del packed
        torch.cuda.empty_cache()
    return rows


def sweep_w4g(handlers: list, group: int, xs_by_m: dict, shape: str, log) -> list[dict]:
    """The compiled INT4 GEMV over its tiles (cuda_ext.GEMV_TILES) at 1–4 rows, at one row in both forms (grid 0:
    one block per row block; -1: persistent), on the handlers' GEMV copies, as the runtime launches it by default
    (at one row the pre-quant scale in the kernel; at more rows it is left out). At one row each linear kind is
    timed alone too (µs a call: the best tile may differ between a wide linear and a narrow, long one)."""
    from quant.runtime import cuda_ext

    rows = []
    for m, xs in sorted(xs_by_m.items()):
        if m > cuda_ext.GEMV_MAX_ROWS:
            continue
        parts = {"step": handlers, **(by_kind(handlers, shape) if m == 1 else {})}
        for tile, persistent in itertools.product(cuda_ext.GEMV_TILES, (False, True) if m == 1 else (False,)):
            row = {"M": m, "tile": list(tile), "persistent": persistent}
            for part, hl in parts.items():
                def run(hl=hl, tile=tile, grid=cuda_ext.grid(persistent, m)):
                    for h, _ in hl:
                        cuda_ext.w4a16_gemv(xs[h.inp], h.w4g, h.scales, group=group, tile=tile, grid=grid,
                                            prequant=h.prequant if cuda_ext.fuses(m, h.inp) else None)
                g = graph(run)
                ms = statistics.median(time_graph(g) for _ in range(5))
                row["ms" if part == "step" else f"us_{part}"] = ms if part == "step" else ms * 1e3 / len(hl)
                del g
            rows.append(row)
            kinds = "".join(f", {k[3:]} {v:.1f}" for k, v in row.items() if k.startswith("us_"))
            log(f"sweep w4g M={m} {tile}{' persistent' if persistent else ''}: {row['ms'] * 1e3:8.1f} us per step"
                + (f" (us a call{kinds})" if kinds else ""))
    return rows


def by_kind(handlers: list, shape: str) -> dict[str, list]:
    """A variant's handlers split by linear kind (layer_linears' names): build() appends each layer's linears in
    layer_linears' order, so kind j is every len(kinds)-th handler from j."""
    kinds = list(layer_linears(shape))
    assert len(handlers) % len(kinds) == 0
    return {kind: handlers[j::len(kinds)] for j, kind in enumerate(kinds)}


@cli_entry
def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m experiments.kernel_bench", description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="llama2-7b", choices=["llama2-7b", "llama3-8b"])
    p.add_argument("--layers", type=positive_int, default=32, help="layers of distinct weights (32: the model's)")
    p.add_argument("--batch-sizes", default="1,4,8,16,32")
    p.add_argument("--group", type=positive_int, default=128)
    p.add_argument("--rounds", type=positive_int, default=30)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--sweep", action="store_true",
                   help="sweep the k-packed INT4 kernel's tiles first, at each batch size up to 64")
    p.add_argument("--sweep-w4g", action="store_true",
                   help="sweep the compiled INT4 GEMV's tiles at 1-4 rows first (needs the 'int4 w4g' variant)")
    p.add_argument("--sweep-w8g", action="store_true",
                   help="time each 8-bit '… runtime' variant at every other tile of the compiled GEMV, interleaved")
    p.add_argument("--per-linear", action="store_true",
                   help="also time each linear kind alone (qkv, o, gate_up, down), in the same rounds")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--out", type=Path, default=Path("results/kernel_bench.json"))
    args = p.parse_args(argv)
    labels = [v for v in args.variants.split(",") if v]
    if not labels or any(v not in VARIANTS for v in labels) or labels[0] != "fp16 cuBLAS":
        raise UserError(f"--variants: a comma-separated list from {', '.join(VARIANTS)}, 'fp16 cuBLAS' first")
    batch_sizes = _ints(args.batch_sizes)
    ensure_writable_file(args.out)  # before the GPU's minutes, not after them
    device = torch.device("cuda")
    check_cuda(device)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    record = {"command": "python -m experiments.kernel_bench " + " ".join(argv if argv is not None else sys.argv[1:]),
              "created": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "shape": args.shape, "layers": args.layers,
              "linears": layer_linears(args.shape), "group": args.group, **environment(device)}
    record["copy_bandwidth"] = copy = copy_bandwidth(device)
    log(f"GPU {record.get('gpu')}; copy bandwidth {copy['gbs']:.0f} GB/s")
    variants = {v: VARIANTS[v] for v in labels}
    if args.sweep_w8g:
        from quant.runtime import cuda_ext

        for v in [v for v in labels if v.endswith(" runtime") and VARIANTS[v][0] in cuda_ext.W8_FORMATS]:
            algo, kernels = VARIANTS[v]
            for tile in [t for t in cuda_ext.GEMV_TILES if t != cuda_ext.W8G_TILES[algo]]:  # "… runtime" has it
                variants[f"{v.removesuffix(' runtime')} w8g {tile[0]}x{tile[1]}"] = (
                    algo, dataclasses.replace(kernels, w8g_tile=tile))
    hs = build(args.shape, args.layers, variants, args.group, device, args.seed, log)
    gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    ks = sorted({k for _, k in layer_linears(args.shape).values()})
    xs = {m: {k: torch.randn(m, k, generator=gen, device=device).half() for k in ks} for m in batch_sizes}
    if args.sweep and "int4 kpack" in hs:
        record["sweep"] = sweep_kpack(hs["int4 kpack"], args.group, xs, log)
        if not record["sweep"]:
            raise UserError("no tile of the k-packed INT4 kernel ran (see the log)")
        fastest = {}
        for r in record["sweep"]:
            fastest[r["M"]] = min(fastest.get(r["M"], r), r, key=lambda t: t["ms"])
        for m, r in sorted(fastest.items()):
            log(f"sweep: fastest tile at M={m} {r['tile']}")
        best = fastest[min(fastest)]["tile"]
        tuned = KernelConfig(int4_kernel="kpack", w4k_rows=(1, 64), w4k_tile=tuple(best))
        hs |= build(args.shape, args.layers, {"int4 kpack*": ("W4A16_AWQ", tuned)}, args.group, device, args.seed,
                    log)
    if args.sweep_w4g and "int4 w4g" in hs:
        if hs["int4 w4g"][0][0].w4g is None:
            raise UserError(f"the compiled INT4 GEMV is not available: "
                            f"{hs['int4 w4g'][0][0].gemv_unavailable or 'a shape or dtype it does not take'}")
        sw = {m: xs[m] for m in batch_sizes}
        record["sweep_w4g"] = sweep_w4g(hs["int4 w4g"], args.group, sw, args.shape, log)
        best = min((r for r in record["sweep_w4g"] if r["M"] == 1), key=lambda r: r["ms"])
        log(f"sweep w4g: fastest tile at 1 row {best['tile']}{' persistent' if best['persistent'] else ''}")
        tuned = KernelConfig(w4g_rows=(1, 4), w4g_tile=tuple(best["tile"]), w4g_persistent=best["persistent"])
        hs |= build(args.shape, args.layers, {"int4 w4g*": ("W4A16_AWQ", tuned)}, args.group, device, args.seed,
                    log)
    # (variant, rows, part): part "step" is every linear of the step, else one kind's (--per-linear)
    parts = {v: {"step": hl, **(by_kind(hl, args.shape) if args.per_linear else {})} for v, hl in hs.items()}
    graphs = {(v, m, part): graph(step_fn(hl, xs[m])) for v in hs for m in batch_sizes
              for part, hl in parts[v].items()}
    times = interleaved(graphs, args.rounds)
    rows = []
    for (v, m, part) in graphs:
        ref = times[("fp16 cuBLAS", m, part)]
        q = ratio_ci(ref, times[(v, m, part)])  # speed-up over fp16 cuBLAS: its time / this time, paired by round
        nbytes = sum(h.nbytes for h, _ in parts[v][part])
        ms = statistics.median(times[(v, m, part)])
        rows.append({"variant": v, "M": m, "part": part, "calls": len(parts[v][part]), "ms": ms,
                     "speedup": q.ratio, "ci": [q.low, q.high], "bytes": nbytes, "gbs": nbytes / ms / 1e6,
                     "of_copy_bw": nbytes / ms / 1e6 / copy["gbs"], "kernel": hs[v][0][0].kernel,
                     "rounds_ms": times[(v, m, part)]})
    record["rows"] = rows
    atomic_write_json(args.out, record)  # a reader never sees half a record
    print(f"{args.shape}, {args.layers} layers, group {args.group}; {args.rounds} interleaved rounds; copy bandwidth "
          f"{copy['gbs']:.0f} GB/s; {record['gpu']['name']}")
    print("| variant | M | ms per step (linears) | × fp16 cuBLAS [95% CI] | GB/s | of copy BW | kernel |")
    print("|---|---|---|---|---|---|---|")
    for r in sorted((r for r in rows if r["part"] == "step"), key=lambda r: (r["M"], -r["speedup"])):
        print(f"| {r['variant']} | {r['M']} | {r['ms']:.3f} | {r['speedup']:.2f} [{r['ci'][0]:.2f}, {r['ci'][1]:.2f}] "
              f"| {r['gbs']:.0f} | {r['of_copy_bw'] * 100:.0f}% | {r['kernel']} |")
    if args.per_linear:
        print("\n| variant | M | linear | µs a call | MB a call | × fp16 cuBLAS [95% CI] | of copy BW |")
        print("|---|---|---|---|---|---|---|")
        for r in sorted((r for r in rows if r["part"] != "step"), key=lambda r: (r["M"], r["variant"])):
            print(f"| {r['variant']} | {r['M']} | {r['part']} | {r['ms'] * 1e3 / r['calls']:.1f} | "
                  f"{r['bytes'] / r['calls'] / 1e6:.1f} | {r['speedup']:.2f} [{r['ci'][0]:.2f}, {r['ci'][1]:.2f}] | "
                  f"{r['of_copy_bw'] * 100:.0f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
