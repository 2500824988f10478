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
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from quant.atomic import atomic_write_text
from quant.errors import UserError
from quant.hardware import fp8_refusal
from quant.names import LINEARS

KINDS = ("fp16", "int8_wo", "smoothquant", "int4_awq", "fp8")
KV_CACHE = ("none", "int8", "fp8")
GROUP_SIZES = (32, 64, 128)
# What each kind writes as config.json quant_algo.
QUANT_ALGO = {"fp16": None, "int8_wo": "W8A16", "smoothquant": "W8A8_SQ_PER_CHANNEL", "int4_awq": "W4A16_AWQ",
              "fp8": "FP8"}
KV_ALGO = {"none": None, "int8": "INT8", "fp8": "FP8"}

_DEFAULTS = {"alpha": None, "group_size": None, "awq_alpha_step": None, "awq_clip": False}
KIND_DEFAULTS = {
    "smoothquant": {"alpha": 0.8},  # ModelOpt's 1.0 measured worse on the default model (reference notes)
    "int4_awq": {"group_size": 128, "awq_alpha_step": 0.1},
}


@dataclass(frozen=True)
class Recipe:
    kind: str = "fp16"
    alpha: float | None = None  # smoothquant migration strength, [0, 1]
    group_size: int | None = None  # int4_awq block size along in-features
    awq_alpha_step: float | None = None  # int4_awq: AWQ-lite search step over the scale exponent
    awq_clip: bool = False  # int4_awq: also search per-group clipping (awq_full)
    kv_cache: str = "none"
    exclude: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        # Types first: a recipe file can hold anything; a wrong type is a one-line error here, never a traceback
        # later nor (awq_clip: 1 for true) a recipe that hashes differently from the same one spelled right.
        number = (int, float)
        if not isinstance(self.kind, str):
            raise UserError(f"recipe kind must be a string, got {self.kind!r}")
        for key in ("alpha", "awq_alpha_step"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, number)):
                raise UserError(f"{key} must be a number, got {value!r}")
        if self.group_size is not None and (isinstance(self.group_size, bool) or not isinstance(self.group_size, int)):
            raise UserError(f"group_size must be an integer, got {self.group_size!r}")
        if not isinstance(self.awq_clip, bool):
            raise UserError(f"awq_clip must be true or false, got {self.awq_clip!r}")
        if not isinstance(self.kv_cache, str):
            raise UserError(f"kv_cache must be a string, got {self.kv_cache!r}")
        excl = (self.exclude,) if isinstance(self.exclude, str) else self.exclude
        if not isinstance(excl, (tuple, list)) or not all(isinstance(p, str) and p for p in excl):
            raise UserError(f"exclude must be a list of layer patterns (strings), got {self.exclude!r}")
        if self.kind not in KINDS:
            raise UserError(f"unknown recipe {self.kind!r} (known: {', '.join(KINDS)})")
        for key, value in {**_DEFAULTS, **KIND_DEFAULTS.get(self.kind, {})}.items():
            if getattr(self, key) is None and value is not None:
                object.__setattr__(self, key, value)
        if self.kind != "smoothquant" and self.alpha is not None:
            raise UserError(f"alpha applies to smoothquant only, not {self.kind}")
        if self.kind != "int4_awq" and (self.group_size is not None or self.awq_alpha_step is not None or self.awq_clip):
            raise UserError(f"group_size/awq_alpha_step/awq_clip apply to int4_awq only, not {self.kind}")
        if self.alpha is not None:
            if not isinstance(self.alpha, (int, float)) or not 0.0 <= float(self.alpha) <= 1.0:
                raise UserError(f"smoothquant alpha must be in [0, 1], got {self.alpha!r}")
            object.__setattr__(self, "alpha", round(float(self.alpha), 4))
        if self.group_size is not None and self.group_size not in GROUP_SIZES:
            raise UserError(f"int4_awq group_size must be one of {GROUP_SIZES}, got {self.group_size!r}")
        if self.awq_alpha_step is not None and not 0.0 < float(self.awq_alpha_step) <= 1.0:
            raise UserError(f"awq_alpha_step must be in (0, 1], got {self.awq_alpha_step!r}")
        if self.kv_cache not in KV_CACHE:
            raise UserError(f"unknown kv_cache {self.kv_cache!r} (known: {', '.join(KV_CACHE)})")
        if isinstance(self.exclude, str):
            object.__setattr__(self, "exclude", (self.exclude,))
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
        if self.kind == "int4_awq":
            parts.append(f"g{self.group_size}" + ("-clip" if self.awq_clip else ""))
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

    def with_(self, **changes) -> "Recipe":
        return replace(self, **changes)

    # -- (de)serialisation -------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict) -> "Recipe":
        if not isinstance(data, dict):
            raise UserError(f"a recipe must be a mapping, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"unknown recipe field(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        data = dict(data)
        if "exclude" in data:
            if data["exclude"] is None:
                data["exclude"] = ()
            elif not isinstance(data["exclude"], (list, tuple, str)):
                raise UserError("exclude must be a list of layer patterns")
            data["exclude"] = tuple([data["exclude"]] if isinstance(data["exclude"], str) else data["exclude"])
        for key in ("group_size",):
            if data.get(key) is not None and not isinstance(data[key], int):
                raise UserError(f"{key} must be an integer, got {data[key]!r}")
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
        if self.kind == "int4_awq":
            dims = {"hidden_size": config["hidden_size"], "intermediate_size": config["intermediate_size"]}
            bad = {k: v for k, v in dims.items() if v % self.group_size}
            if bad:
                ok = [g for g in GROUP_SIZES if all(v % g == 0 for v in dims.values())]
                what = ", ".join(f"{k} {v}" for k, v in bad.items())
                hint = f"use one of {ok}" if ok else "no supported group size fits"
                raise UserError(f"int4_awq group_size {self.group_size} does not divide the model's {what}; {hint}")
        if self.exclude:
            names = layer_names(config["num_hidden_layers"])
            for pattern in self.exclude:
                if not any(fnmatch.fnmatch(n, pattern) for n in names):
                    raise UserError(f"exclude pattern {pattern!r} matches no layer "
                                    f"(names look like layers.0.attention.qkv, *.mlp.proj, lm_head)")
        if (self.kind == "fp8" or self.kv_cache == "fp8") and device.startswith("cuda"):
            import torch

            if why := fp8_refusal(torch.device(device)):
                raise UserError(why)

    def excluded_layers(self, num_layers: int) -> list[str]:
        return [n for n in layer_names(num_layers) if any(fnmatch.fnmatch(n, p) for p in self.exclude)]


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
