"""Preallocated KV caches: one in the compute dtype, one stored as INT8/FP8 the way TensorRT-LLM stores it.

Both share ``update(layer, start, k, v) -> (k_all, v_all)``: store k/v [B, H, T, D] at slots start..start+T-1 and
return every slot up to there in the compute dtype.

Quantized cache numerics (TensorRT-LLM, ``kv_cache_quant_algo`` INT8/FP8; one per-layer float32 scale
``attention.kv_cache_scaling_factor``, a dequantization multiplier; ModelOpt 0.47 writes it as max(k, v) scale):
stored = convert(x · (1/scale)) — TRT-LLM multiplies by the reciprocal it precomputes in float32
(``kv_cache_rcp_scaling_factor``); INT8 rounds half-to-even and saturates to [-128, 127], FP8 E4M3 saturates to
±448 then rounds to nearest even; read = float32(stored) · scale, cast to the compute dtype. Storage is real
int8/float8 (1 byte per element); attention then runs on the dequantized copy in the compute dtype, which
TRT-LLM's kernels avoid by dequantizing in registers — so this cache is labelled "dequantize on read". On CUDA
the decode step writes and reads the stored bytes directly in Triton kernels with the same formulas
(:func:`quant.runtime.cuda_kernels.rope_cache_write`, :class:`~quant.runtime.cuda_kernels.DecodeAttention`).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from quant.errors import UserError

KV_STORAGE = {"INT8": torch.int8, "FP8": torch.float8_e4m3fn}


class KVCache:
    """Preallocated K/V for all layers: [layers, batch, kv_heads, max_len, head_dim]."""

    def __init__(self, layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (layers, batch, kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v [B, H, T, D] at slots start..start+T-1; return all slots up to there."""
        end = start + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.read(layer, end)

    def read(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots 0..end-1 of one layer in the compute dtype (views here)."""
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


class QuantizedKVCache(KVCache):
    """K/V stored as int8 or float8_e4m3fn with one scale per layer; dequantized to the compute dtype on read."""

    def __init__(self, layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, *, algo: str, scales: Sequence[torch.Tensor]):
        if algo not in KV_STORAGE:
            raise UserError(f"kv_cache_quant_algo {algo!r} is not supported (supported: {', '.join(KV_STORAGE)})")
        if len(scales) != layers:
            raise UserError(f"quantized KV cache needs one scale per layer ({layers}), got {len(scales)}")
        scale = torch.stack([torch.as_tensor(s).reshape(()) for s in scales]).to(device=device, dtype=torch.float32)
        if not bool(torch.isfinite(scale).all()) or bool((scale <= 0).any()):
            raise UserError(f"kv_cache_scaling_factor must be finite and > 0, got {scale.tolist()}")
        self.algo, self.dtype, self.scale = algo, dtype, scale
        self.rcp = 1.0 / scale  # float32, as TRT-LLM's kv_cache_rcp_scaling_factor
        shape = (layers, batch, kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=KV_STORAGE[algo], device=device)
        self.v = torch.zeros(shape, dtype=KV_STORAGE[algo], device=device)

    def quantize(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        x = x.float() * self.rcp[layer]
        if self.algo == "INT8":
            return torch.round(x).clamp_(-128, 127).to(torch.int8)
        return x.clamp_(-448.0, 448.0).to(torch.float8_e4m3fn)

    def dequantize(self, layer: int, stored: torch.Tensor) -> torch.Tensor:
        return (stored.float() * self.scale[layer]).to(self.dtype)

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.shape[2]
        self.k[layer, :, :, start:end] = self.quantize(layer, k)
        self.v[layer, :, :, start:end] = self.quantize(layer, v)
        return self.read(layer, end)

    def read(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.dequantize(layer, self.k[layer, :, :, :end]),
                self.dequantize(layer, self.v[layer, :, :, :end]))


def kv_cache_mode(algo: str | None, dtype: torch.dtype, device: torch.device | None = None) -> str:
    """What ``describe()`` reports: the storage dtype, and how attention reads it."""
    if algo is None:
        return str(dtype).removeprefix("torch.")
    if device is not None and torch.device(device).type == "cuda":
        # the decode kernel reads int8/fp8 and dequantizes in registers; prefill attends a dequantized copy
        return f"{algo.lower()} (read in-kernel at decode)"
    return f"{algo.lower()} (dequantize on read)"
