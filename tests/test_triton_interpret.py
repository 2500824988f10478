"""The runtime's Triton kernels (quant/runtime/cuda_kernels.py) on the CPU, through Triton's interpreter.

Where there is no GPU, tests/conftest.py sets TRITON_INTERPRET=1 before anything imports Triton: the kernels'
own code then runs on CPU tensors (numpy underneath), so a kernel change is checked against the float64
reference here and in CI, not only on the lent GPU. What the interpreter cannot show: speed, register use,
and the PTX-only paths (the GEMVs' prmt / e4m3x2 conversions, cvt=1; fp8 math) — tests/test_cuda.py covers
those on an H200. Shapes are small: the interpreter runs each program as numpy, about a second per launch.
"""
from __future__ import annotations

import math
import os
import zlib

import pytest
import torch

pytest.importorskip("triton")
if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton's interpreter runs where there is no GPU (tests/conftest.py)", allow_module_level=True)

from quant.runtime import cuda_kernels as ck  # noqa: E402
from tests.conftest import rel  # noqa: E402
from tests.test_kernels import activations, exact_dequantized, layout, reference  # noqa: E402


def _gen(key: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(key.encode()))


@pytest.mark.parametrize("rows", [3, 40, 130])  # the small-M tiles (≤ 16, 17–64) and the prefill tile
def test_wq_mm_int8_weights_match_float64_reference(rows):
    gen = _gen(f"wq8/{rows}")
    t = layout("W8A16", torch.randn(96, 200, generator=gen) * 0.05, gen)  # K 200: not a multiple of any K tile
    wd = exact_dequantized("W8A16", t, torch.float16)
    x = (activations(gen, rows, 200) * 40).half()  # x · q before the scale overflows float16: it must not matter
    config = ck.WQ_PREFILL_CONFIG[ck.W_INT8] if rows > ck.WQ_MM_MAX_M else None
    y = ck.wq_mm(x, t["weight"], t["weights_scaling_factor"].half(), wfmt=ck.W_INT8, config=config)
    assert y.dtype == torch.float16 and bool(torch.isfinite(y).all())
    assert rel(y, reference("W8A16", t, x, wd)) <= 1e-2


@pytest.mark.parametrize("rows", [3, 40])
def test_wq_mm_split_k_matches_float64_reference(rows):
    """wq_mm with K split over programs (KernelConfig.wq_wide; Triton's conversion here): every split's partial
    reaches y, in split order (the same bits twice), the counter left at zero for the next call, and a split count
    above K's tiles clamped to one tile each. SmoothQuant's int32 partials: the same bits as one program."""
    gen = _gen(f"wqsplit/{rows}")
    t = layout("W8A16", torch.randn(96, 1000, generator=gen) * 0.05, gen)  # K: 4 tiles of 256, the last partial
    wd = exact_dequantized("W8A16", t, torch.float16)
    x = (activations(gen, rows, 1000) * 40).half()
    res = torch.randn(rows, 96, generator=gen).half()
    counter = torch.zeros(3, dtype=torch.int32)  # 96 outputs: three tiles of 32
    want = reference("W8A16", t, x, wd) + res.double()
    for split in (2, 3, 9):
        ys = [ck.wq_mm(x, t["weight"], t["weights_scaling_factor"].half(), wfmt=ck.W_INT8, residual=res.clone(),
                       split=split, counter=counter, config=(32, 256, 2, 2)) for _ in range(2)]
        assert torch.equal(ys[0], ys[1]) and not counter.any(), split
        assert rel(ys[0], want) <= 1e-2, split
    qx = torch.randint(-128, 128, (rows, 1000), generator=gen, dtype=torch.int8)
    out_scale = torch.rand(96, generator=gen) * 1e-4
    one = ck.wq_mm(qx, t["weight"], out_scale, wfmt=ck.W_INT8, afmt=ck.A_INT8, dtype=torch.float16,
                   residual=res.clone(), config=(32, 256, 2, 2))
    for split in (2, 4):
        y = ck.wq_mm(qx, t["weight"], out_scale, wfmt=ck.W_INT8, afmt=ck.A_INT8, dtype=torch.float16,
                     residual=res.clone(), split=split, counter=counter, config=(32, 256, 2, 2))
        assert torch.equal(y, one) and not counter.any(), split


@pytest.mark.parametrize("group", [32, 64, 128])
def test_wq_mm_int4_prefill_matches_float64_reference(group):
    gen = _gen(f"wq4/{group}")
    t = layout("W4A16_AWQ", torch.randn(80, 256, generator=gen) * 0.05, gen, group=group)
    wd = exact_dequantized("W4A16_AWQ", t, torch.float16, group)
    x = activations(gen, 130, 256).half() * t["prequant_scaling_factor"]  # the handler applies it in act_prep
    y = ck.wq_mm(x, t["weight"], t["weights_scaling_factor"].half(), wfmt=ck.W_INT4, group=group,
                 config=ck.WQ_PREFILL_CONFIG[ck.W_INT4])
    assert y.shape == (130, 80)
    assert rel(y, x.double() @ wd.double().t()) <= 1e-2



