"""fp16/bf16 weights: ``F.linear`` (CPU), cuBLAS or the Triton GEMV (CUDA)."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from quant.runtime.schemes.base import DEFAULT_KERNELS, KernelConfig, _cuda_kernels, _Handler


@functools.lru_cache(maxsize=1)
def bf16_gemm_is_native() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX). Without it (AVX2-only parts) oneDNN's
    bfloat16 GEMM is several times slower than float32 on the same shapes (docs/architecture.md, measured choices)."""
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    if amx is not None and amx():
        return True
    try:
        with open("/proc/cpuinfo") as fh:
            return any(line.startswith("flags") and " avx512_bf16" in line for line in fh)
    except OSError:
        return True  # unknown: keep the plain path


# Rows from which a bfloat16 dense GEMM on a CPU without native bfloat16 is computed in float32 (prefill); below
# it (decode) the bfloat16 GEMM reads half the bytes and is the faster one (measured: docs/architecture.md).
CPU_F32_GEMM_MIN_ROWS = 16


class DenseLinear(_Handler):
    """FP16/BF16 checkpoint weights, computed in the runtime's compute dtype."""

    kernel = "dense"
    emulated = False

    def __init__(self, tensors: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device, *,
                 kernels: KernelConfig = DEFAULT_KERNELS, **_):
        super().__init__(dtype, device, kernels)
        self.weight = tensors["weight"].to(device=device, dtype=dtype).contiguous()
        self._weight_f32 = None
        if self.cuda:
            self.kernel = "triton-gemv-fp|cublas"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.cuda and x.dim() == 2:
            return self.fused(x.contiguous())
        return self._mm(x)

    def _mm(self, x):
        """On a CPU without native bfloat16, many rows (prefill) go through a float32 copy of the weight: the same
        products (a bfloat16 x bfloat16 product is exact in float32) and float32 sums, as oneDNN's bfloat16 GEMM
        computes them, rounded to bfloat16 once; only the summation order differs. Costs a float32 copy of the
        weight in host memory."""
        if self.dtype == torch.bfloat16 and self.native and not bf16_gemm_is_native() and \
                x.numel() >= CPU_F32_GEMM_MIN_ROWS * x.shape[-1]:
            if self._weight_f32 is None:
                self._weight_f32 = self.weight.float()
            return F.linear(x.float(), self._weight_f32).to(self.dtype)
        return F.linear(x, self.weight)

    def _gemv(self, x, *, norm, eps, silu, residual, **then):
        ck = _cuda_kernels()
        return self._ck_gemv(x, self.weight, wfmt=ck.W_FLOAT, norm=norm, eps=eps, silu=silu, residual=residual, **then)

    def _mm_cuda(self, x, *, norm, eps, silu):
        return F.linear(self._prep(x, norm, eps, silu), self.weight)

    def _held(self):
        return (self.weight,)

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight
