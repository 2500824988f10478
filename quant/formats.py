"""What a TRT-LLM LLaMa checkpoint must contain, per quantization format — as data.

One table (``_LINEAR_TENSORS``) says, for each ``quant_algo``, which tensors a quantized linear carries and
their shapes/dtypes (facts from TensorRT-LLM's loaders and ModelOpt 0.47's exporter, see
``../shared/reference/trtllm-checkpoint.md``). The validator and the runtime both read it, so a new format is
one row here plus one runtime handler.
"""
from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from quant.errors import UserError
from quant.names import LINEARS

QUANT_ALGOS = (None, "W8A16", "W8A8_SQ_PER_CHANNEL", "W4A16_AWQ", "W4A8_AWQ", "FP8")
INT4_ALGOS = ("W4A16_AWQ", "W4A8_AWQ")  # group-wise INT4 weights, two per byte along out
KV_CACHE_ALGOS = (None, "INT8", "FP8")

F32, F16, BF16, I8 = torch.float32, torch.float16, torch.bfloat16, torch.int8
FP8 = torch.float8_e4m3fn


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtypes: tuple[torch.dtype, ...]
    optional: bool = False
    padded_rows: bool = False  # lm_head: TRT-LLM pads the vocab up to a multiple of the TP size

    def shape_ok(self, shape: tuple[int, ...]) -> bool:
        if self.padded_rows:
            return len(shape) == 2 and shape[0] >= self.shape[0] and shape[1] == self.shape[1]
        return shape == self.shape

    def describe_shape(self) -> str:
        return f"[≥{self.shape[0]}, {self.shape[1]}]" if self.padded_rows else str(list(self.shape))


def head_size(config: dict) -> int:
    return config.get("head_size") or config["hidden_size"] // config["num_attention_heads"]


def linear_shapes(config: dict) -> dict[str, tuple[int, int]]:
    hidden, inter, hd = config["hidden_size"], config["intermediate_size"], head_size(config)
    qkv_out = (config["num_attention_heads"] + 2 * config["num_key_value_heads"]) * hd
    return {
        "attention.qkv": (qkv_out, hidden),
        "attention.dense": (hidden, config["num_attention_heads"] * hd),
        "mlp.fc": (inter, hidden),
        "mlp.gate": (inter, hidden),
        "mlp.proj": (hidden, inter),
    }


