"""The compiled INT4 GEMV's weight layout (quant/runtime/cuda_ext.py, csrc/w4a16_gemv.cu), checked on the CPU: the
packing round-trips, and the kernel's dequantization — LOP3 against the float16 exponent of 1024, then a
subtraction or a multiply-add with its three float16 constants — read with numpy bit for bit gives back every
int4 value in the (k, k+1) pairs the kernel multiplies with x. The kernel itself runs in tests/test_cuda.py."""
import numpy as np
import torch

from quant.runtime.cuda_ext import pack_w4g, unpack_w4g


def test_pack_round_trips_every_value():
    order = torch.randperm(128, generator=torch.Generator().manual_seed(0))
    q = torch.arange(-8, 8, dtype=torch.int8).repeat(6, 8)[:, order]
    w = pack_w4g(q)
    assert w.dtype == torch.int32 and w.shape == (6, 16)
    assert torch.equal(unpack_w4g(w), q)
    assert torch.equal(pack_w4g(q, rows_per_step=4), w)  # packed in steps: the same words


def _kernel_dequant(word: np.uint32) -> list[float]:
    """csrc/w4a16_gemv.cu dequant_word, step for step: lop3(a, mask, 0x64006400) = (a & mask) | 0x64006400."""
    def h2(u):
        return np.array([u], dtype=np.uint32).view(np.float16)  # (low half, high half)

    sub, mul, add = h2(0x64086408), h2(0x2C002C00), h2(0xD480D480)
    out = []
    for q in (int(word), int(word) >> 8):
        lo = h2((q & 0x000F000F) | 0x64006400) - sub
        hi = h2((q & 0x00F000F0) | 0x64006400) * mul + add  # exact here: the kernel's fma rounds once, same value
        out += [lo, hi]
    return [float(v) for pair in out for v in pair]  # (k0, k1), (k2, k3), (k4, k5), (k6, k7)


def test_kernel_dequantization_reads_back_the_int4_values_in_order():
    gen = torch.Generator().manual_seed(1)
    q = torch.randint(-8, 8, (4, 64), generator=gen, dtype=torch.int8)
    q[0, :16] = torch.arange(-8, 8)  # every value at every nibble position
    q[1, :16] = torch.arange(7, -9, -1)
    w = pack_w4g(q).numpy().view(np.uint32)
    for n in range(q.shape[0]):
        got = [v for j in range(w.shape[1]) for v in _kernel_dequant(w[n, j])]
        assert got == q[n].tolist()


def _byte_perm(x: int, y: int, s: int) -> int:
    """CUDA's __byte_perm(x, y, s): result byte i is byte (s >> 4i) & 7 of the 8 bytes {y, x} (x's bytes first)."""
    both = (x & 0xFFFFFFFF) | (y & 0xFFFFFFFF) << 32
    return sum(((both >> 8 * ((s >> 4 * i) & 7)) & 0xFF) << 8 * i for i in range(4))


def test_int8_gemv_dequantization_is_exact_for_every_byte():
    """csrc/w8_gemv.cu dot_word (W8A16)'s conversion, step for step: q ^ 0x80 into the mantissa of 2^23 by one PRMT
    (selector 0x7440 + b), minus 2^23 + 128 in float32, gives back every int8 value at every byte position."""
    values = np.arange(-128, 128, dtype=np.int8)
    for b in range(4):
        for v in values:
            word = (int(np.uint8(v.view(np.uint8))) << 8 * b) | (0x5A << 8 * ((b + 1) % 4))  # a neighbour byte too
            u = word ^ 0x80808080
            bits = _byte_perm(u, 0x4B000000, 0x7440 + b)
            f = np.array([bits], dtype=np.uint32).view(np.float32)[0]
            assert np.float32(f) - np.float32(8388608.0 + 128.0) == np.float32(v), (b, v)