@pytest.mark.parametrize("fmt,group", [("W8A16", 0), ("W4A16_AWQ", 32), ("W4A16_AWQ", 128)])
def test_weight_only_prefill_with_the_weight_as_a_operand(fmt, group):
    """wq_prefill_mm (KernelConfig.wq_prefill): the swapped product yᵀ = dequant(W) · xᵀ on three tiles of x's rows
    (130) and of channels, K 200 (int8: no whole K tile) / 256, with a residual added in place; INT4's weight is
    q · s rounded to float16, as the dequantize-then-cuBLAS path rounds it, so the float64 product of that weight is
    the reference."""
    gen = _gen(f"wqt/{fmt}/{group}")
    k = 200 if fmt == "W8A16" else 256
    t = layout(fmt, torch.randn(160, k, generator=gen) * 0.05, gen, group=group or 64)
    if fmt == "W8A16":
        wd = exact_dequantized(fmt, t, torch.float16).double()
        wfmt, scale = ck.W_INT8, t["weights_scaling_factor"].half()
    else:
        wd = exact_dequantized(fmt, t, torch.float16, group).half().double()  # q · s in float16
        wfmt, scale = ck.W_INT4, t["weights_scaling_factor"].half()
    x = activations(gen, 130, k).half()
    res = torch.randn(130, 160, generator=gen).half()
    y = ck.wq_prefill_mm(x, t["weight"], scale, wfmt=wfmt, group=group, residual=res.clone(),
                         config=(64, 64, 64, 4, 2), group_m=2)
    assert y.shape == (130, 160) and y.dtype == torch.float16
    assert rel(y, res.double() + x.double() @ wd.t()) <= 2e-3
    plain = ck.wq_prefill_mm(x, t["weight"], scale, wfmt=wfmt, group=group, config=(64, 64, 64, 4, 2), group_m=1)
    assert torch.equal(plain, ck.wq_prefill_mm(x, t["weight"], scale, wfmt=wfmt, group=group,
                                               config=(64, 64, 64, 4, 2), group_m=2))  # the order: the same bits


@pytest.mark.parametrize("fmt,group", [("W8A16", 0), ("W4A16_AWQ", 32), ("W4A16_AWQ", 64)])
def test_persistent_tma_weight_only_prefill(fmt, group):
    """wq_prefill_mm with tma (KernelConfig.wq_prefill_tma): x and the stored weight through TMA descriptors (K 208
    for int8: the last K tile read past the end as zeros; 130 rows, 160 channels: 3 × 3 tiles of 64 rows and 64
    stored rows, INT4's 128 channels a tile in one accumulator, the nibbles interleaved), one resident program
    walking all tiles or four walking several: the float64 product of the dequantized weight plus the residual,
    added once, the same bits either way; operands TMA cannot read (rows not whole 16 bytes) take the other
    kernel."""
    gen = _gen(f"wqtma/{fmt}/{group}")
    k = 208 if fmt == "W8A16" else 256
    out = 160
    t = layout(fmt, torch.randn(out, k, generator=gen) * 0.05, gen, group=group or 64)
    if fmt == "W8A16":
        wd = exact_dequantized(fmt, t, torch.float16).double()
        wfmt = ck.W_INT8
    else:
        wd = exact_dequantized(fmt, t, torch.float16, group).half().double()  # q · s in float16
        wfmt = ck.W_INT4
    scale = t["weights_scaling_factor"].half()
    x = activations(gen, 130, k).half()
    res = torch.randn(130, out, generator=gen).half()
    assert ck.tma_ok(x, t["weight"])
    ys = [ck.wq_prefill_mm(x, t["weight"], scale, wfmt=wfmt, group=group, residual=res.clone(),
                           config=(64, 64, 64, 4, 2), group_m=2, tma=True, programs=p) for p in (1, 4)]
    assert ys[0].shape == (130, out) and torch.equal(ys[0], ys[1])
    assert rel(ys[0], res.double() + x.double() @ wd.t()) <= 2e-3
    if fmt == "W8A16":  # int8 rows of 200 bytes are not whole 16 bytes: TMA cannot read them, tl.dot takes them
        w200 = t["weight"][:, :200].contiguous()
        assert not ck.tma_ok(x[:, :200], w200)
        y = ck.wq_prefill_mm(x[:, :200], w200, scale, wfmt=wfmt, config=(64, 64, 64, 4, 2), tma=True)
        assert rel(y, x[:, :200].double() @ wd[:, :200].t()) <= 2e-3

