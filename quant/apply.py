"""Recipe → ModelOpt config → calibrated, quantized model → validated TRT-LLM checkpoint (cached).

ModelOpt does the quantization math (SmoothQuant migration, AWQ search, amax calibration); this module only
translates a :class:`~quant.recipes.Recipe` into its config and owns the cache. A checkpoint's cache key is
(model content hash, recipe hash, calibration key): the same recipe on the same model and calibration data is
exported once, by any process, and read back by every later run.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Protocol

import torch

from quant import cache_budget, faults, formats, quiet
from quant.cache_budget import build_lock
from quant.codehash import code_hash
from quant.export import (EXPORT_DTYPE, calibration_device, calibration_rows, export_checkpoint, forward_loop,
                          load_hf_model, trtllm_config)
from quant.memory import return_freed_memory
from quant.model_source import ResolvedModel
from quant.names import HF_MODULES, LINEARS
from quant.paths import cache_root
from quant.recipes import AWQ_KINDS, GROUPED, Recipe

KV_QUANTIZER = "*[kv]_bmm_quantizer"


def modelopt_config(recipe: Recipe, num_layers: int) -> dict | None:
    """The ModelOpt ``mtq.quantize`` config for a recipe (None for fp16)."""
    import modelopt.torch.quantization as mtq

    base = {"fp16": None, "int8_wo": mtq.INT8_WEIGHT_ONLY_CFG, "smoothquant": mtq.INT8_SMOOTHQUANT_CFG,
            "int4_awq": mtq.INT4_AWQ_CFG, "int4_gptq": mtq.INT4_AWQ_CFG, "w4a8_awq": mtq.W4A8_AWQ_BETA_CFG,
            "fp8": mtq.FP8_DEFAULT_CFG}[recipe.kind]
    if base is None:
        if recipe.kv_cache == "none":
            return None
        # FP16 weights with a quantized KV cache: every quantizer off except the KV ones appended below.
        base = {"quant_cfg": [{"quantizer_name": "*", "enable": False}], "algorithm": "max"}
    cfg = copy.deepcopy(base)
    entries: list = cfg["quant_cfg"]
    if recipe.kind == "smoothquant":
        cfg["algorithm"] = {"method": "smoothquant", "alpha": recipe.alpha}
    if recipe.kind in GROUPED:
        for entry in entries:
            if entry.get("quantizer_name") == "*weight_quantizer" and "cfg" in entry:
                entry["cfg"]["block_sizes"] = {**entry["cfg"]["block_sizes"], -1: recipe.group_size}
    if recipe.kind in AWQ_KINDS:
        cfg["algorithm"] = {"method": "awq_full" if recipe.awq_clip else "awq_lite",
                            "alpha_step": recipe.awq_alpha_step}
    if recipe.kind == "int4_gptq":
        # ModelOpt's GPTQ (Hessian-compensated rounding, layer by layer) on the INT4 block quantizers, its defaults:
        # 1% damping, update blocks of 128 columns (a multiple of every group size here).
        cfg["algorithm"] = {"method": "gptq"}
    if recipe.kv_cache != "none":
        bits = 8 if recipe.kv_cache == "int8" else (4, 3)
        entries.append({"quantizer_name": KV_QUANTIZER, "cfg": {"num_bits": bits, "axis": None}})
    for name in recipe.excluded_layers(num_layers):
        if name == "lm_head":
            continue  # ModelOpt's configs already keep lm_head unquantized
        _, idx, linear = name.split(".", 2)
        for module in HF_MODULES[linear]:
            entries.append({"quantizer_name": f"*.layers.{idx}.{module}.*", "enable": False})
    return cfg


# What writes a checkpoint: this module's import closure (ModelOpt config, export, calibration) and the packages
# whose numerics end up in it.
CHECKPOINT_PACKAGES = ("torch", "nvidia-modelopt", "transformers")


class Calibration(Protocol):
    """What this module needs of a calibration spec (``calibration.data.CalibSpec`` is one). Taken as a parameter
    so that recipe application sits below the calibration package; the spec's own module is part of the
    checkpoint's code hash, since it decides the calibration tokens."""

    key: str
    num_samples: int
    seq_len: int

    def batches(self, tokenizer) -> torch.Tensor: ...


def checkpoint_dir(model: ResolvedModel, recipe: Recipe, calib: Calibration | None = None) -> Path:
    suffix, modules = "", ("quant.apply",)
    if recipe.needs_calibration:
        suffix, modules = f"-{_short(calib.key)}", (*modules, type(calib).__module__)
    code = code_hash(*modules, packages=CHECKPOINT_PACKAGES)
    return cache_root() / "checkpoints" / f"{model.short_hash}-{recipe.hash}{suffix}-{code}"


