"""One small handler per checkpoint format: load the stored tensors once, then a one-line forward.

``make_linear(algo, tensors, ...)`` picks the handler for a layer's ``quant_algo``. Each handler also says
whether its forward is a real low-precision kernel or an exact emulation, so latency reports can label it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from quant.errors import UserError


class DenseLinear:
    """FP16/BF16 checkpoint weights, computed in the runtime's compute dtype."""

    kernel = "dense"
    emulated = False

    def __init__(self, tensors: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device):
        self.weight = tensors["weight"].to(device=device, dtype=dtype).contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight


HANDLERS: dict[str | None, type] = {None: DenseLinear}


def make_linear(algo: str | None, tensors: dict[str, torch.Tensor], *, dtype: torch.dtype,
                device: torch.device, group_size: int = 128):
    handler = HANDLERS.get(algo)
    if handler is None:
        raise UserError(f"the PyTorch runtime has no kernel for quant_algo {algo!r}")
    if algo is None:
        return handler(tensors, dtype, device)
    return handler(tensors, dtype, device, group_size=group_size)