def test_smoothquant_int8_gemm_is_exact_in_int32():
    """int8 × int8 through tl.dot sums exactly in int32; the epilogue scales by a · s per channel."""
    gen = _gen("sq")
    t = layout("W8A8_SQ_PER_CHANNEL", torch.randn(64, 192, generator=gen) * 0.05, gen)
    x = activations(gen, 70, 192).half()
    a = t["activation_scaling_factor"].float()
    qx = ck.act_prep(x, prequant=t["prequant_scaling_factor"].half(), act_scale=a.reshape(1), afmt=ck.A_INT8)
    xq = torch.round((x * t["prequant_scaling_factor"].half()).float() / a).clamp(-128, 127)
    assert torch.equal(qx.float(), xq)
    out_scale = (a * t["weights_scaling_factor"].float()).contiguous()
    y = ck.wq_mm(qx, t["weight"], out_scale, wfmt=ck.W_INT8, afmt=ck.A_INT8, dtype=torch.float16,
                 config=ck.INT8_GEMM_CONFIG)
    exact = (xq.double() @ t["weight"].double().t()) * out_scale.double()
    assert rel(y, exact) <= 1e-3  # only the final rounding to float16


@pytest.mark.parametrize("group", [2, 8])
def test_prefill_gemm_in_grouped_order_gives_the_same_bits(group):
    """KernelConfig.prefill_group: the programs take the output tiles in groups of x's row tiles (5 row tiles here:
    the last group short when 2) and every tile is still computed once, as in the plain order: the same bits,
    with the residual added once."""
    gen = _gen(f"sqgroup/{group}")
    t = layout("W8A8_SQ_PER_CHANNEL", torch.randn(48, 128, generator=gen) * 0.05, gen)
    qx = torch.randint(-128, 128, (70, 128), generator=gen, dtype=torch.int8)
    out_scale = torch.rand(48, generator=gen) * 1e-4
    res = torch.randn(70, 48, generator=gen).half()
    config = (16, 16, 64, 1, 1)  # 5 × 3 output tiles
    ys = [ck.wq_mm(qx, t["weight"], out_scale, wfmt=ck.W_INT8, afmt=ck.A_INT8, dtype=torch.float16,
                   residual=res.clone(), config=config, group_m=g) for g in (0, group)]
    assert torch.equal(ys[0], ys[1])
    exact = (qx.double() @ t["weight"].double().t()) * out_scale.double() + res.double()
    assert rel(ys[1], exact) <= 1e-3



@pytest.mark.parametrize("programs", [1, 4, 15])
def test_persistent_tma_int8_gemm_gives_the_same_bits(programs):
    """i8_tma_mm (KernelConfig.sq_prefill_gemm "tma"): x and W through TMA descriptors (K 208: the last K tile read
    past the end as zeros; 70 rows, 48 channels: 5 × 3 tiles), one resident program walking all 15 tiles, four
    walking several each with the epilogue's counter apart from the loads', or one each: the bits of wq_mm's
    int8 GEMM, the residual added once."""
    gen = _gen(f"sqtma/{programs}")
    t = layout("W8A8_SQ_PER_CHANNEL", torch.randn(48, 208, generator=gen) * 0.05, gen)
    qx = torch.randint(-128, 128, (70, 208), generator=gen, dtype=torch.int8)
    out_scale = torch.rand(48, generator=gen) * 1e-4
    res = torch.randn(70, 48, generator=gen).half()
    config = (16, 16, 64, 1, 1)
    want = ck.wq_mm(qx, t["weight"], out_scale, wfmt=ck.W_INT8, afmt=ck.A_INT8, dtype=torch.float16,
                    residual=res.clone(), config=config, group_m=2)
    got = ck.i8_tma_mm(qx, t["weight"], out_scale, dtype=torch.float16, residual=res.clone(), config=config,
                       group_m=2, programs=programs)
    assert torch.equal(got, want)
    exact = (qx.double() @ t["weight"].double().t()) * out_scale.double() + res.double()
    assert rel(got, exact) <= 1e-3

def test_act_prep_rmsnorm_and_silu_gate():
    gen = _gen("prep")
    x = activations(gen, 3, 96).half()
    w = (1 + 0.1 * torch.randn(96, generator=gen)).half()
    y = ck.act_prep(x, norm=w, eps=1e-5)
    xf = x.double()
    ref = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5) * w.double()
    assert rel(y, ref) <= 2e-3
    g = activations(gen, 2, 192).half()
    ref = torch.nn.functional.silu(g[:, :96].double()) * g[:, 96:].double()
    assert rel(ck.act_prep(g, silu=True), ref) <= 2e-3


@pytest.mark.parametrize("fmt", ["fp16", "W8A16", "W4A16_AWQ"])
def test_batch1_gemv_portable_conversion_matches_float64_reference(fmt):
    """The GEMV with its portable weight conversion (cvt 0; the PTX one, cvt 1, needs a GPU)."""
    gen = _gen(f"gemv/{fmt}")
    w = torch.randn(72, 256, generator=gen) * 0.05
    x = activations(gen, 1, 256).half()
    if fmt == "fp16":
        y = ck.gemv(x, w.half(), wfmt=ck.W_FLOAT, cvt=0)
        ref = x.double() @ w.half().double().t()
    elif fmt == "W8A16":
        t = layout(fmt, w, gen)
        y = ck.gemv(x, t["weight"], wfmt=ck.W_INT8, wscale=t["weights_scaling_factor"].half(),
                    scale_mode=ck.S_CHANNEL, cvt=0)
        ref = reference(fmt, t, x, exact_dequantized(fmt, t, torch.float16))
    else:
        t = layout(fmt, w, gen, group=64)
        y = ck.gemv(x, t["weight"], wfmt=ck.W_INT4, wscale=t["weights_scaling_factor"].half(), group=64,
                    prequant=t["prequant_scaling_factor"].half(), cvt=0)
        ref = reference(fmt, t, x, exact_dequantized(fmt, t, torch.float16, 64))
    assert y.shape == (1, 72) and rel(y, ref) <= 1e-2


