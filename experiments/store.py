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

from quant import faults
from quant.apply import build_lock
from quant.atomic import atomic_write_json
from quant.errors import EnvironmentProblem
from quant.paths import cache_root

# Settings that do not change any measured number stay out of the key.
# trust_remote_code is inside the model hash already (quant.model_source.resolve_model).
_NOT_IN_KEY = {"progress", "model", "trust_remote_code"}


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


# What every reader of a record (the search, the report) takes from it.
_REQUIRED = {"rouge": dict, "latency": dict, "checkpoint": dict, "timings_s": dict}


def load_record(key: str) -> dict | None:
    """The cached record of ``key``, None when there is none; a damaged one is an error naming the file.

    Records are written by rename, so a damaged one was damaged after the fact (disk, hand edit): it is reported
    rather than silently re-measured over, like a damaged statistics cache (calibration.stats)."""
    path = record_path(key)
    hint = f"delete {path} to re-evaluate"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise EnvironmentProblem(f"evaluation record {path} is unreadable ({type(exc).__name__}); {hint}") from None
    if not isinstance(record, dict) or record.get("evaluation_key") != key:
        raise EnvironmentProblem(f"evaluation record {path} does not hold the evaluation of key {key}; {hint}")
    bad = [k for k, kind in _REQUIRED.items() if not isinstance(record.get(k), kind)]
    if bad or not isinstance(record["rouge"].get("rouge1"), (int, float)) or \
            not isinstance(record["latency"].get("tpot_ms"), (int, float)):
        raise EnvironmentProblem(f"evaluation record {path} lacks {', '.join(bad) or 'rouge1/tpot_ms'}; {hint}")
    return record


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
        faults.trace("evaluation.run", key=key)  # counted by the concurrency tests: one evaluation per key
        record = evaluate_fn()
        record["evaluation_key"] = key
        atomic_write_json(path, record, fault="eval.record")
    return record, False
