"""What an exported Hugging Face folder *means* is what the servers compute from it: for each format, the loading
math of TensorRT-LLM's PyTorch backend (and vLLM's / SGLang's ModelOpt loader where they load the format) is
re-implemented here from their source, independently of our reader, and our reader + runtime handler must compute
the same linear outputs on the same inputs.

Sources (the cells of docs/serving.md; TensorRT-LLM's repository could not be mirrored here, its files were read
from the stored index, one version each):
- TRT-LLM ``tensorrt_llm/_torch/modules/linear.py`` @00bbf71e796406ea8593a77cbfb828356182db16:
  ``WeightOnlyQuantLinearMethod`` (W8A16), ``W4A16_AWQ_LinearMethod``, ``W4A8_AWQ_LinearMethod``,
  ``FP8QDQLinearMethod`` (``rescale_fused_weights``, ``load_kv_scales``), and ``preprocess_weights_for_mixed_gemm``
  (``tensorrt_llm/quantization/functional.py``: low nibble first, signed int4, +8 added by the loader itself).
- TRT-LLM ``tensorrt_llm/_torch/attention_backend/trtllm.py`` @00bede19e84a4fb39595453335b3ff856d017e78 (and the
  newest stored text): FP8 KV-cache scales stay 1.0 in the PyTorch backend.
- TRT-LLM ``QuantConfig.is_module_excluded_from_quantization`` (``fnmatch.fnmatchcase`` on HF module names).
- vLLM 0.34.0 ``vllm/model_executor/layers/quantization/utils/w8a8_utils.py:75-106`` ``requantize_with_max_scale``
  and ``modelopt.py:2305-2324`` (FP8: fused shards requantized to the max weight scale, input scale the max);
  SGLang 0.5.23 ``modelopt_quant.py:617-627`` does the same.

The folders come from ModelOpt 0.47 on a tiny random LLaMa (shapes only matter here; hidden 128 lets W4A8's block of
128 fit). No server runs here (none can be installed on this machine): the reference math is the boundary.
"""
from __future__ import annotations

import fnmatch
import json

import pytest
import torch

from quant.names import HF_MODULES
from quant.recipes import parse_recipe_arg

FP8 = torch.float8_e4m3fn
RECIPES = ("int8_wo", "int4_awq:group_size=64", "int4_gptq:group_size=64", "w4a8_awq", "fp8:kv_cache=fp8",
           "int8_wo:exclude=layers.0.*+*.mlp.proj", "int4_awq:group_size=64,exclude=layers.1.attention.qkv")


@pytest.fixture(scope="module")
def exports(tiny_llama_dir, tmp_path_factory):
    """recipe → (HF export folder, our reader's Checkpoint), each quantized by ModelOpt with our recipe config."""
    import modelopt.torch.quantization as mtq
    from transformers import AutoModelForCausalLM

    from quant.apply import modelopt_config
    from quant.hf_checkpoint import export_hf, load_hf_export

    root = tmp_path_factory.mktemp("server-loaders")
    out = {}
    for spec in RECIPES:
        recipe = parse_recipe_arg(spec)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
        ids = torch.randint(1000, 40000, (4, 32))
        with torch.no_grad():
            mtq.quantize(model, modelopt_config(recipe, model.config.num_hidden_layers), lambda m: m(ids))
        folder = export_hf(model.to(torch.float16), root / recipe.label, expect=(recipe.quant_algo, recipe.kv_algo))
        out[spec] = (folder, load_hf_export(folder))
    return out


def _raw(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(folder.glob("model*.safetensors")) for k, v in load_file(str(f)).items()}


