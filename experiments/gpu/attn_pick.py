"""Prints the bench variant ``attnBxSwW`` of the fastest tile in an experiments.attn_bench record whose interval
lies above the default's, or nothing (w4g.sh's attn_e2e stage times it end to end). With ``grouped`` as the second
argument (EXPERIMENT): ``attngBxSwW``, the grouped kernel's fastest tile, whatever its interval."""
import json
import sys

grouped = sys.argv[2:] == ["grouped"]
# tile rows only (named BxSwW, or "grouped BxSwW"), not the default's or a peer's
rows = [r for r in json.load(open(sys.argv[1]))["rows"] if "tile" in r and r["name"] != "default"
        and r["name"].startswith("grouped ") == grouped and (grouped or r["ci"][0] > 1)]
if rows:
    b, s, w = max(rows, key=lambda r: r["speedup"])["tile"]
    print(f"attn{'g' if grouped else ''}{b}x{s}w{w}")
