"""ModelOpt's unified Hugging Face checkpoint: what current TensorRT-LLM, vLLM and SGLang load; read back by our runtime.

Export (:func:`build_hf_export`): ``modelopt.torch.export.export_hf_checkpoint(model, dtype, export_dir)`` writes
``config.json`` (with a ``quantization_config`` block, ``quant_method: "modelopt"``), ``generation_config.json``,
``hf_quant_config.json`` (``{"producer": …, "quantization": {"quant_algo", "kv_cache_quant_algo", "group_size",
"exclude_modules"}}``) and ``model.safetensors`` under HF names (``model.layers.{i}.self_attn.q_proj.weight`` …),
for every recipe kind; what each format holds and what the servers make of it is docs/serving.md.

Gaps fixed after export: transformers 5 writes RoPE only as ``rope_parameters``, which 4.x (TensorRT-LLM 1.x pins
4.57) ignores, so ``rope_theta``/``rope_scaling`` are added; the tokenizer files are copied in (``LLM(model=dir)``
loads the tokenizer from the same folder) with ``tokenizer_class`` ``TokenizersBackend`` (5.x only) renamed
``PreTrainedTokenizerFast``; ``torch_dtype`` is written next to ``dtype``; GPTQ's INT4 linears get unit
``pre_quant_scale`` where TensorRT-LLM's loader reads one. An INT8 KV cache is refused (ModelOpt asserts on it and
no HF-loading server reads it).

Reader (:func:`load_hf_export`): every export becomes an in-memory TRT-LLM :class:`~quant.checkpoint.Checkpoint`,
computed as TensorRT-LLM's PyTorch backend loads it (``tensorrt_llm/_torch/modules/linear.py``; file and commit
per format in docs/serving.md, checked by tests/test_server_loaders.py): q/k/v and gate/up concatenate along out;
FP8 shards are requantized to their group's largest weight scale (``rescale_fused_weights``); INT4 stays packed
as stored (the TRT-LLM checkpoint's layout), with the pre-quant scales the export kept (o_proj, down_proj); W4A8
takes the shared ``weight_scale_2`` and input scale; an FP8 KV cache runs at scale 1.0; excluded modules are the
linears stored in a float dtype.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from quant import formats, quiet
from quant.apply import cached_build, checkpoint_dir, fp16_bytes, load_export_model, prepare, quantize_model
from quant.atomic import atomic_dir, atomic_write_json
from quant.checkpoint import Checkpoint, aligned
from quant.errors import UserError
from quant.export import EXPORT_DTYPE, rotary_fields, trtllm_config
from quant.names import HF_MODULES
from quant.paths import cache_root
from quant.servers import HF_KV_REASON, hf_export_refusal

HF_QUANT_CONFIG = "hf_quant_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "chat_template.json")
READABLE_ALGOS = (None, "W8A16", "W8A8_SQ_PER_CHANNEL", "W4A16_AWQ", "W4A8_AWQ", "FP8")
FP8_FUSED = (("attention.qkv",), ("mlp.fc", "mlp.gate"))  # what TRT-LLM's PyTorch backend fuses (one scale each)


# -- format detection ---------------------------------------------------------------------------------------
def checkpoint_format(folder: Path) -> str:
    """``"trtllm"`` (config.json with ``architecture``) or ``"hf"`` (``architectures`` + model*.safetensors)."""
    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return "trtllm"  # let the TRT-LLM loader report what is wrong
    if isinstance(config, dict) and "architecture" not in config and "architectures" in config \
            and any(folder.glob("model*.safetensors")):
        return "hf"
    return "trtllm"


def hf_quantization(folder: Path) -> dict:
    """The export's ``quantization`` block: hf_quant_config.json, else config.json's ``quantization_config``."""
    folder = Path(folder)
    path = folder / HF_QUANT_CONFIG
    if path.is_file():
        try:
            quant = json.loads(path.read_text())["quantization"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UserError(f"export {folder}: {HF_QUANT_CONFIG} is unreadable ({type(exc).__name__})") from None
        if not isinstance(quant, dict):
            raise UserError(f"export {folder}: {HF_QUANT_CONFIG} quantization must be an object")
        return quant
    config = json.loads((folder / "config.json").read_text())
    block = config.get("quantization_config") or {}
    if block and block.get("quant_method") != "modelopt":
        raise UserError(f"export {folder}: quantization_config of quant_method {block.get('quant_method')!r} "
                        "is not a ModelOpt export")
    kv = block.get("kv_cache_quant_algo")
    scheme = block.get("kv_cache_scheme")  # ModelOpt >= 0.31 writes this here instead (read as vLLM reads it)
    if kv is None and isinstance(scheme, dict) and scheme.get("type") == "float" and scheme.get("num_bits") == 8:
        kv = "FP8"
    return {"quant_algo": block.get("quant_algo"), "kv_cache_quant_algo": kv, "group_size": block.get("group_size")}


# -- export -------------------------------------------------------------------------------------------------
def fix_hf_config(folder: Path, hf_config) -> None:
    """Add what transformers 4.x (TensorRT-LLM's) needs to read the export as transformers 5 meant it."""

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    rope = rotary_fields(hf_config)
    config["rope_theta"] = rope["rotary_base"]
    if rope["rotary_scaling"] is not None:
        config["rope_scaling"] = rope["rotary_scaling"]
    if config.get("dtype") and not config.get("torch_dtype"):
        config["torch_dtype"] = config["dtype"]
    if not config.get("architectures"):
        config["architectures"] = ["LlamaForCausalLM"]
    atomic_write_json(folder / "config.json", config)


def copy_tokenizer(src_dir: Path, folder: Path) -> None:
    for name in TOKENIZER_FILES:
        if (Path(src_dir) / name).is_file():
            shutil.copy2(Path(src_dir) / name, Path(folder) / name)
    path = Path(folder) / "tokenizer_config.json"
    if path.is_file():
        tok = json.loads(path.read_text())
        if tok.get("tokenizer_class") == "TokenizersBackend":  # transformers 5 only; 4.x knows the fast class
            tok["tokenizer_class"] = "PreTrainedTokenizerFast"
            atomic_write_json(path, tok)


def export_hf(model: torch.nn.Module, out_dir: Path, *, tokenizer_from: Path | None = None,
              expect: tuple[str | None, str | None] | None = None) -> Path:
    """``export_hf_checkpoint`` into a folder that appears atomically, config gaps fixed, checked when readable.

    ``expect`` = (quant_algo, kv_cache_quant_algo) the recipe should have produced.
    """
    from modelopt.torch.export import export_hf_checkpoint

    if not getattr(model.config, "architectures", None):
        model.config.architectures = ["LlamaForCausalLM"]  # export_hf_checkpoint needs it
    with atomic_dir(Path(out_dir)) as tmp:
        with quiet.held("ModelOpt"):
            export_hf_checkpoint(model, dtype=EXPORT_DTYPE, export_dir=tmp)
        fix_hf_config(tmp, model.config)
        if tokenizer_from is not None:
            copy_tokenizer(tokenizer_from, tmp)
        quant = hf_quantization(tmp) if (tmp / HF_QUANT_CONFIG).is_file() else {}
        got = (quant.get("quant_algo"), quant.get("kv_cache_quant_algo"))
        if expect is not None and got != tuple(expect):
            raise UserError(f"ModelOpt's HF export says quant_algo/kv_cache_quant_algo {got}, expected {expect}")
        if got[0] in formats.INT4_ALGOS:
            _add_unit_pre_quant_scales(tmp)
        load_hf_export(tmp)  # never publish a folder our own reader rejects
    return Path(out_dir)


def _add_unit_pre_quant_scales(folder: Path) -> None:
    """GPTQ: ModelOpt writes no pre_quant_scale, but TensorRT-LLM's PyTorch backend reads one for every unfused
    INT4 linear (o_proj, down_proj: ``W4A16_AWQ_LinearMethod.load_weights_vanilla`` takes
    ``weights[0]["pre_quant_scale"]`` unchecked); its fused q/k/v and gate/up loaders read none. Ones there change
    no number. A no-op for AWQ, whose export has them."""
    from safetensors.torch import load_file, save_file

    files = sorted(Path(folder).glob("model*.safetensors"))
    for f in files:
        tensors = load_file(str(f))
        add = {}
        for name, w in tensors.items():
            for module in ("self_attn.o_proj", "mlp.down_proj"):
                if name.endswith(f".{module}.weight") and w.dtype == torch.uint8:
                    pre = name[: -len("weight")] + "pre_quant_scale"
                    if pre not in tensors:
                        add[pre] = torch.ones(w.shape[1], dtype=EXPORT_DTYPE)
        if add:
            save_file({**tensors, **add}, str(f), metadata={"format": "pt"})
            index = Path(folder) / "model.safetensors.index.json"
            if index.is_file():  # sharded: the index names each tensor's file
                body = json.loads(index.read_text())
                body["weight_map"].update({k: f.name for k in add})
                atomic_write_json(index, body)


def hf_export_dir(model, recipe, calib=None) -> Path:
    """Cache folder of a recipe's HF export: named like its TRT-LLM checkpoint (model, recipe, calibration)."""

    return cache_root() / "hf_exports" / checkpoint_dir(model, recipe, calib).name


def build_hf_export(model, recipe, calib=None, *, log=None) -> Path:
    """The HF export for (model, recipe, calibration): from the cache, or quantized and exported (one builder)."""
    prepare(model, recipe, calib)
    if why := hf_export_refusal(recipe):
        raise UserError(why)

    def build(out: Path) -> None:
        t0 = time.perf_counter()
        hf = quantize_model(model, recipe, calib, log=log) if recipe.needs_calibration else load_export_model(model)
        export_hf(hf, out, tokenizer_from=model.hf_dir, expect=(recipe.quant_algo, recipe.kv_algo))
        if log:
            log(f"exported {recipe.label} (Hugging Face format) in {time.perf_counter() - t0:.1f} s: {out}")

    return cached_build(hf_export_dir(model, recipe, calib), build, need=fp16_bytes(model), log=log)


# -- reader -------------------------------------------------------------------------------------------------
def _fp8_rescale(weight: torch.Tensor, scale: torch.Tensor, target: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # As FP8QDQLinearMethod.rescale_fused_weights: to the model dtype, × own scale, ÷ shared max, back to FP8.
    return weight.to(dtype).mul_(scale).div_(target).to(torch.float8_e4m3fn)


def load_hf_export(folder: Path, *, device: str = "cpu"):
    """A ModelOpt HF export (every format of :data:`READABLE_ALGOS`, FP8 KV cache, excluded modules) as a TRT-LLM
    :class:`~quant.checkpoint.Checkpoint` the PyTorch runtime can execute; UserError for anything else. ``device``:
    where the tensors are read to (a GPU runtime reads them straight into device memory)."""
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    try:
        hf = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"export {folder}: config.json is unreadable ({exc})") from None
    if "LlamaForCausalLM" not in (hf.get("architectures") or []):
        raise UserError(f"export {folder}: architectures {hf.get('architectures')!r}; only LlamaForCausalLM is read")
    quant = hf_quantization(folder)
    algo, kv_algo = quant.get("quant_algo"), quant.get("kv_cache_quant_algo")
    if algo not in READABLE_ALGOS:
        raise UserError(f"export {folder}: the PyTorch runtime does not read {algo} Hugging Face exports "
                        f"(it reads {', '.join(a for a in READABLE_ALGOS if a)} and fp16)")
    if kv_algo not in (None, "FP8"):
        raise UserError(f"export {folder}: KV cache {kv_algo} is not read from a Hugging Face export (FP8 is; "
                        f"{HF_KV_REASON})")
    files = sorted(folder.glob("model*.safetensors"))
    raw: dict[str, torch.Tensor] = {}
    try:
        for f in files:
            with safe_open(str(f), framework="pt", device=device) as fh:
                # aligned(): safetensors' 8-byte offsets crash the AVX-512 int8 kernel (see quant.checkpoint).
                raw.update({k: aligned(fh.get_tensor(k)) for k in fh.keys()})
    except torch.cuda.OutOfMemoryError:
        raise UserError(f"out of GPU memory loading export {folder} onto {device}") from None
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise UserError(f"export {folder}: unreadable safetensors ({exc})") from None

    group_size = quant.get("group_size")
    if algo in formats.INT4_ALGOS and not group_size:  # config.json's block alone omits it: read it off the shapes
        name = next((k for k in sorted(raw) if k.endswith(".weight_scale") and raw[k].dim() == 2), None)
        if name is not None and name.removesuffix("_scale") in raw:
            group_size = raw[name.removesuffix("_scale")].shape[1] // raw[name].shape[1]
    config = trtllm_config(hf, algo, kv_algo, group_size)
    act = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}.get(config["dtype"])
    if act is None:
        raise UserError(f"export {folder}: dtype {config['dtype']!r} is not float16/bfloat16/float32")
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        if name not in raw:
            raise UserError(f"export {folder} is incomplete: tensor {name} is missing")
        used.add(name)
        return raw[name]

    def scalar(t: torch.Tensor) -> torch.Tensor:
        return t.float().reshape(())

    tensors = {"transformer.vocab_embedding.weight": take("model.embed_tokens.weight"),
               "transformer.ln_f.weight": take("model.norm.weight")}
    if "lm_head.weight" in raw:
        tensors["lm_head.weight"] = take("lm_head.weight")
    else:
        config["share_embedding_table"] = True
    layer_algos: dict[str, str | None] = {}
    excluded = []
    for i in range(config["num_hidden_layers"]):
        p, t = f"model.layers.{i}.", f"transformer.layers.{i}."
        tensors[t + "input_layernorm.weight"] = take(p + "input_layernorm.weight")
        tensors[t + "post_layernorm.weight"] = take(p + "post_attention_layernorm.weight")
        if kv_algo == "FP8":
            # TensorRT-LLM's PyTorch backend loads k_scale/v_scale (amax/448) but runs an FP8 KV cache with scale
            # 1.0 (docs/serving.md); so does this reader. The TRT-LLM-checkpoint export writes max(k, v), each
            # clamped to >= 1: 1.0 too unless an amax exceeds 448.
            take(p + "self_attn.k_proj.k_scale"), take(p + "self_attn.v_proj.v_scale")
            tensors[t + "attention.kv_cache_scaling_factor"] = torch.ones(1)
        parts = {lin: [take(p + m + ".weight") for m in mods] for lin, mods in HF_MODULES.items()}
        for lin, weights in parts.items():
            quantized = {w.dtype not in (torch.float16, torch.bfloat16, torch.float32) for w in weights}
            if len(quantized) != 1:
                raise UserError(f"export {folder}: layer {i} {lin} mixes quantized and unquantized parts")
            layer_algos[f"layers.{i}.{lin}"] = algo if quantized.pop() else None
            if layer_algos[f"layers.{i}.{lin}"] is None and algo is not None:
                excluded.append(f"transformer.layers.{i}.{lin}")

        def extra(lin: str, suffix: str) -> list[torch.Tensor]:
            return [take(p + m + "." + suffix) for m in HF_MODULES[lin]]

        def optional(lin: str, suffix: str) -> list[torch.Tensor]:
            return [take(p + m + "." + suffix) for m in HF_MODULES[lin] if p + m + "." + suffix in raw]

        def one(lin: str, suffix: str, values: list[torch.Tensor]) -> torch.Tensor:
            """The tensor every part of a fused linear carries equal (ModelOpt syncs them); else a UserError."""
            if any(not torch.equal(values[0], x) for x in values[1:]):
                raise UserError(f"export {folder}: layer {i} {lin} parts have different {suffix}")
            return values[0]

        fp8_target = {}
        if algo == "FP8":
            for group in FP8_FUSED:
                live = [lin for lin in group if layer_algos[f"layers.{i}.{lin}"] == "FP8"]
                if live:
                    scales = torch.stack([scalar(s) for lin in live for s in extra(lin, "weight_scale")])
                    inputs = torch.stack([scalar(s) for lin in live for s in extra(lin, "input_scale")])
                    for lin in live:
                        fp8_target[lin] = (scales.max(), inputs.max())
        for lin, weights in parts.items():
            key = t + lin + "."
            lin_algo = layer_algos[f"layers.{i}.{lin}"]
            if lin_algo is None:
                tensors[key + "weight"] = torch.cat(weights) if len(weights) > 1 else weights[0]
            elif lin_algo == "W8A16":
                tensors[key + "weight"] = torch.cat(weights)
                tensors[key + "weights_scaling_factor"] = torch.cat([s.reshape(-1) for s in extra(lin, "weight_scale")])
            elif lin_algo == "W8A8_SQ_PER_CHANNEL":
                tensors[key + "weight"] = torch.cat(weights)
                tensors[key + "weights_scaling_factor"] = torch.cat([s.reshape(-1) for s in extra(lin, "weight_scale")])
                tensors[key + "prequant_scaling_factor"] = one(lin, "pre_quant_scale", extra(lin, "pre_quant_scale"))
                tensors[key + "activation_scaling_factor"] = torch.stack(
                    [scalar(s) for s in extra(lin, "input_scale")]).max().reshape(1)
            elif lin_algo in formats.INT4_ALGOS:
                # uint8 [out/2, in], two INT4 per byte along out (ModelOpt's pack_int4_in_uint8, the TRT-LLM
                # checkpoint's layout, stored there as int8): q/k/v and gate/up stack along out as stored.
                tensors[key + "weight"] = torch.cat([w.view(torch.int8) for w in weights])
                tensors[key + "weights_scaling_factor"] = torch.cat(extra(lin, "weight_scale"))
                # AWQ's pre-quant scales of q/k/v and gate/up are folded into the RMSNorm weights by the export,
                # so only o_proj/down_proj carry one; GPTQ's carry none. Absent = 1.
                pre = optional(lin, "pre_quant_scale")
                if pre and len(pre) != len(weights):
                    raise UserError(f"export {folder}: layer {i} {lin} has pre_quant_scale on some parts only")
                if pre:
                    tensors[key + "prequant_scaling_factor"] = one(lin, "pre_quant_scale", pre)
                if lin_algo == "W4A8_AWQ":
                    tensors[key + "weights_scaling_factor_2"] = one(
                        lin, "weight_scale_2", [scalar(s) for s in extra(lin, "weight_scale_2")]).reshape(1)
                    tensors[key + "activation_scaling_factor"] = torch.stack(
                        [scalar(s) for s in extra(lin, "input_scale")]).max().reshape(1)
            elif lin in fp8_target:  # FP8, fused in TRT-LLM's PyTorch backend: one rescaled weight, max scales
                w_max, in_max = fp8_target[lin]
                tensors[key + "weight"] = torch.cat([_fp8_rescale(w, scalar(s), w_max, act)
                                                     for w, s in zip(weights, extra(lin, "weight_scale"))])
                tensors[key + "weights_scaling_factor"] = w_max.reshape(1)
                tensors[key + "activation_scaling_factor"] = in_max.reshape(1)
            else:  # FP8, a plain linear (o_proj, down_proj): loaded as stored
                tensors[key + "weight"] = weights[0]
                tensors[key + "weights_scaling_factor"] = scalar(extra(lin, "weight_scale")[0]).reshape(1)
                tensors[key + "activation_scaling_factor"] = scalar(extra(lin, "input_scale")[0]).reshape(1)
    config["quantization"]["exclude_modules"] = excluded
    left = sorted(set(raw) - used)
    if left:
        raise UserError(f"export {folder}: tensors this reader does not map: {', '.join(left[:4])}"
                        f"{' …' if len(left) > 4 else ''}")
    expected = formats.expected_tensors(config, layer_algos)
    problems = [n for n in expected if n not in tensors and not expected[n].optional]
    problems += [f"{n} {list(x.shape)}/{str(x.dtype).removeprefix('torch.')}" for n, x in tensors.items()
                 if n not in expected or not expected[n].shape_ok(tuple(x.shape)) or x.dtype not in expected[n].dtypes]
    if problems:
        raise UserError(f"export {folder} does not convert to a valid checkpoint: {', '.join(problems[:4])}")
    return Checkpoint(path=folder, config=config, tensors=tensors, layer_algos=layer_algos)