def _ours(ckpt, layer: int, lin: str, x: torch.Tensor) -> torch.Tensor:
    """Our runtime's handler for one (fused) linear, built from our reader's tensors, on the CPU in float32."""
    from quant.formats import layer_group_sizes
    from quant.runtime.linear import make_linear

    prefix = f"transformer.layers.{layer}.{lin}."
    tensors = {k[len(prefix):]: v for k, v in ckpt.tensors.items() if k.startswith(prefix)}
    name = f"layers.{layer}.{lin}"
    handler = make_linear(ckpt.layer_algos[name], tensors, dtype=torch.float32, device=torch.device("cpu"),
                          group_size=layer_group_sizes(ckpt.config, ckpt.path)[name])
    return handler(x)


def _unpack_trtllm(packed: torch.Tensor) -> torch.Tensor:
    """preprocess_weights_for_mixed_gemm's view of ModelOpt's uint8 [out/2, in]: transposed to [in, out/2] int8,
    each byte's low nibble first (signed: (b << 4) >> 4), then the high nibble (b >> 4); → int [out, in]."""
    t = packed.view(torch.int8).t().contiguous()
    low = torch.bitwise_right_shift(torch.bitwise_left_shift(t, 4), 4)
    high = torch.bitwise_right_shift(t, 4)
    return torch.stack((low, high), dim=-1).reshape(t.shape[0], -1).t().to(torch.int32)


# What the servers load as one linear (qkv_proj, gate_up_proj); o_proj and down_proj are loaded alone ("vanilla").
SERVER_FUSED = {"attention.qkv": ("attention.qkv",), "mlp.fc": ("mlp.fc", "mlp.gate"), "mlp.gate": ("mlp.fc", "mlp.gate")}


def _fused(raw: dict, layer: int, lin: str, suffix: str) -> list[torch.Tensor]:
    return [raw[f"model.layers.{layer}.{m}.{suffix}"] for m in HF_MODULES[lin]]


def _group(raw: dict, layer: int, lin: str, suffix: str) -> list[torch.Tensor]:
    """``suffix`` of every shard the server loads together with ``lin``."""
    return [t for member in SERVER_FUSED.get(lin, (lin,)) for t in _fused(raw, layer, member, suffix)]


def _has(raw: dict, layer: int, lin: str, suffix: str) -> bool:
    return all(f"model.layers.{layer}.{m}.{suffix}" in raw for m in HF_MODULES[lin])


def _fp8(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-448, 448).to(FP8).float()


def _trtllm_linear(raw: dict, algo: str, layer: int, lin: str, x: torch.Tensor) -> torch.Tensor:
    """The linear as TensorRT-LLM's PyTorch backend computes it from the HF folder (float32 GEMM)."""
    weights = _fused(raw, layer, lin, "weight")
    fused = lin in SERVER_FUSED
    if algo == "W8A16":  # WeightOnlyQuantLinearMethod: cat int8 weights, cat per-channel scales
        w = torch.cat(weights).float() * torch.cat(_fused(raw, layer, lin, "weight_scale")).float()[:, None]
        return x @ w.t()
    if algo == "W4A16_AWQ":
        q = torch.cat([_unpack_trtllm(w) for w in weights])
        scales = torch.cat(_fused(raw, layer, lin, "weight_scale")).float()
        group = q.shape[1] // scales.shape[1]
        w = q.float() * scales.repeat_interleave(group, dim=1)
        # load_weights_vanilla reads pre_quant_scale (o_proj, down_proj); the fused loaders read none (ModelOpt
        # folded it into the RMSNorm).
        if not fused:
            x = x * raw[f"model.layers.{layer}.{HF_MODULES[lin][0]}.pre_quant_scale"].float()
        return x @ w.t()
    if algo == "W4A8_AWQ":
        in_scales = [s.float() for s in _group(raw, layer, lin, "input_scale")]
        s2 = [s.float() for s in _group(raw, layer, lin, "weight_scale_2")]
        # load_weight_scales_w4a8: "The input_scale should be same for all the weights" (asserted), so is scale_2
        assert all(torch.equal(in_scales[0], s) for s in in_scales) and all(torch.equal(s2[0], s) for s in s2)
        q = torch.cat([_unpack_trtllm(w) for w in weights])
        scale = (torch.cat(_fused(raw, layer, lin, "weight_scale")).float().t() / s2[0]).half().float().t()
        group = q.shape[1] // scale.shape[1]
        w8 = _fp8(q.float() * scale.repeat_interleave(group, dim=1))  # int4 · (s / s2) → fp8 for the fp8 GEMM
        first = HF_MODULES[SERVER_FUSED.get(lin, (lin,))[0]][0]
        pre = raw.get(f"model.layers.{layer}.{first}.pre_quant_scale")  # shard 0's, if any
        if pre is not None:
            x = x * pre.float()
        xq = _fp8(x / in_scales[0])  # static_quantize_e4m3_per_tensor
        return (xq @ w8.t()) * (in_scales[0] * s2[0])  # alpha = input_scale · weight_scale_2
    if algo == "FP8":  # FP8QDQLinearMethod / vLLM requantize_with_max_scale: shards to the max scale
        ws = [s.float().reshape(()) for s in _fused(raw, layer, lin, "weight_scale")]
        w_max = torch.stack([s.float().reshape(()) for s in _group(raw, layer, lin, "weight_scale")]).max()
        w8 = torch.cat([(w.to(torch.float16) * s).div(w_max).to(FP8) for w, s in zip(weights, ws)]).float()
        in_max = torch.stack([s.float().reshape(()) for s in _group(raw, layer, lin, "input_scale")]).max()
        return (_fp8(x / in_max) @ w8.t()) * (in_max * w_max)
    raise AssertionError(algo)


