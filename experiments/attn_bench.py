"""``python -m experiments.attn_bench``: batch-1 decode attention alone, its split kernel's tiles timed interleaved.

For a shape (``llama2-7b``, ``llama3-8b``), every layer's KV cache, allocated for ``--context`` + ``--new`` keys as
the runtime's decode state is, and one decode token at ``--context`` + ``--new`` / 2 (the middle of the generation).
The calls cycle over as many sets of the layers' caches (each distinct) as make their keys and values at least 3×
the GPU's L2, so that every call reads them from memory, as in a decode step, where a layer's weights pass through
the L2 between two of its attention calls (one set of Llama-3-8B's caches is only 1.5× an H100's L2). Per tile of
the split kernel (KernelConfig.attn_tile: keys a loop step, keys a split, warps), one CUDA graph of those calls made
as the runtime makes them at batch 1 (cuda_kernels.DecodeAttention, RoPE and the cache write in the launch, the
splits combined by the last program; ``--pdl``: in attn_pdl's early form, each launch overlapping the one before as
it does the qkv GEMV's, the form INT4 and, on an H100, the 8-bit formats run). A peer in the same rounds: torch's
``scaled_dot_product_attention`` over the same caches cut at the token (attention only: its RoPE and cache write are
not in it). Rounds replay every graph in a rotating order; each tile's time is divided by the default tile's
(cuda_kernels.ATTN_TILE) of the same round, and the mean log ratio's t interval gives the ratio's CI
(experiments/stats.py). Bandwidth: the keys and values a call reads / time, as a share of the device-to-device copy
bandwidth measured at the start of the run. Every tile's output is compared with the default tile's (max
|difference|: other splits sum in another order).

``--trace``: where a call's time goes. The default tile's graph again, its kernel built with TRACE (each program
stamps %globaltimer and %clock64 at the phases of cuda_kernels.ATTN_PHASES, each once the value it follows is known),
replayed ``--trace-replays`` times. Printed: each phase's time from the call's first program's entry (median, 90th
percentile and last over every program of every call), each phase's time from the program's previous one, the
combine, the call's span, and the gap from one call's last program to the next call's first (the launch between
two kernels of a graph); and the traced call's time × the untraced one's (interleaved rounds), the stamps' cost.
"""
from __future__ import annotations

import dataclasses
import itertools
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from experiments.bench import copy_bandwidth, environment, kernel_variant
from experiments.kernel_bench import graph, interleaved
from experiments.stats import ratio_ci
from quant.atomic import atomic_write_json, ensure_writable_file
from quant.errors import ArgumentParser, UserError, cli_entry, positive_int, seed_int
from quant.runtime.random_checkpoint import SHAPES
from quant.runtime.schemes.base import KernelConfig
from quant.runtime.torch_runtime import check_cuda

# the tiles --sweep times besides the default: (keys a loop step, keys a split or 0, warps)
SWEEP = [*itertools.product((16, 32, 64), (0, 64, 128, 256), (1, 2, 4)), (64, 0, 8), (128, 0, 4), (128, 128, 4)]
PEER = "torch sdpa"


def parse_tiles(text: str) -> list[tuple[int, int, int]]:
    """``BxSwW,…`` (as experiments.bench's ``@attnBxSwW``) → tiles KernelConfig takes."""
    tiles = []
    for t in (t.strip() for t in text.split(",") if t.strip()):
        try:
            tile = kernel_variant(f"attn{t}")["attn_tile"]
            KernelConfig(attn_tile=tile)  # (its limits, in one place)
        except KeyError:
            raise UserError(f"--tiles: {t!r} is not a tile BxSwW (B keys a step, S keys a split, W warps)") from None
        except ValueError as exc:
            raise UserError(f"--tiles: {t!r} is not a tile BxSwW: {exc}") from None
        tiles.append(tile)
    return tiles


