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
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, Field, StrictFloat, StrictInt, StrictStr, ValidationError, model_validator

from quant import formats
from quant.errors import ArgumentParser, UserError, cli_entry
from quant.paths import cache_root

MAX_LAYERS = 1024  # the validator lists every expected tensor per layer: 10**8 layers took minutes and 24 GB
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


# config.json, declared: each field's type and bounds, and in its description what the user is told it must be.
PositiveInt = Annotated[StrictInt, Field(gt=0, description="a positive integer")]
Number = Annotated[StrictInt | StrictFloat, Field(description="a number")]


class _Quantization(BaseModel, extra="allow"):
    quant_algo: StrictStr | None = Field(None, description="a string or null")
    kv_cache_quant_algo: StrictStr | None = Field(None, description="a string or null")
    group_size: PositiveInt | None = Field(None, description="a positive integer")
    exclude_modules: list[StrictStr] | None = Field(None, description="a list of names")


class _Mapping(BaseModel, extra="allow"):
    world_size: StrictInt = 1


class CheckpointConfig(BaseModel, extra="allow"):
    architecture: Literal["LlamaForCausalLM"]
    num_hidden_layers: Annotated[PositiveInt, Field(le=MAX_LAYERS)]
    num_attention_heads: PositiveInt
    num_key_value_heads: PositiveInt
    hidden_size: PositiveInt
    intermediate_size: PositiveInt
    vocab_size: PositiveInt
    dtype: Literal[tuple(_DTYPES)]
    rotary_base: Number = 10000
    norm_epsilon: Number = 1e-6
    rotary_scaling: dict | None = Field(None, description="an object or null")
    head_size: PositiveInt = 1
    mapping: _Mapping | None = Field(None, description="an object")
    quantization: _Quantization | None = Field(None, description="an object")

    @model_validator(mode="after")
    def _consistent(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise UserError("num_attention_heads is not a multiple of num_key_value_heads")
        if self.mapping is not None and self.mapping.world_size != 1:
            raise UserError(f"world_size {self.mapping.world_size} — only single-rank checkpoints are supported")
        return self


def _config_error(error: dict, config: dict) -> str:
    """One pydantic error of config.json as the one line a user reads."""
    name = error["loc"][0]
    nested = name == "quantization" and len(error["loc"]) > 1
    loc = [name, error["loc"][1]] if nested else [name]
    got = config
    for part in loc:
        got = got.get(part) if isinstance(got, dict) else None
    if name == "architecture":
        return f"architecture is {got!r}; only 'LlamaForCausalLM' is supported"
    if name == "num_hidden_layers" and error["type"] == "less_than_equal":
        return f"config.json num_hidden_layers {got} is implausible (more than {MAX_LAYERS})"
    if name == "dtype":
        return f"config.json dtype must be one of {sorted(_DTYPES)}, got {got!r}"
    field = (_Quantization if nested else CheckpointConfig).model_fields[loc[-1]]
    what = field.description or next(m.description for m in field.metadata if getattr(m, "description", None))
    where = f"quantization.{loc[1]}" if nested else f"config.json {name}"
    shown = "" if name in ("rotary_scaling", "quantization") and not nested else f", got {got!r}"
    return f"{where} must be {what}{shown}"


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
    try:
        CheckpointConfig.model_validate(config)
    except ValidationError as exc:
        raise UserError(f"checkpoint {folder}: {_config_error(exc.errors(include_url=False)[0], config)}") from None
    except UserError as exc:
        raise UserError(f"checkpoint {folder}: {exc}") from None
    return config


_LAYER = re.compile(r"transformer\.layers\.(\d+)\.")


def _rebuild_hint(folder: Path) -> str:
    """A damaged entry of the suite's cache is rebuilt once deleted: say which folder."""
    inside = Path(folder).resolve().is_relative_to(cache_root().resolve())
    return f"; delete {folder} to rebuild it" if inside else ""


class _Header:
    """A tensor's shape and dtype from the file's header, its data left on disk (an empty slice gives the dtype)."""

    def __init__(self, fh, name: str):
        view = fh.get_slice(name)
        self.shape = torch.Size(view.get_shape())
        self.dtype = view[0:0].dtype if self.shape else fh.get_tensor(name).dtype


def validate_checkpoint(folder: Path) -> Checkpoint:
    """:func:`load_checkpoint`'s checks without holding the weights: shapes and dtypes from the file's header, only
    the (tiny) scales read. A build validates what it wrote so, not with a second copy of an 8B model in memory.
    Returns the checkpoint with headers in place of its weights (config, layer formats, KV cache format)."""
    return load_checkpoint(folder, _headers_only=True)


def load_checkpoint(folder: Path, *, device: str | torch.device = "cpu", _headers_only: bool = False) -> Checkpoint:
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
            if _headers_only:
                tensors = {name: aligned(fh.get_tensor(name)) if name.endswith("scaling_factor") else
                           _Header(fh, name) for name in fh.keys()}
            else:
                tensors = {name: aligned(fh.get_tensor(name)) for name in fh.keys()}
    except torch.cuda.OutOfMemoryError:
        raise UserError(f"out of GPU memory loading checkpoint {folder} onto {device} "
                        f"({weights.stat().st_size / 2**30:.1f} GiB as stored)") from None
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
