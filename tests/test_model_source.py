"""``--model`` resolution: the real default GGUF, tiny HF folders, and every way a source is refused.

Tests that look inside the cache point ``QUANT_SUITE_CACHE`` at a private folder, so what they see is only
what they caused (the shared test cache holds the default model's conversion, which those tests never need).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from quant import atomic
from quant.errors import UserError
from quant.model_source import resolve_model
from quant.paths import cache_root


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("QUANT_SUITE_CACHE", str(root))
    assert cache_root() == root
    return root


def _cache_entries(root: Path) -> list[str]:
    """Everything in ``<cache>/models`` (hidden ``.tmp-*`` folders included), but the lock and recency markers of
    its entries (quant.cache_budget)."""
    models = root / "models"
    return sorted(p.name for p in models.iterdir() if not p.name.endswith((".lock", ".use", ".used"))) \
        if models.exists() else []


def _tmp_leftovers(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob(".tmp-*")) if root.exists() else []


def _rejects(spec, *fragments: str) -> str:
    with pytest.raises(UserError) as info:
        resolve_model(str(spec))
    message = str(info.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def _write_gguf(path: Path, arch: str) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def tiny_copy(tiny_llama_dir, tmp_path) -> Path:
    """A private copy of the session's tiny LLaMa folder (with tokenizer), free to edit, in float32: a float32
    folder is converted into the cache (fp16 there), so the tests below exercise the conversion."""
    folder = Path(shutil.copytree(tiny_llama_dir, tmp_path / "tiny"))
    with safe_open(str(folder / "model.safetensors"), framework="pt") as fh:
        tensors = {n: fh.get_tensor(n).float() for n in fh.keys()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["dtype"] = config["torch_dtype"] = "float32"
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def test_fp16_hf_folder_is_read_in_place(fresh_cache, tiny_llama_dir, tmp_path):
    """No second full copy of a big model: a plain fp16/bf16 folder is every stage's source as it is, keyed by
    its bytes; nothing is written into it or into the cache's models/."""
    folder = Path(shutil.copytree(tiny_llama_dir, tmp_path / "plain"))
    before = sorted((p.name, p.stat().st_mtime_ns) for p in folder.iterdir())
    first = resolve_model(str(folder))
    assert first.hf_dir == folder.resolve() and first.source_kind == "hf"
    assert _cache_entries(fresh_cache) == []
    assert sorted((p.name, p.stat().st_mtime_ns) for p in folder.iterdir()) == before, "the user's folder was written"
    config = json.loads((folder / "config.json").read_text())
    config["initializer_range"] = 0.0375
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    edited = resolve_model(str(folder))
    assert edited.content_hash != first.content_hash and edited.hf_dir == first.hf_dir
    # A folder that declares remote code is converted (the conversion strips it), never read in place.
    config["auto_map"] = {"AutoConfig": "configuration_x.XConfig"}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    from quant.model_source import usable_in_place

    assert not usable_in_place(folder)


# ------------------------------------------------------------------------------------------ default model


