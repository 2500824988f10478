"""Measurements cached by what determines them, so an identical measurement is never made twice.

A record's key covers the stage (one of the search's: held-out NLL, a block of summaries, latency), everything that changes its numbers (model content hash, recipe hash, calibration key,
the settings that matter) and a hash of the code that produces it (:mod:`quant.codehash`: the import closure of
the measuring modules and the versions of the packages doing the arithmetic), so a code change can never serve
an old result. Shared by all runs and all workers on one cache folder: the first worker to claim a key measures
it under a file lock, the others wait and read its record.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from quant import faults
from quant.cache_budget import build_lock
from quant.atomic import atomic_write_json
from quant.codehash import code_hash
from quant.errors import EnvironmentProblem
from quant.paths import cache_root

MEASURING_PACKAGES = ("torch", "transformers", "nvidia-modelopt", "rouge-score", "numpy")


def code_revision() -> str:
    """Hash of the code that measures (evaluation, its stages, the runtimes it opens, ROUGE, latency)."""
    return code_hash("experiments.evaluate", "experiments.stages", packages=MEASURING_PACKAGES)


def stage_key(stage: str, model_hash: str, recipe, calib, payload: dict) -> str:
    body = {"code": code_revision(), "stage": stage, "model": model_hash, "recipe": recipe.hash,
            "calib": calib.key if recipe.needs_calibration and calib is not None else None, **payload}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:20]


def settings_payload(settings, keep: tuple[str, ...]) -> dict:
    """The settings a stage's numbers depend on (``keep``), as they go into its key."""
    d = dataclasses.asdict(settings)
    return {k: d[k] for k in keep}


def record_path(key: str) -> Path:
    return cache_root() / "evaluations" / f"{key}.json"


def load_record(key: str, required: dict | None = None) -> dict | None:
    """The cached record of ``key``, None when there is none; a damaged one is an error naming the file.

    Records are written by rename, so a damaged one was damaged after the fact (disk, hand edit): it is reported
    rather than silently re-measured over, like a damaged statistics cache (calibration.stats).
    ``required``: top-level field → type every reader of this kind of record relies on."""
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
    bad = [k for k, kind in (required or {}).items() if not isinstance(record.get(k), kind)]
    if bad:
        raise EnvironmentProblem(f"evaluation record {path} lacks {', '.join(bad)}; {hint}")
    return record


def cached_evaluate(key: str, evaluate_fn, *, required: dict | None = None, keep=None) -> tuple[dict, bool]:
    """Return (record, was_cached); measure under the key's lock when no record exists.

    ``keep(record)``: False leaves a fresh record out of the cache (a latency measured on a loaded machine)."""
    record = load_record(key, required)
    if record is not None:
        return record, True
    path = record_path(key)
    with build_lock(path):
        record = load_record(key, required)
        if record is not None:
            return record, True
        faults.trace("evaluation.run", key=key)  # counted by the concurrency tests: one measurement per key
        record = evaluate_fn()
        record["evaluation_key"] = key
        if keep is None or keep(record):
            atomic_write_json(path, record, fault="eval.record")
        else:
            faults.trace("evaluation.uncached", key=key)
    return record, False
