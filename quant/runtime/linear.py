"""One small handler per checkpoint format: load the stored tensors once, then a one-line forward.

``make_linear(algo, tensors, ...)`` picks the handler for a layer's ``quant_algo``. Each handler says which kernel
its forward runs (``kernel``) and whether that is a real low-precision kernel or an exact emulation
(``emulated``), so latency reports can label it. Every handler takes ``x`` [..., in] in the runtime's compute
dtype and returns [..., out] in the same dtype; ``nbytes`` counts what it holds in memory (what one decode step
reads); ``dequantized_weight()`` is the float32 [out, in] weight its forward multiplies by (for reference checks;
a ``prequant_scaling_factor`` is applied to x, not folded in).

Numerics follow TensorRT-LLM for ModelOpt 0.47 checkpoints (scales are dequantization multipliers):

- ``W8A16``: y = x @ (q · s[:, None])ᵀ — ``aten._weight_int8pack_mm`` (scales held in x's dtype).
- ``W8A8_SQ_PER_CHANNEL``: x ← x · prequant (compute dtype); qx = clamp(round_half_even(float32(x) / a), -128, 127);
  y = (qx @ qᵀ) · (a · s) — int8 × int8 → int32 ``torch._int_mm`` (weight transposed once at load).
- ``W4A16_AWQ``: y = (x · prequant) @ (q · s[:, i // group])ᵀ, q signed int4 packed in pairs along out — tinygemm's
  ``aten._weight_int4pack_mm_for_cpu`` (repacked once at load).
- ``FP8``: qx = fp8_e4m3(clamp(float32(x) / a, ±448)); y = (qx · a) @ (q · s)ᵀ — ``torch._scaled_mm``.

CPU kernel constraints found on torch 2.13: ``_weight_int8pack_mm`` needs the scales in x's dtype (float32,
bfloat16 or float16 all run); ``_int_mm`` takes any M, K, N on CPU; ``_weight_int4pack_mm_for_cpu`` needs
out-features divisible by 16 (we zero-pad the rows and slice the output) and a group of 32/64/128/256 (a larger
multiple of 32 is fed as its largest such divisor with the scales repeated — exact; other groups are emulated);
``_scaled_mm`` runs on CPU but, without AMX, ATen itself upcasts both operands to float32 (so FP8 is flagged
emulated there). On a non-CPU device every handler runs its exact emulation.

Speed (2-core AVX-512 CPU, no AMX): the int8pack/int4pack kernels are fast in bfloat16 (faster than dense bf16 at
M=1) but take a slow path in float32 (10–25× dense fp32); ``_int_mm`` is fast in both; the FP8 upcast is slow.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from quant.errors import UserError

FP8_E4M3 = torch.float8_e4m3fn
FP8_MAX = 448.0
INT4_KERNEL_GROUPS = (256, 128, 64, 32)  # what _weight_int4pack_mm_for_cpu accepts, largest first
INT4_KERNEL_ROW_MULTIPLE = 16  # _convert_weight_to_int4pack_for_cpu: out-features must be divisible by this


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def fp8_gemm_is_native() -> bool:
    """Whether ``torch._scaled_mm`` on this CPU runs oneDNN's FP8 GEMM rather than ATen's float32 upcast.

    ATen (torch 2.13, ``_scaled_mm_out_cpu``) takes the oneDNN path only with mkldnn enabled and AMX-INT8.
    """
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled and amx is not None and amx())


def unpack_int4_rows(packed: torch.Tensor) -> torch.Tensor:
    """int8 [out/2, in] (two signed int4 per byte, even out-row in the low nibble) → int8 [out, in] in [-8, 7]."""
    low = torch.bitwise_right_shift(torch.bitwise_left_shift(packed, 4), 4)  # arithmetic shift sign-extends
    high = torch.bitwise_right_shift(packed, 4)
    return torch.stack((low, high), dim=1).reshape(packed.shape[0] * 2, packed.shape[1])


def pack_int4_rows(q: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`unpack_int4_rows` (ModelOpt's layout): int [out, in] in [-8, 7] → int8 [out/2, in]."""
    q = q.to(torch.int16)
    return ((q[0::2] & 0xF) | (q[1::2] << 4)).to(torch.uint8).view(torch.int8)


