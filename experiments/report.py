"""A search study as a table, a verdict, a best-recipe file, a Markdown/CSV report and plots.

Everything here reads the optuna study only (trial user attributes), so the same report can be regenerated
from any storage with ``python -m experiments.plot`` and the study opens unchanged in optuna-dashboard.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

from quant.atomic import atomic_write_bytes, atomic_write_text


@dataclass
class Row:
    number: int
    label: str
    state: str
    rouge1: float | None = None
    rouge1_ci: tuple[float, float] | None = None
    rouge1_for_constraint: float | None = None
    tpot_ms: float | None = None
    ttft_ms: float | None = None
    tokens_per_s: float | None = None
    perplexity: float | None = None
    feasible: bool | None = None
    reason: str = ""
    recipe: dict = field(default_factory=dict)
    checkpoint: str = ""

    @property
    def measured(self) -> bool:
        return self.tpot_ms is not None and self.rouge1 is not None


@dataclass
class StudySummary:
    rows: list[Row]
    threshold: float | None
    best: Row | None
    pareto: list[Row]
    closest: Row | None

    def table(self) -> str:
        head = f"{'#':>3}  {'recipe':30s} {'ROUGE-1':>7s} {'95% CI':>15s} {'TPOT ms':>8s} {'TTFT ms':>8s} {'tok/s':>7s} {'ppl':>6s}  result"
        lines = [head, "-" * len(head)]
        for r in sorted(self.rows, key=lambda r: (not r.measured, r.tpot_ms or 0.0, r.number)):
            if r.measured:
                ci = f"[{r.rouge1_ci[0]:.1f}, {r.rouge1_ci[1]:.1f}]" if r.rouge1_ci else ""
                ppl = f"{r.perplexity:6.2f}" if r.perplexity else "     -"
                verdict = "pass" if r.feasible else "FAIL"
                if self.best is not None and r.number == self.best.number:
                    verdict += "  <- best"
                lines.append(f"{r.number:>3}  {r.label:30s} {r.rouge1:7.2f} {ci:>15s} {r.tpot_ms:8.2f} "
                             f"{r.ttft_ms:8.1f} {r.tokens_per_s:7.1f} {ppl}  {verdict}")
            else:
                lines.append(f"{r.number:>3}  {r.label:30s} {'':>7s} {'':>15s} {'':>8s} {'':>8s} {'':>7s} {'':>6s}  "
                             f"{r.state.lower()}{': ' + r.reason if r.reason else ''}")
        if self.pareto:
            lines.append("")
            lines.append("Pareto front (ROUGE-1 up, latency down): " + ", ".join(
                f"#{r.number} {r.label} ({r.rouge1:.1f}, {r.tpot_ms:.1f} ms)" for r in self.pareto))
        return "\n".join(lines)

    def verdict(self) -> str:
        thr = f"{self.threshold:.2f}" if self.threshold is not None else "?"
        if self.best is not None:
            b = self.best
            return (f"chosen recipe: {b.label}  (trial #{b.number}: ROUGE-1 {b.rouge1:.2f} ≥ {thr}, "
                    f"{b.tpot_ms:.2f} ms per output token)\n  {b.recipe}")
        if self.closest is not None:
            c = self.closest
            return (f"no recipe passes ROUGE-1 ≥ {thr}; closest: {c.label} (trial #{c.number}: ROUGE-1 "
                    f"{c.rouge1:.2f}, {c.tpot_ms:.2f} ms per output token)")
        pruned = [r for r in self.rows if r.state == "PRUNED"]
        if pruned:  # e.g. every recipe of a broken model: say why rather than "no trial finished"
            first = min(pruned, key=lambda r: r.number)
            return (f"no recipe passes ROUGE-1 ≥ {thr}; all {len(pruned)} finished trial(s) were pruned "
                    f"(#{first.number} {first.label}: {first.reason})")
        return f"no recipe passes ROUGE-1 ≥ {thr}; no trial finished"


def summarize_study(study) -> StudySummary:
    rows = []
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        rows.append(Row(
            number=t.number, label=a.get("label", str(t.params)), state=t.state.name,
            rouge1=a.get("rouge1"), rouge1_ci=tuple(a["rouge1_ci"]) if a.get("rouge1_ci") else None,
            rouge1_for_constraint=a.get("rouge1_for_constraint"), tpot_ms=a.get("tpot_ms"), ttft_ms=a.get("ttft_ms"),
            tokens_per_s=a.get("tokens_per_s"), perplexity=a.get("perplexity"), feasible=a.get("feasible"),
            reason=a.get("pruned_reason", ""), recipe=a.get("recipe", {}), checkpoint=a.get("checkpoint", ""),
        ))
    measured = [r for r in rows if r.state == "COMPLETE" and r.measured]
    feasible = [r for r in measured if r.feasible]
    best = min(feasible, key=lambda r: (r.tpot_ms, r.number)) if feasible else None
    closest = max(measured, key=lambda r: (r.rouge1_for_constraint or r.rouge1)) if measured and not best else None
    pareto = pareto_front(measured)
    return StudySummary(rows=rows, threshold=study.user_attrs.get("threshold"), best=best, pareto=pareto,
                        closest=closest)


def pareto_front(rows: list[Row]) -> list[Row]:
    """Rows no other row beats on both ROUGE-1 (higher) and latency (lower); one per distinct point."""
    front, seen = [], set()
    for r in sorted(rows, key=lambda r: (r.tpot_ms, -r.rouge1)):
        dominated = any(o.rouge1 >= r.rouge1 and o.tpot_ms <= r.tpot_ms and (o.rouge1 > r.rouge1 or o.tpot_ms < r.tpot_ms)
                        for o in rows)
        key = (round(r.rouge1, 6), round(r.tpot_ms, 6))
        if not dominated and key not in seen:
            front.append(r)
            seen.add(key)
    return front


def write_outputs(study, summary: StudySummary, out_dir: Path) -> list[Path]:
    from quant.recipes import Recipe

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if summary.best is not None:
        b = summary.best
        path = out_dir / "best_recipe.yaml"
        Recipe.from_dict(b.recipe).dump(path, extra={
            "study": study.study_name, "trial": b.number, "rouge1": b.rouge1, "rouge1_ci": list(b.rouge1_ci or ()),
            "tpot_ms": b.tpot_ms, "ttft_ms": b.ttft_ms, "threshold": summary.threshold, "checkpoint": b.checkpoint},
            fault="best.write")
        written.append(path)
    written.append(_write_csv(summary, out_dir / "trials.csv"))
    written.append(_write_markdown(study, summary, out_dir / "report.md"))
    from experiments.plot import write_plots

    written += write_plots(study, summary, out_dir)
    return written


_CSV_FIELDS = ("number", "label", "state", "rouge1", "rouge1_ci", "rouge1_for_constraint", "tpot_ms", "ttft_ms",
               "tokens_per_s", "perplexity", "feasible", "reason", "checkpoint")


def _write_csv(summary: StudySummary, path: Path) -> Path:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(_CSV_FIELDS)
    for r in summary.rows:
        w.writerow([getattr(r, f) for f in _CSV_FIELDS])
    atomic_write_text(path, buf.getvalue())
    return path


def _write_markdown(study, summary: StudySummary, path: Path) -> Path:
    wl = study.user_attrs.get("workload", {})
    text = [f"# Study `{study.study_name}`", "",
            f"Threshold: ROUGE-1 ≥ {summary.threshold:.2f}" if summary.threshold is not None else "Threshold: ?",
            f"Workload: batch {wl.get('batch_size')}, input {wl.get('input_len')}, output {wl.get('output_len')} "
            f"on {wl.get('device')}", "", summary.verdict(), "",
            "| # | recipe | ROUGE-1 | 95% CI | TPOT ms | TTFT ms | tok/s | perplexity | result |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(summary.rows, key=lambda r: (not r.measured, r.tpot_ms or 0.0)):
        if r.measured:
            ci = f"[{r.rouge1_ci[0]:.2f}, {r.rouge1_ci[1]:.2f}]" if r.rouge1_ci else ""
            ppl = f"{r.perplexity:.2f}" if r.perplexity else "-"
            text.append(f"| {r.number} | {r.label} | {r.rouge1:.2f} | {ci} | {r.tpot_ms:.2f} | {r.ttft_ms:.1f} | "
                        f"{r.tokens_per_s:.1f} | {ppl} | {'pass' if r.feasible else 'fail'} |")
        else:
            text.append(f"| {r.number} | {r.label} | | | | | | | {r.state.lower()} {r.reason} |")
    atomic_write_text(path, "\n".join(text) + "\n", fault="report.write")
    return path


def save_png(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue(), fault="plot.write")
    return path
