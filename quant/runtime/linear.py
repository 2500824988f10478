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
emulated there).

On CUDA every format runs a real kernel (:mod:`quant.runtime.cuda_kernels`), chosen by the number of rows M:
M = 1 (decode at batch 1) one Triton ``act_prep`` kernel (RMSNorm / SiLU·gate, pre-quant scale, SmoothQuant int8
or FP8 quantization) and a Triton GEMV that reads the stored layout once (int8, fp8 or fp16) with the residual
add fused in; W8A16/SmoothQuant at 2–64 rows a Triton ``tl.dot`` kernel dequantizing in registers (SmoothQuant:
int8 × int8 → int32); W4A16 at 1–64 rows tinygemm (``aten._weight_int4pack_mm``, repacked once at load; its
activation dtype — bf16 on torch 2.11 — is probed once), the Triton kernels on the stored layout as the
alternative (``KernelConfig.int4_kernel``); above 64 rows (prefill) cuBLAS on a dequantized copy (W8A16, W4A16), the
Triton int8 GEMM with the dequant epilogue fused (SmoothQuant; ``torch._int_mm`` as the alternative,
``KernelConfig.sq_prefill_gemm``), and ``torch._scaled_mm`` (FP8); fp16 goes to cuBLAS. Any other non-CPU device runs the
exact emulation.

Speed (2-core AVX-512 CPU, no AMX): the int8pack/int4pack kernels are fast in bfloat16 (faster than dense bf16 at
M=1) but take a slow path in float32 (10–25× dense fp32); ``_int_mm`` is fast in both; the FP8 upcast is slow.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

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


@functools.lru_cache(maxsize=1)
def bf16_gemm_is_native() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX). Without it (AVX2-only parts) oneDNN's
    bfloat16 GEMM ran 5x slower than float32 on the same shapes (128x576 @ 576x1536: 13.5 vs 2.7 ms, AMD EPYC)."""
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    if amx is not None and amx():
        return True
    try:
        with open("/proc/cpuinfo") as fh:
            return any(line.startswith("flags") and " avx512_bf16" in line for line in fh)
    except OSError:
        return True  # unknown: keep the plain path


# Rows from which a bfloat16 dense GEMM on a CPU without native bfloat16 is computed in float32 (prefill); below
# it (decode) the bfloat16 GEMM reads half the bytes and is the faster one (4 rows: 0.32 vs 0.55 ms).
CPU_F32_GEMM_MIN_ROWS = 16


def unpack_int4_rows(packed: torch.Tensor) -> torch.Tensor:
    """int8 [out/2, in] (two signed int4 per byte, even out-row in the low nibble) → int8 [out, in] in [-8, 7]."""
    low = torch.bitwise_right_shift(torch.bitwise_left_shift(packed, 4), 4)  # arithmetic shift sign-extends
    high = torch.bitwise_right_shift(packed, 4)
    return torch.stack((low, high), dim=1).reshape(packed.shape[0] * 2, packed.shape[1])


def pack_int4_rows(q: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`unpack_int4_rows` (ModelOpt's layout): int [out, in] in [-8, 7] → int8 [out/2, in]."""
    q = q.to(torch.int16)
    return ((q[0::2] & 0xF) | (q[1::2] << 4)).to(torch.uint8).view(torch.int8)


def _cuda_kernels():
    from quant.runtime import cuda_kernels

    return cuda_kernels


ALGO_KEYS = ("dense", "W8A16", "W8A8_SQ_PER_CHANNEL", "W4A16_AWQ", "FP8")