@cli_entry
def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m experiments.attn_bench", description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="llama2-7b", choices=["llama2-7b", "llama3-8b"])
    p.add_argument("--context", type=positive_int, default=512, help="prompt keys already in the cache")
    p.add_argument("--new", type=positive_int, default=64, help="new tokens the cache is allocated for")
    p.add_argument("--tiles", default="", help="tiles BxSwW to time besides the default, comma-separated")
    p.add_argument("--sweep", action="store_true", help=f"time the {len(SWEEP)} tiles of a sweep as well")
    p.add_argument("--no-peer", action="store_true", help=f"leave out the {PEER} row")
    p.add_argument("--rounds", type=positive_int, default=30)
    p.add_argument("--trace", action="store_true", help="stamp the default tile's phases and print where a call's "
                   "time goes")
    p.add_argument("--pdl", action="store_true", help="the calls in attn_pdl's early form, launched with "
                   "programmatic dependent launch (as INT4's attention runs)")
    p.add_argument("--trace-replays", type=positive_int, default=20, help="graph replays the trace pools")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--out", type=Path, default=Path("results/attn_bench.json"))
    args = p.parse_args(argv)
    from quant.runtime import cuda_kernels as ck
    from quant.runtime import rope

    default = ck.ATTN_TILE
    tiles = list(dict.fromkeys([default, *parse_tiles(args.tiles), *(SWEEP if args.sweep else [])]))
    ensure_writable_file(args.out)  # before the GPU's minutes, not after them
    device = torch.device("cuda")
    check_cuda(device)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    d = SHAPES[args.shape]
    H, KVH, L = d["num_attention_heads"], d["num_key_value_heads"], d["num_hidden_layers"]
    D = d["hidden_size"] // H
    total, slot = args.context + args.new, args.context + args.new // 2
    record = {"command": "python -m experiments.attn_bench " + " ".join(argv if argv is not None else sys.argv[1:]),
              "created": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "shape": args.shape, "layers": L, "heads": H,
              "kv_heads": KVH, "head_dim": D, "allocated": total, "keys_read": slot + 1, **environment(device)}
    record["copy_bandwidth"] = copy = copy_bandwidth(device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    per_call = 2 * KVH * (slot + 1) * D * 2  # the keys and values a call reads
    set_bytes = 2 * KVH * total * D * 2 * L  # one set of the layers' caches
    sets = max(1, -(-3 * torch.cuda.get_device_properties(device).L2_cache_size // set_bytes))
    calls = L * sets  # (a graph's; each call's caches distinct: see the docstring)
    record.update(cache_sets=sets, calls_a_replay=calls, pdl=args.pdl)
    nbytes = per_call * calls
    ks = [torch.randn(1, KVH, total, D, generator=gen, device=device).half() for _ in range(calls)]
    vs = [torch.randn(1, KVH, total, D, generator=gen, device=device).half() for _ in range(calls)]
    qkv = torch.randn(1, (H + 2 * KVH) * D, generator=gen, device=device).half()
    mask = torch.ones(1, total, dtype=torch.bool, device=device)
    pos, slot_t = torch.tensor([slot], device=device), torch.tensor(slot, device=device)
    freq = rope.inv_freq(D, 10000.0, None).to(device)

    runs, outs, info = {}, {}, {}
    for tile in tiles:
        name = "default" if tile == default else "x".join(map(str, tile[:2])) + f"w{tile[2]}"
        att = ck.DecodeAttention(1, H, KVH, D, total, torch.float16, device, fused_reduce=True, tile=tile)
        out = outs[name] = torch.empty(calls, H * D, dtype=torch.float16, device=device)

        def run(att=att, out=out):
            for i in range(calls):
                att(qkv, ks[i], vs[i], mask, slot_t, rope=(pos, freq, None), out=out[i:i + 1], pdl=args.pdl)
        try:
            runs[name] = graph(run)
        except Exception as exc:  # a tile that does not compile or launch (registers, shared memory) is reported
            log(f"{name} {tile}: {type(exc).__name__}: {str(exc)[:200]}")
            continue
        info[name] = {"tile": list(tile), "nsplit": att.nsplit, "split": att.split, "programs": H * att.nsplit}
        log(f"{name}: tile {tile}, {att.nsplit} splits of {att.split} keys")
    if "default" not in runs:
        raise UserError("the default tile did not run (see the log)")
    if not args.no_peer:
        q = qkv[:, :H * D].view(1, H, 1, D)
        sdpa_out = torch.empty(calls, 1, H, 1, D, dtype=torch.float16, device=device)

        def run_sdpa():
            for i in range(calls):
                sdpa_out[i] = F.scaled_dot_product_attention(q, ks[i][:, :, :slot + 1], vs[i][:, :, :slot + 1],
                                                             enable_gqa=KVH != H)
        try:
            runs[PEER] = graph(run_sdpa)
        except Exception as exc:  # (a backend that cannot be captured: the table goes on without the peer)
            log(f"{PEER}: {type(exc).__name__}: {str(exc)[:200]}")
    torch.cuda.synchronize()
    times = interleaved(runs, args.rounds)
    rows = []
    for n in runs:
        ratio = ratio_ci(times["default"], times[n])  # speed-up over the default tile: its time / this, by round
        ms = statistics.median(times[n])
        diff = (outs[n].float() - outs["default"].float()).abs().max().item() if n in outs else None
        rows.append({"name": n, **info.get(n, {}), "us_a_call": ms * 1e3 / calls, "speedup": ratio.ratio,
                     "ci": [ratio.low, ratio.high], "gbs": nbytes / ms / 1e6,
                     "of_copy_bw": nbytes / ms / 1e6 / copy["gbs"],
                     "max_abs_diff": diff, "rounds_ms": times[n]})
    record["rows"] = rows
    if args.trace:
        tr = torch.zeros(calls, H * info["default"]["nsplit"], len(ck.ATTN_PHASES), 2, dtype=torch.int64,
                         device=device)
        att = ck.DecodeAttention(1, H, KVH, D, total, torch.float16, device, fused_reduce=True, tile=default)
        out_t = torch.empty(calls, H * D, dtype=torch.float16, device=device)

        def run_traced():
            for i in range(calls):
                att(qkv, ks[i], vs[i], mask, slot_t, rope=(pos, freq, None), out=out_t[i:i + 1], trace=tr[i],
                    pdl=args.pdl)
        g = graph(run_traced)
        stamps = []
        for _ in range(args.trace_replays):
            tr.zero_()
            g.replay()
            stamps.append(tr.cpu())
        cost = interleaved({"default": runs["default"], "traced": g}, args.rounds)
        record["trace"] = summary = trace_summary(torch.stack(stamps), ck.ATTN_PHASES)
        summary["traced_x_untraced"] = dataclasses.asdict(ratio_ci(cost["traced"], cost["default"]))
        summary["same_output"] = bool(torch.equal(out_t, outs["default"]))
    atomic_write_json(args.out, record)  # a reader never sees half a record
    print(f"{args.shape}: {H} heads on {KVH} KV heads of {D}, {L} layers × {sets} cache sets, {slot + 1} keys read of "
          f"{total} allocated, batch 1{', attn_pdl form' if args.pdl else ''}; default tile {default}; {args.rounds} "
          f"interleaved rounds; copy bandwidth {copy['gbs']:.0f} GB/s; {record['gpu']['name']}")
    print("| tile | splits × keys | µs a call | × default [95% CI] | GB/s | of copy BW | max abs diff to default |")
    print("|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: -r["speedup"]):
        split = f"{r['nsplit']} × {r['split']}" if "nsplit" in r else "–"
        diff = "–" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.1e}"
        print(f"| {r['name']} | {split} | {r['us_a_call']:.2f} | {r['speedup']:.2f} [{r['ci'][0]:.2f}, "
              f"{r['ci'][1]:.2f}] | {r['gbs']:.0f} | {r['of_copy_bw'] * 100:.0f}% | {diff} |")
    if args.trace:
        print_trace(record["trace"])
    return 0


def _pct(values: torch.Tensor, q: float) -> float:
    return float(torch.quantile(values.double(), q)) if values.numel() else float("nan")


def trace_summary(stamps: torch.Tensor, phases: tuple[str, ...]) -> dict:
    """stamps int64 [replays, calls, programs, phases, 2] (%globaltimer ns, %clock64 cycles; 0 where a program did not
    reach a phase: only each (row, head)'s last program combines) → the trace's table (print_trace). Times are from
    each call's first entry; a program's step from its previous phase is in ns and in its SM's cycles. The first call
    of a replay has no gap before it (the host launched the graph)."""
    ns, clk = stamps[..., 0], stamps[..., 1]
    reached = ns > 0
    start = ns[..., 0].min(dim=-1).values  # [replays, calls]
    last = ns.amax(dim=(-1, -2))  # a call's last stamp (a phase not reached is 0)
    since = ns - start[..., None, None]
    rows = []
    for k, name in enumerate(phases):
        at = since[..., k][reached[..., k]]
        row = {"phase": name, "programs": int(at.numel()), "from_start_ns": [_pct(at, .5), _pct(at, .9),
                                                                             float(at.max()) if at.numel() else 0.]}
        if k:
            both = reached[..., k] & reached[..., k - 1]
            step = (ns[..., k] - ns[..., k - 1])[both]
            cyc = (clk[..., k] - clk[..., k - 1])[both]
            row.update(step_ns=[_pct(step, .5), _pct(step, .9)], step_cycles=[_pct(cyc, .5), _pct(cyc, .9)])
        rows.append(row)
    gaps = (start[:, 1:] - last[:, :-1]).flatten()
    span = (last - start).flatten()
    whole = reached[..., -1]  # programs that stamped every phase: the clock's rate over their whole run
    dns, dclk = (ns[..., -1] - ns[..., 0])[whole], (clk[..., -1] - clk[..., 0])[whole]
    steps = ns.diff(dim=-2).abs()  # the globaltimer's resolution: the smallest step it shows between two programs
    return {"replays": stamps.shape[0], "calls": stamps.shape[1], "programs": stamps.shape[2], "rows": rows,
            "span_ns": [_pct(span, .5), _pct(span, .9)], "gap_ns": [_pct(gaps, .5), _pct(gaps, .9)],
            "clock_ghz": _pct(dclk.double() / dns.double(), .5) if dns.numel() else float("nan"),
            "timer_step_ns": float(steps[steps > 0].min()) if bool((steps > 0).any()) else float("nan")}


def print_trace(t: dict) -> None:
    print(f"\ntrace: {t['replays']} replays × {t['calls']} calls × {t['programs']} programs; call span median "
          f"{t['span_ns'][0]:.0f} ns (p90 {t['span_ns'][1]:.0f}); gap to the next call's first entry median "
          f"{t['gap_ns'][0]:.0f} ns (p90 {t['gap_ns'][1]:.0f}); SM clock {t['clock_ghz']:.2f} GHz; globaltimer step "
          f"{t['timer_step_ns']:.0f} ns; traced × untraced {t['traced_x_untraced']['ratio']:.3f}; same output: "
          f"{t['same_output']}")
    print("| phase | programs | from the call's start: median / p90 / last (ns) | from the phase before: median / p90 "
          "(ns) | (cycles) |")
    print("|---|---|---|---|---|")
    for r in t["rows"]:
        step = (f"{r['step_ns'][0]:.0f} / {r['step_ns'][1]:.0f} | {r['step_cycles'][0]:.0f} / "
                f"{r['step_cycles'][1]:.0f}") if "step_ns" in r else "– | –"
        f = r["from_start_ns"]
        print(f"| {r['phase']} | {r['programs']} | {f[0]:.0f} / {f[1]:.0f} / {f[2]:.0f} | {step} |")


if __name__ == "__main__":
    sys.exit(main())
