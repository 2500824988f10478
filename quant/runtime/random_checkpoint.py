"""Random-weight TRT-LLM LLaMa checkpoints in every format, without ModelOpt (for benchmarks and kernel tests).

TensorRT-LLM benchmarks engines built from random weights for the same reason: speed depends on shapes and
formats, not on the values. Weights are drawn as float32 N(0, 1/in) on the target device and quantized into the
exact layouts ModelOpt 0.47 exports (the formulas of ``tests/test_kernels.py``): int8 per-channel
s = amax_row/127; int4 AWQ per-group s = amax/7, q ∈ [-8, 7], packed in pairs along out (even row in the low
nibble), a pre-quant scale exp(0.3·N(0, 1)) in fp16; FP8 per-tensor s = amax/448. Static activation and KV
scales are fixed stand-ins for calibration (|x| ≈ 6 maps to the format's range), so a few outliers clamp, as
after real calibration. fc and gate (and q, k, v) share their input-side scales, as ModelOpt exports them.

``random_checkpoint`` builds the :class:`~quant.checkpoint.Checkpoint` in memory (the runtime takes it directly,
so a 7B model never touches disk); ``write_checkpoint`` saves it as config.json + rank0.safetensors, which
``quant.checkpoint.load_checkpoint`` validates like any exported folder.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from quant.checkpoint import Checkpoint
from quant.errors import UserError
from quant.formats import INT4_ALGOS, layer_algos, linear_shapes
from quant.names import LINEARS
from quant.runtime.schemes.base import pack_int4_rows

SHAPES = {
    # LLaMa-2-7B: 6.74 B parameters
    "llama2-7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                      intermediate_size=11008, vocab_size=32000),
    "llama3-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      intermediate_size=14336, vocab_size=128256),
    # the 7B layer shapes, 4 layers: per-layer speed in a quick run
    "7b-4l": dict(hidden_size=4096, num_hidden_layers=4, num_attention_heads=32, num_key_value_heads=32,
                  intermediate_size=11008, vocab_size=32000),
    # small and GQA, for correctness tests
    "tiny": dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=512, vocab_size=1024),
}
RECIPES = {
    # name: (quant_algo, kv_cache_quant_algo)
    "fp16": (None, None),
    "int8_wo": ("W8A16", None),
    "smoothquant": ("W8A8_SQ_PER_CHANNEL", None),
    "int4_awq": ("W4A16_AWQ", None),
    "w4a8_awq": ("W4A8_AWQ", None),
    "fp8": ("FP8", None),
    "fp16_kv_int8": (None, "INT8"),
    "smoothquant_kv_int8": ("W8A8_SQ_PER_CHANNEL", "INT8"),
    "fp8_kv_fp8": ("FP8", "FP8"),
}
ACT_AMAX = 6.0  # stand-in calibration: activations and K/V of |x| ≈ 6 map to the format's largest value
FORMAT_MAX = {"INT8": 127.0, "FP8": 448.0}


def random_config(shape: str | dict, quant_algo: str | None = None, kv_algo: str | None = None,
                  group_size: int = 128) -> dict:
    if isinstance(shape, str) and shape not in SHAPES:
        raise UserError(f"unknown shape {shape!r} (choose from {', '.join(SHAPES)})")
    dims = SHAPES[shape] if isinstance(shape, str) else dict(shape)
    quant = {"quant_algo": quant_algo, "kv_cache_quant_algo": kv_algo}
    if quant_algo in INT4_ALGOS:
        quant.update(group_size=group_size, has_zero_point=False, pre_quant_scale=True)
    return {
        "architecture": "LlamaForCausalLM", "dtype": "float16", **dims,
        "head_size": dims["hidden_size"] // dims["num_attention_heads"], "hidden_act": "silu",
        "max_position_embeddings": 4096, "position_embedding_type": "rope_gpt_neox", "rotary_base": 10000.0,
        "rotary_scaling": None, "norm_epsilon": 1e-5, "share_embedding_table": False,
        "mapping": {"world_size": 1, "tp_size": 1, "pp_size": 1}, "quantization": quant,
    }


def _quantize(algo: str | None, w: torch.Tensor, pre: torch.Tensor | None, group: int,
              fp8_scale: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """One linear's tensors in ``algo``'s layout from a float32 weight [out, in]; ``pre``: its pre-quant scale;
    ``fp8_scale``: an FP8 weight scale to share (fc and gate; W4A8: the FP8 scale of q·s)."""
    if algo is None:
        return {"weight": w.half()}
    if algo in ("W8A16", "W8A8_SQ_PER_CHANNEL"):
        s = w.abs().amax(dim=1) / 127.0
        q = torch.round(w / s[:, None]).clamp(-128, 127).to(torch.int8)
        t = {"weight": q, "weights_scaling_factor": s}
        if algo == "W8A8_SQ_PER_CHANNEL":
            t["prequant_scaling_factor"] = pre
            t["activation_scaling_factor"] = torch.tensor([ACT_AMAX / 127.0], device=w.device)
        return t
    if algo in INT4_ALGOS:
        out, inp = w.shape
        wg = w.reshape(out, inp // group, group)
        s = wg.abs().amax(dim=-1) / 7.0
        q = torch.round(wg / s[..., None]).clamp(-8, 7).reshape(out, inp).to(torch.int8)
        t = {"weight": pack_int4_rows(q), "weights_scaling_factor": s, "prequant_scaling_factor": pre}
        if algo == "W4A8_AWQ":  # ModelOpt's second quantizer: per-tensor FP8 of q·s (amax/448)
            t["weights_scaling_factor_2"] = fp8_scale if fp8_scale is not None else (w.abs().amax() / 448.0).reshape(1)
            t["activation_scaling_factor"] = torch.tensor([ACT_AMAX / 448.0], device=w.device)
        return t
    if algo == "FP8":
        s = fp8_scale if fp8_scale is not None else (w.abs().amax() / 448.0).reshape(1)
        return {"weight": (w / s).clamp(-448, 448).to(torch.float8_e4m3fn), "weights_scaling_factor": s,
                "activation_scaling_factor": torch.tensor([ACT_AMAX / 448.0], device=w.device)}
    raise UserError(f"no random layout for quant_algo {algo!r}")


@torch.no_grad()
def random_checkpoint(config: dict, *, device: str | torch.device = "cpu", seed: int = 0,
                      path: str | Path = "<random>") -> Checkpoint:
    """All tensors of ``config`` (see :func:`random_config`) drawn and quantized on ``device``."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    quant = config.get("quantization") or {}
    algo, kv_algo = quant.get("quant_algo"), quant.get("kv_cache_quant_algo")
    group = int(quant.get("group_size") or 128)
    hidden, vocab = config["hidden_size"], config["vocab_size"]

    def randn(*shape: int, std: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device) * std

    t: dict[str, torch.Tensor] = {
        "transformer.vocab_embedding.weight": randn(vocab, hidden).half(),
        "transformer.ln_f.weight": (1 + randn(hidden, std=0.1)).half(),
        "lm_head.weight": randn(vocab, hidden, std=hidden ** -0.5).half(),
    }
    shapes = linear_shapes(config)
    for i in range(config["num_hidden_layers"]):
        p = f"transformer.layers.{i}."
        t[p + "input_layernorm.weight"] = (1 + randn(hidden, std=0.1)).half()
        t[p + "post_layernorm.weight"] = (1 + randn(hidden, std=0.1)).half()
        pre_in = torch.exp(randn(hidden, std=0.3)).half()  # shared by qkv, and by fc and gate
        pre_fg = torch.exp(randn(hidden, std=0.3)).half()
        for lin in LINEARS:
            out, inp = shapes[lin]
            pre = {"attention.qkv": pre_in, "mlp.fc": pre_fg, "mlp.gate": pre_fg}.get(lin)
            if pre is None:
                pre = torch.exp(randn(inp, std=0.3)).half()
            w = randn(out, inp, std=inp ** -0.5)
            # fc and gate share one FP8 weight scale (W4A8: its second-level one), as ModelOpt exports them (gate's
            # own amax is ≈ fc's)
            key = {"FP8": "weights_scaling_factor", "W4A8_AWQ": "weights_scaling_factor_2"}.get(algo)
            shared = t[p + "mlp.fc." + key] if key and lin == "mlp.gate" else None
            for k, v in _quantize(algo, w, pre, group, shared).items():
                t[p + lin + "." + k] = v
            del w
        if kv_algo is not None:
            t[p + "attention.kv_cache_scaling_factor"] = torch.tensor([ACT_AMAX / FORMAT_MAX[kv_algo]], device=device)
    path = Path(path)
    return Checkpoint(path=path, config=config, tensors=t, layer_algos=layer_algos(config, path))


def write_checkpoint(ckpt: Checkpoint, folder: str | Path) -> Path:
    """Save as a TRT-LLM checkpoint folder (config.json + rank0.safetensors)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(ckpt.config, indent=2))
    save_file({k: v.cpu().clone() for k, v in ckpt.tensors.items()}, str(folder / "rank0.safetensors"))
    return folder
