"""The default model's HF exports read back like its TRT-LLM checkpoints (real weights, real calibration).

One recipe per reading path that the tiny-model tests cannot make realistic: INT4 AWQ (gate/up re-quantized with
the folded, averaged pre-quant scale: a different quantization, expected close) and FP8 with an FP8 KV cache
(shards requantized to the max scale; KV scale 1.0). The same calibration as tests/test_quality.py, so the
TRT-LLM checkpoint of the AWQ recipe comes from the shared cache. The two paths' held-out NLL on an aclsum paper
must agree within 3% (measured: see the comments), and both stay far from garbage. The full 100-paper paired
comparison on a GPU is experiments/results/gpu/serving/README.md.
"""
from __future__ import annotations

import pytest
import torch

from calibration.data import CalibSpec
from quant.recipes import Recipe
from tests.conftest import aclsum_records

CALIB = CalibSpec(num_samples=8, seq_len=128)


def _nll(rt, ids: list[int]) -> tuple[float, torch.Tensor]:
    logits = rt.logits(ids).float()
    nll = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]))
    return float(nll), logits.argmax(-1)


@pytest.mark.parametrize("recipe", [Recipe("int4_awq", group_size=64), Recipe("fp8", kv_cache="fp8")],
                         ids=lambda r: r.label)
def test_default_model_hf_export_reads_back_like_its_trtllm_checkpoint(default_model, default_fp16_checkpoint, recipe):
    from transformers import AutoTokenizer

    from quant.apply import build_checkpoint
    from quant.hf_checkpoint import build_hf_export, load_hf_export
    from quant.runtime.torch_runtime import TorchRuntime

    trt = TorchRuntime.from_dir(build_checkpoint(default_model, recipe, CALIB), compute_dtype="float32")
    hf_dir = build_hf_export(default_model, recipe, CALIB)
    hf = TorchRuntime(load_hf_export(hf_dir), compute_dtype="float32")
    assert hf.kv_algo == recipe.kv_algo
    tok = AutoTokenizer.from_pretrained(default_model.hf_dir)
    ids = tok(" ".join(aclsum_records("val")[0]["sentences"]["abstract"]))["input_ids"][:160]
    (nll_hf, top_hf), (nll_trt, top_trt) = _nll(hf, ids), _nll(trt, ids)
    nll_fp16, _ = _nll(TorchRuntime.from_dir(default_fp16_checkpoint, compute_dtype="float32"), ids)
    assert abs(nll_hf - nll_trt) <= 0.03 * nll_trt, (nll_hf, nll_trt)
    assert (top_hf == top_trt).float().mean() >= 0.85
    assert nll_hf < nll_fp16 + 1.0  # quantized, not broken
