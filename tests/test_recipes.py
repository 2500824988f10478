"""Recipes are data: validation before any work, YAML/JSON round-trip, a stable hash, ModelOpt translation."""
from __future__ import annotations

import pytest

from quant.errors import UserError
from quant.recipes import Recipe, parse_recipe_arg

DEFAULT_CFG = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30}


def test_defaults_filled_per_kind_and_hash_is_canonical():
    assert Recipe("smoothquant").alpha == 0.8
    assert Recipe("int4_awq").group_size == 128 and Recipe("int4_awq").awq_alpha_step == 0.1
    a = Recipe("int8_wo", exclude=("lm_head", "*.mlp.proj"))
    b = Recipe.from_dict({"exclude": ["*.mlp.proj", "lm_head", "lm_head"], "kind": "int8_wo"})
    assert a == b and a.hash == b.hash
    assert Recipe("smoothquant", alpha=0.5).hash != Recipe("smoothquant", alpha=0.6).hash
    assert Recipe("smoothquant", alpha=0.5).hash == Recipe("smoothquant", alpha=0.50000001).hash


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_file_round_trip(tmp_path, suffix):
    r = Recipe("int4_awq", group_size=64, awq_clip=True, kv_cache="int8", exclude=("layers.0.*",))
    path = tmp_path / f"r{suffix}"
    r.dump(path)
    assert Recipe.load(path) == r
    wrapped = tmp_path / f"w{suffix}"
    r.dump(wrapped, extra={"metrics": {"rouge1": 30.0}})
    assert Recipe.load(wrapped) == r


def test_parse_recipe_arg():
    r = parse_recipe_arg("smoothquant:alpha=0.6,kv_cache=fp8,exclude=lm_head+*.mlp.proj")
    assert r == Recipe("smoothquant", alpha=0.6, kv_cache="fp8", exclude=("lm_head", "*.mlp.proj"))
    assert parse_recipe_arg("int4_awq:group_size=64").group_size == 64


@pytest.mark.parametrize("make, needle", [
    (lambda: Recipe("int3"), "unknown recipe 'int3'"),
    (lambda: Recipe("smoothquant", alpha=1.5), "alpha must be in [0, 1]"),
    (lambda: Recipe("smoothquant", alpha=-0.1), "alpha must be in [0, 1]"),
    (lambda: Recipe("int8_wo", alpha=0.5), "alpha applies to smoothquant only"),
    (lambda: Recipe("int4_awq", group_size=100), "group_size must be one of"),
    (lambda: Recipe("fp8", kv_cache="int4"), "unknown kv_cache 'int4'"),
    (lambda: Recipe.from_dict({"kind": "fp8", "colour": "red"}), "unknown recipe field(s): colour"),
    (lambda: parse_recipe_arg("smoothquant:alpha"), "expected key=value"),
    (lambda: Recipe("fp16", exclude=("lm_head",)), "exclude has no effect on fp16"),
])
def test_invalid_recipes_fail_with_precise_reason(make, needle):
    with pytest.raises(UserError) as err:
        make()
    assert needle in str(err.value)


def test_model_dependent_checks():
    with pytest.raises(UserError, match=r"group_size 128 does not divide the model's hidden_size 576; use one of \[32, 64\]"):
        Recipe("int4_awq").validate_for(DEFAULT_CFG)
    Recipe("int4_awq", group_size=64).validate_for(DEFAULT_CFG)
    with pytest.raises(UserError, match="exclude pattern 'layers.30.*' matches no layer"):
        Recipe("int8_wo", exclude=("layers.30.*",)).validate_for(DEFAULT_CFG)
    r = Recipe("int8_wo", exclude=("layers.0.*", "*.mlp.proj"))
    r.validate_for(DEFAULT_CFG)
    assert len(r.excluded_layers(30)) == 5 + 29


def test_bad_recipe_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: [unclosed")
    with pytest.raises(UserError, match="not valid YAML/JSON"):
        Recipe.load(bad)
    with pytest.raises(UserError, match="cannot read recipe file"):
        Recipe.load(tmp_path / "missing.yaml")


def test_modelopt_config_translation():
    from quant.apply import KV_QUANTIZER, modelopt_config

    assert modelopt_config(Recipe("fp16"), 30) is None
    sq = modelopt_config(Recipe("smoothquant", alpha=0.55), 30)
    assert sq["algorithm"] == {"method": "smoothquant", "alpha": 0.55}
    awq = modelopt_config(Recipe("int4_awq", group_size=64, awq_clip=True), 30)
    assert awq["algorithm"]["method"] == "awq_full"
    w = [e for e in awq["quant_cfg"] if e.get("quantizer_name") == "*weight_quantizer"][0]
    assert w["cfg"]["block_sizes"][-1] == 64
    kv = modelopt_config(Recipe("fp8", kv_cache="int8"), 30)
    assert {"quantizer_name": KV_QUANTIZER, "cfg": {"num_bits": 8, "axis": None}} in kv["quant_cfg"]
    ex = modelopt_config(Recipe("int8_wo", exclude=("layers.1.attention.qkv",)), 30)
    disabled = [e["quantizer_name"] for e in ex["quant_cfg"] if e.get("enable") is False and ".layers.1." in e["quantizer_name"]]
    assert disabled == ["*.layers.1.self_attn.q_proj.*", "*.layers.1.self_attn.k_proj.*", "*.layers.1.self_attn.v_proj.*"]
    # The ModelOpt constant itself must stay untouched (configs are deep-copied).
    import modelopt.torch.quantization as mtq
    assert "algorithm" not in mtq.INT8_SMOOTHQUANT_CFG or mtq.INT8_SMOOTHQUANT_CFG["algorithm"] != sq["algorithm"]


def test_trtllm_build_command_per_recipe(tmp_path):
    from quant.trtllm import Workload, build_command

    w = Workload(batch_size=4, input_len=512, output_len=100)
    fp16 = build_command(tmp_path / "ck", tmp_path / "en", Recipe("fp16"), w)
    assert fp16[0] == "trtllm-build"
    flags = dict(zip(fp16[1::2], fp16[2::2]))
    assert flags["--max_seq_len"] == "612" and flags["--max_num_tokens"] == "2048"
    assert flags["--gemm_plugin"] == "auto" and flags["--kv_cache_type"] == "paged"
    fp8 = build_command(tmp_path / "ck", tmp_path / "en", Recipe("fp8"), w)
    assert "--gemm_plugin" not in fp8
