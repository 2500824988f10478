"""The format registry: ``quant_algo`` → the handler of :mod:`quant.runtime.schemes` that loads and runs it.

A new weight format is one file in ``quant/runtime/schemes/`` (load the stored tensors, a forward, the dequantized
weight) and one entry here.
"""
from __future__ import annotations

import torch

from quant.errors import UserError
from quant.runtime.schemes.base import DEFAULT_KERNELS, KernelConfig
from quant.runtime.schemes.dense import DenseLinear
from quant.runtime.schemes.fp8 import FP8Linear
from quant.runtime.schemes.w4a8_awq import W4A8AWQLinear
from quant.runtime.schemes.w4a16_awq import W4A16AWQLinear
from quant.runtime.schemes.w8a8_sq import W8A8SQLinear
from quant.runtime.schemes.w8a16 import W8A16Linear

HANDLERS: dict[str | None, type] = {
    None: DenseLinear,
    "W8A16": W8A16Linear,
    "W8A8_SQ_PER_CHANNEL": W8A8SQLinear,
    "W4A16_AWQ": W4A16AWQLinear,
    "W4A8_AWQ": W4A8AWQLinear,
    "FP8": FP8Linear,
}


def concat_linear_tensors(algo: str | None, parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor] | None:
    """One linear's tensors for several that read the same input (fc and gate): weights and per-channel scales
    stacked along out. None where the input side differs (pre-quant or activation scales; FP8 weight scales),
    so the two must stay separate linears."""
    first = parts[0]
    if algo not in HANDLERS:
        return None
    shared = HANDLERS[algo].shared_inputs
    for p in parts[1:]:
        if set(p) != set(first) or any(not torch.equal(p[k], first[k]) for k in shared if k in first):
            return None
    return {k: first[k] if k in shared else torch.cat([p[k] for p in parts], dim=0) for k in first}


def make_linear(algo: str | None, tensors: dict[str, torch.Tensor], *, dtype: torch.dtype,
                device: torch.device, group_size: int = 128, kernels: KernelConfig = DEFAULT_KERNELS):
    handler = HANDLERS.get(algo)
    if handler is None:
        raise UserError(f"the PyTorch runtime has no kernel for quant_algo {algo!r}")
    return handler(tensors, dtype, device, group_size=group_size, kernels=kernels)
