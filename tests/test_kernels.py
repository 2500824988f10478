"""Each linear handler against a float64 reference, on weights laid out exactly as ModelOpt 0.47 exports them.

The helpers below quantize a float weight into each TRT-LLM layout the way ModelOpt does (int8 per-channel
s = amax_row/127; int4 AWQ per-group s = amax/7, q in [-8, 7], packed in pairs along out, even row in the low
nibble; fp8 s = amax/448). Activations are fresh random draws per check with a few outlier channels (×25).

Reference: float64 y = f(x) @ Wᵀ, with W = the handler's ``dequantized_weight()`` (itself checked to equal the
exact dequantization of the stored tensors) and f the TensorRT-LLM activation path — x · prequant in the compute
dtype, then for SmoothQuant qx = clamp(round_half_even(float32(x) / a), -128, 127) · a and for FP8
qx = float(fp8_e4m3(clamp(float32(x) / a, ±448))) · a, with the same float32 ops (the quantization is the formula
under test; it must not be re-rounded in float64).

Stated tolerances, relative error ‖y − ref‖ / ‖ref‖: ≤ 1e-5 for float32 compute (measured ≈ 1e-7), ≤ 1e-2 for
bfloat16/float16 compute (output rounding alone is ≈ 2^-9 per element; measured ≈ 2e-3).
"""
from __future__ import annotations

import zlib

import pytest
import torch

from quant.runtime.linear import HANDLERS, make_linear
from quant.runtime.schemes.base import pack_int4_rows, unpack_int4_rows
from quant.runtime.schemes.w4a16_awq import W4A16AWQLinear

FP8 = torch.float8_e4m3fn
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CPU = torch.device("cpu")


# -- ModelOpt-layout quantizers (test helpers) ----------------------------------------------------------------------
def quantize_int8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = w.abs().amax(dim=1).float() / 127.0
    q = torch.round(w.float() / s[:, None]).clamp(-128, 127).to(torch.int8)
    return q, s