def test_kernel_config_refuses_what_the_gemvs_cannot_take():
    import pytest

    from quant.runtime.schemes.base import KernelConfig

    with pytest.raises(ValueError, match="w8g takes the 8-bit formats"):
        KernelConfig(w8g=frozenset({"W4A16_AWQ"}))
    with pytest.raises(ValueError, match="w4g_rows must be"):
        KernelConfig(w4g_rows=(1, 5))
    assert KernelConfig(w8g=frozenset({"W8A16", "FP8"})).w8g == {"W8A16", "FP8"}
    with pytest.raises(ValueError, match="wq_prefill takes W8A16 and W4A16_AWQ"):
        KernelConfig(wq_prefill=frozenset({"FP8"}))  # FP8 and SmoothQuant prefill have their own GEMMs
    with pytest.raises(ValueError, match="wq_prefill_cutlass takes W8A16 and W4A16_AWQ"):
        KernelConfig(wq_prefill_cutlass=frozenset({"W8A8_SQ_PER_CHANNEL"}))
    with pytest.raises(ValueError, match="wq_prefill_ahead takes W8A16 and W4A16_AWQ"):
        KernelConfig(wq_prefill_ahead=frozenset({"FP8"}))  # (FP8's prefill writes no weight copy)
    with pytest.raises(ValueError, match="wq_ahead_depth must be 1, 2 or 3"):
        KernelConfig(wq_ahead_depth=0)
    assert KernelConfig().w8g == {"W8A16", "W8A8_SQ_PER_CHANNEL", "FP8"} and not KernelConfig().wq_prefill
    with pytest.raises(ValueError, match="norm_prologue takes W4A16_AWQ and the 8-bit formats"):
        KernelConfig(norm_prologue=frozenset({"W4A8_AWQ"}))  # (only the compiled GEMVs have the prologue)
    assert KernelConfig(norm_prologue=frozenset({"W4A16_AWQ", "FP8"})).norm_prologue == {"W4A16_AWQ", "FP8"}


def test_attention_fusions_follow_the_batch_limit():
    """Decode attention's two fusions apply up to ``attn_fused_batch`` (batch 1 by default, where they measured
    faster); experiments.bench's variants turn them on at every batch or off at every batch."""
    import dataclasses

    import pytest

    from experiments.bench import KERNEL_VARIANTS
    from quant.runtime.schemes.base import DEFAULT_KERNELS, KernelConfig

    assert DEFAULT_KERNELS.attn_fusions(1) == (True, True) and DEFAULT_KERNELS.attn_fusions(2) == (False, False)
    variant = {v: dataclasses.replace(DEFAULT_KERNELS, **KERNEL_VARIANTS[v])
               for v in ("attnfused", "attnreduce", "attnrope", "attnsplit")}
    assert variant["attnfused"].attn_fusions(32) == (True, True)
    assert variant["attnreduce"].attn_fusions(8) == (True, False)
    assert variant["attnrope"].attn_fusions(8) == (False, True)
    assert variant["attnsplit"].attn_fusions(1) == (False, False)
    assert KernelConfig(attn_fused_batch=4).attn_fusions(4) == (True, True)
    assert KernelConfig(attn_fused_batch=4).attn_fusions(5) == (False, False)
    with pytest.raises(ValueError, match="attn_fused_batch must be"):
        KernelConfig(attn_fused_batch=0)
    with pytest.raises(ValueError, match="unknown format"):  # attn_pdl names formats, as gemv_pdl does
        KernelConfig(attn_pdl=frozenset({"W4A16"}))
    for v in ("attnpdl", "noattnpdl", "w8normpdl"):  # the benchmark's variants are valid configurations
        dataclasses.replace(DEFAULT_KERNELS, **KERNEL_VARIANTS[v])