def test_default_model_is_smollm2_in_fp16(default_model):
    assert default_model.source_kind == "default"
    assert len(default_model.content_hash) == 64
    hf_dir = default_model.hf_dir
    assert hf_dir.parent == cache_root() / "models"
    assert hf_dir.name.startswith(default_model.short_hash + "-")  # + the converting code's hash

    config = json.loads((hf_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["hidden_size"] == 576
    assert config["num_hidden_layers"] == 30
    assert config["num_attention_heads"] == 9
    assert config["num_key_value_heads"] == 3
    assert config["vocab_size"] == 49152
    assert config["tie_word_embeddings"] is True
    assert config["rope_parameters"]["rope_theta"] == pytest.approx(1e5)
    assert "quantization_config" not in config  # the GGUF marker is dropped

    weights = sorted(hf_dir.glob("*.safetensors"))
    assert weights, f"no safetensors in {hf_dir}"
    dtypes = set()
    n_params = 0
    for path in weights:
        with safe_open(str(path), framework="pt") as fh:
            for name in fh.keys():
                sl = fh.get_slice(name)
                dtypes.add(sl.get_dtype())
                n_params += int(np.prod(sl.get_shape()))
    assert dtypes == {"F16"}
    assert 130e6 < n_params < 140e6  # SmolLM2-135M, embedding stored once (tied)
    for name in ("tokenizer.json", "generation_config.json"):
        assert (hf_dir / name).is_file(), name
    assert not list(hf_dir.glob("*.bin")), "no pickle weights in the cache"


def test_default_model_second_resolve_is_a_cache_hit(default_model):
    mtime = (default_model.hf_dir / "config.json").stat().st_mtime_ns
    t0 = time.perf_counter()
    again = resolve_model(None)
    elapsed = time.perf_counter() - t0
    assert again.hf_dir == default_model.hf_dir
    assert again.content_hash == default_model.content_hash
    # Loose on purpose: a conversion takes ~30 s; a hit costs ~1-3 s, nearly all of it GGUFReader parsing the
    # whole GGUF header (49k-token vocab) just to read general.architecture, which a loaded machine stretches.
    assert elapsed < 15, f"a cache hit took {elapsed:.1f} s"
    assert (again.hf_dir / "config.json").stat().st_mtime_ns == mtime, "the cached folder was rewritten"
    assert resolve_model("default").hf_dir == default_model.hf_dir


# ------------------------------------------------------------------------------------------ HF folders


def test_tiny_hf_folder_converts_into_a_hash_keyed_folder(fresh_cache, tiny_copy):
    first = resolve_model(str(tiny_copy))
    assert first.source_kind == "hf"
    assert first.hf_dir.parent == fresh_cache / "models" and first.hf_dir.name.startswith(first.content_hash[:16])
    config = json.loads((first.hf_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["hidden_size"] == 128 and config["num_hidden_layers"] == 2
    with safe_open(str(first.hf_dir / "model.safetensors"), framework="pt") as fh:
        original = {n: fh.get_tensor(n) for n in fh.keys()}
    with safe_open(str(tiny_copy / "model.safetensors"), framework="pt") as fh:
        for name in fh.keys():
            assert torch.equal(original[name], fh.get_tensor(name).half()), name
    assert (first.hf_dir / "tokenizer.json").is_file()

    again = resolve_model(str(tiny_copy))
    assert again.content_hash == first.content_hash and again.hf_dir == first.hf_dir

    # Rewrite one value of config.json: new bytes, new key, new folder; the old one stays.
    source_config = json.loads((tiny_copy / "config.json").read_text())
    source_config["initializer_range"] = 0.0375
    (tiny_copy / "config.json").write_text(json.dumps(source_config, indent=2))
    edited = resolve_model(str(tiny_copy))
    assert edited.content_hash != first.content_hash
    assert edited.hf_dir != first.hf_dir
    assert json.loads((edited.hf_dir / "config.json").read_text())["initializer_range"] == pytest.approx(0.0375)
    assert _cache_entries(fresh_cache) == sorted([first.hf_dir.name, edited.hf_dir.name])
    assert _tmp_leftovers(fresh_cache) == []


def test_same_size_edit_of_weights_changes_the_key(fresh_cache, tiny_copy):
    """One changed byte in the safetensors (same size) is a different model."""
    first = resolve_model(str(tiny_copy))
    weights = tiny_copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # last byte of the last tensor's data
    weights.write_bytes(bytes(data))
    second = resolve_model(str(tiny_copy))
    assert second.content_hash != first.content_hash
    assert second.hf_dir != first.hf_dir


def test_edited_generation_config_is_not_served_stale(fresh_cache, tiny_copy):
    resolve_model(str(tiny_copy))  # converted and cached before the edit
    (tiny_copy / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 7]}))
    second = resolve_model(str(tiny_copy))
    cached = json.loads((second.hf_dir / "generation_config.json").read_text())
    assert cached["eos_token_id"] == [2, 7]


def _crashed_conversion(fresh_cache, tiny_copy):
    """A converted model whose entry is gone, with what a SIGKILL in the middle of atomic_dir leaves behind: a
    half-written hidden sibling. Returns (the first resolution, the leftover folder)."""
    first = resolve_model(str(tiny_copy))
    shutil.rmtree(first.hf_dir)
    stale = fresh_cache / "models" / f".tmp-{first.hf_dir.name}-crashed"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    return first, stale


def test_leftover_of_a_crashed_conversion_does_not_block_the_next(fresh_cache, tiny_copy):
    first, _ = _crashed_conversion(fresh_cache, tiny_copy)
    again = resolve_model(str(tiny_copy))
    assert again.hf_dir == first.hf_dir
    assert (again.hf_dir / "config.json").is_file()
    assert (again.hf_dir / "model.safetensors").stat().st_size > 1000


def test_leftover_of_a_crashed_conversion_is_removed_by_the_next(fresh_cache, tiny_copy):
    first, stale = _crashed_conversion(fresh_cache, tiny_copy)
    # A fresh leftover may belong to a live writer of the same key: kept. One untouched for longer than
    # atomic.STALE_AFTER_S is a dead writer's: removed by the next writer.
    fresh = fresh_cache / "models" / f".tmp-{first.hf_dir.name}-live"
    fresh.mkdir()
    old = time.time() - atomic.STALE_AFTER_S - 60
    os.utime(stale, (old, old))
    resolve_model(str(tiny_copy))
    assert [p.name for p in _tmp_leftovers(fresh_cache)] == [fresh.name]


# ------------------------------------------------------------------------------------------ rejections


def test_rejects_nonexistent_path(fresh_cache, tmp_path):
    _rejects(tmp_path / "nope", str(tmp_path / "nope"), "no such file or folder")
    assert _cache_entries(fresh_cache) == []


def test_rejects_a_file_that_is_not_gguf(fresh_cache, tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\0" * 64)
    _rejects(path, "a file must be a .gguf")
    assert _cache_entries(fresh_cache) == []


def test_rejects_folder_without_config(fresh_cache, tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"")
    _rejects(folder, str(folder), "no config.json", "not a Hugging Face model folder")
    assert _cache_entries(fresh_cache) == []


def test_rejects_non_llama_hf_folder(fresh_cache, tmp_path):
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(
        {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": 8, "n_layer": 1, "n_head": 2,
         "vocab_size": 16}))
    save_file({"transformer.wte.weight": torch.zeros(16, 8, dtype=torch.float16)}, str(folder / "model.safetensors"))
    message = _rejects(folder, "GPT2LMHeadModel", "only LLaMa-family", "LlamaForCausalLM")
    assert message.startswith(str(folder))
    assert _cache_entries(fresh_cache) == []


def test_rejects_hf_folder_with_invalid_config_json(fresh_cache, tmp_path):
    folder = tmp_path / "badjson"
    folder.mkdir()
    (folder / "config.json").write_text('{"architectures": ["LlamaForCausalLM"],')
    _rejects(folder, "config.json", "is not valid JSON")


def test_rejects_pickle_only_folder(fresh_cache, tiny_copy):
    (tiny_copy / "model.safetensors").rename(tiny_copy / "pytorch_model.bin")
    _rejects(tiny_copy, "no .safetensors weights", "pytorch_model.bin", "pickle weights are never loaded")
    assert _cache_entries(fresh_cache) == []


def test_rejects_gguf_of_another_architecture(fresh_cache, tmp_path):
    path = _write_gguf(tmp_path / "gpt2.gguf", "gpt2")
    _rejects(path, str(path), "'gpt2'", "only LLaMa-family")
    assert _cache_entries(fresh_cache) == []


def test_rejects_junk_named_gguf(fresh_cache, tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"this is not a GGUF file\n" * 8)
    _rejects(path, str(path), "is not a readable GGUF file")
    assert _cache_entries(fresh_cache) == []


def test_rejects_empty_gguf(fresh_cache, tmp_path):
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"")
    _rejects(path, str(path), "is not a readable GGUF file")


