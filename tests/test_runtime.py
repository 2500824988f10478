"""The PyTorch runtime executes a TRT-LLM checkpoint exactly like HF transformers executes the same weights.

Stated tolerances (float32 compute, both sides on identical fp16 weights): max |Δlogit| ≤ 1e-3 on logits of
magnitude ~30; greedy tokens identical. bfloat16 compute vs HF float32: mean |Δlogit| ≤ 0.3, max ≤ 3, and
≥ 90% top-1 agreement per position (bf16 keeps 8 mantissa bits; measured here: max 1.6 — this bounds drift,
it cannot be bit-equality).
"""
from __future__ import annotations

import json

import pytest
import torch

from quant.export import export_checkpoint
from quant.runtime.torch_runtime import TorchRuntime

PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "def fibonacci(n):",
    "Summarize: Large language models are expensive to serve because each generated token reads every weight.",
    "Quantization reduces",
]


@pytest.fixture(scope="module")
def default_setup(default_model, default_fp16_checkpoint):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quant.model_source import load_eos_ids

    tok = AutoTokenizer.from_pretrained(default_model.hf_dir)
    hf = AutoModelForCausalLM.from_pretrained(default_model.hf_dir, dtype=torch.float32).eval()
    rt = TorchRuntime.from_dir(default_fp16_checkpoint)
    return tok, hf, rt, load_eos_ids(default_model.hf_dir)


def _hf_greedy(hf, ids, n, eos):
    out = hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=0)
    gen = out[0, len(ids):].tolist()
    return gen[: next((i for i, t in enumerate(gen) if t in eos), len(gen))]


def test_default_model_greedy_equals_hf_in_one_padded_batch(default_setup):
    tok, hf, rt, eos = default_setup
    enc = [tok(p)["input_ids"] for p in PROMPTS]
    assert len({len(e) for e in enc}) > 2, "prompts must differ in length to exercise padding"
    gen = rt.generate(enc, 24, eos)
    for ids, ours in zip(enc, gen.tokens):
        assert ours == _hf_greedy(hf, ids, 24, eos)
        assert len(ours) > 0


def test_default_model_logits_match_hf(default_setup):
    tok, hf, rt, _ = default_setup
    for prompt in PROMPTS:
        ids = tok(prompt)["input_ids"]
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0].float()
        ours = rt.logits(ids)
        assert ours.shape == ref.shape
        assert (ours - ref).abs().max().item() <= 1e-3


def test_default_model_bfloat16_compute_stays_close(default_setup, default_fp16_checkpoint):
    tok, hf, _, _ = default_setup
    rt = TorchRuntime.from_dir(default_fp16_checkpoint, compute_dtype="bfloat16")
    agree = total = 0
    for prompt in PROMPTS:
        ids = tok(prompt)["input_ids"]
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0].float()
        ours = rt.logits(ids)
        assert (ours - ref).abs().mean().item() <= 0.3
        assert (ours - ref).abs().max().item() <= 3.0
        agree += (ours.argmax(-1) == ref.argmax(-1)).sum().item()
        total += len(ids)
    assert agree / total >= 0.9


def test_eos_stops_and_budget_limits(default_setup):
    tok, _, rt, eos = default_setup
    ids = tok(PROMPTS[0])["input_ids"]
    free = rt.generate([ids], 12, eos, ignore_eos=True)
    assert len(free.tokens[0]) == 12 and free.decode_steps == 11
    # Declare the 4th greedy token an EOS: generation must stop right before it.
    stop = free.tokens[0][3]
    first = free.tokens[0].index(stop)
    cut = rt.generate([ids], 12, [stop])
    assert cut.tokens[0] == free.tokens[0][:first]


def test_batch_equals_one_by_one(default_setup):
    tok, _, rt, eos = default_setup
    enc = [tok(p)["input_ids"] for p in PROMPTS]
    together = rt.generate(enc, 10, eos, ignore_eos=True).tokens
    alone = [rt.generate([e], 10, eos, ignore_eos=True).tokens[0] for e in enc]
    assert together == alone


