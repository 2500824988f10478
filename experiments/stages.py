"""The search's measurement of one candidate, in stages that are each cached on their own.

1. **proxy**: mean NLL per held-out document (aclsum *val*), paired by document with the FP16 baseline's: the
   cheap signal measured before any generation.
2. **blocks**: summaries of the evaluation articles, one block at a time, always the same articles in the same
   blocks for every recipe (the seeded permutation of the split, cut by the block schedule), so every candidate
   is compared with the FP16 baseline on the same articles, and a block is never generated twice.
3. **latency**: the workload timed ``latency_repeats`` times; the per-run times give its interval.

Each stage's record is keyed by the code that measures it, the model, recipe, calibration and the settings the
stage depends on (experiments/store.py). The article blocks depend on the block schedule only through which
articles they hold, so a search with another gate or ceiling reuses them.
"""
from __future__ import annotations

import time

from experiments.evaluate import Candidate
from experiments.store import cached_evaluate, settings_payload, stage_key
from quant.memory import return_freed_memory

# Which settings each stage's numbers depend on (everything else stays out of its key).
_RUNTIME = ("device", "compute_dtype", "backend")
_PROXY = (*_RUNTIME, "seed")
_SUMMARIES = (*_RUNTIME, "dataset", "split", "input_column", "reference_column", "max_input_len", "max_output_len",
              "batch_size", "seed")
_LATENCY = (*_RUNTIME, "batch_size", "input_len", "output_len", "latency_repeats", "seed")


def block_bounds(first: int, ceiling: int) -> list[int]:
    """Article counts after each look: ``first``, doubling, capped at and always ending with ``ceiling``.

    Doubling keeps the number of looks (and so the correction each look pays) logarithmic in the ceiling."""
    bounds, n = [], first
    while n < ceiling:
        bounds.append(n)
        n *= 2
    return bounds + [ceiling]


class Measurer:
    """Measures recipes for one search: the model, calibration, settings, samples and block schedule are fixed."""

    def __init__(self, settings, model, calib, backend, *, samples, bounds: list[int], proxy_docs: int,
                 proxy_seq_len: int, log, device):
        """``device``: this process's :class:`~experiments.device_use.DeviceUse`; each stage's work holds it
        shared, a latency's timing exclusive (and never inside a shared span: see that module's contract)."""
        self.settings, self.model, self.calib, self.backend, self.device = settings, model, calib, backend, device
        self.samples, self.bounds = samples, bounds
        self.proxy_docs, self.proxy_seq_len, self.log = proxy_docs, proxy_seq_len, log
        self._open: dict[str, object] = {}

    # -- candidates in a runtime: built once per recipe, only when a stage is not cached --------------------
    def _candidate(self, recipe):
        """The recipe's Candidate; at most two stay open (the one measured and the FP16 baseline it is paired
        with), so alternating between them does not reopen either."""
        cand = self._open.pop(recipe.hash, None)
        if cand is None:
            cand = Candidate(self.settings, recipe, model=self.model, calib=self.calib, log=self.log,
                             backend=self.backend)
        self._open[recipe.hash] = cand  # most recently used last
        while len(self._open) > 2:
            self._open.pop(next(iter(self._open))).close()
            return_freed_memory()
        return cand

    def release(self) -> None:
        for cand in self._open.values():
            cand.close()  # the runtimes' memory goes with them; the cache may evict their checkpoints
        self._open.clear()
        return_freed_memory()

    def _key(self, stage: str, recipe, keep: tuple[str, ...], **extra) -> str:
        return stage_key(stage, self.model.content_hash, recipe, self.calib,
                         {"settings": settings_payload(self.settings, keep), **extra})

    def _base(self, cand, recipe) -> dict:
        return {"recipe": recipe.to_dict(), "recipe_hash": recipe.hash, "recipe_label": recipe.label,
                "checkpoint": cand.checkpoint_info(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}

    # -- stages ---------------------------------------------------------------------------------------------
    def proxy(self, recipe) -> tuple[dict, bool]:
        """Held-out NLL per document (``doc_nll``), perplexity, and whether the logits are finite."""
        def run():
            with self.device.shared():
                cand = self._candidate(recipe)
                nll = cand.heldout_nll(self.proxy_docs, self.proxy_seq_len)
            return {**self._base(cand, recipe), "stage": "proxy", "perplexity": nll}

        key = self._key("proxy", recipe, _PROXY, docs=self.proxy_docs, seq_len=self.proxy_seq_len)
        return cached_evaluate(key, run, required={"perplexity": dict, "checkpoint": dict})

    def block(self, recipe, index: int) -> tuple[dict, bool]:
        """Summaries and ROUGE of block ``index`` (articles ``bounds[index-1]:bounds[index]``)."""
        lo = self.bounds[index - 1] if index else 0
        part = self.samples[lo:self.bounds[index]]

        def run():
            with self.device.shared():
                cand = self._candidate(recipe)
                return {**self._base(cand, recipe), "stage": "block", **cand.summarize(part)}

        key = self._key("block", recipe, _SUMMARIES, articles=[s.id for s in part])
        return cached_evaluate(key, run, required={"rouge": dict, "health": dict, "checkpoint": dict})

    def latency(self, recipe) -> tuple[dict, bool]:
        def run():
            with self.device.shared():
                cand = self._candidate(recipe)
            with self.device.exclusive():
                lat = cand.latency()
            return {**self._base(cand, recipe), "stage": "latency", "latency": lat.to_dict(),
                    "runtime": cand.describe()}

        key = self._key("latency", recipe, _LATENCY)
        # A latency measured while other processes took the cores is reported (flagged) but not cached: the next
        # run measures it again instead of inheriting the slowdown.
        return cached_evaluate(key, run, required={"latency": dict, "runtime": dict, "checkpoint": dict},
                               keep=lambda rec: not rec["latency"]["load"]["loaded"])