@dataclass(frozen=True)
class KernelConfig:
    """Which kernel each CUDA path takes: a value handed to the runtime (``TorchRuntime(..., kernels=)``) and on to
    every handler, never a module global. The defaults were chosen with ``python -m experiments.bench --sweep``
    on an H200; the benchmark and the tests make variants with :func:`dataclasses.replace`. The CPU path has one
    kernel per format and ignores this."""

    # Formats whose batch-1 rows take the fused Triton GEMV (else a prologue kernel, then the M > 1 path:
    # cuBLAS / _int_mm / _scaled_mm / tl.dot).
    gemv: frozenset[str] = frozenset(ALGO_KEYS)
    # Batch-1 GEMV: RMSNorm / SiLU·gate / activation quantization inside the GEMV (one launch, but every program
    # recomputes them for the whole row) or in one act_prep kernel before it (False: faster for SmoothQuant
    # and FP8 on an H200, whose per-element division and fp8 rounding per program cost more than a launch).
    fuse_prologue: bool = False
    # SmoothQuant above 64 rows (prefill): "triton" (tl.dot int8, epilogue fused) or "int_mm" (cuBLASLt).
    sq_prefill_gemm: str = "triton"
    # W4A16 for 1–64 rows: "tinygemm" (aten._weight_int4pack_mm, repacked at load: int4 through tensor cores) or
    # "triton" (the GEMV / tl.dot on the stored layout, nibble → float on the CUDA cores).
    int4_kernel: str = "tinygemm"
    # Per format (an ALGO_KEYS entry), overriding the GEMV kernel's tuned tables (cuda_kernels.GEMV_CVT and
    # GEMV_CONFIG): the weight-conversion variant, and the (BLOCK_R, BLOCK_K, warps) tile.
    gemv_cvt: tuple[tuple[str, int], ...] = ()
    gemv_tile: tuple[tuple[str, tuple[int, int, int]], ...] = ()

    def __post_init__(self) -> None:
        if self.sq_prefill_gemm not in ("triton", "int_mm"):
            raise ValueError(f"sq_prefill_gemm must be 'triton' or 'int_mm', got {self.sq_prefill_gemm!r}")
        if self.int4_kernel not in ("tinygemm", "triton"):
            raise ValueError(f"int4_kernel must be 'tinygemm' or 'triton', got {self.int4_kernel!r}")
        unknown = set(self.gemv) | {k for k, _ in (*self.gemv_cvt, *self.gemv_tile)}
        if unknown - set(ALGO_KEYS):
            raise ValueError(f"unknown format(s) {sorted(unknown - set(ALGO_KEYS))}; known: {', '.join(ALGO_KEYS)}")

    def gemv_options(self, algo_key: str) -> dict:
        """The GEMV kernel's ``cvt`` and ``config`` for a format (None: the kernel's tuned default)."""
        return {"cvt": dict(self.gemv_cvt).get(algo_key), "config": dict(self.gemv_tile).get(algo_key)}


DEFAULT_KERNELS = KernelConfig()


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


