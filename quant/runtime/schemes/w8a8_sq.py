"""``W8A8_SQ_PER_CHANNEL`` (SmoothQuant): int8 weights and per-tensor int8 activations; int8 × int8 → int32."""
from __future__ import annotations

import torch

from quant.runtime import cuda_ext
from quant.runtime.schemes.base import DEFAULT_KERNELS, KernelConfig, _cuda_kernels, _Handler, _round_up


class W8A8SQLinear(_Handler):
    """SmoothQuant W8A8 (static per-tensor activation scale): int8 × int8 → int32 ``torch._int_mm``."""

    def __init__(self, tensors, dtype, device, *, kernels: KernelConfig = DEFAULT_KERNELS,
                 **_):
        super().__init__(dtype, device, kernels)
        weight = tensors["weight"].to(device)  # int8 [out, in]
        if self.cuda:
            # cuBLASLt's fast int8 GEMM is A row-major × B column-major: the [in, out] operand is a view of the
            # contiguous [out, in] weight (which the Triton GEMV also reads row by row).
            self.weight = weight.contiguous()
            self.weight_t = self.weight.t()
        else:
            self.weight_t = weight.t().contiguous()  # int8 [in, out], what _int_mm takes as its right operand
        self.prequant = tensors["prequant_scaling_factor"].to(device=device, dtype=dtype).contiguous()
        self.act_scale = tensors["activation_scaling_factor"].to(device=device, dtype=torch.float32).reshape(1)
        self.weight_scale = tensors["weights_scaling_factor"].to(device=device, dtype=torch.float32).reshape(-1)
        self.out_scale = (self.act_scale * self.weight_scale).contiguous()  # float32 [out]
        self.kernel, self.emulated = ("int_mm", False) if self.native else ("emulated-int8-gemm", True)
        if self.cuda:
            self.kernel, self.emulated = "triton-w8a8", False
            self._setup_w8g(self.weight.shape[1], self.out_scale)
            self._setup_wq_wide()
            out, inp = self.weight.shape
            self.cutlass = (kernels.sq_prefill_gemm == "cutlass" and cuda_ext.sq_gemm_ok(out, inp, dtype)
                            and self._extension_built(cuda_ext.load_cutlass))
            if self.cutlass:
                self.kernel = "cutlass-prefill|" + self.kernel

    algo_key = "W8A8_SQ_PER_CHANNEL"
    cutlass = False  # prefill through cuda_ext.sq_gemm (KernelConfig.sq_prefill_gemm "cutlass"; CUDA, where built)
    shared_inputs = ("prequant_scaling_factor", "activation_scaling_factor")
    own_prologue = True
    input_afmt = 1

    def _gemv(self, x, *, norm, eps, silu, residual, **then):
        ck = _cuda_kernels()
        if not self.kernels.fuse_prologue or self.w8g or x.dtype == torch.int8:  # quantize once, then int8 × int8
            # (int8 x: quantized by the previous linear's epilogue, input_quant)
            qx = self._prep(x, norm, eps, silu, prequant=self.prequant, act_scale=self.act_scale, afmt=ck.A_INT8)
            if self.w8g:
                return self._w8g_gemv(qx, residual, eps, **then)
            return self._ck_gemv(qx, self.weight, wfmt=ck.W_INT8, afmt=ck.A_INT8_IN, wscale=self.out_scale,
                                 scale_mode=ck.S_CHANNEL, residual=residual, out_dtype=self.dtype, **then)
        return self._ck_gemv(x, self.weight, wfmt=ck.W_INT8, afmt=ck.A_INT8, prequant=self.prequant,
                             act_scale=self.act_scale, wscale=self.out_scale, scale_mode=ck.S_CHANNEL, norm=norm,
                             eps=eps, silu=silu, residual=residual, **then)

    def fused(self, x, *, norm=None, eps=1e-6, silu=False, residual=None, **then):
        if self.cuda and not self._takes_gemv(x.shape[0]):
            ck = _cuda_kernels()
            M = x.shape[0]
            if M <= ck.WQ_MM_MAX_M or self.kernels.sq_prefill_gemm != "int_mm":
                # int8 × int8 → int32 through tl.dot (or CUTLASS), (a · s) and the residual add fused into its
                # epilogue
                qx = self._prep(x, norm, eps, silu, prequant=self.prequant, act_scale=self.act_scale,
                                afmt=ck.A_INT8)
                if M > ck.WQ_MM_MAX_M and self.cutlass:
                    return cuda_ext.sq_gemm(qx, self.weight, self.out_scale, residual=residual)
                if M > ck.WQ_MM_MAX_M and self.kernels.sq_prefill_gemm == "tma" and ck.tma_ok(qx, self.weight):
                    return ck.i8_tma_mm(qx, self.weight, self.out_scale, dtype=self.dtype, residual=residual,
                                        config=self.kernels.sq_prefill_tile, group_m=self.kernels.prefill_group)
                return ck.wq_mm(qx, self.weight, self.out_scale, wfmt=ck.W_INT8, afmt=ck.A_INT8, dtype=self.dtype,
                                residual=residual, counter=self.wq_counter,
                                config=self.kernels.sq_prefill_tile if M > ck.WQ_MM_MAX_M else None,
                                group_m=self.kernels.prefill_group)
            # cuBLASLt int8 (more than 16 rows: pad to a multiple of 8, ≥ 32; padding rows are never read back)
            qx = self._prep(x, norm, eps, silu, prequant=self.prequant, act_scale=self.act_scale,
                            afmt=ck.A_INT8, rows=max(32, _round_up(M, 8)))
            return ck.int_mm_epilogue(torch._int_mm(qx, self.weight_t), self.out_scale, M, self.dtype,
                                      residual=residual)  # residual add fused into the epilogue
        return super().fused(x, norm=norm, eps=eps, silu=silu, residual=residual, **then)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        x = (x * self.prequant).float()
        return torch.round(x / self.act_scale).clamp_(-128, 127).to(torch.int8)

    def _mm(self, x):
        qx = self.quantize_input(x)
        if self.native:
            acc = torch._int_mm(qx, self.weight_t).float()
        else:
            acc = qx.float() @ self.weight_t.float()  # exact: |sums| < 2^24 for in-features < 1024, else ≈
        return (acc * self.out_scale).to(self.dtype)

    def _held(self):
        return self.weight_t, self.prequant, self.act_scale, self.out_scale  # (weight_t is a view on CUDA)

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight_t.t().float() * self.weight_scale[:, None]
