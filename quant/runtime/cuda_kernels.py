"""Triton kernels of the runtime's CUDA path (imported only when a runtime is built on a CUDA device).

Each kernel reproduces, in one launch, the sequence of tensor ops the CPU path runs, with the same roundings
to the compute dtype at the same places (see :mod:`quant.runtime.linear` for the per-format formulas):

- :func:`gemv`: y = W · x for one row (decode at batch 1), W in any checkpoint layout — fp16/bf16, int8 with
  per-channel scales (W8A16), int4 AWQ packed in pairs along out with group scales, fp8 with a per-tensor scale —
  read once (int8/int4/fp8 as int32 words, turned into float32 by moving bits: no int→float conversions) and
  accumulated element-wise in float32 (int8 × int8 in int32 for SmoothQuant), reduced once per program; the
  residual add is fused behind (y is added to h in place). It can also fuse the prologue in front (RMSNorm,
  SiLU·gate, pre-quant scale, int8/FP8 activation quantization: ``KernelConfig.fuse_prologue``), but every program
  then recomputes it for the whole row, which measured slower on an H200 than one :func:`act_prep` launch.
- :func:`wq_mm`: the same weights through ``tl.dot`` for 2–64 rows (decode at larger batch), and SmoothQuant's
  int8 × int8 GEMM with its dequant epilogue fused.
- :func:`act_prep`: the prologue alone (RMSNorm / SiLU·gate, pre-quant scale, int8 or FP8 quantization) for
  rows that go to a library GEMM (``torch._int_mm``, ``torch._scaled_mm``, cuBLAS).
- :func:`int_mm_epilogue`: int32 accumulators · (a · s) → compute dtype (+ residual).
- :func:`dequant_int4` / :func:`dequant_int8`: unpack + scale AWQ / W8A16 weights to the compute dtype (prefill
  goes through cuBLAS).
- :func:`rope_cache_write`: RoPE on q and k of one decode token, k/v stored into the (int8/fp8) cache.
- :class:`DecodeAttention`: split-KV flash decoding over the static cache, reading int8/fp8 K/V directly
  (dequantized in registers: ``float32(stored) · scale`` rounded to the compute dtype, as the CPU path does).

Round half to even is done with the 1.5·2²³ trick after clamping (exact for |v| ≤ 2²²); the division by an
activation scale is IEEE ``div_rn`` as in PyTorch. Both are checked against PyTorch in ``tests/test_cuda.py``.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

# THEN: the GEMV's epilogue for the next linear (KernelConfig.gemv_then): none, SiLU · gate of the two output
# halves, or RMSNorm of the residual sum; the same codes as the compiled GEMVs'
from quant.runtime.cuda_ext import ACT_QUANT_DTYPE, THEN_NONE, THEN_NORM, THEN_SILU, pdl_ok

# weight formats (WFMT) and activation formats (AFMT) of the fused GEMV
W_FLOAT, W_INT8, W_INT4, W_FP8 = 0, 1, 2, 3
A_FLOAT, A_INT8, A_FP8, A_INT8_IN = 0, 1, 2, 3  # A_INT8_IN: x is int8 already (quantized by act_prep)
# prologues (PRO): plain x, RMSNorm(h) · w, SiLU(x[:, :K]) · x[:, K:]
PRO_NONE, PRO_RMSNORM, PRO_SILU = 0, 1, 2
# epilogue scale (SCALE): none, per output channel, one scalar
S_NONE, S_CHANNEL, S_SCALAR = 0, 1, 2
_ROUND_MAGIC = 12582912.0  # 1.5 · 2^23: (v + C) − C rounds a float32 |v| ≤ 2^22 to the nearest integer, ties to even


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


@triton.jit
def _prologue(x_ptr, offs_k, k_mask, K, rstd, norm_ptr, pre_ptr, a_ptr,
              dt: tl.constexpr, PRO: tl.constexpr, HAS_PRE: tl.constexpr, AFMT: tl.constexpr):
    """Elements offs_k of the one input row after the fused prologue: float32 (int32 for int8 activations)."""
    xp = x_ptr + offs_k
    if PRO == 2:
        a = tl.load(xp, mask=k_mask, other=0.0).to(tl.float32)
        g = tl.load(xp + K, mask=k_mask, other=0.0)
        xv = (a * tl.sigmoid(a)).to(dt) * g
    elif PRO == 1:
        h = tl.load(xp, mask=k_mask, other=0.0).to(tl.float32)
        xv = tl.load(norm_ptr + offs_k, mask=k_mask, other=0.0) * (h * rstd).to(dt)
    else:
        xv = tl.load(xp, mask=k_mask, other=0.0)
    return _act_quant(xv, offs_k, k_mask, pre_ptr, a_ptr, HAS_PRE, AFMT)


@triton.jit
def _act_quant(xv, offs_k, k_mask, pre_ptr, a_ptr, HAS_PRE: tl.constexpr, AFMT: tl.constexpr):
    """The prologue's last steps on xv (elements offs_k, the compute dtype): times the pre-quant scale, then
    SmoothQuant's int8 (AFMT 1) or FP8 (2) quantization by the static scale a: float32 (int32 for int8 values)."""
    if HAS_PRE:
        xv = xv * tl.load(pre_ptr + offs_k, mask=k_mask, other=0.0)
    if AFMT == 1:
        v = tl.div_rn(xv.to(tl.float32), tl.load(a_ptr))
        v = tl.minimum(tl.maximum(v, -128.0), 127.0)
        out = ((v + 12582912.0) - 12582912.0).to(tl.int32)
    elif AFMT == 2:
        v = tl.div_rn(xv.to(tl.float32), tl.load(a_ptr))
        v = tl.minimum(tl.maximum(v, -448.0), 448.0)
        out = v.to(tl.float8e4nv, fp_downcast_rounding="rtne").to(tl.float32)
    elif AFMT == 3:  # int8 already quantized (act_prep)
        out = xv.to(tl.int32)
    else:  # the compute dtype, or fp8 already quantized
        out = xv.to(tl.float32)
    return out