def test_attention_tile_is_checked_and_named_by_the_benchmark():
    """KernelConfig.attn_tile: (keys a loop step, keys a split, warps) within what the split kernel takes; the
    benchmark's ``@attnBxSwW`` names any tile and refuses one KernelConfig refuses."""
    import pytest

    from experiments.bench import kernel_variant, known_variant
    from quant.runtime.schemes.base import KernelConfig

    assert KernelConfig(attn_tile=(32, 128, 2)).attn_tile == (32, 128, 2) and KernelConfig().attn_tile is None
    for bad in ((48, 0, 4), (64, -1, 4), (64, 0, 3), (64, 0)):
        with pytest.raises(ValueError, match="attn_tile must be"):
            KernelConfig(attn_tile=bad)
    assert kernel_variant("attn32x128w2") == {"attn_tile": (32, 128, 2)}
    assert known_variant("attn16x0w1") and known_variant("") and known_variant("nocard")
    assert not known_variant("attn48x64w4") and not known_variant("attn32x64") and not known_variant("bogus")


def test_prefill_tile_and_order_are_checked_and_named_by_the_benchmark():
    """KernelConfig.sq_prefill_tile / prefill_group / sq_prefill_gemm / wq_prefill_tile / fp8_fast_accum:
    SmoothQuant's prefill tile is five positive values (four powers of two), the grouping non-negative, the GEMM one
    of three; the benchmark's ``@sqp…`` names a tile (with ``g``, the grouping too), ``@sqtma…`` one of the TMA GEMM,
    ``@wqt…`` / ``@wqtma…`` one of the weight-only prefill (and refuses one without a warp group's rows), its fixed
    prefill variants are valid configurations."""
    import dataclasses

    import pytest

    from experiments.bench import KERNEL_VARIANTS, kernel_variant, known_variant
    from quant.runtime.schemes.base import DEFAULT_KERNELS, KernelConfig

    assert KernelConfig(sq_prefill_tile=(128, 256, 128, 8, 3)).sq_prefill_tile == (128, 256, 128, 8, 3)
    for bad in ((128, 96, 64, 4, 4), (128, 128, 64, 4, 0), (128, 128, 64, 4)):
        with pytest.raises(ValueError, match="sq_prefill_tile must be"):
            KernelConfig(sq_prefill_tile=bad)
    with pytest.raises(ValueError, match="prefill_group must be"):
        KernelConfig(prefill_group=-1)
    assert kernel_variant("sqp128x256x128w8s3") == {"sq_prefill_tile": (128, 256, 128, 8, 3), "prefill_group": 0}
    assert kernel_variant("sqp64x128x128w4s4g8") == {"sq_prefill_tile": (64, 128, 128, 4, 4), "prefill_group": 8}
    assert known_variant("sqp128x128x64w4s4g8") and not known_variant("sqp128x96x64w4s4")
    assert not known_variant("sqp128x128x64w4")
    assert kernel_variant("sqtma128x256x128w8s3") == {"sq_prefill_gemm": "tma",
                                                      "sq_prefill_tile": (128, 256, 128, 8, 3)}
    assert kernel_variant("wqt128x256x64w8s3") == {"wq_prefill": frozenset({"W8A16", "W4A16_AWQ"}),
                                                   "wq_prefill_tile": (128, 256, 64, 8, 3)}
    assert kernel_variant("wqtma64x128x64w4s4") == {"wq_prefill": frozenset({"W8A16", "W4A16_AWQ"}),
                                                    "wq_prefill_tma": True, "wq_prefill_tile": (64, 128, 64, 4, 4)}
    assert not known_variant("wqt128x256x64w16s3")  # BLOCK_R below 16 · warps: no warp group's 64 rows
    with pytest.raises(ValueError, match="sq_prefill_gemm must be"):
        KernelConfig(sq_prefill_gemm="cublas")
    for v in ("nopg", "sqintmm", "sqtma", "fastacc", "noprerope", "wqprefill", "wqcutlass", "wqahead", "wqahead2",
              "sqcutlass"):
        dataclasses.replace(DEFAULT_KERNELS, **KERNEL_VARIANTS[v])


