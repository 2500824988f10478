"""Named fault-injection points and a trace hook, for the crash and concurrency tests (no-ops otherwise).

``QUANT_SUITE_KILL_AT=NAME`` makes the process send itself SIGKILL the first time it reaches
``point("NAME")``; ``NAME@N`` on the N-th time; ``NAME[@N]:INT`` or ``:TERM`` sends SIGINT (Ctrl-C) or SIGTERM
(a job scheduler's stop) instead, which the process handles (quant/errors.cli_entry). A SIGKILL cannot be caught, so this is a real crash of a real
process at a known place (between a temporary write and its rename, inside ModelOpt's calibration loop, ...):
what the tests then check is what any power cut or OOM kill would leave behind.

``QUANT_SUITE_TRACE=FILE`` makes :func:`trace` append one JSON line per event (pid, wall time, event, fields)
to FILE with a single ``O_APPEND`` write, which concurrent processes cannot interleave; the concurrency tests
read it to prove that no two processes were ever inside the same build lock at once.

Both variables are read once per process, so an unset variable costs one dictionary lookup per call.
"""
from __future__ import annotations

import functools
import itertools
import json
import os
import signal
import sys
import time

KILL_ENV = "QUANT_SUITE_KILL_AT"
TRACE_ENV = "QUANT_SUITE_TRACE"
STOP_ENV = "QUANT_SUITE_STOP_AT"

# Every point the product code calls, in the order a search reaches them (docs/reliability.md lists them too).
POINTS = {
    "model.resolve": "--model's path checked, before its hashing and conversion (every command's heavy work "
                     "starts here; its flags are checked by then)",
    "model.convert": "model conversion: fp16 weights written to the temporary folder, tokenizer not yet",
    "checkpoint.export": "ModelOpt wrote the TRT-LLM checkpoint into the temporary folder, before the "
                         "rotary fix and validation",
    "checkpoint.rename": "checkpoint folder complete and validated, just before its rename into the cache",
    "eval.summaries": "evaluation: after the first batch of summaries",
    "eval.latency": "latency measurement: after the warm-up run",
    "eval.record": "evaluation record written to its temporary file, just before the rename",
    "calib.collect": "calibration statistics collected, nothing written yet",
    "calib.write": "statistics tensors written to the temporary folder, meta.json not yet",
    "quantize.modelopt": "inside ModelOpt's calibration forward loop (mtq.quantize)",
    "trial.commit": "trial measured and its attributes stored, before optuna marks it COMPLETE",
    "trial.committed": "trial COMPLETE in the storage, before the next trial starts",
    "report.write": "report.md written to its temporary file, just before the rename",
    "best.write": "best_recipe.yaml written to its temporary file, just before the rename",
    "plot.write": "a plot PNG written to its temporary file, just before the rename",
    "engine.rename": "TensorRT-LLM engine folder complete, just before its rename into the cache",
    "cache.evict": "cache budget: an entry's locks taken for eviction, before it is renamed away and deleted",
}

@functools.cache
def _kill_target() -> tuple[str, int, int] | None:
    """(point, N-th hit, signal) from ``$QUANT_SUITE_KILL_AT``, read once per process; None when unset."""
    raw = os.environ.get(KILL_ENV, "").strip()
    if not raw:
        return None
    where, _, sig = raw.partition(":")
    name, _, nth = where.partition("@")
    try:
        count = int(nth) if nth else 1
    except ValueError:
        count = 1
    return name, max(count, 1), {"INT": signal.SIGINT, "TERM": signal.SIGTERM}.get(sig.upper(), signal.SIGKILL)


@functools.cache
def _hits(name: str) -> itertools.count:
    """How often this process reached a point: ``next()`` is the current hit's number."""
    return itertools.count(1)


class Stop(BaseException):
    """Raised by :func:`point` where ``$QUANT_SUITE_STOP_AT`` names it: a test running a command in its own
    interpreter ends it there (a BaseException: no product code catches it)."""


def point(name: str) -> None:
    """Signal this process here when ``$QUANT_SUITE_KILL_AT`` names this point (and this is the N-th hit)."""
    if os.environ.get(STOP_ENV) == name:  # read on every call: an in-process test sets it
        raise Stop(name)
    target = _kill_target()
    if not target or target[0] != name:
        return
    hit = next(_hits(name))
    if hit != target[1]:
        return
    trace("killed", point=name, hit=hit, signal=int(target[2]))
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os.kill(os.getpid(), target[2])


def trace(event: str, **fields) -> None:
    """Append ``{"pid", "t", "event", **fields}`` to ``$QUANT_SUITE_TRACE`` (nothing when it is unset)."""
    trace_path = os.environ.get(TRACE_ENV)
    if not trace_path:
        return
    line = json.dumps({"pid": os.getpid(), "t": time.time(), "event": event, **fields}, default=str) + "\n"
    fd = os.open(trace_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)