# int32 word of 4 int8 → 4 float32 holding 2^23 + (q + 128): flip the sign bits once (offset binary), then one
# byte permute per weight puts the byte under the exponent bits of 2^23 (0x4B000000).
_I8_TO_F32_ASM = tl.constexpr("""{
.reg .b32 t, m;
xor.b32 t, $4, 0x80808080;
mov.b32 m, 0x4B000000;
prmt.b32 $0, t, m, 0x7440;
prmt.b32 $1, t, m, 0x7441;
prmt.b32 $2, t, m, 0x7442;
prmt.b32 $3, t, m, 0x7443;
}""")
# int32 word of 4 int8 → 4 float16 (two half2): flip the sign bits, put each byte under float16's 1024 exponent
# (0x64), subtract 1024 + 128: exact for every int8.
_I8_TO_F16_ASM = tl.constexpr("""{
.reg .b32 t, m, c;
xor.b32 t, $2, 0x80808080;
mov.b32 m, 0x64646464;
mov.b32 c, 0x64806480;
prmt.b32 $0, t, m, 0x5140;
prmt.b32 $1, t, m, 0x5342;
sub.f16x2 $0, $0, c;
sub.f16x2 $1, $1, c;
}""")
# int32 word of 4 e4m3 → 4 float32, exactly (every e4m3 value is a float16): the sm_89+ pair converter, then
# half → float.
_E4M3_TO_F32_ASM = tl.constexpr("""{
.reg .b16 lo, hi, a, b, c, d;
.reg .b32 p, q;
mov.b32 {lo, hi}, $4;
cvt.rn.f16x2.e4m3x2 p, lo;
cvt.rn.f16x2.e4m3x2 q, hi;
mov.b32 {a, b}, p;
mov.b32 {c, d}, q;
cvt.f32.f16 $0, a;
cvt.f32.f16 $1, b;
cvt.f32.f16 $2, c;
cvt.f32.f16 $3, d;
}""")


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, ws_ptr, pre_ptr, norm_ptr, a_ptr, y_ptr, R, K, stride_wn, stride_wsn, eps,
                 xn_ptr, nw_ptr, cnt_ptr, N, tq_pre_ptr, tq_a_ptr,
                 WFMT: tl.constexpr, AFMT: tl.constexpr, PRO: tl.constexpr, HAS_PRE: tl.constexpr,
                 SCALE: tl.constexpr, RESIDUAL: tl.constexpr, GROUP: tl.constexpr, BLOCK_R: tl.constexpr,
                 BLOCK_K: tl.constexpr, CVT: tl.constexpr = 0, THEN: tl.constexpr = 0, NB: tl.constexpr = 4096,
                 TQ_PRE: tl.constexpr = False, TQ_AFMT: tl.constexpr = 0):
    """One input row (decode at batch 1). Each program: BLOCK_R weight rows (int4: packed row pairs) over all of
    K, accumulating element-wise in a [BLOCK_R, ·] tile and reducing once at the end. int8/int4 weights are read
    as int32 words (4 bytes of 4 consecutive k) and turned into float32 with the 2²³ magic number (OR + FSUB, or
    one PTX byte permute: ``CVT``) instead of int→float conversions, which run at a fraction of the FMA rate; fp8
    with bit moves or the sm_89+ pair converter (``CVT``).

    THEN, what the next linear's prologue would do, done here so that it needs no launch of its own:
    THEN_SILU: xn [1, N/2] = SiLU(f) · g of the two halves f, g of W·x (each program takes the rows of both halves
    for BLOCK_R / 2 outputs, interleaved; y is not written, only its dtype read); THEN_NORM (with RESIDUAL, N
    outputs): after the residual add, the last program to finish (an acq_rel counter in cnt, which it resets)
    writes RMSNorm(y) · nw into xn, as act_prep would (rows over NB in chunks of NB). Either then quantized for the
    next linear as act_prep would (TQ_PRE: times tq_pre; TQ_AFMT: int8 / fp8 by the scale tq_a; xn int8 / float8)."""
    dt: tl.constexpr = y_ptr.dtype.element_ty
    pid = tl.program_id(0)
    if THEN == 1:
        HB: tl.constexpr = BLOCK_R // 2
        j = tl.arange(0, BLOCK_R)
        pair = pid * HB + j // 2
        r_mask = pair < R // 2
        offs_r = pair + (j % 2) * (R // 2)  # even j: the first half's row, odd j: its partner in the second
    else:
        offs_r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        r_mask = offs_r < R
    rstd = 0.0
    if PRO == 1:
        ss = tl.zeros([BLOCK_K], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs = k0 + tl.arange(0, BLOCK_K)
            h = tl.load(x_ptr + offs, mask=offs < K, other=0.0).to(tl.float32)
            ss += h * h
        rstd = tl.rsqrt(tl.sum(ss, axis=0) / K + eps)
    if WFMT != 0:
        BLOCK_W: tl.constexpr = BLOCK_K // 4
        offs_w = tl.arange(0, BLOCK_W)
        if AFMT == 1 or AFMT == 3:
            acc = tl.zeros([BLOCK_R, BLOCK_W], tl.int32)
        else:
            acc = tl.zeros([BLOCK_R, BLOCK_W], tl.float32)
        acc2 = tl.zeros([BLOCK_R, BLOCK_W], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            wo = k0 // 4 + offs_w
            wm = r_mask[:, None] & (wo < K // 4)[None, :]
            words = tl.load(w_ptr + offs_r[:, None] * stride_wn + wo[None, :], mask=wm, other=0)
            if WFMT == 2:
                g = (k0 + 4 * offs_w) // GROUP
                se = tl.load(ws_ptr + (2 * offs_r)[:, None] * stride_wsn + g[None, :], mask=wm, other=0.0)
                so = tl.load(ws_ptr + (2 * offs_r + 1)[:, None] * stride_wsn + g[None, :], mask=wm, other=0.0)
                se = se.to(tl.float32)
                so = so.to(tl.float32)
            if CVT == 1 and (WFMT == 3 or (WFMT == 1 and AFMT == 0)):
                # 4 weights of a word to float32 in ~1 instruction each (PTX: prmt for int8, the sm_89+ e4m3x2
                # converter for fp8) instead of the ~5 shifts/masks/ORs of the bit moves below.
                if WFMT == 1:
                    fs = tl.inline_asm_elementwise(_I8_TO_F32_ASM, "=r,=r,=r,=r,r", [words],
                                                   dtype=(tl.float32, tl.float32, tl.float32, tl.float32),
                                                   is_pure=True, pack=1)
                else:
                    fs = tl.inline_asm_elementwise(_E4M3_TO_F32_ASM, "=r,=r,=r,=r,r", [words],
                                                   dtype=(tl.float32, tl.float32, tl.float32, tl.float32),
                                                   is_pure=True, pack=1)
                for i in tl.static_range(4):
                    offs_k = k0 + 4 * offs_w + i
                    wf = fs[i]
                    if WFMT == 1:
                        wf = wf - 8388736.0  # 2^23 + 128
                    acc += wf * _prologue(x_ptr, offs_k, offs_k < K, K, rstd, norm_ptr, pre_ptr, a_ptr, dt, PRO,
                                          HAS_PRE, AFMT)[None, :]
            else:
                for i in tl.static_range(4):
                    offs_k = k0 + 4 * offs_w + i
                    xq = _prologue(x_ptr, offs_k, offs_k < K, K, rstd, norm_ptr, pre_ptr, a_ptr, dt, PRO, HAS_PRE,
                                   AFMT)
                    byte = (words >> (8 * i)) & 0xFF
                    if WFMT == 3:
                        # e4m3 → float32 by moving its bits: exponent and mantissa to fp32's, sign to bit 31; that is
                        # the value · 2^-120 (fp32 bias 127, e4m3 bias 7; e4m3 subnormals land on fp32 subnormals).
                        # x carries 2^64 and the result 2^56 (x · 2^120 could overflow; products stay normal).
                        bits = ((byte & 0x7F) << 20) | ((byte & 0x80) << 24)
                        acc += bits.to(tl.float32, bitcast=True) * (xq * 1.8446744073709552e19)[None, :]  # 2^64
                    elif WFMT == 1:
                        u = byte ^ 0x80  # q + 128 (offset binary)
                        if AFMT == 1 or AFMT == 3:
                            acc += (u - 128) * xq[None, :]
                        else:
                            wf = (u | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0  # 2^23 + 128
                            acc += wf * xq[None, :]
                    else:
                        lo = (((byte & 0xF) ^ 8) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0  # 2^23 + 8
                        hi = (((byte >> 4) ^ 8) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
                        acc += (lo * se) * xq[None, :]
                        acc2 += (hi * so) * xq[None, :]
    else:
        acc = tl.zeros([BLOCK_R, BLOCK_K], tl.float32)
        acc2 = tl.zeros([BLOCK_R, BLOCK_K], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            xq = _prologue(x_ptr, offs_k, k_mask, K, rstd, norm_ptr, pre_ptr, a_ptr, dt, PRO, HAS_PRE, AFMT)
            wf = tl.load(w_ptr + offs_r[:, None] * stride_wn + offs_k[None, :],
                         mask=r_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
            acc += wf * xq[None, :]
    total = tl.sum(acc, axis=1)
    if WFMT == 3 and CVT == 0:
        total = total * 7.205759403792794e16  # 2^56
    if THEN == 1:
        out_p = pid * HB + tl.arange(0, HB)
        if WFMT == 2:  # packed row p holds outputs 2p (acc) and 2p + 1 (acc2)
            _store_silu_pair(total, xn_ptr, ws_ptr, offs_r, r_mask, 2 * out_p, out_p < R // 2, tq_pre_ptr, tq_a_ptr,
                             dt, 0, HB, TQ_PRE, TQ_AFMT)
            _store_silu_pair(tl.sum(acc2, axis=1), xn_ptr, ws_ptr, offs_r, r_mask, 2 * out_p + 1, out_p < R // 2,
                             tq_pre_ptr, tq_a_ptr, dt, 0, HB, TQ_PRE, TQ_AFMT)
        else:
            _store_silu_pair(total, xn_ptr, ws_ptr, offs_r, r_mask, out_p, out_p < R // 2, tq_pre_ptr, tq_a_ptr, dt,
                             SCALE, HB, TQ_PRE, TQ_AFMT)
    elif WFMT == 2:
        _store_row(total, y_ptr, ws_ptr, 2 * offs_r, r_mask, dt, 0, RESIDUAL)
        _store_row(tl.sum(acc2, axis=1), y_ptr, ws_ptr, 2 * offs_r + 1, r_mask, dt, 0, RESIDUAL)
    else:
        _store_row(total, y_ptr, ws_ptr, offs_r, r_mask, dt, SCALE, RESIDUAL)
    if THEN == 2:
        if _last_to_finish(cnt_ptr, tl.num_programs(0)):
            _norm_row(y_ptr, nw_ptr, xn_ptr, N, eps, tq_pre_ptr, tq_a_ptr, NB, TQ_PRE, TQ_AFMT)


@triton.jit
def _last_to_finish(cnt_ptr, count):
    """Whether this program is the last of ``count`` to get here, after every thread's stores (the acq_rel add
    releases this program's and acquires the others'; read them past the non-coherent L1, ``.cg``). The last one
    resets the counter, so the next launch, or a CUDA graph's replay, finds it at zero."""
    tl.debug_barrier()  # every thread's stores before the release below
    last = tl.atomic_add(cnt_ptr, 1, sem="acq_rel", scope="gpu") == count - 1
    if last:
        tl.store(cnt_ptr, 0)
    return last


@triton.jit
def _store_act(out_ptr, offs, mask, res, AFMT: tl.constexpr):
    """Stores _act_quant's result as act_prep does: int8 / fp8 values exactly, else rounded to out's dtype."""
    if AFMT == 2:
        res = res.to(tl.float8e4nv, fp_downcast_rounding="rtne")  # (exact: already fp8 values)
    tl.store(out_ptr + offs, res.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _store_silu_pair(total, out_ptr, ws_ptr, offs_r, r_mask, offs_y, y_mask, pre_ptr, a_ptr, dt: tl.constexpr,
                     SCALE: tl.constexpr, HB: tl.constexpr, HAS_PRE: tl.constexpr, AFMT: tl.constexpr):
    """total [2·HB]: f, g, f, g, … (rows offs_r) → out[offs_y] = SiLU(f) · g, f and g rounded to dt first and SiLU
    computed as act_prep computes it (then _act_quant): the values the unfused path gives."""
    out = total
    if SCALE == 1:
        out = out * tl.load(ws_ptr + offs_r, mask=r_mask, other=0.0).to(tl.float32)
    elif SCALE == 2:
        out = out * tl.load(ws_ptr).to(tl.float32)
    f, g = tl.split(tl.reshape(out.to(dt), [HB, 2]))
    a = f.to(tl.float32)
    xv = (a * tl.sigmoid(a)).to(dt) * g
    _store_act(out_ptr, offs_y, y_mask, _act_quant(xv, offs_y, y_mask, pre_ptr, a_ptr, HAS_PRE, AFMT), AFMT)


@triton.jit
def _norm_row(h_ptr, w_ptr, out_ptr, N, eps, pre_ptr, a_ptr, NB: tl.constexpr, HAS_PRE: tl.constexpr,
              AFMT: tl.constexpr):
    """out [N] = w · (h · rsqrt(mean(h²) + eps)) rounded to h's dtype first (act_prep's RMSNorm; then _act_quant),
    h read past the L1 (other programs wrote it). Serial (the last program, after the whole GEMV): a row within NB
    is loaded once with its norm weight, one L2 round trip; longer rows in NB chunks, two passes."""
    dt: tl.constexpr = h_ptr.dtype.element_ty
    if N <= NB:
        offs = tl.arange(0, NB)
        mask = offs < N
        h = tl.load(h_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float32)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0)
        rstd = tl.rsqrt(tl.sum(h * h, axis=0) / N + eps)
        _store_act(out_ptr, offs, mask, _act_quant(w * (h * rstd).to(dt), offs, mask, pre_ptr, a_ptr, HAS_PRE, AFMT),
                   AFMT)
    else:
        ss = 0.0
        for n0 in range(0, N, NB):
            offs = n0 + tl.arange(0, NB)
            h = tl.load(h_ptr + offs, mask=offs < N, other=0.0, cache_modifier=".cg").to(tl.float32)
            ss += tl.sum(h * h, axis=0)
        rstd = tl.rsqrt(ss / N + eps)
        for n0 in range(0, N, NB):
            offs = n0 + tl.arange(0, NB)
            h = tl.load(h_ptr + offs, mask=offs < N, other=0.0, cache_modifier=".cg").to(tl.float32)
            xv = tl.load(w_ptr + offs, mask=offs < N, other=0.0) * (h * rstd).to(dt)
            _store_act(out_ptr, offs, offs < N, _act_quant(xv, offs, offs < N, pre_ptr, a_ptr, HAS_PRE, AFMT), AFMT)


@triton.jit
def _store_row(acc, y_ptr, ws_ptr, offs_n, n_mask, dt: tl.constexpr, SCALE: tl.constexpr, RESIDUAL: tl.constexpr):
    out = acc.to(tl.float32)
    if SCALE == 1:
        out = out * tl.load(ws_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    elif SCALE == 2:
        out = out * tl.load(ws_ptr).to(tl.float32)
    yv = out.to(dt)
    if RESIDUAL:
        yv = tl.load(y_ptr + offs_n, mask=n_mask, other=0.0) + yv
    tl.store(y_ptr + offs_n, yv, mask=n_mask)


@triton.jit
def _gemv_store(acc, y_ptr, ws_ptr, offs_m, m_mask, offs_n, n_mask, stride_ym, dt: tl.constexpr,
                SCALE: tl.constexpr, RESIDUAL: tl.constexpr):
    out = acc.to(tl.float32)
    if SCALE == 1:
        out = out * tl.load(ws_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    elif SCALE == 2:
        out = out * tl.load(ws_ptr).to(tl.float32)
    yv = out.to(dt)
    yp = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    ym = m_mask[:, None] & n_mask[None, :]
    if RESIDUAL:
        yv = tl.load(yp, mask=ym, other=0.0) + yv
    tl.store(yp, yv, mask=ym)


# (BLOCK_R, BLOCK_K, num_warps) per weight format; BLOCK_R counts weight rows (int4: packed pairs, so 2·BLOCK_R
# outputs), BLOCK_K input columns. Chosen with ``python -m experiments.bench --sweep`` on an H200.
GEMV_CONFIG = {W_FLOAT: (2, 1024, 4), W_INT8: (8, 1024, 4), W_FP8: (8, 512, 4), W_INT4: (2, 2048, 4)}
GEMV_MAX_M = 1
# The longest row the GEMV's RMSNorm epilogue (THEN_NORM) loads at once: every hidden size to 4096 in one L2 round
# trip (chunks of 1024 took ~6 us a norm on an H200, 7B, 2026-12-05 profile), longer rows in chunks of this.
NORM_ROW = 4096
# Per weight format: 1 = convert weights with the PTX sequences above (int8: W8A16 only; SmoothQuant multiplies in
# int32), 0 = the portable bit moves. Chosen from the batch-1 decode rows of ``python -m experiments.bench`` on an
# H200 (the numbers: docs/architecture.md, measured choices); the sweep times both.
GEMV_CVT = {W_INT8: 1, W_FP8: 1}


def gemv(x: torch.Tensor, w: torch.Tensor, *, wfmt: int, out: torch.Tensor | None = None,
         wscale: torch.Tensor | None = None, scale_mode: int = S_NONE, group: int = 0,
         prequant: torch.Tensor | None = None, act_scale: torch.Tensor | None = None, afmt: int = A_FLOAT,
         norm: torch.Tensor | None = None, eps: float = 1e-6, silu: bool = False, residual: torch.Tensor | None = None,
         config: tuple[int, int, int] | None = None, cvt: int | None = None,
         out_dtype: torch.dtype | None = None, then_silu: bool = False, then_norm: torch.Tensor | None = None,
         counter: torch.Tensor | None = None, then_quant: tuple | None = None) -> torch.Tensor:
    """y [1, N] = W · prologue(x) for one row x [1, K] (silu: [1, 2K]); residual [1, N]: y added in place.
    ``out_dtype``: y's dtype when x is not in the compute dtype (pre-quantized int8/fp8 x). ``config`` (tile) and
    ``cvt`` (weight conversion) default to the tuned tables below. The epilogue may also do the next linear's
    prologue (the kernel's THEN): ``then_silu`` returns SiLU(y[:, :N/2]) · y[:, N/2:] [1, N/2] instead of y;
    ``then_norm`` (the next RMSNorm's weight, with ``residual`` and ``counter``, one int32 zero that the call leaves
    zero) returns RMSNorm(residual + y) · then_norm after the add. ``then_quant`` (prequant or None, act_scale [1],
    A_INT8 or A_FP8), with either: that result quantized for the next linear as act_prep would (int8 / float8)."""
    assert x.shape[0] == 1 and x.stride(-1) == 1 and w.stride(-1) == 1
    R, K = w.shape
    N = 2 * R if wfmt == W_INT4 else R
    assert x.shape[1] == (2 * K if silu else K)
    then = THEN_SILU if then_silu else THEN_NORM if then_norm is not None else THEN_NONE
    assert then != THEN_SILU or (then_norm is None and residual is None and out is None and R % 2 == 0)
    assert then != THEN_NORM or (residual is not None and counter is not None and counter.dtype == torch.int32)
    assert then_quant is None or then != THEN_NONE
    tq_pre, tq_a, tq_afmt = then_quant or (None, None, A_FLOAT)
    dt = out_dtype or x.dtype
    if residual is not None:
        y = residual
    elif then_silu:
        y = torch.empty(0, dtype=dt, device=x.device)  # the kernel reads only its dtype
    else:
        y = out if out is not None else torch.empty(1, N, dtype=dt, device=x.device)
    br, bk, warps = config or GEMV_CONFIG[wfmt]
    if then_silu:
        br = max(2, br)  # a program takes both halves' rows
    bk = min(bk, max(16, _pow2(K)))
    if wfmt in (W_INT8, W_INT4, W_FP8):
        assert K % 4 == 0 and w.stride(0) % 4 == 0
        if wfmt == W_INT4:
            assert group % 4 == 0
        w_arg, stride_w = w.view(torch.int32), w.stride(0) // 4
    else:
        w_arg, stride_w = w, w.stride(0)
    dummy = x
    xn = y if then == THEN_NONE else torch.empty(1, N // 2 if then_silu else N, dtype=_AFMT_DTYPE.get(tq_afmt, dt),
                                                  device=x.device)
    _gemv_kernel[(triton.cdiv(R // 2, br // 2) if then_silu else triton.cdiv(R, br),)](
        x, w_arg, wscale if wscale is not None else dummy, prequant if prequant is not None else dummy,
        norm if norm is not None else dummy, act_scale if act_scale is not None else dummy, y,
        R, K, stride_w, wscale.stride(0) if (wscale is not None and wscale.dim() == 2) else 0, float(eps),
        xn, then_norm if then_norm is not None else dummy, counter if counter is not None else xn, N,
        tq_pre if tq_pre is not None else dummy, tq_a if tq_a is not None else dummy,
        WFMT=wfmt, AFMT=afmt, PRO=PRO_SILU if silu else PRO_RMSNORM if norm is not None else PRO_NONE,
        HAS_PRE=prequant is not None, SCALE=scale_mode, RESIDUAL=residual is not None, GROUP=max(group, 4),
        BLOCK_R=br, BLOCK_K=bk, CVT=GEMV_CVT.get(wfmt, 0) if cvt is None else cvt, THEN=then,
        NB=min(NORM_ROW, _pow2(N)), TQ_PRE=tq_pre is not None, TQ_AFMT=tq_afmt, num_warps=warps)
    return xn


# The untimed-tile rule (W4K_TILES at 32 and 64 rows, WQ_WIDE_CONFIG), for tiles no GPU has timed yet: compiled for
# sm_90, no register spilled in the main loop under Triton 3.6 (the GPU image's) or 3.9 (CI's), within an sm_90
# block's shared memory; of those within 10 % of the fewest warp-instructions per weight, the most pipeline stages
# (bytes in flight). Why not the fewest instructions alone:
# in the k-packed kernel's timed sweep at batch 1 (H200, 7B), (64, 32, 2, 2), the fewest of its 36 tiles
# (0.079 per weight against 0.100), ran 65 % slower than (32, 64, 4, 4), and every two-stage tile ranked low.

# -- INT4 × fp16 through the tensor cores for 1–64 rows, on a k-packed copy ------------------------------------------
# Turning int4 into float32 one weight at a time on the CUDA cores costs ≥ 3 instructions per weight (mask-or,
# subtract, FMA), more than the H200 issues while its memory streams 8·10¹² int4 weights/s: the GEMV above and
# tinygemm reach ~30 % of copy bandwidth. As Marlin does, two weights become a half2 in one LOP3 ((w & 0x000F000F)
# | 0x6400_6400 = 1024 + q_u in each half), one HSUB2/HFMA2 makes them q exactly, and the products run on the tensor
# cores (tl.dot with the rows padded to 16, fp32 accumulation); the group scale multiplies each group's partial
# sums once. Repacked once at load: each int32 word holds 8 k of *one* row, sub-block o of a tile of KW words per
# row (o = 0..7, k = tile·8·KW + o·KW + j for word j) in nibble W4K_NIBBLE[o], the order in which the PTX below
# yields them; offset binary q + 8.
# (BLOCK_N, KW, warps, stages) per row tile (rows padded to 16, 32, 64), all with the packing's KW, W4K_KW. Row tile
# 16: the fastest at batch 1 of ``python -m experiments.kernel_bench --sweep`` on an H200 (LLaMa-2-7B layer shapes;
# on Llama-3-8B's, (32, 64, 2, 4) was 0.2 % faster). Row tiles 32 and 64: that tile spills 117 registers at 32 rows
# and needs 312 KiB of shared memory at 64 (an H200 gives a block 227), so these are KW-64 tiles chosen by the
# untimed-tile rule above from experiments/gpu/sass_loop.py --sweep-w4k (results/gpu/kernels, stage 5); timed end to
# end only as a whole (batch 32: 0.87× FP16 against tinygemm's 0.43×, stage 7), not against other tiles.
W4K_KW = 64
W4K_TILES = {16: (32, 64, 4, 4), 32: (64, 64, 8, 4), 64: (32, 64, 4, 2)}
W4K_MAX_M = 64  # rows of one program (the weights are read once for all of them); KernelConfig.w4k_rows' bound
W4K_NIBBLE = (0, 4, 1, 5, 2, 6, 3, 7)
_W4K_HALF_ASM = tl.constexpr("""{
.reg .b32 m, u, r0, r1, r2, r3, c, d, e;
mov.b32 m, 0x64006400;
mov.b32 c, 0x64086408;
mov.b32 d, 0x2C002C00;
mov.b32 e, 0xD480D480;
shr.u32 u, $8, 8;
lop3.b32 r0, $8, 0x000F000F, m, 0xEA;
lop3.b32 r1, $8, 0x00F000F0, m, 0xEA;
lop3.b32 r2, u, 0x000F000F, m, 0xEA;
lop3.b32 r3, u, 0x00F000F0, m, 0xEA;
sub.f16x2 r0, r0, c;
fma.rn.f16x2 r1, r1, d, e;
sub.f16x2 r2, r2, c;
fma.rn.f16x2 r3, r3, d, e;
mov.b32 {$0, $1}, r0;
mov.b32 {$2, $3}, r1;
mov.b32 {$4, $5}, r2;
mov.b32 {$6, $7}, r3;
}""")  # outputs: sub-blocks 0..7 = nibbles 0, 4, 1, 5, 2, 6, 3, 7; 0x2C00 = 1/16, 0xD480 = -72: (1024 + 16 q_u)/16 - 72


def w4k_kw(K: int, group: int, kw: int) -> int | None:
    """The tile width (words per row per tile) for K and group: the largest power of two ≤ ``kw``, ≥ 16 (a
    tensor-core step), that divides K/8 into whole tiles, each sub-block within one group and each tile of 8 · kw
    k holding whole groups (_w4k_mm_kernel applies a scale per group inside a tile and starts each tile afresh);
    None if there is none: groups of 96 (no power of two makes a tile of whole groups), or wider than a tile."""
    kw = min(kw, group)
    while kw >= 16 and (K % (8 * kw) or group % kw or (8 * kw) % group):
        kw //= 2
    return kw if kw >= 16 else None


def pack_int4_k(q: torch.Tensor, kw: int) -> torch.Tensor:
    """int [N, K] in [-8, 7] → int32 [N, K/8], the k-packed layout for tile width ``kw`` (see above)."""
    n, k = q.shape
    assert k % (8 * kw) == 0
    qu = (q.to(torch.int64) + 8).reshape(n, k // (8 * kw), 8, kw)  # [n, tile, sub-block o, word j]
    words = torch.zeros(n, k // (8 * kw), kw, dtype=torch.int64, device=q.device)
    for o, nib in enumerate(W4K_NIBBLE):
        words |= qu[:, :, o, :] << (4 * nib)
    words = words.reshape(n, k // 8)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def unpack_int4_k(w: torch.Tensor, kw: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4_k`: int32 [N, K/8] → int8 [N, K] in [-8, 7]."""
    n, kw8 = w.shape
    words = w.to(torch.int64).reshape(n, kw8 // kw, 1, kw) & 0xFFFFFFFF
    shifts = 4 * torch.tensor(W4K_NIBBLE, device=w.device).reshape(1, 1, 8, 1)
    return (((words >> shifts) & 0xF) - 8).to(torch.int8).reshape(n, kw8 * 8)


@triton.jit
def _w4k_mm_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, TILES, stride_xm, stride_wn, stride_sn, stride_ym,
                   GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KW: tl.constexpr,
                   RESIDUAL: tl.constexpr, EVEN_N: tl.constexpr, CVT: tl.constexpr):
    dt: tl.constexpr = y_ptr.dtype.element_ty
    SUBS: tl.constexpr = GROUP // KW  # sub-blocks per group (KW divides GROUP, GROUP divides 8 · KW: w4k_kw)
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)  # every row in one program: each weight tile is read once for all of them
    m_mask = offs_m < M
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_j = tl.arange(0, KW)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    w_rows = w_ptr + offs_n[:, None] * stride_wn + offs_j[None, :]
    x_rows = x_ptr + offs_m[:, None] * stride_xm + offs_j[None, :]
    for t in range(0, TILES):
        if EVEN_N:
            words = tl.load(w_rows + t * KW)
        else:
            words = tl.load(w_rows + t * KW, mask=n_mask[:, None], other=0)
        if CVT == 1:
            qs = tl.inline_asm_elementwise(_W4K_HALF_ASM, "=h,=h,=h,=h,=h,=h,=h,=h,r", [words],
                                           dtype=(tl.float16,) * 8, is_pure=True, pack=1)
        part = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for o in tl.static_range(8):
            if CVT == 1:
                qo = qs[o]
            else:  # portable (and Triton's interpreter, which runs no PTX): nibble W4K_NIBBLE[o], offset 8
                qo = (((words >> (4 * (o // 2 + 4 * (o % 2)))) & 0xF) - 8).to(tl.float16)
            xo = tl.load(x_rows + (t * 8 + o) * KW, mask=m_mask[:, None], other=0.0)
            part = tl.dot(xo, tl.trans(qo), part)
            if (o + 1) % SUBS == 0:
                g = (t * 8 + o) * KW // GROUP
                s = tl.load(s_ptr + offs_n * stride_sn + g, mask=n_mask, other=0.0).to(tl.float32)
                acc += part * s[None, :]
                part = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    _gemv_store(acc, y_ptr, s_ptr, offs_m, m_mask, offs_n, n_mask, stride_ym, dt, 0, RESIDUAL)


def w4k_mm(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, *, group: int, kw: int,
           residual: torch.Tensor | None = None, tile: tuple[int, int, int, int] | None = None,
           cvt: int = 1) -> torch.Tensor:
    """y [M, N] = x · (q · s)ᵀ for M ≤ W4K_MAX_M rows of float16 x [M, K]: w int32 [N, K/8] from
    :func:`pack_int4_k` with tile width ``kw``, scales [N, K/group]; residual [M, N]: y added in place. ``tile``:
    (BLOCK_N, ·, warps, stages) — its KW is the packing's, ``kw``; None: W4K_TILES at the rows' tile. The rows are
    padded to the tensor-core tile (16, 32 or 64). ``cvt``: 1 the PTX conversion above, 0 the portable one (same
    values)."""
    m, k = x.shape
    n = w.shape[0]
    assert m <= W4K_MAX_M and x.dtype == torch.float16 and x.stride(-1) == 1 and w.dtype == torch.int32
    assert w.shape[1] * 8 == k and w4k_kw(k, group, kw) == kw and scales.shape == (n, k // group)
    block_m = max(16, _pow2(m))
    block_n, _, warps, stages = tile or W4K_TILES[block_m]
    y = residual if residual is not None else torch.empty(m, n, dtype=x.dtype, device=x.device)
    _w4k_mm_kernel[(triton.cdiv(n, block_n),)](
        x, w, scales, y, m, n, k // (8 * kw), x.stride(0), w.stride(0), scales.stride(0), y.stride(0),
        GROUP=group, BLOCK_M=block_m, BLOCK_N=block_n, KW=kw, RESIDUAL=residual is not None,
        EVEN_N=n % block_n == 0, CVT=cvt, num_warps=warps, num_stages=stages)
    return y


# -- tl.dot path for 2–64 rows (and SmoothQuant's int8 GEMM): weights dequantized in registers -----------------------
@triton.jit
def _wq_mm_kernel(x_ptr, w_ptr, ws_ptr, y_ptr, M, R, K, stride_xm, stride_wn, stride_wsn, stride_ym,
                  part_ptr, cnt_ptr, K_SPLIT,
                  WFMT: tl.constexpr, AFMT: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, RESIDUAL: tl.constexpr, CVT: tl.constexpr = 0,
                  SPLIT: tl.constexpr = 1, GROUP_M: tl.constexpr = 0):
    """SPLIT > 1 (int8 weights): program (r, m, s) sums k in [s · K_SPLIT, (s + 1) · K_SPLIT), stores its partial
    (float32; int32 for int8 x, exact) in part [SPLIT, M, R], and the last of a tile's SPLIT programs to finish (an
    acq_rel counter in cnt, which it resets for the next call) adds the partials in split order and stores y: more
    programs than tiles, for linears whose tiles alone leave SMs idle, the same result whichever finishes last.
    GROUP_M > 0 (SPLIT 1): the programs, in launch order, take the output tiles GROUP_M tiles of x's rows at a time,
    those fastest, so that the programs resident together share each weight tile (read from memory once, not once
    per tile of rows) while x's rows stay in L2; 0: x's tile slowest. Which program computes a tile changes, not
    how."""
    dt: tl.constexpr = y_ptr.dtype.element_ty
    pid_r = tl.program_id(0)
    pid_m = tl.program_id(1)
    if GROUP_M > 0:  # (the launch order: axis 0 fastest)
        pid_m, pid_r = _tile_of(pid_m * tl.num_programs(0) + pid_r, tl.num_programs(1), tl.num_programs(0), GROUP_M)
    k_lo = tl.multiple_of(tl.program_id(2) * K_SPLIT, BLOCK_K)  # (K_SPLIT: whole K tiles)
    k_hi = K
    if SPLIT > 1:
        k_hi = tl.minimum(K, k_lo + K_SPLIT)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    if AFMT == 1:
        acc = tl.zeros([BLOCK_M, BLOCK_R], tl.int32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_R], tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_R], tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :],
                    other=0.0)
        wp = w_ptr + offs_r[:, None] * stride_wn + offs_k[None, :]
        wm = r_mask[:, None] & k_mask[None, :]
        if WFMT == 2:
            p = tl.load(wp, mask=wm, other=0).to(tl.int32)
            lo = ((p << 28) >> 28).to(dt)
            hi = (p >> 4).to(dt)
            g = k0 // GROUP
            se = tl.load(ws_ptr + (2 * offs_r) * stride_wsn + g, mask=r_mask, other=0.0).to(tl.float32)
            so = tl.load(ws_ptr + (2 * offs_r + 1) * stride_wsn + g, mask=r_mask, other=0.0).to(tl.float32)
            acc += tl.dot(x, tl.trans(lo)) * se[None, :]
            acc2 += tl.dot(x, tl.trans(hi)) * so[None, :]
        elif AFMT == 1:
            acc += tl.dot(x, tl.trans(tl.load(wp, mask=wm, other=0)))
        elif CVT == 1:
            q = tl.inline_asm_elementwise(_I8_TO_F16_ASM, "=r,=r,r", [tl.load(wp, mask=wm, other=0)],
                                          dtype=tl.float16, is_pure=True, pack=4)
            acc += tl.dot(x, tl.trans(q))
        else:
            acc += tl.dot(x, tl.trans(tl.load(wp, mask=wm, other=0).to(dt)))
    if WFMT == 2:
        _gemv_store(acc, y_ptr, ws_ptr, offs_m, m_mask, 2 * offs_r, r_mask, stride_ym, dt, 0, RESIDUAL)
        _gemv_store(acc2, y_ptr, ws_ptr, offs_m, m_mask, 2 * offs_r + 1, r_mask, stride_ym, dt, 0, RESIDUAL)
    elif SPLIT == 1:
        _gemv_store(acc, y_ptr, ws_ptr, offs_m, m_mask, offs_r, r_mask, stride_ym, dt, 1, RESIDUAL)
    else:
        mr = m_mask[:, None] & r_mask[None, :]
        parts = part_ptr + offs_m[:, None] * R + offs_r[None, :]
        tl.store(parts + tl.program_id(2) * M * R, acc, mask=mr)
        if _last_to_finish(cnt_ptr + pid_m * tl.num_programs(0) + pid_r, SPLIT):
            total = tl.zeros([BLOCK_M, BLOCK_R], acc.dtype)
            for sp in tl.static_range(SPLIT):  # past a non-coherent L1: other programs wrote them
                total += tl.load(parts + sp * M * R, mask=mr, other=0.0, cache_modifier=".cg")
            _gemv_store(total, y_ptr, ws_ptr, offs_m, m_mask, offs_r, r_mask, stride_ym, dt, 1, RESIDUAL)


WQ_MM_MAX_M = 64
# (BLOCK_R, BLOCK_K, num_warps, num_stages) per weight format (int8 activations: key A_INT8); BLOCK_M = 16..64.
# Measured on the 7B shapes (H200): BLOCK_R 16 leaves the weight stream short of bytes in flight at 8 rows.
WQ_MM_CONFIG = {W_INT8: (32, 256, 4, 3), W_INT4: (32, 128, 4, 4), A_INT8: (32, 256, 4, 3)}
WQ_MM_CONFIG_32 = {W_INT8: (64, 128, 4, 4), W_INT4: (32, 128, 4, 4), A_INT8: (32, 128, 4, 4)}  # 17–64 rows
# KernelConfig.wq_wide: the int8 formats at 2–64 rows on 128-channel tiles, per activation format (float x: W8A16,
# with the byte-permute conversion; A_INT8: SmoothQuant) and row tile (16, 32, 64): (BLOCK_R, BLOCK_K, warps,
# stages). Each warp's x fragments then serve more output channels: W8A16 0.08–0.11 warp-instructions per weight in
# the loop against 0.13–0.23 on WQ_MM_CONFIG's tiles (sm_90, experiments/gpu/sass_loop.py); chosen by the
# untimed-tile rule (above W4K_TILES). Too few tiles for the o / down projections' 4096 channels alone (32
# programs), hence K split with them (wq_fill_split). Timed end to end against the narrow tiles (stage 7: W8A16
# ahead at batches 4 and 32, 0.02 behind at 16; SmoothQuant behind at 16 and 32, so only W8A16 takes them by
# default), not against other wide tiles.
WQ_WIDE_CONFIG = {A_FLOAT: {16: (128, 128, 2, 4), 32: (128, 128, 2, 4), 64: (128, 128, 4, 4)},
                  A_INT8: {16: (128, 256, 2, 4), 32: (128, 128, 2, 4), 64: (128, 256, 4, 4)}}
# SmoothQuant prefill through Triton (BM, BR, BK, warps, stages), with its output tiles grouped
# (KernelConfig.prefill_group): each of the 7B layer's four linears alone at 1024 rows on an H100 (experiments.bench
# --sweep, 2026-12-07, experiments/results/gpu/kernels stage 27) 425 µs a layer, 890–1085 int8 TOP/s, against 527
# in the plain order, 521 for torch._int_mm (cuBLASLt) and 569 for cuBLAS fp16. (128, 256, 128, 8, 4) grouped was as
# fast alone and 1–3 % faster end to end at 1024 rows, but it makes half the programs: at 512 rows o / down would
# run 64 of them on 132 SMs. Below 1024 rows it was not timed; this tile is kept for them.
INT8_GEMM_CONFIG = (128, 128, 64, 4, 4)
# Weight-only prefill (more than WQ_MM_MAX_M rows) through the same kernel, weights dequantized in registers instead
# of a whole float16 copy written per linear per call (KernelConfig.wq_prefill); (BM, BR, BK, warps, stages), BR in
# stored rows (INT4: two output channels each), BK at most the INT4 group. SmoothQuant's tile, not yet swept.
WQ_PREFILL_CONFIG = {W_INT8: (128, 128, 64, 4, 4), W_INT4: (128, 64, 64, 8, 3)}  # INT4: two accumulators


def wq_mm(x: torch.Tensor, w: torch.Tensor, wscale: torch.Tensor, *, wfmt: int, group: int = 0, afmt: int = A_FLOAT,
          dtype: torch.dtype | None = None, residual: torch.Tensor | None = None,
          config: tuple[int, ...] | None = None, cvt: int = 0, counter: torch.Tensor | None = None,
          split: int | None = None, group_m: int = 0) -> torch.Tensor:
    """y [M, N] = x @ dequant(W)ᵀ · scale for int8 (per-channel scale) or int4 AWQ (group scales) weights, x in
    fp16/bf16; or, afmt=A_INT8, int8 x @ int8 Wᵀ in int32 times the per-channel ``wscale`` (= a · s). ``config``
    None: the tuned tile for M rows (above WQ_MM_MAX_M the prefill tiles, INT8_GEMM_CONFIG / WQ_PREFILL_CONFIG).
    ``cvt`` 1 (int8 weights, float16 x): int8 → float16 by the PTX byte permute (_I8_TO_F16_ASM) instead of
    Triton's int-to-float conversion (one I2F per weight); the same values. Not in Triton's interpreter.
    ``counter`` (int8 weights; KernelConfig.wq_wide): at most WQ_MM_MAX_M rows run on the wide tiles
    (WQ_WIDE_CONFIG) with K cut into ``split`` ranges of whole K tiles (None: wq_fill_split for the device), one
    program each, their partials added by the last (the kernel's docstring). The counter: int32 zeros, one per
    output tile, which every call leaves zero again (held by the caller, so a CUDA graph can replay it).
    ``group_m`` > 0, above WQ_MM_MAX_M rows (prefill): the output tiles in groups of that many tiles of x's rows,
    those fastest (the kernel's GROUP_M); the same result."""
    M, K = x.shape
    R = w.shape[0]
    N = 2 * R if wfmt == W_INT4 else R
    dtype = dtype or x.dtype
    y = residual if residual is not None else torch.empty(M, N, dtype=dtype, device=x.device)
    wide = counter is not None and M <= WQ_MM_MAX_M
    bm = max(16, min(64, _pow2(M)))
    if config is None:
        if M > WQ_MM_MAX_M:
            config = INT8_GEMM_CONFIG if afmt == A_INT8 else WQ_PREFILL_CONFIG[wfmt]
        elif wide:
            config = WQ_WIDE_CONFIG[afmt][bm]
        else:
            config = (WQ_MM_CONFIG if M <= 16 else WQ_MM_CONFIG_32)[A_INT8 if afmt == A_INT8 else wfmt]
    if len(config) == 5:
        bm, br, bk, warps, stages = config
    else:
        br, bk, warps, stages = config
    assert not cvt or (wfmt == W_INT8 and afmt == A_FLOAT and x.dtype == torch.float16)
    if wfmt == W_INT4:
        bk = min(bk, group)
        assert group % bk == 0
    grid = (triton.cdiv(R, br), triton.cdiv(M, bm))
    if split is None:
        split = wq_fill_split(grid[0], torch.cuda.get_device_properties(x.device).multi_processor_count, M, K) \
            if wide else 1
    k_split = triton.cdiv(triton.cdiv(K, bk), split) * bk
    split = triton.cdiv(K, k_split)  # every range holds at least one K tile
    part = y
    if split > 1:
        assert wfmt == W_INT8 and afmt in (A_FLOAT, A_INT8) and M <= WQ_MM_MAX_M
        assert counter is not None and counter.dtype == torch.int32 and counter.numel() >= grid[0] * grid[1]
        part = torch.empty(split, M, R, dtype=torch.int32 if afmt == A_INT8 else torch.float32, device=x.device)
    _wq_mm_kernel[grid + (split,)](x, w, wscale, y, M, R, K, x.stride(0), w.stride(0),
                                   wscale.stride(0) if wscale.dim() == 2 else 0, y.stride(0),
                                   part, part if counter is None else counter, k_split,
                                   WFMT=wfmt, AFMT=afmt, GROUP=max(group, 1), BLOCK_M=bm, BLOCK_R=br, BLOCK_K=bk,
                                   RESIDUAL=residual is not None, CVT=cvt, SPLIT=split,
                                   GROUP_M=group_m if M > WQ_MM_MAX_M else 0, num_warps=warps, num_stages=stages)
    return y


@triton.jit
def _tile_of(tile, num_m, num_n, GROUP_M: tl.constexpr):
    """Output tile ``tile`` in launch order → (its tile of x's rows, its tile of channels): GROUP_M tiles of rows at
    a time, those fastest (the prefill kernels' GROUP_M)."""
    in_group = GROUP_M * num_n
    first_m = (tile // in_group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (tile % in_group) % size_m, (tile % in_group) // size_m


# -- weight-only prefill: the weight as the tensor cores' A operand, dequantized in registers -------------------------
@triton.jit
def _wq_prefill_t_kernel(x_ptr, w_ptr, ws_ptr, y_ptr, M, R, K, stride_xm, stride_wn, stride_wsn, stride_ym,
                         WFMT: tl.constexpr, GROUP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
                         RESIDUAL: tl.constexpr):
    """yᵀ tile [BLOCK_R channels, BLOCK_M rows] = dequant(W) · xᵀ: the weight tile, converted in registers, is the
    MMA's A operand (on sm_90 wgmma takes A from registers, B from shared memory), x's tile the B operand as loaded.
    Putting the dequantized weight on the B side instead makes it go through shared memory once more (wq_mm above,
    KernelConfig.wq_prefill before stage 28). W8A16: int8 → float exactly, the channel's scale on the float32 sum;
    W4A16 (stored layout: byte r holds channels 2r (low nibble) and 2r + 1 at the same k): q · s rounded to x's dtype,
    as the dequantize-then-cuBLAS path rounds it, BLOCK_K within one group. The programs take the output tiles in
    _tile_of's order."""
    dt: tl.constexpr = y_ptr.dtype.element_ty
    pid_m, pid_r = _tile_of(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(R, BLOCK_R), GROUP_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    r_mask = offs_r < R
    m_mask = offs_m < M
    acc = tl.zeros([BLOCK_R, BLOCK_M], tl.float32)
    acc2 = tl.zeros([BLOCK_R, BLOCK_M], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        xp = x_ptr + offs_m[None, :] * stride_xm + offs_k[:, None]
        wp = w_ptr + offs_r[:, None] * stride_wn + offs_k[None, :]
        if EVEN_K:
            xt = tl.load(xp, mask=m_mask[None, :], other=0.0)
            p = tl.load(wp, mask=r_mask[:, None], other=0)
        else:
            k_mask = offs_k < K
            xt = tl.load(xp, mask=m_mask[None, :] & k_mask[:, None], other=0.0)
            p = tl.load(wp, mask=r_mask[:, None] & k_mask[None, :], other=0)
        if WFMT == 2:
            p = p.to(tl.int32)
            g = k0 // GROUP
            se = tl.load(ws_ptr + (2 * offs_r) * stride_wsn + g, mask=r_mask, other=0.0).to(dt)
            so = tl.load(ws_ptr + (2 * offs_r + 1) * stride_wsn + g, mask=r_mask, other=0.0).to(dt)
            acc = tl.dot(((p << 28) >> 28).to(dt) * se[:, None], xt, acc)
            acc2 = tl.dot((p >> 4).to(dt) * so[:, None], xt, acc2)
        else:
            acc = tl.dot(p.to(dt), xt, acc)
    if WFMT == 2:  # _wq_mm_kernel's epilogues on the product turned back to [rows, channels]
        _gemv_store(tl.trans(acc), y_ptr, ws_ptr, offs_m, m_mask, 2 * offs_r, r_mask, stride_ym, dt, 0, RESIDUAL)
        _gemv_store(tl.trans(acc2), y_ptr, ws_ptr, offs_m, m_mask, 2 * offs_r + 1, r_mask, stride_ym, dt, 0, RESIDUAL)
    else:
        _gemv_store(tl.trans(acc), y_ptr, ws_ptr, offs_m, m_mask, offs_r, r_mask, stride_ym, dt, 1, RESIDUAL)


# (BLOCK_R in stored rows (INT4: two channels each), BLOCK_M, BLOCK_K, warps, stages) per weight format. wgmma's A
# operand is 64 rows a warp group: BLOCK_R ≥ 64 · warps / 4. The fastest of experiments.bench --sweep's 8 tiles per
# format on an H100 (7B layer, 1024 rows, 2026-12-07, experiments/results/gpu/kernels stage 28): W8A16 840 µs a
# layer (~525 TFLOP/s where the linear is not fc‖gate) against 789 for dequantize-then-cuBLAS; INT4 1186 against 802
# (its two accumulators and a float16 multiply per weight per tile of rows: ~350 TFLOP/s). cuBLAS's own float16 GEMM
# runs at 680–735 there: the dequantization saved does not pay for the slower GEMM.
WQ_PREFILL_T_CONFIG = {W_INT8: (128, 256, 64, 8, 3), W_INT4: (64, 128, 64, 4, 4)}


def wq_prefill_mm(x: torch.Tensor, w: torch.Tensor, wscale: torch.Tensor, *, wfmt: int, group: int = 0,
                  residual: torch.Tensor | None = None, config: tuple[int, int, int, int, int] | None = None,
                  group_m: int = 8, tma: bool = False, programs: int | None = None) -> torch.Tensor:
    """y [M, N] = x @ dequant(W)ᵀ for float16 / bfloat16 x [M, K] and int8 (per-channel ``wscale`` [N]) or the
    stored int4 AWQ layout (``wscale`` [N, K/group]) through :func:`_wq_prefill_t_kernel`; ``residual`` [M, N]: y
    added in place. ``config``: (BLOCK_R, BLOCK_M, BLOCK_K, warps, stages), None: WQ_PREFILL_T_CONFIG; INT4's
    BLOCK_K is cut to the group. ``group_m``: x's row tiles taken together (≥ 1). ``tma`` (KernelConfig.
    wq_prefill_tma): through the persistent :func:`_wq_tma_kernel` instead where :func:`tma_ok` takes the operands,
    ``programs`` of it resident (None: one per SM, at most one per tile); the same result up to the order of the
    float32 sums (INT4: one accumulator there, two here)."""
    M, K = x.shape
    R = w.shape[0]
    N = 2 * R if wfmt == W_INT4 else R
    br, bm, bk, warps, stages = config or WQ_PREFILL_T_CONFIG[wfmt]
    if wfmt == W_INT4:
        bk = min(bk, group)
        assert group % bk == 0 and K % group == 0
    y = residual if residual is not None else torch.empty(M, N, dtype=x.dtype, device=x.device)
    tiles = triton.cdiv(R, br) * triton.cdiv(M, bm)
    if tma and tma_ok(x, w):
        programs = max(1, min(programs or _sms(x, tiles), tiles))
        _wq_tma_kernel[(programs,)](_descriptor(x, [bm, bk]), _descriptor(w, [br, bk]), wscale, y, M, R, K,
                                    wscale.stride(0) if wscale.dim() == 2 else 0, y.stride(0), programs,
                                    WFMT=wfmt, GROUP=max(group, 1), BLOCK_R=br, BLOCK_M=bm, BLOCK_K=bk,
                                    GROUP_M=max(group_m, 1), RESIDUAL=residual is not None, num_warps=warps,
                                    num_stages=stages)
        return y
    grid = (tiles,)
    _wq_prefill_t_kernel[grid](x, w, wscale, y, M, R, K, x.stride(0), w.stride(0),
                               wscale.stride(0) if wscale.dim() == 2 else 0, y.stride(0),
                               WFMT=wfmt, GROUP=max(group, 1), BLOCK_R=br, BLOCK_M=bm, BLOCK_K=bk,
                               GROUP_M=max(group_m, 1), EVEN_K=K % bk == 0, RESIDUAL=residual is not None,
                               num_warps=warps, num_stages=stages)
    return y


# -- SmoothQuant's prefill GEMM fed by the tensor memory accelerator, persistent ---------------------------------------
@triton.jit
def _i8_tma_kernel(x_desc, w_desc, ws_ptr, y_ptr, M, N, K, stride_ym, num_progs, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, RESIDUAL: tl.constexpr):
    """y = (x · Wᵀ in int32) · ws[n] (+ y: residual) for int8 x [M, K] and W [N, K], each read through a TMA
    descriptor (tiles [BLOCK_M, BLOCK_K] / [BLOCK_N, BLOCK_K]; out of bounds read as zeros, which add nothing). The
    ``num_progs`` programs stay resident and walk the output tiles in _tile_of's order, so that the pipeline loads a
    tile's first K steps while the one before it finishes; the epilogue is _wq_mm_kernel's (same bits: int32 sums
    are exact in any order). The tile counter is kept twice (the loads' and the epilogue's), as Triton's persistent
    tutorial does for its pipeliner."""
    dt: tl.constexpr = y_ptr.dtype.element_ty
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    tile_c = tl.program_id(0) - num_progs
    for tile in tl.range(tl.program_id(0), num_m * num_n, num_progs, flatten=True):
        pid_m, pid_n = _tile_of(tile, num_m, num_n, GROUP_M)
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
        for ki in range(k_tiles):
            a = x_desc.load([pid_m * BLOCK_M, ki * BLOCK_K])
            b = w_desc.load([pid_n * BLOCK_N, ki * BLOCK_K])
            acc = tl.dot(a, b.T, acc, out_dtype=tl.int32)
        tile_c += num_progs
        pid_m, pid_n = _tile_of(tile_c, num_m, num_n, GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        _gemv_store(acc, y_ptr, ws_ptr, offs_m, offs_m < M, offs_n, offs_n < N, stride_ym, dt, 1, RESIDUAL)


def tma_ok(*operands: torch.Tensor) -> bool:
    """Whether the TMA kernels (:func:`i8_tma_mm`; :func:`wq_prefill_mm` with ``tma``) take these 2-D operands: TMA
    wants 16-byte aligned bases and row strides, rows whole."""
    return all(t.stride(1) == 1 and t.stride(0) * t.element_size() % 16 == 0 and t.data_ptr() % 16 == 0
               for t in operands)


def _descriptor(t: torch.Tensor, block: list[int]):
    """A TMA descriptor of 2-D ``t`` read in ``block`` tiles (Triton's interpreter reads one too)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor.from_tensor(t, block)


def _sms(x: torch.Tensor, tiles: int) -> int:
    """A persistent kernel's resident programs by default: one per SM (on the CPU, one per tile)."""
    return torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else tiles


def i8_tma_mm(x: torch.Tensor, w: torch.Tensor, wscale: torch.Tensor, *, dtype: torch.dtype,
              residual: torch.Tensor | None = None, config: tuple[int, int, int, int, int] | None = None,
              group_m: int = 8, programs: int | None = None) -> torch.Tensor:
    """SmoothQuant's int8 GEMM y [M, N] = (x [M, K] · w [N, K]ᵀ) · wscale [N] (float32, = a · s) in ``dtype``,
    residual [M, N]: added in place; through :func:`_i8_tma_kernel` (KernelConfig.sq_prefill_gemm "tma").
    ``config``: (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages), None: INT8_GEMM_CONFIG; ``programs``: the resident
    programs, None: one per SM (at most one per tile). The same result as :func:`wq_mm` with afmt=A_INT8."""
    M, K = x.shape
    N = w.shape[0]
    assert x.dtype == w.dtype == torch.int8 and w.shape[1] == K and tma_ok(x, w)
    bm, bn, bk, warps, stages = config or INT8_GEMM_CONFIG
    y = residual if residual is not None else torch.empty(M, N, dtype=dtype, device=x.device)
    tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    programs = max(1, min(programs or _sms(x, tiles), tiles))
    _i8_tma_kernel[(programs,)](_descriptor(x, [bm, bk]), _descriptor(w, [bn, bk]), wscale, y, M, N, K, y.stride(0),
                                programs, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=max(group_m, 1),
                                RESIDUAL=residual is not None, num_warps=warps, num_stages=stages)
    return y


@triton.jit
def _wq_tma_kernel(x_desc, w_desc, ws_ptr, y_ptr, M, R, K, stride_wsn, stride_ym, num_progs, WFMT: tl.constexpr,
                   GROUP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                   GROUP_M: tl.constexpr, RESIDUAL: tl.constexpr):
    """_wq_prefill_t_kernel's product (yᵀ = dequant(W) · xᵀ, the converted weight as wgmma's A operand) with x's
    [BLOCK_M, BLOCK_K] and W's stored [BLOCK_R, BLOCK_K] tiles read through TMA descriptors (past the ends: zeros)
    by ``num_progs`` resident programs walking the output tiles as _i8_tma_kernel does. INT4: the two nibbles of a
    byte are interleaved in registers (tl.join), so that row 2i of the A operand is channel 2(r + i), 2i + 1 channel
    2(r + i) + 1, and one accumulator of 2·BLOCK_R channels takes both (the other kernel keeps two)."""
    dt: tl.constexpr = y_ptr.dtype.element_ty
    CH: tl.constexpr = 2 * BLOCK_R if WFMT == 2 else BLOCK_R  # output channels a tile
    N = 2 * R if WFMT == 2 else R
    num_m = tl.cdiv(M, BLOCK_M)
    num_r = tl.cdiv(R, BLOCK_R)
    k_tiles = tl.cdiv(K, BLOCK_K)
    tile_c = tl.program_id(0) - num_progs
    for tile in tl.range(tl.program_id(0), num_m * num_r, num_progs, flatten=True):
        pid_m, pid_r = _tile_of(tile, num_m, num_r, GROUP_M)
        offs_c = pid_r * CH + tl.arange(0, CH)
        acc = tl.zeros([CH, BLOCK_M], tl.float32)
        for ki in range(k_tiles):
            xt = x_desc.load([pid_m * BLOCK_M, ki * BLOCK_K]).T
            p = w_desc.load([pid_r * BLOCK_R, ki * BLOCK_K])
            if WFMT == 2:  # q · s rounded to x's dtype, as the dequantize-then-cuBLAS path rounds it
                p = p.to(tl.int32)
                q = tl.reshape(tl.permute(tl.join((p << 28) >> 28, p >> 4), (0, 2, 1)), (CH, BLOCK_K))
                s = tl.load(ws_ptr + offs_c * stride_wsn + (ki * BLOCK_K) // GROUP, mask=offs_c < N, other=0.0)
                acc = tl.dot(q.to(dt) * s.to(dt)[:, None], xt, acc)
            else:
                acc = tl.dot(p.to(dt), xt, acc)
        tile_c += num_progs
        pid_m, pid_r = _tile_of(tile_c, num_m, num_r, GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_c = pid_r * CH + tl.arange(0, CH)
        _gemv_store(tl.trans(acc), y_ptr, ws_ptr, offs_m, offs_m < M, offs_c, offs_c < N, stride_ym, dt,
                    0 if WFMT == 2 else 1, RESIDUAL)


def wq_fill_split(tiles: int, sms: int, rows: int = 1, k: int = 1 << 30) -> int:
    """Splits of K for wq_mm so that ``tiles`` output tiles make at least two programs per SM: at most 8, and at
    most k / (16 · rows), which keeps the float32 partials (splits · rows · 4 bytes per output channel) within a
    quarter of the int8 weight bytes (k per channel) they save waiting on."""
    return max(1, min(8, -(-2 * sms // tiles), k // (16 * rows)))


# -- row-wise prologue for library GEMMs ---------------------------------------------------------------------------------
@triton.jit
def _act_prep_kernel(x_ptr, norm_ptr, pre_ptr, a_ptr, out_ptr, K, stride_xm, stride_om, eps,
                     PRO: tl.constexpr, HAS_PRE: tl.constexpr, AFMT: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0)
    offs_k = tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    dt: tl.constexpr = x_ptr.dtype.element_ty
    xr = x_ptr + row * stride_xm
    rstd = 0.0
    if PRO == 1:
        h = tl.load(xr + offs_k, mask=k_mask, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(h * h, axis=0) / K + eps)
    # the GEMV's prologue on the whole row; its int32 / fp8-valued float32 results are exact in int8 / fp8
    res = _prologue(xr, offs_k, k_mask, K, rstd, norm_ptr, pre_ptr, a_ptr, dt, PRO, HAS_PRE, AFMT)
    _store_act(out_ptr + row * stride_om, offs_k, k_mask, res, AFMT)


_AFMT_DTYPE = ACT_QUANT_DTYPE


def act_prep(x: torch.Tensor, *, norm: torch.Tensor | None = None, eps: float = 1e-6, silu: bool = False,
             prequant: torch.Tensor | None = None, act_scale: torch.Tensor | None = None, afmt: int = A_FLOAT,
             rows: int | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Row-wise prologue: [M, K] (silu: [M, 2K]) → [rows ≥ M, K] in the compute dtype (or ``out_dtype``, rounded
    from it), int8 or fp8. Rows past M (padding a library GEMM needs) are left unwritten."""
    M = x.shape[0]
    K = x.shape[1] // 2 if silu else x.shape[1]
    out = torch.empty(rows or M, K, dtype=_AFMT_DTYPE.get(afmt, out_dtype or x.dtype), device=x.device)
    bk = _pow2(K)
    warps = 4 if bk <= 2048 else 8 if bk <= 8192 else 16
    _act_prep_kernel[(M,)](x, norm if norm is not None else x, prequant if prequant is not None else x,
                           act_scale if act_scale is not None else x, out, K, x.stride(0), out.stride(0), float(eps),
                           PRO=PRO_SILU if silu else PRO_RMSNORM if norm is not None else PRO_NONE,
                           HAS_PRE=prequant is not None, AFMT=afmt, BLOCK_K=bk, num_warps=warps)
    return out


# -- SmoothQuant epilogue: int32 · (a · s) → dtype (+ residual) -------------------------------------------------------
@triton.jit
def _int_mm_epilogue_kernel(acc_ptr, s_ptr, y_ptr, M, N, stride_am, stride_ym, RESIDUAL: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    dt: tl.constexpr = y_ptr.dtype.element_ty
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    acc = tl.load(acc_ptr + offs_m[:, None] * stride_am + offs_n[None, :], mask=mask, other=0).to(tl.float32)
    s = tl.load(s_ptr + offs_n, mask=offs_n < N, other=0.0)
    yv = (acc * s[None, :]).to(dt)
    yp = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    if RESIDUAL:
        yv = tl.load(yp, mask=mask, other=0.0) + yv
    tl.store(yp, yv, mask=mask)


def int_mm_epilogue(acc: torch.Tensor, out_scale: torch.Tensor, M: int, dtype: torch.dtype,
                    residual: torch.Tensor | None = None) -> torch.Tensor:
    N = acc.shape[1]
    y = residual if residual is not None else torch.empty(M, N, dtype=dtype, device=acc.device)
    bm, bn = (1, 1024) if M == 1 else (16, 256)
    grid = (triton.cdiv(N, bn), triton.cdiv(M, bm))
    _int_mm_epilogue_kernel[grid](acc, out_scale, y, M, N, acc.stride(0), y.stride(0), RESIDUAL=residual is not None,
                                  BLOCK_M=bm, BLOCK_N=bn, num_warps=4)
    return y


# -- AWQ weights to the compute dtype (prefill through cuBLAS) --------------------------------------------------------
@triton.jit
def _dequant_int4_kernel(w_ptr, s_ptr, out_ptr, R, K, stride_wn, stride_sn, stride_on, GROUP: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    dt: tl.constexpr = out_ptr.dtype.element_ty
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_r < R)[:, None] & (offs_k < K)[None, :]
    p = tl.load(w_ptr + offs_r[:, None] * stride_wn + offs_k[None, :], mask=mask, other=0).to(tl.int32)
    g = offs_k // GROUP
    se = tl.load(s_ptr + (2 * offs_r)[:, None] * stride_sn + g[None, :], mask=mask, other=0.0).to(tl.float32)
    so = tl.load(s_ptr + (2 * offs_r + 1)[:, None] * stride_sn + g[None, :], mask=mask, other=0.0).to(tl.float32)
    lo = ((p << 28) >> 28).to(tl.float32) * se
    hi = (p >> 4).to(tl.float32) * so
    tl.store(out_ptr + (2 * offs_r)[:, None] * stride_on + offs_k[None, :], lo.to(dt), mask=mask)
    tl.store(out_ptr + (2 * offs_r + 1)[:, None] * stride_on + offs_k[None, :], hi.to(dt), mask=mask)


def dequant_int4(w: torch.Tensor, scales: torch.Tensor, group: int, dtype: torch.dtype,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    R, K = w.shape
    out = out if out is not None else torch.empty(2 * R, K, dtype=dtype, device=w.device)
    br, bk = 16, 128
    grid = (triton.cdiv(R, br), triton.cdiv(K, bk))
    _dequant_int4_kernel[grid](w, scales, out, R, K, w.stride(0), scales.stride(0), out.stride(0), GROUP=group,
                               BLOCK_R=br, BLOCK_K=bk, num_warps=4)
    return out


@triton.jit
def _dequant_int4_k_kernel(w_ptr, s_ptr, out_ptr, N, stride_wn, stride_sn, stride_on, GROUP: tl.constexpr,
                           KW: tl.constexpr, BLOCK_N: tl.constexpr):
    # one k-packed tile (8 sub-blocks of KW values) of BLOCK_N rows a program; a sub-block lies within one group
    dt: tl.constexpr = out_ptr.dtype.element_ty
    t = tl.program_id(1)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_j = tl.arange(0, KW)
    words = tl.load(w_ptr + offs_n[:, None] * stride_wn + t * KW + offs_j[None, :], mask=n_mask[:, None], other=0)
    for o in tl.static_range(8):
        k0 = t * 8 * KW + o * KW
        q = ((words >> (4 * (o // 2 + 4 * (o % 2)))) & 0xF) - 8  # sub-block o in nibble W4K_NIBBLE[o]
        s = tl.load(s_ptr + offs_n * stride_sn + k0 // GROUP, mask=n_mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs_n[:, None] * stride_on + k0 + offs_j[None, :],
                 (q.to(tl.float32) * s[:, None]).to(dt), mask=n_mask[:, None])


def dequant_int4_k(w: torch.Tensor, scales: torch.Tensor, group: int, kw: int, dtype: torch.dtype,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """The k-packed copy (:func:`pack_int4_k`, tile width ``kw``) back to q · s [N, K], in float32 and rounded once
    to ``dtype``, as :func:`dequant_int4` does from the stored layout (KernelConfig.w4k_prefill)."""
    N, K8 = w.shape
    out = out if out is not None else torch.empty(N, 8 * K8, dtype=dtype, device=w.device)
    bn = 32
    _dequant_int4_k_kernel[(triton.cdiv(N, bn), K8 // kw)](w, scales, out, N, w.stride(0), scales.stride(0),
                                                          out.stride(0), GROUP=group, KW=kw, BLOCK_N=bn, num_warps=4)
    return out


@triton.jit
def _dequant_int8_kernel(w_ptr, s_ptr, out_ptr, R, K, stride_wn, stride_on, BLOCK_R: tl.constexpr,
                         BLOCK_K: tl.constexpr):
    dt: tl.constexpr = out_ptr.dtype.element_ty
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_r < R)[:, None] & (offs_k < K)[None, :]
    q = tl.load(w_ptr + offs_r[:, None] * stride_wn + offs_k[None, :], mask=mask, other=0).to(tl.float32)
    s = tl.load(s_ptr + offs_r, mask=offs_r < R, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs_r[:, None] * stride_on + offs_k[None, :], (q * s[:, None]).to(dt), mask=mask)


def dequant_int8(w: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """q · s per output channel, rounded once to ``dtype`` (1 byte read, 2 written per weight)."""
    R, K = w.shape
    out = out if out is not None else torch.empty(R, K, dtype=dtype, device=w.device)
    br, bk = 16, 256
    _dequant_int8_kernel[(triton.cdiv(R, br), triton.cdiv(K, bk))](w, scale, out, R, K, w.stride(0), out.stride(0),
                                                                   BLOCK_R=br, BLOCK_K=bk, num_warps=4)
    return out


# -- decode: RoPE + KV cache write --------------------------------------------------------------------------------------
@triton.jit
def _rope_cos_sin(pos, freq_ptr, offs_d, D: tl.constexpr, dt: tl.constexpr):
    """cos and sin of a position's angles for element d of a head (frequency d mod D/2), rounded to dt: the one
    RoPE of decode, shared by _rope_cache_kernel and the split attention kernel (ROPE)."""
    ang = pos.to(tl.float32) * tl.load(freq_ptr + offs_d % (D // 2))
    return tl.cos(ang).to(dt).to(tl.float32), tl.sin(ang).to(dt).to(tl.float32)


@triton.jit
def _rope_vec(x_ptr, c, s, offs_d, D: tl.constexpr, dt: tl.constexpr):
    """One head's D values rotated (rotate-half, each output rounded to dt once), gathered as one vector:
    element d pairs with d ± D/2."""
    HALF: tl.constexpr = D // 2
    x = tl.load(x_ptr + offs_d).to(tl.float32)
    partner = tl.load(x_ptr + (offs_d + HALF) % D).to(tl.float32)
    return tl.where(offs_d < HALF, x * c - partner * s, x * c + partner * s).to(dt)


@triton.jit
def _rope_cache_kernel(qkv_ptr, pos_ptr, slot_ptr, freq_ptr, q_ptr, k_ptr, v_ptr, rcp_ptr,
                       H, KVH, stride_qkv, stride_qb, stride_cb, stride_ch, stride_ct, T=1, START=0,
                       HALF: tl.constexpr = 64, KV_QUANT: tl.constexpr = 0, PREFILL: tl.constexpr = False):
    """One program per (token b, head): q heads 0..H-1 are rotated into q_ptr [B, H·D]; kv heads H..H+KVH-1 rotate
    k and store k, v at cache slot ``*slot_ptr`` (quantized with the reciprocal scale when KV_QUANT). PREFILL: the
    rows are T tokens of each cache row in turn, token b at cache row b // T, slot START + b % T."""
    dt: tl.constexpr = qkv_ptr.dtype.element_ty
    pid = tl.program_id(0)
    b = pid // (H + KVH)
    hh = pid % (H + KVH)
    D: tl.constexpr = 2 * HALF
    offs_d = tl.arange(0, D)
    c, s = _rope_cos_sin(tl.load(pos_ptr + b), freq_ptr, offs_d, D, dt)
    out = _rope_vec(qkv_ptr + b * stride_qkv + hh * D, c, s, offs_d, D, dt)
    if hh < H:
        tl.store(q_ptr + b * stride_qb + hh * D + offs_d, out)
    else:
        j = hh - H
        v = tl.load(qkv_ptr + b * stride_qkv + (H + KVH + j) * D + offs_d)
        if PREFILL:
            cp = (b // T) * stride_cb + j * stride_ch + (START + b % T) * stride_ct + offs_d
        else:
            cp = b * stride_cb + j * stride_ch + tl.load(slot_ptr) * stride_ct + offs_d
        if KV_QUANT == 0:
            tl.store(k_ptr + cp, out)
            tl.store(v_ptr + cp, v)
        else:
            rcp = tl.load(rcp_ptr)
            tl.store(k_ptr + cp, _kv_quant(out, rcp, KV_QUANT))
            tl.store(v_ptr + cp, _kv_quant(v, rcp, KV_QUANT))


@triton.jit
def _kv_quant(x, rcp, KV_QUANT: tl.constexpr):
    v = x.to(tl.float32) * rcp
    if KV_QUANT == 1:
        v = tl.minimum(tl.maximum(v, -128.0), 127.0)
        res = ((v + 12582912.0) - 12582912.0).to(tl.int8)
    else:
        res = tl.minimum(tl.maximum(v, -448.0), 448.0).to(tl.float8e4nv, fp_downcast_rounding="rtne")
    return res


KV_QUANT_MODE = {None: 0, "INT8": 1, "FP8": 2}


def rope_cache_write(qkv: torch.Tensor, positions: torch.Tensor, slot: torch.Tensor | int, inv_freq: torch.Tensor,
                     k_cache: torch.Tensor, v_cache: torch.Tensor, n_heads: int, n_kv: int, head_dim: int,
                     kv_rcp: torch.Tensor | None = None, kv_algo: str | None = None,
                     q_out: torch.Tensor | None = None) -> torch.Tensor:
    """qkv [B, (H + 2·KVH)·D] of one decode token per row; positions [B] int; slot: 0-d int tensor (device);
    k_cache/v_cache [B, KVH, max_len, D] of one layer. Returns rotated q [B, H·D]. ``slot`` an int (prefill,
    KernelConfig.prefill_rope): qkv holds T = rows / B tokens of each cache row in turn, stored at slots slot..slot+T-1,
    positions [rows]."""
    B = qkv.shape[0]
    prefill = isinstance(slot, int)
    q = q_out if q_out is not None else torch.empty(B, n_heads * head_dim, dtype=qkv.dtype, device=qkv.device)
    _rope_cache_kernel[(B * (n_heads + n_kv),)](
        qkv, positions, positions if prefill else slot, inv_freq, q, k_cache, v_cache,
        kv_rcp if kv_rcp is not None else inv_freq,
        n_heads, n_kv, qkv.stride(0), q.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        B // k_cache.shape[0] if prefill else 1, slot if prefill else 0,
        HALF=head_dim // 2, KV_QUANT=KV_QUANT_MODE[kv_algo], PREFILL=prefill, num_warps=1)
    return q


# -- decode: split-KV attention -----------------------------------------------------------------------------------------
@triton.jit
def _attn_split_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, slot_ptr, scale_ptr, m_ptr, l_ptr, o_ptr, sm_scale,
                       H, NSPLIT, stride_qb, stride_cb, stride_ch, stride_ct, stride_mb, cnt_ptr, out_ptr, stride_ob,
                       pos_ptr, freq_ptr, rcp_ptr, KVH, oq_pre_ptr, oq_a_ptr,
                       GQA: tl.constexpr, SPLIT: tl.constexpr, BLOCK_T: tl.constexpr, D: tl.constexpr,
                       KV_QUANT: tl.constexpr, FUSED_REDUCE: tl.constexpr, NSPLIT_P2: tl.constexpr,
                       ROPE: tl.constexpr, OQ_PRE: tl.constexpr = False, OQ_AFMT: tl.constexpr = 0,
                       EARLY: tl.constexpr = False, GDC: tl.constexpr = False, trace_ptr=None,
                       TRACE: tl.constexpr = False):
    """One program per (row b, head h, split of SPLIT keys): the split's softmax statistics (max m, sum l) and
    unnormalized output. FUSED_REDUCE: the (b, h)'s last program to finish (an acq_rel counter; it resets it for
    the next launch) combines every split in split order, as _attn_reduce_kernel does, and one launch is saved.
    ROPE: q_ptr is the qkv row of the token (not a rotated q): every program rotates its q head as
    _rope_cache_kernel does, the split holding the slot takes the token's own k / v from qkv (rotated; through
    the cache's quantization when KV_QUANT) instead of reading the cache there, and its program of the first head
    of each KV group writes them to the cache — the RoPE / cache-write launch is saved. OQ_PRE / OQ_AFMT (with
    FUSED_REDUCE): the output quantized for the next linear as act_prep would (times oq_pre, int8 / fp8 by oq_a;
    KernelConfig.gemv_then's then_quant), out int8 / float8. EARLY (KernelConfig.attn_pdl): the split's first block
    of cached keys / values and its key mask are loaded before anything the kernel before writes (q_ptr's row),
    then GDC waits for that kernel's grid (griddepcontrol.wait: launched with programmatic dependent launch, this
    kernel may start while the qkv GEMV still runs); the same arithmetic in the same order, so the same bits.
    TRACE (with FUSED_REDUCE; experiments.attn_bench --trace): each program stamps the times it reaches its phases
    into trace_ptr (_stamp, ATTN_PHASES); the arithmetic is unchanged."""
    dt: tl.constexpr = q_ptr.dtype.element_ty
    bh = tl.program_id(0)
    sp = tl.program_id(1)
    idx = bh * NSPLIT + sp
    if TRACE:
        _stamp(trace_ptr, idx, 0, bh)
    b = bh // H
    h = bh % H
    kvh = h // GQA
    cur = tl.load(slot_ptr) + 1  # keys 0..slot
    if TRACE:
        _stamp(trace_ptr, idx, 1, cur)
    lo = sp * SPLIT
    hi = tl.minimum(lo + SPLIT, cur)
    offs_d = tl.arange(0, D)
    kv_scale = tl.load(scale_ptr) if KV_QUANT != 0 else 1.0
    slot = cur - 1
    if EARLY:  # (nothing above reads what the kernel before writes: slot, mask and cache are older)
        base = b * stride_cb + kvh * stride_ch  # (and again below, where the kernel without EARLY computes it)
        offs_t0 = lo + tl.arange(0, BLOCK_T)
        k0, v0, valid0 = _attn_kv_block(k_ptr, v_ptr, mask_ptr + b * stride_mb, base, offs_t0, hi, slot, stride_ct,
                                        offs_d, ROPE)
        if GDC:
            tl.extra.cuda.gdc_wait()
    if ROPE:
        row = q_ptr + b * stride_qb
        cos, sin = _rope_cos_sin(tl.load(pos_ptr + b), freq_ptr, offs_d, D, dt)  # the same angles for q and k
        q = _rope_vec(row + h * D, cos, sin, offs_d, D, dt).to(tl.float32) * sm_scale
        mine = (lo <= slot) & (slot < hi)  # this split holds the token's own key
        k_new = _rope_vec(row + (H + kvh) * D, cos, sin, offs_d, D, dt)
        v_new = tl.load(row + (H + KVH + kvh) * D + offs_d)
        cp = b * stride_cb + kvh * stride_ch + slot * stride_ct + offs_d
        if KV_QUANT != 0:
            rcp = tl.load(rcp_ptr)
            k_st, v_st = _kv_quant(k_new, rcp, KV_QUANT), _kv_quant(v_new, rcp, KV_QUANT)
            k_new = (k_st.to(tl.float32) * kv_scale).to(dt)
            v_new = (v_st.to(tl.float32) * kv_scale).to(dt)
        else:
            k_st, v_st = k_new, v_new
    else:
        q = tl.load(q_ptr + b * stride_qb + h * D + offs_d).to(tl.float32) * sm_scale
        k_new, v_new = q, q  # (unused without ROPE)
    if TRACE:
        _stamp(trace_ptr, idx, 2, tl.sum(q, axis=0))
    m_i = -float("inf")
    l_i = 0.0
    acc = tl.zeros([D], tl.float32)
    base = b * stride_cb + kvh * stride_ch
    start = lo
    if EARLY:
        m_i, l_i, acc = _attn_block(q, k0, v0, valid0, offs_t0, slot, k_new, v_new, kv_scale, m_i, l_i, acc, dt,
                                    KV_QUANT, ROPE)
        start = lo + BLOCK_T
    for t0 in range(start, hi, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        k, v, valid = _attn_kv_block(k_ptr, v_ptr, mask_ptr + b * stride_mb, base, offs_t, hi, slot, stride_ct,
                                     offs_d, ROPE)
        m_i, l_i, acc = _attn_block(q, k, v, valid, offs_t, slot, k_new, v_new, kv_scale, m_i, l_i, acc, dt,
                                    KV_QUANT, ROPE)
    if ROPE:  # after the loop, which must not have read the slot (a test in Triton's interpreter checks it)
        if mine & (h % GQA == 0):
            tl.store(k_ptr + cp, k_st)
            tl.store(v_ptr + cp, v_st)
    if TRACE:
        _stamp(trace_ptr, idx, 3, l_i + tl.sum(acc, axis=0))
    tl.store(m_ptr + idx, m_i)
    tl.store(l_ptr + idx, l_i)
    tl.store(o_ptr + idx * D + offs_d, acc)
    if FUSED_REDUCE:
        last = _last_to_finish(cnt_ptr + bh, NSPLIT)
        if TRACE:
            _stamp(trace_ptr, idx, 4, last)
        if last:
            out = _attn_combine(m_ptr, l_ptr, o_ptr, out_ptr, bh, b, h, NSPLIT, stride_ob, NSPLIT_P2, D, ".cg", dt,
                                oq_pre_ptr, oq_a_ptr, OQ_PRE, OQ_AFMT)
            if TRACE:
                _stamp(trace_ptr, idx, 5, tl.sum(out.to(tl.float32), axis=0))


# The phases a traced split program stamps (TRACE), in order: each stamp is taken once the value it names is known.
ATTN_PHASES = ("entry", "slot loaded", "q ready", "keys and values done", "counter returned", "combined")
_NPHASES = tl.constexpr(len(ATTN_PHASES))
# %globaltimer (ns) and %clock64 (its SM's cycles) behind a test of $2, the value the stamp follows. ptxas compiles
# the predicated reads to plain reads and a select after that test; a warp issues in order, so the reads wait for
# the value (checked in the SASS, stage 23, and by test_decode_rope_cache_write_and_attention's ordered stamps)
_STAMP_ASM = tl.constexpr("""{ .reg .pred p; setp.ne.b32 p, $2, 0;
@p mov.u64 $0, %globaltimer; @!p mov.u64 $0, %globaltimer; @p mov.u64 $1, %clock64; @!p mov.u64 $1, %clock64; }""")


@triton.jit
def _stamp(trace_ptr, idx, phase: tl.constexpr, dep):
    """Trace builds: program ``idx``'s time at ``phase`` of ATTN_PHASES (trace_ptr int64 [programs, phases, 2]:
    ns of %globaltimer, then cycles of %clock64), read once ``dep`` is known."""
    bits = dep.to(tl.float32).to(tl.int32, bitcast=True)
    ns, clk = tl.inline_asm_elementwise(_STAMP_ASM, "=l,=l,r", [bits], dtype=(tl.int64, tl.int64), is_pure=False,
                                        pack=1)
    at = trace_ptr + (idx * _NPHASES + phase) * 2
    tl.store(at, ns)
    tl.store(at + 1, clk)


@triton.jit
def _attn_kv_block(k_ptr, v_ptr, mask_row, base, offs_t, hi, slot, stride_ct, offs_d, ROPE: tl.constexpr):
    """One block of keys of the split kernel as stored (masked past ``hi``; with ROPE, not the slot, which this
    launch writes) and which of them are real tokens."""
    t_mask = offs_t < hi
    valid = t_mask & (tl.load(mask_row + offs_t, mask=t_mask, other=0) != 0)
    kp = base + offs_t[:, None] * stride_ct + offs_d[None, :]
    ld_mask = t_mask
    if ROPE:
        ld_mask = t_mask & (offs_t != slot)  # written by this launch: taken from qkv below, not read back
    k = tl.load(k_ptr + kp, mask=ld_mask[:, None], other=0.0)
    v = tl.load(v_ptr + kp, mask=ld_mask[:, None], other=0.0)
    return k, v, valid


@triton.jit
def _attn_block(q, k, v, valid, offs_t, slot, k_new, v_new, kv_scale, m_i, l_i, acc, dt: tl.constexpr,
                KV_QUANT: tl.constexpr, ROPE: tl.constexpr):
    """The online softmax over one block of keys: (m, l, acc) updated."""
    if KV_QUANT != 0:
        k = (k.to(tl.float32) * kv_scale).to(dt)
        v = (v.to(tl.float32) * kv_scale).to(dt)
    if ROPE:
        k = tl.where((offs_t == slot)[:, None], k_new[None, :], k)
        v = tl.where((offs_t == slot)[:, None], v_new[None, :], v)
    s = tl.sum(q[None, :] * k.to(tl.float32), axis=1)
    s = tl.where(valid, s, -float("inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=0))
    m_use = tl.where(m_new == -float("inf"), 0.0, m_new)
    p = tl.exp(s - m_use)
    alpha = tl.exp(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, axis=0)
    acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
    return m_new, l_i, acc


@triton.jit
def _attn_combine(m_ptr, l_ptr, o_ptr, out_ptr, bh, b, h, NSPLIT, stride_ob, NSPLIT_P2: tl.constexpr,
                  D: tl.constexpr, CACHE: tl.constexpr, dt: tl.constexpr, pre_ptr, a_ptr, HAS_PRE: tl.constexpr,
                  AFMT: tl.constexpr):
    """out[b, h] = Σ_s o_s · e^(m_s − m) / Σ_s l_s · e^(m_s − m) over the splits, in split order, rounded to dt
    (then _act_quant's pre-quant scale and quantization). CACHE: the loads' cache modifier (".cg" where other
    programs of the same launch wrote the partials: past a non-coherent L1)."""
    offs_s = tl.arange(0, NSPLIT_P2)
    s_mask = offs_s < NSPLIT
    offs_d = tl.arange(0, D)
    m = tl.load(m_ptr + bh * NSPLIT + offs_s, mask=s_mask, other=-float("inf"), cache_modifier=CACHE)
    m_max = tl.max(m, axis=0)
    w = tl.where(m == -float("inf"), 0.0, tl.exp(m - m_max))
    l_sum = tl.sum(tl.load(l_ptr + bh * NSPLIT + offs_s, mask=s_mask, other=0.0, cache_modifier=CACHE) * w, axis=0)
    o = tl.load(o_ptr + (bh * NSPLIT + offs_s)[:, None] * D + offs_d[None, :], mask=s_mask[:, None], other=0.0,
                cache_modifier=CACHE)
    out = (tl.sum(o * w[:, None], axis=0) / l_sum).to(dt)
    res = _act_quant(out, h * D + offs_d, offs_d < D, pre_ptr, a_ptr, HAS_PRE, AFMT)
    _store_act(out_ptr + b * stride_ob + h * D, offs_d, offs_d < D, res, AFMT)
    return out


@triton.jit
def _attn_reduce_kernel(m_ptr, l_ptr, o_ptr, out_ptr, H, NSPLIT, stride_ob, NSPLIT_P2: tl.constexpr,
                        D: tl.constexpr):
    bh = tl.program_id(0)
    _attn_combine(m_ptr, l_ptr, o_ptr, out_ptr, bh, bh // H, bh % H, NSPLIT, stride_ob, NSPLIT_P2, D, "",
                  out_ptr.dtype.element_ty, m_ptr, m_ptr, False, 0)


# The split kernel's default tile (KernelConfig.attn_tile): (keys a loop step, keys a split — 0: as many splits as
# fill the card twice over —, warps a program). On an H100 (batch 1, 545 keys, 2026-12-06; experiments.attn_bench
# --sweep, experiments/results/gpu/kernels stage 20) none of 39 tiles was faster end to end: the best alone, 1.01×
# (7B) and 1.05× (8B), gave FP16, INT4 and INT8 weight-only the same or less.
ATTN_TILE = (64, 0, 4)


def attn_splits(batch: int, n_heads: int, max_len: int, n_sm: int = 132, block_t: int = ATTN_TILE[0],
                split_keys: int = 0) -> tuple[int, int]:
    """(number of splits, keys per split): ``split_keys`` keys a split (rounded up to whole loop steps of
    ``block_t``) or, with 0, enough programs to fill the card twice over."""
    blocks = triton.cdiv(max_len, block_t)
    if split_keys:
        split = triton.cdiv(split_keys, block_t) * block_t
    else:
        nsplit = max(1, min(blocks, triton.cdiv(2 * n_sm, batch * n_heads)))
        split = triton.cdiv(blocks, nsplit) * block_t
    return triton.cdiv(max_len, split), split


class DecodeAttention:
    """Static workspace for split-KV decode attention of one (batch, heads, max_len) shape (graph-capturable)."""

    def __init__(self, batch: int, n_heads: int, n_kv: int, head_dim: int, max_len: int, dtype: torch.dtype,
                 device: torch.device, fused_reduce: bool = False, tile: tuple[int, int, int] | None = None):
        n_sm = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
        # tile: (keys a loop step, keys a split or 0, warps) as KernelConfig.attn_tile; None: ATTN_TILE
        self.block_t, split_keys, self.warps = tile or ATTN_TILE
        self.nsplit, self.split = attn_splits(batch, n_heads, max_len, n_sm, self.block_t, split_keys)
        # fused_reduce: the last split of each (row, head) combines them (no second launch); the counters are
        # left at zero by every launch
        self.fused_reduce = fused_reduce
        self.pdl_ok = device.type == "cuda" and pdl_ok(device)
        self.count = torch.zeros(batch * n_heads, dtype=torch.int32, device=device)
        self.B, self.H, self.KVH, self.D = batch, n_heads, n_kv, head_dim
        self.m = torch.empty(batch * n_heads * self.nsplit, dtype=torch.float32, device=device)
        self.l = torch.empty_like(self.m)
        self.o = torch.empty(batch * n_heads * self.nsplit, head_dim, dtype=torch.float32, device=device)
        self.sm_scale = 1.0 / math.sqrt(head_dim)

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, key_mask: torch.Tensor,
                 slot: torch.Tensor, kv_scale: torch.Tensor | None = None, kv_algo: str | None = None,
                 out: torch.Tensor | None = None, *, rope: tuple | None = None,
                 then_quant: tuple | None = None, pdl: bool = False, trace: torch.Tensor | None = None) -> torch.Tensor:
        """q [B, H·D]; caches [B, KVH, max_len, D]; key_mask [B, ≥ max_len] bool; → [B, H·D] in q's dtype.
        ``rope=(positions, inv_freq, kv_rcp)``: q is instead the token's qkv [B, (H + 2·KVH)·D], rotated here and
        its k / v written to the cache at ``slot`` (rope_cache_write's work, in the same launch). ``then_quant``
        (prequant or None, act_scale [1], A_INT8 / A_FP8; with fused_reduce): the output quantized for the next
        linear, as act_prep would (int8 / float8). ``pdl`` (KernelConfig.attn_pdl): the kernel's EARLY cache loads and,
        with ``rope`` (only then does the kernel before write nothing those loads read: rope_cache_write writes the
        slot) on an sm_90+ GPU, the launch with programmatic dependent launch, waiting for that kernel after them.
        ``trace`` (int64 [B·H·nsplit, len(ATTN_PHASES), 2], with fused_reduce): a traced launch, each program's stamps
        written there (experiments.attn_bench --trace); the same output."""
        B, H, D = self.B, self.H, self.D
        assert trace is None or (self.fused_reduce and trace.dtype == torch.int64
                                 and trace.numel() == B * H * self.nsplit * len(ATTN_PHASES) * 2)
        pre, a, afmt = then_quant or (None, None, A_FLOAT)
        assert then_quant is None or self.fused_reduce
        if out is None:
            out = torch.empty(B, H * D, dtype=_AFMT_DTYPE.get(afmt, q.dtype), device=q.device)
        pos, freq, rcp = rope if rope is not None else (self.m, self.m, None)
        mask = key_mask.view(torch.uint8) if key_mask.dtype == torch.bool else key_mask
        launch_pdl = pdl and rope is not None and self.pdl_ok
        _attn_split_kernel[(B * H, self.nsplit)](
            q, k_cache, v_cache, mask, slot, kv_scale if kv_scale is not None else self.m, self.m, self.l, self.o,
            self.sm_scale, H, self.nsplit, q.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            mask.stride(0), self.count, out, out.stride(0), pos, freq, rcp if rcp is not None else self.m, self.KVH,
            pre if pre is not None else self.m, a if a is not None else self.m,
            GQA=H // self.KVH, SPLIT=self.split, BLOCK_T=self.block_t, D=D, KV_QUANT=KV_QUANT_MODE[kv_algo],
            FUSED_REDUCE=self.fused_reduce, NSPLIT_P2=_pow2(self.nsplit), ROPE=rope is not None,
            OQ_PRE=pre is not None, OQ_AFMT=afmt, EARLY=pdl, GDC=launch_pdl, trace_ptr=trace,
            TRACE=trace is not None, num_warps=self.warps,
            **({"launch_pdl": True} if launch_pdl else {}))
        if not self.fused_reduce:
            _attn_reduce_kernel[(B * H,)](self.m, self.l, self.o, out, H, self.nsplit, out.stride(0),
                                          NSPLIT_P2=_pow2(self.nsplit), D=D, num_warps=1)
        return out


# -- RMSNorm (prefill; decode fuses it into the GEMV) ----------------------------------------------------------------
def rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return act_prep(x, norm=w, eps=eps)