def _linears(ckpt):
    return [(i, lin) for i in range(ckpt.config["num_hidden_layers"]) for lin in HF_MODULES]


@pytest.mark.parametrize("spec", RECIPES[:5])
def test_reader_computes_what_trtllm_pytorch_backend_computes(exports, spec):
    folder, ckpt = exports[spec]
    raw = _raw(folder)
    algo = json.loads((folder / "hf_quant_config.json").read_text())["quantization"]["quant_algo"]
    gen = torch.Generator().manual_seed(1)
    checked = 0
    for i, lin in _linears(ckpt):
        if ckpt.layer_algos[f"layers.{i}.{lin}"] is None:
            continue
        inp = ckpt.tensors[f"transformer.layers.{i}.{lin}.weight"].shape[1]
        x = torch.randn(3, inp, generator=gen)
        ref, ours = _trtllm_linear(raw, algo, i, lin, x), _ours(ckpt, i, lin, x)
        err = float((ours - ref).norm() / ref.norm())
        assert err < 1e-5, (spec, i, lin, err)
        checked += 1
    assert checked == 2 * len(HF_MODULES)


def test_int4_packing_is_the_servers_and_awq_prescales_sit_where_trtllm_reads_them(exports):
    folder, _ = exports["int4_awq:group_size=64"]
    raw = _raw(folder)
    for i in range(2):
        for lin in HF_MODULES:
            fused = lin in SERVER_FUSED
            # TRT-LLM's fused loaders ignore pre_quant_scale: ModelOpt must have folded it (none left to drop)
            assert _has(raw, i, lin, "pre_quant_scale") != fused, (i, lin)
    folder, _ = exports["int4_gptq:group_size=64"]
    raw = _raw(folder)
    # GPTQ has no AWQ scale; load_weights_vanilla reads one unchecked, so the export carries ones there
    assert torch.equal(raw["model.layers.0.mlp.down_proj.pre_quant_scale"].float(), torch.ones(256))
    assert not _has(raw, 0, "attention.qkv", "pre_quant_scale")


