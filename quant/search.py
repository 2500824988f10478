"""``python -m quant.search``: the entry point; the search itself is :mod:`experiments.search`.

A thin shim on top of every layer (docs/architecture.md), so the documented command stays where users know it.
"""
from experiments.search import main

if __name__ == "__main__":
    raise SystemExit(main())