class _Handler:
    kernel = "?"
    emulated = False
    algo_key = "dense"
    quantizes_input = False  # SmoothQuant/FP8: one act_prep does RMSNorm/SiLU and the int8/fp8 quantization

    def __init__(self, dtype: torch.dtype, device: torch.device, kernels: KernelConfig = DEFAULT_KERNELS):
        self.dtype, self.kernels = dtype, kernels
        self.device = torch.device(device)
        self.native = self.device.type == "cpu"
        self.cuda = self.device.type == "cuda"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        y = self.fused(x2.contiguous()) if self.cuda else self._mm(x2)
        return y.reshape(*lead, y.shape[-1])

    # -- the CUDA path: y = W · f(x) (+ residual in place) ------------------------------------------------------
    def fused(self, x: torch.Tensor, *, norm: torch.Tensor | None = None, eps: float = 1e-6, silu: bool = False,
              residual: torch.Tensor | None = None) -> torch.Tensor:
        """x [M, K] (silu: [M, 2K], SiLU(x[:, :K]) · x[:, K:]); norm: RMSNorm x first (float32 statistics, as the
        runtime's ``_rmsnorm``); residual [M, N]: add y to it in place and return it. On CUDA the small-M case
        is one fused kernel; elsewhere these are the runtime's own tensor ops."""
        if self.cuda:
            if x.shape[0] <= _cuda_kernels().GEMV_MAX_M and self.algo_key in self.kernels.gemv and self._gemv_ok():
                if not self.kernels.fuse_prologue and (norm is not None or silu) and not self.quantizes_input:
                    x, norm, silu = self._prep(x, norm, eps, silu), None, False
                return self._gemv(x, norm=norm, eps=eps, silu=silu, residual=residual)
            y = self._mm_cuda(x, norm=norm, eps=eps, silu=silu)
            if residual is None and y.dtype != self.dtype:  # (tinygemm computes in bf16)
                y = y.to(self.dtype)
        else:
            if norm is not None:
                xf = x.float()
                x = norm * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
            if silu:
                k = x.shape[-1] // 2
                x = F.silu(x[:, :k]) * x[:, k:]
            y = self._mm(x)
        if residual is not None:
            return residual.add_(y)
        return y

    def _gemv_ok(self) -> bool:
        return True

    def _ck_gemv(self, *args, **kwargs) -> torch.Tensor:
        """The batch-1 GEMV kernel with this handler's kernel options."""
        return _cuda_kernels().gemv(*args, **kwargs, **self.kernels.gemv_options(self.algo_key))

    def _prep(self, x, norm, eps, silu, *, prequant=None, act_scale=None, afmt=0, rows=None, out_dtype=None):
        """The prologue as its own kernel, when a library GEMM follows (or nothing is to be done: x itself)."""
        if norm is None and not silu and prequant is None and afmt == 0 and rows is None \
                and out_dtype in (None, x.dtype):
            return x
        return _cuda_kernels().act_prep(x, norm=norm, eps=eps, silu=silu, prequant=prequant, act_scale=act_scale,
                                        afmt=afmt, rows=rows, out_dtype=out_dtype)

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

    def _gemv(self, x, *, norm, eps, silu, residual):
        ck = _cuda_kernels()
        return self._ck_gemv(x, self.weight, wfmt=ck.W_FLOAT, norm=norm, eps=eps, silu=silu, residual=residual)

    def _mm_cuda(self, x, *, norm, eps, silu):
        return F.linear(self._prep(x, norm, eps, silu), self.weight)

    def _held(self):
        return (self.weight,)

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight


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

    algo_key = "W8A16"

    def _mm(self, x):
        if self.native:
            return torch.ops.aten._weight_int8pack_mm(x.contiguous(), self.weight, self.scale)
        return (F.linear(x.float(), self.weight.float()) * self.scale.float()).to(self.dtype)

    def _gemv(self, x, *, norm, eps, silu, residual):
        ck = _cuda_kernels()
        return self._ck_gemv(x, self.weight, wfmt=ck.W_INT8, wscale=self.scale, scale_mode=ck.S_CHANNEL, norm=norm,
                             eps=eps, silu=silu, residual=residual)

    def _mm_cuda(self, x, *, norm, eps, silu):
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

    algo_key = "W8A8_SQ_PER_CHANNEL"
    quantizes_input = True

    def _gemv(self, x, *, norm, eps, silu, residual):
        ck = _cuda_kernels()
        if not self.kernels.fuse_prologue:  # quantize once, then an int8 × int8 GEMV
            qx = self._prep(x, norm, eps, silu, prequant=self.prequant, act_scale=self.act_scale, afmt=ck.A_INT8)
            return self._ck_gemv(qx, self.weight, wfmt=ck.W_INT8, afmt=ck.A_INT8_IN, wscale=self.out_scale,
                                 scale_mode=ck.S_CHANNEL, residual=residual, out_dtype=self.dtype)
        return self._ck_gemv(x, self.weight, wfmt=ck.W_INT8, afmt=ck.A_INT8, prequant=self.prequant,
                             act_scale=self.act_scale, wscale=self.out_scale, scale_mode=ck.S_CHANNEL, norm=norm,
                             eps=eps, silu=silu, residual=residual)

    def fused(self, x, *, norm=None, eps=1e-6, silu=False, residual=None):
        if self.cuda and not (x.shape[0] <= _cuda_kernels().GEMV_MAX_M and self.algo_key in self.kernels.gemv):
            ck = _cuda_kernels()
            M = x.shape[0]
            if M <= ck.WQ_MM_MAX_M or self.kernels.sq_prefill_gemm == "triton":
                # int8 × int8 → int32 through tl.dot, (a · s) and the residual add fused into its epilogue
                qx = self._prep(x, norm, eps, silu, prequant=self.prequant, act_scale=self.act_scale,
                                afmt=ck.A_INT8)
                return ck.wq_mm(qx, self.weight, self.out_scale, wfmt=ck.W_INT8, afmt=ck.A_INT8, dtype=self.dtype,
                                residual=residual, config=None if M <= ck.WQ_MM_MAX_M else ck.INT8_GEMM_CONFIG)
            # cuBLASLt int8 (more than 16 rows: pad to a multiple of 8, ≥ 32; padding rows are never read back)
            qx = self._prep(x, norm, eps, silu, prequant=self.prequant, act_scale=self.act_scale,
                            afmt=ck.A_INT8, rows=max(32, _round_up(M, 8)))
            return ck.int_mm_epilogue(torch._int_mm(qx, self.weight_t), self.out_scale, M, self.dtype,
                                      residual=residual)  # residual add fused into the epilogue
        return super().fused(x, norm=norm, eps=eps, silu=silu, residual=residual)

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


