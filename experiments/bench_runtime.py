"""``python -m experiments.bench_runtime``: the PyTorch runtime vs HF transformers ``generate``, one run, one machine.

Both load the same weights (the runtime from the FP16 TRT-LLM checkpoint, HF from the cached fp16 HF folder the
checkpoint was exported from), get the same seeded prompts of exactly ``--input-len`` tokens and generate
exactly ``--output-len`` tokens (EOS ignored). TTFT is a 1-token generation; time per output token is the
difference between the full and the 1-token run divided by the extra tokens, for both, so the two columns
are measured the same way. Prints a Markdown table and writes JSON.
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

from experiments import environment
from experiments.latency import synthetic_prompts
from quant.apply import build_checkpoint
from quant.atomic import atomic_write_json
from quant.errors import ArgumentParser, cli_entry, positive_int
from quant.export import load_hf_model
from quant.model_source import resolve_model
from quant.recipes import Recipe
from quant.runtime.torch_runtime import TorchRuntime


def _time(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def bench_pair(gen_fn, output_len: int, repeats: int) -> dict:
    """gen_fn(n) generates n tokens for the whole batch."""
    first = _time(lambda: gen_fn(1), repeats)
    full = _time(lambda: gen_fn(output_len), repeats)
    ttft, total = statistics.median(first), statistics.median(full)
    tpot = (total - ttft) / (output_len - 1)
    return {"ttft_ms": ttft * 1e3, "tpot_ms": tpot * 1e3, "e2e_ms": total * 1e3,
            "ttft_spread_ms": (max(first) - min(first)) * 1e3, "e2e_spread_ms": (max(full) - min(full)) * 1e3}


@cli_entry
def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m experiments.bench_runtime", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="'default' (embedded SmolLM2-135M-Instruct), a .gguf file or a HF folder")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let transformers run Python code shipped in the --model folder (off by default)")
    p.add_argument("--batch-sizes", default="1,8", help="comma-separated batch sizes")
    p.add_argument("--input-len", type=positive_int, default=256, help="prompt tokens")
    p.add_argument("--output-len", type=positive_int, default=32, help="generated tokens")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed runs per point")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated compute dtypes")
    p.add_argument("--out", type=Path, default=Path("results/bench_runtime.json"), help="JSON record")
    args = p.parse_args(argv)
    if args.output_len < 2:
        p.error("--output-len must be >= 2 (time per output token needs a second token)")
    # Checked before any model work: a typo is a one-line error, not a traceback after the model load.
    try:
        batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError:
        batch_sizes = []
    if not batch_sizes or min(batch_sizes) <= 0:
        p.error(f"--batch-sizes must be comma-separated positive integers, got {args.batch_sizes!r}")
    dtypes = args.dtypes.split(",")
    if not dtypes or any(d not in ("float32", "bfloat16") for d in dtypes):
        p.error(f"--dtypes must be comma-separated float32/bfloat16, got {args.dtypes!r}")

    model = resolve_model(args.model, trust_remote_code=args.trust_remote_code)
    ckpt = build_checkpoint(model, Recipe("fp16"))
    rows = []
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        runtime = TorchRuntime.from_dir(ckpt, compute_dtype=dtype_name)
        hf = load_hf_model(model, dtype=dtype)
        for bs in batch_sizes:
            prompts = synthetic_prompts(bs, args.input_len, runtime.vocab, seed=0)
            ids = torch.tensor(prompts)
            mask = torch.ones_like(ids)

            def hf_gen(n):
                with torch.inference_mode():
                    hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                pad_token_id=0)

            def rt_gen(n):
                runtime.generate(prompts, n, ignore_eos=True)

            for name, fn in (("hf-generate", hf_gen), ("quant-runtime", rt_gen)):
                r = bench_pair(fn, args.output_len, args.repeats)
                r.update(engine=name, dtype=dtype_name, batch_size=bs,
                         decode_tok_s=bs / (r["tpot_ms"] / 1e3), e2e_tok_s=bs * args.output_len / (r["e2e_ms"] / 1e3))
                rows.append(r)
                print(f"{name:14s} {dtype_name:9s} bs={bs:<3d} TTFT {r['ttft_ms']:8.1f} ms  "
                      f"TPOT {r['tpot_ms']:7.2f} ms  {r['decode_tok_s']:7.1f} tok/s", file=sys.stderr)
        del hf, runtime

    header = "| engine | dtype | batch | TTFT ms | TPOT ms | decode tok/s | end-to-end tok/s |"
    lines = [header, "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['engine']} | {r['dtype']} | {r['batch_size']} | {r['ttft_ms']:.1f} | {r['tpot_ms']:.2f} "
                     f"| {r['decode_tok_s']:.1f} | {r['e2e_tok_s']:.1f} |")
    table = "\n".join(lines)
    record = {"input_len": args.input_len, "output_len": args.output_len, "repeats": args.repeats, "rows": rows,
              "machine": environment.machine(), "versions": environment.versions(),
              "command": "python -m experiments.bench_runtime " + " ".join(argv if argv is not None else sys.argv[1:]),
              "created": time.strftime("%Y-%m-%d")}
    atomic_write_json(args.out, record)
    print(table)
    print(f"\nmachine: {record['machine']['cpu']}, {record['machine']['cores']} cores; record: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