def _linear_tensors(algo: str | None, out: int, inp: int, group_size: int, act: torch.dtype,
                    prequant: bool = True) -> dict[str, TensorSpec]:
    """``prequant``: the config's ``pre_quant_scale`` (ModelOpt writes true for AWQ; false for GPTQ, whose linears
    have none)."""
    if algo is None:
        return {"weight": TensorSpec((out, inp), (act,))}
    if algo == "W8A16":
        return {"weight": TensorSpec((out, inp), (I8,)), "weights_scaling_factor": TensorSpec((out,), (F32, act))}
    if algo == "W8A8_SQ_PER_CHANNEL":
        return {
            "weight": TensorSpec((out, inp), (I8,)),
            "weights_scaling_factor": TensorSpec((out,), (F32, act)),
            "activation_scaling_factor": TensorSpec((1,), (F32, act)),
            "prequant_scaling_factor": TensorSpec((inp,), (act, F32)),
        }
    if algo in INT4_ALGOS:
        if inp % group_size:
            raise UserError(f"group_size {group_size} does not divide in-features {inp}")
        spec = {
            "weight": TensorSpec((out // 2, inp), (I8,)),
            "weights_scaling_factor": TensorSpec((out, inp // group_size), (F32, act)),
            "prequant_scaling_factor": TensorSpec((inp,), (act, F32), optional=not prequant),
        }
        if algo == "W4A8_AWQ":  # INT4 → FP8 weights (÷ weights_scaling_factor_2), FP8 activations
            spec["weights_scaling_factor_2"] = TensorSpec((1,), (F32,))
            spec["activation_scaling_factor"] = TensorSpec((1,), (F32,))
        return spec
    if algo == "FP8":
        return {
            "weight": TensorSpec((out, inp), (FP8,)),
            "weights_scaling_factor": TensorSpec((1,), (F32,)),
            "activation_scaling_factor": TensorSpec((1,), (F32,)),
        }
    raise UserError(f"quant_algo {algo!r} is not supported (supported: {', '.join(a for a in QUANT_ALGOS if a)})")


def _linear_names(config: dict) -> list[str]:
    return [f"layers.{i}.{lin}" for i in range(config["num_hidden_layers"]) for lin in LINEARS]


def _mixed_layers(config: dict, folder: Path) -> dict[str, dict]:
    """MIXED_PRECISION: each linear's entry of quant_cfg.json ``quantized_layers`` ({} = unquantized).

    Keys are matched with fnmatch, as TRT-LLM's LayerQuantConfig does, so globs work too.
    """
    path = Path(folder) / "quant_cfg.json"
    try:
        layers = json.loads(path.read_text())["quantized_layers"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"checkpoint {folder}: MIXED_PRECISION needs a readable quant_cfg.json with "
                        f"'quantized_layers' ({type(exc).__name__})") from None
    if not isinstance(layers, dict) or not all(isinstance(v, dict) for v in layers.values()):
        raise UserError(f"checkpoint {folder}: quant_cfg.json quantized_layers must map layer names to objects")
    out = {}
    for n in _linear_names(config):
        full = f"transformer.{n}"
        out[n] = layers.get(full) or next((v for k, v in layers.items() if fnmatch.fnmatch(full, k)), {})
    return out


def layer_algos(config: dict, folder: Path) -> dict[str, str | None]:
    """``"layers.{i}.{linear}"`` → quant_algo for every linear; MIXED_PRECISION reads quant_cfg.json."""
    quant = config.get("quantization") or {}
    algo = quant.get("quant_algo")
    if algo != "MIXED_PRECISION":
        excluded = quant.get("exclude_modules") or []
        return {n: None if _excluded(n, excluded) else algo for n in _linear_names(config)}
    return {n: entry.get("quant_algo") for n, entry in _mixed_layers(config, folder).items()}


def layer_group_sizes(config: dict, folder: Path) -> dict[str, int]:
    """``"layers.{i}.{linear}"`` → AWQ group size: config's ``group_size`` (default 128), or for MIXED_PRECISION the
    layer's own ``group_size`` in quant_cfg.json (ModelOpt writes it per layer and drops it from config.json)."""
    quant = config.get("quantization") or {}
    default = int(quant.get("group_size") or 128)
    if quant.get("quant_algo") != "MIXED_PRECISION":
        return {n: default for n in _linear_names(config)}
    out = {}
    for n, entry in _mixed_layers(config, folder).items():
        size = entry.get("group_size")
        out[n] = size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else default
    return out


def _excluded(name: str, patterns: list[str]) -> bool:
    full = f"transformer.{name}"
    return any(fnmatch.fnmatch(full, p) or fnmatch.fnmatch(name, p) for p in patterns)


def expected_tensors(config: dict, algos: dict[str, str | None],
                     group_sizes: dict[str, int] | None = None) -> dict[str, TensorSpec]:
    """``group_sizes`` (from :func:`layer_group_sizes`) overrides config's group_size per linear when given."""
    act = {"float16": F16, "bfloat16": BF16, "float32": F32}[config["dtype"]]
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    group_size = int((config.get("quantization") or {}).get("group_size") or 128)
    prequant = (config.get("quantization") or {}).get("pre_quant_scale", True) is not False
    kv_algo = (config.get("quantization") or {}).get("kv_cache_quant_algo")
    if kv_algo not in KV_CACHE_ALGOS:
        raise UserError(f"kv_cache_quant_algo {kv_algo!r} is not supported (supported: INT8, FP8, null)")
    shapes = linear_shapes(config)
    spec: dict[str, TensorSpec] = {
        "transformer.vocab_embedding.weight": TensorSpec((vocab, hidden), (act,)),
        "transformer.ln_f.weight": TensorSpec((hidden,), (act,)),
        # Tied models may omit lm_head (share_embedding_table); ModelOpt writes a copy.
        "lm_head.weight": TensorSpec((vocab, hidden), (act,), optional=bool(config.get("share_embedding_table")),
                                     padded_rows=True),
    }
    for i in range(config["num_hidden_layers"]):
        prefix = f"transformer.layers.{i}"
        spec[f"{prefix}.input_layernorm.weight"] = TensorSpec((hidden,), (act,))
        spec[f"{prefix}.post_layernorm.weight"] = TensorSpec((hidden,), (act,))
        if kv_algo is not None:
            # TRT-LLM reads one K/V scale; ModelOpt 0.47 also writes the separate K and V scales it took the
            # max of (kv = max(k, v); FP8 ones clamped to ≥ 1). Accept them, the runtime ignores them.
            spec[f"{prefix}.attention.kv_cache_scaling_factor"] = TensorSpec((1,), (F32,))
            spec[f"{prefix}.attention.k_cache_scaling_factor"] = TensorSpec((1,), (F32,), optional=True)
            spec[f"{prefix}.attention.v_cache_scaling_factor"] = TensorSpec((1,), (F32,), optional=True)
        for lin, (out, inp) in shapes.items():
            layer_group = (group_sizes or {}).get(f"layers.{i}.{lin}", group_size)
            for suffix, tspec in _linear_tensors(algos[f"layers.{i}.{lin}"], out, inp, layer_group, act,
                                                 prequant).items():
                spec[f"{prefix}.{lin}.{suffix}"] = tspec
    return spec