def test_a_card_takes_its_measured_departures_from_the_defaults(monkeypatch):
    """schemes.base.CARD_KERNELS: the runtime's kernel choice when it is given none is the defaults with the entry of
    the card it runs on, matched by the CUDA device's name; other cards and the CPU take the defaults, and
    experiments.bench's ``@nocard`` gives a card the defaults back. This machine has no GPU: the device is the one
    boundary stood in for (torch.cuda.is_available, get_device_name); with none, CUDA takes the defaults."""
    import dataclasses

    from experiments.bench import KERNEL_VARIANTS
    from quant.runtime.schemes import base

    assert base.card_kernels(torch.device("cpu")) == (None, base.DEFAULT_KERNELS)
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert base.card_kernels(cuda) == (None, base.DEFAULT_KERNELS)  # (the caller refuses it: check_cuda)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert base.card_kernels(cuda) == (None, base.DEFAULT_KERNELS)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    card, config = base.card_kernels(cuda)
    assert card == "H100 80GB HBM3" and config != base.DEFAULT_KERNELS
    assert config.norm_prologue == config.attn_pdl == {"W4A16_AWQ", "W8A16", "W8A8_SQ_PER_CHANNEL"}  # FP8 not
    for name, fields in base.CARD_KERNELS:  # each entry is a valid configuration that @nocard undoes
        changed = dataclasses.replace(base.DEFAULT_KERNELS, **fields)
        assert changed != base.DEFAULT_KERNELS, name
        assert dataclasses.replace(changed, **KERNEL_VARIANTS["nocard"]) == base.DEFAULT_KERNELS


def test_the_extension_build_folder_names_code_torch_cuda_and_gpus(monkeypatch):
    """cuda_ext.load imports a finished build from this folder without building (experiments/gpu/ext_carry.sh
    carries one between machines), so its name must change with anything that changes the build, and must be a name
    the device tool carries as is. TORCH_CUDA_ARCH_LIST stands in for the GPUs: this machine has none."""
    import string

    from quant.codehash import code_hash
    from quant.runtime import cuda_ext

    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0+PTX")
    key = cuda_ext.build_key()
    assert set(key) <= set(string.ascii_letters + string.digits + ".-_")
    assert key.endswith("-9.0_PTX-" + code_hash("quant.runtime.cuda_ext"))
    assert key.startswith(f"torch{torch.__version__.replace('+', '_')}-cuda{torch.version.cuda}-")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0")
    assert cuda_ext.build_key() != key


def test_the_extension_links_the_shared_cxx_runtime_where_the_toolchain_would_not(tmp_path):
    """cuda_ext.load links libstdc++ as the shared library PyTorch uses (cuda_ext.SHARED_CXX_RUNTIME). The lent GPU
    image's toolchain linked the archive in instead, and every refusal of a binding then killed the process. Here
    ``-static-libstdc++`` stands in for that toolchain: a tiny extension built with it and our flags must raise its
    TORCH_CHECK as a RuntimeError whose message still has its number (a second, uninitialised runtime's iostreams
    drop it) and must need libstdc++.so.6. A real build with this machine's compiler (~20 s)."""
    import shutil
    import subprocess

    import pytest
    from torch.utils import cpp_extension

    from quant.runtime import cuda_ext

    if shutil.which("c++") is None:
        pytest.skip("no C++ compiler on this machine")
    source = 'int64_t refuse(int64_t x) { TORCH_CHECK(x < 3, "rows 1-2; got ", x); return x; }'
    m = cpp_extension.load_inline(
        "cxx_runtime_probe", cpp_sources=source, functions=["refuse"], build_directory=str(tmp_path),
        extra_ldflags=["-static-libstdc++"] + cuda_ext.SHARED_CXX_RUNTIME)
    assert m.refuse(2) == 2
    with pytest.raises(RuntimeError, match="rows 1-2; got 7"):
        m.refuse(7)
    needed = subprocess.run(["readelf", "-d", str(tmp_path / "cxx_runtime_probe.so")], capture_output=True, text=True)
    assert "libstdc++.so.6" in needed.stdout


