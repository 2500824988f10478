"""``W8A16``: int8 weights, per-channel scales; y = x @ (q · s[:, None])ᵀ."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from quant.runtime import cuda_ext
from quant.runtime.schemes.base import DEFAULT_KERNELS, KernelConfig, _cuda_kernels, _Handler


class W8A16Linear(_Handler):
    """INT8 per-channel weights, activations in the compute dtype: ``aten._weight_int8pack_mm``."""

    def __init__(self, tensors, dtype, device, *, kernels: KernelConfig = DEFAULT_KERNELS,
                 **_):
        super().__init__(dtype, device, kernels)
        self.weight = tensors["weight"].to(device).contiguous()  # int8 [out, in]
        # The kernel wants the scales in x's dtype (TRT-LLM's weight-only GEMM also holds them in the model dtype).
        self.scale = tensors["weights_scaling_factor"].to(device=device, dtype=dtype).reshape(-1).contiguous()
        self.kernel, self.emulated = ("int8pack_mm", False) if self.native else ("emulated-int8", True)
        if self.cuda:
            self.kernel, self.emulated = "triton-w8a16", False
            if kernels.w8g_rows is not None and cuda_ext.w8g_ok(self.weight.shape[1], dtype):
                built = cuda_ext.load()
                if isinstance(built, str):
                    self.gemv_unavailable = built
                else:
                    self.w8g_rows, self.w8g_tile = kernels.w8g_rows, kernels.w8g_tile or cuda_ext.W8G_TILE
                    self.kernel = "w8g-cuda|" + self.kernel

    algo_key = "W8A16"
    w8g_rows = None  # rows the compiled GEMV takes, when built

    def _w8g_takes(self, rows: int) -> bool:
        return self.w8g_rows is not None and self.w8g_rows[0] <= rows <= self.w8g_rows[1]

    def _w8g(self, x, norm, eps, silu, residual=None):
        return cuda_ext.w8a16_gemv(self._prep(x, norm, eps, silu), self.weight, self.scale, residual=residual,
                                   tile=self.w8g_tile)

    def _mm(self, x):
        if self.native:
            return torch.ops.aten._weight_int8pack_mm(x.contiguous(), self.weight, self.scale)
        return (F.linear(x.float(), self.weight.float()) * self.scale.float()).to(self.dtype)

    def _gemv(self, x, *, norm, eps, silu, residual):
        if self._w8g_takes(1):
            return self._w8g(x, norm, eps, silu, residual)
        ck = _cuda_kernels()
        return self._ck_gemv(x, self.weight, wfmt=ck.W_INT8, wscale=self.scale, scale_mode=ck.S_CHANNEL, norm=norm,
                             eps=eps, silu=silu, residual=residual)

    def _mm_cuda(self, x, *, norm, eps, silu):
        if self._w8g_takes(x.shape[0]):
            return self._w8g(x, norm, eps, silu)
        ck = _cuda_kernels()
        x = self._prep(x, norm, eps, silu)
        if x.shape[0] <= ck.WQ_MM_MAX_M and self.dtype != torch.float32:
            return ck.wq_mm(x, self.weight, self.scale, wfmt=ck.W_INT8)
        # prefill: one GEMM on the weight dequantized to the compute dtype (TRT-LLM's weight-only GEMM also
        # dequantizes before the MMA). Scaling after the GEMM overflows float16: x · q is 1/scale (~10³) times y.
        return F.linear(x, ck.dequant_int8(self.weight, self.scale, self.dtype))

    def _held(self):
        return self.weight, self.scale

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight.float() * self.scale.float()[:, None]
