"""Shared fixtures and helpers: an isolated cache, the real default model, tiny random LLaMa models, the packaged
aclsum records, a relative error.

The cache lives in ``<repo>/.cache/test`` (git-ignored) unless QUANT_SUITE_CACHE is set: xdist workers share it
(writes are atomic, so two workers converting the same model at once is safe), and a second local run reuses
the default model's conversion instead of spending ~20 s on it again.
"""
from __future__ import annotations

import importlib.util
import json
import os
import signal
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("QUANT_SUITE_CACHE", str(REPO / ".cache" / "test"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The commands the tests start import this tree's packages, whichever tree the environment's editable install maps:
# a virtual environment shared with another clone would otherwise run that clone's code from any working folder
# outside this one (and key its caches on that code), so a test of this tree could pass or fail on the other's.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
# Without a GPU, the runtime's Triton kernels run in Triton's interpreter (tests/test_triton_interpret.py); Triton
# reads this when a kernel is defined, so it is set before any test imports one.
if importlib.util.find_spec("triton") is not None:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
# The Ctrl-C tests send SIGINT to the commands they start, which inherit an ignored SIGINT: a shell without job
# control starts its background jobs (`make test &`, nohup) with SIGINT ignored, and Python then never installs
# its handler. A terminal's foreground command, whose Ctrl-C those tests model, has it at its default.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def default_model():
    from quant.model_source import resolve_model

    return resolve_model(None)


@pytest.fixture(scope="session")
def default_fp16_checkpoint(default_model):
    from quant.apply import build_checkpoint
    from quant.recipes import Recipe

    return build_checkpoint(default_model, Recipe("fp16"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, default_model):
    from tests.tiny import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama", tokenizer_from=default_model.hf_dir)


def aclsum_records(split: str) -> list[dict]:
    """The aclsum package's own JSONL rows of a split, read directly (the reference the loaders are held to)."""
    folder = Path(importlib.util.find_spec("aclsum").submodule_search_locations[0]) / "dataset"
    with (folder / f"{split}.jsonl").open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def rel(a, b) -> float:
    """‖a − b‖ / ‖b‖ in float64, on the CPU (either tensor may live on a GPU)."""
    return ((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm()).item()

