"""Prints the bench variant ``attnBxSwW`` of the fastest tile in an experiments.attn_bench record whose interval
lies above the default's, or nothing (w4g.sh's attn_e2e stage times it end to end). A tile whose output is more than
WRONG from the default tile's (NaN included) is never picked."""
import json
import sys

WRONG = 1e-2  # (other tiles sum in other orders: a few 1e-4 on attn_bench's caches)
# tile rows only (named BxSwW), not the default's or a peer's
rows = [r for r in json.load(open(sys.argv[1]))["rows"] if "tile" in r and r["name"] != "default" and r["ci"][0] > 1
        and r.get("max_abs_diff", 0.0) <= WRONG]  # (False for NaN)
if rows:
    b, s, w = max(rows, key=lambda r: r["speedup"])["tile"]
    print(f"attn{b}x{s}w{w}")
