"""ROUGE as TensorRT-LLM's ``examples/summarize.py`` reports it, plus a bootstrap interval for ROUGE-1.

summarize.py scores with ``evaluate.load("rouge")``, i.e. Google's ``rouge_score`` with ``use_stemmer=False``
and its default tokenizer, and prints each F-measure × 100. Its default aggregation is rouge_score's
``BootstrapAggregator`` (the median of 1000 resampled means, drawn from the global NumPy RNG), which is the
sample mean up to resampling noise; with ``--estimate_accuracy_std_dev`` it prints the plain mean. We report
the plain mean so that a score does not depend on RNG state, and add a seeded percentile-bootstrap interval
for ROUGE-1, the metric summarize.py's accuracy check compares against its threshold.

Differs from summarize.py in one place on purpose: rougeLsum. rouge_score computes it over sentences separated
by newlines; summarize.py passes model output as is, so for one-line output rougeLsum is just rougeL over a
single "sentence". :func:`sentence_lines` puts one sentence per line first (see there), so rougeLsum measures
what it is named for. ROUGE-1/2/L are unaffected: the tokenizer treats a newline like any other space.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import numpy as np
from rouge_score import rouge_scorer

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")

# Whitespace after sentence-final punctuation: ". ", "! ", "? " (and the same before a newline or tab).
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+")


@dataclass(frozen=True)
class RougeResult:
    """Mean F-measures × 100 over ``n`` samples, and a bootstrap interval for ``rouge1`` at ``confidence``."""

    rouge1: float
    rouge2: float
    rougeL: float
    rougeLsum: float
    rouge1_ci: tuple[float, float]
    confidence: float
    n: int
    per_sample_rouge1: list[float]

    def to_dict(self) -> dict:
        result = asdict(self)
        result["rouge1_ci"] = list(self.rouge1_ci)
        return result


def sentence_lines(text: str) -> str:
    """Return ``text`` with one sentence per line, the form rouge_score's rougeLsum expects.

    Text that already has newlines (e.g. CNN/DailyMail highlights, one per line) is taken to be split
    already: its lines are kept, stripped, blank ones dropped. Otherwise it is split after ``.``, ``!`` or
    ``?`` followed by whitespace. That is a heuristic (``e.g. this`` splits too), chosen over NLTK's sentence
    splitter because that needs the ``punkt`` data downloaded, and it is applied identically to predictions
    and references, so it cannot favour either.
    """
    if "\n" in text:
        lines = (line.strip() for line in text.splitlines())
    else:
        lines = (part.strip() for part in _SENTENCE_BREAK.split(text.strip()))
    return "\n".join(line for line in lines if line)


def bootstrap_ci(values, *, confidence: float = 0.95, n_boot: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Seeded percentile-bootstrap interval of the mean of ``values`` (per-sample scores)."""
    values = np.asarray(values, dtype=float)
    resampled_means = np.random.default_rng(seed).choice(values, size=(n_boot, values.size)).mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(resampled_means, [tail, 100 - tail])
    return float(low), float(high)


def score(
    predictions: list[str],
    references: list[str],
    *,
    confidence: float = 0.95,
    n_boot: int = 1000,
    seed: int = 0,
) -> RougeResult:
    """Score ``predictions[i]`` against ``references[i]``; see the module docstring for the conventions."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("no predictions to score")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=False)
    per_sample = {rouge_type: [] for rouge_type in ROUGE_TYPES}
    for prediction, reference in zip(predictions, references):
        scores = scorer.score(target=sentence_lines(reference), prediction=sentence_lines(prediction))
        for rouge_type in ROUGE_TYPES:
            per_sample[rouge_type].append(scores[rouge_type].fmeasure * 100)
    rouge1 = np.asarray(per_sample["rouge1"])
    low, high = bootstrap_ci(rouge1, confidence=confidence, n_boot=n_boot, seed=seed)
    return RougeResult(
        rouge1=float(rouge1.mean()),
        rouge2=float(np.mean(per_sample["rouge2"])),
        rougeL=float(np.mean(per_sample["rougeL"])),
        rougeLsum=float(np.mean(per_sample["rougeLsum"])),
        rouge1_ci=(float(low), float(high)),
        confidence=confidence,
        n=rouge1.size,
        per_sample_rouge1=[float(value) for value in rouge1],
    )
