"""The tensor-core kernels' layouts (quant/runtime/cuda_ext.py pack_w4m / pack_w8m, csrc/w4a16_mma.cu / w8_mma.cu),
checked on the CPU: the packings round-trip, and a lane-by-lane reading of the packed words and activations as the
kernels read them — INT4's dequantization bit for bit (tests/test_w4g_layout.py's reading of dequant_word), its scale
load, W8A16's byte permute, the PTX ISA's fragment tables of mma.m16n8k16 and m16n8k32 (written here from the ISA,
not from the packing code), and the accumulators' store — gives x · wᵀ for every output channel. The kernels
themselves run in tests/test_cuda.py."""
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from quant.runtime import cuda_ext
from tests.test_w4g_layout import _byte_perm, _kernel_dequant


def _rand(n: int, k: int, group: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(-8, 8, (n, k), generator=gen, dtype=torch.int8)
    q[0, :16] = torch.arange(-8, 8)  # every value at every position of a step
    s = (torch.rand(n, k // group, generator=gen) * 0.02 + 0.001).to(torch.float16)
    return q, s


def test_pack_round_trips_and_packs_in_steps():
    q, s = _rand(192, 96, 32, 0)
    w, sp = cuda_ext.pack_w4m(q, s)
    assert w.dtype == torch.int32 and w.shape == (3, 6, 32, 4) and sp.shape == (3, 3, 8, 8)
    q2, s2 = cuda_ext.unpack_w4m(w, sp)
    assert torch.equal(q2, q) and torch.equal(s2, s)
    w1, sp1 = cuda_ext.pack_w4m(q, s, tiles_per_step=1)
    assert torch.equal(w1, w) and torch.equal(sp1, sp)


def _tile_row(t: int, col: int, n: int) -> int:
    """The weight row column col of tile t holds (csrc/mma_common.cuh tile_row, restated)."""
    return 32 * t + col if col < 32 else n // 2 + 32 * t + col - 32


def _emulate(x: np.ndarray, w: np.ndarray, s: np.ndarray, group: int) -> np.ndarray:
    """The kernel's sums in float64, lane by lane, through the PTX ISA's m16n8k16 fragment tables (groupID g = l // 4,
    threadID_in_group c = l % 4; a .f16x2 register holds its lower-indexed element in its low half), written here
    from the ISA and not from the packing code:

    - A (the weights, 16 columns x 16 k): a0, a1 at row g, k 2c, 2c + 1; a2, a3 row g + 8; a4, a5 row g, k 2c + 8,
      2c + 9; a6, a7 row g + 8. The kernel's word i is the A operand of columns 16 i .., its registers dequant_word's
      pairs in order, each times its row's scale (row g: half 2 i of the lane's 16-byte scale load [t][group][g];
      row g + 8: half 2 i + 1), rounded to float16 (__hmul2).
    - B (the activations, 16 k x 8 rows, load_b): b0, b1 at k 2c, 2c + 1 of column (activation row) g; b2, b3 at
      k 2c + 8, 2c + 9.
    - C (16 x 8): c0, c1 at row g, columns 2c, 2c + 1; c2, c3 at row g + 8; the kernel stores c[e] of MMA (i, r) at
      red[activation row 8 r + 2c + e % 2][column 16 i + 8 (e // 2) + g].
    Column col of tile t is weight row _tile_row(t, col, N)."""
    tiles, steps = w.shape[:2]
    n, m = 64 * tiles, x.shape[0]
    nb = -(-m // 8)
    xp = np.zeros((8 * nb, x.shape[1]), dtype=np.float16)
    xp[:m] = x
    y = np.zeros((m, n))
    words = w.view(np.uint32)
    for t in range(tiles):
        d = np.zeros((4, nb, 16, 8))  # the float32 accumulators of MMA (i, r), as 16 x 8 matrices
        for ks in range(steps):
            grp = 16 * ks // group
            a = np.zeros((4, 16, 16))
            b = np.zeros((nb, 16, 8))
            for lane in range(32):
                g, c = lane // 4, lane % 4
                for i in range(4):
                    regs = np.array(_kernel_dequant(words[t, ks, lane, i])).reshape(4, 2)  # a0a1, a2a3, a4a5, a6a7
                    for reg, (row, kk) in enumerate(((g, 2 * c), (g + 8, 2 * c), (g, 2 * c + 8), (g + 8, 2 * c + 8))):
                        scale = np.float16(s[t, grp, g, 2 * i + (row >= 8)])
                        for e in range(2):
                            a[i, row, kk + e] = np.float16(np.float16(regs[reg, e]) * scale)
                for r in range(nb):
                    for reg, kk in enumerate((2 * c, 2 * c + 8)):  # b0b1, b2b3 of column g
                        for e in range(2):
                            b[r, kk + e, g] = xp[8 * r + g, 16 * ks + kk + e]
            d += np.einsum("ijk,rkl->irjl", a, b)
        red = np.zeros((8 * nb, 64))
        for lane in range(32):
            g, c = lane // 4, lane % 4
            for i in range(4):
                for r in range(nb):
                    frag = (d[i, r, g, 2 * c], d[i, r, g, 2 * c + 1], d[i, r, g + 8, 2 * c], d[i, r, g + 8, 2 * c + 1])
                    for e in range(4):
                        red[8 * r + 2 * c + e % 2, 16 * i + 8 * (e // 2) + g] = frag[e]
        for col in range(64):
            y[:, _tile_row(t, col, n)] = red[:m, col]
    return y


@pytest.mark.parametrize("n, k, group, m", [(128, 64, 32, 3), (192, 96, 16, 11), (64, 256, 128, 20)])
def test_fragments_read_as_the_kernel_reads_them_give_the_product(n, k, group, m):
    q, s = _rand(n, k, group, n + k)
    w, sp = cuda_ext.pack_w4m(q, s)
    x = np.random.default_rng(k).standard_normal((m, k)).astype(np.float16)
    # the float16 dequantized weight (q · s rounded once), as the kernel's __hmul2 makes it
    wd = (q.float() * s.float().repeat_interleave(group, dim=1)).to(torch.float16).double().numpy()
    ref = x.astype(np.float64) @ wd.T
    got = _emulate(x, w.numpy(), sp.numpy(), group)
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12)


def test_what_the_tensor_core_kernel_takes():
    f16 = torch.float16
    assert cuda_ext.w4m_ok(576, 576, 64, f16) and cuda_ext.w4m_ok(960, 1536, 16, f16)
    assert not cuda_ext.w4m_ok(96, 512, 64, f16)  # N not a multiple of 64
    assert not cuda_ext.w4m_ok(128, 520, 8, f16)  # K not a multiple of 16 / group below 16
    assert not cuda_ext.w4m_ok(128, 576, 128, f16)  # the group does not divide K
    assert not cuda_ext.w4m_ok(128, 512, 64, torch.bfloat16)


def test_kernel_config_refuses_rows_or_depth_the_kernel_lacks():
    from experiments.bench import KERNEL_VARIANTS
    from quant.runtime.schemes.base import DEFAULT_KERNELS, KernelConfig

    assert DEFAULT_KERNELS.w4m_rows == (2, 16)  # timed end to end: the GEMV keeps batch 1
    with pytest.raises(ValueError, match="w4m_rows must be"):
        KernelConfig(w4m_rows=(1, 33))
    with pytest.raises(ValueError, match="w4m_depth must be 4, or 8 with w4m_rows up to 8"):
        KernelConfig(w4m_rows=(1, 16), w4m_depth=8)
    with pytest.raises(ValueError, match="w4m_depth must be"):
        KernelConfig(w4m_depth=6)
    for name in ("w4m", "w4m1", "w4m8", "now4m", "w8m", "w8m4"):  # the benchmark's variants are valid configurations
        KernelConfig(**KERNEL_VARIANTS[name])
    assert not DEFAULT_KERNELS.w8m  # off until timed end to end
    with pytest.raises(ValueError, match="w8m takes the 8-bit formats"):
        KernelConfig(w8m=frozenset({"W4A16_AWQ"}))
    with pytest.raises(ValueError, match="w8m_depth must be one of"):
        KernelConfig(w8m_depth=3)


# -- the 8-bit formats' tensor-core kernel (csrc/w8_mma.cu, cuda_ext.pack_w8m) ----------------------------------------
# to_half2's byte-permute selectors for bytes 0-1 and 2-3, as the kernel's source has them
W8A16_SELECTORS = tuple(int(s, 16) for s in reversed(re.search(
    r"__byte_perm\(v, 0x64646464u, half \? (0x[0-9a-fA-F]+) : (0x[0-9a-fA-F]+)\)",
    (Path(cuda_ext.__file__).parent / "csrc" / "w8_mma.cu").read_text()).groups()))
def _emulate_w8(x: np.ndarray, packed: np.ndarray, fmt: str) -> np.ndarray:
    """csrc/w8_mma.cu's sums x · wᵀ (before the scale) in float64, lane by lane (one group of 8 rows). m16 tile i of
    a step gives lane (g, c) the 16 bytes wv = words (x, y, z, w), converted as the kernel's to_half2 does. W8A8: the PTX ISA's mma.m16n8k32 .s8 fragments —
    A: a0..a3 row g, k 4c + j; a4..a7 row g + 8; a8..a11 row g, k 16 + 4c + j; a12..a15 row g + 8 (so the words in
    order); B: b0..b3 k 4c + j of column g, b4..b7 k 16 + 4c + j. W8A16 / FP8: two mma.m16n8k16, MMA h with the
    registers {bytes 0-1 of word 2h, of word 2h + 1, bytes 2-3 of word 2h, of word 2h + 1} as the ISA's a0a1 (row g, k
    2c, 2c + 1), a2a3 (row g + 8), a4a5 (row g, k 8 + 2c, ..), a6a7 (row g + 8), and B b0b1 (k 2c, 2c + 1 of column
    g) = x at 16h + 4c, + 1, b2b3 (k 8 + 2c, ..) = x at 16h + 4c + 2, + 3. The C fragment and the tile's store are
    the INT4 kernel's (mma_common.cuh; _emulate above)."""
    tiles, steps = packed.shape[:2]
    n = 64 * tiles
    vals = packed.astype(np.int8).astype(np.int64)  # W8A8: the bytes as they are
    words = np.ascontiguousarray(packed).view(np.uint32)  # [.., 4] little-endian: byte j of word w is k 4c + j

    def to_half2(word: int, half: int) -> list[float]:
        """csrc/w8_mma.cu to_half2, bit for bit: W8A16 __byte_perm(word, 0x64646464, 0x5140 / 0x7362) as float16
        pair minus 1152; FP8 the e4m3 bytes of the low / high 16 bits."""
        if fmt == "W8A16":
            bits = _byte_perm(int(word), 0x64646464, W8A16_SELECTORS[half])
            pair = np.array([bits], dtype=np.uint32).view(np.float16) - np.float16(1152)
            return [float(v) for v in pair]
        two = torch.tensor([(int(word) >> (16 * half + 8 * j)) & 0xFF for j in range(2)], dtype=torch.uint8)
        return two.view(torch.float8_e4m3fn).double().tolist()
    m = x.shape[0]
    xp = np.zeros((8, x.shape[1]))
    xp[:m] = x
    y = np.zeros((m, n))
    for t in range(tiles):
        tile = np.zeros((64, 8))  # [column, activation row]
        for ks in range(steps):
            for i in range(4):
                if fmt == "W8A8_SQ_PER_CHANNEL":
                    mmas = [(np.zeros((16, 32)), np.zeros((32, 8)))]
                else:
                    mmas = [(np.zeros((16, 16)), np.zeros((16, 8))) for _ in range(2)]
                for lane in range(32):
                    g, c = lane // 4, lane % 4
                    word = vals[t, ks, i, lane].reshape(4, 4)  # [word, byte]
                    raw = words[t, ks, i, lane]
                    row = xp[g, 32 * ks:32 * ks + 32]
                    if fmt == "W8A8_SQ_PER_CHANNEL":
                        a, b = mmas[0]
                        for reg, (r, k) in enumerate(((g, 4 * c), (g + 8, 4 * c), (g, 16 + 4 * c), (g + 8, 16 + 4 * c))):
                            a[r, k:k + 4] = word[reg]
                        b[4 * c:4 * c + 4, g] = row[4 * c:4 * c + 4]
                        b[16 + 4 * c:16 + 4 * c + 4, g] = row[16 + 4 * c:16 + 4 * c + 4]
                        continue
                    for h, (a, b) in enumerate(mmas):
                        regs = (to_half2(raw[2 * h], 0), to_half2(raw[2 * h + 1], 0), to_half2(raw[2 * h], 1),
                                to_half2(raw[2 * h + 1], 1))
                        for reg, (r, k) in enumerate(((g, 2 * c), (g + 8, 2 * c), (g, 8 + 2 * c), (g + 8, 8 + 2 * c))):
                            a[r, k:k + 2] = regs[reg]
                        b[2 * c:2 * c + 2, g] = row[16 * h + 4 * c:16 * h + 4 * c + 2]
                        b[8 + 2 * c:8 + 2 * c + 2, g] = row[16 * h + 4 * c + 2:16 * h + 4 * c + 4]
                for a, b in mmas:
                    tile[16 * i:16 * i + 16] += a @ b
        for col in range(64):
            y[:, _tile_row(t, col, n)] = tile[col, :m]
    return y


@pytest.mark.parametrize("fmt", ["W8A16", "W8A8_SQ_PER_CHANNEL", "FP8"])
def test_w8m_fragments_read_as_the_kernel_reads_them_give_the_product(fmt):
    gen = torch.Generator().manual_seed(len(fmt))
    n, k, m = 128, 96, 5
    if fmt == "FP8":
        w = (torch.randn(n, k, generator=gen) * 40).to(torch.float8_e4m3fn)
        x = (torch.randn(m, k, generator=gen) * 40).to(torch.float8_e4m3fn)
    else:
        w = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
        w[0, :32] = torch.tensor([-128, 127] * 16, dtype=torch.int8)  # both ends at every byte position
        x = (torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8) if fmt != "W8A16"
             else torch.randn(m, k, generator=gen).half())
    packed = cuda_ext.pack_w8m(w, fmt)
    assert packed.shape == (2, 3, 4, 32, 16) and packed.dtype == torch.uint8
    assert torch.equal(cuda_ext.unpack_w8m(packed, fmt), w.view(torch.uint8))
    got = _emulate_w8(x.double().numpy(), packed.numpy(), fmt)
    np.testing.assert_allclose(got, x.double().numpy() @ w.double().numpy().T, rtol=1e-12, atol=1e-9)
