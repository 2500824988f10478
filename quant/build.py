"""``python -m quant.build``: the entry point; the build itself is :mod:`experiments.build`.

A thin shim on top of every layer (docs/architecture.md), so the documented command stays where users know it.
"""
from experiments.build import main

if __name__ == "__main__":
    raise SystemExit(main())
