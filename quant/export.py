"""Recipe + model → TensorRT-LLM checkpoint, through ModelOpt, with ModelOpt 0.47's gaps corrected.

The folder is written atomically: it appears only after ModelOpt finished, config.json was corrected and the
validator accepted it. Caching by recipe lives in :mod:`quant.apply`.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch

from quant import faults, formats, quiet
from quant.atomic import atomic_dir, atomic_write_json
from quant.checkpoint import validate_checkpoint
from quant.memory import free_bytes
from quant.model_source import ResolvedModel

EXPORT_DTYPE = torch.float16


def rotary_fields(hf_config) -> dict:
    """``rotary_base``/``rotary_scaling`` as TRT-LLM's LLaMAConfig reads them.

    transformers 5 moved ``rope_theta``/``rope_scaling`` into ``rope_parameters``; ModelOpt 0.47 still reads
    the old attributes, so it drops both and a built engine would use TRT-LLM's default base 10000.
    """
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    base = params.pop("rope_theta", None) or getattr(hf_config, "rope_theta", None) or 10000.0
    legacy = getattr(hf_config, "rope_scaling", None)
    if not params and isinstance(legacy, dict):
        params = dict(legacy)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type in (None, "default"):
        scaling = None
    else:
        # TRT-LLM accepts HF's dict as is; it reads "type" (older) or "rope_type" (newer), so write both.
        scaling = {**params, "type": rope_type, "rope_type": rope_type}
    return {"rotary_base": float(base), "rotary_scaling": scaling}


def trtllm_config(hf: dict, quant_algo: str | None, kv_algo: str | None, group_size: int | None) -> dict:
    """The TRT-LLM checkpoint config.json of an HF LLaMa config.json under a format (the fields the validator
    and the runtime read): the reader of HF exports builds its checkpoint from it, a build bounds its size.
    ``exclude_modules`` is left empty for the caller."""
    heads = hf["num_attention_heads"]
    params = {k: v for k, v in hf.items() if k in ("rope_parameters", "rope_theta", "rope_scaling")}
    return {
        "architecture": "LlamaForCausalLM",
        "dtype": hf.get("dtype") or hf.get("torch_dtype") or "float16",
        "num_hidden_layers": hf["num_hidden_layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": hf.get("num_key_value_heads") or heads,
        "hidden_size": hf["hidden_size"],
        "intermediate_size": hf["intermediate_size"],
        "vocab_size": hf["vocab_size"],
        "head_size": hf.get("head_dim") or hf["hidden_size"] // heads,
        "max_position_embeddings": hf.get("max_position_embeddings"),
        "norm_epsilon": hf.get("rms_norm_eps", 1e-6),
        "tie_word_embeddings": bool(hf.get("tie_word_embeddings", False)),
        **rotary_fields(SimpleNamespace(**params)),
        "mapping": {"world_size": 1, "tp_size": 1, "pp_size": 1},
        # pre_quant_scale false: INT4 linears carry one where the export kept it (quant.hf_checkpoint says why).
        "quantization": {"quant_algo": quant_algo, "kv_cache_quant_algo": kv_algo, "exclude_modules": [],
                         **({"group_size": group_size, "pre_quant_scale": False}
                            if quant_algo in formats.INT4_ALGOS else {})},
    }


def fix_config(folder: Path, hf_config) -> None:
    path = Path(folder) / "config.json"
    config = json.loads(path.read_text())
    config.update(rotary_fields(hf_config))
    quant = config.get("quantization") or {}
    if quant.get("pre_quant_scale") and not _has_prequant(Path(folder) / "rank0.safetensors"):
        # GPTQ: ModelOpt writes pre_quant_scale true for every INT4 export, but its linears have no pre-quant
        # scale; TensorRT-LLM's builder would then expect one per linear.
        quant["pre_quant_scale"] = False
    atomic_write_json(path, config)


def _has_prequant(path: Path) -> bool:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return any(k.endswith(".prequant_scaling_factor") for k in fh.keys())


def export_checkpoint(model: torch.nn.Module, out_dir: Path) -> Path:
    """Export an (optionally ModelOpt-quantized) HF LLaMa to a validated TRT-LLM checkpoint at ``out_dir``."""
    from modelopt.torch.export import export_tensorrt_llm_checkpoint

    with atomic_dir(out_dir, fault="checkpoint.rename") as tmp:
        # inference_tensor_parallel=1: its default 0 divides by zero when tensorrt_llm is not installed.
        with quiet.held("ModelOpt"):
            export_tensorrt_llm_checkpoint(
                model, decoder_type="llama", dtype=EXPORT_DTYPE, export_dir=tmp, inference_tensor_parallel=1
            )
        faults.point("checkpoint.export")  # crash test: ModelOpt's files written, not yet fixed or validated
        fix_config(tmp, model.config)
        validate_checkpoint(tmp)  # never publish a folder the validator rejects
    return out_dir


def load_hf_model(model: ResolvedModel, dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu") -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    # On a GPU the weights stream from the safetensors straight into device memory (device_map): an 8B model
    # never sits in host memory at float32 on its way there.
    on_gpu = torch.device(device).type == "cuda"
    hf = AutoModelForCausalLM.from_pretrained(model.hf_dir, dtype=dtype, trust_remote_code=False,
                                              **({"device_map": str(torch.device(device))} if on_gpu else {})).eval()
    return hf.to(device)


def calibration_device() -> torch.device:
    """Where calibration forwards (activation statistics, ModelOpt's calibration and AWQ search) run: the GPU when
    one is visible -- AWQ's grid search is minutes on a CPU and seconds on a GPU -- in float32 without TF32 (the
    PyTorch default), so the statistics match the CPU's up to float32 summation order. Results are cached without
    the device: a checkpoint calibrated on either is the same recipe."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


