# run on an H100 at commit 058564c (the grouped kernel, since removed), 2026-12-07: python3 grouped-nan-check.py
# stop 48: where the grouped kernel's NaNs come from (attn_bench rows 8B 64x0w4, 32x0w2 on both shapes)
import math, sys, torch
from quant.runtime import cuda_kernels as ck, rope
from quant.runtime.random_checkpoint import SHAPES
from experiments.kernel_bench import graph
dev = torch.device("cuda")
for shape in ("llama3-8b", "llama2-7b"):
    d = SHAPES[shape]; H, KVH = d["num_attention_heads"], d["num_key_value_heads"]; D = d["hidden_size"] // H
    total, slot = 576, 544
    gen = torch.Generator(device=dev).manual_seed(0)
    k0 = torch.randn(1, KVH, total, D, generator=gen, device=dev).half(); v0 = torch.randn(1, KVH, total, D, generator=gen, device=dev).half()
    qkv = torch.randn(1, (H + 2 * KVH) * D, generator=gen, device=dev).half()
    mask = torch.ones(1, total, dtype=torch.bool, device=dev); pos, s = torch.tensor([slot], device=dev), torch.tensor(slot, device=dev)
    freq = rope.inv_freq(D, 10000.0, None).to(dev)
    kr, vr = k0.clone(), v0.clone()
    q = ck.rope_cache_write(qkv, pos, s, freq, kr[0:1], vr[0:1], H, KVH, D)
    ref = torch.empty(H, D, dtype=torch.float64, device=dev)
    for h in range(H):
        sc = kr[0, h // (H // KVH), :slot + 1].double() @ q[0, h * D:(h + 1) * D].double() / math.sqrt(D)
        ref[h] = torch.softmax(sc, 0) @ vr[0, h // (H // KVH), :slot + 1].double()
    for tile in [(64, 0, 4), (32, 0, 2), (32, 0, 4), (32, 32, 2), (64, 0, 2), (16, 16, 2)]:
        for fused in (False, True):
            for rp in (True, False):
                for pdl in ((False, True) if rp else (False,)):
                    att = ck.DecodeAttention(1, H, KVH, D, total, torch.float16, dev, fused_reduce=fused, tile=tile, grouped=True)
                    kk, vv = k0.clone(), v0.clone()
                    out = torch.full((1, H * D), 7777.0, dtype=torch.float16, device=dev)
                    att.m.fill_(float("nan")); att.l.fill_(float("nan")); att.o.fill_(float("nan"))
                    if rp:
                        att(qkv, kk, vv, mask, s, rope=(pos, freq, None), out=out, pdl=pdl)
                    else:
                        att(q, kr, vr, mask, s, out=out)
                    torch.cuda.synchronize()
                    o = out.view(H, D).float()
                    unwritten = (o == 7777).all(1).nonzero().flatten().tolist()
                    nanh = o.isnan().any(1).nonzero().flatten().tolist()
                    err = ((o.double() - ref).abs().max() / ref.abs().max()).item()
                    ws_m = att.m.view(H, att.nsplit); ws_o = att.o.view(H, att.nsplit, D)
                    used = [sp for sp in range(att.nsplit) if sp * att.split <= slot]
                    m_nan = ws_m[:, used].isnan().nonzero().tolist()[:6]
                    o_nan = ws_o[:, used].isnan().any(-1).nonzero().tolist()[:6]
                    reps = ""
                    if rp and fused:
                        g = graph(lambda: att(qkv, kk, vv, mask, s, rope=(pos, freq, None), out=out, pdl=pdl))
                        bad = 0
                        for _ in range(20):
                            g.replay(); torch.cuda.synchronize(); bad += int(out.isnan().any())
                        reps = f" graph replays with NaN {bad}/20 count {att.count.abs().sum().item()}"
                    print(f"{shape} {tile} fused={fused} rope={rp} pdl={pdl} nsplit={att.nsplit}x{att.split} rel_err={err:.1e} "
                          f"unwritten={unwritten[:8]} nan_heads={nanh[:8]} m_nan={m_nan} o_nan={o_nan}{reps}", flush=True)
