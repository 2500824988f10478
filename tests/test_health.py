"""Garbage models are caught: NaN scales at load, NaN weights and degenerate output at evaluation."""
from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from experiments.health import check, is_degenerate
from quant.errors import UserError


def test_is_degenerate():
    assert is_degenerate([5] * 10, 10)
    assert is_degenerate([1, 2, 3, 4, 5, 7, 8, 7, 8, 7], 10)  # 2-token cycle over the second half
    assert not is_degenerate([5] * 6, 10), "stopped at EOS before the budget: not degenerate"
    assert not is_degenerate(list(range(10)), 10)


@pytest.fixture(scope="module")
def tiny_fp16(tmp_path_factory, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    from quant.export import export_checkpoint

    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float16)
    return export_checkpoint(hf, tmp_path_factory.mktemp("health") / "ckpt")


def _poisoned(src, dst, name, value):
    shutil.copytree(src, dst)
    tensors = load_file(dst / "rank0.safetensors")
    tensors[name] = torch.full_like(tensors[name], value)
    save_file(tensors, dst / "rank0.safetensors")
    return dst


def test_nan_weights_are_flagged(tiny_fp16, tmp_path):
    from quant.runtime.torch_runtime import TorchRuntime

    bad = _poisoned(tiny_fp16, tmp_path / "bad", "transformer.layers.0.mlp.proj.weight", float("nan"))
    rt = TorchRuntime.from_dir(bad)
    prompt = list(range(1000, 1010))
    gen = rt.generate([prompt] * 2, 8, ignore_eos=True)
    health = check(rt, prompt, gen.tokens, 8, None)
    assert not health["ok"] and not health["finite_logits"]
    assert "NaN/Inf in the logits" in health["reasons"]
    good = check(TorchRuntime.from_dir(tiny_fp16), prompt, [list(range(8))] * 2, 8, 12.0)
    assert good["ok"], good


def test_nan_scale_is_rejected_at_load(tiny_fp16, tmp_path):
    from safetensors.torch import load_file as lf

    from quant.checkpoint import load_checkpoint, validate_checkpoint

    ck = shutil.copytree(tiny_fp16, tmp_path / "sq")
    tensors = lf(ck / "rank0.safetensors")
    # Turn the checkpoint into a (tiny) W8A16 one with one NaN scale.
    import json

    cfg = json.loads((ck / "config.json").read_text())
    cfg["quantization"] = {"quant_algo": "W8A16", "kv_cache_quant_algo": None}
    (ck / "config.json").write_text(json.dumps(cfg))
    for name in [n for n in tensors if n.endswith(".weight") and (".attention." in n or ".mlp." in n)]:
        w = tensors[name].float()
        s = w.abs().amax(1) / 127
        tensors[name] = (w / s[:, None]).round().clamp(-128, 127).to(torch.int8)
        tensors[name.replace(".weight", ".weights_scaling_factor")] = s
    tensors["transformer.layers.1.mlp.fc.weights_scaling_factor"][3] = float("nan")
    save_file(tensors, ck / "rank0.safetensors")
    for check in (load_checkpoint, validate_checkpoint):  # the builds' headers-only check reads the scales too
        with pytest.raises(UserError, match=r"non-finite or non-positive scales in "
                                            r"transformer.layers.1.mlp.fc.weights_scaling_factor"):
            check(ck)
