"""Quantization quality is real, measured on the default model through our checkpoints and runtime kernels.

- AWQ INT4 has lower held-out perplexity than plain round-to-nearest INT4 at the same group size.
- SmoothQuant with a tuned alpha beats unsmoothed W8A8 (the same int8 weight and static per-tensor activation
  quantization, no migration) on the output error of the layers with the strongest activation outliers, and
  alpha changes that error (it is a real parameter, not ModelOpt's default of 1.0 taken on trust).

Calibration is kept small (8 × 128 tokens) so the file runs in a few minutes on 2 cores.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from calibration.data import CalibSpec
from quant.apply import build_checkpoint, modelopt_config
from quant.recipes import Recipe

CALIB = CalibSpec(num_samples=8, seq_len=128)


def _unsmoothed_variant(model, recipe: Recipe, out):
    """The recipe's quantizers with ModelOpt's plain ``max`` calibration (no AWQ search, no SmoothQuant).

    ModelOpt 0.47 exports such a model with ``pre_quant_scale: true`` but without the
    ``prequant_scaling_factor`` tensors, which TRT-LLM would require; the missing factor is 1, so it is added as
    ones — exactly round-to-nearest / unmigrated quantization.
    """
    import modelopt.torch.quantization as mtq
    from transformers import AutoTokenizer

    from calibration.data import calibration_batches
    from quant.export import EXPORT_DTYPE, forward_loop, load_hf_model

    hf = load_hf_model(model, dtype=torch.float32)
    cfg = modelopt_config(recipe, hf.config.num_hidden_layers)
    cfg["algorithm"] = "max"
    tok = AutoTokenizer.from_pretrained(model.hf_dir)
    batches = calibration_batches(tok, source=CALIB.source, num_samples=CALIB.num_samples, seq_len=CALIB.seq_len,
                                  seed=CALIB.seed)
    with torch.no_grad():
        mtq.quantize(hf, cfg, forward_loop(batches))
    from modelopt.torch.export import export_tensorrt_llm_checkpoint

    export_tensorrt_llm_checkpoint(hf.to(EXPORT_DTYPE), decoder_type="llama", dtype=EXPORT_DTYPE, export_dir=out,
                                   inference_tensor_parallel=1)
    tensors = load_file(out / "rank0.safetensors")
    for name in [n for n in tensors if n.endswith(".weights_scaling_factor")]:
        prefix = name.rsplit(".", 1)[0]
        if f"{prefix}.prequant_scaling_factor" not in tensors:
            in_features = tensors[f"{prefix}.weight"].shape[1]
            tensors[f"{prefix}.prequant_scaling_factor"] = torch.ones(in_features, dtype=torch.float16)
    save_file(tensors, out / "rank0.safetensors")
    from quant.export import fix_config

    fix_config(out, load_hf_model(model).config)
    return out


@pytest.mark.slow
def test_awq_beats_round_to_nearest_int4(default_model, tmp_path):
    from transformers import AutoTokenizer

    from experiments.perplexity import heldout_texts, perplexity
    from quant.runtime.torch_runtime import TorchRuntime

    recipe = Recipe("int4_awq", group_size=64)
    awq = build_checkpoint(default_model, recipe, CALIB)
    rtn = _unsmoothed_variant(default_model, recipe, tmp_path / "rtn")
    tok = AutoTokenizer.from_pretrained(default_model.hf_dir)
    texts = heldout_texts(num_docs=6)
    ppl = {}
    for name, ckpt in (("awq", awq), ("rtn", rtn)):
        rt = TorchRuntime.from_dir(ckpt, compute_dtype="bfloat16")
        assert "int4pack_mm_cpu" in rt.describe()["kernels"]
        ppl[name] = perplexity(rt, tok, texts, seq_len=256)["perplexity"]
    print(f"perplexity on 6 aclsum val docs: AWQ g64 {ppl['awq']:.2f}, RTN g64 {ppl['rtn']:.2f}")
    assert ppl["awq"] < ppl["rtn"]


def _layer_inputs(model, layer: int, texts, tok) -> torch.Tensor:
    """Real inputs of ``layers.{layer}.mlp.proj`` (HF down_proj) on held-out text, float32 [tokens, in]."""
    from quant.export import load_hf_model

    hf = load_hf_model(model, dtype=torch.float32)
    seen = []
    handle = hf.model.layers[layer].mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0][0].detach()))
    with torch.no_grad():
        for text in texts:
            hf(torch.tensor([tok(text)["input_ids"][:128]]))
    handle.remove()
    return torch.cat(seen)


def _layer_error(ckpt, name: str, x: torch.Tensor, w_ref: torch.Tensor) -> float:
    from quant.checkpoint import load_checkpoint
    from quant.runtime.linear import make_linear

    c = load_checkpoint(ckpt)
    prefix = f"transformer.{name}."
    lin = make_linear(c.layer_algos[name], {k[len(prefix):]: v for k, v in c.tensors.items() if k.startswith(prefix)},
                      dtype=torch.float32, device=torch.device("cpu"))
    assert lin.kernel == "int_mm"
    ref = x @ w_ref.T
    return ((lin(x) - ref).norm() / ref.norm()).item()


@pytest.mark.slow
def test_smoothquant_tuned_alpha_beats_unsmoothed_w8a8_on_outlier_layers(default_model, default_fp16_checkpoint, tmp_path):
    from transformers import AutoTokenizer

    from calibration.stats import get_stats
    from experiments.perplexity import heldout_texts

    stats = get_stats(default_model, CALIB)
    outlier_layers = [n for n in stats.ranked_layers() if n.endswith("mlp.proj")][:2]
    tok = AutoTokenizer.from_pretrained(default_model.hf_dir)
    texts = heldout_texts(num_docs=3)
    fp16 = load_file(default_fp16_checkpoint / "rank0.safetensors")
    plain = _unsmoothed_variant(default_model, Recipe("smoothquant", alpha=0.5), tmp_path / "plain")
    alphas = (0.3, 0.5, 0.8)
    ckpts = {a: build_checkpoint(default_model, Recipe("smoothquant", alpha=a), CALIB) for a in alphas}
    report = {}
    for name in outlier_layers:
        x = _layer_inputs(default_model, int(name.split(".")[1]), texts, tok)
        w = fp16[f"transformer.{name}.weight"].float()
        errors = {a: _layer_error(ckpt, name, x, w) for a, ckpt in ckpts.items()}
        errors["unsmoothed"] = _layer_error(plain, name, x, w)
        report[name] = errors
        best = min(errors[a] for a in alphas)
        assert best < errors["unsmoothed"], (name, errors)
        # alpha is a real parameter: the spread across alphas is well above rounding noise.
        assert max(errors[a] for a in alphas) > 1.2 * best, (name, errors)
    print(json.dumps(report, indent=1))