class W4A16AWQLinear(_Handler):
    """INT4 AWQ (group-wise symmetric, pre-quant scale): ``aten._weight_int4pack_mm_for_cpu`` (tinygemm layout).

    tinygemm dequantizes ``(q_u - 8) · scale + zero`` with q_u = q + 8 unsigned, so zero = 0 for AWQ's symmetric
    int4 (checked against the exact dequantization). Repacked once at load.
    """

    def __init__(self, tensors, dtype, device, *, group_size: int = 128, kernels: KernelConfig = DEFAULT_KERNELS,
                 **_):
        super().__init__(dtype, device, kernels)
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
        if self.cuda:
            # The TRT-LLM layout as stored (int8 [out/2, in], pairs along out, even row in the low nibble) is what
            # the Triton kernels read; scales in the compute dtype, as the CPU kernel holds them.
            self.kernel, self.emulated = "triton-w4a16", False
            self.weight = packed.contiguous()
            self.scales = scales.to(dtype).contiguous()
            self.pow2_group = group & (group - 1) == 0 and group >= 16
            self.tinygemm = None
            if kernels.int4_kernel == "tinygemm" and dtype != torch.float32 and group in (32, 64, 128, 256) \
                    and inp % 128 == 0 and out % 8 == 0:
                tg = _tinygemm_layout(self.device)
                if tg is not None:  # repacked once for tinygemm; the Triton layout stays for prefill
                    self.tinygemm = _TinygemmInt4(unpack_int4_rows(packed), self.scales, group, tg)
                    self.kernel = "tinygemm-w4a16|triton"
        elif self.native and kgroup is not None:
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

    algo_key = "W4A16_AWQ"

    def _gemv_ok(self) -> bool:
        return self.pow2_group and self.tinygemm is None

    def _gemv(self, x, *, norm, eps, silu, residual):
        ck = _cuda_kernels()
        return self._ck_gemv(x, self.weight, wfmt=ck.W_INT4, wscale=self.scales, group=self.group,
                             prequant=self.prequant, norm=norm, eps=eps, silu=silu, residual=residual)

    def _mm_cuda(self, x, *, norm, eps, silu):
        ck = _cuda_kernels()
        if self.tinygemm is not None and x.shape[0] <= ck.WQ_MM_MAX_M:
            # the prologue writes tinygemm's activation dtype directly; its output goes back through the residual
            # add or one cast (fused())
            return self.tinygemm(self._prep(x, norm, eps, silu, prequant=self.prequant,
                                            out_dtype=self.tinygemm.act_dtype))
        x = self._prep(x, norm, eps, silu, prequant=self.prequant)
        if x.shape[0] <= ck.WQ_MM_MAX_M and self.dtype != torch.float32 and self.pow2_group:
            return ck.wq_mm(x, self.weight, self.scales, wfmt=ck.W_INT4, group=self.group)
        # prefill: dequantize to the compute dtype once per call (q · s rounded to it), then cuBLAS
        if self.pow2_group:
            return F.linear(x, ck.dequant_int4(self.weight, self.scales, self.group, self.dtype))
        return F.linear(x, self.dequantized_weight().to(self.dtype))

    def _mm(self, x):
        x = x * self.prequant
        if not self.emulated:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), self.weight, self.kernel_group,
                                                           self.scales_and_zeros)
            return y[:, : self.out] if y.shape[1] != self.out else y
        return F.linear(x.float(), self._dequantize_emulated()).to(self.dtype)

    def _dequantize_emulated(self) -> torch.Tensor:
        return unpack_int4_rows(self.weight).float() * self.scales.float().repeat_interleave(self.group, dim=1)

    def _held(self):
        if self.cuda and self.tinygemm is not None:  # decode reads the tinygemm copy; prefill the Triton layout
            return self.tinygemm.weight, self.tinygemm.scales_and_zeros, self.prequant
        if self.emulated or self.cuda:
            return self.weight, self.scales, self.prequant
        return self.weight, self.scales_and_zeros, self.prequant

    def dequantized_weight(self) -> torch.Tensor:
        if self.emulated or self.cuda:
            return self._dequantize_emulated()
        # Read the repacked weight back through the kernel itself, in float32 whatever the compute dtype (the
        # packed layout does not depend on it): Wᵀ = I @ Wᵀ, one term per output, so exactly q · s as held.
        eye = torch.eye(self.inp, dtype=torch.float32, device=self.device)
        w_t = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.weight, self.kernel_group,
                                                         self.scales_and_zeros.float())
        return w_t[:, : self.out].t().float().contiguous()




