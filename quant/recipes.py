"""Recipes as data: a small frozen object, YAML/JSON round-trip, a stable hash, and precise validation.

A recipe says *what* precision each part of the model gets; :mod:`quant.apply` turns it into a ModelOpt config.
Fields that do not apply to a kind must stay at their defaults, so two spellings of the same recipe cannot
hash differently. The hash covers only the canonical field values.

Layer patterns in ``exclude`` use the checkpoint's (TRT-LLM) names, the contract every runtime reads:
``lm_head``, ``layers.0.*`` (a whole layer), ``*.mlp.proj`` (every down-projection), ``layers.29.attention.qkv``.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Annotated, Literal

from pydantic import ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, field_validator
from pydantic.dataclasses import dataclass

from quant.atomic import atomic_write_text
from quant.errors import UserError, one_line_errors
from quant.hardware import FP8_GEMM_ALGOS, fp8_refusal
from quant.names import LINEARS

KINDS = ("fp16", "int8_wo", "smoothquant", "int4_awq", "int4_gptq", "w4a8_awq", "fp8")
KV_CACHE = ("none", "int8", "fp8")
GROUP_SIZES = (32, 64, 128)
# What each kind writes as quant_algo. GPTQ's INT4 weights are stored in the AWQ format (ModelOpt exports them so;
# the same kernels run them), without pre-quant scales.
QUANT_ALGO = {"fp16": None, "int8_wo": "W8A16", "smoothquant": "W8A8_SQ_PER_CHANNEL", "int4_awq": "W4A16_AWQ",
              "int4_gptq": "W4A16_AWQ", "w4a8_awq": "W4A8_AWQ", "fp8": "FP8"}
KV_ALGO = {"none": None, "int8": "INT8", "fp8": "FP8"}
GROUPED = ("int4_awq", "int4_gptq")  # kinds whose group_size is a choice
AWQ_KINDS = ("int4_awq", "w4a8_awq")  # kinds searched by AWQ (awq_alpha_step, awq_clip)
# W4A8's block along in-features is fixed: ModelOpt's W4A8_AWQ_BETA_CFG and TensorRT-LLM's W4A8 kernels use 128.
W4A8_GROUP = 128

_DEFAULTS = {"alpha": None, "group_size": None, "awq_alpha_step": None, "awq_clip": False}
KIND_DEFAULTS = {
    "smoothquant": {"alpha": 0.8},  # ModelOpt's 1.0 measured worse on the default model (reference notes)
    "int4_awq": {"group_size": 128, "awq_alpha_step": 0.1},
    "int4_gptq": {"group_size": 128},
    "w4a8_awq": {"awq_alpha_step": 0.1},
}


Number = StrictInt | StrictFloat  # a bool is neither
Pattern = Annotated[StrictStr, Field(min_length=1)]


@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class Recipe:
    """Declared fields with their types and bounds (checked by pydantic, reported as one-line UserErrors); the
    rules between fields and the per-kind defaults are in ``__post_init__``."""

    kind: Literal[KINDS] = "fp16"
    alpha: Annotated[Number, Field(ge=0, le=1)] | None = None  # smoothquant migration strength
    group_size: Literal[GROUP_SIZES] | None = None  # int4_awq/int4_gptq block size along in-features
    awq_alpha_step: Annotated[Number, Field(gt=0, le=1)] | None = None  # int4_awq/w4a8_awq: AWQ-lite search step
    awq_clip: StrictBool = False  # int4_awq/w4a8_awq: also search per-group clipping (awq_full)
    kv_cache: Literal[KV_CACHE] = "none"
    exclude: tuple[Pattern, ...] = ()

    @field_validator("exclude", mode="before")
    @classmethod
    def _one_pattern_or_none(cls, value):
        return () if value is None else (value,) if isinstance(value, str) else value

    _one_line = one_line_errors(lambda cls, errors: _recipe_error(errors))

    def __post_init__(self) -> None:
        for key, value in {**_DEFAULTS, **KIND_DEFAULTS.get(self.kind, {})}.items():
            if getattr(self, key) is None and value is not None:
                object.__setattr__(self, key, value)
        if self.kind != "smoothquant" and self.alpha is not None:
            raise UserError(f"alpha applies to smoothquant only, not {self.kind}")
        if self.kind not in GROUPED and self.group_size is not None:
            why = f" (its block is fixed at {W4A8_GROUP})" if self.kind == "w4a8_awq" else ""
            raise UserError(f"group_size applies to {'/'.join(GROUPED)} only, not {self.kind}{why}")
        if self.kind not in AWQ_KINDS and (self.awq_alpha_step is not None or self.awq_clip):
            raise UserError(f"awq_alpha_step/awq_clip apply to {'/'.join(AWQ_KINDS)} only, not {self.kind}")
        if self.alpha is not None:
            object.__setattr__(self, "alpha", round(float(self.alpha), 4))
        object.__setattr__(self, "exclude", tuple(sorted(set(self.exclude))))
        if self.kind == "fp16" and self.exclude:
            raise UserError("exclude has no effect on fp16: nothing is quantized")

    # -- identity ----------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d["exclude"] = list(self.exclude)
        return d

    @property
    def hash(self) -> str:
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:12]

    @property
    def label(self) -> str:
        parts = [self.kind]
        if self.kind == "smoothquant":
            parts.append(f"a{self.alpha:g}")
        if self.kind in GROUPED:
            parts.append(f"g{self.group_size}")
        if self.awq_clip:
            parts.append("clip")
        if self.kv_cache != "none":
            parts.append(f"kv{self.kv_cache}")
        if self.exclude:
            parts.append(f"excl{len(self.exclude)}")
        return "-".join(parts)

    @property
    def needs_calibration(self) -> bool:
        return self.kind != "fp16" or self.kv_cache != "none"

    @property
    def quant_algo(self) -> str | None:
        return QUANT_ALGO[self.kind]

    @property
    def kv_algo(self) -> str | None:
        return KV_ALGO[self.kv_cache]

    @property
    def block(self) -> int | None:
        """The INT4 block along in-features (the checkpoint's group_size), None for the other kinds."""
        return W4A8_GROUP if self.kind == "w4a8_awq" else self.group_size

    def with_(self, **changes) -> "Recipe":
        return replace(self, **changes)

    # -- (de)serialisation -------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict) -> "Recipe":
        if not isinstance(data, dict):
            raise UserError(f"a recipe must be a mapping, got {type(data).__name__}")
        return cls(**data)

    @classmethod
    def load(cls, path: Path) -> "Recipe":
        import yaml

        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise UserError(f"cannot read recipe file {path}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise UserError(f"recipe file {path} is not UTF-8 text (a binary file?)") from None
        try:
            data = yaml.load(text, Loader=_unique_keys_loader())  # JSON is YAML too
        except yaml.YAMLError as exc:
            raise UserError(f"recipe file {path} is not valid YAML/JSON ({str(exc).splitlines()[0]})") from None
        if isinstance(data, dict) and "recipe" in data and isinstance(data["recipe"], dict):
            data = data["recipe"]  # a search result file wraps the recipe with its metrics
        return cls.from_dict(data)

    def dump(self, path: Path, extra: dict | None = None, *, fault: str | None = None) -> None:
        import yaml

        body = {"recipe": self.to_dict(), **(extra or {})} if extra else self.to_dict()
        text = json.dumps(body, indent=2) + "\n" if Path(path).suffix == ".json" else yaml.safe_dump(body, sort_keys=False)
        atomic_write_text(Path(path), text, fault=fault)

    # -- checks against a model and a device, before any work ---------------------------------------------
    def validate_for(self, config: dict, *, device: str = "cpu") -> None:
        """``config``: the HF config dict. Raises UserError with the precise reason a combination cannot work."""
        if self.block is not None:
            dims = {"hidden_size": config["hidden_size"], "intermediate_size": config["intermediate_size"]}
            bad = {k: v for k, v in dims.items() if v % self.block}
            if bad:
                what = ", ".join(f"{k} {v}" for k, v in bad.items())
                if self.kind == "w4a8_awq":
                    raise UserError(f"w4a8_awq quantizes in blocks of {W4A8_GROUP} along in-features (ModelOpt's "
                                    f"W4A8 preset, TensorRT-LLM's W4A8 kernels), which does not divide the model's "
                                    f"{what}")
                ok = [g for g in GROUP_SIZES if all(v % g == 0 for v in dims.values())]
                hint = f"use one of {ok}" if ok else "no supported group size fits"
                raise UserError(f"{self.kind} group_size {self.group_size} does not divide the model's {what}; {hint}")
        if self.exclude:
            names = layer_names(config["num_hidden_layers"])
            for pattern in self.exclude:
                if not any(fnmatch.fnmatch(n, pattern) for n in names):
                    raise UserError(f"exclude pattern {pattern!r} matches no layer "
                                    f"(names look like layers.0.attention.qkv, *.mlp.proj, lm_head)")
        if (self.quant_algo in FP8_GEMM_ALGOS or self.kv_cache == "fp8") and device.startswith("cuda"):
            import torch

            if why := fp8_refusal(torch.device(device)):
                raise UserError(why)

    def excluded_layers(self, num_layers: int) -> list[str]:
        return [n for n in layer_names(num_layers) if any(fnmatch.fnmatch(n, p) for p in self.exclude)]


def _recipe_error(errors: list[dict]) -> str:
    """pydantic's errors of a recipe as the one line a user reads: the field, what it must be, what it got."""
    names = [f.name for f in fields(Recipe)]
    unknown = [str(e["loc"][0]) for e in errors if e["type"] == "unexpected_keyword_argument"]
    if unknown:
        return f"unknown recipe field(s): {', '.join(unknown)} (known: {', '.join(sorted(names))})"
    e = errors[0]
    name = names[e["loc"][0]] if isinstance(e["loc"][0], int) else e["loc"][0]
    got, kind = e["input"], e["type"]
    if name == "kind":
        return (f"unknown recipe {got!r} (known: {', '.join(KINDS)})" if isinstance(got, str)
                else f"recipe kind must be a string, got {got!r}")
    if name == "kv_cache":
        return (f"unknown kv_cache {got!r} (known: {', '.join(KV_CACHE)})" if isinstance(got, str)
                else f"kv_cache must be a string, got {got!r}")
    if name == "exclude":
        return f"exclude must be a list of layer patterns (strings), got {got!r}"
    if name == "group_size":
        if isinstance(got, int) and not isinstance(got, bool):
            return f"int4_awq group_size must be one of {GROUP_SIZES}, got {got!r}"
        return f"group_size must be an integer, got {got!r}"
    if kind == "bool_type":
        return f"{name} must be true or false, got {got!r}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        bounds = {"alpha": "[0, 1]", "awq_alpha_step": "(0, 1]"}[name]
        return f"{'smoothquant ' if name == 'alpha' else ''}{name} must be in {bounds}, got {got!r}"
    return f"{name} must be a number, got {got!r}"


def layer_names(num_layers: int) -> list[str]:
    return [f"layers.{i}.{s}" for i in range(num_layers) for s in LINEARS] + ["lm_head"]


def _unique_keys_loader():
    """yaml's SafeLoader, except that a key given twice in one mapping is an error (YAML keeps the last one
    silently, so ``alpha: 0.5`` then ``alpha: 0.9`` would quantize with a value the user may not have meant)."""
    import yaml

    class UniqueKeys(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"key {key!r} given twice",
                                                            key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return UniqueKeys


def parse_recipe_arg(text: str) -> Recipe:
    """``--recipe``: a file path (YAML/JSON) or ``kind[:key=value,...]``, e.g. ``smoothquant:alpha=0.6``."""
    if Path(text).suffix in (".yaml", ".yml", ".json"):
        return Recipe.load(Path(text))
    kind, _, rest = text.partition(":")
    data: dict = {"kind": kind}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--recipe {text!r}: expected key=value after ':', got {item!r}")
        key = key.strip()
        if key in data and key != "exclude":
            raise UserError(f"--recipe {text!r}: {key} given twice")
        if key == "exclude":
            data.setdefault("exclude", []).extend(v for v in value.split("+") if v)
            continue
        try:
            import yaml

            data[key] = yaml.safe_load(value)
        except Exception:
            data[key] = value
    return Recipe.from_dict(data)
