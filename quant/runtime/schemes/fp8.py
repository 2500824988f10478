"""``FP8``: E4M3 weights and activations, per-tensor scales; ``torch._scaled_mm`` or the Triton GEMV."""
from __future__ import annotations

import torch

from quant.runtime.schemes.base import (DEFAULT_KERNELS, FP8_E4M3, FP8_MAX, KernelConfig, _cuda_kernels, _Handler,
                                        _round_up)


class FP8Linear(_Handler):
    """FP8 E4M3 weights and activations, per-tensor scales: ``torch._scaled_mm``."""

    def __init__(self, tensors, dtype, device, *, kernels: KernelConfig = DEFAULT_KERNELS,
                 **_):
        super().__init__(dtype, device, kernels)
        self.out = tensors["weight"].shape[0]
        if self.cuda:
            # cuBLASLt FP8 wants B column-major: a view of the contiguous [out, in] weight (the GEMV reads rows). It
            # also wants out-features in multiples of 16: other shapes get, once, a copy padded with zero rows for it.
            self.weight = tensors["weight"].to(device).contiguous()
            self.weight_t = self.weight.t()
            if self.out % 16:
                padded = torch.zeros(_round_up(self.out, 16), self.weight.shape[1], dtype=FP8_E4M3, device=device)
                padded[: self.out] = self.weight
                self.weight_t = padded.t()
        else:
            self.weight_t = tensors["weight"].to(device).t().contiguous()  # float8_e4m3fn [in, out]
        self.weight_scale = tensors["weights_scaling_factor"].to(device=device, dtype=torch.float32).reshape(())
        self.act_scale = tensors["activation_scaling_factor"].to(device=device, dtype=torch.float32).reshape(())
        # Off CUDA: the numbers of ATen's CPU _scaled_mm, by the float32 upcast it does itself where it does not
        # hand the GEMM to oneDNN (bit for bit: tests/test_kernels.py). oneDNN takes it on AMX CPUs, which have no
        # FP8 units: its reference matmul took 4.2 s where the upcast took 0.03 s (160 x 576 x 1536, Xeon with
        # AMX, 2026-12-05), and the suite's FP8 tests ran for tens of minutes.
        self.kernel, self.emulated = ("scaled_mm" if self.native else "emulated-fp8"), True
        if self.cuda:
            self.kernel, self.emulated = "triton-fp8-gemv|scaled_mm", False
            self.out_scale = (self.act_scale * self.weight_scale).reshape(1).contiguous()
            self._setup_w8g(self.weight.shape[1], self.out_scale)

    algo_key = "FP8"
    shared_inputs = ("activation_scaling_factor", "weights_scaling_factor")
    own_prologue = True
    input_afmt = 2
    prequant: torch.Tensor | None = None  # W4A8_AWQ: AWQ's per-in-feature scale, applied before quantization

    def _gemv(self, x, *, norm, eps, silu, residual, **then):
        ck = _cuda_kernels()
        if not self.kernels.fuse_prologue or self.prequant is not None or self.w8g or x.dtype == FP8_E4M3:
            # quantize, then fp8 × fp8 (e4m3 x: quantized by the previous linear's epilogue, input_quant)
            qx = self._prep(x, norm, eps, silu, prequant=self.prequant, act_scale=self.act_scale.reshape(1),
                            afmt=ck.A_FP8)
            if self.w8g:
                return self._w8g_gemv(qx, residual, eps, **then)
            return self._ck_gemv(qx, self.weight, wfmt=ck.W_FP8, wscale=self.out_scale, scale_mode=ck.S_SCALAR,
                                 residual=residual, out_dtype=self.dtype, **then)
        return self._ck_gemv(x, self.weight, wfmt=ck.W_FP8, afmt=ck.A_FP8, act_scale=self.act_scale.reshape(1),
                             wscale=self.out_scale, scale_mode=ck.S_SCALAR, norm=norm, eps=eps, silu=silu,
                             residual=residual, **then)

    def _mm_cuda(self, x, *, norm, eps, silu):
        ck = _cuda_kernels()
        M = x.shape[0]
        qx = self._prep(x, norm, eps, silu, prequant=self.prequant, act_scale=self.act_scale.reshape(1),
                        afmt=ck.A_FP8, rows=_round_up(M, 16))
        if qx.shape[1] % 16:  # in-features cuBLASLt cannot take (x would need padding at every call): upcast
            return self._mm_upcast(qx)[:M]
        y = torch._scaled_mm(qx, self.weight_t, scale_a=self.act_scale, scale_b=self.weight_scale,
                             out_dtype=self.dtype, use_fast_accum=self.kernels.fp8_fast_accum)
        return y[:M, : self.out]

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.prequant is not None:
            x = x * self.prequant
        return (x.float() / self.act_scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_E4M3)

    def _mm(self, x):
        return self._mm_upcast(self.quantize_input(x))

    def _mm_upcast(self, qx):
        y = (qx.float() * self.act_scale) @ (self.weight_t.float() * self.weight_scale)
        return y[:, : self.out].to(self.dtype)

    def _held(self):
        return self.weight_t, self.weight_scale, self.act_scale

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight_t.t()[: self.out].float() * self.weight_scale
