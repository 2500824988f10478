"""The servability table (quant/servers.py) as the search and build use it, and as docs/serving.md shows it."""
from __future__ import annotations

from pathlib import Path

import pytest

from quant.errors import UserError
from quant.recipes import KINDS, Recipe
from quant.servers import SERVERS, check_servable, table
from quant.space import narrow

DEFAULT_CFG = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30}
LLAMA3_CFG = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32}


def test_docs_hold_the_table_the_code_uses():
    doc = (Path(__file__).parents[1] / "docs" / "serving.md").read_text()
    assert table() in doc, "docs/serving.md is stale: paste `python -m quant.servers` into it"


def test_every_server_answers_for_every_format_it_could_be_asked_about():
    for server in SERVERS.values():
        for kind in KINDS:
            for kv in ("none", "int8", "fp8"):
                why = server.refusal(Recipe(kind, kv_cache=kv))
                assert why is None or (isinstance(why, str) and server.label in why)


def test_vllm_and_trtllm_spaces_differ_as_the_table_says():
    vllm = narrow(KINDS, DEFAULT_CFG, SERVERS["vllm"])
    trt = narrow(KINDS, DEFAULT_CFG, SERVERS["trtllm"])
    anyone = narrow(KINDS, DEFAULT_CFG, SERVERS["any"])
    assert vllm[:3] == (["fp16", "fp8"], (), ("none", "fp8"))
    assert trt[:3] == (["fp16", "int8_wo", "int4_awq", "int4_gptq", "fp8"], (64,), ("none", "fp8"))
    assert anyone[:3] == ([k for k in KINDS if k != "w4a8_awq"], (32, 64), ("none", "int8", "fp8"))
    # each dropped kind is said once, with the reason: the server's cell or the model's shape
    assert any(d.startswith("smoothquant") and "unsupported quant mode" in d for d in trt[3])
    assert any(d.startswith("w4a8_awq") and "blocks of 128" in d and "hidden_size 576" in d for d in anyone[3])
    # where the shapes allow it, W4A8 is in TensorRT-LLM's space and the engine's, and never in vLLM's
    assert "w4a8_awq" in narrow(KINDS, LLAMA3_CFG, SERVERS["trtllm"])[0]
    assert "w4a8_awq" in narrow(KINDS, LLAMA3_CFG, SERVERS["trtllm-engine"])[0]
    assert "w4a8_awq" not in narrow(KINDS, LLAMA3_CFG, SERVERS["vllm"])[0]


@pytest.mark.parametrize("serve_with, recipe, fragment", [
    ("vllm", Recipe("int4_awq", group_size=64), "does not load W4A16_AWQ"),
    ("trtllm", Recipe("smoothquant"), "does not load W8A8_SQ_PER_CHANNEL"),
    ("trtllm", Recipe("fp16", kv_cache="int8"), "does not load KV cache INT8"),
    ("trtllm", Recipe("int4_gptq", group_size=32), "group sizes [64, 128], not 32"),
    ("sglang", Recipe("w4a8_awq"), "MoE experts only"),
])
def test_unservable_recipe_is_refused_with_the_reason(serve_with, recipe, fragment):
    with pytest.raises(UserError, match=fr"--serve-with {serve_with}: {recipe.label} cannot be served: .*"
                                        + fragment.replace("[", r"\[").replace("]", r"\]")):
        check_servable(recipe, serve_with)
    check_servable(recipe, "any")
    check_servable(Recipe("fp8", kv_cache="fp8", exclude=("layers.0.*",)), serve_with)  # FP8 + fallback: everyone


def test_build_serve_with_refuses_before_any_work(capsys):
    from experiments.build import main

    assert main(["--recipe", "int8_wo", "--serve-with", "vllm"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not load W8A16" in err
    assert main(["--recipe", "fp8", "--serve-with", "trtllm-engine", "--format", "hf"]) == 2
    assert "loads the trtllm format, not --format hf" in capsys.readouterr().err
    assert main(["--recipe", "int4_awq:kv_cache=int8", "--format", "hf"]) == 2
    assert "INT8 KV cache has no Hugging Face export" in capsys.readouterr().err


def test_a_narrower_rerun_only_sees_what_its_server_loads():
    """A study measured with --serve-with any and continued with --serve-with vllm: the SmoothQuant and INT4 trials
    stay in the study but are outside the new space, so they cannot become its answer."""
    from quant.space import Space

    kinds, groups, kv, _ = narrow(KINDS, DEFAULT_CFG, SERVERS["vllm"])
    space = Space(tuple(kinds), groups, (), "cuda", kv)
    assert space.contains({"kind": "fp8", "kv_cache": "fp8", "fp16_fallback": 2})
    assert space.contains({"kind": "fp16", "kv_cache": "none"})
    assert not space.contains({"kind": "smoothquant", "alpha": 0.8, "kv_cache": "none", "fp16_fallback": 0})
    assert not space.contains({"kind": "int4_awq", "group_size": 64, "kv_cache": "none", "fp16_fallback": 0})
    assert not space.contains({"kind": "fp8", "kv_cache": "int8", "fp16_fallback": 0})
    trt = Space(*narrow(KINDS, DEFAULT_CFG, SERVERS["trtllm"])[:2], (), "cuda", ("none", "fp8"))
    assert trt.contains({"kind": "int4_gptq", "group_size": 64, "kv_cache": "none", "fp16_fallback": 0})
    assert not trt.contains({"kind": "int4_gptq", "group_size": 32, "kv_cache": "none", "fp16_fallback": 0})