class _Handler:
    kernel = "?"
    emulated = False

    def __init__(self, dtype: torch.dtype, device: torch.device):
        self.dtype = dtype
        self.device = torch.device(device)
        self.native = self.device.type == "cpu"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = self._mm(x.reshape(-1, x.shape[-1]))
        return y.reshape(*lead, y.shape[-1])

    def _mm(self, x2d: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _held(self) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        return _nbytes(*self._held())

    def dequantized_weight(self) -> torch.Tensor:
        raise NotImplementedError


class DenseLinear(_Handler):
    """FP16/BF16 checkpoint weights, computed in the runtime's compute dtype."""

    kernel = "dense"
    emulated = False

    def __init__(self, tensors: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device, **_):
        super().__init__(dtype, device)
        self.weight = tensors["weight"].to(device=device, dtype=dtype).contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def _held(self):
        return (self.weight,)

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight


class W8A16Linear(_Handler):
    """INT8 per-channel weights, activations in the compute dtype: ``aten._weight_int8pack_mm``."""

    def __init__(self, tensors, dtype, device, **_):
        super().__init__(dtype, device)
        self.weight = tensors["weight"].to(device).contiguous()  # int8 [out, in]
        # The kernel wants the scales in x's dtype (TRT-LLM's weight-only GEMM also holds them in the model dtype).
        self.scale = tensors["weights_scaling_factor"].to(device=device, dtype=dtype).reshape(-1).contiguous()
        self.kernel, self.emulated = ("int8pack_mm", False) if self.native else ("emulated-int8", True)

    def _mm(self, x):
        if self.native:
            return torch.ops.aten._weight_int8pack_mm(x.contiguous(), self.weight, self.scale)
        return (F.linear(x.float(), self.weight.float()) * self.scale.float()).to(self.dtype)

    def _held(self):
        return self.weight, self.scale

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight.float() * self.scale.float()[:, None]


class W8A8SQLinear(_Handler):
    """SmoothQuant W8A8 (static per-tensor activation scale): int8 × int8 → int32 ``torch._int_mm``."""

    def __init__(self, tensors, dtype, device, **_):
        super().__init__(dtype, device)
        weight = tensors["weight"].to(device)  # int8 [out, in]
        self.weight_t = weight.t().contiguous()  # int8 [in, out], what _int_mm takes as its right operand
        self.prequant = tensors["prequant_scaling_factor"].to(device=device, dtype=dtype).contiguous()
        self.act_scale = tensors["activation_scaling_factor"].to(device=device, dtype=torch.float32).reshape(1)
        self.weight_scale = tensors["weights_scaling_factor"].to(device=device, dtype=torch.float32).reshape(-1)
        self.out_scale = (self.act_scale * self.weight_scale).contiguous()  # float32 [out]
        self.kernel, self.emulated = ("int_mm", False) if self.native else ("emulated-int8-gemm", True)

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
        return self.weight_t, self.prequant, self.act_scale, self.out_scale

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight_t.t().float() * self.weight_scale[:, None]


class W4A16AWQLinear(_Handler):
    """INT4 AWQ (group-wise symmetric, pre-quant scale): ``aten._weight_int4pack_mm_for_cpu`` (tinygemm layout).

    tinygemm dequantizes ``(q_u - 8) · scale + zero`` with q_u = q + 8 unsigned, so zero = 0 for AWQ's symmetric
    int4 (checked against the exact dequantization). Repacked once at load.
    """

    def __init__(self, tensors, dtype, device, *, group_size: int = 128, **_):
        super().__init__(dtype, device)
        packed = tensors["weight"].to(device)
        scales = tensors["weights_scaling_factor"].to(device)
        out, inp = packed.shape[0] * 2, packed.shape[1]
        if scales.shape[0] != out or inp % scales.shape[1]:
            raise UserError(f"W4A16_AWQ scales of shape {list(scales.shape)} do not fit a weight of [{out}, {inp}]")
        group = inp // scales.shape[1]
        if group != group_size:
            raise UserError(f"W4A16_AWQ: scales imply group size {group}, the config says {group_size}")
        self.out, self.inp, self.group = out, inp, group
        self.prequant = tensors["prequant_scaling_factor"].to(device=device, dtype=dtype).contiguous()
        kgroup = next((g for g in INT4_KERNEL_GROUPS if group % g == 0), None)
        if self.native and kgroup is not None:
            self.kernel, self.emulated, self.kernel_group = "int4pack_mm_cpu", False, kgroup
            q = unpack_int4_rows(packed)
            rows = -(-out // INT4_KERNEL_ROW_MULTIPLE) * INT4_KERNEL_ROW_MULTIPLE
            q_u = torch.full((rows, inp), 8, dtype=torch.int32, device=device)  # padded rows dequantize to 0
            q_u[:out] = q.to(torch.int32) + 8
            self.weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q_u, 1)  # uint8 [rows, in/2]
            s = torch.zeros(rows, inp // kgroup, dtype=dtype, device=device)
            s[:out] = scales.to(dtype).repeat_interleave(group // kgroup, dim=1)
            self.scales_and_zeros = torch.stack((s.t(), torch.zeros_like(s.t())), dim=-1).contiguous()
        else:  # a group the kernel cannot take, or not a CPU: dequantize on the fly in float32
            self.kernel, self.emulated = "emulated-int4", True
            self.weight = packed.contiguous()
            self.scales = scales.to(torch.float32).contiguous()

    def _mm(self, x):
        x = x * self.prequant
        if not self.emulated:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), self.weight, self.kernel_group,
                                                           self.scales_and_zeros)
            return y[:, : self.out] if y.shape[1] != self.out else y
        return F.linear(x.float(), self._dequantize_emulated()).to(self.dtype)

    def _dequantize_emulated(self) -> torch.Tensor:
        return unpack_int4_rows(self.weight).float() * self.scales.repeat_interleave(self.group, dim=1)

    def _held(self):
        if self.emulated:
            return self.weight, self.scales, self.prequant
        return self.weight, self.scales_and_zeros, self.prequant

    def dequantized_weight(self) -> torch.Tensor:
        if self.emulated:
            return self._dequantize_emulated()
        # Read the repacked weight back through the kernel itself, in float32 whatever the compute dtype (the
        # packed layout does not depend on it): Wᵀ = I @ Wᵀ, one term per output, so exactly q · s as held.
        eye = torch.eye(self.inp, dtype=torch.float32, device=self.device)
        w_t = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.weight, self.kernel_group,
                                                         self.scales_and_zeros.float())
        return w_t[:, : self.out].t().float().contiguous()


