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
            self._setup_w8g(self.weight.shape[1], self.scale)
            self.cvt = int(kernels.wq_cvt and dtype == torch.float16)
            self._setup_wq_wide()
            out, inp = self.weight.shape
            self.cutlass = self._cutlass_takes(out, inp, inp, 8)  # (one scale a channel: a group of K)
            if self.cutlass:
                self.kernel = "cutlass-prefill|" + self.kernel

    algo_key = "W8A16"
    cutlass = False  # prefill through cuda_ext.wq_gemm (KernelConfig.wq_prefill_cutlass; CUDA)

    def _mm(self, x):
        if self.native:
            return torch.ops.aten._weight_int8pack_mm(x.contiguous(), self.weight, self.scale)
        return (F.linear(x.float(), self.weight.float()) * self.scale.float()).to(self.dtype)

    def _gemv(self, x, *, norm, eps, silu, residual, **then):
        if self.w8g:
            return self._w8g_gemv(self._prep(x, norm, eps, silu), residual, eps, **then)
        ck = _cuda_kernels()
        return self._ck_gemv(x, self.weight, wfmt=ck.W_INT8, wscale=self.scale, scale_mode=ck.S_CHANNEL, norm=norm,
                             eps=eps, silu=silu, residual=residual, **then)

    def _mm_cuda(self, x, *, norm, eps, silu):
        ck = _cuda_kernels()
        x = self._prep(x, norm, eps, silu)
        if self.dtype != torch.float32 and x.shape[0] <= ck.WQ_MM_MAX_M:
            return ck.wq_mm(x, self.weight, self.scale, wfmt=ck.W_INT8, cvt=self.cvt, counter=self.wq_counter)
        if self.cutlass and (y := self._cutlass_mm(x, self.weight, self.scale, 8, x.shape[1])) is not None:
            return y
        if self.dtype != torch.float32 and self.algo_key in self.kernels.wq_prefill:
            return ck.wq_prefill_mm(x, self.weight, self.scale, wfmt=ck.W_INT8, config=self.kernels.wq_prefill_tile,
                                    group_m=self.kernels.prefill_group, tma=self.kernels.wq_prefill_tma)
        # prefill: one GEMM on the weight dequantized to the compute dtype (TRT-LLM's weight-only GEMM also
        # dequantizes before the MMA). Scaling after the GEMM overflows float16: x · q is 1/scale (~10³) times y.
        return F.linear(x, self._prefill_weight())

    def prefill_shape(self) -> tuple[int, int] | None:
        return tuple(self.weight.shape) if self.cuda else None

    def prefill_dequant(self, out: torch.Tensor | None = None) -> torch.Tensor:
        return _cuda_kernels().dequant_int8(self.weight, self.scale, self.dtype, out=out)

    def _held(self):
        return self.weight, self.scale

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight.float() * self.scale.float()[:, None]
