"""Prints the bench variant ``attnBxSwW`` of the fastest tile in an experiments.attn_bench record whose interval
lies above the default's, or nothing (w4g.sh's attn_e2e stage times it end to end)."""
import json
import sys

rows = [r for r in json.load(open(sys.argv[1]))["rows"] if "tile" in r and r["name"] != "default" and r["ci"][0] > 1]
if rows:
    b, s, w = max(rows, key=lambda r: r["speedup"])["tile"]
    print(f"attn{b}x{s}w{w}")