def _short(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def prepare(model: ResolvedModel, recipe: Recipe, calib: Calibration | None = None) -> None:
    """Check the recipe against the model before any work. Contract: a recipe that calibrates gets a spec."""
    if recipe.needs_calibration and calib is None:
        raise ValueError(f"{recipe.label} calibrates: pass a calibration spec (calibration.data.CalibSpec)")
    recipe.validate_for(json.loads((model.hf_dir / "config.json").read_text()))


def cached_build(out: Path, build, *, need: int, log=None) -> Path:
    """``out`` once it holds a finished artifact: from the cache, or made by ``build(out)`` under the key's lock,
    after making room in the cache's disk budget for ``need`` bytes (an upper bound of its size). A caller that
    must not lose it to another worker's eviction holds a :class:`~quant.cache_budget.Pin` on it while in use."""
    if not (out / "config.json").is_file():
        with build_lock(out):
            if not (out / "config.json").is_file():  # else built by another process while we waited
                cache_budget.reserve(need, for_what=out, log=log)
                build(out)
                return_freed_memory()  # the build's temporaries (a whole model's) are gone: give them back
                cache_budget.settle(out, log=log)
    cache_budget.touch(out)
    return out


def fp16_bytes(model: ResolvedModel) -> int:
    """The model's weights in fp16: an upper bound of any checkpoint or export of it (quantized ones are smaller;
    per-layer fallback keeps some linears at this size, never more)."""
    return sum(p.stat().st_size for p in model.hf_dir.glob("*.safetensors"))


def checkpoint_bytes_bound(model: ResolvedModel, recipe: Recipe) -> int:
    """An upper bound of the recipe's TRT-LLM checkpoint on disk, from the model's config and the format's tensor
    table (``quant.formats``): each tensor at the widest dtype its row allows, lm_head padded as ModelOpt pads
    it for INT4 (vocabulary to a multiple of 64) and always written, plus slack for headers and file blocks. The
    cache budget reserves this before a build (an INT4 checkpoint is ~0.3x of the FP16 bound it used to take)."""
    hf = json.loads((model.hf_dir / "config.json").read_text())
    config = {**trtllm_config(hf, recipe.quant_algo, recipe.kv_algo, recipe.group_size), "dtype": "float16"}
    excluded = set(recipe.excluded_layers(config["num_hidden_layers"]))
    algos = {f"layers.{i}.{lin}": None if f"layers.{i}.{lin}" in excluded else recipe.quant_algo
             for i in range(config["num_hidden_layers"]) for lin in LINEARS}
    total = 0
    for name, spec in formats.expected_tensors(config, algos).items():
        shape = list(spec.shape)
        if spec.padded_rows:
            shape[0] = -(-shape[0] // 64) * 64
        total += math.prod(shape) * max(d.itemsize for d in spec.dtypes)
    return int(total * 1.005) + 2**20


def build_checkpoint(model: ResolvedModel, recipe: Recipe, calib: Calibration | None = None, *, log=None) -> Path:
    """The TRT-LLM checkpoint for (model, recipe, calibration): from the cache, or quantized and exported."""
    prepare(model, recipe, calib)

    def build(out: Path) -> None:
        t0 = time.perf_counter()
        faults.trace("checkpoint.build", key=out.name)  # counted by the concurrency tests: one build per key
        export_checkpoint(quantize_model(model, recipe, calib, log=log) if recipe.needs_calibration
                          else load_export_model(model), out)
        if log:
            log(f"built {recipe.label} checkpoint in {time.perf_counter() - t0:.1f} s: {out}")

    return cached_build(checkpoint_dir(model, recipe, calib), build, need=checkpoint_bytes_bound(model, recipe),
                        log=log)


def quantize_model(model: ResolvedModel, recipe: Recipe, calib: Calibration, *, log=None) -> torch.nn.Module:
    """ModelOpt-quantize the HF model in float32 (on :func:`~quant.export.calibration_device`), then cast to fp16
    where it is: on a GPU, ModelOpt's export copies only the checkpoint's tensors to the host, not a host copy of
    the whole model first (measured at 8B: the build's host peak was 2.9-3.4x the FP16 size with that copy)."""
    import modelopt.torch.quantization as mtq
    from transformers import AutoTokenizer

    hf = load_hf_model(model, dtype=torch.float32, device=calibration_device())
    batches = calib.batches(AutoTokenizer.from_pretrained(model.hf_dir))
    cfg = modelopt_config(recipe, hf.config.num_hidden_layers)
    rows = calibration_rows(hf, batches)
    if log:
        log(f"quantizing {recipe.label} with ModelOpt on {calib.num_samples}×{calib.seq_len} calibration tokens, "
            f"{rows} rows per forward")
    loop = forward_loop(batches, batch_size=rows)

    def calibrate(m):
        faults.point("quantize.modelopt")  # crash test: inside ModelOpt's quantization
        return loop(m)

    with torch.no_grad(), quiet.held("ModelOpt"):
        mtq.quantize(hf, cfg, calibrate)
    return hf.to(dtype=EXPORT_DTYPE)


def load_export_model(model: ResolvedModel) -> torch.nn.Module:
    """The unquantized model in the export dtype, for an FP16 export: on the GPU when there is one (the weights
    stream there from the safetensors), like a quantized model, so the host holds the exported tensors only."""
    return load_hf_model(model, dtype=EXPORT_DTYPE, device=calibration_device())
