"""The runtime's compiled CUDA kernels (``csrc/``), built once per machine with PyTorch's extension builder.

:func:`w4a16_gemv` is the INT4 (W4A16) decode GEMV for 1–4 rows on a copy of the weights reordered at load
(:func:`pack_w4g`): each lane streams 16 bytes of weights per load and turns them into float16 pairs in registers
with one LOP3 per pair (``csrc/w4a16_gemv.cu`` states its layout and precision contract). :func:`w8_gemv` is the
8-bit one (W8A16, SmoothQuant W8A8, FP8) on the checkpoint's own [N, K] layout: 16 weights per load, widened to
float32 in registers (int32 DP4A sums for W8A8; ``csrc/w8_gemv.cu``).

The build needs ``nvcc`` and ``ninja`` (the CUDA toolkit); it is cached under the suite's cache folder, keyed on the
contents of ``csrc/`` and by PyTorch on the compiler flags, so a machine compiles it once and an edited source
recompiles. Where it cannot be built, :func:`load` says why and the handlers keep their Triton / tinygemm kernels.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

from quant import quiet
from quant.codehash import code_hash
from quant.paths import cache_root

CSRC = Path(__file__).parent / "csrc"
__code_files__ = ("csrc/*",)  # cache keys of results this code measured cover the CUDA sources (quant.codehash)
# (weight rows per warp, 16-byte chunks per lane in flight), both GEMVs: the launchers' tile index is the position
GEMV_TILES = ((1, 2), (1, 4), (2, 2), (2, 4), (4, 1), (4, 2))
W4G_TILE = (2, 4)  # the fastest at 1 row on the 7B and 8B shapes (experiments/results/gpu/kernels)
W8_FORMATS = {"W8A16": 0, "W8A8_SQ_PER_CHANNEL": 1, "FP8": 2}  # algo key → the kernel's format (csrc/w8_gemv.cu)
# per 8-bit format, the fastest tile at 1 row on the 7B shape (experiments/results/gpu/kernels, 2026-12-04 sweep)
W8G_TILES = {"W8A16": (1, 2), "W8A8_SQ_PER_CHANNEL": (2, 2), "FP8": (2, 2)}
GEMV_MAX_ROWS = 4
_NIBBLE_K = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble p of a word holds k offset _NIBBLE_K[p] (the kernel's dequantization)
_NONE = torch.empty(0)  # "no pre-quant scale" / "no then tensor" to the binding
THEN_NONE, THEN_SILU, THEN_NORM = 0, 1, 2  # csrc/gemv_then.h's Then (cuda_kernels' THEN_* the same)
# quantized activations' dtype per format code (csrc/gemv_then.h's afmt; cuda_kernels' A_INT8 / A_FP8)
ACT_QUANT_DTYPE = {1: torch.int8, 2: torch.float8_e4m3fn}


@functools.cache
def load():
    """The compiled module, or the one-line reason it is not available (a ``str``)."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    # keyed on this code with csrc/ (__code_files__): PyTorch re-keys on the listed sources, not on their header
    build = (cache_root() / "torch-extensions" /
             f"torch{torch.__version__}-cuda{torch.version.cuda}-{code_hash('quant.runtime.cuda_ext')}")
    try:
        from torch.utils import cpp_extension

        build.mkdir(parents=True, exist_ok=True)
        with quiet.held("torch.utils.cpp_extension"):  # the compiler's output shows with -v
            return cpp_extension.load(
                name="quant_cuda_gemv",
                sources=[str(CSRC / f) for f in ("bindings.cpp", "w4a16_gemv.cu", "w8_gemv.cu")],
                build_directory=str(build), extra_cuda_cflags=["-O3", "-lineinfo"] + _arch_flags(),
                extra_cflags=["-O3"], verbose=False)
    except Exception as exc:  # no toolkit, no compiler, a failed build: the reason, and the other kernels run
        last = (str(exc).strip().splitlines() or [""])[-1][:200]
        return f"the CUDA extension could not be built ({type(exc).__name__}: {last})"


