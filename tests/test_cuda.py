"""The runtime's CUDA path: every CUDA kernel against a float64 / CPU reference, the whole runtime against its CPU
path, graph replay against eager steps, and the bad-input lines.

GPU tests skip cleanly where no CUDA GPU is visible (CI); the bad-input tests for a machine *without* a GPU run
there instead. References and stated tolerances (relative error ‖y − ref‖ / ‖ref‖, fresh random inputs per
check, outputs poisoned with NaN where the kernel writes into a given buffer):

- linears (each format, every path: fused GEMV M ≤ 8, ``tl.dot`` 9–64, library GEMM above): the float64 TRT-LLM
  forward of tests/test_kernels.py on the handler's exact dequantized weight, ≤ 1e-2 in float16/bfloat16 (output
  rounding alone is ≈ 2⁻⁹); the int8/FP8 activation quantization bit-exact against PyTorch's;
- fused prologues (RMSNorm, SiLU·gate, residual): the CPU path's own tensor ops in float64 after the same
  roundings, ≤ 1e-2; GEMV vs the library path on the same inputs ≤ 1e-2;
- decode RoPE + cache write and split-KV attention (fp16/int8/fp8 cache, GQA, left padding): the CPU path's
  ``rope.apply`` + ``KVCache.update`` + SDPA; the stored cache equal up to one quantization step on < 1% of
  entries (RoPE is rounded once here, twice there), attention ≤ 1e-2;
- the runtime (tiny random checkpoint written as a TRT-LLM folder, float16 on the GPU): logits vs the CPU
  runtime in float32 within the bf16 bounds of tests/test_runtime_formats.py; decode-step logits vs a prefill of
  the whole sequence ≤ 2e-2; graph replay gives exactly the eager steps' tokens.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import zlib

import pytest
import torch

from quant.errors import UserError
from tests.conftest import rel

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
DEV = torch.device("cuda")
ALGOS = [None, "W8A16", "W8A8_SQ_PER_CHANNEL", "W4A16_AWQ", "FP8"]
GPU_DTYPES = [torch.float16, torch.bfloat16]


def _tiny(recipe: str, seed: int = 0, device="cpu"):
    from quant.runtime.random_checkpoint import RECIPES, random_checkpoint, random_config

    algo, kv = RECIPES[recipe]
    return random_checkpoint(random_config("tiny", algo, kv, group_size=64), device=device, seed=seed)


# -- bad input, on any machine --------------------------------------------------------------------------------------
@no_gpu
def test_runtime_on_cuda_without_gpu_is_one_clear_error():
    from quant.runtime.torch_runtime import TorchRuntime

    with pytest.raises(UserError, match="no CUDA GPU is available"):
        TorchRuntime(_tiny("fp16"), device="cuda", compute_dtype="float16")


@no_gpu
def test_bench_on_cuda_without_gpu_exits_2(tmp_path, capsys):
    from experiments.bench import main

    assert main(["--device", "cuda", "--out", str(tmp_path / "b.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "no CUDA GPU" in err[0]


def test_bench_refuses_a_non_cuda_device(tmp_path, capsys):
    from experiments.bench import main

    assert main(["--device", "cpu", "--out", str(tmp_path / "b.json")]) == 2
    assert "not a CUDA device" in capsys.readouterr().err


def _pretend_old_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA A100")


@pytest.mark.parametrize("recipe", ["fp8", "fp16_kv_int8"])
def test_fp8_below_compute_capability_8_9_is_refused(monkeypatch, recipe):
    """Checked before anything touches the device (here there may be none: CUDA is faked as an A100)."""
    from quant.checkpoint import Checkpoint
    from quant.formats import layer_algos
    from quant.runtime.random_checkpoint import RECIPES, random_config
    from quant.runtime.torch_runtime import check_cuda

    algo, kv = RECIPES[recipe]
    cfg = random_config("tiny", algo, kv)
    ckpt = Checkpoint(path="x", config=cfg, tensors={}, layer_algos=layer_algos(cfg, "x"))
    _pretend_old_gpu(monkeypatch)
    if recipe == "fp8":
        with pytest.raises(UserError, match="compute capability ≥ 8.9.*8.0"):
            check_cuda(torch.device("cuda"), ckpt)
    else:
        check_cuda(torch.device("cuda"), ckpt)  # INT8 KV cache, fp16 weights: fine on an A100


def test_from_dir_on_cuda_refuses_from_the_header_before_loading_weights(monkeypatch, tmp_path):
    """from_dir on a GPU reads weights straight onto the device, so its refusals come from the file's header first:
    here CUDA is faked (an A100, or no GPU at all), so any weight read onto "cuda" would fail otherwise."""
    from quant.runtime.random_checkpoint import write_checkpoint
    from quant.runtime.torch_runtime import TorchRuntime

    folder = write_checkpoint(_tiny("fp8"), tmp_path / "fp8")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA GPU is available"):
            TorchRuntime.from_dir(folder, device="cuda", compute_dtype="float16")
    _pretend_old_gpu(monkeypatch)
    with pytest.raises(UserError, match="uses FP8: .*compute capability ≥ 8.9"):
        TorchRuntime.from_dir(folder, device="cuda", compute_dtype="float16")
    with pytest.raises(UserError, match="not a valid torch device"):
        TorchRuntime.from_dir(folder, device="gpu0")


def test_bench_fp8_on_old_gpu_exits_2(monkeypatch, tmp_path, capsys):
    from experiments.bench import main

    _pretend_old_gpu(monkeypatch)
    assert main(["--recipes", "fp16,fp8", "--out", str(tmp_path / "b.json")]) == 2
    assert "compute capability ≥ 8.9" in capsys.readouterr().err


# -- kernels ----------------------------------------------------------------------------------------------------------
def _layout(algo, gen, out, inp, group):
    from tests.test_kernels import layout

    w = torch.randn(out, inp, generator=gen) * 0.05
    if algo is None:
        return {"weight": w.half()}
    return layout(algo, w, gen, group=group)


def _reference(algo, t, x, wd):
    from tests.test_kernels import reference

    if algo is None:
        return x.double() @ wd.double().t()
    return reference(algo, t, x, wd)


@cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("algo", ALGOS, ids=lambda a: a or "fp16")
def test_linear_every_path_matches_float64_reference(algo, dtype):
    _check_linear(algo, dtype)


@cuda
@pytest.mark.parametrize("out, inp", [(92, 576), (96, 584), (2056, 584)])
def test_fp8_shapes_cublaslt_cannot_take(out, inp):
    """cuBLASLt's FP8 GEMM takes out- and in-features in multiples of 16 only: other out-features run on a copy padded
    once with zero rows, other in-features on the float32 upcast; every path against the float64 reference."""
    from quant.hardware import fp8_refusal

    if fp8_refusal(0):
        pytest.skip(fp8_refusal(0))
    for dtype in GPU_DTYPES:
        _check_linear("FP8", dtype, out=out, inp=inp)


@cuda
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("algo", ["W8A16", "W4A16_AWQ"])
def test_weight_only_prefill_in_registers_matches_float64_reference(algo, group):
    """KernelConfig.wq_prefill: more than 64 rows through the tl.dot kernel on the stored weights (dequantized in
    registers, no float16 copy for cuBLAS), float16 and bfloat16; rows and N not multiples of its tiles, K not a
    multiple of its K tile for INT8 (600) and the default model's 576 for INT4 where the group divides it, and
    activations ×40 (x · q is scaled in float32 before any rounding)."""
    from quant.runtime.linear import make_linear
    from quant.runtime.schemes.base import KernelConfig
    from tests.test_kernels import activations

    inp = 600 if algo == "W8A16" else (576 if 576 % group == 0 else 640)
    gen = torch.Generator().manual_seed(zlib.crc32(f"wqprefill/{algo}/{group}".encode()))
    t = _layout(algo, gen, 96, inp, group)
    for dtype in GPU_DTYPES:
        h = make_linear(algo, {k: v.to(DEV) for k, v in t.items()}, dtype=dtype, device=DEV, group_size=group,
                        kernels=KernelConfig(wq_prefill=frozenset({algo})))
        wd = h.dequantized_weight().cpu()
        for m, scale in ((65, 1), (300, 1), (300, 40)):
            x = (activations(gen, m, inp) * scale).to(dtype)
            y = h(x.to(DEV))
            assert y.shape == (m, 96) and y.dtype == dtype and bool(torch.isfinite(y).all())
            err = rel(y, _reference(algo, t, x, wd))
            assert err <= 1e-2, f"{algo} g{group} {dtype} M={m} ×{scale}: {err:.2e}"


@cuda
@pytest.mark.parametrize("cvt", [0, 1])
@pytest.mark.parametrize("algo", ["W8A16", "FP8"])
def test_gemv_weight_conversions_match_float64_reference(algo, cvt):
    """Both ways the batch-1 GEMV turns int8 / fp8 weights into float32 (PTX prmt / e4m3x2 converter, and the
    portable bit moves), whichever is the default, in float16 and bfloat16."""
    from quant.runtime.schemes.base import KernelConfig

    for dtype in GPU_DTYPES:
        _check_linear(algo, dtype, KernelConfig(gemv_cvt=((algo, cvt),)))


@cuda
def test_w8a16_byte_permute_conversion_is_exact():
    """KernelConfig.wq_cvt: W8A16's tl.dot kernel converting int8 by PTX byte permute gives the same
    output, bit for bit, as Triton's conversion (both are exact in float16), over every int8 value, at rows on each
    side of its tiles (2, 16, 17, 64, and 65 on the prefill tile), K 600 (not a multiple of its K tiles), with a
    residual; the wide tiles with K split (wq_wide; the kernel's split test: tests/test_triton_interpret.py) match
    Triton's conversion within float32 summation order, replayed in a CUDA graph (the split counter left at zero
    for the next replay); and the handler in either mode matches the float64 reference."""
    from quant.runtime import cuda_kernels as ck
    from quant.runtime.schemes.base import KernelConfig

    gen = torch.Generator().manual_seed(zlib.crc32(b"wqcvt"))
    w = torch.randint(-128, 128, (96, 600), generator=gen, dtype=torch.int8)
    w[0, :256] = torch.arange(-128, 128, dtype=torch.int8)
    s = (torch.rand(96, generator=gen) * 0.01 + 1e-3).half().to(DEV)
    w = w.to(DEV)
    for m in (2, 16, 17, 64, 65):
        x = torch.randn(m, 600, generator=gen).half().to(DEV)
        r = torch.randn(m, 96, generator=gen).half().to(DEV)
        ys = [ck.wq_mm(x, w, s, wfmt=ck.W_INT8, cvt=c, residual=r.clone()) for c in (0, 1)]
        assert bool(torch.isfinite(ys[0]).all()) and torch.equal(ys[0], ys[1]), f"M={m}"
        if m <= ck.WQ_MM_MAX_M:
            counter = torch.zeros(1, dtype=torch.int32, device=DEV)
            out = torch.empty_like(r)

            def wide():
                out.copy_(r)
                ck.wq_mm(x, w, s, wfmt=ck.W_INT8, cvt=1, split=3, counter=counter, residual=out,
                         config=ck.WQ_WIDE_CONFIG[ck.A_FLOAT][max(16, ck._pow2(m))])

            wide()
            first = out.clone()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                wide()
            for _ in range(3):
                g.replay()
                torch.cuda.synchronize()
                assert torch.equal(out, first) and int(counter.item()) == 0, f"M={m}"
            assert rel(first, ys[0]) <= 2e-3, f"M={m}"
    for kernels in (KernelConfig(wq_cvt=True), KernelConfig(wq_cvt=True, wq_wide=frozenset({"W8A16"}))):
        for dtype in GPU_DTYPES:
            _check_linear("W8A16", dtype, kernels)
    for dtype in GPU_DTYPES:  # SmoothQuant on the wide tiles: int32 partials, exact
        _check_linear("W8A8_SQ_PER_CHANNEL", dtype, KernelConfig(wq_wide=frozenset({"W8A8_SQ_PER_CHANNEL"})))


@cuda
@pytest.mark.parametrize("kernel", ["triton", "tinygemm"])
def test_int4_kernels_match_float64_reference(kernel):
    """W4A16 for 1–64 rows: the Triton GEMV / tl.dot on the stored layout, and tinygemm on its repacked copy (the
    k-packed kernel: test_int4_kpack_matches_float64_reference)."""
    from quant.runtime.schemes.base import KernelConfig

    for dtype in GPU_DTYPES:
        _check_linear("W4A16_AWQ", dtype, KernelConfig(int4_kernel=kernel, w4g_rows=None, w4m_rows=None))


@cuda
@pytest.mark.parametrize("out, inp, group", [(64, 512, 32), (80, 1024, 128), (48, 4096, 128), (64, 768, 64)])
def test_int4_kpack_matches_float64_reference(out, inp, group):
    """The tensor-core kernel on the k-packed copy (cuda_kernels.w4k_mm) for 1–64 rows (row tiles 16, 32, 64):
    groups 32/64/128, N not a multiple of its BLOCK_N (80, 48), activations ×40 (products ~10⁵ before the scale),
    with RMSNorm, SiLU·gate and the pre-quant scale in its one prologue kernel, and the residual added in place."""
    from quant.runtime import cuda_kernels as ck
    from quant.runtime.linear import make_linear
    from quant.runtime.schemes.base import KernelConfig
    from tests.test_kernels import activations

    dtype = torch.float16
    gen = torch.Generator().manual_seed(out * inp + group)
    t = _layout("W4A16_AWQ", gen, out, inp, group)
    h = make_linear("W4A16_AWQ", {k: v.to(DEV) for k, v in t.items()}, dtype=dtype, device=DEV, group_size=group,
                    kernels=KernelConfig(int4_kernel="kpack", w4k_rows=(1, 64), w4g_rows=None, w4m_rows=None))
    assert h.kernel.startswith("w4k-mma") and h._gemv_ok()
    w, kw = h.kpack
    assert kw == ck.w4k_kw(inp, group, ck.W4K_KW)
    wd = h.dequantized_weight().cpu()
    assert torch.equal(ck.unpack_int4_k(w, kw).cpu().float() * h.scales.float().cpu().repeat_interleave(
        group, dim=1), wd)
    for m in (1, 3, 16, 17, 32, 33, 64):
        for scale in (1, 40):
            x = (activations(gen, m, inp) * scale).to(dtype)
            err = rel(h(x.to(DEV)), _reference("W4A16_AWQ", t, x, wd))
            assert err <= 1e-2, (m, scale, err)
    _check_int4_prologues(h, t, wd, gen, rows=(1, 5, 40))


def _check_int4_prologues(h, t, wd, gen, rows, plain=False, tag=()) -> torch.Tensor:
    """A float16 INT4 handler with RMSNorm / SiLU·gate in front (plain: and nothing) and the residual added in place
    behind, against the float64 reference, at each number of rows; returns the last RMSNorm input."""
    dtype, inp, out = torch.float16, h.inp, h.out
    norm = (1 + 0.1 * torch.randn(inp, generator=gen)).to(dtype)
    for m in rows:
        hs = torch.randn(m, inp, generator=gen).to(dtype) * 3
        fg = torch.randn(m, 2 * inp, generator=gen).to(dtype) * 2
        res = torch.randn(m, out, generator=gen).to(dtype)
        xn = norm * (hs.float() * torch.rsqrt(hs.float().pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
        xs = torch.nn.functional.silu(fg[:, :inp]) * fg[:, inp:]
        cases = [({"norm": norm.to(DEV), "eps": 1e-5}, hs, xn), ({"silu": True}, fg, xs)] + ([({}, hs, hs)] * plain)
        for kwargs, src, x_ref in cases:
            y = h.fused(src.to(DEV), **kwargs)
            assert rel(y, _reference("W4A16_AWQ", t, x_ref, wd)) <= 1e-2, (*tag, m, list(kwargs))
            r = res.to(DEV).clone()
            assert h.fused(src.to(DEV), residual=r, **kwargs) is r
            # one rounding of the sum to float16
            assert rel(r, res.double() + y.double().cpu()) <= torch.finfo(dtype).eps, (*tag, m, list(kwargs))
    return hs


@cuda
def test_int4_kpack_falls_back_where_it_cannot_run():
    """Hidden 576 (the default model: no whole 128-wide tile) and bfloat16 keep the other kernels; by default
    batch 1 takes the compiled GEMV and 2–16 rows the tensor-core kernel (faster there, measured), 17–64 the
    k-packed kernel, so no row is left to tinygemm and its copy is not made; it is where a row is left."""
    from quant.runtime.linear import make_linear
    from quant.runtime.schemes.base import KernelConfig

    gen = torch.Generator().manual_seed(5)
    for inp, dtype in ((576, torch.float16), (512, torch.bfloat16)):
        t = _layout("W4A16_AWQ", gen, 64, inp, 64)
        h = make_linear("W4A16_AWQ", {k: v.to(DEV) for k, v in t.items()}, dtype=dtype, device=DEV,
                        group_size=64, kernels=KernelConfig(int4_kernel="kpack"))
        assert h.kpack is None and not h.kernel.startswith("w4k")
    t = _layout("W4A16_AWQ", gen, 64, 512, 64)
    h = make_linear("W4A16_AWQ", {k: v.to(DEV) for k, v in t.items()}, dtype=torch.float16, device=DEV,
                    group_size=64)
    assert h.kpack is not None and h.tinygemm is None and h.w4g is not None and h.w4m is not None
    assert h.kernel == "w4m-mma|w4g-cuda|w4k-mma|w4k-dequant" and not h.kpack_at_1 and h._gemv_ok()
    assert h.weight is None  # prefill dequantizes the k-packed copy (KernelConfig.w4k_prefill)
    tensors = {k: v.to(DEV) for k, v in t.items()}
    h = make_linear("W4A16_AWQ", tensors, dtype=torch.float16, device=DEV, group_size=64,
                    kernels=KernelConfig(w4k_rows=(2, 32)))  # rows 33–64 left: tinygemm's copy serves them
    assert h.tinygemm is not None and h.kernel.endswith("w4k-mma|tinygemm-w4a16|w4k-dequant")
    h = make_linear("W4A16_AWQ", tensors, dtype=torch.float16, device=DEV, group_size=64,
                    kernels=KernelConfig(w4m_rows=(1, 16), w4g_rows=(1, 1), w4k_rows=(2, 16)))
    assert h.w4g is None and h.kpack is None and h.tinygemm is not None  # all their rows on the tensor cores


@cuda
@pytest.mark.parametrize("out, inp, group, gemv", [(128, 1024, 128, True), (64, 512, 32, True),
                                                   (100, 768, 128, False)])
def test_int4_prefill_from_the_k_packed_copy(out, inp, group, gemv):
    """KernelConfig.w4k_prefill (the default): more than 64 rows dequantize the k-packed copy, the same bits as
    prefill from the stored layout, and where every row up to 64 has a kernel of its own (the defaults) the stored
    layout is not kept; without the GEMV and the tensor-core kernel, with 100 outputs (no tinygemm), row 1 is left
    to the stored layout, which is kept. 1–64 rows still run their kernels; every count of rows against the
    float64 reference, activations ×40."""
    from quant.runtime.linear import make_linear
    from quant.runtime.schemes.base import KernelConfig
    from tests.test_kernels import activations

    gen = torch.Generator().manual_seed(out + inp + group)
    t = _layout("W4A16_AWQ", gen, out, inp, group)
    tensors = {k: v.to(DEV) for k, v in t.items()}
    kernels = KernelConfig() if gemv else KernelConfig(w4g_rows=None, w4m_rows=None)
    plain = make_linear("W4A16_AWQ", tensors, dtype=torch.float16, device=DEV, group_size=group,
                        kernels=dataclasses.replace(kernels, w4k_prefill=False))
    h = make_linear("W4A16_AWQ", tensors, dtype=torch.float16, device=DEV, group_size=group, kernels=kernels)
    assert h.kprefill and (h.weight is None) == gemv and "w4k-dequant" in h.kernel
    assert not plain.kprefill and plain.weight is not None
    wd = h.dequantized_weight().cpu()
    assert torch.equal(wd, plain.dequantized_weight().cpu())
    for m, scale in ((1, 1), (5, 40), (40, 1), (65, 1), (300, 1), (300, 40)):
        x = (activations(gen, m, inp) * scale).to(torch.float16).to(DEV)
        y = h(x)
        assert rel(y, _reference("W4A16_AWQ", t, x.cpu(), wd)) <= 1e-2, (m, scale)
        if m > 64:  # the same float16 weights, then the same cuBLAS call
            assert torch.equal(y, plain(x)), (m, scale)


@cuda
@pytest.mark.parametrize("out, inp, group", [(64, 512, 32), (80, 1024, 128), (46, 4096, 128), (96, 576, 64),
                                             (64, 11008, 128)])
def test_int4_w4g_matches_float64_reference(out, inp, group):
    """The compiled CUDA GEMV (cuda_ext.w4a16_gemv) for 1–4 rows: groups 32/64/128, hidden 576 (the default
    model's), K = 11008 (the chunks do not fill the last lane round), N = 46 (tiles of 4 rows: a warp's last rows
    past N), activations ×40, every tile; RMSNorm / SiLU·gate in act_prep before it, the pre-quant scale in the
    kernel at one row (the same bits as act_prep's) or in act_prep, the residual added in place with one rounding;
    5 rows go to the other kernels."""
    from quant.runtime import cuda_ext
    from quant.runtime.linear import make_linear
    from quant.runtime.schemes.base import KernelConfig
    from tests.test_kernels import activations

    dtype = torch.float16
    gen = torch.Generator().manual_seed(out * inp + group)
    t = _layout("W4A16_AWQ", gen, out, inp, group)
    for tile in cuda_ext.GEMV_TILES:
        h = make_linear("W4A16_AWQ", {k: v.to(DEV) for k, v in t.items()}, dtype=dtype, device=DEV,
                        group_size=group, kernels=KernelConfig(w4g_rows=(1, 4), w4g_tile=tile, w4m_rows=None))
        assert h.kernel.startswith("w4g-cuda"), h.gemv_unavailable or h.kernel
        wd = h.dequantized_weight().cpu()
        assert torch.equal(cuda_ext.unpack_w4g(h.w4g).cpu().float() * h.scales.float().cpu().repeat_interleave(
            group, dim=1), wd)
        for m in (1, 2, 3, 4, 5):
            for scale in (1, 40):
                x = (activations(gen, m, inp) * scale).to(dtype)
                err = rel(h(x.to(DEV)), _reference("W4A16_AWQ", t, x, wd))
                assert err <= 1e-2, (tile, m, scale, err)
    tensors = {k: v.to(DEV) for k, v in t.items()}
    # one row: the pre-quant scale in the GEMV, or in act_prep before it (always so behind RMSNorm / SiLU·gate)
    for fuse in (True, False):
        h = make_linear("W4A16_AWQ", tensors, dtype=dtype, device=DEV, group_size=group,
                        kernels=KernelConfig(w4g_rows=(1, 4), w4g_fuse=fuse, w4m_rows=None))
        hs = _check_int4_prologues(h, t, wd, gen, rows=(1, 3), plain=True, tag=(fuse,))
        if fuse:  # x · pre inside the kernel rounds as act_prep does: the same bits as with act_prep first
            from quant.runtime import cuda_kernels as ck

            x1 = hs[:1].to(DEV)
            assert torch.equal(h(x1), cuda_ext.w4a16_gemv(ck.act_prep(x1, prequant=h.prequant), h.w4g, h.scales,
                                                          group=group, tile=h.w4g_tile))


@cuda
def test_int4_w4g_off_or_unavailable_leaves_the_other_kernels(monkeypatch):
    """bfloat16, K not a multiple of 32, a group below 32, w4g_rows=None, or an extension that cannot be built
    (its reason kept): no GEMV copy, and batch 1 runs on the kernels it ran on before."""
    from quant.runtime import cuda_ext
    from quant.runtime.linear import make_linear
    from quant.runtime.schemes.base import KernelConfig

    gen = torch.Generator().manual_seed(9)
    cases = [(512, 64, torch.bfloat16, KernelConfig()), (528, 16, torch.float16, KernelConfig()),
             (512, 64, torch.float16, KernelConfig(w4g_rows=None))]
    for inp, group, dtype, kernels in cases:
        t = _layout("W4A16_AWQ", gen, 64, inp, group)
        h = make_linear("W4A16_AWQ", {k: v.to(DEV) for k, v in t.items()}, dtype=dtype, device=DEV,
                        group_size=group, kernels=kernels)
        assert h.w4g is None and not h.kernel.startswith("w4g"), (inp, group, dtype)
    monkeypatch.setattr(cuda_ext, "load", lambda: "the CUDA extension could not be built (test)")
    t = _layout("W4A16_AWQ", gen, 64, 512, 64)
    h = make_linear("W4A16_AWQ", {k: v.to(DEV) for k, v in t.items()}, dtype=torch.float16, device=DEV,
                    group_size=64)
    assert h.w4g is None and h.gemv_unavailable.endswith("(test)") and h.tinygemm is not None


@cuda
@pytest.mark.parametrize("out, inp, group", [(64, 512, 32), (128, 1024, 128), (576, 576, 64), (960, 1536, 64),
                                             (64, 11008, 128), (4096, 4096, 128)])
def test_int4_w4m_matches_float64_reference(out, inp, group):
    """The tensor-core INT4 kernel (cuda_ext.w4a16_mma, KernelConfig.w4m_rows) against the float64 reference on the
    float16 dequantized weight (its precision contract: q · s rounded once, exact products, float32 sums): groups
    32/64/128, hidden 576 and the default model's fc‖gate-like 960 × 1536, K = 11008 on one tile (the K split over up
    to 688 steps), 7B's 4096²; 1–32 rows through its three row tiles (33 go to the other kernels), activations ×40;
    RMSNorm / SiLU·gate in act_prep before it, the pre-quant scale in the kernel at one row (the same bits as
    act_prep's), the residual added with one rounding. Called directly: depth 4 and 8, K splits of 1, 3 and the
    kernel's rule, each the same bits on a second call and in a CUDA graph, the tile counters left zero."""
    from quant.runtime import cuda_ext
    from quant.runtime import cuda_kernels as ck
    from quant.runtime.linear import make_linear
    from quant.runtime.schemes.base import KernelConfig
    from tests.test_kernels import activations

    dtype = torch.float16
    gen = torch.Generator().manual_seed(out + inp + group)
    t = _layout("W4A16_AWQ", gen, out, inp, group)
    h = make_linear("W4A16_AWQ", {k: v.to(DEV) for k, v in t.items()}, dtype=dtype, device=DEV, group_size=group,
                    kernels=KernelConfig(w4m_rows=(1, 32)))
    assert h.kernel.startswith("w4m-mma"), h.gemv_unavailable or h.kernel
    assert h.w4g is None  # every row the GEMV would take goes to this kernel: no copy for it
    wd = h.dequantized_weight().cpu()
    q, s = cuda_ext.unpack_w4m(*h.w4m)
    assert torch.equal(q.cpu().float() * s.cpu().float().repeat_interleave(group, dim=1), wd)
    w16 = wd.half().float()  # the kernel's weight
    for m in (1, 2, 7, 8, 9, 16, 17, 32, 33):
        for scale in (1, 40):
            x = (activations(gen, m, inp) * scale).to(dtype)
            err = rel(h(x.to(DEV)), _reference("W4A16_AWQ", t, x, w16 if m <= 32 else wd))
            assert err <= (2e-3 if m <= 32 else 1e-2), (m, scale, err)
    _check_int4_prologues(h, t, wd, gen, rows=(1, 5, 20), plain=True)
    w, sc = h.w4m
    cnt = h.w4m_counter
    for m in (1, 5, 8, 12, 24):
        x = (activations(gen, m, inp) * 3).to(dtype).to(DEV)
        ref = x.double() @ w16.double().to(DEV).t()
        for depth, splits in itertools.product((4, 8) if m <= 8 else (4,), (1, 3, 0)):
            y = cuda_ext.w4a16_mma(x, w, sc, group=group, tile_counter=cnt, splits=splits, depth=depth)
            assert rel(y, ref) <= 2e-3 and not cnt.any(), (m, depth, splits)
            assert torch.equal(cuda_ext.w4a16_mma(x, w, sc, group=group, tile_counter=cnt, splits=splits,
                                                  depth=depth), y), (m, depth, splits)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            yg = cuda_ext.w4a16_mma(x, w, sc, group=group, tile_counter=cnt, splits=3)
        for _ in range(2):
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(yg, cuda_ext.w4a16_mma(x, w, sc, group=group, tile_counter=cnt, splits=3)), m
            assert not cnt.any()
    assert cuda_ext.w4a16_mma_splits(1, out, inp) >= 1 and cuda_ext.w4a16_mma_splits(1, out, inp, 10**6) == inp // 64
    x1 = (activations(gen, 1, inp) * 3).to(dtype).to(DEV)
    if h.prequant is not None:  # x · pre inside the kernel rounds as act_prep does
        assert torch.equal(cuda_ext.w4a16_mma(x1, w, sc, group=group, tile_counter=cnt, prequant=h.prequant),
                           cuda_ext.w4a16_mma(ck.act_prep(x1, prequant=h.prequant), w, sc, group=group,
                                              tile_counter=cnt))
    with pytest.raises(RuntimeError, match="1-32 rows"):
        cuda_ext.w4a16_mma(torch.zeros(33, inp, dtype=dtype, device=DEV), w, sc, group=group, tile_counter=cnt)
    with pytest.raises(RuntimeError, match="depth 4, or 8 up to 8 rows"):
        cuda_ext.w4a16_mma(torch.zeros(9, inp, dtype=dtype, device=DEV), w, sc, group=group, tile_counter=cnt,
                           depth=8)


@cuda
def test_int4_w4m_epilogues_do_the_next_linears_prologue():
    """The tensor-core kernel's then_silu / then_norm at one row (KernelConfig.gemv_then): SiLU · gate of the output's
    halves (the layout's tiles pair row p with N/2 + p) against act_prep(silu) of the plain output, RMSNorm of the
    residual sum after the last tile against act_prep(norm), the residual the same bits as the plain call's, with the
    K split on and off, quantized for a SmoothQuant linear next; three calls and CUDA-graph replays, every counter
    left zero; the handler chains at one row only; a shape it cannot take (N = 96) leaves the other kernels."""
    from quant.runtime import cuda_ext
    from quant.runtime.linear import make_linear
    from quant.runtime.schemes.base import KernelConfig
    from tests.test_kernels import activations

    dtype, inp, out = torch.float16, 576, 2048
    gen = torch.Generator().manual_seed(14)
    tensors = {k: v.to(DEV) for k, v in _layout("W4A16_AWQ", gen, out, inp, 64).items()}
    h = make_linear("W4A16_AWQ", tensors, dtype=dtype, device=DEV, group_size=64,
                    kernels=KernelConfig(w4m_rows=(1, 32), gemv_then=True))
    assert h.chains(1) and not h.chains(2) and h.kernel.startswith("w4m-mma"), h.gemv_unavailable or h.kernel
    w, sc = h.w4m
    nw = (1 + 0.1 * torch.randn(out, generator=gen)).to(dtype).to(DEV)
    x = (activations(gen, 1, inp) * 3).to(dtype).to(DEV)
    res = torch.randn(1, out, generator=gen).to(dtype).to(DEV)
    for splits in (1, 4):
        _check_mma_epilogues(functools.partial(cuda_ext.w4a16_mma, x, w, sc, group=64, tile_counter=h.w4m_counter,
                                               splits=splits, prequant=h.prequant, eps=1e-5),
                             h.then_counter, h.w4m_counter, res, nw, splits)
    _check_mma_epilogues_in_a_graph(h, x, h.w4m_counter, res, nw, cuda_ext.w4a16_mma(
        x, w, sc, group=64, tile_counter=h.w4m_counter, prequant=h.prequant, residual=res.clone()))
    t96 = {k: v.to(DEV) for k, v in _layout("W4A16_AWQ", gen, 96, inp, 64).items()}
    h96 = make_linear("W4A16_AWQ", t96, dtype=dtype, device=DEV, group_size=64, kernels=KernelConfig(w4m_rows=(1, 32)))
    assert h96.w4m is None and not h96.kernel.startswith("w4m")


def _persistent_gives_the_same_bits(call, res, nw, cnt, tag, inputs=({},)):
    """call(grid, **kw) → a compiled GEMV's result on one row. Its persistent form (grid 1, 3: each block many row
    blocks; -1: the GPU-sized grid) against the one-block-per-row-block form (grid 0), bit for bit, for each of
    ``inputs`` (extra keyword arguments): plain (not with then_quant), SiLU·gate (a block's pairs met per row block),
    and the residual add + RMSNorm (the last of the persistent blocks counted, the counter left zero). Returns the
    last RMSNorm case's (result, residual after) for a graph replay to compare with."""
    for kw in inputs:
        for then in ({"then_silu": True},) if "then_quant" in kw else ({}, {"then_silu": True}):
            want = call(0, **kw, **then)
            for grid in (1, 3, -1):
                assert torch.equal(call(grid, **kw, **then), want), (tag, grid, sorted(kw), sorted(then))
        r0 = res.clone()
        want = call(0, residual=r0, then_norm=nw, counter=cnt, eps=1e-5, **kw)
        for grid in (1, 3, -1):
            r = res.clone()
            got = call(grid, residual=r, then_norm=nw, counter=cnt, eps=1e-5, **kw)
            assert torch.equal(r, r0) and torch.equal(got, want) and not cnt.any(), (tag, grid, sorted(kw))
    return want, r0


def _persistent_in_a_graph(call, res, nw, cnt, want, r0, **kw):
    """The persistent grid captured in a CUDA graph, as decode runs it, GPU-sized and of 3 blocks (several row
    blocks each): three replays, the same bits."""
    for grid in (-1, 3):
        graph, r = torch.cuda.CUDAGraph(), res.clone()
        with torch.cuda.graph(graph):
            got = call(grid, residual=r, then_norm=nw, counter=cnt, eps=1e-5, **kw)
        for _ in range(3):
            r.copy_(res)
            graph.replay()
            assert torch.equal(r, r0) and torch.equal(got, want) and not cnt.any(), grid


def _w4g_case(seed: int, out: int, inp: int, group: int):
    """An INT4 linear's checkpoint tensors [out, inp], one float16 row of activations (large ones among them), a
    residual row and an RMSNorm weight [out], and a then_norm counter at zero, all on the GPU."""
    from tests.test_kernels import activations

    gen = torch.Generator().manual_seed(seed)
    tensors = {k: v.to(DEV) for k, v in _layout("W4A16_AWQ", gen, out, inp, group).items()}
    x = (activations(gen, 1, inp) * 3).to(torch.float16).to(DEV)
    res = torch.randn(1, out, generator=gen).to(torch.float16).to(DEV)
    nw = (1 + 0.1 * torch.randn(out, generator=gen)).to(torch.float16).to(DEV)
    return tensors, x, res, nw, torch.zeros(1, dtype=torch.int32, device=DEV)


@cuda
@pytest.mark.parametrize("out, inp", [(92, 576), (2056, 11008), (22016, 576)])
def test_int4_w4g_persistent_gives_the_same_bits(out, inp):
    """The compiled INT4 GEMV's persistent form (KernelConfig.w4g_persistent; cuda_ext.w4a16_gemv grid=) against
    its one-block-per-row-block form, every tile, bit for bit (_persistent_gives_the_same_bits; K = 11008 in several
    lane rounds, so the next step's loads cross rounds and row blocks; N = 22016, fc‖gate's, more row blocks than
    an H200 holds at once, so the GPU-sized grid walks several too), with and without the pre-quant scale (staged
    once per block), in a CUDA graph, and through the handler; more than one row is refused."""
    from quant.runtime import cuda_ext
    from quant.runtime.linear import make_linear
    from quant.runtime.schemes.base import KernelConfig

    dtype, group = torch.float16, 64
    tensors, x, res, nw, cnt = _w4g_case(out + inp, out, inp, group)
    for tile in cuda_ext.GEMV_TILES:
        h = make_linear("W4A16_AWQ", tensors, dtype=dtype, device=DEV, group_size=group,
                        kernels=KernelConfig(w4g_tile=tile))
        assert h.w4g is not None, h.gemv_unavailable

        def call(grid, **kw):
            return cuda_ext.w4a16_gemv(x, h.w4g, h.scales, group=group, tile=tile, grid=grid, **kw)

        want, r0 = _persistent_gives_the_same_bits(call, res, nw, cnt, tile, ({}, {"prequant": h.prequant}))
    _persistent_in_a_graph(call, res, nw, cnt, want, r0, prequant=h.prequant)
    hp = make_linear("W4A16_AWQ", tensors, dtype=dtype, device=DEV, group_size=group,
                     kernels=KernelConfig(w4g_rows=(1, 4), w4g_persistent=True, w4m_rows=None))  # 3 rows: other form
    h = make_linear("W4A16_AWQ", tensors, dtype=dtype, device=DEV, group_size=group,
                    kernels=KernelConfig(w4g_rows=(1, 4), w4g_persistent=False, w4m_rows=None))
    assert torch.equal(hp(x), h(x)) and torch.equal(hp(x.repeat(3, 1)), h(x.repeat(3, 1)))
    with pytest.raises(RuntimeError, match="one row unless 0"):
        cuda_ext.w4a16_gemv(x.repeat(2, 1), h.w4g, h.scales, group=group, grid=-1)


@cuda
@pytest.mark.parametrize("out, inp", [(92, 576), (2056, 11008), (264, 14336)])
def test_int4_w4g_stage_batch_gives_the_same_bits(out, inp):
    """KernelConfig.w4g_stage_batch: the compiled INT4 GEMV's pre-quant staging (x · pre into shared memory, once a
    block) with its loads issued eight units a thread at a time, against the plain loop, bit for bit: every tile,
    both forms (one block per row block; persistent on 1, 3 and the GPU-sized grid), plain, SiLU·gate and the
    residual add + RMSNorm, in a CUDA graph, and through the handler. K = 576 (part of one batch), 11008 and 14336
    (the shapes' down_proj: two batches, the second partial)."""
    from quant.runtime import cuda_ext
    from quant.runtime.linear import make_linear
    from quant.runtime.schemes.base import KernelConfig

    dtype, group = torch.float16, 64
    tensors, x, res, nw, cnt = _w4g_case(out * 7 + inp, out, inp, group)
    for tile in cuda_ext.GEMV_TILES:
        h = make_linear("W4A16_AWQ", tensors, dtype=dtype, device=DEV, group_size=group,
                        kernels=KernelConfig(w4g_tile=tile))
        for grid in (0, 1, 3, -1):
            def call(sb, **kw):
                return cuda_ext.w4a16_gemv(x, h.w4g, h.scales, group=group, tile=tile, grid=grid,
                                           prequant=h.prequant, stage_batch=sb, **kw)
            assert torch.equal(call(True), call(False)), (tile, grid)
            assert torch.equal(call(True, then_silu=True), call(False, then_silu=True)), (tile, grid)
            r0, r = res.clone(), res.clone()
            want = call(False, residual=r0, then_norm=nw, counter=cnt, eps=1e-5)
            got = call(True, residual=r, then_norm=nw, counter=cnt, eps=1e-5)
            assert torch.equal(r, r0) and torch.equal(got, want) and not cnt.any(), (tile, grid)
    graph, r = torch.cuda.CUDAGraph(), res.clone()  # (the last tile, the GPU-sized grid)
    with torch.cuda.graph(graph):
        got = call(True, residual=r, then_norm=nw, counter=cnt, eps=1e-5)
    for _ in range(3):
        r.copy_(res)
        graph.replay()
        assert torch.equal(r, r0) and torch.equal(got, want) and not cnt.any()
    plain, batched = (make_linear("W4A16_AWQ", tensors, dtype=dtype, device=DEV, group_size=group,
                                  kernels=KernelConfig(w4g_stage_batch=c)) for c in (False, True))
    assert torch.equal(batched(x), plain(x))


W8G = ["W8A16", "W8A8_SQ_PER_CHANNEL", "FP8"]


def _same_bits_eagerly_and_replayed(run, res, want):
    """``run(r)`` (a decode-like chain adding into the residual r in place, returning what it wrote) gives ``want``
    bit for bit, eagerly and replayed from a CUDA graph, r starting from ``res`` each time."""
    r = res.clone()
    assert all(torch.equal(g, w) for g, w in zip(run(r), want))
    run(r)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = run(r)
    for _ in range(3):
        r.copy_(res)
        graph.replay()
        torch.cuda.synchronize()
        assert all(torch.equal(g, w) for g, w in zip(got, want))


@cuda
@pytest.mark.parametrize("algo", ["W4A16_AWQ", *W8G])
def test_pdl_chain_gives_the_same_bits(algo):
    """KernelConfig.gemv_pdl: the persistent GEMVs launched with programmatic dependent launch start while the
    kernel before them runs, load their first weights, and only then wait for it. A decode-like chain in which each
    linear reads what the one before wrote (o_proj with the residual's RMSNorm, gate‖up with SiLU·gate, down_proj
    with the next RMSNorm, twice over), eagerly and replayed from a CUDA graph, gives the bits of the same chain
    launched without it; INT4's one-block-per-row-block form with pdl is refused."""
    from quant.hardware import fp8_refusal
    from quant.runtime import cuda_ext
    from quant.runtime.linear import make_linear
    from quant.runtime.schemes.base import KernelConfig
    from tests.test_kernels import activations

    if algo == "FP8" and fp8_refusal(0):
        pytest.skip(fp8_refusal(0))
    if torch.cuda.get_device_capability(DEV) < (9, 0):
        pytest.skip("programmatic dependent launch needs compute capability 9.0")
    dtype, hidden, inter = torch.float16, 512, 1024
    gen = torch.Generator().manual_seed(len(algo) + 7)
    tensors = [{k: v.to(DEV) for k, v in _layout(algo, gen, out, inp, 64).items()}
               for out, inp in ((hidden, hidden), (2 * inter, hidden), (hidden, inter))]
    persistent = {"w8g_persistent": frozenset({algo})} if algo in W8G else {}
    norms = [(1 + 0.1 * torch.randn(hidden, generator=gen)).to(dtype).to(DEV) for _ in range(2)]
    x = (activations(gen, 1, hidden) * 3).to(dtype).to(DEV)
    res = torch.randn(1, hidden, generator=gen).to(dtype).to(DEV)

    def chain(pdl: bool):
        kernels = KernelConfig(gemv_then=True, gemv_pdl=frozenset({algo}) if pdl else frozenset(), **persistent)
        o, fg, down = (make_linear(algo, t, dtype=dtype, device=DEV, group_size=64, kernels=kernels) for t in tensors)
        assert o.chains(1) and fg.chains(1) and down.chains(1), o.gemv_unavailable or o.kernel

        def run(r):
            a, outs = x, []
            for _ in range(2):
                xn = o.fused(a, residual=r, then_norm=norms[0], eps=1e-5)
                act = fg.fused(xn, then_silu=True)
                a = down.fused(act, residual=r, then_norm=norms[1], eps=1e-5)
                outs += [xn, act, a, r.clone()]
            return outs
        return run

    _same_bits_eagerly_and_replayed(chain(True), res, chain(False)(res.clone()))
    if algo == "W4A16_AWQ":  # (both bindings refuse through one check, bindings.cpp check_pdl)
        h = make_linear(algo, tensors[0], dtype=dtype, device=DEV, group_size=64)
        with pytest.raises(RuntimeError, match="persistent form only"):
            cuda_ext.w4a16_gemv(x, h.w4g, h.scales, group=64, grid=0, pdl=True)


NORM_PRO = {"W4A16_AWQ": "int4_awq", "W8A16": "int8_wo", "W8A8_SQ_PER_CHANNEL": "smoothquant", "FP8": "fp8"}


@cuda
@pytest.mark.parametrize("algo, prequant, hidden", [
    ("W4A16_AWQ", True, 576), ("W4A16_AWQ", False, 576), ("W8A16", False, 576), ("W8A8_SQ_PER_CHANNEL", True, 576),
    ("FP8", False, 576), ("W4A16_AWQ", True, 4608), ("W8A16", False, 4608)])
def test_norm_prologue_gives_the_same_bits(algo, prequant, hidden, tiny_folders, monkeypatch):
    """KernelConfig.norm_prologue: a batch-1 GEMV in its persistent form normalizes its own input (every block
    computes the residual stream's RMSNorm while its first weights load; SmoothQuant and FP8 also quantize it), so
    the o / down projections before it end in the residual add alone. A decode-like chain (o_proj, fc‖gate
    normalizing its input with SiLU·gate after, down_proj, qkv normalizing its input; twice over),
    eagerly and replayed from a CUDA graph, gives the bits of the same chain with the o / down GEMVs ending in the
    RMSNorm tail (then_norm, quantizing for the next linear as the runtime asks: then_quant) and fc‖gate / qkv
    reading its result, with and without the pre-quant scale, on GPU-sized and small grids. Hidden 576 stages the row
    from registers, 4608 (past gemv_common.cuh's HELD) in two passes. In the runtime (tiny checkpoint of the format):
    one decode step's logits bit for bit. The bindings refuse norm where it is not built."""
    from quant.runtime import cuda_ext
    from quant.runtime.linear import make_linear
    from quant.runtime.schemes.base import KernelConfig
    from quant.runtime.torch_runtime import TorchRuntime, _quant_for
    from tests.test_kernels import activations

    if algo == "FP8":
        from quant.hardware import fp8_refusal

        if fp8_refusal(0):
            pytest.skip(fp8_refusal(0))
    dtype, inter = torch.float16, 1536
    gen = torch.Generator().manual_seed(11)
    tensors = [{k: v.to(DEV) for k, v in _layout(algo, gen, out, inp, 64).items()
                if prequant or k != "prequant_scaling_factor"}
               for out, inp in ((hidden, hidden), (2 * inter, hidden), (hidden, inter), (3 * hidden, hidden))]
    norms = [(1 + 0.1 * torch.randn(hidden, generator=gen)).to(dtype).to(DEV) for _ in range(2)]
    x0 = (activations(gen, 1, hidden) * 3).to(dtype).to(DEV)
    res = torch.randn(1, hidden, generator=gen).to(dtype).to(DEV)

    def chain(kernels: KernelConfig):
        o, fg, down, qkv = (make_linear(algo, t, dtype=dtype, device=DEV, group_size=64, kernels=kernels)
                            for t in tensors)
        pro = fg.takes_norm(1)
        assert pro == qkv.takes_norm(1) == bool(kernels.norm_prologue)
        assert (getattr(fg, "prequant", None) is not None) == prequant
        assert o.chains(1) and fg.chains(1) and down.chains(1), o.gemv_unavailable or o.kernel

        def run(r):
            x, outs = x0, []
            for _ in range(2):
                if pro:
                    o.fused(x, residual=r)
                    act = fg.fused(r, norm=norms[0], eps=1e-5, then_silu=True, **_quant_for(down, 1))
                    down.fused(act, residual=r)
                    q = qkv.fused(r, norm=norms[1], eps=1e-5)
                else:
                    xn = o.fused(x, residual=r, then_norm=norms[0], eps=1e-5, **_quant_for(fg, 1))
                    act = fg.fused(xn, then_silu=True, **_quant_for(down, 1))
                    q = qkv.fused(down.fused(act, residual=r, then_norm=norms[1], eps=1e-5, **_quant_for(qkv, 1)))
                outs += [act, q, r.clone()]
                x = q[:, :hidden].contiguous()
            return outs
        return run

    tail_k, pro_k = KernelConfig(norm_prologue=frozenset()), KernelConfig(norm_prologue=frozenset({algo}))
    want = chain(tail_k)(res.clone())
    for grid_cap in (-1, 7):  # the GPU-sized grid; 7 blocks: each walks several row blocks, staging its row once
        with monkeypatch.context() as m:  # (the handlers ask cuda_ext.grid on each call: at capture, not replay)
            m.setattr(cuda_ext, "grid", lambda persistent, rows: grid_cap if persistent and rows == 1 else 0)
            _same_bits_eagerly_and_replayed(chain(pro_k), res, want)
    h = make_linear(algo, tensors[0], dtype=dtype, device=DEV, group_size=64)
    with pytest.raises(RuntimeError, match="the persistent form"):
        if algo == "W4A16_AWQ":
            cuda_ext.w4a16_gemv(x0, h.w4g, h.scales, group=64, grid=0, norm=norms[0])
        else:
            cuda_ext.w8_gemv(x0, h.weight, h.w8g_scale, fmt=algo, grid=0, norm=norms[0],
                             act_scale=getattr(h, "act_scale", torch.ones(1, device=DEV)).reshape(1))
    if (not prequant and algo == "W4A16_AWQ") or hidden != 576:
        return
    ids = torch.randint(0, 1024, (40,), generator=torch.Generator().manual_seed(5)).tolist()
    ref, rt = (TorchRuntime.from_dir(tiny_folders[NORM_PRO[algo]], device="cuda", compute_dtype="float16", kernels=k)
               for k in (tail_k, pro_k))
    assert all(rt.layers[0][n].takes_norm(1) for n in ("attention.qkv", "mlp.fc_gate"))
    assert not any(ref.layers[0][n].takes_norm(1) for n in ("attention.qkv", "mlp.fc_gate"))
    for n in (2, 24, 39):
        assert torch.equal(_one_step_logits(rt, ids[: n + 1]), _one_step_logits(ref, ids[: n + 1])), n
    assert rt.generate([ids[:9]], 8, ignore_eos=True).tokens == ref.generate([ids[:9]], 8, ignore_eos=True).tokens


@cuda
@pytest.mark.parametrize("algo", W8G)
def test_w8g_persistent_gives_the_same_bits(algo):
    """The compiled 8-bit GEMV's persistent form (KernelConfig.w8g_persistent; cuda_ext.w8_gemv grid=) against its
    one-block-per-row-block form, bit for bit (_persistent_gives_the_same_bits), every tile, N = 92 / K = 576,
    N = 2056 / K = 11008 (22 lane rounds at the narrowest tile) and N = 22016 / K = 576 (more row blocks than the
    GPU holds at once), also with the result quantized for a SmoothQuant linear next, in a CUDA graph, and through
    the handler; more than one row is refused."""
    from quant.hardware import fp8_refusal
    from quant.runtime import cuda_ext
    from quant.runtime import cuda_kernels as ck
    from quant.runtime.linear import make_linear
    from quant.runtime.schemes.base import KernelConfig
    from tests.test_kernels import activations

    if algo == "FP8" and fp8_refusal(0):
        pytest.skip(fp8_refusal(0))
    gen = torch.Generator().manual_seed(len(algo) + 1)
    e4m3 = torch.float8_e4m3fn
    for out, inp in ((92, 576), (2056, 11008), (22016, 576)):
        if algo == "FP8":
            w = (torch.randn(out, inp, generator=gen) * 2).to(e4m3)
            x = (torch.randn(1, inp, generator=gen) * 4).to(e4m3)
            scale = torch.tensor([1e-3])
        else:
            w = torch.randint(-127, 128, (out, inp), generator=gen, dtype=torch.int8)
            x = (activations(gen, 1, inp) * 3).half() if algo == "W8A16" else \
                torch.randint(-127, 128, (1, inp), generator=gen, dtype=torch.int8)
            scale = (torch.rand(out, generator=gen) * 1e-3).to(torch.float16 if algo == "W8A16" else torch.float32)
        w, x, scale = w.to(DEV), x.to(DEV), scale.to(DEV)
        res = torch.randn(1, out, generator=gen).half().to(DEV)
        nw = (1 + 0.1 * torch.randn(out, generator=gen)).half().to(DEV)
        cnt = torch.zeros(1, dtype=torch.int32, device=DEV)
        quant = (None, torch.tensor([0.02], device=DEV), ck.A_INT8)
        for tile in cuda_ext.GEMV_TILES:
            def call(grid, **kw):
                return cuda_ext.w8_gemv(x, w, scale, fmt=algo, tile=tile, grid=grid, **kw)

            want, r0 = _persistent_gives_the_same_bits(call, res, nw, cnt, (out, tile), ({}, {"then_quant": quant}))
    _persistent_in_a_graph(call, res, nw, cnt, want, r0, then_quant=quant)
    with pytest.raises(RuntimeError, match="one row unless 0"):
        cuda_ext.w8_gemv(x.repeat(2, 1), w, scale, fmt=algo, grid=-1)
    tensors = {k: v.to(DEV) for k, v in _layout(algo, gen, 2056, 576, 64).items()}
    hp, h = (make_linear(algo, tensors, dtype=torch.float16, device=DEV, group_size=64,
                         kernels=KernelConfig(w8g=frozenset({algo}), w8g_persistent=frozenset(p)))
             for p in ({algo}, ()))
    xs = (activations(gen, 3, 576) * 3).half().to(DEV)
    assert "-cuda" in hp.kernel and torch.equal(hp(xs[:1]), h(xs[:1])) and torch.equal(hp(xs), h(xs))


@cuda
@pytest.mark.parametrize("algo", [*W8G, "W4A16_AWQ"])
def test_compiled_gemv_epilogue_does_the_next_linears_prologue(algo):
    """The compiled GEMVs' then_silu / then_norm (KernelConfig.gemv_then), every tile: SiLU · gate of the output's
    halves against act_prep(silu) of the plain call's output (N = 92: a block's pairs past N / 2), and RMSNorm of the
    residual sum by the last block against act_prep(norm) of that sum (float32 statistics in another order: within
    a rounding; N = 92 through its 2-byte loop, N = 2056 through its 16-byte loads, two rounds, the second partial),
    the residual the same bits as the plain call's, three calls in a row and replays of a CUDA graph with the
    counter left at zero; both also quantized for a SmoothQuant or FP8 linear next (then_quant), against
    act_prep's quantization."""
    from quant.hardware import fp8_refusal
    from quant.runtime import cuda_ext
    from quant.runtime import cuda_kernels as ck
    from quant.runtime.linear import make_linear
    from quant.runtime.schemes.base import KernelConfig
    from tests.test_kernels import activations

    if algo == "FP8" and fp8_refusal(0):
        pytest.skip(fp8_refusal(0))
    dtype, inp = torch.float16, 576
    gen = torch.Generator().manual_seed(len(algo))
    for out, tile in itertools.product((92, 2056), cuda_ext.GEMV_TILES):
        tensors = {k: v.to(DEV) for k, v in _layout(algo, gen, out, inp, 64).items()}
        nw = (1 + 0.1 * torch.randn(out, generator=gen)).to(dtype).to(DEV)
        kw = {"w8g": frozenset({algo}), "w8g_tile": tile} if algo in W8G else {"w4g_rows": (1, 1), "w4g_tile": tile}
        h = make_linear(algo, tensors, dtype=dtype, device=DEV, group_size=64,
                        kernels=KernelConfig(gemv_then=True, **kw))
        assert h.chains(1) and not h.chains(2) and "-cuda" in h.kernel, h.gemv_unavailable or h.kernel
        x = (activations(gen, 1, inp) * 3).to(dtype).to(DEV)
        y = h.fused(x)
        got = h.fused(x, then_silu=True)
        assert got.shape == (1, out // 2) and rel(got, ck.act_prep(y, silu=True)) <= 2e-3, (out, tile)
        res = torch.randn(1, out, generator=gen).to(dtype).to(DEV)
        plain = h.fused(x, residual=res.clone())
        for _ in range(3):
            r = res.clone()
            xn = h.fused(x, residual=r, then_norm=nw, eps=1e-5)
            assert torch.equal(r, plain) and not h.then_counter.any(), (out, tile)
            assert rel(xn, ck.act_prep(plain, norm=nw, eps=1e-5)) <= 2e-3, (out, tile)
        # quantized for a SmoothQuant / FP8 linear next (then_quant: its pre-quant scale, its static scale)
        a = torch.tensor([0.02], device=DEV)
        pre = (1 + 0.2 * torch.randn(out, generator=gen)).to(dtype).to(DEV)
        for afmt in (ck.A_INT8, ck.A_FP8):
            got = h.fused(x, then_silu=True, then_quant=(pre[: out // 2], a, afmt))
            want = ck.act_prep(y, silu=True, prequant=pre[: out // 2], act_scale=a, afmt=afmt)
            _same_quantized(got, want, (out, tile))
            got = h.fused(x, residual=res.clone(), then_norm=nw, eps=1e-5, then_quant=(pre, a, afmt))
            want = ck.act_prep(plain, norm=nw, eps=1e-5, prequant=pre, act_scale=a, afmt=afmt)
            _same_quantized(got, want, (out, tile))
    graph, r = torch.cuda.CUDAGraph(), res.clone()
    with torch.cuda.graph(graph):
        xn = h.fused(x, residual=r, then_norm=nw, eps=1e-5)
    for _ in range(3):
        graph.replay()
        assert rel(xn, ck.act_prep(r, norm=nw, eps=1e-5)) <= 2e-3 and not h.then_counter.any()


def _same_quantized(got, want, tag):
    """int8 / e4m3 activations quantized from values that differ by a float16 rounding at most (SiLU's exp, the
    RMSNorm statistics' order): the same dtype, at most one quantization step apart, on at most 5 % of entries."""
    assert got.dtype == want.dtype and got.shape == want.shape, tag
    g, w = got.float(), want.float()
    step = 1.0 if got.dtype == torch.int8 else w.abs() / 8 + 2.0 ** -9  # an e4m3 step: 3 mantissa bits
    assert bool(((g - w).abs() <= step).all()) and (g != w).float().mean() <= 0.05, tag
    assert w.abs().max() > 10 * (1.0 if got.dtype == torch.int8 else 2.0 ** -6), tag  # not all zero


def _check_mma_epilogues(call, then_counter, tile_counter, res, nw, tag):
    """call(**kw) → a tensor-core kernel's result on one row at a fixed K split and depth: then_silu against
    act_prep(silu) of the plain output; then_norm three times against act_prep(norm) of the plain residual sum, the
    residual the same bits as the plain call's, both counters left zero; both quantized for a SmoothQuant linear next
    (then_quant) against act_prep's quantization."""
    from quant.runtime import cuda_kernels as ck

    a = torch.tensor([0.02], device=DEV)
    y = call()
    assert rel(call(then_silu=True), ck.act_prep(y, silu=True)) <= 2e-3, tag
    plain = call(residual=res.clone())
    for _ in range(3):
        r = res.clone()
        xn = call(residual=r, then_norm=nw, counter=then_counter)
        assert torch.equal(r, plain) and not then_counter.any() and not tile_counter.any(), tag
        assert rel(xn, ck.act_prep(plain, norm=nw, eps=1e-5)) <= 2e-3, tag
    got = call(residual=res.clone(), then_norm=nw, counter=then_counter, then_quant=(None, a, ck.A_INT8))
    _same_quantized(got, ck.act_prep(plain, norm=nw, eps=1e-5, act_scale=a, afmt=ck.A_INT8), tag)
    got = call(then_silu=True, then_quant=(None, a, ck.A_INT8))
    _same_quantized(got, ck.act_prep(y, silu=True, act_scale=a, afmt=ck.A_INT8), tag)


def _check_mma_epilogues_in_a_graph(h, x, tile_counter, res, nw, plain):
    """The handler's one-row call with then_norm captured in a CUDA graph and replayed: the residual the same bits as
    ``plain`` (the kernel called with its own split rule, splits=0, as the handler calls it), the norm within a
    rounding of act_prep's, both counters left zero."""
    from quant.runtime import cuda_kernels as ck

    graph, r = torch.cuda.CUDAGraph(), res.clone()
    with torch.cuda.graph(graph):
        xn = h.fused(x, residual=r, then_norm=nw, eps=1e-5)
    for _ in range(3):
        r.copy_(res)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(r, plain) and rel(xn, ck.act_prep(r, norm=nw, eps=1e-5)) <= 2e-3
        assert not h.then_counter.any() and not tile_counter.any()


@cuda
@pytest.mark.parametrize("algo", W8G)
@pytest.mark.parametrize("out, inp", [(64, 512), (576, 576), (960, 1536), (64, 11008), (4096, 4096)])
def test_w8m_matches_float64_reference(algo, out, inp):
    """The 8-bit tensor-core kernel (cuda_ext.w8_mma, KernelConfig.w8m) at batch 1 through the handler and, called
    directly, 1–8 rows on act_prep's output, against the float64 reference: hidden 576, the default model's 960 ×
    1536, K = 11008 on one tile (the K split over 344 steps), 7B's 4096²; activations ×1/×40/×400; depth 2 and 4, K
    splits 1, 3 and the rule, each the same bits on a second call, from rows longer than K and in a CUDA graph, the
    tile counters left zero; the residual added with one rounding; within rounding of the compiled GEMV."""
    from quant.hardware import fp8_refusal
    from quant.runtime import cuda_ext
    from quant.runtime import cuda_kernels as ck
    from quant.runtime.linear import make_linear
    from quant.runtime.schemes.base import KernelConfig
    from tests.test_kernels import activations

    if algo == "FP8" and fp8_refusal(0):
        pytest.skip(fp8_refusal(0))
    dtype = torch.float16
    gen = torch.Generator().manual_seed(out * inp + len(algo) + 1)
    t = _layout(algo, gen, out, inp, 64)
    tensors = {k: v.to(DEV) for k, v in t.items()}
    h = make_linear(algo, tensors, dtype=dtype, device=DEV, kernels=KernelConfig(w8m=frozenset({algo})))
    assert h.w8g and h.kernel.startswith("w8m-mma"), h.gemv_unavailable or h.kernel
    assert torch.equal(cuda_ext.unpack_w8m(h.w8m, algo), h.weight.view(torch.uint8))
    g8 = make_linear(algo, tensors, dtype=dtype, device=DEV, kernels=KernelConfig(w8g=frozenset({algo})))
    wd = h.dequantized_weight().cpu()
    scale_of = h.scale if algo == "W8A16" else h.out_scale
    for scale in (1, 40, 400):
        x = (activations(gen, 1, inp) * scale).to(dtype)
        y = h(x.to(DEV))
        assert rel(y, _reference(algo, t, x, wd)) <= 1e-2, scale
        assert rel(y, g8(x.to(DEV))) <= 2e-3, scale
        res = torch.randn(1, out, generator=gen).to(dtype)
        r = res.to(DEV).clone()
        assert h.fused(x.to(DEV), residual=r) is r
        assert rel(r, res.double() + y.double().cpu()) <= torch.finfo(dtype).eps, scale
    cnt = h.w8m_counter
    for m in (1, 3, 8):
        xm = (activations(gen, m, inp) * 3).to(dtype)
        q = xm.to(DEV) if algo == "W8A16" else ck.act_prep(
            xm.to(DEV), prequant=h.prequant, act_scale=h.act_scale.reshape(1),
            afmt=ck.A_INT8 if algo != "FP8" else ck.A_FP8)
        ref = _reference(algo, t, xm, wd)
        for depth, splits in itertools.product(cuda_ext.W8M_DEPTHS, (1, 3, 0)):
            call = functools.partial(cuda_ext.w8_mma, q, h.w8m, scale_of, fmt=algo, tile_counter=cnt, splits=splits,
                                     depth=depth)
            y = call()
            assert rel(y, ref) <= 1e-2 and not cnt.any(), (m, depth, splits)
            assert torch.equal(call(), y), (m, depth, splits)
        wide = q.new_zeros(m, inp + 64)  # rows longer than K (a view): the same bits
        wide[:, :inp] = q
        assert torch.equal(cuda_ext.w8_mma(wide[:, :inp], h.w8m, scale_of, fmt=algo, tile_counter=cnt, splits=3),
                           cuda_ext.w8_mma(q, h.w8m, scale_of, fmt=algo, tile_counter=cnt, splits=3)), m
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            yg = cuda_ext.w8_mma(q, h.w8m, scale_of, fmt=algo, tile_counter=cnt, splits=3)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(yg, cuda_ext.w8_mma(q, h.w8m, scale_of, fmt=algo, tile_counter=cnt, splits=3))
        assert not cnt.any(), m
    assert cuda_ext.w8_mma_splits(algo, out, inp, 10**6) == max(1, inp // 128)
    with pytest.raises(RuntimeError, match="1-8 rows"):
        cuda_ext.w8_mma(q.new_zeros(9, inp), h.w8m, scale_of, fmt=algo, tile_counter=cnt)


@cuda
@pytest.mark.parametrize("algo", W8G)
def test_w8m_epilogues_do_the_next_linears_prologue(algo):
    """The 8-bit tensor-core kernel's then_silu / then_norm at one row (KernelConfig.gemv_then), at both depths with
    the K split on and off: SiLU · gate of the output's halves against act_prep(silu) of the plain output, RMSNorm of the residual
    sum after the last tile against act_prep(norm), the residual the same bits as the plain call's, quantized for a
    SmoothQuant linear next; a CUDA graph of the handler's call, the counters left zero; a shape it cannot take (N =
    96) keeps the compiled GEMV."""
    from quant.hardware import fp8_refusal
    from quant.runtime import cuda_ext
    from quant.runtime import cuda_kernels as ck
    from quant.runtime.linear import make_linear
    from quant.runtime.schemes.base import KernelConfig
    from tests.test_kernels import activations

    if algo == "FP8" and fp8_refusal(0):
        pytest.skip(fp8_refusal(0))
    dtype, inp, out = torch.float16, 576, 2048
    gen = torch.Generator().manual_seed(20 + len(algo))
    tensors = {k: v.to(DEV) for k, v in _layout(algo, gen, out, inp, 64).items()}
    h = make_linear(algo, tensors, dtype=dtype, device=DEV, kernels=KernelConfig(w8m=frozenset({algo})))
    assert h.chains(1) and h.kernel.startswith("w8m-mma"), h.gemv_unavailable or h.kernel
    x = (activations(gen, 1, inp) * 3).to(dtype).to(DEV)
    q = x if algo == "W8A16" else ck.act_prep(x, prequant=h.prequant, act_scale=h.act_scale.reshape(1),
                                              afmt=ck.A_INT8 if algo != "FP8" else ck.A_FP8)
    s = h.scale if algo == "W8A16" else h.out_scale
    nw = (1 + 0.1 * torch.randn(out, generator=gen)).to(dtype).to(DEV)
    res = torch.randn(1, out, generator=gen).to(dtype).to(DEV)
    for depth, splits in itertools.product(cuda_ext.W8M_DEPTHS, (1, 4)):
        _check_mma_epilogues(functools.partial(cuda_ext.w8_mma, q, h.w8m, s, fmt=algo, tile_counter=h.w8m_counter,
                                               splits=splits, depth=depth, eps=1e-5),
                             h.then_counter, h.w8m_counter, res, nw, (depth, splits))
    _check_mma_epilogues_in_a_graph(h, q, h.w8m_counter, res, nw, cuda_ext.w8_mma(
        q, h.w8m, s, fmt=algo, tile_counter=h.w8m_counter, residual=res.clone()))
    t96 = {k: v.to(DEV) for k, v in _layout(algo, gen, 96, inp, 64).items()}
    h96 = make_linear(algo, t96, dtype=dtype, device=DEV, kernels=KernelConfig(w8m=frozenset({algo})))
    assert h96.w8m is None and h96.w8g and h96.kernel.startswith("w8g-cuda")


@cuda
@pytest.mark.parametrize("algo", W8G)
@pytest.mark.parametrize("out, inp", [(64, 512), (80, 1024), (46, 4096), (96, 576), (64, 11008), (70, 528)])
def test_w8g_matches_float64_reference(algo, out, inp):
    """The compiled 8-bit GEMV (cuda_ext.w8_gemv) at batch 1 and, called directly, 2–4 rows, on the stored weights:
    hidden 576 (the default model's), K = 11008 and 528 (chunks that do not fill the last lane round), N = 46 and 70
    (a warp's last rows past N), every tile, activations ×1/×40/×400 (float32 products: no float16 overflow where
    x · q exceeds 65504), RMSNorm / SiLU·gate and the activation quantization in act_prep before it, the residual
    added in place; the same results as the Triton GEMV within rounding."""
    from quant.hardware import fp8_refusal
    from quant.runtime import cuda_ext
    from quant.runtime import cuda_kernels as ck
    from quant.runtime.linear import make_linear
    from quant.runtime.schemes.base import KernelConfig
    from tests.test_kernels import activations

    if algo == "FP8" and fp8_refusal(0):
        pytest.skip(fp8_refusal(0))
    dtype = torch.float16
    gen = torch.Generator().manual_seed(out * inp + len(algo))
    t = _layout(algo, gen, out, inp, 64)
    tensors = {k: v.to(DEV) for k, v in t.items()}
    for tile in cuda_ext.GEMV_TILES:
        h = make_linear(algo, tensors, dtype=dtype, device=DEV, kernels=KernelConfig(w8g=frozenset({algo}),
                                                                                     w8g_tile=tile))
        assert h.w8g and h.kernel.startswith("w8g-cuda"), h.gemv_unavailable or h.kernel
        assert h.weight.data_ptr() == tensors["weight"].data_ptr()  # no copy of the weights
        wd = h.dequantized_weight().cpu()
        for scale in (1, 40, 400):
            x = (activations(gen, 1, inp) * scale).to(dtype)
            err = rel(h(x.to(DEV)), _reference(algo, t, x, wd))
            assert err <= 1e-2, (tile, scale, err)
            for m in (2, 4):  # the kernel's other row counts, on the act_prep output the batch-1 path feeds it
                xm = (activations(gen, m, inp) * scale).to(dtype)
                if algo == "W8A16":
                    q, s = xm.to(DEV), h.scale
                else:
                    q = ck.act_prep(xm.to(DEV), prequant=h.prequant, act_scale=h.act_scale.reshape(1),
                                    afmt=ck.A_INT8 if algo != "FP8" else ck.A_FP8)
                    s = h.out_scale
                err = rel(cuda_ext.w8_gemv(q, h.weight, s, fmt=algo, tile=tile), _reference(algo, t, xm, wd))
                assert err <= 1e-2, (tile, m, scale, err)
    h = make_linear(algo, tensors, dtype=dtype, device=DEV, kernels=KernelConfig(w8g=frozenset({algo})))
    ref = make_linear(algo, tensors, dtype=dtype, device=DEV, kernels=KernelConfig(w8g=frozenset()))  # Triton
    assert not ref.w8g and not ref.kernel.startswith("w8g")
    norm = (1 + 0.1 * torch.randn(inp, generator=gen)).to(dtype).to(DEV)
    x = activations(gen, 1, inp).to(dtype).to(DEV)
    r = torch.randn(1, out, generator=gen).to(dtype).to(DEV)
    assert rel(h.fused(x, norm=norm, eps=1e-5), ref.fused(x, norm=norm, eps=1e-5)) <= 1e-2
    x2 = activations(gen, 1, 2 * inp).to(dtype).to(DEV)
    assert rel(h.fused(x2, silu=True), ref.fused(x2, silu=True)) <= 1e-2
    assert rel(h.fused(x, residual=r.clone()), ref.fused(x, residual=r.clone())) <= 1e-2


def _check_linear(algo, dtype, kernels=None, out=96, inp=320):
    """Default shape: in = 5 groups, not a multiple of the GEMV's K tile."""
    from quant.runtime.linear import make_linear
    from quant.runtime.schemes.base import DEFAULT_KERNELS
    from tests.test_kernels import activations

    gen = torch.Generator().manual_seed(zlib.crc32(f"{algo}/{dtype}".encode()))
    group = 64
    t = _layout(algo, gen, out, inp, group)
    h = make_linear(algo, {k: v.to(DEV) for k, v in t.items()}, dtype=dtype, device=DEV, group_size=group,
                    kernels=kernels or DEFAULT_KERNELS)
    assert not h.emulated
    wd = h.dequantized_weight().cpu()
    if algo is not None:
        from tests.test_kernels import exact_dequantized

        assert torch.equal(wd, exact_dequantized(algo, t, dtype, group))
    else:
        wd = t["weight"].to(dtype).float()
    for m in (1, 3, 8, 12, 40, 100):  # GEMV, GEMV, GEMV, tl.dot, tl.dot, library
        x = activations(gen, m, inp).to(dtype)
        y = h(x.to(DEV))
        assert y.shape == (m, out) and y.dtype == dtype and bool(torch.isfinite(y).all())
        err = rel(y, _reference(algo, t, x, wd))
        assert err <= 1e-2, f"{algo} {dtype} M={m}: {err:.2e}"


@cuda
def test_prefill_tiles_program_order_and_fp8_accumulation():
    """KernelConfig.sq_prefill_tile / prefill_group / sq_prefill_gemm: SmoothQuant's int8 prefill sums exactly in
    int32, so each tile of the benchmark's sweep, in either program order and on the persistent TMA GEMM, gives the
    default's bits (300 and 1100 rows; N and K not multiples of the tiles: K 1000, and for TMA, whose rows must be
    whole 16 bytes, 1008; at 1000 it falls back to tl.dot). fp8_fast_accum: FP8's prefill against the float64
    reference, as every path."""
    from experiments.bench import INT8_GEMM_SWEEP
    from quant.hardware import fp8_refusal
    from quant.runtime import cuda_kernels as ck
    from quant.runtime.schemes.base import KernelConfig
    from tests.test_kernels import activations

    for inp in (1000, 1008):
        gen, t, h, wd = _fp16_linear("W8A8_SQ_PER_CHANNEL", f"sqtiles/{inp}", inp=inp, out=200)
        assert ck.tma_ok(h.weight, h.weight) == (inp == 1008)
        base = h.kernels
        for m in (300, 1100):
            x = activations(gen, m, inp).half().to(DEV)
            h.kernels = base
            want = h(x)
            assert rel(want, _reference("W8A8_SQ_PER_CHANNEL", t, x.cpu(), wd)) <= 1e-2
            for tile in INT8_GEMM_SWEEP:
                for gemm, group in (("triton", 0), ("triton", 8), ("tma", 8)):
                    h.kernels = KernelConfig(sq_prefill_gemm=gemm, sq_prefill_tile=tile, prefill_group=group)
                    assert torch.equal(h(x), want), (inp, m, tile, gemm, group)
    if fp8_refusal(0):
        pytest.skip(fp8_refusal(0))
    _check_linear("FP8", torch.float16, kernels=KernelConfig(fp8_fast_accum=True))



@cuda
@pytest.mark.parametrize("algo,group", [("W8A16", 64), ("W4A16_AWQ", 64), ("W4A16_AWQ", 128)])
def test_weight_only_prefill_with_the_weight_in_registers(algo, group):
    """KernelConfig.wq_prefill (cuda_kernels.wq_prefill_mm, the dequantized weight as wgmma's A operand): the
    handler's prefill at 300 and 1100 rows (K 576 and 1024: the default model's hidden size, N not a multiple of the
    tiles) against the float64 reference and against the default path (dequantize, then cuBLAS), on every tile of
    the benchmark's sweep in both program orders and on the persistent TMA form (wq_prefill_tma, grouped), with the
    residual added in place."""
    from experiments.bench import WQ_PREFILL_SWEEP
    from quant.runtime.schemes.base import DEFAULT_KERNELS
    from tests.test_kernels import activations

    for inp in (i for i in (576, 1024) if i % group == 0):  # (576: groups of 64 only)
        key = f"wqt/{algo}/{group}/{inp}"
        gen, t, h, wd = _fp16_linear(algo, key, inp=inp, out=200, group=group)
        xs = [((activations(gen, m, inp) * 10).half().to(DEV),  # x · q beyond float16 before an int8 scale
               torch.randn(m, 200, generator=gen).half().to(DEV)) for m in (300, 1100)]
        wants = [h.fused(x, residual=res.clone()) for x, res in xs]
        refs = [res.double().cpu() + _reference(algo, t, x.cpu(), wd) for x, res in xs]
        assert all(rel(want, ref) <= 1e-2 for want, ref in zip(wants, refs))
        for tile, (order, tma) in itertools.product(WQ_PREFILL_SWEEP, ((0, False), (8, False), (8, True))):
            # (a handler built with the choice: INT4 keeps its stored layout for this prefill only then)
            h = _fp16_linear(algo, key, inp=inp, out=200, group=group, kernels=dataclasses.replace(
                DEFAULT_KERNELS, wq_prefill=frozenset({algo}), wq_prefill_tile=tile, prefill_group=order,
                wq_prefill_tma=tma))[2]
            for (x, res), want, ref in zip(xs, wants, refs):
                got = h.fused(x, residual=res.clone())
                assert rel(got, ref) <= 1e-2 and rel(got, want) <= 5e-3, (inp, x.shape[0], tile, order, tma)

@cuda
@pytest.mark.parametrize("algo,group", [("W8A16", 0), ("W4A16_AWQ", 64), ("W4A16_AWQ", 128)])
def test_weight_only_prefill_through_cutlass(algo, group):
    """KernelConfig.wq_prefill_cutlass (cuda_ext.wq_gemm: CUTLASS's Hopper mixed-input GEMM, csrc/cutlass) on each
    tile: the handler takes it (its build needs nvidia-cutlass's headers: a missing build fails here, with the
    reason) and its prefill at 300 rows, and the default past wq_cutlass_max_m at 1100 (K 576 and 1024: the default
    model's hidden size; N 200, not a multiple of the 128-channel tile), match the float64 reference and the default
    path (dequantize, then cuBLAS), with large activations (x · q beyond float16 before an int8 scale) and the
    residual added."""
    from quant.runtime.schemes.base import DEFAULT_KERNELS
    from tests.test_kernels import activations

    from quant.runtime.cuda_ext import WQ_GEMM_TILES

    for inp in (i for i in (576, 1024) if i % max(group, 1) == 0):
        key = f"cutlass/{algo}/{group}/{inp}"
        gen, t, h, wd = _fp16_linear(algo, key, inp=inp, out=200, group=group or 64)
        for tile in range(len(WQ_GEMM_TILES)):  # (the cluster of 2: 200 channels are an odd number of CTAs)
            kernels = dataclasses.replace(DEFAULT_KERNELS, wq_prefill_cutlass=frozenset({algo}), wq_cutlass_tile=tile,
                                          wq_cutlass_max_m=1000)
            hc = _fp16_linear(algo, key, inp=inp, out=200, group=group or 64, kernels=kernels)[2]
            assert hc.cutlass, hc.gemv_unavailable  # (W8A16: True; INT4: its (weight, scales))
            for m in (300, 1100):  # (1100: past wq_cutlass_max_m, the default path)
                x = (activations(gen, m, inp) * 10).half().to(DEV)
                res = torch.randn(m, 200, generator=gen).half().to(DEV)
                ref = res.double().cpu() + _reference(algo, t, x.cpu(), wd)
                want, got = h.fused(x, residual=res.clone()), hc.fused(x, residual=res.clone())
                assert rel(want, ref) <= 1e-2 and rel(got, ref) <= 1e-2 and rel(got, want) <= 5e-3, (inp, m, tile)
                assert m < 1000 or torch.equal(got, want), (inp, m, tile)  # past max_m: the default's own bits


@cuda
def test_smoothquant_prefill_through_cutlass():
    """KernelConfig.sq_prefill_gemm "cutlass" (cuda_ext.sq_gemm: CUTLASS's Hopper int8 GEMM, csrc/cutlass/sq_gemm.cu):
    the handler takes it (its build needs nvidia-cutlass's headers: a missing build fails here, with the reason) and
    its prefill gives the default tl.dot path's bits, with and without the residual (int32 sums are exact and the
    epilogue rounds as the tl.dot one does), within the float64 bound, at 100, 300 and 1100 rows (N 200 and 264: not
    multiples of the 128-channel tile, an odd number of 2-CTA clusters; K 576, the default model's hidden size, and
    1008); at K 1000 (rows not whole 16 bytes) the handler keeps the tl.dot path."""
    from quant.runtime.schemes.base import DEFAULT_KERNELS
    from tests.test_kernels import activations

    kernels = dataclasses.replace(DEFAULT_KERNELS, sq_prefill_gemm="cutlass")
    for inp, out in ((576, 200), (1008, 264), (1000, 200)):
        key = f"sqcutlass/{inp}/{out}"
        gen, t, h, wd = _fp16_linear("W8A8_SQ_PER_CHANNEL", key, inp=inp, out=out)
        hc = _fp16_linear("W8A8_SQ_PER_CHANNEL", key, inp=inp, out=out, kernels=kernels)[2]
        assert hc.cutlass == (inp % 16 == 0), hc.gemv_unavailable
        for m in (100, 300, 1100):
            x = activations(gen, m, inp).half().to(DEV)
            res = torch.randn(m, out, generator=gen).half().to(DEV)
            want, got = h.fused(x), hc.fused(x)
            assert torch.equal(got, want), (inp, m)
            assert rel(got, _reference("W8A8_SQ_PER_CHANNEL", t, x.cpu(), wd)) <= 1e-2, (inp, m)
            r1, r2 = res.clone(), res.clone()
            hc.fused(x, residual=r2)  # (in place)
            assert torch.equal(h.fused(x, residual=r1), r2) and not torch.equal(r2, res), (inp, m)


def _fp16_linear(algo, key: str, *, inp: int, out: int = 64, group: int = 64, kernels=None):
    """(generator, checkpoint tensors, float16 handler on the GPU, its dequantized weight) for one random linear."""
    from quant.runtime.linear import make_linear
    from quant.runtime.schemes.base import DEFAULT_KERNELS

    gen = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    t = _layout(algo, gen, out, inp, group)
    h = make_linear(algo, {k: v.to(DEV) for k, v in t.items()}, dtype=torch.float16, device=DEV, group_size=group,
                    kernels=kernels or DEFAULT_KERNELS)
    wd = h.dequantized_weight().cpu() if algo is not None else t["weight"].float()
    return gen, t, h, wd


@cuda
@pytest.mark.parametrize("algo", ALGOS, ids=lambda a: a or "fp16")
def test_large_activations_do_not_overflow_float16(algo):
    """Activations ~40× the usual (SmolLM2's layer-11 down_proj input reaches 65) with K = 1024: y stays well
    inside float16, but x · q before the per-channel scale does not (~10⁵). Every path must scale before it
    rounds to float16 -- the prefill path of W8A16 once did not, and the default model's logits were Inf."""
    from tests.test_kernels import activations

    gen, t, h, wd = _fp16_linear(algo, f"big/{algo}", inp=1024)
    for m in (1, 12, 100):  # GEMV, tl.dot, library GEMM
        x = (activations(gen, m, 1024) * 40).half()
        ref = _reference(algo, t, x, wd)
        assert float(ref.abs().max()) < 6e4
        y = h(x.to(DEV))
        assert bool(torch.isfinite(y).all()), f"{algo} M={m}: non-finite output"
        err = rel(y, ref)
        assert err <= 1e-2, f"{algo} M={m}: {err:.2e}"


@cuda
@pytest.mark.parametrize("algo", ALGOS, ids=lambda a: a or "fp16")
def test_fused_prologues_and_residual(algo):
    """RMSNorm / SiLU·gate in front, residual behind: the GEMV against the CPU path's ops, and against the
    library path (separate prologue kernel + GEMM) on the same inputs."""
    from quant.runtime.schemes.base import KernelConfig

    dtype = torch.float16
    out, inp = 64, 256
    gen, t, h, wd = _fp16_linear(algo, f"pro/{algo}", inp=inp, out=out)
    # The same weights with no GEMV: a prologue kernel, then the library GEMM.
    lib = _fp16_linear(algo, f"pro/{algo}", inp=inp, out=out, kernels=KernelConfig(gemv=frozenset()))[2]
    norm = (1 + 0.1 * torch.randn(inp, generator=gen)).to(dtype)
    for m in (1, 5):
        hs = torch.randn(m, inp, generator=gen).to(dtype) * 3
        fg = torch.randn(m, 2 * inp, generator=gen).to(dtype) * 2
        res = torch.randn(m, out, generator=gen).to(dtype)
        hf = hs.float()
        xn = norm * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
        xs = torch.nn.functional.silu(fg[:, :inp]) * fg[:, inp:]
        for kwargs, x_ref in (({"norm": norm.to(DEV), "eps": 1e-5}, xn), ({"silu": True}, xs)):
            src = hs if "norm" in kwargs else fg
            ref = _reference(algo, t, x_ref, wd)
            y = h.fused(src.to(DEV), **kwargs)
            assert rel(y, ref) <= 1e-2, (algo, m, list(kwargs))
            r = res.to(DEV).clone()
            out_t = h.fused(src.to(DEV), residual=r, **kwargs)
            assert out_t is r
            assert rel(r, res.double() + y.double().cpu()) <= 1e-3
            assert rel(y, lib.fused(src.to(DEV), **kwargs)) <= 1e-2


@cuda
def test_activation_quantization_is_bit_exact():
    """int8: round half to even after clamping (ties included); FP8: saturate, round to nearest even."""
    from quant.runtime import cuda_kernels as ck

    gen = torch.Generator().manual_seed(11)
    x = torch.randn(7, 1000, generator=gen) * 60
    x[0, :256] = torch.arange(-128, 128) + 0.5  # exact ties
    x[1, :4] = torch.tensor([1e6, -1e6, 127.5, -128.5])
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        xd = x.to(dtype)
        a = torch.tensor([0.75])
        q = ck.act_prep(xd.to(DEV), act_scale=a.to(DEV), afmt=ck.A_INT8).cpu()
        assert torch.equal(q, torch.round(xd.float() / a).clamp(-128, 127).to(torch.int8)), dtype
        a8 = torch.tensor([0.37])
        q8 = ck.act_prep(xd.to(DEV), act_scale=a8.to(DEV), afmt=ck.A_FP8).cpu()
        ref8 = (xd.float() / a8).clamp(-448, 448).to(torch.float8_e4m3fn)
        assert torch.equal(q8.view(torch.uint8), ref8.view(torch.uint8)), dtype


@cuda
@pytest.mark.parametrize("kv", [None, "INT8", "FP8"])
def test_decode_rope_cache_write_and_attention(kv):
    from quant.runtime import cuda_kernels as ck
    from quant.runtime import rope
    from quant.runtime.kv_cache import KVCache, QuantizedKVCache

    dtype = torch.float16
    gen = torch.Generator().manual_seed(zlib.crc32(str(kv).encode()))
    B, H, KVH, D, L, slot = 3, 8, 2, 64, 300, 250
    freq = rope.inv_freq(D, 10000.0, None)
    scales = [torch.tensor(0.04)]

    def new_cache(device):
        if kv is None:
            return KVCache(1, B, KVH, L, D, dtype, torch.device(device))
        return QuantizedKVCache(1, B, KVH, L, D, dtype, torch.device(device), algo=kv, scales=scales)

    hist_k = torch.randn(B, KVH, slot, D, generator=gen).to(dtype)
    hist_v = torch.randn(B, KVH, slot, D, generator=gen).to(dtype)
    qkv = torch.randn(B, (H + 2 * KVH) * D, generator=gen).to(dtype) * 2
    pos = torch.tensor([slot - 40, slot - 3, slot])  # left padding: positions lag the slot
    key_mask = torch.ones(B, L, dtype=torch.bool)
    key_mask[0, :40] = False
    key_mask[1, :3] = False

    ref = new_cache("cpu")
    ref.update(0, 0, hist_k, hist_v)
    cos, sin = rope.cos_sin(pos[:, None], freq, dtype)
    q, k, v = qkv.view(B, 1, -1).split((H * D, KVH * D, KVH * D), dim=-1)
    q_ref = rope.apply(q.view(B, 1, H, D).transpose(1, 2), cos, sin)
    k_ref = rope.apply(k.view(B, 1, KVH, D).transpose(1, 2), cos, sin)
    k_all, v_all = ref.update(0, slot, k_ref, v.view(B, 1, KVH, D).transpose(1, 2))
    allowed = key_mask[:, None, None, : slot + 1]
    o_ref = torch.nn.functional.scaled_dot_product_attention(q_ref.double(), k_all.double(), v_all.double(),
                                                             attn_mask=allowed, enable_gqa=True)

    c = new_cache(DEV)
    c.update(0, 0, hist_k.to(DEV), hist_v.to(DEV))
    slot_t = torch.tensor(slot, device=DEV)
    q_gpu = ck.rope_cache_write(qkv.to(DEV), pos.to(DEV), slot_t, freq.to(DEV), c.k[0], c.v[0], H, KVH, D,
                                kv_rcp=c.rcp[0:1] if kv else None, kv_algo=kv)
    assert rel(q_gpu, q_ref.transpose(1, 2).reshape(B, H * D)) <= 2e-3
    def step(want):  # a stored int8 / fp8 value may differ by one step; float16 by a few ulps of the products
        return 1.0 if kv == "INT8" else (want.float().abs() * 2 ** -3 + 2 ** -9 if kv == "FP8" else
                                         2e-3 * want.float().abs().amax())

    for got, want in ((c.k[0].cpu(), ref.k[0]), (c.v[0].cpu(), ref.v[0])):
        diff = (got.float() - want.float()).abs()
        # RoPE rounds once here, three times there (absolute, as the result may cancel)
        assert bool((diff <= step(want)).all()) and (diff > 0).float().mean() < 0.01
    att = ck.DecodeAttention(B, H, KVH, D, L, dtype, DEV)
    assert att.nsplit > 1  # exercises the split reduction
    out = torch.full((B, H * D), float("nan"), dtype=dtype, device=DEV)
    att(q_gpu, c.k[0], c.v[0], key_mask.to(DEV), slot_t, kv_scale=c.scale[0:1] if kv else None, kv_algo=kv, out=out)
    assert rel(out, o_ref.transpose(1, 2).reshape(B, H * D)) <= 1e-2
    # the splits combined by each (row, head)'s last program instead (KernelConfig.attn_fused_reduce): the same
    # combine in the same order (the compiler may contract it differently inside the other kernel: a rounding
    # apart), and the same bits on every one of many launches, whichever program finishes last
    fused = ck.DecodeAttention(B, H, KVH, D, L, dtype, DEV, fused_reduce=True)
    runs = [fused(q_gpu, c.k[0], c.v[0], key_mask.to(DEV), slot_t, kv_scale=c.scale[0:1] if kv else None,
                  kv_algo=kv) for _ in range(50)]
    assert rel(runs[0], out) <= 1e-3 and all(torch.equal(r, runs[0]) for r in runs)
    assert not fused.count.any()  # left at zero for the next launch
    # RoPE and the cache write in the split kernel (KernelConfig.attn_rope_fused), on a cache holding the history
    c2 = new_cache(DEV)
    c2.update(0, 0, hist_k.to(DEV), hist_v.to(DEV))
    got = fused(qkv.to(DEV), c2.k[0], c2.v[0], key_mask.to(DEV), slot_t, kv_scale=c2.scale[0:1] if kv else None,
                kv_algo=kv, rope=(pos.to(DEV), freq.to(DEV), c2.rcp[0:1] if kv else None))
    assert rel(got, out) <= 2e-3
    for a, b in ((c2.k[0].cpu(), c.k[0].cpu()), (c2.v[0].cpu(), c.v[0].cpu())):  # FMA contraction may differ
        assert bool(((a.float() - b.float()).abs() <= step(b)).all())
    # the split kernel's other tiles (KernelConfig.attn_tile: other splits, so other sums; one warp to eight),
    # against float64, each launch's bits the same, the counters left at zero
    for tile in ((16, 48, 1), (32, 128, 2), (128, 0, 8)):
        c3 = new_cache(DEV)
        c3.update(0, 0, hist_k.to(DEV), hist_v.to(DEV))
        att = ck.DecodeAttention(B, H, KVH, D, L, dtype, DEV, fused_reduce=True, tile=tile)
        runs = [att(qkv.to(DEV), c3.k[0], c3.v[0], key_mask.to(DEV), slot_t, kv_scale=c3.scale[0:1] if kv else None,
                    kv_algo=kv, rope=(pos.to(DEV), freq.to(DEV), c3.rcp[0:1] if kv else None)) for _ in range(5)]
        assert rel(runs[0], o_ref.transpose(1, 2).reshape(B, H * D)) <= 1e-2, tile
        assert all(torch.equal(r, runs[0]) for r in runs) and not att.count.any(), tile
    # traced (experiments.attn_bench --trace): the same output and cache bits; every program stamps its phases in
    # order (a stamp hoisted above the load it follows would break it), each (row, head)'s one combining program
    # after every counter of its splits
    outs, caches = [], []
    for trace in (None, torch.zeros(B * H * fused.nsplit, len(ck.ATTN_PHASES), 2, dtype=torch.int64, device=DEV)):
        c4 = new_cache(DEV)
        c4.update(0, 0, hist_k.to(DEV), hist_v.to(DEV))
        outs.append(fused(qkv.to(DEV), c4.k[0], c4.v[0], key_mask.to(DEV), slot_t, kv_algo=kv, trace=trace,
                          kv_scale=c4.scale[0:1] if kv else None,
                          rope=(pos.to(DEV), freq.to(DEV), c4.rcp[0:1] if kv else None)))
        caches.append((c4.k[0].cpu(), c4.v[0].cpu()))
    assert torch.equal(outs[0], outs[1]) and all(torch.equal(a, b) for a, b in zip(*caches))
    ns, clk = trace.cpu().view(B * H, fused.nsplit, len(ck.ATTN_PHASES), 2).unbind(-1)
    assert bool((ns[..., :-1] > 0).all()) and bool((ns[..., :-1].diff(dim=-1) >= 0).all())
    assert bool((clk[..., :-1].diff(dim=-1) > 0).all())
    combined = ns[..., -1] > 0
    assert combined.sum(dim=1).tolist() == [1] * (B * H)
    assert bool((ns[..., -1].amax(dim=1)[:, None] >= ns[..., -2]).all())


@cuda
def test_int4_dequant_kernel_is_exact_in_float32():
    from quant.runtime import cuda_kernels as ck
    from tests.test_kernels import quantize_int4_awq

    gen = torch.Generator().manual_seed(4)
    packed, s, q = quantize_int4_awq(torch.randn(96, 256, generator=gen), 64)
    w = ck.dequant_int4(packed.to(DEV), s.to(DEV), 64, torch.float32).cpu()
    assert torch.equal(w, q.float() * s.repeat_interleave(64, dim=1))


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, *GPU_DTYPES], ids=lambda d: str(d).removeprefix("torch."))
def test_int8_dequant_kernel_rounds_once(dtype):
    """W8A16 prefill's weight: q · s computed in float32 and rounded once to the compute dtype."""
    from quant.runtime import cuda_kernels as ck
    from tests.test_kernels import quantize_int8_per_channel

    q, s = quantize_int8_per_channel(torch.randn(100, 300, generator=torch.Generator().manual_seed(5)))
    s = s.to(dtype)
    w = ck.dequant_int8(q.to(DEV), s.to(DEV), dtype).cpu()
    assert w.dtype == dtype and torch.equal(w, (q.float() * s.float()[:, None]).to(dtype))


# -- the runtime --------------------------------------------------------------------------------------------------------
# bound on ‖logits(GPU, float16) − logits(CPU, float32)‖ / ‖·‖ — the bfloat16 bounds of test_runtime_formats.py
RUNTIME_BOUND = {"fp16": 0.01, "int8_wo": 0.03, "smoothquant": 0.1, "int4_awq": 0.05, "fp8": 0.25, "w4a8_awq": 0.25,
                 "fp16_kv_int8": 0.03, "smoothquant_kv_int8": 0.1, "fp8_kv_fp8": 0.25}


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    from quant.runtime.random_checkpoint import write_checkpoint

    root = tmp_path_factory.mktemp("cuda-ckpt")
    return {r: write_checkpoint(_tiny(r, seed=7), root / r) for r in RUNTIME_BOUND}


@cuda
@pytest.mark.parametrize("recipe", sorted(RUNTIME_BOUND))
def test_runtime_on_cuda_matches_cpu_runtime(recipe, tiny_folders):
    from quant.runtime.torch_runtime import TorchRuntime

    folder = tiny_folders[recipe]
    cpu = TorchRuntime.from_dir(folder, compute_dtype="float32")
    gpu = TorchRuntime.from_dir(folder, device="cuda", compute_dtype="float16")
    info = gpu.describe()
    assert not info["emulated"] and info["device"].startswith("cuda")
    assert all(not k.startswith("emulated") for k in info["kernels"])
    assert "mlp.fc_gate" in gpu.layers[0]  # fc and gate read as one linear
    ids = torch.randint(0, 1024, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    ref = cpu.logits(ids)
    got = gpu.logits(ids)
    assert got.shape == ref.shape and got.device.type == "cuda"
    err = rel(got, ref)
    assert err <= RUNTIME_BOUND[recipe], f"{recipe}: {err:.3e}"
    assert (got.cpu().argmax(-1) == ref.argmax(-1)).float().mean() >= 0.8

    # decode through the static cache and the graph = a prefill of the whole sequence
    prompts = [ids[:9], ids[:23], ids[:16]]
    gen = gpu.generate(prompts, 8, ignore_eos=True)
    assert [len(t) for t in gen.tokens] == [8, 8, 8] and gen.decode_steps == 7 and all(s > 0 for s in gen.step_s)
    for p, toks in zip(prompts, gen.tokens):
        full = gpu.logits(p + toks[:-1])  # teacher-forced: position len(p)-1+j predicts toks[j]
        pred = full[len(p) - 1:].argmax(-1).cpu().tolist()
        agree = sum(a == b for a, b in zip(pred, toks)) / len(toks)
        assert agree >= 0.75, (recipe, pred, toks)
    # graph replay = eager steps (same kernels, same buffers)
    gpu.cuda_graphs = False
    eager = gpu.generate(prompts, 8, ignore_eos=True)
    gpu.cuda_graphs = True
    again = gpu.generate(prompts, 8, ignore_eos=True)  # reuses the captured graph
    assert eager.tokens == gen.tokens == again.tokens


@cuda
def test_decode_step_logits_equal_prefill_logits(tiny_folders):
    """The decode kernels (RoPE + cache write + split-KV attention + fused GEMVs) against the prefill path, at
    several prompt lengths (one and several attention splits' worth of keys); and every row of
    TorchRuntime.decode_logits (the decode step fed one true token at a time, under its CUDA graph: what
    experiments.kernel_quality scores perplexity with) against logits()."""
    from quant.runtime.torch_runtime import TorchRuntime

    ids = torch.randint(0, 1024, (300,), generator=torch.Generator().manual_seed(2)).tolist()
    # int8/fp8 activations: a rounding difference upstream (RMSNorm statistics summed in another order) flips
    # single quantization steps, as the bf16 bounds of test_runtime_formats.py allow for
    from quant.runtime.schemes.base import KernelConfig

    bound = {"smoothquant_kv_int8": 0.06, "fp8_kv_fp8": 0.1}
    # batch 1: the default fuses attention's launches (KernelConfig.attn_fused_batch); @attnsplit does not
    split = KernelConfig(attn_fused_reduce=False, attn_rope_fused=False)
    for recipe in ("fp16", "int8_wo", "smoothquant_kv_int8", "fp8_kv_fp8", "int4_awq", "fp16_kv_int8"):
        for kernels in (KernelConfig(), split):
            rt = TorchRuntime.from_dir(tiny_folders[recipe], device="cuda", compute_dtype="float16", kernels=kernels)
            for n in (2, 24, 299):
                step = _one_step_logits(rt, ids[: n + 1])
                full = rt.logits(ids[: n + 1])[-1]
                assert rel(step, full) <= bound.get(recipe, 2e-2), (recipe, kernels == split, n, rel(step, full))
            dl, full = rt.decode_logits(ids[:40]), rt.logits(ids[:40])
            assert dl.shape == full.shape and dl.dtype == torch.float32
            assert max(rel(dl[t], full[t]) for t in range(40)) <= bound.get(recipe, 2e-2), recipe


@cuda
@pytest.mark.parametrize("recipe", ["fp16", "fp16_kv_int8", "fp8_kv_fp8"])
def test_prefill_rope_in_one_kernel(recipe, tiny_folders):
    """KernelConfig.prefill_rope: the prefill's RoPE and cache write by rope_cache_write (one rounding, decode's)
    against torch's ops: the prefill's logits and the decode steps after it, unquantized and quantized caches; the
    tokens generated, where the cache keeps what the two roundings give alike (float16, int8: e4m3's 3 mantissa bits
    flip some stored keys with the rounding, and a tiny random model's top two logits lie close enough for that to
    change a token, as it did on an H100)."""
    from quant.runtime.schemes.base import KernelConfig
    from quant.runtime.torch_runtime import TorchRuntime

    ids = torch.randint(0, 1024, (70,), generator=torch.Generator().manual_seed(5)).tolist()
    bound = {"fp8_kv_fp8": 0.1, "fp16_kv_int8": 0.06}.get(recipe, 2e-2)
    rts = [TorchRuntime.from_dir(tiny_folders[recipe], device="cuda", compute_dtype="float16",
                                 kernels=KernelConfig(prefill_rope=on)) for on in (False, True)]
    base, fused = (rt.logits(ids) for rt in rts)
    assert rel(fused, base) <= bound, (recipe, rel(fused, base))
    for n in (3, 69):
        assert rel(_one_step_logits(rts[1], ids[: n + 1]), base[n]) <= bound, (recipe, n)
    if recipe != "fp8_kv_fp8":
        prompts = [ids[:9], ids[:23]]
        assert rts[0].generate(prompts, 6, ignore_eos=True).tokens == rts[1].generate(prompts, 6,
                                                                                      ignore_eos=True).tokens


@cuda
@pytest.mark.parametrize("recipe", ["fp16", "int8_wo", "int4_awq", "smoothquant_kv_int8"])
def test_attention_with_pdl_gives_the_same_bits(recipe, tiny_folders):
    """KernelConfig.attn_pdl: decode attention's split kernel loads each split's first keys / values before q and is
    launched with programmatic dependent launch while the qkv GEMV before it runs (the Triton GEMV, the compiled 8-bit
    one, INT4's persistent one, which lets dependents start first thing), waiting for it before reading q. One decode
    step's logits bit for bit against it off, at prompt lengths of one and several splits, and the tokens generated
    under the CUDA graph, replayed."""
    from quant.runtime.schemes.base import ALGO_KEYS, KernelConfig
    from quant.runtime.torch_runtime import TorchRuntime, _DecodeState

    ids = torch.randint(0, 1024, (300,), generator=torch.Generator().manual_seed(6)).tolist()
    ref, pdl = (TorchRuntime.from_dir(tiny_folders[recipe], device="cuda", compute_dtype="float16", kernels=k)
                for k in (KernelConfig(attn_pdl=frozenset()), KernelConfig(attn_pdl=frozenset(ALGO_KEYS))))
    st = _DecodeState(pdl, None, 1, 40, 2, True, (-1,), 0)
    assert st.attn.pdl_ok and st.rope_fused  # (sm_90: every GPU tests/test_cuda.py runs on)
    for n in (2, 24, 299):
        assert torch.equal(_one_step_logits(pdl, ids[: n + 1]), _one_step_logits(ref, ids[: n + 1])), n
    tokens = ref.generate([ids[:9]], 12, ignore_eos=True).tokens
    for _ in range(3):  # the graph replayed: launched with PDL each time
        assert pdl.generate([ids[:9]], 12, ignore_eos=True).tokens == tokens


@cuda
@pytest.mark.parametrize("recipe", ["int8_wo", "int4_awq"])
@pytest.mark.parametrize("depth", [1, 2])
def test_prefill_weight_copies_written_ahead_give_the_same_bits(recipe, depth, tiny_folders):
    """KernelConfig.wq_prefill_ahead: each weight-only linear's float16 copy for the prefill's cuBLAS GEMM written on
    a second stream while the linears before it run (DequantAhead, one or two ahead), against it off, bit for bit:
    the logits of a 70-token prefill run eagerly; the KV caches that generate leaves with its prefill captured and
    replayed (prompts of 40 and 90 tokens, masked) and with 72 rows a decode step (past 64 rows decode takes the
    prefill's path, under the decode graph); and the tokens. No copy is left in flight after a forward."""
    from quant.runtime.schemes.base import KernelConfig
    from quant.runtime.torch_runtime import TorchRuntime, _linears

    ids = torch.randint(0, 1024, (160,), generator=torch.Generator().manual_seed(8)).tolist()
    ref, ahead = (TorchRuntime.from_dir(tiny_folders[recipe], device="cuda", compute_dtype="float16",
                                        kernels=KernelConfig(wq_prefill_ahead=formats, wq_ahead_depth=depth))
                  for formats in (frozenset(), frozenset({"W8A16", "W4A16_AWQ"})))
    assert ref.ahead is None and ahead.ahead is not None
    assert len(ahead.ahead.after) == sum(len(_linears(layer)) for layer in ahead.layers) - 1  # each one's successor
    assert all(k.startswith("prefill-ahead|") for k in ahead.describe()["kernels"])
    assert torch.equal(ahead.logits(ids[:70]), ref.logits(ids[:70]))
    assert not ahead.ahead.queue and len(ahead.ahead.buffers) == depth + 1
    for prompts in ([ids[:40], ids[50:140]], [ids[i:i + 9] for i in range(72)]):
        for _ in range(2):  # the prefill's graph captured, then replayed
            tokens = [rt.generate(prompts, 4, ignore_eos=True).tokens for rt in (ref, ahead)]
            assert tokens[0] == tokens[1]
            for a, b in ((ref._state.cache.k, ahead._state.cache.k), (ref._state.cache.v, ahead._state.cache.v)):
                assert torch.equal(a, b)
        assert not ahead.ahead.queue


@cuda
def test_decode_with_each_linear_doing_the_next_ones_prologue(tiny_folders):
    """KernelConfig.gemv_then: at batch 1 the fc‖gate GEMV writes SiLU · gate and the o / down GEMVs RMSNorm of the
    residual stream (their last program), so that no act_prep runs between linears. On the compiled GEMVs, then on
    the Triton GEMV for every format, every link of the chain taken; against the same kernels unchained: one decode
    step's logits at several prompt lengths, the generated tokens, graph replay = eager, every counter left at
    zero."""
    from quant.runtime.schemes.base import KernelConfig
    from quant.runtime.torch_runtime import TorchRuntime

    ids = torch.randint(0, 1024, (300,), generator=torch.Generator().manual_seed(3)).tolist()
    prompts = [ids[:9], ids[:23]]
    # the compiled GEMVs at batch 1 (the defaults), then the Triton one for every format
    configs = (KernelConfig(gemv_then=True), KernelConfig(gemv_then=True, w8g=frozenset(), w4g_rows=None,
                                                          int4_kernel="triton"))
    for chain, recipe in ((c, r) for c in configs for r in ("fp16", "int8_wo", "smoothquant_kv_int8", "fp8_kv_fp8",
                                                             "int4_awq")):
        plain = dataclasses.replace(chain, gemv_then=False)
        ref, rt = (TorchRuntime.from_dir(tiny_folders[recipe], device="cuda", compute_dtype="float16", kernels=k)
                   for k in (plain, chain))
        layer = rt.layers[0]
        assert all(layer[n].chains(1) and not layer[n].chains(2) for n in ("attention.dense", "mlp.fc_gate",
                                                                            "mlp.proj")), recipe
        for n in (2, 24, 299):  # int8 / fp8 activations: single quantization steps flip (RMSNorm's sum order)
            err = rel(_one_step_logits(rt, ids[: n + 1]), _one_step_logits(ref, ids[: n + 1]))
            assert err <= {"smoothquant_kv_int8": 0.06, "fp8_kv_fp8": 0.1}.get(recipe, 2e-2), (recipe, n, err)
        gen = [rt.generate([p], 8, ignore_eos=True).tokens[0] for p in prompts]
        want = [ref.generate([p], 8, ignore_eos=True).tokens[0] for p in prompts]
        agree = sum(a == b for g, w in zip(gen, want) for a, b in zip(g, w)) / 16
        assert agree >= 0.75, (recipe, gen, want)
        rt.cuda_graphs = False
        assert [rt.generate([p], 8, ignore_eos=True).tokens[0] for p in prompts] == gen, recipe
        assert not any(bool(h.then_counter.any()) for lay in rt.layers for h in lay.values()
                       if getattr(h, "then_counter", None) is not None), recipe


def _one_step_logits(rt, ids):
    """Logits of the last token computed by the decode path (prefill of ids[:-1], then one decode step)."""
    from quant.runtime.torch_runtime import _DecodeState

    P = len(ids) - 1
    with torch.inference_mode():
        st = _DecodeState(rt, None, 1, P + 1, 2, True, (-1,), 0)
        rt._forward(torch.tensor([ids[:P]], device=DEV), torch.arange(P, device=DEV)[None], st.cache, 0,
                    torch.ones(1, P, dtype=torch.bool, device=DEV), last_only=True)
        st.ids.fill_(ids[P])
        st.pos.fill_(P)
        st.slot.fill_(P)
        st.logits = torch.empty(1, rt.vocab, dtype=rt.dtype, device=DEV)
        rt._decode_body(st)
        return st.logits[0].float()


@cuda
def test_eos_stops_on_cuda(tiny_folders):
    from quant.runtime.torch_runtime import TorchRuntime

    rt = TorchRuntime.from_dir(tiny_folders["fp16"], device="cuda", compute_dtype="float16")
    ids = list(range(100, 120))
    free = rt.generate([ids], 12, ignore_eos=True)
    assert len(free.tokens[0]) == 12 and free.decode_steps == 11
    stop = free.tokens[0][3]
    first = free.tokens[0].index(stop)
    cut = rt.generate([ids], 12, [stop])
    assert cut.tokens[0] == free.tokens[0][:first]


@cuda
def test_out_of_gpu_memory_is_one_clear_error(tiny_folders, monkeypatch):
    from quant.runtime.torch_runtime import TorchRuntime

    rt = TorchRuntime.from_dir(tiny_folders["fp16"], device="cuda", compute_dtype="float16")
    with pytest.raises(UserError, match=r"out of GPU memory for batch 64 × \(10 prompt \+ 100000000 new tokens\)"):
        rt.generate([[5] * 10] * 64, 100_000_000, ignore_eos=True)

    def boom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")

    monkeypatch.setattr(rt, "_generate_cuda", boom)
    with pytest.raises(UserError, match=r"out of GPU memory for batch 2 × \(3 prompt \+ 4 new tokens\)"):
        rt.generate([[1, 2, 3], [4, 5, 6]], 4)


def test_auto_device_follows_the_machine():
    """``--device auto`` (the CLIs' default) is the GPU when PyTorch sees one and the CPU otherwise, and the compute
    dtype follows it: float16 on CUDA (the checkpoints' dtype, what the Triton kernels are tuned for), bfloat16 on
    CPU. The concrete pair is what the settings (and so every evaluation key) hold."""
    import argparse

    from experiments.evaluate import add_common_args, settings_from_args

    parser = argparse.ArgumentParser()
    add_common_args(parser)
    settings = settings_from_args(parser.parse_args([]))
    gpu = torch.cuda.is_available()
    assert settings.device == ("cuda" if gpu else "cpu")
    assert settings.compute_dtype == ("float16" if gpu else "bfloat16")
    pinned = settings_from_args(parser.parse_args(["--device", "cpu", "--compute-dtype", "float32"]))
    assert (pinned.device, pinned.compute_dtype) == ("cpu", "float32")