def test_fp8_kv_cache_runs_at_the_trtllm_pytorch_scale(exports):
    """TrtllmAttention keeps FP8 KV scales at 1.0 (the exported k_scale/v_scale are loaded, not applied). vLLM
    applies k_scale and v_scale separately; a single-scale cache cannot compute that (docs/serving.md)."""
    folder, ckpt = exports["fp8:kv_cache=fp8"]
    raw = _raw(folder)
    assert ckpt.kv_cache_algo == "FP8"
    for i in range(2):
        assert float(ckpt.tensors[f"transformer.layers.{i}.attention.kv_cache_scaling_factor"]) == 1.0
        assert float(raw[f"model.layers.{i}.self_attn.k_proj.k_scale"]) > 0  # exported, read, not applied


@pytest.mark.parametrize("spec", RECIPES[5:])
def test_fp16_fallback_is_what_the_servers_exclude(exports, spec):
    """exclude_modules matched as TRT-LLM (fnmatchcase on the HF module name) and vLLM (exact, then fnmatch) do:
    our reader keeps exactly those linears unquantized, and runs them as stored."""
    folder, ckpt = exports[spec]
    patterns = json.loads((folder / "hf_quant_config.json").read_text())["quantization"]["exclude_modules"]
    raw = _raw(folder)
    for i, lin in _linears(ckpt):
        names = [f"model.layers.{i}.{m}" for m in HF_MODULES[lin]]
        server = {any(fnmatch.fnmatchcase(n, p) for p in patterns) for n in names}
        assert len(server) == 1, (i, lin)  # fused parts excluded together
        assert (ckpt.layer_algos[f"layers.{i}.{lin}"] is None) == server.pop(), (i, lin)
        if ckpt.layer_algos[f"layers.{i}.{lin}"] is None:
            x = torch.randn(2, raw[names[0] + ".weight"].shape[1])
            w = torch.cat([raw[n + ".weight"].float() for n in names])
            assert torch.allclose(_ours(ckpt, i, lin, x), x @ w.t(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec", ["int4_awq:group_size=64", "w4a8_awq"])
def test_fc_and_gate_of_an_hf_export_run_as_one_linear(exports, spec):
    """The export folds AWQ's gate/up pre-quant scale into the RMSNorm (W4A16: none left; W4A8: shared input and
    FP8 scales), so — as in TensorRT-LLM's gate_up_proj — the CUDA path stacks them into one GEMV; on the CPU the
    stacked linear computes exactly the two."""
    from quant.runtime.linear import concat_linear_tensors, make_linear

    _, ckpt = exports[spec]
    prefixes = ("transformer.layers.0.mlp.fc.", "transformer.layers.0.mlp.gate.")
    parts = [{k[len(p):]: v for k, v in ckpt.tensors.items() if k.startswith(p)} for p in prefixes]
    algo, group = ckpt.layer_algos["layers.0.mlp.fc"], ckpt.config["quantization"]["group_size"]
    both = concat_linear_tensors(algo, parts)
    assert both is not None
    x = torch.randn(2, parts[0]["weight"].shape[1])

    def run(tensors):
        return make_linear(algo, tensors, dtype=torch.float32, device=torch.device("cpu"), group_size=group)(x)

    assert torch.allclose(run(both), torch.cat([run(p) for p in parts], dim=-1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec", ["int4_awq:group_size=64", "fp8:kv_cache=fp8"])
def test_config_json_alone_reads_the_same(exports, spec, tmp_path):
    """vLLM reads config.json's quantization_config first (hf_quant_config.json only without it): that block alone
    (no group_size; the KV cache as ``kv_cache_scheme``) must give the same checkpoint."""
    import shutil

    from quant.hf_checkpoint import load_hf_export

    folder, ours = exports[spec]
    alone = tmp_path / "alone"
    shutil.copytree(folder, alone)
    (alone / "hf_quant_config.json").unlink()
    back = load_hf_export(alone)
    assert back.config["quantization"] == ours.config["quantization"]
    assert back.tensors.keys() == ours.tensors.keys()
    assert all(torch.equal(back.tensors[k], ours.tensors[k]) for k in ours.tensors)
