"""Per-channel input-activation statistics of every linear of a LLaMa model, collected once and cached.

For decoder layer ``i`` the input of each linear is recorded under its TensorRT-LLM name:

==============================  ======================  ================================================
name                            HF module hooked        shares its input with
==============================  ======================  ================================================
``layers.{i}.attention.qkv``    ``self_attn.q_proj``    ``k_proj``, ``v_proj`` (one fused qkv in TRT-LLM)
``layers.{i}.attention.dense``  ``self_attn.o_proj``
``layers.{i}.mlp.fc``           ``mlp.gate_proj``       ``layers.{i}.mlp.gate`` = ``up_proj`` (an alias)
``layers.{i}.mlp.proj``         ``mlp.down_proj``
==============================  ======================  ================================================

Per input channel: the running max of ``|x|`` and the mean of ``|x|`` over every calibration token (float32
statistics; sums accumulate in float64). Per linear: the number of tokens seen and the outlier score
``max(channel absmax) / median(channel absmax)`` — how far the worst channel stands above a typical one, which
is what per-tensor INT8/FP8 activation scales suffer from.

The cache lives in ``<cache>/calib/<model short hash>-<calib spec hash>/`` as ``stats.safetensors`` (tensors)
and ``meta.json`` (model hash, calibration spec, layer list, token counts, the tensor file's sha256, creation
time), written atomically and checked on every load.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from quant import faults
from quant.atomic import atomic_dir, atomic_write_json
from quant.errors import UserError
from quant.export import calibration_device, calibration_rows, forward_loop, load_hf_model
from quant.codehash import code_hash
from quant.names import HF_MODULES
from quant.paths import cache_root

from calibration.data import CalibSpec

if TYPE_CHECKING:
    from quant.model_source import ResolvedModel

FORMAT = "calib-stats-v1"
TENSOR_FILE = "stats.safetensors"
META_FILE = "meta.json"

# TRT-LLM linear kind -> the HF submodule (of a LlamaDecoderLayer) whose input is recorded.
# TRT-LLM linears that read exactly the input of another, stored once under the latter.
ALIAS_KINDS: dict[str, str] = {"mlp.gate": "mlp.fc"}  # up_proj reads gate_proj's input
LINEAR_KINDS: dict[str, str] = {kind: parts[0] for kind, parts in HF_MODULES.items() if kind not in ALIAS_KINDS}
STAT_FIELDS = ("absmax", "mean_abs")


def linear_name(layer: int, kind: str) -> str:
    return f"layers.{layer}.{kind}"


def split_name(name: str) -> tuple[int, str]:
    """``"layers.3.mlp.fc"`` → ``(3, "mlp.fc")``."""
    prefix, layer, kind = name.split(".", 2)
    if prefix != "layers" or not layer.isdigit():
        raise ValueError(f"not a layer linear name: {name!r}")
    return int(layer), kind


@dataclass(frozen=True)
class LayerOutlier:
    name: str
    score: float  # max(channel absmax) / median(channel absmax)
    max_absmax: float
    median_absmax: float
    top_channel: int  # the input channel holding max_absmax
    tokens: int


def outlier_score(absmax: torch.Tensor) -> float:
    """``max / median`` of the per-channel absmax; the median of an even count is the mean of the middle two."""
    median, peak = _median(absmax), float(absmax.max())
    if median == 0.0:
        return math.inf if peak > 0 else 1.0
    return peak / median


def _median(absmax: torch.Tensor) -> float:
    values = absmax.double().flatten().sort().values
    n = values.numel()
    return float(values[n // 2]) if n % 2 else float((values[n // 2 - 1] + values[n // 2]) / 2)


@dataclass
class ActivationStats:
    """Per-channel input statistics keyed by TRT-LLM linear name, in model order (layer, then kind)."""

    absmax: dict[str, torch.Tensor]
    mean_abs: dict[str, torch.Tensor]
    tokens: dict[str, int]
    meta: dict = field(default_factory=dict)
    # Where it was read from / written to, and whether this object came from an existing cache entry.
    path: Path | None = field(default=None, compare=False)
    from_cache: bool = field(default=False, compare=False)

    # ------------------------------------------------------------------------------------- queries

    @property
    def layers(self) -> list[str]:
        return list(self.absmax)

    @property
    def aliases(self) -> dict[str, str]:
        """Alias linear → the stored linear whose input it reads (``layers.i.mlp.gate`` → ``layers.i.mlp.fc``)."""
        out = {}
        for name in self.layers:
            layer, kind = split_name(name)
            for alias_kind, target_kind in ALIAS_KINDS.items():
                if kind == target_kind:
                    out[linear_name(layer, alias_kind)] = name
        return out

    def linears_sharing(self, name: str) -> list[str]:
        """The TRT-LLM linears that read the input stored under ``name`` (itself first)."""
        name = self.aliases.get(name, name)
        self._require(name)
        return [name, *(alias for alias, target in self.aliases.items() if target == name)]

    def outlier_score(self, name: str) -> float:
        name = self.aliases.get(name, name)
        self._require(name)
        return outlier_score(self.absmax[name])

    def outlier(self, name: str) -> LayerOutlier:
        name = self.aliases.get(name, name)
        self._require(name)
        absmax = self.absmax[name]
        return LayerOutlier(
            name=name, score=outlier_score(absmax), max_absmax=float(absmax.max()), median_absmax=_median(absmax),
            top_channel=int(absmax.argmax()), tokens=int(self.tokens[name]),
        )

    def ranked_layers(self, *, include_aliases: bool = False) -> list[str]:
        """Stored linear names by outlier score, strongest first (ties keep model order).

        With ``include_aliases`` each alias (``mlp.gate``) follows the linear whose input it shares, so a search
        that keeps the first k names in FP16 can keep both halves of a shared input together.
        """
        ranked = sorted(self.layers, key=lambda n: -self.outlier_score(n))
        if not include_aliases:
            return ranked
        return [member for name in ranked for member in self.linears_sharing(name)]

    def top_outliers(self, k: int) -> list[LayerOutlier]:
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        return [self.outlier(name) for name in self.ranked_layers()[:k]]

    def by_kind(self, kind: str) -> list[str]:
        """Stored names of one kind (``"mlp.fc"``), in layer order."""
        return [n for n in self.layers if split_name(n)[1] == kind]

    def _require(self, name: str) -> None:
        if name not in self.absmax:
            raise KeyError(f"no statistics for {name!r}; known: {', '.join(self.layers[:4])}, ...")

    # --------------------------------------------------------------------------------- persistence

    def save(self, folder: Path) -> Path:
        """Write ``stats.safetensors`` + ``meta.json`` into ``folder`` atomically (an existing folder is kept)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        tensors = {}
        for name in self.layers:
            tensors[f"{name}.absmax"] = self.absmax[name].detach().float().contiguous().cpu()
            tensors[f"{name}.mean_abs"] = self.mean_abs[name].detach().float().contiguous().cpu()
        with atomic_dir(folder) as tmp:
            save_file(tensors, str(tmp / TENSOR_FILE), metadata={"format": FORMAT})
            faults.point("calib.write")  # crash test: a half-written entry (tensors, no meta.json)
            meta = {
                **self.meta,
                "format": FORMAT,
                "layers": self.layers,
                "aliases": self.aliases,
                "tokens": {name: int(self.tokens[name]) for name in self.layers},
                "outlier_scores": {name: self.outlier_score(name) for name in self.layers},
                "tensor_sha256": _sha256(tmp / TENSOR_FILE),
            }
            meta.setdefault("created", datetime.now(timezone.utc).isoformat(timespec="seconds"))
            atomic_write_json(tmp / META_FILE, meta)
        self.path = folder
        self.meta = {k: v for k, v in meta.items() if k not in ("layers", "aliases", "tokens", "outlier_scores")}
        return folder

    @classmethod
    def load(cls, folder: Path, *, model_hash: str | None = None, spec_key: str | None = None) -> "ActivationStats":
        """Read and check a saved folder; any damage or a key mismatch is a one-line UserError naming the file."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        folder = Path(folder)
        meta_path, tensor_path = folder / META_FILE, folder / TENSOR_FILE
        hint = f"delete {folder} to recompute it"
        if not folder.is_dir():
            raise UserError(f"no activation statistics at {folder}")
        for path in (meta_path, tensor_path):
            if not path.is_file():
                raise UserError(f"activation statistics cache is incomplete: {path} is missing; {hint}")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise UserError(f"{meta_path} is not valid JSON ({type(exc).__name__}); {hint}") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
            raise UserError(f"{meta_path} is not a {FORMAT} statistics file (format: {found!r}); {hint}")
        layers, tokens = meta.get("layers"), meta.get("tokens")
        if (
            not isinstance(layers, list) or not layers or not all(isinstance(n, str) for n in layers)
            or not isinstance(tokens, dict) or not isinstance(meta.get("tensor_sha256"), str)
        ):
            raise UserError(f"{meta_path} lacks a layer list, token counts or the tensor checksum; {hint}")
        if model_hash is not None and meta.get("model_hash") != model_hash:
            raise UserError(
                f"{meta_path} holds statistics of model {str(meta.get('model_hash'))[:16]}, "
                f"not of {model_hash[:16]} as its folder name says; {hint}"
            )
        spec = meta.get("calib_spec")
        if spec_key is not None and (not isinstance(spec, dict) or spec.get("key") != spec_key):
            found = spec.get("key") if isinstance(spec, dict) else None
            raise UserError(f"{meta_path} was made with calibration {found!r}, not {spec_key!r}; {hint}")
        if _sha256(tensor_path) != meta["tensor_sha256"]:
            raise UserError(f"{tensor_path} is corrupt or truncated (checksum mismatch); {hint}")
        try:
            tensors = load_file(str(tensor_path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise UserError(f"{tensor_path} is not a readable safetensors file ({_first_line(exc)}); {hint}") from None
        absmax, mean_abs, counts = {}, {}, {}
        for name in layers:
            pair = [tensors.get(f"{name}.{stat}") for stat in STAT_FIELDS]
            if any(t is None for t in pair):
                raise UserError(f"{tensor_path} has no statistics for {name}; {hint}")
            if any(t.dim() != 1 or t.dtype != torch.float32 or t.numel() == 0 for t in pair) or (
                pair[0].shape != pair[1].shape
            ):
                raise UserError(f"{tensor_path}: statistics of {name} have the wrong shape or dtype; {hint}")
            if not all(bool(torch.isfinite(t).all()) and bool((t >= 0).all()) for t in pair):
                raise UserError(f"{tensor_path}: statistics of {name} hold negative or non-finite values; {hint}")
            count = tokens.get(name)
            if not isinstance(count, int) or count <= 0:
                raise UserError(f"{meta_path}: no token count for {name}; {hint}")
            absmax[name], mean_abs[name], counts[name] = pair[0], pair[1], count
        core = {k: v for k, v in meta.items() if k not in ("layers", "aliases", "tokens", "outlier_scores")}
        return cls(absmax=absmax, mean_abs=mean_abs, tokens=counts, meta=core, path=folder, from_cache=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# ---------------------------------------------------------------------------------------- collection


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers of a HF LLaMa (``model.model.layers``), checked to have the linears we hook."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
        raise UserError(f"{type(model).__name__} has no decoder layers (model.layers): not a LLaMa-family model")
    for layer in layers:
        for path in (parts[0] for parts in HF_MODULES.values()):
            try:
                linear = layer.get_submodule(path)
            except AttributeError:
                linear = None
            if not isinstance(linear, torch.nn.Linear):
                raise UserError(f"{type(model).__name__} decoder layers have no {path} linear: not a LLaMa-family model")
    return list(layers)


class _Recorder:
    """Running per-channel max |x| and sum |x| of one linear's input."""

    def __init__(self) -> None:
        self.absmax: torch.Tensor | None = None
        self.sum_abs: torch.Tensor | None = None
        self.tokens = 0

    def __call__(self, module, args, kwargs) -> None:
        x = args[0] if args else kwargs["input"]
        x = x.detach().reshape(-1, x.shape[-1]).abs().float()
        absmax = x.amax(dim=0).cpu()
        sum_abs = x.sum(dim=0, dtype=torch.float64).cpu()
        if self.absmax is None:
            self.absmax, self.sum_abs = absmax, sum_abs
        else:
            torch.maximum(self.absmax, absmax, out=self.absmax)
            self.sum_abs += sum_abs
        self.tokens += x.shape[0]