@pytest.mark.parametrize("fused,tile", [(False, None), (True, None), (True, (16, 48, 2)), (False, (128, 0, 8))],
                         ids=["reduce-kernel", "fused-reduce", "fused-reduce-16x48w2", "reduce-kernel-128w8"])
@pytest.mark.parametrize("kv", [None, "INT8"])
def test_split_kv_decode_attention_matches_float64_softmax(kv, fused, tile):
    """GQA (4 heads on 2 KV heads), a masked (left-padded) prefix, several splits, the int8 KV cache; the splits
    combined by a second kernel or by each (row, head)'s last program, whose counters are zero again after a call
    (a graph replays the launch), and which may quantize for the o_proj next; at the default tile and at others
    (KernelConfig.attn_tile: splits of several loop steps, and one step wider than a split's keys). The interpreter
    runs programs one at a time: GPU concurrency is tests/test_cuda.py's."""
    gen = _gen(f"attn/{kv}")
    B, H, KVH, D, L, cur = 2, 4, 2, 64, 200, 151
    att = ck.DecodeAttention(B, H, KVH, D, L, torch.float16, torch.device("cpu"), fused_reduce=fused, tile=tile)
    assert att.nsplit > 1 and att.split == {None: 64, (16, 48, 2): 48, (128, 0, 8): 128}[tile]
    q = torch.randn(B, H * D, generator=gen).half()
    k = torch.randn(B, KVH, L, D, generator=gen)
    v = torch.randn(B, KVH, L, D, generator=gen)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, :5] = False
    scale = None
    if kv == "INT8":
        scale = torch.tensor([4.0 / 127])
        k, v = (torch.round(c / scale).clamp(-127, 127).to(torch.int8) for c in (k, v))
        kf, vf = k.double() * scale.double(), v.double() * scale.double()
    else:
        k, v = k.half(), v.half()
        kf, vf = k.double(), v.double()
    out = att(q, k, v, mask, torch.tensor(cur - 1), kv_scale=scale, kv_algo=kv)
    assert not att.count.any()
    assert torch.equal(att(q, k, v, mask, torch.tensor(cur - 1), kv_scale=scale, kv_algo=kv), out)
    if fused:  # quantized for a SmoothQuant o_proj (KernelConfig.gemv_then): act_prep's bits
        pre, a = (1 + 0.2 * torch.randn(H * D, generator=gen)).half(), torch.tensor([0.004])
        got = att(q, k, v, mask, torch.tensor(cur - 1), kv_scale=scale, kv_algo=kv, then_quant=(pre, a, ck.A_INT8))
        assert torch.equal(got, ck.act_prep(out, prequant=pre, act_scale=a, afmt=ck.A_INT8))
        assert got.abs().max() > 20 and not att.count.any()
    for b in range(B):
        for h in range(H):
            s = kf[b, h // 2, :cur] @ q[b, h * D:(h + 1) * D].double() / math.sqrt(D)
            s[~mask[b, :cur]] = -math.inf
            ref = torch.softmax(s, 0) @ vf[b, h // 2, :cur]
            assert rel(out[b, h * D:(h + 1) * D], ref) <= 5e-3, (b, h)


def _decode_token(key: str, L: int):
    """One decode token's inputs at slot 130 of a cache of L: 2 rows, 4 heads on 2 KV heads of 64, row 0 left-padded
    by 7 (its position lags the slot); the generator, to draw the history from next."""
    from quant.runtime import rope

    gen = _gen(key)
    B, H, KVH, D, slot = 2, 4, 2, 64, 130
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, :7] = False
    qkv = (torch.randn(B, (H + 2 * KVH) * D, generator=gen) * 2).half()
    return gen, (B, H, KVH, D, slot), rope.inv_freq(D, 10000.0, None), torch.tensor([slot - 7, slot]), mask, qkv


def _kv_cache(kv: str | None, B: int, KVH: int, L: int, D: int):
    from quant.runtime.kv_cache import KVCache, QuantizedKVCache

    if kv is None:
        return KVCache(1, B, KVH, L, D, torch.float16, torch.device("cpu"))
    return QuantizedKVCache(1, B, KVH, L, D, torch.float16, torch.device("cpu"), algo=kv, scales=[torch.tensor(0.05)])


@pytest.mark.parametrize("kv", [None, "INT8"])
def test_attention_with_rope_and_cache_write_in_the_same_launch(kv):
    """``DecodeAttention(rope=...)`` (KernelConfig.attn_rope_fused): the token's qkv rotated, its k / v written to
    the cache at the slot and attended to, in the split kernel — against rope_cache_write then attention: the
    same cache contents and the same output (left padding: positions lag the slot; GQA; int8 cache)."""
    L = 160
    gen, (B, H, KVH, D, slot), freq, pos, mask, qkv = _decode_token(f"rope-attn/{kv}", L)
    hist_k, hist_v = (torch.randn(B, KVH, slot, D, generator=gen).half() for _ in range(2))
    caches = []
    for _ in range(2):
        c = _kv_cache(kv, B, KVH, L, D)
        c.update(0, 0, hist_k, hist_v)
        caches.append(c)
    quant = dict(kv_scale=caches[0].scale[0:1], kv_algo=kv) if kv else {}
    att = ck.DecodeAttention(B, H, KVH, D, L, torch.float16, torch.device("cpu"))
    s = torch.tensor(slot)
    c = caches[0]
    q = ck.rope_cache_write(qkv, pos, s, freq, c.k[0], c.v[0], H, KVH, D, kv_rcp=c.rcp[0:1] if kv else None,
                            kv_algo=kv)
    want = att(q, c.k[0], c.v[0], mask, s, **quant)
    c = caches[1]
    got = att(qkv, c.k[0], c.v[0], mask, s, rope=(pos, freq, c.rcp[0:1] if kv else None), **quant)
    assert torch.equal(caches[1].k[0], caches[0].k[0]) and torch.equal(caches[1].v[0], caches[0].v[0])
    assert torch.equal(got, want)


@pytest.mark.parametrize("kv,rope", [(None, True), ("INT8", True), (None, False)])
def test_attention_loading_the_cache_before_q_gives_the_same_bits(kv, rope):
    """KernelConfig.attn_pdl: the split kernel loads each split's first block of keys / values before it reads q
    (EARLY; the launch with programmatic dependent launch and the grid wait between them are the GPU's:
    tests/test_cuda.py, experiments/gpu/triton_compile_check.py). Against the kernel without it: the same output
    and cache bits, with splits of one block (two past the slot: empty) and with one split of several blocks (the
    peeled first block, then the loop)."""
    L = 260
    gen, (B, H, KVH, D, slot), freq, pos, mask, qkv = _decode_token(f"early-attn/{kv}/{rope}", L)
    hist = [torch.randn(B, KVH, slot + 1, D, generator=gen).half() for _ in range(2)]
    q = qkv if rope else qkv[:, :H * D].contiguous()
    for nsplit in (None, 1):
        outs, caches = [], []
        for early in (False, True):
            c = _kv_cache(kv, B, KVH, L, D)
            c.update(0, 0, *hist)  # the slot too: read where RoPE is not fused, overwritten where it is
            att = ck.DecodeAttention(B, H, KVH, D, L, torch.float16, torch.device("cpu"), fused_reduce=True)
            assert not att.pdl_ok  # (a CPU tensor: the kernel's early loads, no PDL launch)
            if nsplit:  # (the workspace, sized for more splits, holds these)
                att.nsplit, att.split = ck.attn_splits(B, H, L, n_sm=2)
                assert att.nsplit == nsplit and att.split > ck.ATTN_TILE[0]
            else:
                assert att.nsplit * att.split > L and (att.nsplit - 2) * att.split > slot  # two splits empty
            extra = dict(rope=(pos, freq, c.rcp[0:1] if kv else None)) if rope else {}
            outs.append(att(q, c.k[0], c.v[0], mask, torch.tensor(slot), kv_scale=c.scale[0:1] if kv else None,
                            kv_algo=kv, pdl=early, **extra))
            caches.append(c)
        assert torch.equal(outs[0], outs[1]) and bool(torch.isfinite(outs[1].float()).all())
        assert torch.equal(caches[0].k[0], caches[1].k[0]) and torch.equal(caches[0].v[0], caches[1].v[0])

def test_batch1_gemv_prologues_and_residual():
    """The GEMV's own prologue on the row (RMSNorm; SiLU·gate; SmoothQuant's pre-quant scale and int8
    quantization) and its residual add, against the float64 reference of the same steps."""
    gen = _gen("gemv-prologue")
    w = torch.randn(40, 128, generator=gen) * 0.05
    t8 = layout("W8A16", w, gen)
    w8 = exact_dequantized("W8A16", t8, torch.float16).double()
    norm = (1 + 0.1 * torch.randn(128, generator=gen)).half()
    x = activations(gen, 1, 128).half()
    y = ck.gemv(x, t8["weight"], wfmt=ck.W_INT8, wscale=t8["weights_scaling_factor"].half(), scale_mode=ck.S_CHANNEL,
                norm=norm, eps=1e-5, cvt=0)
    xn = (x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-5) * norm.double()).half()
    assert rel(y, xn.double() @ w8.t()) <= 1e-2
    g = activations(gen, 1, 256).half()
    r = torch.randn(1, 40, generator=gen).half()
    y = ck.gemv(g, t8["weight"], wfmt=ck.W_INT8, wscale=t8["weights_scaling_factor"].half(),
                scale_mode=ck.S_CHANNEL, silu=True, residual=r.clone(), cvt=0)
    gu = (torch.nn.functional.silu(g[:, :128].double()) * g[:, 128:].double()).half()
    assert rel(y, r.double() + gu.double() @ w8.t()) <= 1e-2
    tq = layout("W8A8_SQ_PER_CHANNEL", w, gen)
    a = tq["activation_scaling_factor"].float()
    y = ck.gemv(x, tq["weight"], wfmt=ck.W_INT8, wscale=(a * tq["weights_scaling_factor"].float()).contiguous(),
                scale_mode=ck.S_CHANNEL, prequant=tq["prequant_scaling_factor"].half(), act_scale=a.reshape(1),
                afmt=ck.A_INT8, cvt=0)
    ref = reference("W8A8_SQ_PER_CHANNEL", tq, x, exact_dequantized("W8A8_SQ_PER_CHANNEL", tq, torch.float16))
    assert rel(y, ref) <= 1e-2


