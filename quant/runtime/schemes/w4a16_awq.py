"""``W4A16_AWQ``: group-wise int4 weights with a pre-quant scale; tinygemm (CPU, CUDA), Triton or compiled CUDA."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from quant.errors import UserError
from quant.runtime import cuda_ext
from quant.runtime.schemes.base import (DEFAULT_KERNELS, INT4_KERNEL_GROUPS, INT4_KERNEL_ROW_MULTIPLE, KernelConfig,
                                        _cuda_kernels, _Handler, unpack_int4_rows)


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
        # GPTQ's INT4 linears have no pre-quant scale (config pre_quant_scale false): None skips the multiply.
        pre = tensors.get("prequant_scaling_factor")
        self.prequant = None if pre is None else pre.to(device=device, dtype=dtype).contiguous()
        kgroup = next((g for g in INT4_KERNEL_GROUPS if group % g == 0), None)
        if self.cuda:
            # The TRT-LLM layout as stored (int8 [out/2, in], pairs along out, even row in the low nibble) is what
            # the Triton kernels read; scales in the compute dtype, as the CPU kernel holds them.
            self.kernel, self.emulated = "triton-w4a16", False
            self.weight = packed.contiguous()
            self.scales = scales.to(dtype).contiguous()
            self.pow2_group = group & (group - 1) == 0 and group >= 16
            self.tinygemm = self.kpack = self.w4g = None
            self.kpack_at_1 = False  # batch 1 through the k-packed kernel (w4k_rows starting at 1)
            q = functools.cache(lambda: unpack_int4_rows(packed))  # the int4 values, for the copies made below
            if kernels.w4m_rows is not None and cuda_ext.w4m_ok(out, inp, group, dtype) and self._extension_built():
                # a copy in the tensor-core kernel's layout, for w4m_rows: it runs ahead of every kernel below
                self.w4m = cuda_ext.pack_w4m(q(), self.scales)
                self.w4m_rows = kernels.w4m_rows
                self.w4m_counter = cuda_ext.tile_counter(out, device)
            # Each copy below is made only where it takes some row that the kernels before it leave (taken: the
            # row ranges of the copies made): INT4 weights held up to five times outweighed FP16's on an H100
            # (8B at batch 1: peak 19.0 GiB against 15.2), and under the defaults tinygemm's took no row.
            taken = [self.w4m_rows] if self.w4m is not None else []
            if _rows_left(kernels.w4g_rows, taken) and cuda_ext.w4g_ok(inp, group, dtype) \
                    and self._extension_built():
                # a copy in the GEMV's layout, for w4g_rows: it runs ahead of the kernels below
                self.w4g, self.w4g_rows = cuda_ext.pack_w4g(q()), kernels.w4g_rows
                self.w4g_tile = kernels.w4g_tile or cuda_ext.W4G_TILE
                taken.append(self.w4g_rows)
            ck = _cuda_kernels()
            if kernels.int4_kernel == "kpack" and dtype == torch.float16 and _rows_left(kernels.w4k_rows, taken):
                self.w4k_tile = kernels.w4k_tile
                kw = ck.w4k_kw(inp, group, self.w4k_tile[1] if self.w4k_tile else ck.W4K_KW)
                if kw is not None:  # another copy, for w4k_rows: the others serve the other rows and prefill
                    self.kpack = ck.pack_int4_k(q(), kw), kw
                    self.w4k_rows = kernels.w4k_rows
                    self.kpack_at_1 = self.w4k_rows[0] <= 1
                    taken.append(self.w4k_rows)
            if kernels.int4_kernel in ("tinygemm", "kpack") and dtype != torch.float32 and group in (32, 64, 128, 256) \
                    and inp % 128 == 0 and out % 8 == 0 and _rows_left((1, ck.WQ_MM_MAX_M), taken):
                tg = _tinygemm_layout(self.device)
                if tg is not None:  # repacked once for tinygemm; the Triton layout stays for prefill
                    self.tinygemm = _TinygemmInt4(q(), self.scales, group, tg)
                    self.kernel = "tinygemm-w4a16|triton"
                    taken.append((1, ck.WQ_MM_MAX_M))
            if self._cutlass_takes(out, inp, group, 4):  # prefill through CUTLASS, on its own copy
                self.cutlass = cuda_ext.pack_int4_cutlass(q()), self.scales.t().contiguous()
                self.kernel = "cutlass-prefill|" + self.kernel
            # prefill (past CUTLASS's rows, where it takes them) from the k-packed copy, unless wq_prefill takes it
            # (the stored layout's tensor-core kernel)
            self.kprefill = (kernels.w4k_prefill and self.kpack is not None and self.algo_key not in kernels.wq_prefill)
            if self.kprefill:  # prefill from the k-packed copy; the stored layout only where a row is left to it
                self.kernel = "tinygemm-w4a16|w4k-dequant" if self.tinygemm is not None else "w4k-dequant"
                if not _rows_left((1, ck.WQ_MM_MAX_M), taken):
                    self.weight = None
            if self.kpack is not None:
                self.kernel = "w4k-mma|" + self.kernel
            if self.w4g is not None:
                self.kernel = "w4g-cuda|" + self.kernel
            if self.w4m is not None:
                self.kernel = "w4m-mma|" + self.kernel
            # batch 1 through the GEMV entry with one act_prep first (RMSNorm / SiLU·gate and the pre-quant scale)
            self.own_prologue = self._w4m_takes(1) or self._w4g_takes(1) or self.kpack_at_1
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
    shared_inputs = ("prequant_scaling_factor",)
    w4g = None  # the compiled GEMV's copy (CUDA, float16), when built
    w4m = None  # the tensor-core kernel's (weights, scales) (CUDA, float16), when built
    kprefill = False  # prefill dequantizes the k-packed copy (KernelConfig.w4k_prefill; CUDA)
    cutlass = None  # (weight, scales) in cuda_ext.wq_gemm's layout (KernelConfig.wq_prefill_cutlass; CUDA)

    def _w4g_takes(self, rows: int) -> bool:
        return self.w4g is not None and self.w4g_rows[0] <= rows <= self.w4g_rows[1]

    def _w4m_takes(self, rows: int) -> bool:
        return self.w4m is not None and self.w4m_rows[0] <= rows <= self.w4m_rows[1]

    def _gemv_ok(self) -> bool:
        return (self._w4m_takes(1) or self._w4g_takes(1) or self.kpack_at_1
                or (self.pow2_group and self.tinygemm is None))

    def takes_norm(self, rows: int) -> bool:
        # (the compiled GEMV's persistent form only: cuda_ext.w4a16_gemv's norm)
        return (rows == 1 and self.algo_key in self.kernels.norm_prologue and self.kernels.w4g_persistent
                and self.then_counter is not None
                and self._takes_gemv(1) and not self._w4m_takes(1) and self._w4g_takes(1)
                and cuda_ext.fuses(1, self.inp))

    def _normed_gemv(self, x, norm, eps, residual, **then):
        return cuda_ext.w4a16_gemv(x, self.w4g, self.scales, group=self.group, residual=residual, tile=self.w4g_tile,
                                   prequant=self.prequant, norm=norm, eps=eps, grid=cuda_ext.grid(True, 1),
                                   pdl=self.gemv_pdl, **then)

    def _gemv_then_ok(self) -> bool:
        return not self.kpack_at_1 or self._w4g_takes(1) or self._w4m_takes(1)

    def _gemv(self, x, *, norm, eps, silu, residual, **then):
        ck = _cuda_kernels()
        if self._w4m_takes(1):
            return self._w4m_mm(x, norm, eps, silu, residual, **then)
        if self._w4g_takes(1):
            return self._w4g_mm(x, norm, eps, silu, residual, **then)
        if self.kpack_at_1:
            return self._w4k(x, norm, eps, silu, residual)
        return self._ck_gemv(x, self.weight, wfmt=ck.W_INT4, wscale=self.scales, group=self.group,
                             prequant=self.prequant, norm=norm, eps=eps, silu=silu, residual=residual, **then)

    def _w4k(self, x, norm, eps, silu, residual=None):
        w, kw = self.kpack
        x = self._prep(x, norm, eps, silu, prequant=self.prequant)
        return _cuda_kernels().w4k_mm(x, w, self.scales, group=self.group, kw=kw, residual=residual,
                                      tile=self.w4k_tile)

    def _w4g_mm(self, x, norm, eps, silu, residual=None, **then):
        grid = cuda_ext.grid(self.kernels.w4g_persistent, x.shape[0])
        pdl = self.gemv_pdl and grid != 0
        if norm is None and not silu and self.prequant is not None and self.kernels.w4g_fuse \
                and cuda_ext.fuses(x.shape[0], self.inp):
            return cuda_ext.w4a16_gemv(x, self.w4g, self.scales, group=self.group, residual=residual,
                                       tile=self.w4g_tile, prequant=self.prequant, eps=eps, grid=grid, pdl=pdl,
                                       stage_batch=self.kernels.w4g_stage_batch, **then)
        x = self._prep(x, norm, eps, silu, prequant=self.prequant)
        return cuda_ext.w4a16_gemv(x, self.w4g, self.scales, group=self.group, residual=residual, tile=self.w4g_tile,
                                   eps=eps, grid=grid, pdl=pdl, **then)

    def _w4m_mm(self, x, norm, eps, silu, residual=None, **then):
        w, s = self.w4m
        pre = None
        if norm is None and not silu and x.shape[0] == 1:  # one row: the pre-quant scale in the kernel
            pre = self.prequant
        else:
            x = self._prep(x, norm, eps, silu, prequant=self.prequant)
        return cuda_ext.w4a16_mma(x, w, s, group=self.group, tile_counter=self.w4m_counter, residual=residual,
                                  depth=self.kernels.w4m_depth, prequant=pre, eps=eps, **then)

    def _mm_cuda(self, x, *, norm, eps, silu):
        ck = _cuda_kernels()
        if self._w4m_takes(x.shape[0]):
            return self._w4m_mm(x, norm, eps, silu)
        if self._w4g_takes(x.shape[0]):
            return self._w4g_mm(x, norm, eps, silu)
        if self.kpack is not None and self.w4k_rows[0] <= x.shape[0] <= self.w4k_rows[1]:
            return self._w4k(x, norm, eps, silu)
        if self.tinygemm is not None and x.shape[0] <= ck.WQ_MM_MAX_M:
            # the prologue writes tinygemm's activation dtype directly; its output goes back through the residual
            # add or one cast (fused())
            return self.tinygemm(self._prep(x, norm, eps, silu, prequant=self.prequant,
                                            out_dtype=self.tinygemm.act_dtype))
        x = self._prep(x, norm, eps, silu, prequant=self.prequant)
        if self.cutlass is not None and (y := self._cutlass_mm(x, *self.cutlass, 4, self.group)) is not None:
            return y
        if self.kprefill and x.shape[0] > ck.WQ_MM_MAX_M:  # KernelConfig.w4k_prefill
            return F.linear(x, self._prefill_weight())
        if self.dtype != torch.float32 and self.pow2_group:
            if x.shape[0] <= ck.WQ_MM_MAX_M:
                return ck.wq_mm(x, self.weight, self.scales, wfmt=ck.W_INT4, group=self.group)
            if self.algo_key in self.kernels.wq_prefill:
                return ck.wq_prefill_mm(x, self.weight, self.scales, wfmt=ck.W_INT4, group=self.group,
                                        config=self.kernels.wq_prefill_tile, group_m=self.kernels.prefill_group,
                                        tma=self.kernels.wq_prefill_tma)
        # prefill: dequantize to the compute dtype once per call (q · s rounded to it), then cuBLAS
        if self.pow2_group:
            return F.linear(x, self._prefill_weight())
        return F.linear(x, self.dequantized_weight().to(self.dtype))

    def prefill_shape(self) -> tuple[int, int] | None:
        return (self.out, self.inp) if self.kprefill or (self.cuda and self.pow2_group) else None

    def prefill_dequant(self, out: torch.Tensor | None = None) -> torch.Tensor:
        ck = _cuda_kernels()
        if self.kprefill:  # from the k-packed copy (the stored layout may not be kept)
            w, kw = self.kpack
            return ck.dequant_int4_k(w, self.scales, self.group, kw, self.dtype, out=out)
        return ck.dequant_int4(self.weight, self.scales, self.group, self.dtype, out=out)

    def _mm(self, x):
        if self.prequant is not None:
            x = x * self.prequant
        if not self.emulated:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), self.weight, self.kernel_group,
                                                           self.scales_and_zeros)
            return y[:, : self.out] if y.shape[1] != self.out else y
        return F.linear(x.float(), self._dequantize_emulated()).to(self.dtype)

    def _dequantize_emulated(self) -> torch.Tensor:
        q = _cuda_kernels().unpack_int4_k(*self.kpack) if self.weight is None else unpack_int4_rows(self.weight)
        return q.float() * self.scales.float().repeat_interleave(self.group, dim=1)

    def _held(self):
        pre = () if self.prequant is None else (self.prequant,)
        if self.cuda and self._w4m_takes(1):  # batch-1 decode reads the tensor-core kernel's copy
            return *self.w4m, *pre
        if self.cuda and self._w4g_takes(1):  # batch-1 decode reads the GEMV's copy
            return self.w4g, self.scales, *pre
        if self.cuda and self.kpack_at_1:  # batch-1 decode reads the k-packed copy
            return self.kpack[0], self.scales, *pre
        if self.cuda and self.tinygemm is not None:  # decode reads the tinygemm copy; prefill the Triton layout
            return self.tinygemm.weight, self.tinygemm.scales_and_zeros, *pre
        if self.emulated or self.cuda:
            return self.weight, self.scales, *pre
        return self.weight, self.scales_and_zeros, *pre

    def dequantized_weight(self) -> torch.Tensor:
        if self.emulated or self.cuda:
            return self._dequantize_emulated()
        # Read the repacked weight back through the kernel itself, in float32 whatever the compute dtype (the
        # packed layout does not depend on it): Wᵀ = I @ Wᵀ, one term per output, so exactly q · s as held.
        eye = torch.eye(self.inp, dtype=torch.float32, device=self.device)
        w_t = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.weight, self.kernel_group,
                                                         self.scales_and_zeros.float())
        return w_t[:, : self.out].t().float().contiguous()




def _rows_left(rows: tuple[int, int] | None, taken: list[tuple[int, int]]) -> bool:
    """Whether some row of ``rows`` (first, last; None: none) is in none of the ranges ``taken`` by kernels that run
    ahead: a copy of the weights for those rows is then worth its memory."""
    return rows is not None and any(not any(a <= m <= b for a, b in taken) for m in range(rows[0], rows[1] + 1))


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
