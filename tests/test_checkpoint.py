"""The TRT-LLM checkpoint contract: what export_checkpoint writes, and how load_checkpoint refuses a broken folder.

One tiny LLaMa is exported per module (ModelOpt, real files); each tamper test edits its own copy.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from quant.checkpoint import load_checkpoint, validate_checkpoint
from quant.errors import UserError

REPO = Path(__file__).resolve().parents[1]
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 64}
# make_tiny_llama's defaults
HIDDEN, LAYERS, HEADS, KV_HEADS, INTER, VOCAB = 128, 2, 4, 2, 256, 49152
HEAD_DIM = HIDDEN // HEADS


def _export(hf_dir: Path, out: Path) -> Path:
    from transformers import AutoModelForCausalLM

    from quant.export import export_checkpoint

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float16).eval()
    return export_checkpoint(model, out)


def _read_all(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as fh:
        return {name: fh.get_tensor(name) for name in fh.keys()}


@pytest.fixture(scope="module")
def exported(tiny_llama_dir, tmp_path_factory) -> Path:
    return _export(tiny_llama_dir, tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="module")
def exported_llama3(tmp_path_factory) -> tuple[Path, Path]:
    from tests.tiny import make_tiny_llama

    root = tmp_path_factory.mktemp("llama3")
    hf_dir = make_tiny_llama(root / "hf", rope_scaling=LLAMA3_SCALING, rope_theta=500000.0, layers=1)
    return hf_dir, _export(hf_dir, root / "ckpt")


@pytest.fixture
def ckpt(exported, tmp_path) -> Path:
    """A private copy of the exported checkpoint, free to tamper with."""
    return Path(shutil.copytree(exported, tmp_path / "ckpt"))


def _rewrite_tensors(folder: Path, edit) -> None:
    tensors = _read_all(folder / "rank0.safetensors")
    edit(tensors)
    save_file(tensors, str(folder / "rank0.safetensors"))


def _edit_config(folder: Path, edit) -> None:
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def _rejected(folder: Path, *fragments: str) -> str:
    """load_checkpoint's one-line refusal, and validate_checkpoint's (headers only: the builds' check) the same."""
    with pytest.raises(UserError) as info:
        load_checkpoint(folder)
    message = str(info.value)
    with pytest.raises(UserError) as headers_only:
        validate_checkpoint(folder)
    assert str(headers_only.value) == message
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def _expected_names(layers: int) -> set[str]:
    names = {"transformer.vocab_embedding.weight", "transformer.ln_f.weight", "lm_head.weight"}
    for i in range(layers):
        for part in ("attention.qkv", "attention.dense", "mlp.fc", "mlp.gate", "mlp.proj",
                     "input_layernorm", "post_layernorm"):
            names.add(f"transformer.layers.{i}.{part}.weight")
    return names


# ------------------------------------------------------------------------------------------ a valid export


def test_export_loads_and_config_describes_the_model(exported, tiny_llama_dir):
    ckpt = load_checkpoint(exported)
    config = ckpt.config
    hf_config = json.loads((tiny_llama_dir / "config.json").read_text())
    assert config["architecture"] == "LlamaForCausalLM"
    assert config["dtype"] == "float16"
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]) == (LAYERS, HIDDEN, INTER)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["vocab_size"]) == (HEADS, KV_HEADS, VOCAB)
    assert ckpt.head_size == HEAD_DIM
    assert config["rotary_base"] == pytest.approx(hf_config["rope_parameters"]["rope_theta"])
    assert isinstance(config["rotary_base"], float)
    assert "rotary_scaling" in config and config["rotary_scaling"] is None
    assert (config.get("quantization") or {}).get("quant_algo") is None
    assert set(ckpt.layer_algos.values()) == {None}
    assert ckpt.kv_cache_algo is None
    assert sorted(p.name for p in exported.iterdir()) == ["config.json", "quant_cfg.json", "rank0.safetensors"]


