"""Our checkpoints are exactly what ModelOpt's own ``export_tensorrt_llm_checkpoint`` writes, plus the RoPE fields.

For each recipe the model is quantized once with the recipe's ModelOpt config and calibration data, then
exported twice: through ModelOpt directly (the reference) and through our pipeline (``quant.apply``). Tensor
names, shapes, dtypes and values, and the ``quantization`` block must agree; config.json must carry
``rotary_base``/``rotary_scaling``, which ModelOpt 0.47 drops with transformers 5.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from calibration.data import CalibSpec
from quant import cache_budget
from quant.apply import build_checkpoint, checkpoint_bytes_bound, quantize_model
from quant.model_source import resolve_model
from quant.recipes import Recipe

CALIB = CalibSpec(num_samples=4, seq_len=64)
RECIPES = ["fp16", "int8_wo", "smoothquant:alpha=0.6", "int4_awq:group_size=128", "fp8", "int8_wo:kv_cache=int8",
           "fp8:kv_cache=fp8", "int8_wo:exclude=layers.0.*"]


@pytest.fixture(scope="module")
def tiny128(tmp_path_factory, default_model):
    """Dims divisible by 128, so every format (AWQ group 128 included) can export."""
    from tests.tiny import make_tiny_llama

    path = make_tiny_llama(tmp_path_factory.mktemp("conf") / "tiny128", hidden=256, intermediate=512, heads=4,
                           kv_heads=2, layers=2, rope_theta=50000.0, tokenizer_from=default_model.hf_dir)
    return resolve_model(str(path))


def _modelopt_reference(model, recipe, out):
    from modelopt.torch.export import export_tensorrt_llm_checkpoint

    from quant.export import EXPORT_DTYPE, load_hf_model

    hf = quantize_model(model, recipe, CALIB) if recipe.needs_calibration else load_hf_model(model, EXPORT_DTYPE)
    export_tensorrt_llm_checkpoint(hf, decoder_type="llama", dtype=EXPORT_DTYPE, export_dir=out,
                                   inference_tensor_parallel=1)
    return out


def _compare(ours, ref):
    a, b = load_file(ours / "rank0.safetensors"), load_file(ref / "rank0.safetensors")
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].shape == b[name].shape and a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), f"{name} differs from ModelOpt's export"
    ca, cb = json.loads((ours / "config.json").read_text()), json.loads((ref / "config.json").read_text())
    # ModelOpt builds exclude_modules from a set: the order varies between processes, the content must not.
    qa, qb = dict(ca["quantization"]), dict(cb["quantization"])
    assert sorted(qa.pop("exclude_modules", None) or []) == sorted(qb.pop("exclude_modules", None) or [])
    assert qa == qb
    rope = ("rotary_base", "rotary_scaling")
    rope += ("quantization",)
    assert {k: v for k, v in ca.items() if k not in rope} == {k: v for k, v in cb.items() if k not in rope}
    return ca


@pytest.mark.slow
@pytest.mark.parametrize("spec", RECIPES)
def test_tiny_checkpoint_equals_modelopt_export(tiny128, tmp_path, spec):
    from quant.recipes import parse_recipe_arg

    recipe = parse_recipe_arg(spec)
    ours = build_checkpoint(tiny128, recipe, CALIB)
    cfg = _compare(ours, _modelopt_reference(tiny128, recipe, tmp_path / "ref"))
    # The size the cache budget reserves before the build bounds the checkpoint, and not loosely.
    written, bound = cache_budget._size(ours), checkpoint_bytes_bound(tiny128, recipe)
    assert written <= bound <= 1.1 * written, (written, bound)
    assert cfg["rotary_base"] == 50000.0 and "rotary_scaling" in cfg
    assert cfg["quantization"]["quant_algo"] == recipe.quant_algo
    assert cfg["quantization"].get("kv_cache_quant_algo") == recipe.kv_algo


@pytest.mark.slow
def test_default_model_int8_wo_equals_modelopt_export(default_model, tmp_path):
    recipe = Recipe("int8_wo")
    ours = build_checkpoint(default_model, recipe, CALIB)
    cfg = _compare(ours, _modelopt_reference(default_model, recipe, tmp_path / "ref"))
    assert cfg["rotary_base"] == 100000.0 and cfg["rotary_scaling"] is None