def test_attention_trace_summary_reads_phases_gaps_and_clock_from_stamps():
    """experiments.attn_bench --trace's table from stamps made here (the traced kernel runs on the GPU only: its
    stamps are inline PTX, which Triton's interpreter does not run): two calls of two programs, the second program
    of each call the combining one; times from the call's first entry, steps from the phase before, the gap between
    the calls, the clock's rate from the cycles."""
    import torch

    from experiments.attn_bench import trace_summary

    phases = ("entry", "slot", "q", "kv", "counter", "combined")
    ns = torch.tensor([[[1000, 1500, 1700, 3000, 3500, 0], [1100, 1600, 1800, 3100, 3600, 4000]],
                       [[5000, 5400, 5600, 6900, 7400, 0], [5040, 5500, 5640, 7000, 7600, 8200]]])
    clk = torch.where(ns > 0, 2 * (ns - 900) + 77, 0)  # a 2 GHz clock, started elsewhere
    t = trace_summary(torch.stack([ns, clk], dim=-1)[None], phases)
    assert (t["replays"], t["calls"], t["programs"]) == (1, 2, 2)
    rows = {r["phase"]: r for r in t["rows"]}
    assert rows["entry"]["from_start_ns"][2] == 100 and rows["combined"]["programs"] == 2
    assert rows["combined"]["from_start_ns"][2] == 3200 and rows["combined"]["step_ns"][0] == 500
    assert rows["slot"]["step_ns"][0] == 480 and rows["slot"]["step_cycles"][0] == 960  # 400, 460, 500, 500
    assert t["gap_ns"] == [1000.0, 1000.0] and t["span_ns"][0] == 3100
    assert abs(t["clock_ghz"] - 2.0) < 1e-9 and t["timer_step_ns"] == 40


def test_cutlass_prefill_layout_and_what_it_takes():
    """cuda_ext.pack_int4_cutlass writes CUTLASS's int4b_t along K (csrc/cutlass/wq_gemm.cuh): two k a byte, the
    even one in the low nibble, two's complement; each (q0, q1) pair checked byte for byte against that rule, every
    int4 value at both nibbles. wq_gemm_ok keeps to the kernel's contract: float16, 16-byte rows for TMA (K % 16
    for int8, % 32 for int4; N % 8), one scale a channel or groups of a multiple of the 64-k tile."""
    from quant.runtime.cuda_ext import pack_int4_cutlass, wq_gemm_ok

    values = torch.arange(-8, 8, dtype=torch.int8)
    q = torch.stack((values.repeat_interleave(16), values.repeat(16)), dim=1).reshape(2, 256)  # every (q0, q1)
    p = pack_int4_cutlass(q)
    assert p.dtype == torch.int8 and p.shape == (2, 128)
    want = [((hi & 0xF) << 4) | (lo & 0xF) for lo, hi in q.reshape(-1, 2).tolist()]
    assert p.view(torch.uint8).reshape(-1).tolist() == want
    assert pack_int4_cutlass(torch.tensor([[1, -2]])).tolist() == [[-31]]  # 0xE1: -2 high, 1 low
    f16 = torch.float16
    assert wq_gemm_ok(960, 576, 576, f16, 8) and wq_gemm_ok(4096, 4096, 128, f16, 4)
    assert wq_gemm_ok(4096, 576, 64, f16, 4)
    assert not wq_gemm_ok(960, 576, 576, torch.bfloat16, 8)  # (one instantiation: float16)
    assert not wq_gemm_ok(4096, 4096, 32, f16, 4)  # groups smaller than the kernel's K tile
    assert not wq_gemm_ok(4096, 4104, 4104, f16, 8) and not wq_gemm_ok(4100, 4096, 4096, f16, 8)
    assert not wq_gemm_ok(4096, 4112, 4112, f16, 4)  # int4 rows of 2056 bytes: not whole 16 bytes