def _tinygemm_pack(q: torch.Tensor, scales: torch.Tensor, group: int, order: str, inner_k_tiles: int = 8):
    """q int [N, K] in [-8, 7] → (packed, scales_and_zeros [K/group, N, 2]) for aten._weight_int4pack_mm, which
    computes (q_u − 8) · scale + zero with q_u = q + 8 (zero = 0 for AWQ's symmetric int4)."""
    qu = (q.to(torch.int16) + 8).to(torch.uint8)
    hi, lo = (qu[:, ::2], qu[:, 1::2]) if order == "even-high" else (qu[:, 1::2], qu[:, ::2])
    packed = torch.ops.aten._convert_weight_to_int4pack((hi << 4 | lo).contiguous(), inner_k_tiles)
    s = scales.t().contiguous()
    return packed, torch.stack((s, torch.zeros_like(s)), dim=-1).contiguous()


def _tinygemm_layout(device: torch.device) -> tuple[str, torch.dtype] | None:
    """The nibble order and activation dtype (fp16, else bf16) that make tinygemm compute exactly q · s on a known
    weight, probed once per device; None if it is unavailable."""
    return _probe_tinygemm(str(device))


@functools.cache
def _probe_tinygemm(device: str) -> tuple[str, torch.dtype] | None:
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(-8, 8, (64, 256), generator=gen, dtype=torch.int8)
    s = torch.rand(64, 2, generator=gen) + 0.5
    x = torch.randn(4, 256, generator=gen)
    ref = x.double() @ (q.double() * s.double().repeat_interleave(128, dim=1)).t()
    for dtype in (torch.float16, torch.bfloat16):
        for order in ("even-high", "even-low"):
            try:
                w, sz = _tinygemm_pack(q.to(device), s.to(device=device, dtype=dtype), 128, order)
                y = torch.ops.aten._weight_int4pack_mm(x.to(device=device, dtype=dtype), w, 128, sz)
            except (RuntimeError, NotImplementedError):
                continue
            if ((y.double().cpu() - ref).norm() / ref.norm()).item() < 1e-2:
                return order, dtype
    return None


class _TinygemmInt4:
    def __init__(self, q: torch.Tensor, scales: torch.Tensor, group: int, layout: tuple[str, torch.dtype]):
        order, self.act_dtype = layout
        self.group = group
        self.weight, self.scales_and_zeros = _tinygemm_pack(q, scales.to(self.act_dtype), group, order)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm(x.to(self.act_dtype).contiguous(), self.weight, self.group,
                                                  self.scales_and_zeros)