def _arch_flags() -> list[str]:
    """This machine's GPUs' own instructions (sm_90 on an H200), unless TORCH_CUDA_ARCH_LIST says otherwise."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return []
    caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    return [f"-gencode=arch=compute_{a}{b},code=sm_{a}{b}" for a, b in caps]


def w4g_ok(inp: int, group: int, dtype: torch.dtype) -> bool:
    """Whether the GEMV takes this linear: float16, K a multiple of 32, group a power of two ≥ 32."""
    return dtype == torch.float16 and inp % 32 == 0 and group >= 32 and group & (group - 1) == 0 and inp % group == 0


def pack_w4g(q: torch.Tensor, rows_per_step: int = 1024) -> torch.Tensor:
    """int [N, K] in [-8, 7] → int32 words [N, K/8] in the kernel's nibble order (the inverse: :func:`unpack_w4g`).
    Packed ``rows_per_step`` rows at a time: the int64 temporaries stay ~30 MB per 1000 columns, not 24x the
    weight's bytes at once (GBs for an 8B model's MLP on the GPU)."""
    def pack(part: torch.Tensor) -> torch.Tensor:
        u = (part.to(torch.int64) + 8).reshape(part.shape[0], -1, 8)[..., list(_NIBBLE_K)]
        words = (u << (4 * torch.arange(8, device=q.device))).sum(-1)
        return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)

    return torch.cat([pack(part) for part in q.split(rows_per_step)]).contiguous()


def unpack_w4g(w: torch.Tensor) -> torch.Tensor:
    n, kw = w.shape
    u = (w.to(torch.int64) & 0xFFFFFFFF).unsqueeze(-1) >> (4 * torch.arange(8, device=w.device)) & 0xF
    out = torch.empty_like(u)
    out[..., list(_NIBBLE_K)] = u
    return (out - 8).reshape(n, kw * 8).to(torch.int8)


def _then(x: torch.Tensor, n: int, residual, then_silu: bool, then_norm, counter, eps: float, then_quant):
    """(out, the binding's then arguments, what to return) for the epilogue's work for the next linear: as
    ``cuda_kernels.gemv``'s then_silu / then_norm / then_quant (one row; then_norm with residual and counter)."""
    pre, a, afmt = then_quant or (None, None, 0)
    if not then_silu and then_norm is None:
        assert then_quant is None
        out = residual if residual is not None else torch.empty(x.shape[0], n, dtype=torch.float16, device=x.device)
        return out, (THEN_NONE, _NONE, _NONE, _NONE, eps, _NONE, _NONE, 0), out
    assert x.shape[0] == 1 and (residual is None if then_silu else residual is not None and counter is not None)
    xn = torch.empty(1, n // 2 if then_silu else n, dtype=ACT_QUANT_DTYPE.get(afmt, torch.float16), device=x.device)
    out = torch.empty(0, dtype=torch.float16, device=x.device) if then_silu else residual  # (silu: not written)
    return out, (THEN_SILU if then_silu else THEN_NORM, _NONE if then_norm is None else then_norm, xn,
                 _NONE if counter is None else counter, eps, _NONE if pre is None else pre,
                 _NONE if a is None else a, afmt), xn


def w4a16_gemv(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, *, group: int,
               residual: torch.Tensor | None = None, tile: tuple[int, int] = W4G_TILE,
               prequant: torch.Tensor | None = None, then_silu: bool = False, then_norm: torch.Tensor | None = None,
               counter: torch.Tensor | None = None, eps: float = 1e-6,
               then_quant: tuple | None = None, grid: int = 0) -> torch.Tensor:
    """x [M ≤ 4, K] float16 → x · (q · s)ᵀ [M, N]; added to ``residual`` in place (one rounding) when given.
    One row (:func:`fuses`) may bring the pre-quant scale: the input is then x · prequant, rounded as
    ``cuda_kernels.act_prep`` rounds it. One row may also end with the next linear's prologue, as
    ``cuda_kernels.gemv`` does: ``then_silu`` returns SiLU · gate of y's halves, ``then_norm`` (with residual
    and counter, one int32 zero left zero) RMSNorm(residual + y) · then_norm; ``then_quant`` (prequant or None,
    act_scale [1], 1 int8 / 2 e4m3) that result quantized for the next linear, as act_prep would. ``grid`` (one
    row only unless 0): 0 one block per row block; -1 the persistent kernel (KernelConfig.w4g_persistent) on as
    many blocks as the GPU holds at once; n > 0 on at most n blocks (the tests' way to give each block several row
    blocks). The same bits whichever."""
    mod = load()
    if isinstance(mod, str):
        raise RuntimeError(mod)
    out, then, ret = _then(x, w.shape[0], residual, then_silu, then_norm, counter, eps, then_quant)
    mod.w4a16_gemv(x, w, scales, group, out, residual is not None, GEMV_TILES.index(tuple(tile)),
                   _NONE if prequant is None else prequant, *then, grid)
    return ret


def grid(persistent: bool, rows: int) -> int:
    """The ``grid`` a handler passes to :func:`w4a16_gemv` / :func:`w8_gemv`: the persistent form on what the GPU
    holds at once (-1) where it is chosen and the call has one row (the kernels take it for one row only), else 0."""
    return -1 if persistent and rows == 1 else 0


def fuses(rows: int, inp: int) -> bool:
    """Whether the GEMV can apply the pre-quant scale itself: one row, staged whole in 48 KiB of shared memory."""
    return rows == 1 and inp * 2 <= 48 * 1024


def w8g_ok(inp: int, dtype: torch.dtype) -> bool:
    """Whether the 8-bit GEMV takes this linear: float16 output, K a multiple of 16 (16-byte rows)."""
    return dtype == torch.float16 and inp % 16 == 0


def w8_gemv(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, *, fmt: str,
            residual: torch.Tensor | None = None, tile: tuple[int, int] | None = None, then_silu: bool = False,
            then_norm: torch.Tensor | None = None, counter: torch.Tensor | None = None,
            eps: float = 1e-6, then_quant: tuple | None = None, grid: int = 0) -> torch.Tensor:
    """x [M ≤ 4, K] (float16 for W8A16; int8 / e4m3 quantized by act_prep for W8A8 / FP8), w [N, K] int8 or e4m3,
    scale [N] (float16 for W8A16, float32 for W8A8) or [1] (FP8, float32) → (x · wᵀ) · scale, float16 [M, N];
    added to ``residual`` in place (one rounding) when given. ``tile``: one of GEMV_TILES (None: the format's
    W8G_TILES entry). ``then_silu`` / ``then_norm`` / ``then_quant`` / ``grid`` (KernelConfig.w8g_persistent): as
    :func:`w4a16_gemv`'s."""
    mod = load()
    if isinstance(mod, str):
        raise RuntimeError(mod)
    out, then, ret = _then(x, w.shape[0], residual, then_silu, then_norm, counter, eps, then_quant)
    mod.w8_gemv(x, w, scale, W8_FORMATS[fmt], out, residual is not None,
                GEMV_TILES.index(tuple(tile or W8G_TILES[fmt])), *then, grid)
    return ret