def collect_stats(
    model: torch.nn.Module, batches: torch.Tensor, *, batch_size: int = 4, model_hash: str | None = None,
    spec: CalibSpec | None = None,
) -> ActivationStats:
    """Run ``model`` over ``batches`` with one forward pre-hook per recorded linear; the hooks are always removed."""
    layers = decoder_layers(model)
    recorders: dict[str, _Recorder] = {}
    handles = []
    was_training = model.training
    started = time.perf_counter()
    try:
        for index, layer in enumerate(layers):
            for kind, path in LINEAR_KINDS.items():
                recorder = recorders[linear_name(index, kind)] = _Recorder()
                handles.append(layer.get_submodule(path).register_forward_pre_hook(recorder, with_kwargs=True))
        model.eval()
        # The decoder body is enough: no hooked linear is after it, and the LM head would only add its
        # [batch, seq, vocab] logits (200 MB for 4x256 tokens of a 49k vocab) and a fifth of the work.
        body = getattr(model, "model", None)
        forward_loop(batches, batch_size=batch_size)(body if getattr(body, "layers", None) is not None else model)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    seconds = time.perf_counter() - started
    missing = [name for name, r in recorders.items() if r.absmax is None]
    if missing:
        raise RuntimeError(f"the forward pass never reached {missing[0]} (and {len(missing) - 1} more)")
    meta = {
        "model_hash": model_hash,
        "calib_spec": spec.to_dict() if spec is not None else None,
        "batch_shape": list(batches.shape),
        "collect_seconds": round(seconds, 3),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
    }
    return ActivationStats(
        absmax={name: r.absmax for name, r in recorders.items()},
        mean_abs={name: (r.sum_abs / r.tokens).float() for name, r in recorders.items()},
        tokens={name: r.tokens for name, r in recorders.items()},
        meta=meta,
    )