class FP8Linear(_Handler):
    """FP8 E4M3 weights and activations, per-tensor scales: ``torch._scaled_mm``."""

    def __init__(self, tensors, dtype, device, *, kernels: KernelConfig = DEFAULT_KERNELS,
                 **_):
        super().__init__(dtype, device, kernels)
        if self.cuda:
            # cuBLASLt FP8 wants B column-major: a view of the contiguous [out, in] weight (the GEMV reads rows).
            self.weight = tensors["weight"].to(device).contiguous()
            self.weight_t = self.weight.t()
        else:
            self.weight_t = tensors["weight"].to(device).t().contiguous()  # float8_e4m3fn [in, out]
        self.weight_scale = tensors["weights_scaling_factor"].to(device=device, dtype=torch.float32).reshape(())
        self.act_scale = tensors["activation_scaling_factor"].to(device=device, dtype=torch.float32).reshape(())
        self.kernel = "scaled_mm" if self.native else "emulated-fp8"
        # Without AMX, ATen's CPU _scaled_mm upcasts both operands to float32 itself: same numbers, no FP8 GEMM.
        self.emulated = not (self.native and fp8_gemm_is_native())
        if self.cuda:
            self.kernel, self.emulated = "triton-fp8-gemv|scaled_mm", False
            self.out_scale = (self.act_scale * self.weight_scale).reshape(1).contiguous()

    algo_key = "FP8"
    quantizes_input = True

    def _gemv(self, x, *, norm, eps, silu, residual):
        ck = _cuda_kernels()
        if not self.kernels.fuse_prologue:  # quantize once, then an fp8 × fp8 GEMV
            qx = self._prep(x, norm, eps, silu, act_scale=self.act_scale.reshape(1), afmt=ck.A_FP8)
            return self._ck_gemv(qx, self.weight, wfmt=ck.W_FP8, wscale=self.out_scale, scale_mode=ck.S_SCALAR,
                                 residual=residual, out_dtype=self.dtype)
        return self._ck_gemv(x, self.weight, wfmt=ck.W_FP8, afmt=ck.A_FP8, act_scale=self.act_scale.reshape(1),
                             wscale=self.out_scale, scale_mode=ck.S_SCALAR, norm=norm, eps=eps, silu=silu,
                             residual=residual)

    def _mm_cuda(self, x, *, norm, eps, silu):
        ck = _cuda_kernels()
        M = x.shape[0]
        qx = self._prep(x, norm, eps, silu, act_scale=self.act_scale.reshape(1), afmt=ck.A_FP8,
                        rows=_round_up(M, 16))
        y = torch._scaled_mm(qx, self.weight_t, scale_a=self.act_scale, scale_b=self.weight_scale,
                             out_dtype=self.dtype)
        return y[:M] if y.shape[0] != M else y

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


def concat_linear_tensors(algo: str | None, parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor] | None:
    """One linear's tensors for several that read the same input (fc and gate): weights and per-channel scales
    stacked along out. None where the input side differs (pre-quant or activation scales; FP8 weight scales),
    so the two must stay separate linears."""
    first = parts[0]
    shared = {None: (), "W8A16": (), "W8A8_SQ_PER_CHANNEL": ("prequant_scaling_factor", "activation_scaling_factor"),
              "W4A16_AWQ": ("prequant_scaling_factor",),
              "FP8": ("activation_scaling_factor", "weights_scaling_factor")}.get(algo)
    if shared is None:
        return None
    for p in parts[1:]:
        if set(p) != set(first) or any(not torch.equal(p[k], first[k]) for k in shared):
            return None
    return {k: first[k] if k in shared else torch.cat([p[k] for p in parts], dim=0) for k in first}


def make_linear(algo: str | None, tensors: dict[str, torch.Tensor], *, dtype: torch.dtype,
                device: torch.device, group_size: int = 128, kernels: KernelConfig = DEFAULT_KERNELS):
    handler = HANDLERS.get(algo)
    if handler is None:
        raise UserError(f"the PyTorch runtime has no kernel for quant_algo {algo!r}")
    return handler(tensors, dtype, device, group_size=group_size, kernels=kernels)