CALIB_ROWS = 4  # rows per calibration forward where memory allows


def calibration_row_bytes(config, seq_len: int) -> int:
    """An upper estimate of one calibration row's float32 activations: one layer's transients (hidden states,
    q/k/v, the MLP's three intermediates), the attention scores, the logits — doubled for the allocator's slack.
    ~120 MB at the default model's 256 tokens, ~4 GB at Llama-3-8B's 2048."""
    h, heads = config.hidden_size, config.num_attention_heads
    kv = (getattr(config, "num_key_value_heads", None) or heads) * (getattr(config, "head_dim", None) or h // heads)
    return 2 * 4 * (seq_len * (4 * h + 2 * kv + 3 * config.intermediate_size + config.vocab_size)
                    + heads * seq_len ** 2)


def calibration_batch_size(config, seq_len: int, free: int, wanted: int = CALIB_ROWS) -> int:
    """Rows per calibration forward: ``wanted``, fewer where half of ``free`` bytes would not hold them
    (:func:`calibration_row_bytes`), never fewer than 1. A machine with room calibrates exactly as before; a tight
    one takes fewer rows at a time (the same statistics up to float32 summation order) instead of running out of
    memory (TRT-LLM#288, llm-compressor#2039)."""
    return int(max(1, min(wanted, free // 2 // calibration_row_bytes(config, seq_len))))


def calibration_rows(model: torch.nn.Module, batches: torch.Tensor) -> int:
    """:func:`calibration_batch_size` for an HF ``model`` (its config, the free memory where its weights are)
    over ``batches``."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return calibration_batch_size(model.config, batches.shape[1], free_bytes(device))


def forward_loop(batches: torch.Tensor, batch_size: int = CALIB_ROWS) -> Callable[[torch.nn.Module], None]:
    """``loop(model)`` running the model over the rows under ``torch.no_grad()`` (ModelOpt's ``forward_loop``)."""
    if batches.dim() != 2 or batches.numel() == 0:
        raise ValueError(f"calibration batches must be a non-empty [rows, seq_len] tensor, got {tuple(batches.shape)}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")

    def loop(model: torch.nn.Module) -> None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        kwargs = {"use_cache": False} if hasattr(model, "config") else {}  # a HF model: no KV cache to build
        with torch.no_grad():
            for start in range(0, batches.shape[0], batch_size):
                model(input_ids=batches[start : start + batch_size].to(device), **kwargs)

    return loop