@pytest.mark.parametrize("fmt", ["fp16", "W8A16", "W4A16_AWQ", "W8A8_SQ_PER_CHANNEL"])
def test_batch1_gemv_epilogue_does_the_next_linears_prologue(fmt):
    """KernelConfig.gemv_then: the GEMV's epilogue doing what act_prep would do before the next linear. SiLU · gate
    of the two output halves (74 outputs: the last program half full), and RMSNorm after the residual add by the
    last program (a counter it resets); each also quantized to int8 for a SmoothQuant linear next: the same bits
    as the GEMV followed by act_prep, twice in a row, counter back at zero; on a row over one chunk (NB) of the
    norm, against float64."""
    gen = _gen(f"gemv-then/{fmt}")
    w = torch.randn(74, 128, generator=gen) * 0.05
    x = activations(gen, 1, 128).half()
    if fmt == "fp16":
        args, kw = (x, w.half()), {"wfmt": ck.W_FLOAT}
    elif fmt == "W8A16":
        t = layout(fmt, w, gen)
        args = (x, t["weight"])
        kw = {"wfmt": ck.W_INT8, "wscale": t["weights_scaling_factor"].half(), "scale_mode": ck.S_CHANNEL}
    elif fmt == "W4A16_AWQ":
        t = layout(fmt, torch.randn(148, 128, generator=gen) * 0.05, gen, group=64)  # 74 packed row pairs
        args = (x, t["weight"])
        kw = {"wfmt": ck.W_INT4, "wscale": t["weights_scaling_factor"].half(), "group": 64}
    else:
        t = layout(fmt, w, gen)
        a = t["activation_scaling_factor"].float()
        qx = ck.act_prep(x, prequant=t["prequant_scaling_factor"].half(), act_scale=a.reshape(1), afmt=ck.A_INT8)
        args = (qx, t["weight"])
        kw = {"wfmt": ck.W_INT8, "afmt": ck.A_INT8_IN, "wscale": (a * t["weights_scaling_factor"].float()).contiguous(),
              "scale_mode": ck.S_CHANNEL, "out_dtype": torch.float16}
    kw["cvt"] = 0
    y = ck.gemv(*args, **kw)
    n = y.shape[1]
    assert torch.equal(ck.gemv(*args, **kw, then_silu=True), ck.act_prep(y, silu=True))
    norm = (1 + 0.1 * torch.randn(n, generator=gen)).half()
    res = torch.randn(1, n, generator=gen).half()
    counter = torch.zeros(1, dtype=torch.int32)
    want = ck.act_prep(res + y, norm=norm, eps=1e-5)
    for _ in range(2):
        h = res.clone()
        xn = ck.gemv(*args, **kw, residual=h, then_norm=norm, eps=1e-5, counter=counter)
        assert torch.equal(h, res + y) and torch.equal(xn, want) and not counter.any()
    # and quantized for a SmoothQuant linear next (its pre-quant scale, int8 by its static scale), as act_prep would
    a = torch.tensor([0.03])
    pre = (1 + 0.2 * torch.randn(n, generator=gen)).half()
    got = ck.gemv(*args, **kw, then_silu=True, then_quant=(pre[: n // 2], a, ck.A_INT8))
    assert got.dtype == torch.int8 and torch.equal(got, ck.act_prep(y, silu=True, prequant=pre[: n // 2],
                                                                     act_scale=a, afmt=ck.A_INT8))
    got = ck.gemv(*args, **kw, residual=res.clone(), then_norm=norm, eps=1e-5, counter=counter,
                  then_quant=(pre, a, ck.A_INT8))
    assert torch.equal(got, ck.act_prep(res + y, norm=norm, eps=1e-5, prequant=pre, act_scale=a, afmt=ck.A_INT8))
    assert got.abs().max() > 20 and not counter.any()  # (values far from all-zero or all-saturated)
    if fmt == "fp16":  # 4100 outputs: the norm in two chunks of NORM_ROW (4096), 65 programs of 64 rows
        n = ck.NORM_ROW + 4
        w = torch.randn(n, 64, generator=gen) * 0.05
        x = activations(gen, 1, 64).half()
        norm = (1 + 0.1 * torch.randn(n, generator=gen)).half()
        res = torch.randn(1, n, generator=gen).half()
        res[0, ck.NORM_ROW:] = 40.0  # most of mean(h²) in the second chunk
        xn = ck.gemv(x, w.half(), wfmt=ck.W_FLOAT, residual=res.clone(), then_norm=norm, eps=1e-5, counter=counter,
                     config=(64, 64, 4))
        hf = res.double() + (x.double() @ w.half().double().t()).half().double()
        assert rel(xn, hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.double()) <= 2e-3


def test_rope_cache_write_matches_the_cpu_rope():
    """RoPE of one decode token per row (positions lagging the slot: left padding) and the k / v stored at the
    slot, against quant.runtime.rope (the CPU runtime's)."""
    from quant.runtime import rope

    gen = _gen("rope")
    B, H, KVH, D, L, slot = 2, 4, 2, 64, 40, 30
    freq = rope.inv_freq(D, 10000.0, None)
    qkv = (torch.randn(B, (H + 2 * KVH) * D, generator=gen) * 2).half()
    pos = torch.tensor([slot - 4, slot])
    kc, vc = torch.zeros(B, KVH, L, D).half(), torch.zeros(B, KVH, L, D).half()
    q = ck.rope_cache_write(qkv, pos, torch.tensor(slot), freq, kc, vc, H, KVH, D)
    cos, sin = rope.cos_sin(pos[:, None], freq, torch.float16)
    qr, kr, v = qkv.view(B, 1, -1).split((H * D, KVH * D, KVH * D), dim=-1)
    q_ref = rope.apply(qr.view(B, 1, H, D).transpose(1, 2), cos, sin).transpose(1, 2).reshape(B, H * D)
    k_ref = rope.apply(kr.view(B, 1, KVH, D).transpose(1, 2), cos, sin)[:, :, 0]
    assert rel(q, q_ref) <= 2e-3 and rel(kc[:, :, slot], k_ref) <= 2e-3
    assert torch.equal(vc[:, :, slot], v.view(B, KVH, D)) and not kc[:, :, :slot].any()


@pytest.mark.parametrize("kv", [None, "INT8"])
def test_rope_cache_write_for_prefill_stores_each_token_at_its_slot(kv):
    """KernelConfig.prefill_rope: T tokens of each cache row (2 rows, 5 tokens from slot 3): q rotated as
    quant.runtime.rope does, k rotated and v stored at slots 3..7 of their row (quantized as the cache stores them
    when INT8), nothing else written."""
    from quant.runtime import rope
    from quant.runtime.kv_cache import QuantizedKVCache

    gen = _gen(f"rope-prefill/{kv}")
    B, T, start, H, KVH, D, L = 2, 5, 3, 4, 2, 64, 12
    freq = rope.inv_freq(D, 10000.0, None)
    qkv = (torch.randn(B * T, (H + 2 * KVH) * D, generator=gen) * 2).half()
    pos = torch.arange(start, start + T).repeat(B) - torch.tensor([0, 2]).repeat_interleave(T)  # row 1 left-padded
    cache = QuantizedKVCache(1, B, KVH, L, D, torch.float16, torch.device("cpu"), algo=kv,
                             scales=[torch.tensor(0.05)]) if kv else None
    kc = cache.k[0] if kv else torch.zeros(B, KVH, L, D).half()
    vc = cache.v[0] if kv else torch.zeros(B, KVH, L, D).half()
    q = ck.rope_cache_write(qkv, pos, start, freq, kc, vc, H, KVH, D, kv_algo=kv,
                            kv_rcp=cache.rcp[0:1] if kv else None)
    cos, sin = rope.cos_sin(pos.view(B, T), freq, torch.float16)
    qr, kr, v = qkv.view(B, T, -1).split((H * D, KVH * D, KVH * D), dim=-1)
    q_ref = rope.apply(qr.view(B, T, H, D).transpose(1, 2), cos, sin).transpose(1, 2).reshape(B * T, H * D)
    k_ref = rope.apply(kr.view(B, T, KVH, D).transpose(1, 2), cos, sin)
    v_ref = v.view(B, T, KVH, D).transpose(1, 2)
    assert rel(q, q_ref) <= 2e-3
    if kv:
        k_got, v_got = cache.read(0, start + T)
        assert torch.equal(vc[:, :, start:start + T], cache.quantize(0, v_ref))
        assert rel(k_got[:, :, start:], k_ref) <= 2e-2  # one int8 step at most here and there
    else:
        assert rel(kc[:, :, start:start + T], k_ref) <= 2e-3 and torch.equal(vc[:, :, start:start + T], v_ref)
    assert not kc[:, :, :start].float().any() and not kc[:, :, start + T:].float().any()
    assert not vc[:, :, :start].float().any() and not vc[:, :, start + T:].float().any()


def test_dequant_kernels_round_once():
    """Prefill's dequantized weights (the default path without KernelConfig.wq_prefill): q · s in float32, one
    rounding to the compute dtype; the same into the front of a larger buffer (``out``: KernelConfig.wq_prefill_ahead's
    buffers), the rest of it untouched."""
    gen = _gen("dequant")
    t8 = layout("W8A16", torch.randn(48, 96, generator=gen) * 0.05, gen)
    s8 = t8["weights_scaling_factor"].float()
    want8 = (t8["weight"].float() * s8[:, None]).half()
    assert torch.equal(ck.dequant_int8(t8["weight"], s8, torch.float16), want8)
    t4 = layout("W4A16_AWQ", torch.randn(48, 128, generator=gen) * 0.05, gen, group=64)
    s4 = t4["weights_scaling_factor"].float()
    want = exact_dequantized("W4A16_AWQ", {**t4, "weights_scaling_factor": s4}, torch.float32, 64)
    assert torch.equal(ck.dequant_int4(t4["weight"], s4, 64, torch.float32), want)
    for fn, ref in ((lambda out: ck.dequant_int8(t8["weight"], s8, torch.float16, out=out), want8),
                    (lambda out: ck.dequant_int4(t4["weight"], s4, 64, torch.float32, out=out), want)):
        buf = torch.full((ref.numel() + 100,), 7.0, dtype=ref.dtype)
        y = fn(buf[:ref.numel()].view(ref.shape))
        assert torch.equal(y, ref) and y.data_ptr() == buf.data_ptr() and (buf[ref.numel():] == 7).all()


@pytest.mark.parametrize("rows,group", [(1, 32), (17, 128), (33, 64), (64, 128), (5, 256)])  # row tiles 16, 32, 64
def test_w4k_tensor_core_kernel_to_64_rows(rows, group):
    """cuda_kernels.w4k_mm on the k-packed copy, its portable conversion (the PTX one: tests/test_cuda.py): the rows
    padded to 16, 32 or 64, N not a multiple of the tile, one, two or four sub-blocks per group, residual added."""
    gen = _gen(f"w4k/{rows}/{group}")
    n, k = 80, 512
    q = torch.randint(-8, 8, (n, k), generator=gen)
    s = (torch.rand(n, k // group, generator=gen) * 0.02 + 0.001).half()
    kw = ck.w4k_kw(k, group, ck.W4K_KW)
    w = ck.pack_int4_k(q, kw)
    x = activations(gen, rows, k).half()
    res = torch.randn(rows, n, generator=gen).half()
    assert all(tile[1] == ck.W4K_KW for tile in ck.W4K_TILES.values())  # one packing serves every row tile
    y = ck.w4k_mm(x, w, s, group=group, kw=kw, residual=res.clone(), cvt=0)  # W4K_TILES at the rows' tile
    want = x.double() @ (q.double() * s.double().repeat_interleave(group, dim=1)).t() + res.double()
    assert y.shape == (rows, n) and rel(y, want) <= 1e-2
    from quant.runtime.schemes.base import W4K_MAX_M

    assert W4K_MAX_M == ck.W4K_MAX_M == 64  # KernelConfig's bound on w4k_rows, kept without importing Triton there


def test_w4k_tiles_hold_whole_groups():
    """The k-packed kernel scales each group inside a tile and starts every tile afresh, so a tile (8 · KW k) must
    hold whole groups: groups of 96 (on an H200 the kernel dropped 2 of each tile's 8 sub-blocks: 36 % error at
    5 rows) and groups wider than a tile get no tile width, and the other kernels serve them."""
    assert ck.w4k_kw(768, 96, ck.W4K_KW) is None and ck.w4k_kw(576, 96, ck.W4K_KW) is None
    assert ck.w4k_kw(4096, 1024, ck.W4K_KW) is None
    assert ck.w4k_kw(768, 256, ck.W4K_KW) == 32 and ck.w4k_kw(4096, 128, ck.W4K_KW) == 64
    assert ck.w4k_kw(768, 32, ck.W4K_KW) == 32 and ck.w4k_kw(96 * 16, 96 * 2, ck.W4K_KW) is None


@pytest.mark.parametrize("group, n, k", [(32, 40, 768), (128, 64, 1024), (256, 33, 768)])  # KW 32 / 64; N ragged
def test_dequant_from_the_k_packed_copy_rounds_once(group, n, k):
    """KernelConfig.w4k_prefill's weights: the k-packed copy back to q · s, in float32 and rounded once, the same
    bits as from the stored layout."""
    gen = _gen(f"dequant-k/{group}/{n}")
    q = torch.randint(-8, 8, (n, k), generator=gen)
    s = (torch.rand(n, k // group, generator=gen) * 0.02 + 0.001).half()
    kw = ck.w4k_kw(k, group, ck.W4K_KW)
    assert kw == (64 if k == 1024 else 32)
    want = (q.float() * s.float().repeat_interleave(group, dim=1)).half()
    assert torch.equal(ck.dequant_int4_k(ck.pack_int4_k(q, kw), s, group, kw, torch.float16), want)
    buf = torch.zeros(n * k + 64, dtype=torch.float16)  # (KernelConfig.wq_prefill_ahead's buffers)
    assert torch.equal(ck.dequant_int4_k(ck.pack_int4_k(q, kw), s, group, kw, torch.float16,
                                         out=buf[:n * k].view(n, k)), want)
    assert torch.equal(buf[:n * k].view(n, k), want) and not buf[n * k:].any()