def test_export_tensor_names_shapes_and_dtypes(exported):
    tensors = load_checkpoint(exported).tensors
    assert set(tensors) == _expected_names(LAYERS)
    assert {t.dtype for t in tensors.values()} == {torch.float16}
    assert tuple(tensors["transformer.vocab_embedding.weight"].shape) == (VOCAB, HIDDEN)
    assert tuple(tensors["lm_head.weight"].shape) == (VOCAB, HIDDEN)
    assert tuple(tensors["transformer.ln_f.weight"].shape) == (HIDDEN,)
    for i in range(LAYERS):
        p = f"transformer.layers.{i}"
        assert tuple(tensors[f"{p}.attention.qkv.weight"].shape) == ((HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN)
        assert tuple(tensors[f"{p}.attention.dense.weight"].shape) == (HIDDEN, HEADS * HEAD_DIM)
        assert tuple(tensors[f"{p}.mlp.fc.weight"].shape) == (INTER, HIDDEN)
        assert tuple(tensors[f"{p}.mlp.gate.weight"].shape) == (INTER, HIDDEN)
        assert tuple(tensors[f"{p}.mlp.proj.weight"].shape) == (HIDDEN, INTER)
        assert tuple(tensors[f"{p}.input_layernorm.weight"].shape) == (HIDDEN,)
        assert tuple(tensors[f"{p}.post_layernorm.weight"].shape) == (HIDDEN,)


def test_export_tensor_values_follow_trtllm_naming(exported, tiny_llama_dir):
    """TRT-LLM's mlp.fc is HF's gate_proj and mlp.gate is up_proj (the names are swapped); qkv is q;k;v."""
    trt = load_checkpoint(exported).tensors
    hf = _read_all(tiny_llama_dir / "model.safetensors")
    assert torch.equal(trt["transformer.vocab_embedding.weight"], hf["model.embed_tokens.weight"])
    assert torch.equal(trt["lm_head.weight"], hf["lm_head.weight"])
    assert torch.equal(trt["transformer.ln_f.weight"], hf["model.norm.weight"])
    for i in range(LAYERS):
        p, h = f"transformer.layers.{i}", f"model.layers.{i}"
        assert torch.equal(trt[f"{p}.mlp.fc.weight"], hf[f"{h}.mlp.gate_proj.weight"])
        assert torch.equal(trt[f"{p}.mlp.gate.weight"], hf[f"{h}.mlp.up_proj.weight"])
        assert not torch.equal(trt[f"{p}.mlp.fc.weight"], hf[f"{h}.mlp.up_proj.weight"])
        assert torch.equal(trt[f"{p}.mlp.proj.weight"], hf[f"{h}.mlp.down_proj.weight"])
        qkv = torch.cat([hf[f"{h}.self_attn.{x}_proj.weight"] for x in "qkv"], dim=0)
        assert torch.equal(trt[f"{p}.attention.qkv.weight"], qkv)
        assert torch.equal(trt[f"{p}.attention.dense.weight"], hf[f"{h}.self_attn.o_proj.weight"])
        assert torch.equal(trt[f"{p}.input_layernorm.weight"], hf[f"{h}.input_layernorm.weight"])
        assert torch.equal(trt[f"{p}.post_layernorm.weight"], hf[f"{h}.post_attention_layernorm.weight"])


def test_export_keeps_llama3_rope_scaling(exported_llama3):
    hf_dir, folder = exported_llama3
    config = load_checkpoint(folder).config
    assert config["rotary_base"] == pytest.approx(500000.0)
    scaling = config["rotary_scaling"]
    assert isinstance(scaling, dict)
    assert scaling["type"] == "llama3" and scaling["rope_type"] == "llama3"
    assert scaling["factor"] == pytest.approx(8.0)
    assert scaling["low_freq_factor"] == pytest.approx(1.0)
    assert scaling["high_freq_factor"] == pytest.approx(4.0)
    assert scaling["original_max_position_embeddings"] == 64
    assert "rope_theta" not in scaling  # the base is rotary_base, not part of the scaling dict


# ------------------------------------------------------------------------------------------ tampered folders


def test_missing_tensor(ckpt):
    name = "transformer.layers.1.mlp.proj.weight"
    _rewrite_tensors(ckpt, lambda t: t.pop(name))
    message = _rejected(ckpt, str(ckpt), name, "missing 1 tensor(s)")
    assert "unexpected" not in message


def test_wrong_shape(ckpt):
    name = "transformer.layers.0.attention.qkv.weight"
    good = [(HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN]
    _rewrite_tensors(ckpt, lambda t: t.__setitem__(name, torch.zeros(good[0] - HEAD_DIM, HIDDEN, dtype=torch.float16)))
    _rejected(ckpt, name, f"shape {[good[0] - HEAD_DIM, HIDDEN]}", f"expected {good}")


def test_wrong_dtype(ckpt):
    name = "transformer.layers.0.mlp.gate.weight"
    _rewrite_tensors(ckpt, lambda t: t.__setitem__(name, t[name].float()))
    _rejected(ckpt, name, "dtype float32", "expected float16")


def test_unexpected_extra_tensor(ckpt):
    name = "transformer.layers.0.attention.rotary_inv_freq"
    _rewrite_tensors(ckpt, lambda t: t.__setitem__(name, torch.ones(HEAD_DIM // 2, dtype=torch.float16)))
    _rejected(ckpt, "unexpected tensor(s)", name)


def test_every_problem_is_reported_at_once(ckpt):
    missing, extra, wrong = ("transformer.ln_f.weight", "transformer.layers.9.mlp.fc.weight",
                             "transformer.layers.1.post_layernorm.weight")

    def edit(t):
        t.pop(missing)
        t[extra] = torch.zeros(INTER, HIDDEN, dtype=torch.float16)
        t[wrong] = t[wrong].to(torch.bfloat16)

    _rewrite_tensors(ckpt, edit)
    _rejected(ckpt, missing, extra, wrong, "missing", "unexpected", "dtype bfloat16")


def test_config_not_json(ckpt):
    (ckpt / "config.json").write_text('{"architecture": "LlamaForCausalLM", ')
    _rejected(ckpt, "config.json is not valid JSON")


def test_config_not_an_object(ckpt):
    (ckpt / "config.json").write_text("[1, 2]")
    _rejected(ckpt, "config.json must hold an object")


def test_truncated_weights(ckpt):
    path = ckpt / "rank0.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _rejected(ckpt, "rank0.safetensors is unreadable")


def test_weights_file_of_junk(ckpt):
    (ckpt / "rank0.safetensors").write_bytes(b"\xff" * 100)
    _rejected(ckpt, "rank0.safetensors is unreadable")


def test_missing_weights_file(ckpt):
    (ckpt / "rank0.safetensors").unlink()
    _rejected(ckpt, "rank0.safetensors is missing")


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    _rejected(ckpt, "config.json is missing")


def test_not_a_folder(tmp_path):
    _rejected(tmp_path / "nope", "no such folder")


def test_architecture_not_llama(ckpt):
    _edit_config(ckpt, lambda c: c.update(architecture="GPT2LMHeadModel"))
    _rejected(ckpt, "'GPT2LMHeadModel'", "only 'LlamaForCausalLM' is supported")


def test_unsupported_quant_algo(ckpt):
    _edit_config(ckpt, lambda c: c.update(quantization={"quant_algo": "W3A7", "kv_cache_quant_algo": None}))
    _rejected(ckpt, "quant_algo 'W3A7' is not supported")


def test_unsupported_kv_cache_algo(ckpt):
    _edit_config(ckpt, lambda c: c.update(quantization={"quant_algo": None, "kv_cache_quant_algo": "INT4"}))
    _rejected(ckpt, "kv_cache_quant_algo 'INT4' is not supported")


def test_quantized_config_with_fp16_tensors_is_rejected(ckpt):
    """config.json says FP8 but the tensors are fp16: every linear's weight is the wrong dtype + scales missing."""
    _edit_config(ckpt, lambda c: c.update(quantization={"quant_algo": "FP8", "kv_cache_quant_algo": None}))
    _rejected(ckpt, "missing", "weights_scaling_factor", "dtype float16", "expected float8_e4m3fn")


def test_excluded_modules_stay_fp16(ckpt):
    """FP8 with every linear excluded is the fp16 checkpoint again: accepted."""
    _edit_config(ckpt, lambda c: c.update(
        quantization={"quant_algo": "FP8", "kv_cache_quant_algo": None, "exclude_modules": ["transformer.layers.*"]}))
    loaded = load_checkpoint(ckpt)
    assert set(loaded.layer_algos.values()) == {None}


WRONG_TYPES = [
    pytest.param("num_hidden_layers", "2", "num_hidden_layers must be a positive integer, got '2'", id="layers-str"),
    pytest.param("hidden_size", 0, "hidden_size must be a positive integer", id="hidden-zero"),
    pytest.param("vocab_size", 49152.0, "vocab_size must be a positive integer", id="vocab-float"),
    pytest.param("num_key_value_heads", True, "num_key_value_heads must be a positive integer", id="kv-bool"),
    pytest.param("num_key_value_heads", 3, "num_attention_heads is not a multiple of num_key_value_heads",
                 id="kv-not-divisor"),
    pytest.param("dtype", "float64", "config.json dtype must be one of", id="dtype"),
    pytest.param("rotary_base", "10000", "rotary_base must be a number", id="rotary-base-str"),
    pytest.param("rotary_scaling", "llama3", "rotary_scaling must be an object or null", id="rotary-scaling-str"),
    pytest.param("quantization", "FP8", "quantization must be an object", id="quantization-str"),
    pytest.param("mapping", {"world_size": 2, "tp_size": 2}, "world_size 2 — only single-rank", id="world-size-2"),
    pytest.param("mapping", "tp1", "mapping", id="mapping-str"),
    pytest.param("head_size", "32", "head_size", id="head-size-str"),
]


@pytest.mark.parametrize("key,value,fragment", WRONG_TYPES)
def test_config_field_of_wrong_type(ckpt, key, value, fragment):
    _edit_config(ckpt, lambda c: c.__setitem__(key, value))
    _rejected(ckpt, fragment)


def test_group_size_of_wrong_type(ckpt):
    _edit_config(ckpt, lambda c: c.update(quantization={"quant_algo": "W4A16_AWQ", "group_size": "abc"}))
    _rejected(ckpt, "group_size")


def test_exclude_modules_of_wrong_type(ckpt):
    _edit_config(ckpt, lambda c: c.update(quantization={"quant_algo": "FP8", "exclude_modules": 5}))
    _rejected(ckpt, "exclude_modules")


def test_mixed_precision_layers_of_wrong_type(ckpt):
    _edit_config(ckpt, lambda c: c.update(quantization={"quant_algo": "MIXED_PRECISION"}))
    (ckpt / "quant_cfg.json").write_text(json.dumps({"quantized_layers": ["transformer.layers.0.mlp.fc"]}))
    _rejected(ckpt, "quantized_layers")


def test_mixed_precision_without_quant_cfg(ckpt):
    (ckpt / "quant_cfg.json").unlink()
    _edit_config(ckpt, lambda c: c.update(quantization={"quant_algo": "MIXED_PRECISION"}))
    _rejected(ckpt, "MIXED_PRECISION needs a readable quant_cfg.json")


# ------------------------------------------------------------------------------------------ the CLI


def _cli(folder: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "QUANT_SUITE_CACHE": os.environ["QUANT_SUITE_CACHE"]}
    return subprocess.run([sys.executable, "-m", "quant.checkpoint", str(folder)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_valid(exported):
    proc = _cli(exported)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == "valid"
    text = proc.stdout
    assert f"{LAYERS} layers, hidden {HIDDEN}, heads {HEADS}/{KV_HEADS} kv, vocab {VOCAB}" in text
    assert "rope         base 10000.0, scaling None" in text
    assert f"{LAYERS * 5}× fp16" in text
    assert "Traceback" not in proc.stderr


def _tamper_missing(folder: Path) -> str:
    _rewrite_tensors(folder, lambda t: t.pop("transformer.layers.0.attention.dense.weight"))
    return "transformer.layers.0.attention.dense.weight"


def _tamper_config(folder: Path) -> str:
    (folder / "config.json").write_text("not json")
    return "config.json is not valid JSON"


def _tamper_truncate(folder: Path) -> str:
    path = folder / "rank0.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    return "rank0.safetensors is unreadable"


@pytest.mark.parametrize("tamper", [_tamper_missing, _tamper_config, _tamper_truncate],
                         ids=["missing-tensor", "config-not-json", "truncated"])
def test_cli_rejects_with_one_error_line(ckpt, tamper):
    fragment = tamper(ckpt)
    proc = _cli(ckpt)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert fragment in lines[0]
    assert "valid" not in proc.stdout
