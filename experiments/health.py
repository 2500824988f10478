"""Guards against garbage models: a quantized checkpoint that emits NaN/Inf or one token on repeat must never
pass as a fast, successful recipe.

Checked on every evaluation: the logits of a real prompt are finite, and the summaries are not degenerate
(most samples running to the token budget on one repeated token).
"""
from __future__ import annotations

import math

import torch

DEGENERATE_FRACTION = 0.5  # more than half the samples degenerate → the model is broken, not merely weak


def is_degenerate(tokens: list[int], budget: int) -> bool:
    """One token (or a 2-token cycle) repeated over the second half of a generation that hit the budget."""
    if len(tokens) < budget or budget < 4:
        return False
    tail = tokens[budget // 2:]
    return len(set(tail)) <= 2


def check(runtime, prompt: list[int], generations: list[list[int]], budget: int, perplexity: float | None) -> dict:
    # Engines built without context logits (TensorRT-LLM) cannot show them; the token checks still apply.
    finite = bool(torch.isfinite(runtime.logits(prompt)).all()) if getattr(runtime, "supports_logits", True) else True
    degenerate = sum(is_degenerate(t, budget) for t in generations)
    reasons = []
    if not finite:
        reasons.append("NaN/Inf in the logits")
    if perplexity is not None and not math.isfinite(perplexity):
        reasons.append("non-finite perplexity")
    if degenerate > DEGENERATE_FRACTION * len(generations):
        reasons.append(f"degenerate output: {degenerate}/{len(generations)} summaries repeat one token to the budget")
    return {"finite_logits": finite, "degenerate_samples": degenerate, "ok": not reasons, "reasons": reasons}
