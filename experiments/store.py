"""Evaluation records cached by what determines them, so an identical recipe is never evaluated twice.

Key: model content hash, recipe hash, calibration key and every evaluation setting that changes a number
(dataset, samples, lengths, workload, device, dtype). Shared by all runs and all workers on one cache folder:
the first worker to claim a key evaluates it under a file lock, the others wait and read its record.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from quant.apply import build_lock
from quant.atomic import atomic_write_json
from quant.paths import cache_root

# Settings that do not change any measured number stay out of the key.
_NOT_IN_KEY = {"progress", "model"}


def code_revision() -> str:
    """Hash of the code that produces the numbers (runtime, latency, ROUGE, prompts): editing it invalidates
    cached records instead of silently mixing measurements of two versions in one study."""
    import experiments
    import quant.runtime

    roots = [Path(quant.runtime.__file__).parent, Path(experiments.__file__).parent]
    files = sorted(p for root in roots for p in root.glob("*.py")
                   if p.name in _MEASURING or root.name == "runtime")
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode() + f.read_bytes())
    return digest.hexdigest()[:12]


_MEASURING = {"latency.py", "rouge.py", "prompts.py", "evaluate.py", "perplexity.py", "datasets.py"}


def evaluation_key(model_hash: str, recipe, calib, settings) -> str:
    payload = {
        "code": code_revision(),
        "model": model_hash,
        "recipe": recipe.hash,
        "calib": calib.key if recipe.needs_calibration else None,
        "settings": {k: v for k, v in dataclasses.asdict(settings).items() if k not in _NOT_IN_KEY},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


def record_path(key: str) -> Path:
    return cache_root() / "evaluations" / f"{key}.json"


def load_record(key: str) -> dict | None:
    path = record_path(key)
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return None  # unreadable: treat as absent and re-evaluate (writes are atomic, so this is rare)
    return record if record.get("evaluation_key") == key else None


def cached_evaluate(key: str, evaluate_fn) -> tuple[dict, bool]:
    """Return (record, was_cached); evaluate under the key's lock when no record exists."""
    record = load_record(key)
    if record is not None:
        return record, True
    path = record_path(key)
    with build_lock(path):
        record = load_record(key)
        if record is not None:
            return record, True
        record = evaluate_fn()
        record["evaluation_key"] = key
        atomic_write_json(path, record)
    return record, False
