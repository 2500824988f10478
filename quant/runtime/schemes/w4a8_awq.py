"""``W4A8_AWQ``: group-wise INT4 weights held as FP8, FP8 activations, AWQ pre-quant scale; runs as :mod:`.fp8`.

What the format means (ModelOpt's W4A8 quantizer, TensorRT-LLM's W4A8 kernels): the INT4 weight ``q`` times its
group scale ``s`` is quantized once more to FP8 E4M3 with the per-tensor ``weights_scaling_factor_2`` (amax/448),
and the activations, after the pre-quant scale, to FP8 with ``activation_scaling_factor``:
``y = (fp8(x·pre / a) · fp8(q·s / s2)ᵀ) · a · s2``. Here the FP8 weight is formed once at load and the FP8 scheme
runs it (``torch._scaled_mm`` / the FP8 GEMV on CUDA): exact numerics, but 8-bit weight bytes — a W4A8 kernel that
reads the INT4 bytes is the kernels issue's work.
"""
from __future__ import annotations

import torch

from quant.errors import UserError
from quant.runtime.schemes.base import DEFAULT_KERNELS, FP8_E4M3, FP8_MAX, KernelConfig, unpack_int4_rows
from quant.runtime.schemes.fp8 import FP8Linear


def w4a8_fp8_weight(packed: torch.Tensor, scales: torch.Tensor, scale_2: torch.Tensor) -> torch.Tensor:
    """int8 [out/2, in] INT4 pairs, scales [out, in/group], scalar scale_2 → float8_e4m3fn [out, in] = fp8(q·s/s2),
    with s/s2 rounded to float16 first, as TensorRT-LLM's loader stores it (W4A8_AWQ_LinearMethod: "for FP8
    activation, scales needs to be float16")."""
    q = unpack_int4_rows(packed).float()
    group = q.shape[1] // scales.shape[1]
    s = (scales.float() / scale_2.float().reshape(())).half().float()
    return (q * s.repeat_interleave(group, dim=1)).clamp_(-FP8_MAX, FP8_MAX).to(FP8_E4M3)


class W4A8AWQLinear(FP8Linear):
    def __init__(self, tensors, dtype, device, *, group_size: int = 128, kernels: KernelConfig = DEFAULT_KERNELS,
                 **_):
        packed, scales = tensors["weight"], tensors["weights_scaling_factor"]
        out, inp = packed.shape[0] * 2, packed.shape[1]
        if scales.shape[0] != out or inp % scales.shape[1] or inp // scales.shape[1] != group_size:
            raise UserError(f"W4A8_AWQ scales of shape {list(scales.shape)} do not fit a weight of [{out}, {inp}] "
                            f"in groups of {group_size}")
        scale_2 = tensors["weights_scaling_factor_2"].float().reshape(1)
        super().__init__({"weight": w4a8_fp8_weight(packed, scales, scale_2), "weights_scaling_factor": scale_2,
                          "activation_scaling_factor": tensors["activation_scaling_factor"]},
                         dtype, device, kernels=kernels)
        self.kernel = f"fp8-from-int4|{self.kernel}"
        pre = tensors.get("prequant_scaling_factor")
        self.prequant = None if pre is None else pre.to(device=device, dtype=dtype).contiguous()

    algo_key = "FP8"  # the FP8 kernels and their tuned tables run it
    shared_inputs = ("activation_scaling_factor", "weights_scaling_factor_2", "prequant_scaling_factor")

    def _held(self):
        return (*super()._held(), *(() if self.prequant is None else (self.prequant,)))
