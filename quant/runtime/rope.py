"""RoPE as TRT-LLM's ``rope_gpt_neox`` computes it, with ``rotary_base`` and ``rotary_scaling`` from config.json."""
from __future__ import annotations

import math

import torch

from quant.errors import UserError


def inv_freq(head_dim: int, base: float, scaling: dict | None) -> torch.Tensor:
    """Per-pair inverse frequencies (float32), with linear or Llama-3 scaling applied."""
    freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    kind = None if not scaling else scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default", "none"):
        pass
    elif kind == "linear":
        freq = freq / float(scaling["factor"])
    elif kind == "llama3":
        # Same formula as TRT-LLM's RopeEmbeddingUtils (llama3) and HF's _compute_llama3_parameters.
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / freq
        scaled = torch.where(wavelen > old_len / low, freq / factor, freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        freq = torch.where(medium, smoothed, scaled)
    else:
        raise UserError(f"rotary_scaling type {kind!r} is not supported by the PyTorch runtime (none, linear, llama3)")
    return freq.to(torch.float32)


def cos_sin(positions: torch.Tensor, freq: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [B, 1, T, head_dim] for integer ``positions`` [B, T] (computed in float32)."""
    angles = positions.to(torch.float32)[..., None] * freq.to(positions.device)
    emb = torch.cat((angles, angles), dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