class FP8Linear(_Handler):
    """FP8 E4M3 weights and activations, per-tensor scales: ``torch._scaled_mm``."""

    def __init__(self, tensors, dtype, device, **_):
        super().__init__(dtype, device)
        self.weight_t = tensors["weight"].to(device).t().contiguous()  # float8_e4m3fn [in, out]
        self.weight_scale = tensors["weights_scaling_factor"].to(device=device, dtype=torch.float32).reshape(())
        self.act_scale = tensors["activation_scaling_factor"].to(device=device, dtype=torch.float32).reshape(())
        self.kernel = "scaled_mm" if self.native else "emulated-fp8"
        # Without AMX, ATen's CPU _scaled_mm upcasts both operands to float32 itself: same numbers, no FP8 GEMM.
        self.emulated = not (self.native and fp8_gemm_is_native())

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() / self.act_scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_E4M3)

    def _mm(self, x):
        qx = self.quantize_input(x)
        if self.native:
            return torch._scaled_mm(qx, self.weight_t, scale_a=self.act_scale, scale_b=self.weight_scale,
                                    out_dtype=self.dtype)
        y = (qx.float() * self.act_scale) @ (self.weight_t.float() * self.weight_scale)
        return y.to(self.dtype)

    def _held(self):
        return self.weight_t, self.weight_scale, self.act_scale

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight_t.t().float() * self.weight_scale


HANDLERS: dict[str | None, type] = {
    None: DenseLinear,
    "W8A16": W8A16Linear,
    "W8A8_SQ_PER_CHANNEL": W8A8SQLinear,
    "W4A16_AWQ": W4A16AWQLinear,
    "FP8": FP8Linear,
}


def make_linear(algo: str | None, tensors: dict[str, torch.Tensor], *, dtype: torch.dtype,
                device: torch.device, group_size: int = 128):
    handler = HANDLERS.get(algo)
    if handler is None:
        raise UserError(f"the PyTorch runtime has no kernel for quant_algo {algo!r}")
    return handler(tensors, dtype, device, group_size=group_size)
