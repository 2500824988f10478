"""Read and validate a TensorRT-LLM LLaMa checkpoint (config.json + rank0.safetensors).

The checkpoint is the suite's contract: ModelOpt writes it, ``trtllm-build`` and our PyTorch runtime read it.
:func:`load_checkpoint` checks every tensor's name, shape and dtype against what config.json implies (for each
layer's quantization format, see :mod:`quant.formats`) and reports *all* problems in one line, so a broken
folder is never half-executed. Tensors are read with safetensors only (no pickle).
"""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from quant import formats
from quant.errors import ArgumentParser, UserError, cli_entry
from quant.paths import cache_root

_INT_FIELDS = (
    "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "hidden_size",
    "intermediate_size", "vocab_size",
)
MAX_LAYERS = 1024
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class Checkpoint:
    path: Path
    config: dict
    tensors: dict[str, torch.Tensor]
    layer_algos: dict[str, str | None] = field(default_factory=dict)  # "layers.{i}.{linear}" → quant_algo

    @property
    def num_layers(self) -> int:
        return self.config["num_hidden_layers"]

    @property
    def head_size(self) -> int:
        return formats.head_size(self.config)

    @property
    def kv_cache_algo(self) -> str | None:
        return (self.config.get("quantization") or {}).get("kv_cache_quant_algo")

    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def aligned(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU tensor in 64-byte-aligned memory of its own.

    safetensors hands out tensors at their byte offset in the file, which the format aligns to 8 bytes only;
    PyTorch's AVX-512 ``_weight_int8pack_mm`` segfaults on such a weight (seen: a tiny int8_wo checkpoint whose
    int8 weights sat at offset 8 mod 64 killed the search with SIGSEGV). A copy from PyTorch's allocator is
    always aligned; aligned tensors are kept as they are (no copy).
    """
    if tensor.device.type == "cpu" and tensor.data_ptr() % 64:
        return tensor.clone()
    return tensor


def read_config(folder: Path) -> dict:
    """Parse and type-check config.json; raise UserError naming the first bad field."""
    folder = Path(folder)
    path = folder / "config.json"
    if not folder.is_dir():
        raise UserError(f"checkpoint {folder}: no such folder")
    if not path.is_file():
        raise UserError(f"checkpoint {folder}: config.json is missing")
    try:
        config = json.loads(path.read_text())
    except ValueError as exc:
        raise UserError(f"checkpoint {folder}: config.json is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise UserError(f"checkpoint {folder}: config.json must hold an object")
    arch = config.get("architecture")
    if arch != "LlamaForCausalLM":
        raise UserError(f"checkpoint {folder}: architecture is {arch!r}; only 'LlamaForCausalLM' is supported")
    for key in _INT_FIELDS:
        value = config.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise UserError(f"checkpoint {folder}: config.json {key} must be a positive integer, got {value!r}")
    # The validator lists every expected tensor per layer: 10**8 layers took minutes and 24 GB before any error.
    if config["num_hidden_layers"] > MAX_LAYERS:
        raise UserError(f"checkpoint {folder}: config.json num_hidden_layers {config['num_hidden_layers']} is "
                        f"implausible (more than {MAX_LAYERS})")
    if config.get("dtype") not in _DTYPES:
        raise UserError(f"checkpoint {folder}: config.json dtype must be one of {sorted(_DTYPES)}, got {config.get('dtype')!r}")
    if config["num_attention_heads"] % config["num_key_value_heads"]:
        raise UserError(f"checkpoint {folder}: num_attention_heads is not a multiple of num_key_value_heads")
    for key in ("rotary_base", "norm_epsilon"):
        if key in config and not isinstance(config[key], (int, float)):
            raise UserError(f"checkpoint {folder}: config.json {key} must be a number, got {config[key]!r}")
    scaling = config.get("rotary_scaling")
    if scaling is not None and not isinstance(scaling, dict):
        raise UserError(f"checkpoint {folder}: config.json rotary_scaling must be an object or null")
    if "head_size" in config and (not isinstance(config["head_size"], int) or config["head_size"] <= 0):
        raise UserError(f"checkpoint {folder}: config.json head_size must be a positive integer, got {config['head_size']!r}")
    mapping = config.get("mapping") or {}
    if not isinstance(mapping, dict):
        raise UserError(f"checkpoint {folder}: config.json mapping must be an object, got {mapping!r}")
    if mapping.get("world_size", 1) != 1:
        raise UserError(f"checkpoint {folder}: world_size {mapping.get('world_size')} — only single-rank checkpoints are supported")
    quant = config.get("quantization") or {}
    if not isinstance(quant, dict):
        raise UserError(f"checkpoint {folder}: config.json quantization must be an object")
    for key in ("quant_algo", "kv_cache_quant_algo"):
        if quant.get(key) is not None and not isinstance(quant[key], str):
            raise UserError(f"checkpoint {folder}: quantization.{key} must be a string or null, got {quant[key]!r}")
    group = quant.get("group_size")
    if group is not None and (not isinstance(group, int) or isinstance(group, bool) or group <= 0):
        raise UserError(f"checkpoint {folder}: quantization.group_size must be a positive integer, got {group!r}")
    excl = quant.get("exclude_modules")
    if excl is not None and (not isinstance(excl, list) or not all(isinstance(e, str) for e in excl)):
        raise UserError(f"checkpoint {folder}: quantization.exclude_modules must be a list of names, got {excl!r}")
    return config


_LAYER = re.compile(r"transformer\.layers\.(\d+)\.")


def _rebuild_hint(folder: Path) -> str:
    """A damaged entry of the suite's cache is rebuilt once deleted: say which folder."""
    inside = Path(folder).resolve().is_relative_to(cache_root().resolve())
    return f"; delete {folder} to rebuild it" if inside else ""