def quantize_int4_awq(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """→ (packed int8 [out/2, in], scales float32 [out, in/group], q int8 [out, in])."""
    out, inp = w.shape
    wg = w.float().reshape(out, inp // group, group)
    s = wg.abs().amax(dim=-1) / 7.0
    q = torch.round(wg / s[..., None]).clamp(-8, 7).reshape(out, inp).to(torch.int8)
    return pack_int4_rows(q), s, q


def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = (w.abs().amax().float() / 448.0).reshape(1)
    return (w.float() / s).clamp(-448, 448).to(FP8), s


def activations(gen: torch.Generator, m: int, k: int, outliers: int = 3) -> torch.Tensor:
    """Fresh random activations with a few outlier channels (not zeros, not tiny)."""
    x = torch.randn(m, k, generator=gen)
    cols = torch.randperm(k, generator=gen)[:outliers]
    x[:, cols] *= 25.0
    return x


def prequant(gen: torch.Generator, k: int) -> torch.Tensor:
    return torch.exp(0.3 * torch.randn(k, generator=gen)).half()  # ModelOpt writes it in the export dtype (fp16)


def layout(algo: str, w: torch.Tensor, gen: torch.Generator, group: int = 64) -> dict[str, torch.Tensor]:
    """Checkpoint tensors for one linear in ``algo``'s TRT-LLM layout; static activation scales from a calibration
    draw (so a fresh draw can exceed them and exercise the clamp)."""
    k = w.shape[1]
    if algo == "W8A16":
        q, s = quantize_int8_per_channel(w)
        return {"weight": q, "weights_scaling_factor": s}
    if algo == "W8A8_SQ_PER_CHANNEL":
        q, s = quantize_int8_per_channel(w)
        pre = prequant(gen, k)
        calib = activations(gen, 16, k) * pre.float()
        return {"weight": q, "weights_scaling_factor": s, "prequant_scaling_factor": pre,
                "activation_scaling_factor": (calib.abs().amax() / 127.0).reshape(1)}
    if algo == "W4A16_AWQ":
        packed, s, _ = quantize_int4_awq(w, group)
        return {"weight": packed, "weights_scaling_factor": s, "prequant_scaling_factor": prequant(gen, k)}
    if algo == "FP8":
        q, s = quantize_fp8(w)
        calib = activations(gen, 16, k)
        return {"weight": q, "weights_scaling_factor": s,
                "activation_scaling_factor": (calib.abs().amax() / 448.0).reshape(1)}
    raise AssertionError(algo)


def exact_dequantized(algo: str, t: dict[str, torch.Tensor], dtype: torch.dtype, group: int = 64) -> torch.Tensor:
    """q · s from the stored tensors, float32, with the scales in the precision the handler must hold them in:
    the compute dtype for the weight-only kernels (they take scales in x's dtype), float32 otherwise."""
    if algo == "W8A16":
        return t["weight"].float() * t["weights_scaling_factor"].to(dtype).float()[:, None]
    if algo == "W8A8_SQ_PER_CHANNEL":
        return t["weight"].float() * t["weights_scaling_factor"].float()[:, None]
    if algo == "W4A16_AWQ":
        s = t["weights_scaling_factor"].to(dtype).float().repeat_interleave(group, dim=1)
        return unpack_int4_rows(t["weight"]).float() * s
    if algo == "FP8":
        return t["weight"].float() * t["weights_scaling_factor"].float()
    raise AssertionError(algo)


def reference(algo: str, t: dict[str, torch.Tensor], x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """float64 TRT-LLM forward of x (compute dtype) with dequantized weight w."""
    if "prequant_scaling_factor" in t:
        x = x * t["prequant_scaling_factor"].to(x.dtype)  # in the model dtype, as TRT-LLM does
    if algo == "W8A8_SQ_PER_CHANNEL":
        a = t["activation_scaling_factor"].float()
        xq = torch.round(x.float() / a).clamp(-128, 127).double() * a.double()
    elif algo == "FP8":
        a = t["activation_scaling_factor"].float()
        xq = (x.float() / a).clamp(-448, 448).to(FP8).double() * a.double()
    else:
        xq = x.double()
    return xq @ w.double().t()


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).norm() / ref.norm()).item()


ALGOS = ["W8A16", "W8A8_SQ_PER_CHANNEL", "W4A16_AWQ", "FP8"]
EXPECTED_KERNEL = {"W8A16": "int8pack_mm", "W8A8_SQ_PER_CHANNEL": "int_mm", "W4A16_AWQ": "int4pack_mm_cpu",
                   "FP8": "scaled_mm"}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("algo", ALGOS)
def test_handler_matches_float64_reference(algo, dtype):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{algo}/{dtype}".encode()))
    out, inp = 96, 192  # out not a power of two; in = 3 groups of 64
    w = torch.randn(out, inp, generator=gen) * 0.05
    t = layout(algo, w, gen)
    h = make_linear(algo, t, dtype=dtype, device=CPU, group_size=64)
    assert h.kernel == EXPECTED_KERNEL[algo]
    assert h.emulated == (algo == "FP8")
    # dequantized_weight() is exactly q · s of the stored layout
    wd = h.dequantized_weight()
    assert wd.shape == (out, inp) and wd.dtype == torch.float32
    assert torch.equal(wd, exact_dequantized(algo, t, dtype))
    for m in (1, 7, 33):
        x = activations(gen, m, inp).to(dtype)
        y = h(x)
        assert y.shape == (m, out) and y.dtype == dtype
        ref = reference(algo, t, x, wd)
        err = rel_err(y, ref)
        assert err <= TOL[dtype], f"{algo} {dtype} M={m}: {err:.2e}"
        if algo in ("W8A8_SQ_PER_CHANNEL", "FP8"):
            # guard: the activation quantization is really there (an unquantized x would be far off)
            plain = (x * t["prequant_scaling_factor"].to(dtype) if "prequant_scaling_factor" in t else x).double()
            assert rel_err(plain @ wd.double().t(), ref) > 10 * max(err, 1e-7)
    # leading dims are kept: [B, T, in] → [B, T, out]
    x3 = activations(gen, 10, inp).to(dtype).reshape(2, 5, inp)
    y3 = h(x3)
    assert y3.shape == (2, 5, out)
    assert rel_err(y3.reshape(10, out), reference(algo, t, x3.reshape(10, inp), wd)) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_fp8_on_cpu_is_atens_scaled_mm_without_onednn(dtype):
    """FP8Linear off CUDA gives torch._scaled_mm's numbers bit for bit (ATen's own CPU path: both operands upcast
    to float32, each times its scale), without handing the GEMM to oneDNN, whose reference FP8 matmul (AMX CPUs)
    takes seconds per call."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"fp8-aten/{dtype}".encode()))
    t = layout("FP8", torch.randn(96, 192, generator=gen) * 0.05, gen)
    h = make_linear("FP8", t, dtype=dtype, device=CPU)
    x = activations(gen, 7, 192).to(dtype)
    with torch.backends.mkldnn.flags(enabled=False):  # ATen's path, whatever this CPU has
        want = torch._scaled_mm(h.quantize_input(x), h.weight_t, scale_a=h.act_scale, scale_b=h.weight_scale,
                                out_dtype=dtype)
    assert torch.equal(h(x), want)


def test_int4_unpack_hand_built_example():
    """4 out-rows × 2 in-columns: pairs (row 0, row 1) and (row 2, row 3) share bytes, even row in the low nibble."""
    q = torch.tensor([[-8, 7], [1, -1], [0, -3], [5, 2]], dtype=torch.int8)
    # byte = (q_even & 0xF) | (q_odd << 4): (-8,1) → 0x18; (7,-1) → 0xF7; (0,5) → 0x50; (-3,2) → 0x2D
    packed = torch.tensor([[0x18, 0xF7 - 256], [0x50, 0x2D]], dtype=torch.int8)
    assert torch.equal(pack_int4_rows(q), packed)
    assert torch.equal(unpack_int4_rows(packed), q)
    # a handler on it: group 2 is not a kernel group, so this is the emulated path; w = q · s per (row, group)
    s = torch.tensor([[0.5], [2.0], [1.0], [0.25]])
    h = W4A16AWQLinear({"weight": packed, "weights_scaling_factor": s, "prequant_scaling_factor": torch.ones(2)},
                       torch.float32, CPU, group_size=2)
    assert h.emulated and h.kernel == "emulated-int4"
    assert torch.equal(h.dequantized_weight(), q.float() * s)
    x = torch.tensor([[1.0, 10.0]])
    assert torch.equal(h(x), x @ (q.float() * s).t())


@pytest.mark.parametrize("out, inp, group, kernel", [
    (40, 128, 64, "int4pack_mm_cpu"),      # out % 16 != 0: rows zero-padded to 48, output sliced
    (64, 1024, 512, "int4pack_mm_cpu"),    # group 512: fed to the kernel as group 256, scales repeated
    (64, 576, 64, "int4pack_mm_cpu"),      # hidden 576 (the default model) with group 64
    (64, 96, 96, "int4pack_mm_cpu"),       # group 96 → kernel group 32
    (64, 128, 16, "emulated-int4"),        # group 16: no kernel group divides it
])
def test_int4_kernel_shape_constraints(out, inp, group, kernel):
    gen = torch.Generator().manual_seed(out * inp + group)
    w = torch.randn(out, inp, generator=gen) * 0.05
    t = layout("W4A16_AWQ", w, gen, group=group)
    h = make_linear("W4A16_AWQ", t, dtype=torch.float32, device=CPU, group_size=group)
    assert h.kernel == kernel and h.emulated == kernel.startswith("emulated")
    wd = h.dequantized_weight()
    assert torch.equal(wd, exact_dequantized("W4A16_AWQ", t, torch.float32, group))
    for m in (1, 7, 33):
        x = activations(gen, m, inp)
        y = h(x)
        assert y.shape == (m, out)
        assert rel_err(y, reference("W4A16_AWQ", t, x, wd)) <= 1e-5


def test_int4_copy_made_only_for_rows_left_by_the_kernels_ahead():
    """CUDA INT4 makes a copy of the weights per kernel; each is made only where some row up to 64 is left to it by
    the kernels ahead (the rule is shared; the handlers are built on a GPU in tests/test_cuda.py). The defaults:
    the GEMV at 1, tensor cores at 2–16, the k-packed kernel at 17–64, then nothing left for tinygemm."""
    from quant.runtime.schemes.base import KernelConfig
    from quant.runtime.schemes.w4a16_awq import _rows_left

    k = KernelConfig()
    assert _rows_left(k.w4g_rows, [k.w4m_rows]) and _rows_left(k.w4k_rows, [k.w4m_rows, k.w4g_rows])
    assert not _rows_left((1, 64), [k.w4m_rows, k.w4g_rows, k.w4k_rows])
    assert _rows_left((1, 64), [k.w4m_rows, k.w4g_rows, (2, 32)])  # 33–64 left
    assert not _rows_left((1, 1), [(1, 16)]) and not _rows_left(None, []) and _rows_left((3, 3), [(1, 2), (4, 9)])


def test_awq_group_size_must_match_scales():
    from quant.errors import UserError

    gen = torch.Generator().manual_seed(3)
    t = layout("W4A16_AWQ", torch.randn(32, 128, generator=gen), gen, group=64)
    with pytest.raises(UserError, match="group size 64"):
        make_linear("W4A16_AWQ", t, dtype=torch.float32, device=CPU, group_size=128)


def test_unknown_algo_is_refused():
    from quant.errors import UserError

    with pytest.raises(UserError, match="no kernel"):
        make_linear("NVFP4", {}, dtype=torch.float32, device=CPU)
    # W4A8 is FP8 at run time (its FP8 weight formed at load): tests/test_runtime_formats.py and
    # tests/test_server_loaders.py check it against ModelOpt and TensorRT-LLM's loading math.
    assert set(HANDLERS) == {None, *ALGOS, "W4A8_AWQ"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_weight_bytes_held_int8_half_int4_quarter_of_fp16(dtype):
    """The memory claim (not a timing): bytes a decode step reads vs the same weight in fp16."""
    gen = torch.Generator().manual_seed(5)
    out, inp = 1536, 576
    w = torch.randn(out, inp, generator=gen) * 0.05
    fp16_bytes = out * inp * 2
    dense = make_linear(None, {"weight": w.half()}, dtype=torch.bfloat16, device=CPU)
    assert dense.nbytes == fp16_bytes
    int8 = make_linear("W8A16", layout("W8A16", w, gen), dtype=dtype, device=CPU).nbytes / fp16_bytes
    assert 0.5 <= int8 <= 0.51  # int8 weight + one scale per row
    int4_128 = make_linear("W4A16_AWQ", layout("W4A16_AWQ", w, gen, group=64 if inp % 128 else 128),
                           dtype=dtype, device=CPU, group_size=64 if inp % 128 else 128).nbytes / fp16_bytes
    # packed int4 (0.25 of fp16) + tinygemm's (scale, zero) pair per group in the compute dtype + prequant:
    # group 64 adds 2·4/64/2 = 0.0625 (float32) or 0.031 (bfloat16)
    assert 0.25 <= int4_128 <= (0.32 if dtype == torch.float32 else 0.29)
    fp8 = make_linear("FP8", layout("FP8", w, gen), dtype=dtype, device=CPU).nbytes / fp16_bytes
    assert 0.5 <= fp8 <= 0.501
