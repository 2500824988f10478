"""Show where a model's activation outliers are: a table of the worst linears and one plot per layer type.

    python -m calibration [--model default] [--calib-source aclsum] [--calib-samples 32] [--calib-seq-len 256]
                          [--calib-seed 0] [--top 15] [--plot-dir results/calibration]

The statistics come from the cache when (model, calibration spec) was seen before, and are computed and
cached otherwise; the first line says which.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path

from calibration.data import add_calib_args, calib_spec_from_args, iter_documents
from quant.atomic import atomic_write_bytes, ensure_writable_dir
from quant.errors import ArgumentParser, UserError, cli_entry, positive_int
from quant.model_source import resolve_model

KIND_FILES = {"attention.qkv": "qkv", "attention.dense": "dense", "mlp.fc": "fc", "mlp.proj": "proj"}


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m calibration", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="'default' (embedded SmolLM2-135M-Instruct), a .gguf file or a HF folder")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="let transformers run Python code shipped in the --model folder (off by default)")
    add_calib_args(parser, standalone=True)
    parser.add_argument("--top", type=positive_int, default=15, help="rows of the outlier table")
    parser.add_argument("--plot-dir", type=Path, default=Path("results") / "calibration",
                        help="where the outlier plots go")
    return parser


def format_table(stats, top: int) -> str:
    rows = [("rank", "linear", "outlier score", "max |x|", "median |x|", "top channel")]
    for rank, o in enumerate(stats.top_outliers(top), 1):
        rows.append((str(rank), o.name, f"{o.score:.1f}", f"{o.max_absmax:.3g}", f"{o.median_absmax:.3g}", str(o.top_channel)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    align = ["<", "<", ">", ">", ">", ">"]
    return "\n".join("  ".join(f"{cell:{a}{w}}" for cell, a, w in zip(row, align, widths)) for row in rows)


def plot_kind(stats, kind: str, title_suffix: str) -> bytes:
    """PNG bytes: outlier score across depth, and the channel profile of the worst layer of this kind (log)."""
    import matplotlib

    from calibration.stats import LINEAR_KINDS, split_name

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    names = stats.by_kind(kind)
    depth = [split_name(n)[0] for n in names]
    scores = [stats.outlier_score(n) for n in names]
    worst = max(names, key=stats.outlier_score)
    w = stats.outlier(worst)

    fig = Figure(figsize=(13, 4.8), dpi=110, layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=[1, 1.6])
    left.plot(depth, scores, marker="o", markersize=4, color="tab:blue", label="max / median channel absmax")
    left.scatter([split_name(worst)[0]], [w.score], s=120, marker="*", color="tab:red", zorder=3,
                 label=f"worst: layer {split_name(worst)[0]} ({w.score:.1f})")
    if max(scores) / max(min(scores), 1e-12) > 20:
        left.set_yscale("log")
    left.set_xlabel("decoder layer")
    left.set_ylabel("outlier score (max / median absmax)")
    left.set_title("outlier score across depth")
    left.grid(True, alpha=0.3)
    left.legend(fontsize=8)

    absmax = stats.absmax[worst].numpy()
    mean_abs = stats.mean_abs[worst].numpy()
    channels = range(len(absmax))
    right.plot(channels, absmax, linewidth=0.7, color="tab:red", label="absmax")
    right.plot(channels, mean_abs, linewidth=0.7, color="tab:gray", alpha=0.8, label="mean |x|")
    right.axhline(w.median_absmax, color="black", linestyle="--", linewidth=0.8, label=f"median absmax {w.median_absmax:.3g}")
    right.scatter([w.top_channel], [w.max_absmax], s=60, marker="v", color="black", zorder=3,
                  label=f"top channel {w.top_channel}: {w.max_absmax:.3g}")
    right.set_yscale("log")
    right.set_xlabel("input channel")
    right.set_ylabel("|activation| (log scale)")
    right.set_title(f"{worst}: per-channel input absmax ({w.tokens} tokens)")
    right.grid(True, which="major", alpha=0.3)
    low = float(min(mean_abs[mean_abs > 0].min(initial=w.median_absmax), absmax[absmax > 0].min(initial=w.median_absmax)))
    right.set_ylim(low / 2, w.max_absmax * 12)  # headroom above the peak for the legend
    right.legend(fontsize=8, loc="upper right", ncol=2)

    fig.suptitle(f"{kind} — input of {LINEAR_KINDS[kind].split('.')[-1]}{title_suffix}")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def write_plots(stats, plot_dir: Path, title_suffix: str = "") -> list[Path]:
    paths = []
    for kind, short in KIND_FILES.items():
        if not stats.by_kind(kind):
            continue
        path = Path(plot_dir) / f"outliers-{short}.png"
        atomic_write_bytes(path, plot_kind(stats, kind, title_suffix))
        paths.append(path)
    return paths


def _use_all_cores() -> None:
    """Every core for intra-op work unless the user pinned a number (OMP_NUM_THREADS)."""
    import torch

    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(os.cpu_count() or 1)


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Imported after the flags are read: torch costs seconds, and --help or a bad flag need none of it.
    from calibration.stats import get_stats, stats_dir

    spec = calib_spec_from_args(args)
    spec.key  # hash a local source now: an unreadable file fails before the model is touched

    # Read the first document too: a file without a usable text column fails before the model is converted
    # (work and a cache entry for a run that would be refused).
    if next(iter_documents(spec.source, seed=spec.seed, text_column=spec.text_column), None) is None:
        raise UserError(f"calibration source {spec.source} holds no text")

    ensure_writable_dir(args.plot_dir, "--plot-dir")  # before the model work, not after it

    _use_all_cores()
    resolved = resolve_model(args.model, trust_remote_code=args.trust_remote_code)
    folder = stats_dir(resolved, spec)
    started = time.perf_counter()
    stats = get_stats(resolved, spec)
    seconds = time.perf_counter() - started
    what = f"{spec.num_samples}x{spec.seq_len} tokens of {spec.source}, seed {spec.seed}"
    if stats.from_cache:
        print(f"loaded activation statistics ({what}) from cache {folder} in {seconds:.2f} s")
    else:
        print(f"computed activation statistics ({what}) in {seconds:.1f} s; cached in {folder}")
    print(f"{len(stats.layers)} linears over {len(stats.layers) // 4} layers; "
          "mlp.gate (up_proj) shares mlp.fc's input, k/v share qkv's")
    print()
    print(format_table(stats, args.top))
    print()
    suffix = f" — model {args.model} ({resolved.short_hash}), {what}"
    for path in write_plots(stats, args.plot_dir, suffix):
        print(f"plot: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
