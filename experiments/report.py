"""A search study as a table, a verdict, a best-recipe file, a Markdown/CSV report and plots.

Everything here reads the optuna study only (trial user attributes), so the same report can be regenerated
from any storage with ``python -m experiments.plot`` and the study opens unchanged in optuna-dashboard.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

from experiments.figures import write_plots
from quant.atomic import atomic_write_text
from quant.recipes import Recipe


@dataclass
class Row:
    number: int
    label: str
    state: str
    hash: str = ""
    n: int | None = None  # articles the accuracy verdict rests on
    rouge1: float | None = None
    rouge1_ci: tuple[float, float] | None = None
    drop: float | None = None  # paired: FP16 baseline minus this recipe, same articles
    drop_ci: tuple[float, float] | None = None
    gate_bound: float | None = None
    proxy: float | None = None  # held-out NLL gap to FP16, nats/token
    tpot_ms: float | None = None  # mean of the timed runs
    tpot_ci: tuple[float, float] | None = None
    ttft_ms: float | None = None
    tokens_per_s: float | None = None
    perplexity: float | None = None
    feasible: bool | None = None
    emulated: bool = False
    loaded: bool = False  # other processes took the cores while it was timed
    skipped_by_proxy: int | None = None
    slower_than: int | None = None  # shown slower (interleaved) than this passing trial: accuracy not measured
    reason: str = ""
    recipe: dict = field(default_factory=dict)
    checkpoint: str = ""

    @property
    def measured(self) -> bool:
        return self.tpot_ms is not None and self.rouge1 is not None

    def result(self) -> str:
        if self.slower_than is not None:
            return f"slower than #{self.slower_than} (not scored)"
        if self.skipped_by_proxy is not None:
            return f"FAIL (proxy: worse than #{self.skipped_by_proxy})"
        return "pass" if self.feasible else "FAIL"


@dataclass
class StudySummary:
    rows: list[Row]
    threshold: float | None
    gate: dict
    best: Row | None
    answer: dict | None
    confirmations: list[dict]
    pareto: list[Row]
    closest: Row | None
    proxy_rank: float | None  # Spearman of the proxy against the measured paired drop
    proxy_pairs: int
    stopped: str

    def table(self) -> str:
        head = (f"{'#':>3}  {'recipe':28s} {'n':>3s} {'ROUGE-1 [95% CI]':>21s} {'drop [95% CI]':>21s} "
                f"{'proxy':>7s} {'TPOT ms [95% CI]':>24s}  result")
        lines = [head, "-" * len(head)]
        for r in sorted(self.rows, key=lambda r: (r.tpot_ms is None, r.tpot_ms or 0.0, r.number)):
            if r.tpot_ms is not None:
                verdict = r.result()
                if r.emulated:
                    verdict += " emulated"
                if r.loaded:
                    verdict += " loaded"
                if self.best is not None and r.number == self.best.number:
                    verdict += "  <- chosen"
                lines.append(f"{r.number:>3}  {r.label:28s} {r.n or 0:>3d} {_ci(r.rouge1, r.rouge1_ci):>21s} "
                             f"{_ci(r.drop, r.drop_ci, '+'):>21s} {_num(r.proxy, '+.4f'):>7s} "
                             f"{_ci(r.tpot_ms, r.tpot_ci):>24s}  {verdict}")
            else:
                lines.append(f"{r.number:>3}  {r.label:28s} {'':>3s} {'':>21s} {'':>21s} {'':>7s} {'':>24s}  "
                             f"{r.state.lower()}{': ' + r.reason if r.reason else ''}")
        # On the terminal, the comparison that decided the answer; report.md keeps every one.
        deciding = [c for c in self.confirmations if self.answer and c.get("key") == self.answer.get("confirmation")]
        for c in deciding or self.confirmations:
            lines += ["", *confirmation_lines(c)]
        if deciding and len(self.confirmations) > 1:
            lines.append(f"({len(self.confirmations) - 1} earlier comparison(s): report.md)")
        if self.answer:
            lines += ["", f"tie set ({len(self.answer['tie'])}): {', '.join(self.answer['tie_labels'])}; "
                          f"rule: {self.answer['rule']}"]
            if self.answer.get("serve_with", "any") != "any":
                lines.append(f"searched only what --serve-with {self.answer['serve_with']} loads (docs/serving.md)")
        if self.proxy_rank is not None:
            lines.append(f"proxy vs measured drop: Spearman {self.proxy_rank:+.2f} over {self.proxy_pairs} recipes")
        if self.stopped:
            lines.append(f"search stopped: {self.stopped}")
        return "\n".join(lines)

    def verdict(self) -> str:
        thr = self.gate_text()
        if self.best is not None:
            b = self.best
            return (f"chosen recipe: {b.label}  (trial #{b.number}: ROUGE-1 {b.rouge1:.2f}, drop {b.drop:+.2f} on "
                    f"{b.n} articles, {thr}; {b.tpot_ms:.2f} ms per output token)\n  {b.recipe}")
        if self.answer is None and any(r.feasible for r in self.rows if r.measured):
            fastest = min((r for r in self.rows if r.measured and r.feasible), key=lambda r: r.tpot_ms)
            return (f"no answer: the search stopped before its final interleaved comparison; fastest passing trial "
                    f"so far #{fastest.number} {fastest.label} ({fastest.tpot_ms:.2f} ms per output token, not "
                    "confirmed) — run the same command again to finish")
        if self.closest is not None:
            c = self.closest
            return (f"no recipe passes {thr}; closest: {c.label} (trial #{c.number}: ROUGE-1 {c.rouge1:.2f}, "
                    f"{c.tpot_ms:.2f} ms per output token)")
        pruned = [r for r in self.rows if r.state == "PRUNED" and r.reason]
        if pruned:  # e.g. every recipe of a broken model: say why rather than "no trial finished"
            first = min(pruned, key=lambda r: r.number)
            return (f"no recipe passes {thr}; all {len(pruned)} finished trial(s) were pruned "
                    f"(#{first.number} {first.label}: {first.reason})")
        return f"no recipe passes {thr}; no trial finished"

    def gate_text(self) -> str:
        g = self.gate or {}
        if not g:
            return "the gate"
        conf = f" (one-sided {g['confidence']:g} bound)" if g.get("confidence") else ""
        return (f"ROUGE-1 ≥ {g['threshold']:.2f}{conf}" if g["kind"] == "absolute"
                else f"ROUGE-1 drop ≤ {g['threshold']:.2f}{conf}")


def _num(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _ci(v, ci, sign: str = "") -> str:
    if v is None:
        return "-"
    return f"{v:{sign}.2f} [{ci[0]:{sign}.2f}, {ci[1]:{sign}.2f}]" if ci else f"{v:{sign}.2f}"


def _level(c: dict) -> str:
    """The level a comparison's intervals were read at: corrected for its looks and candidates (experiments/confirm.py);
    records from before that correction hold only the nominal confidence."""
    if "level" in c:
        return f"{c['level'] * 100:.2f}% ({c['confidence'] * 100:g}% corrected for looks and candidates)"
    return f"{c['confidence'] * 100:g}%"


def confirmation_lines(c: dict) -> list[str]:
    labels = c.get("labels", {})
    loaded = f", {c['loaded_rounds']} round(s) on a loaded machine" if c.get("loaded_rounds") else ""
    capped = " — time cap hit, not resolved" if c["capped"] else ""
    out = [f"interleaved latency comparison: {c['rounds']} rounds, {c['seconds']:.0f} s, resolution "
           f"±{c['resolution'] * 100:.0f}%, intervals at {_level(c)}{capped}{loaded}"]
    for h in sorted(c["candidates"], key=lambda h: c["ratios"][h]["ratio"]):
        q = c["ratios"][h]
        tag = "leader" if h == c["leader"] else ("tie" if h in c["tie"] else "slower")
        out.append(f"  {labels.get(h, h):28s} {c['tpot_ms'][h]:8.2f} ms  ratio {q['ratio']:.3f} "
                   f"[{q['low']:.3f}, {q['high']:.3f}]  ±{q['half_width'] * 100:.1f}%  {tag}")
    return out


def summarize_study(study) -> StudySummary:
    from experiments.stats import spearman

    rows = []
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        if a.get("repeat_of") is not None:
            continue
        r = a.get("result") or {}
        lat = r.get("latency") or {}
        gate = r.get("gate") or {}
        rows.append(Row(
            number=t.number, label=a.get("label", str(t.params)), state=t.state.name, hash=r.get("hash", ""),
            n=gate.get("n") if gate.get("skipped_by_proxy") is not None else r.get("n"),
            rouge1=r.get("rouge1"), rouge1_ci=_pair(r.get("rouge1_ci")),
            drop=r.get("drop"), drop_ci=_pair(r.get("drop_ci")), gate_bound=gate.get("bound"),
            proxy=(r.get("proxy") or {}).get("nll_gap"), tpot_ms=lat.get("tpot_mean_ms"),
            tpot_ci=_pair(lat.get("tpot_ci")), ttft_ms=lat.get("ttft_ms"), tokens_per_s=lat.get("tokens_per_s"),
            perplexity=r.get("perplexity"), feasible=r.get("feasible"), emulated=bool(r.get("emulated")),
            loaded=bool((lat.get("load") or {}).get("loaded")), skipped_by_proxy=gate.get("skipped_by_proxy"),
            slower_than=gate.get("slower_than"),
            reason=a.get("pruned_reason", ""), recipe=r.get("recipe", a.get("recipe", {})),
            checkpoint=(r.get("checkpoint") or {}).get("path", ""),
        ))
    measured = [r for r in rows if r.state == "COMPLETE" and r.measured]
    answer = study.user_attrs.get("answer")
    best = next((r for r in measured if answer and r.hash == answer["chosen"]), None)
    feasible = [r for r in measured if r.feasible]
    closest = max(measured, key=lambda r: (-(r.drop or 0.0), r.rouge1)) if measured and not feasible else None
    paired = [r for r in measured if r.proxy is not None and r.drop is not None]
    gate = study.user_attrs.get("gate") or {}
    return StudySummary(rows=rows, threshold=gate.get("threshold"), gate=gate, best=best, answer=answer,
                        confirmations=study.user_attrs.get("confirmations", []), pareto=pareto_front(measured),
                        closest=closest, proxy_rank=spearman([r.proxy for r in paired], [r.drop for r in paired]),
                        proxy_pairs=len(paired), stopped=study.user_attrs.get("stopped", ""))


def _pair(v):
    return tuple(v) if v else None


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
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if summary.best is not None:
        b = summary.best
        path = out_dir / "best_recipe.yaml"
        Recipe.from_dict(b.recipe).dump(path, extra={
            "study": study.study_name, "trial": b.number, "rouge1": b.rouge1, "rouge1_ci": list(b.rouge1_ci or ()),
            "drop": b.drop, "drop_ci": list(b.drop_ci or ()), "articles": b.n, "tpot_ms": b.tpot_ms,
            "tpot_ci": list(b.tpot_ci or ()), "gate": summary.gate_text(), "tie_set": summary.answer["tie_labels"],
            "rule": summary.answer["rule"], "checkpoint": b.checkpoint}, fault="best.write")
        written.append(path)
    written.append(_write_csv(summary, out_dir / "trials.csv"))
    written.append(_write_markdown(study, summary, out_dir / "report.md"))
    written += write_plots(study, summary, out_dir)
    return written


_CSV_FIELDS = ("number", "label", "state", "n", "rouge1", "rouge1_ci", "drop", "drop_ci", "gate_bound", "proxy",
               "tpot_ms", "tpot_ci", "ttft_ms", "tokens_per_s", "perplexity", "feasible", "skipped_by_proxy",
               "emulated", "loaded", "reason", "checkpoint")


def _write_csv(summary: StudySummary, path: Path) -> Path:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(_CSV_FIELDS)
    for r in summary.rows:
        w.writerow([getattr(r, f) for f in _CSV_FIELDS])
    atomic_write_text(path, buf.getvalue())
    return path


def _looks_rule(gate: dict) -> str:
    if gate.get("confidence") is None:
        return "early stops at the Bonferroni-corrected 95% level, the point estimate at the ceiling"
    return (f"fails at the Bonferroni-corrected level, passes by {gate.get('spending', 'bonferroni')} error spending "
            f"on ≥ {gate.get('min_pass')} articles")


def _write_markdown(study, summary: StudySummary, path: Path) -> Path:
    wl = study.user_attrs.get("workload", {})
    g = summary.gate
    looks = ", ".join(map(str, g.get("bounds", []))) if g else "?"
    text = [f"# Study `{study.study_name}`", "",
            f"Gate: {summary.gate_text()}; sequential looks after {looks} articles ({_looks_rule(g)}; "
            f"experiments/stats.py)." if g else "Gate: ?",
            f"Workload: batch {wl.get('batch_size')}, input {wl.get('input_len')}, output {wl.get('output_len')} "
            f"on {wl.get('device')} ({wl.get('compute_dtype')})", "", summary.verdict(), "",
            "| # | recipe | articles | ROUGE-1 [95% CI] | paired drop [95% CI] | proxy (NLL gap) | TPOT ms [95% CI] "
            "| emulated | loaded | result |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(summary.rows, key=lambda r: (r.tpot_ms is None, r.tpot_ms or 0.0, r.number)):
        if r.tpot_ms is not None:
            res = r.result()
            if summary.best is not None and r.number == summary.best.number:
                res += " **chosen**"
            text.append(f"| {r.number} | {r.label} | {r.n or 0} | {_ci(r.rouge1, r.rouge1_ci)} | "
                        f"{_ci(r.drop, r.drop_ci, '+')} | {_num(r.proxy, '+.4f')} | {_ci(r.tpot_ms, r.tpot_ci)} | "
                        f"{'yes' if r.emulated else 'no'} | {'yes' if r.loaded else 'no'} | {res} |")
        else:
            text.append(f"| {r.number} | {r.label} | | | | | | | | {r.state.lower()} {r.reason} |")
    for c in summary.confirmations:
        labels = c.get("labels", {})
        text += ["", f"## Interleaved latency comparison ({c['rounds']} rounds, {c['seconds']:.0f} s"
                     f"{', time cap hit' if c['capped'] else ''}; {c.get('loaded_rounds', 0)} loaded round(s))", "",
                 f"| recipe | TPOT ms | ratio to leader [CI at {_level(c)}] | half-width | verdict |",
                 "|---|---|---|---|---|"]
        for h in sorted(c["candidates"], key=lambda h: c["ratios"][h]["ratio"]):
            q = c["ratios"][h]
            tag = "leader" if h == c["leader"] else ("tie" if h in c["tie"] else "slower")
            text.append(f"| {labels.get(h, h)} | {c['tpot_ms'][h]:.2f} | {q['ratio']:.3f} [{q['low']:.3f}, "
                        f"{q['high']:.3f}] | ±{q['half_width'] * 100:.1f}% | {tag} |")
    if summary.answer:
        text += ["", f"Tie set ({len(summary.answer['tie'])}): {', '.join(summary.answer['tie_labels'])}. "
                     f"Rule applied: {summary.answer['rule']}."]
    if summary.proxy_rank is not None:
        text += ["", f"Proxy (held-out NLL gap) against the measured paired ROUGE-1 drop: Spearman "
                     f"{summary.proxy_rank:+.2f} over {summary.proxy_pairs} recipes."]
    if summary.stopped:
        text += ["", f"Search stopped: {summary.stopped}."]
    atomic_write_text(path, "\n".join(text) + "\n", fault="report.write")
    return path