def _export_tiny(tmp_path, name, **kwargs):
    from transformers import AutoModelForCausalLM

    from tests.tiny import make_tiny_llama

    hf_dir = make_tiny_llama(tmp_path / f"{name}-hf", **kwargs)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float16)
    ckpt = export_checkpoint(hf, tmp_path / f"{name}-ckpt")
    return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval(), ckpt


ROPE_CASES = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64},
}


@pytest.mark.parametrize("case", sorted(ROPE_CASES))
def test_rope_scaling_matches_hf_past_original_context(tmp_path, case):
    """Positions up to 300 (> 64 original context) exercise every llama3 frequency band."""
    hf, ckpt = _export_tiny(tmp_path, case, rope_scaling=ROPE_CASES[case], rope_theta=50000.0)
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["rotary_base"] == 50000.0
    rt = TorchRuntime.from_dir(ckpt)
    ids = torch.randint(1000, 40000, (300,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    assert (rt.logits(ids) - ref).abs().max().item() <= 1e-3


def test_rope_scaling_is_not_ignored(tmp_path):
    """Guard for the check above: dropping rotary_scaling from config.json must change the logits."""
    hf, ckpt = _export_tiny(tmp_path, "drop", rope_scaling=ROPE_CASES["linear"])
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["rotary_scaling"] = None
    (ckpt / "config.json").write_text(json.dumps(cfg))
    ids = list(range(1000, 1100))
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    assert (TorchRuntime.from_dir(ckpt).logits(ids) - ref).abs().max().item() > 1e-2


def test_tied_checkpoint_without_lm_head_uses_embedding(tmp_path):
    """TRT-LLM allows share_embedding_table with no lm_head tensor; ModelOpt writes a copy, we accept both."""
    from safetensors.torch import load_file, save_file

    hf, ckpt = _export_tiny(tmp_path, "tied", tie=True)
    tensors = load_file(ckpt / "rank0.safetensors")
    assert torch.equal(tensors["lm_head.weight"], tensors["transformer.vocab_embedding.weight"])
    del tensors["lm_head.weight"]
    save_file(tensors, ckpt / "rank0.safetensors")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["share_embedding_table"] = True
    (ckpt / "config.json").write_text(json.dumps(cfg))
    ids = list(range(2000, 2040))
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    assert (TorchRuntime.from_dir(ckpt).logits(ids) - ref).abs().max().item() <= 1e-3


def test_untied_lm_head_is_used(tmp_path):
    hf, ckpt = _export_tiny(tmp_path, "untied", tie=False)
    assert not torch.equal(hf.lm_head.weight, hf.model.embed_tokens.weight)
    ids = list(range(3000, 3030))
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    assert (TorchRuntime.from_dir(ckpt).logits(ids) - ref).abs().max().item() <= 1e-3


def test_decode_logits_is_refused_off_cuda(default_setup):
    """decode_logits runs the CUDA decode step (its rows against logits(): tests/test_cuda.py); on a CPU runtime it
    is one clear error, not a silent fallback to the prefill's logits."""
    from quant.errors import UserError

    _, _, rt, _ = default_setup
    with pytest.raises(UserError, match="decode_logits runs the CUDA decode step"):
        rt.decode_logits([1, 2, 3])


def test_dequant_ahead_hands_each_linear_its_own_copy_in_stream_order(monkeypatch):
    """KernelConfig.wq_prefill_ahead's protocol (schemes.base.DequantAhead), on CPU: CUDA's streams and events cannot
    run here, so torch.cuda's Stream, Event, current_stream and stream are replaced by fakes that log each operation
    with its stream (this test's mock boundary; tests/test_cuda.py checks the bits on a GPU). Each take returns the
    copy of the linear that asked: written ahead where the copies in flight begin with it, else written on the
    caller's stream after those are waited for; copies are started on the second stream, up to ``depth`` ahead, each
    after it waits for the caller's stream, into the ring's next buffer, never one whose GEMM is not yet enqueued; the
    caller waits for a copy's event before using it; settle leaves none in flight."""
    from quant.runtime.schemes.base import DequantAhead

    log, current = [], ["main"]

    class Stream:
        def __init__(self, device=None):
            self.name = "side"

        def wait_stream(self, other):
            log.append(("wait_stream", self.name, other.name))

        def wait_event(self, ev):
            log.append(("wait_event", self.name, ev.index))

    class Event:
        def __init__(self):
            self.index = None  # (set below: its buffer's index)

        def record(self, stream):
            log.append(("record", stream.name, self.index))

    class use:
        def __init__(self, stream):
            self.stream = stream

        def __enter__(self):
            current.append(self.stream.name)

        def __exit__(self, *exc):
            current.pop()

    def current_stream(device=None):
        s = Stream()
        s.name = current[-1]
        return s

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", current_stream)
    monkeypatch.setattr(torch.cuda, "stream", use)

    class Linear:
        def __init__(self, name, value, shape):
            self.name, self.value, self.shape = name, value, shape

        def prefill_shape(self):
            return self.shape

        def prefill_dequant(self, out):
            log.append(("dequant", current[-1], self.name,
                        next(i for i, b in enumerate(ahead.buffers) if b.data_ptr() == out.data_ptr())))
            return out.fill_(self.value)

    def make(chain, depth):
        made = DequantAhead(chain, torch.device("cpu"), torch.float32, depth)
        for i, ev in enumerate(made.events):
            ev.index = i
        return made

    def take_all(chain):
        for h in chain:  # (each copy read at once, as its GEMM would be: here nothing waits, so later copies
            x = ahead.take(h)  # overwrite it)
            assert x.shape == h.shape and x.unique().tolist() == [h.value]

    a, b, c, d = (Linear(n, float(i), (i + 2, 3)) for i, n in enumerate("abcd"))
    ahead = make([a, b, c], 1)
    assert [t.numel() for t in ahead.buffers] == [12, 12] and all(h.ahead is ahead for h in (a, b, c))
    side = [("wait_stream", "side", "main")]
    take_all([a, b, c])
    assert log == [("dequant", "main", "a", 0),  # the first: nothing was written ahead
                   *side, ("dequant", "side", "b", 1), ("record", "side", 1),
                   ("wait_event", "main", 1),  # b's copy, before b's GEMM uses it
                   *side, ("dequant", "side", "c", 0), ("record", "side", 0),
                   ("wait_event", "main", 0)]
    assert not ahead.queue  # c is the last: nothing in flight

    log.clear()
    ahead.take(a)
    assert [entry[0] for entry in ahead.queue] == [b]
    x = ahead.take(c)  # b took another path: its copy is waited for, then c's written on the caller's stream
    assert x.unique().tolist() == [2.0] and not ahead.queue
    assert log[-2:] == [("wait_event", "main", 0), ("dequant", "main", "c", 1)]

    log.clear()
    ahead.take(b)
    ahead.settle()  # the end of a forward
    assert not ahead.queue and log == [("dequant", "main", "b", 0), *side, ("dequant", "side", "c", 1),
                                        ("record", "side", 1), ("wait_event", "main", 1)]
    ahead.settle()
    assert len(log) == 5

    log.clear()
    ahead = make([a, b, c, d], 2)  # two ahead: three buffers
    take_all([a, b, c, d])
    assert log == [("dequant", "main", "a", 0),
                   *side, ("dequant", "side", "b", 1), ("record", "side", 1),
                   *side, ("dequant", "side", "c", 2), ("record", "side", 2),
                   ("wait_event", "main", 1),
                   *side, ("dequant", "side", "d", 0), ("record", "side", 0),  # a's buffer: its GEMM is enqueued
                   ("wait_event", "main", 2), ("wait_event", "main", 0)]
    log.clear()
    ahead.take(a)
    ahead.settle()  # b and c in flight: the last one's event covers both
    assert log[-1] == ("wait_event", "main", 0) and not ahead.queue