def load_checkpoint(folder: Path, *, device: str | torch.device = "cpu") -> Checkpoint:
    """Load and validate; UserError lists every missing/unexpected tensor and every shape/dtype mismatch."""
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    config = read_config(folder)
    layer_algos = formats.layer_algos(config, folder)
    weights = folder / "rank0.safetensors"
    if not weights.is_file():
        raise UserError(f"checkpoint {folder}: rank0.safetensors is missing")
    try:
        with safe_open(str(weights), framework="pt", device=str(device)) as fh:
            tensors = {name: aligned(fh.get_tensor(name)) for name in fh.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise UserError(f"checkpoint {folder}: rank0.safetensors is unreadable ({exc})") from None

    # Layers whose input norm is there: a stray extra tensor of a layer 9 is an unexpected tensor, not a layer.
    layers_held = {int(m.group(1)) for n in tensors if (m := _LAYER.match(n)) and n.endswith(".input_layernorm.weight")}
    if layers_held == set(range(len(layers_held))) and layers_held and len(layers_held) != config.get("num_hidden_layers"):
        # Otherwise reported as dozens of missing or unexpected tensors, which reads like damaged weights.
        raise UserError(f"checkpoint {folder}: config.json says num_hidden_layers {config.get('num_hidden_layers')} "
                        f"but rank0.safetensors holds {max(layers_held) + 1} layers (a config.json problem)"
                        + _rebuild_hint(folder))
    expected = formats.expected_tensors(config, layer_algos, formats.layer_group_sizes(config, folder))
    problems: list[str] = []
    missing = [n for n, spec in expected.items() if n not in tensors and not spec.optional]
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}")
    unexpected = [n for n in tensors if n not in expected]
    if unexpected:
        problems.append(f"unexpected tensor(s): {', '.join(unexpected[:5])}{' …' if len(unexpected) > 5 else ''}")
    for name, spec in expected.items():
        tensor = tensors.get(name)
        if tensor is None:
            continue
        if not spec.shape_ok(tuple(tensor.shape)):
            problems.append(f"{name} has shape {list(tensor.shape)}, expected {spec.describe_shape()}")
        if tensor.dtype not in spec.dtypes:
            problems.append(f"{name} has dtype {str(tensor.dtype).removeprefix('torch.')}, expected "
                            f"{'/'.join(str(d).removeprefix('torch.') for d in spec.dtypes)}")
    # Scales are tiny, so checking them all is free; a NaN or non-positive scale silently poisons every output.
    bad_scales = [n for n, t in tensors.items() if n.endswith("scaling_factor") and n in expected
                  and not bool((torch.isfinite(t.float()) & (t.float() > 0)).all())]
    if bad_scales:
        problems.append(f"non-finite or non-positive scales in {', '.join(bad_scales[:3])}"
                        f"{' …' if len(bad_scales) > 3 else ''}")
    if problems:
        raise UserError(f"checkpoint {folder} is invalid: " + "; ".join(problems[:6])
                        + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "") + _rebuild_hint(folder))
    return Checkpoint(path=folder, config=config, tensors=tensors, layer_algos=layer_algos)


def summary(ckpt: Checkpoint) -> str:
    """A few lines a user reads to know what a checkpoint holds."""
    algos = Counter(a or "fp16" for a in ckpt.layer_algos.values())
    cfg = ckpt.config
    return "\n".join([
        f"checkpoint   {ckpt.path}",
        f"model        {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, heads {cfg['num_attention_heads']}"
        f"/{cfg['num_key_value_heads']} kv, vocab {cfg['vocab_size']}, dtype {cfg['dtype']}",
        f"rope         base {cfg.get('rotary_base', 'MISSING (TRT-LLM would use 10000)')}, scaling {cfg.get('rotary_scaling')}",
        "linears      " + ", ".join(f"{n}× {a}" for a, n in sorted(algos.items())),
        f"kv cache     {ckpt.kv_cache_algo or 'fp16'}",
        f"tensors      {len(ckpt.tensors)}, {ckpt.weight_bytes() / 2**20:.1f} MiB",
    ])


def main(argv: list[str] | None = None) -> int:
    @cli_entry
    def run() -> int:
        parser = ArgumentParser(prog="python -m quant.checkpoint",
                                description="Validate a TRT-LLM LLaMa checkpoint folder and summarize it.")
        parser.add_argument("folder", type=Path)
        args = parser.parse_args(argv)
        print(summary(load_checkpoint(args.folder)))
        print("valid")
        return 0

    return run()


if __name__ == "__main__":
    raise SystemExit(main())
