"""Where the suite keeps its caches (model conversions, checkpoints, statistics)."""
from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$QUANT_SUITE_CACHE``, else ``~/.cache/quant-suite``; tests point it at a temp folder."""
    root = os.environ.get("QUANT_SUITE_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "quant-suite"
