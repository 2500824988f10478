"""The search's figures: the accuracy/latency trade-off and per-recipe bars (PNG), optuna's views (HTML).

- ``tradeoff.png``: ROUGE-1 vs time per output token for every measured trial, the threshold line, the
  Pareto front, the chosen recipe labelled;
- ``recipes.png``: per-recipe bars of latency and ROUGE-1 (best trial of each label);
- ``history.html`` / ``importance.html``: optuna's plotly views (optimization history, parameter importance).
"""
from __future__ import annotations

import io
import sys
from pathlib import Path

from quant.atomic import atomic_write_bytes, atomic_write_text


def write_plots(study, summary, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    written = []
    measured = [r for r in summary.rows if r.state == "COMPLETE" and r.measured]
    if measured:
        fig, ax = plt.subplots(figsize=(8, 5.5))
        ok = [r for r in measured if r.feasible]
        bad = [r for r in measured if not r.feasible]
        ax.scatter([r.tpot_ms for r in ok], [r.rouge1 for r in ok], c="tab:green", label="passes", zorder=3)
        ax.scatter([r.tpot_ms for r in bad], [r.rouge1 for r in bad], c="tab:red", marker="x", label="fails", zorder=3)
        for r in measured:
            if r.rouge1_ci:
                ax.plot([r.tpot_ms, r.tpot_ms], r.rouge1_ci, c="0.75", lw=1, zorder=1)
        if summary.pareto:
            front = sorted(summary.pareto, key=lambda r: r.tpot_ms)
            ax.step([r.tpot_ms for r in front], [r.rouge1 for r in front], where="post", c="tab:blue", lw=1.2,
                    label="Pareto front", zorder=2)
            for r in front:
                ax.annotate(r.label, (r.tpot_ms, r.rouge1), textcoords="offset points", xytext=(4, -10), fontsize=7)
        if summary.threshold is not None:
            ax.axhline(summary.threshold, c="tab:orange", ls="--", label=f"threshold {summary.threshold:.1f}")
        if summary.best is not None:
            b = summary.best
            ax.scatter([b.tpot_ms], [b.rouge1], s=220, facecolors="none", edgecolors="black", lw=2, zorder=4,
                       label=f"chosen: {b.label}")
            ax.annotate(f"chosen: {b.label}", (b.tpot_ms, b.rouge1), textcoords="offset points", xytext=(6, 8),
                        fontsize=9, weight="bold")
        wl = study.user_attrs.get("workload", {})
        ax.set_xlabel(f"time per output token, ms (batch {wl.get('batch_size')}, in {wl.get('input_len')}, "
                      f"out {wl.get('output_len')}, {wl.get('device')})")
        ax.set_ylabel("ROUGE-1 (bars: bootstrap CI)")
        ax.set_title(f"Study {study.study_name}: accuracy vs latency ({len(measured)} measured trials)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
        written.append(save_png(fig, out_dir / "tradeoff.png"))
        plt.close(fig)

        best_per_label: dict = {}
        for r in measured:
            if r.label not in best_per_label or r.tpot_ms < best_per_label[r.label].tpot_ms:
                best_per_label[r.label] = r
        labels = sorted(best_per_label, key=lambda k: best_per_label[k].tpot_ms)
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, max(3, 0.4 * len(labels) + 1.5)), sharey=True)
        ys = range(len(labels))
        a1.barh(ys, [best_per_label[k].tpot_ms for k in labels], color="tab:blue")
        a1.set_yticks(list(ys), labels, fontsize=8)
        a1.set_xlabel("time per output token, ms")
        a2.barh(ys, [best_per_label[k].rouge1 for k in labels],
                color=["tab:green" if best_per_label[k].feasible else "tab:red" for k in labels])
        if summary.threshold is not None:
            a2.axvline(summary.threshold, c="tab:orange", ls="--")
        a2.set_xlabel("ROUGE-1")
        fig.suptitle("Per recipe: latency and ROUGE-1")
        written.append(save_png(fig, out_dir / "recipes.png"))
        plt.close(fig)

    written += _write_html(study, out_dir)
    return written


def _write_html(study, out_dir: Path) -> list[Path]:
    import optuna.visualization as vis

    written = []
    for name, make in (("history", vis.plot_optimization_history), ("importance", vis.plot_param_importances)):
        try:
            fig = make(study)
        except (ValueError, RuntimeError) as exc:
            # Importance needs ≥2 completed trials with varying params; say so instead of failing the search.
            print(f"note: {name}.html skipped ({str(exc).splitlines()[0]})", file=sys.stderr)
            continue
        path = out_dir / f"{name}.html"
        atomic_write_text(path, fig.to_html(include_plotlyjs=True, full_html=True))
        written.append(path)
    return written


def save_png(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue(), fault="plot.write")
    return path
