"""Perplexity of a checkpoint on held-out text: finer-grained than ROUGE on a few dozen papers.

Default text: aclsum *val* papers (abstract + introduction + conclusion), never the ROUGE test split nor the
calibration train split. Each document is cut to ``seq_len`` tokens and scored in one forward pass with the
runtime's own kernels; perplexity = exp(total NLL / predicted tokens).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from calibration.datasets import load_samples

PPL_SECTIONS = ("abstract", "introduction", "conclusion")


def heldout_texts(dataset: str = "aclsum", *, num_docs: int = 20, seed: int = 0) -> list[str]:
    samples = load_samples(dataset, split="val", num_samples=num_docs, seed=seed, aclsum_sections=PPL_SECTIONS)
    return [s.article for s in samples]


def perplexity(runtime, tokenizer, texts: list[str], *, seq_len: int = 512, decode: bool = False) -> dict:
    """Perplexity over all the texts, plus each document's mean NLL (nats/token): the search pairs these per
    document with the FP16 baseline's to get its cheap proxy (mean NLL gap). ``decode``: the logits of the runtime's
    batch-1 decode step, one token at a time (TorchRuntime.decode_logits, CUDA), instead of one forward pass."""
    nll, count, doc_nll = 0.0, 0, []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:seq_len]
        if len(ids) < 2:
            continue
        logits = runtime.decode_logits(ids) if decode else runtime.logits(ids)
        doc = F.cross_entropy(logits[:-1].float(), torch.tensor(ids[1:], device=logits.device), reduction="sum").item()
        nll += doc
        count += len(ids) - 1
        doc_nll.append(doc / (len(ids) - 1))
    return {"perplexity": math.exp(nll / count), "tokens": count, "docs": len(texts), "seq_len": seq_len,
            "doc_nll": doc_nll}