# ------------------------------------------------------------------------------------------ failed conversions


def test_source_that_loads_as_another_class_leaves_no_cache_entry(fresh_cache, tiny_copy):
    """config.json claims LlamaForCausalLM but its model_type builds a Mistral: refused after loading."""
    config = json.loads((tiny_copy / "config.json").read_text())
    config["model_type"] = "mistral"
    (tiny_copy / "config.json").write_text(json.dumps(config))
    _rejects(tiny_copy, "loads as MistralForCausalLM", "only LLaMa-family")
    assert _cache_entries(fresh_cache) == []
    assert _tmp_leftovers(fresh_cache) == []


def _truncate_weights(folder) -> None:
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def test_truncated_weights_leave_no_cache_entry(fresh_cache, tiny_copy):
    _truncate_weights(tiny_copy)
    with pytest.raises(Exception):
        resolve_model(str(tiny_copy))
    assert _cache_entries(fresh_cache) == []
    assert _tmp_leftovers(fresh_cache) == []


def test_truncated_weights_are_a_user_error(fresh_cache, tiny_copy):
    _truncate_weights(tiny_copy)
    _rejects(tiny_copy, "model.safetensors")


def test_folder_without_tokenizer_is_a_user_error(fresh_cache, tiny_copy):
    for path in tiny_copy.iterdir():
        if path.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            path.unlink()
    _rejects(tiny_copy, "tokenizer")
