"""The tensor-core INT4 kernel's layout (quant/runtime/cuda_ext.py pack_w4m, csrc/w4a16_mma.cu), checked on the CPU:
the packing round-trips, and a lane-by-lane reading of the packed words and activations as the kernel reads them —
its dequantization bit for bit (tests/test_w4g_layout.py's reading of dequant_word), its scale load, the PTX ISA's
fragment tables of mma.m16n8k16's A, B and C operands (written here from the ISA, not from the packing code), and
the kernel's store of the accumulators — gives x · (q · s)ᵀ for every output channel, over 1–3 groups of 8 rows. The
kernel itself runs in tests/test_cuda.py."""
import numpy as np
import pytest
import torch

from quant.runtime import cuda_ext
from tests.test_w4g_layout import _kernel_dequant


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
    Column col of a tile t is weight row 32 t + col below 32, else N / 2 + 32 t + col - 32."""
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
            row = 32 * t + col if col < 32 else n // 2 + 32 * t + col - 32
            y[:, row] = red[:m, col]
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

    assert DEFAULT_KERNELS.w4m_rows is None  # off until timed end to end
    with pytest.raises(ValueError, match="w4m_rows must be"):
        KernelConfig(w4m_rows=(1, 33))
    with pytest.raises(ValueError, match="w4m_depth must be 4, or 8 with w4m_rows up to 8"):
        KernelConfig(w4m_rows=(1, 16), w4m_depth=8)
    with pytest.raises(ValueError, match="w4m_depth must be"):
        KernelConfig(w4m_depth=6)
    for name in ("w4m", "w4m1", "w4m8"):  # the benchmark's variants are valid configurations
        KernelConfig(**KERNEL_VARIANTS[name])
