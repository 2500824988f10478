"""Summarize Nsight Compute's warp-stall samples per SASS instruction of one kernel: where its warps wait.

Input: ``ncu --import REPORT --page source --print-source sass --csv`` of a report of one kernel launch profiled with
``--section SourceCounters`` (experiments/gpu/w4g.sh, stages gemv_ncu and attn_ncu). Prints the sampled total, the
instructions holding the most samples (address, SASS, share), and the shares by opcode (its first dotted part) and by
the stall reasons the export has columns for.

    python experiments/gpu/ncu_source.py FILE.csv [--top N]

Exit codes: 0 printed; 1 the file has no per-instruction sample column (its first lines are printed); 2 bad
arguments, or a file it cannot read (one line).
"""
from __future__ import annotations

import collections
import csv
import sys

from quant.errors import ArgumentParser, UserError, cli_entry, positive_int

SAMPLES = "Warp Stall Sampling (All Samples)"
NOT_ISSUED = "Warp Stall Sampling (Not-issued Samples)"


def rows(path: str) -> tuple[list[str], list[dict]]:
    """(header, rows) of the export's table: the first line naming the sample column starts it."""
    with open(path, newline="") as fh:
        lines = fh.read().splitlines()
    start = next((i for i, line in enumerate(lines) if SAMPLES in line), None)
    if start is None:
        return (lines[:3], [])
    reader = csv.DictReader(lines[start:])
    return reader.fieldnames or [], [r for r in reader if r.get("Source")]


def number(s: str | None) -> float:
    try:
        return float((s or "0").replace(",", ""))
    except ValueError:
        return 0.0


def summarize(header: list[str], table: list[dict], top: int) -> list[str]:
    total = sum(number(r[SAMPLES]) for r in table)
    out = [f"{len(table)} instructions, {total:.0f} warp-stall samples"]
    if not total:
        return out
    out.append(f"top {top} instructions by samples:")
    for r in sorted(table, key=lambda r: -number(r[SAMPLES]))[:top]:
        out.append(f"  {r.get('# Address', r.get('Address', '?')):>8}  {100 * number(r[SAMPLES]) / total:5.1f} %  "
                   f"{r['Source'].strip()[:90]}")
    by_op = collections.Counter()
    for r in table:
        op = r["Source"].strip().split()
        op = op[1] if op and op[0].startswith("@") and len(op) > 1 else (op[0] if op else "?")
        by_op[op.split(".")[0]] += number(r[SAMPLES])
    out.append("by opcode: " + ", ".join(f"{k} {100 * v / total:.1f} %" for k, v in by_op.most_common(12)))
    # the stall reasons, where the export has a column of each (names vary with the ncu version)
    reasons = [c for c in header if "stall" in c.lower() and c not in (SAMPLES, NOT_ISSUED)]
    sums = {c: sum(number(r.get(c)) for r in table) for c in reasons}
    if sums:
        out.append("by stall reason: " + ", ".join(f"{c} {100 * v / total:.1f} %"
                                                  for c, v in sorted(sums.items(), key=lambda kv: -kv[1])[:12] if v))
    return out


@cli_entry
def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="ncu_source.py", description=__doc__.split("\n\n")[0])
    p.add_argument("csv")
    p.add_argument("--top", type=positive_int, default=25, help="instructions listed")
    args = p.parse_args(argv)
    try:
        header, table = rows(args.csv)
    except OSError as e:
        raise UserError(f"cannot read {args.csv}: {e.strerror}") from None
    if not table:
        print(f"ncu_source: no '{SAMPLES}' column in {args.csv}; its first lines:", *header, sep="\n", file=sys.stderr)
        return 1
    print("\n".join(summarize(header, table, args.top)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
