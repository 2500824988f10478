"""calibration/: token batches from training text, hooked activation statistics, their cache and the CLI."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from calibration.data import (ACLSUM_CALIB_SECTIONS, CalibSpec, calibration_batches, calibration_tokens,
                              split_paragraph_blocks)
from calibration.datasets import detokenize, load_samples
from calibration.stats import ActivationStats, collect_stats, get_stats, stats_dir
from quant.errors import UserError
from quant.export import forward_loop
from tests.conftest import aclsum_records
from tests.offline import offline_user_error

REPO = Path(__file__).resolve().parents[1]
KINDS = ("attention.qkv", "attention.dense", "mlp.fc", "mlp.proj")
HF_MODULES = {"attention.qkv": "self_attn.q_proj", "attention.dense": "self_attn.o_proj",
              "mlp.fc": "mlp.gate_proj", "mlp.proj": "mlp.down_proj"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tokenizer(default_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model.hf_dir)


@pytest.fixture(scope="module")
def tiny_model(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()


@pytest.fixture
def private_datasets_cache(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets_cache")


def one_line_user_error(match: str, fn, *args, **kwargs) -> str:
    with pytest.raises(UserError, match=match) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


# -------------------------------------------------------------------------------------------- data


def test_aclsum_batches_are_the_seeded_train_documents_joined_by_eos(tokenizer):
    batches = calibration_batches(tokenizer, num_samples=16, seq_len=256, seed=0)
    assert batches.shape == (16, 256) and batches.dtype == torch.long

    # Built independently: train documents (abstract + introduction + conclusion) in load_samples' seeded order.
    docs = load_samples("aclsum", split="train", num_samples=None, seed=0, aclsum_sections=ACLSUM_CALIB_SECTIONS)
    expected: list[int] = []
    for doc in docs:
        if len(expected) >= 16 * 256:
            break
        expected += ([tokenizer.eos_token_id] if expected else []) + encode(tokenizer, doc.article)
    assert batches.flatten().tolist() == expected[: 16 * 256]  # every position is a real token, nothing padded
    assert int((batches == tokenizer.eos_token_id).sum()) >= 1  # documents are separated
    assert "introduction" in " ".join(ACLSUM_CALIB_SECTIONS)


def test_batches_are_reproducible_and_depend_on_the_seed(tokenizer):
    first = calibration_batches(tokenizer, num_samples=4, seq_len=64, seed=7)
    assert torch.equal(first, calibration_batches(tokenizer, num_samples=4, seq_len=64, seed=7))
    assert not torch.equal(first, calibration_batches(tokenizer, num_samples=4, seq_len=64, seed=8))
    # Rows are cut from one stream, so fewer rows are a prefix of more rows.
    assert torch.equal(calibration_batches(tokenizer, num_samples=2, seq_len=64, seed=7), first[:2])


def test_calibration_never_reads_the_aclsum_test_split(tokenizer):
    stream = calibration_tokens(tokenizer, source="aclsum", seed=0)
    seq_len = 512
    batches = calibration_batches(tokenizer, num_samples=len(stream) // seq_len, seq_len=seq_len, seed=0)
    assert batches.numel() > 100_000  # nearly all of the train split
    text = tokenizer.decode(batches.flatten().tolist())

    def first_sentence(record: dict) -> str:
        return detokenize(record["sentences"]["abstract"][0])

    test_sentences = [first_sentence(r) for r in aclsum_records("test")]
    leaked = [s for s in test_sentences if s in text]
    assert not leaked, f"test-split text in the calibration data: {leaked[:2]}"
    # The check can see text: nearly every train abstract's first sentence is there (the last may be cut).
    train_found = sum(first_sentence(r) in text for r in aclsum_records("train"))
    assert train_found >= 98


def test_too_few_tokens_and_bad_numbers_are_user_errors(tokenizer, tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("Only a few words here.\n\nAnd a few more.\n")
    message = one_line_user_error("has only", calibration_batches, tokenizer, source=str(small), num_samples=4, seq_len=64)
    available = len(calibration_tokens(tokenizer, source=str(small)))
    assert f"has only {available} tokens" in message and "need 256" in message
    one_line_user_error("num_samples", calibration_batches, tokenizer, num_samples=0, seq_len=64)
    one_line_user_error("seq_len", calibration_batches, tokenizer, num_samples=4, seq_len=-1)
    one_line_user_error("unknown calibration source", calibration_batches, tokenizer, source="no-such-source")
    binary = tmp_path / "weights.bin"
    binary.write_bytes(b"\0\1")
    one_line_user_error("cannot calibrate on", CalibSpec, source=str(binary))


def test_txt_source_is_one_document_per_blank_line_block(tokenizer, tmp_path):
    blocks = [f"Paragraph {i} talks about topic number {i} at some length, again and again." for i in range(6)]
    path = tmp_path / "notes.txt"
    path.write_text("\n\n\n".join(blocks[:3]) + "\n  \n" + "\n\n".join(blocks[3:]) + "\n")
    assert split_paragraph_blocks(path.read_text()) == blocks
    assert split_paragraph_blocks("one line\nand another, no blank line\n") == ["one line\nand another, no blank line"]

    stream = calibration_tokens(tokenizer, source=str(path), seed=0)
    assert stream.count(tokenizer.eos_token_id) == 5
    assert len(stream) == sum(len(encode(tokenizer, b)) for b in blocks) + 5
    batches = calibration_batches(tokenizer, source=str(path), num_samples=2, seq_len=len(stream) // 2)
    assert torch.equal(batches.flatten(), torch.tensor(stream[: batches.numel()]))
    # Seeded order of the blocks.
    assert calibration_tokens(tokenizer, source=str(path), seed=1) != stream


def test_jsonl_source_autodetects_or_takes_the_text_column(tokenizer, tmp_path, private_datasets_cache):
    path = tmp_path / "calib.jsonl"
    rows = [{"id": i, "text": f"Row {i} says something rather plain about item {i}.", "body": f"Body {i} only."}
            for i in range(5)] + [{"id": 9, "text": "   ", "body": "Blank text row."}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    stream = calibration_tokens(tokenizer, source=str(path))
    decoded = tokenizer.decode(stream)
    assert all(r["text"] in decoded for r in rows[:5]) and "Body" not in decoded
    assert stream.count(tokenizer.eos_token_id) == 4  # the blank row is skipped

    by_body = tokenizer.decode(calibration_tokens(tokenizer, source=str(path), text_column="body"))
    assert "Blank text row." in by_body and "Row 1" not in by_body
    message = one_line_user_error("no column 'nope'", calibration_tokens, tokenizer, source=str(path), text_column="nope")
    assert "body" in message and "text" in message

    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"body": "x"}) + "\n")
    one_line_user_error("no text column", calibration_tokens, tokenizer, source=str(other))


def test_cnn_dailymail_reads_train_articles_in_growing_seeded_requests(tokenizer, monkeypatch):
    import calibration.data
    from calibration.datasets import Sample

    calls = []

    def fake_load_samples(name, *, split, num_samples, seed, **kwargs):
        calls.append((name, split, num_samples, seed))
        rows = [Sample(str(i), f"Article number {i} of the seed {seed} order.", "x") for i in range(100)]
        return rows[:num_samples]

    monkeypatch.setattr(calibration.data, "load_samples", fake_load_samples)
    stream = calibration_tokens(tokenizer, source="cnn_dailymail", seed=5)
    assert stream.count(tokenizer.eos_token_id) == 99  # all 100 articles, each once
    assert calls == [("cnn_dailymail", "train", 64, 5), ("cnn_dailymail", "train", 128, 5)]
    calls.clear()
    calibration_batches(tokenizer, source="cnn_dailymail", num_samples=2, seq_len=8, seed=5)
    assert calls == [("cnn_dailymail", "train", 64, 5)]  # stops reading once the rows are full


def test_cnn_dailymail_offline_is_a_user_error(tmp_path, monkeypatch):
    out = offline_user_error(tmp_path, monkeypatch, "from calibration.data import iter_documents",
                             "next(iter_documents('cnn_dailymail'))")
    assert out.strip().count("\n") == 0 and "could not load cnn_dailymail" in out


def test_spec_key_follows_content_not_location(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("some text\n")
    key = CalibSpec(str(path)).key
    moved = tmp_path / "sub" / "b.txt"
    moved.parent.mkdir()
    moved.write_text("some text\n")
    assert CalibSpec(str(moved)).key == key
    path.write_text("some other text\n")
    assert CalibSpec(str(path)).key != key
    base = CalibSpec()
    assert base.key == CalibSpec("aclsum", 32, 256, 0).key and "aclsum:train" in base.key
    assert len({base.key_hash, CalibSpec(seed=1).key_hash, CalibSpec(num_samples=8).key_hash,
                CalibSpec(seq_len=128).key_hash, CalibSpec("cnn_dailymail").key_hash}) == 5


def test_forward_loop_runs_every_row_without_grad():
    seen = []

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids):
            seen.append((tuple(input_ids.shape), torch.is_grad_enabled()))

    batches = torch.arange(10 * 3).view(10, 3)
    forward_loop(batches, batch_size=4)(Probe())
    assert seen == [((4, 3), False), ((4, 3), False), ((2, 3), False)]


def test_calibration_batch_follows_free_memory():
    """Four rows per forward where half the free memory holds their activations; fewer where it does not; never
    none. The estimate per row (the docstring's figures): SmolLM2 at 256 tokens ~120 MB, Llama-3-8B at 2048 ~4 GB."""
    from types import SimpleNamespace

    from quant.export import CALIB_ROWS, calibration_batch_size, calibration_row_bytes

    smol = SimpleNamespace(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536,
                           vocab_size=49152)
    llama3 = SimpleNamespace(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                             intermediate_size=14336, vocab_size=128256)
    for cfg, seq, low, high in ((smol, 256, 0.1e9, 0.15e9), (llama3, 2048, 3.5e9, 4.5e9)):
        row = calibration_row_bytes(cfg, seq)
        assert low < row < high
        assert calibration_batch_size(cfg, seq, 2**50) == CALIB_ROWS == 4
        assert calibration_batch_size(cfg, seq, 2 * 3 * row) == 3  # half the free memory holds the rows
        assert calibration_batch_size(cfg, seq, 2 * 3 * row - 1) == 2
        assert calibration_batch_size(cfg, seq, 0) == 1


def test_get_stats_takes_fewer_rows_per_forward_when_memory_is_short(cold_cache, tiny_llama_dir, monkeypatch):
    """On a machine whose free memory holds one row's activations, the statistics are collected one row at a
    time (a spy on collect_stats) and equal those of four rows at a time up to float32 summation order."""
    import calibration.stats
    import quant.export
    from quant.model_source import resolve_model

    used = []
    real = calibration.stats.collect_stats
    monkeypatch.setattr(calibration.stats, "collect_stats",
                        lambda *a, batch_size, **k: used.append(batch_size) or real(*a, batch_size=batch_size, **k))
    resolved = resolve_model(str(tiny_llama_dir))
    spec = CalibSpec(num_samples=4, seq_len=32)
    roomy = get_stats(resolved, spec)
    shutil.rmtree(stats_dir(resolved, spec))
    monkeypatch.setattr(quant.export, "free_bytes", lambda device: 0)
    short = get_stats(resolved, spec)
    assert used == [4, 1]
    for name in roomy.layers:
        torch.testing.assert_close(short.absmax[name], roomy.absmax[name], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------- stats


def _recorded_inputs(model, batches) -> dict[str, list[torch.Tensor]]:
    """Inputs of the hooked linears, captured by swapping each module's forward (no hooks involved)."""
    captured: dict[str, list[torch.Tensor]] = {}
    originals = []
    for i, layer in enumerate(model.model.layers):
        for kind, path in HF_MODULES.items():
            module = layer.get_submodule(path)
            name = f"layers.{i}.{kind}"
            captured[name] = []

            def wrapped(x, _orig=module.forward, _name=name):
                captured[_name].append(x.detach().clone())
                return _orig(x)

            originals.append((module, module.forward))
            module.forward = wrapped
    try:
        with torch.no_grad():
            model(input_ids=batches, use_cache=False)
    finally:
        for module, _ in originals:
            del module.forward  # back to the class's forward
    return captured


def _no_hooks(model) -> bool:
    return all(
        not m._forward_pre_hooks and not m._forward_hooks for m in model.modules()
    )


def test_stats_match_a_hook_free_forward(tiny_model, tokenizer):
    batches = calibration_batches(tokenizer, num_samples=3, seq_len=32, seed=0)
    stats = collect_stats(tiny_model, batches, batch_size=2)
    n_layers = len(tiny_model.model.layers)
    assert stats.layers == [f"layers.{i}.{k}" for i in range(n_layers) for k in KINDS]
    assert all(stats.tokens[n] == 3 * 32 for n in stats.layers)

    # Layer 0's qkv input by hand: embeddings, then the input RMSNorm.
    with torch.no_grad():
        x = tiny_model.model.layers[0].input_layernorm(tiny_model.model.embed_tokens(batches))
    x = x.reshape(-1, x.shape[-1]).abs()
    torch.testing.assert_close(stats.absmax["layers.0.attention.qkv"], x.amax(0))
    torch.testing.assert_close(stats.mean_abs["layers.0.attention.qkv"], x.mean(0))

    # Every linear against its inputs captured without hooks.
    for name, chunks in _recorded_inputs(tiny_model, batches).items():
        flat = torch.cat([c.reshape(-1, c.shape[-1]) for c in chunks]).abs()
        torch.testing.assert_close(stats.absmax[name], flat.amax(0), msg=name)
        torch.testing.assert_close(stats.mean_abs[name], flat.mean(0), msg=name)

    for name in stats.layers:
        absmax = stats.absmax[name].numpy().astype(np.float64)
        assert stats.outlier_score(name) == pytest.approx(absmax.max() / np.median(absmax))
        outlier = stats.outlier(name)
        assert outlier.top_channel == int(absmax.argmax()) and outlier.median_absmax == pytest.approx(np.median(absmax))
    assert _no_hooks(tiny_model) and not tiny_model.training


def test_hooks_are_removed_even_when_the_forward_fails(tiny_model):
    bad = torch.full((1, 8), 10**9, dtype=torch.long)  # out of the vocabulary: the embedding raises
    with pytest.raises((IndexError, RuntimeError)):
        collect_stats(tiny_model, bad)
    assert _no_hooks(tiny_model)


def test_ranking_and_aliases(tiny_model, tokenizer):
    stats = collect_stats(tiny_model, calibration_batches(tokenizer, num_samples=2, seq_len=16))
    ranked = stats.ranked_layers()
    assert sorted(ranked) == sorted(stats.layers)
    scores = [stats.outlier_score(n) for n in ranked]
    assert scores == sorted(scores, reverse=True)
    assert [o.name for o in stats.top_outliers(3)] == ranked[:3]
    assert stats.aliases["layers.1.mlp.gate"] == "layers.1.mlp.fc"
    assert stats.linears_sharing("layers.1.mlp.gate") == ["layers.1.mlp.fc", "layers.1.mlp.gate"]
    with_aliases = stats.ranked_layers(include_aliases=True)
    assert len(with_aliases) == len(ranked) + len(tiny_model.model.layers)
    i = with_aliases.index("layers.0.mlp.fc")
    assert with_aliases[i + 1] == "layers.0.mlp.gate"


# ------------------------------------------------------------------------------------------- cache


class Exploding(torch.nn.Module):
    def forward(self, *args, **kwargs):
        raise AssertionError("the model must not run on a cache hit")


@pytest.fixture
def cold_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANT_SUITE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_get_stats_computes_once_then_reads_the_cache(cold_cache, tiny_llama_dir, tiny_model, monkeypatch):
    from quant.model_source import resolve_model

    resolved = resolve_model(str(tiny_llama_dir))
    spec = CalibSpec(num_samples=2, seq_len=32)
    first = get_stats(resolved, spec)  # loads the tiny model itself
    folder = stats_dir(resolved, spec)
    assert not first.from_cache and folder.is_dir() and folder.parent == cold_cache / "calib"
    assert folder.name.startswith(f"{resolved.short_hash}-{spec.key_hash}-")  # + the collecting code's hash
    assert sorted(p.name for p in folder.iterdir()) == ["meta.json", "stats.safetensors"]
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["model_hash"] == resolved.content_hash and meta["calib_spec"]["key"] == spec.key
    assert meta["layers"] == first.layers and meta["created"]

    import calibration.stats

    monkeypatch.setattr(calibration.stats, "load_hf_model", lambda *a, **k: pytest.fail("model loaded on a cache hit"))
    started = time.perf_counter()
    second = get_stats(resolved, spec, model=Exploding())
    assert time.perf_counter() - started < 5.0  # milliseconds in practice; generous for a loaded CI box
    assert second.from_cache and second.layers == first.layers
    for name in first.layers:
        assert torch.equal(second.absmax[name], first.absmax[name])
        assert torch.equal(second.mean_abs[name], first.mean_abs[name])
    assert second.tokens == first.tokens and second.ranked_layers() == first.ranked_layers()

    other = CalibSpec(num_samples=2, seq_len=32, seed=1)
    assert stats_dir(resolved, other) != folder
    assert not stats_dir(resolved, other).exists()
    third = get_stats(resolved, other, model=tiny_model)  # a miss runs the model it is given
    assert not third.from_cache and stats_dir(resolved, other).is_dir()
    assert any(not torch.equal(third.absmax[n], first.absmax[n]) for n in first.layers)  # other tokens


def test_damaged_cache_is_a_one_line_user_error(tiny_model, tokenizer, tmp_path):
    stats = collect_stats(tiny_model, calibration_batches(tokenizer, num_samples=2, seq_len=16),
                          model_hash="m" * 64, spec=CalibSpec(num_samples=2, seq_len=16))
    folder = stats.save(tmp_path / "stats")
    loaded = ActivationStats.load(folder, model_hash="m" * 64, spec_key=CalibSpec(num_samples=2, seq_len=16).key)
    assert loaded.from_cache and loaded.layers == stats.layers

    one_line_user_error("statistics of model", ActivationStats.load, folder, model_hash="x" * 64)
    one_line_user_error("was made with calibration", ActivationStats.load, folder, spec_key=CalibSpec(seed=3).key)

    tensors = folder / "stats.safetensors"
    data = tensors.read_bytes()
    tensors.write_bytes(data[: len(data) // 2])
    message = one_line_user_error("corrupt or truncated", ActivationStats.load, folder)
    assert str(tensors) in message
    tensors.write_bytes(data)

    meta = folder / "meta.json"
    good_meta = meta.read_text()
    meta.write_text(good_meta[:40])
    assert str(meta) in one_line_user_error("not valid JSON", ActivationStats.load, folder)
    meta.write_text(good_meta)
    tensors.unlink()
    assert str(tensors) in one_line_user_error("missing", ActivationStats.load, folder)


def test_truncated_cache_entry_fails_get_stats(cold_cache, tiny_llama_dir, tiny_model):
    from quant.model_source import resolve_model

    resolved = resolve_model(str(tiny_llama_dir))
    spec = CalibSpec(num_samples=1, seq_len=16)
    get_stats(resolved, spec, model=tiny_model)
    tensors = stats_dir(resolved, spec) / "stats.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:100])
    message = one_line_user_error("stats.safetensors", get_stats, resolved, spec, model=Exploding())
    assert "delete" in message


# --------------------------------------------------------------------------------------------- CLI


def test_cli_prints_the_table_and_writes_four_plots(default_model, tmp_path, capsys):
    from calibration.__main__ import main

    plot_dir = tmp_path / "plots"
    argv = ["--calib-samples", "4", "--calib-seq-len", "64", "--top", "5", "--plot-dir", str(plot_dir)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "activation statistics" in out
    assert "outlier score" in out and "top channel" in out
    table = [line for line in out.splitlines() if re.match(r"\d+\s+layers\.\d+\.(attention|mlp)\.", line)]
    assert len(table) == 5 and table[0].startswith("1 ")
    pngs = sorted(plot_dir.glob("*.png"))
    assert [p.name for p in pngs] == ["outliers-dense.png", "outliers-fc.png", "outliers-proj.png", "outliers-qkv.png"]
    for png in pngs:
        data = png.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 20_000
    assert not list(plot_dir.glob(".tmp-*"))

    assert main(argv) == 0  # the second run replays the cache
    assert "loaded activation statistics" in capsys.readouterr().out


def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys):
    from calibration.__main__ import main

    for argv, match in [
        (["--calib-samples", "0"], "--calib-samples"),
        (["--calib-seq-len", "many"], "--calib-seq-len"),
        (["--source", str(tmp_path / "missing.txt")], "unknown calibration source"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and match in err

    proc = subprocess.run([sys.executable, "-m", "calibration", "--source", "nonsense"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "unknown calibration source 'nonsense'" in proc.stderr