# --------------------------------------------------------------------------------------------- cache


def stats_dir(resolved: "ResolvedModel", spec: CalibSpec) -> Path:
    code = code_hash("calibration.stats", packages=("torch", "transformers"))
    return cache_root() / "calib" / f"{resolved.short_hash}-{spec.key_hash}-{code}"


def get_stats(
    resolved: "ResolvedModel", spec: CalibSpec, *, model: torch.nn.Module | None = None, tokenizer=None,
    batch_size: int | None = None,
) -> ActivationStats:
    """The statistics of (model, spec): read from the cache, or computed once and cached.

    On a miss the HF model is loaded in float32 (``quant.export.load_hf_model``) unless ``model`` is given; on a
    hit neither the model nor the tokenizer is touched. ``.from_cache`` tells which happened. ``batch_size``: rows
    per forward; None: as many as the device's free memory holds, up to ``quant.export.CALIB_ROWS``.
    """
    folder = stats_dir(resolved, spec)
    if folder.exists():
        return ActivationStats.load(folder, model_hash=resolved.content_hash, spec_key=spec.key)
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(resolved.hf_dir)
    batches = spec.batches(tokenizer)  # bad data fails before the model is loaded
    if model is None:
        model = load_hf_model(resolved, dtype=torch.float32, device=calibration_device())
    stats = collect_stats(model, batches, batch_size=batch_size or calibration_rows(model, batches),
                          model_hash=resolved.content_hash, spec=spec)
    faults.point("calib.collect")  # crash test: statistics computed, nothing written
    # A model with NaN/Inf weights is the model's fault, not the cache's: say so and cache nothing (a cached
    # entry would be refused as damaged on every load, and recomputing it gives the same).
    bad = next((n for n in stats.layers if not bool(torch.isfinite(stats.absmax[n]).all())), None)
    if bad is not None:
        raise UserError(f"model {resolved.source} produces non-finite activations at the input of {bad} "
                        "(NaN/Inf in its weights?): it cannot be calibrated or quantized")
    stats.save(folder)
    return stats

