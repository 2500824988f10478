"""The runtime's compiled CUDA kernels (``csrc/``), built once per machine with PyTorch's extension builder.

:func:`w4a16_gemv` is the INT4 (W4A16) decode GEMV for 1–4 rows on a copy of the weights reordered at load
(:func:`pack_w4g`): each lane streams 16 bytes of weights per load and turns them into float16 pairs in registers
with one LOP3 per pair (``csrc/w4a16_gemv.cu`` states its layout and precision contract). :func:`w8_gemv` is the
8-bit one (W8A16, SmoothQuant W8A8, FP8) on the checkpoint's own [N, K] layout: 16 weights per load, widened to
float32 in registers (int32 DP4A sums for W8A8; ``csrc/w8_gemv.cu``). :func:`w4a16_mma` is INT4 (W4A16) for 1–32
rows on tensor cores, Marlin's way: a copy reordered at load (:func:`pack_w4m`) whose 16 bytes a lane are exactly its
MMA fragments, dequantized in registers, the K split across blocks (``csrc/w4a16_mma.cu``); :func:`w8_mma` the
8-bit formats the same way for 1–8 rows (:func:`pack_w8m`, ``csrc/w8_mma.cu``).

The build needs ``nvcc`` and ``ninja`` (the CUDA toolkit); it is cached under the suite's cache folder in a folder
named by :func:`build_key` (this code with ``csrc/``, PyTorch's and CUDA's versions, the GPUs), so a machine compiles
it once, later processes import it as it is, and an edited source recompiles. Where it cannot be built, :func:`load`
says why and the handlers keep their Triton / tinygemm kernels.
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
# cache keys of results this code measured cover the CUDA sources (quant.codehash)
__code_files__ = ("csrc/*", "csrc/cutlass/*")
# (weight rows per warp, 16-byte chunks per lane in flight), both GEMVs: the launchers' tile index is the position
GEMV_TILES = ((1, 2), (1, 4), (2, 2), (2, 4), (4, 1), (4, 2))
# the fastest tile at 1 row of the one-block-per-row-block form on the 7B and 8B shapes (experiments/results/gpu/
# kernels); the persistent form, the default, runs KernelConfig.w4g_tile's
W4G_TILE = (2, 4)
W8_FORMATS = {"W8A16": 0, "W8A8_SQ_PER_CHANNEL": 1, "FP8": 2}  # algo key → the kernel's format (csrc/w8_gemv.cu)
# per 8-bit format, the fastest tile at 1 row on the 7B shape (experiments/results/gpu/kernels, 2026-12-04 sweep)
W8G_TILES = {"W8A16": (1, 2), "W8A8_SQ_PER_CHANNEL": (2, 2), "FP8": (2, 2)}
GEMV_MAX_ROWS = 4
_NIBBLE_K = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble p of a word holds k offset _NIBBLE_K[p] (the kernel's dequantization)
_NONE = torch.empty(0)  # "no pre-quant scale" / "no then tensor" to the binding
THEN_NONE, THEN_SILU, THEN_NORM = 0, 1, 2  # csrc/gemv_then.h's Then (cuda_kernels' THEN_* the same)
# quantized activations' dtype per format code (csrc/gemv_then.h's afmt; cuda_kernels' A_INT8 / A_FP8)
ACT_QUANT_DTYPE = {1: torch.int8, 2: torch.float8_e4m3fn}
CUTLASS_VERSION = "4.2.0.0"  # the nvidia-cutlass package whose C++ headers load_cutlass builds against
# wq_gemm's tiles, T each instantiated by csrc/cutlass/wq_gemm_tT.cu (wq_gemm.h lists them): (weight channels,
# x rows, CTAs of a cluster along the channels), k 64. Wider in rows, the weight converted in registers feeds twice
# the MMAs.
WQ_GEMM_TILES = ((128, 128, 1), (128, 256, 1), (128, 256, 2))


# The C++ runtime linked as the shared library PyTorch itself uses, named by file so that no compiler spec or search
# order picks the archive. The lent GPU image's compiler (CXX=/opt/gcc/bin/g++) links libstdc++.a in: a build without
# this flag exported its own __cxa_throw and needed no libstdc++.so.6, and each refusal of a binding (TORCH_CHECK)
# killed the process with a segmentation fault (experiments/results/gpu/kernels/throw-probe-h100.txt). On a CPU
# machine such a build drops the numbers from a refusal's message; tests/test_w4g_layout.py builds that case.
SHARED_CXX_RUNTIME = ["-l:libstdc++.so.6"]


@functools.cache
def load():
    """The compiled module, or the one-line reason it is not available (a ``str``)."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    return _load("quant_cuda_gemv", build_key(), [CSRC / f for f in ("bindings.cpp", "w4a16_gemv.cu", "w4a16_mma.cu",
                                                                     "w8_gemv.cu", "w8_mma.cu")], _arch_flags())


@functools.cache
def load_cutlass():
    """The CUTLASS GEMMs' module (``csrc/cutlass``: :func:`wq_gemm`, :func:`sq_gemm`), or the one-line reason it is
    not available. Its own build (CUTLASS's templates take a minute or more to compile), made only where a
    KernelConfig asks for one (``wq_prefill_cutlass``, ``sq_prefill_gemm`` "cutlass"), for Hopper's sm_90a alone,
    with the headers of the ``nvidia-cutlass`` package."""
    from importlib import metadata

    if not torch.cuda.is_available():
        return "no CUDA device"
    if _capabilities() != [(9, 0)]:
        return f"the CUTLASS GEMMs are built for Hopper (sm_90a); these GPUs are {_capabilities()}"
    root = cutlass_root()
    if root is None:
        return f"CUTLASS's headers are not installed (pip install --no-deps nvidia-cutlass=={CUTLASS_VERSION})"
    try:
        version = metadata.version("nvidia-cutlass")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return _load("quant_cuda_cutlass", build_key(f"sm90a-cutlass{version}"),
                 [CSRC / "cutlass" / "bindings.cpp", *cutlass_sources()], cutlass_flags(root))


def cutlass_sources() -> list[Path]:
    """csrc/cutlass's kernel files: one per tile of :data:`WQ_GEMM_TILES`, and the SmoothQuant GEMM's (built in
    parallel: CUTLASS's templates are slow)."""
    return [*(CSRC / "cutlass" / f"wq_gemm_t{i}.cu" for i in range(len(WQ_GEMM_TILES))),
            CSRC / "cutlass" / "sq_gemm.cu"]


def cutlass_root() -> Path | None:
    """The ``nvidia-cutlass`` package's C++ sources (``include/``, ``tools/util/include``), or None without it."""
    import importlib.util

    spec = importlib.util.find_spec("cutlass_library")  # (found, not imported: it imports cuda-python)
    root = Path(next(iter(spec.submodule_search_locations or ()), "")) / "source" if spec else None
    return root if root is not None and (root / "include" / "cutlass" / "cutlass.h").is_file() else None


def cutlass_flags(root: Path) -> list[str]:
    """nvcc's flags for csrc/cutlass (also experiments/gpu/cuda_build_check.py's): Hopper's arch-specific sm_90a
    (wgmma, TMA), CUTLASS's headers."""
    return ["-gencode=arch=compute_90a,code=sm_90a", "-std=c++17", "--expt-relaxed-constexpr", "-DNDEBUG",
            f"-I{root / 'include'}", f"-I{root / 'tools' / 'util' / 'include'}"]


def _load(name: str, key: str, sources: list[Path], cuda_flags: list[str]):
    """Extension ``name`` from its build folder ``key`` under the cache, built there from ``sources`` first where
    it is not (or does not import); or the one-line reason it cannot be built."""
    # keyed on this code with csrc/ (__code_files__; PyTorch re-keys on the listed sources, not on their headers),
    # PyTorch's and CUDA's versions and the target GPUs: a folder holds one build of one code for one machine kind
    build = cache_root() / "torch-extensions" / key
    built = build / f"{name}.so"
    # finished by an earlier process, or carried from a machine of the same key (experiments/gpu/ext_carry.sh);
    # not while another process builds it (PyTorch's lock file), and one that does not import goes to the builder
    if built.is_file() and not (build / "lock").exists():
        try:
            return _import(name, built)
        except ImportError:
            pass
    try:
        from torch.utils import cpp_extension

        build.mkdir(parents=True, exist_ok=True)
        with quiet.held("torch.utils.cpp_extension"):  # the compiler's output shows with -v
            return cpp_extension.load(name=name, sources=[str(f) for f in sources], build_directory=str(build),
                                      extra_cuda_cflags=["-O3", "-lineinfo"] + cuda_flags, extra_cflags=["-O3"],
                                      extra_ldflags=SHARED_CXX_RUNTIME, verbose=False)
    except Exception as exc:  # no toolkit, no compiler, a failed build: the reason, and the other kernels run
        last = (str(exc).strip().splitlines() or [""])[-1][:200]
        return f"the CUDA extension {name} could not be built ({type(exc).__name__}: {last})"


def build_key(arch: str | None = None) -> str:
    """The build folder's name: this code with ``csrc/``, PyTorch's and CUDA's versions, the target GPUs (``arch``,
    else TORCH_CUDA_ARCH_LIST or this machine's; letters, digits, '.', '-' and '_' alone)."""
    arch = arch or os.environ.get("TORCH_CUDA_ARCH_LIST") or "-".join(f"sm{a}{b}" for a, b in _capabilities())
    key = f"torch{torch.__version__}-cuda{torch.version.cuda}-{arch}-{code_hash('quant.runtime.cuda_ext')}"
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in key)  # a name the device tool carries as is


def _import(name: str, path: Path):
    """The built module from its file, as PyTorch's loader imports it (torch's libraries already loaded)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _built(load=load):
    """The compiled module (``load``: which build); where it is not available, a RuntimeError with its reason."""
    mod = load()
    if isinstance(mod, str):
        raise RuntimeError(mod)
    return mod


def _arch_flags() -> list[str]:
    """This machine's GPUs' own instructions (sm_90 on an H200), unless TORCH_CUDA_ARCH_LIST says otherwise."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return []
    return [f"-gencode=arch=compute_{a}{b},code=sm_{a}{b}" for a, b in _capabilities()]


def _capabilities() -> list[tuple[int, int]]:
    return sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})


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


MMA_TILE = 64  # output channels per tile of the tensor-core kernels (csrc/mma_common.cuh TILE)
W4M_MAX_ROWS = 32
W4M_DEPTHS = (4, 8)  # steps loaded ahead per warp it is built for (8: up to 8 rows)


def tile_counter(out: int, device) -> torch.Tensor:
    """The int32 zeros a tensor-core kernel's K split counts on, one per tile (``tile_counter=``; left zero)."""
    return torch.zeros(out // MMA_TILE, dtype=torch.int32, device=device)


def w4m_ok(out: int, inp: int, group: int, dtype: torch.dtype) -> bool:
    """Whether the tensor-core kernel takes this linear: float16, N a multiple of 64, K of 16, group a power of two
    ≥ 16 that divides K."""
    return (dtype == torch.float16 and out % MMA_TILE == 0 and inp % 16 == 0 and group >= 16
            and group & (group - 1) == 0 and inp % group == 0)


def mma_tile_rows(n: int, device=None) -> torch.Tensor:
    """The weight row each (tile, column) of the tensor-core kernels' layouts holds, flat [N]: tile t takes rows
    32t..32t+31, then N/2 + 32t..N/2 + 32t + 31, so that fc‖gate's SiLU · gate pairs meet in one tile
    (csrc/mma_common.cuh's tile_row)."""
    t = torch.arange(n // MMA_TILE, device=device).unsqueeze(1)
    c = torch.arange(32, device=device)
    return torch.cat((32 * t + c, n // 2 + 32 * t + c), dim=1).reshape(-1)


def pack_w4m(q: torch.Tensor, scales: torch.Tensor, tiles_per_step: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """int q [N, K] in [-8, 7] and scales [N, K / group] → (int32 [N/64, K/16, 32, 4], float16 [N/64, K/group, 8, 8])
    in the tensor-core kernel's layout (csrc/w4a16_mma.cu states it; the inverse: :func:`unpack_w4m`). Packed
    ``tiles_per_step`` tiles at a time, so the int64 temporaries stay small."""
    n, k = q.shape
    rows = mma_tile_rows(n, q.device)

    # [tile, i, o, g | ks, h, c, p]: column 16 i + 8 o + g of the tile, k = 16 ks + 8 h + 2 c + p
    def pack(part: torch.Tensor) -> torch.Tensor:
        u = (part.to(torch.int64) + 8).reshape(-1, 4, 2, 8, k // 16, 2, 4, 2)
        # → [tile, ks, g, c, i, p, h, o]: lane 4 g + c, word i, nibble 4 p + 2 h + o
        u = u.permute(0, 4, 3, 6, 1, 7, 5, 2).reshape(-1, k // 16, 32, 4, 8)
        words = (u << (4 * torch.arange(8, device=q.device))).sum(-1)
        return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)

    w = torch.cat([pack(q[part]) for part in rows.split(tiles_per_step * MMA_TILE)]).contiguous()
    g = scales.shape[1]  # [tile, i, o, g, group] → [tile, group, g, (i, o)]
    s = scales[rows].to(torch.float16).reshape(n // MMA_TILE, 4, 2, 8, g).permute(0, 4, 3, 1, 2)
    return w, s.reshape(n // MMA_TILE, g, 8, 8).contiguous()


def unpack_w4m(w: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of :func:`pack_w4m`: (int8 q [N, K], float16 scales [N, K / group])."""
    tiles, steps = w.shape[:2]
    n, groups = tiles * MMA_TILE, s.shape[1]
    u = (w.to(torch.int64) & 0xFFFFFFFF).unsqueeze(-1) >> (4 * torch.arange(8, device=w.device)) & 0xF
    u = u.reshape(tiles, steps, 8, 4, 4, 2, 2, 2).permute(0, 4, 7, 2, 1, 6, 3, 5).reshape(n, steps * 16)
    rows = mma_tile_rows(n, w.device)
    q = torch.empty_like(u)
    q[rows] = u - 8
    sc = torch.empty(n, groups, dtype=s.dtype, device=s.device)
    sc[rows] = s.reshape(tiles, groups, 8, 4, 2).permute(0, 3, 4, 2, 1).reshape(n, groups)
    return q.to(torch.int8), sc


def w4a16_mma(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, *, group: int, tile_counter: torch.Tensor,
              residual: torch.Tensor | None = None, splits: int = 0, depth: int = 4,
              prequant: torch.Tensor | None = None, then_silu: bool = False, then_norm: torch.Tensor | None = None,
              counter: torch.Tensor | None = None, eps: float = 1e-6, then_quant: tuple | None = None) -> torch.Tensor:
    """x [M ≤ 32, K] float16 → x · (q · s)ᵀ [M, N] on tensor cores, (w, s) from :func:`pack_w4m`; added to
    ``residual`` in place (one rounding) when given. ``tile_counter``: int32 zeros [N / 64], left zero (the K split's).
    ``splits``: 0 the kernel's rule (:func:`w4a16_mma_splits`), n > 0 that many (at most K / 64); ``depth``: steps
    loaded ahead per warp (W4M_DEPTHS). ``prequant`` (one row): the input is x · prequant, rounded as act_prep
    rounds it. ``then_silu`` / ``then_norm`` / ``counter`` / ``then_quant`` (one row): as :func:`w4a16_gemv`'s. The
    same bits on every call for a given split."""
    mod = _built()
    out, then, ret = _then(x, w.shape[0] * MMA_TILE, residual, then_silu, then_norm, counter, eps, then_quant)
    mod.w4a16_mma(x, w, s, group, out, residual is not None, tile_counter, splits, depth,
                  _NONE if prequant is None else prequant, *then)
    return ret


def w4a16_mma_splits(rows: int, n: int, k: int, requested: int = 0, depth: int = 4) -> int:
    """The K split :func:`w4a16_mma` takes for ``rows`` rows of an [n, k] weight at ``depth`` on this GPU."""
    return _built().w4a16_mma_splits(rows, depth, n, k, requested)


W8M_DEPTHS = (2, 4)  # steps of 32 k loaded ahead per warp it is built for


def w8m_ok(out: int, inp: int, dtype: torch.dtype) -> bool:
    """Whether the 8-bit tensor-core kernel takes this linear: float16 output, N a multiple of 64, K of 32."""
    return dtype == torch.float16 and out % MMA_TILE == 0 and inp % 32 == 0


def pack_w8m(w: torch.Tensor, fmt: str) -> torch.Tensor:
    """8-bit weights [N, K] (int8, or float8_e4m3fn for FP8) → uint8 [N/64, K/32, 4, 32, 16] in the kernel's layout
    (csrc/w8_mma.cu states it; the inverse: :func:`unpack_w8m`): each m16 tile's A fragments of mma.m16n8k32, lane
    by lane; W8A16's bytes q ^ 0x80."""
    n, k = w.shape
    u = w.view(torch.uint8)[mma_tile_rows(n, w.device)]
    if fmt == "W8A16":
        u = u ^ 0x80
    # [tile, i, o, g | ks, h, c, j]: column 16 i + 8 o + g of the tile, k = 32 ks + 16 h + 4 c + j
    u = u.reshape(n // MMA_TILE, 4, 2, 8, k // 32, 2, 4, 4)
    # → [tile, ks, i, g, c | h, o, j]: lane 4 g + c of m16 tile i, word 2 h + o, byte j
    return u.permute(0, 4, 1, 3, 6, 5, 2, 7).reshape(n // MMA_TILE, k // 32, 4, 32, 16).contiguous()


def unpack_w8m(p: torch.Tensor, fmt: str) -> torch.Tensor:
    """The inverse of :func:`pack_w8m`: the weights [N, K] as uint8 bytes (int8 / e4m3 by ``.view``)."""
    tiles, steps = p.shape[:2]
    n = tiles * MMA_TILE
    u = p.reshape(tiles, steps, 4, 8, 4, 2, 2, 4).permute(0, 2, 6, 3, 1, 5, 4, 7).reshape(n, steps * 32)
    if fmt == "W8A16":
        u = u ^ 0x80
    out = torch.empty_like(u)
    out[mma_tile_rows(n, p.device)] = u
    return out


def w8_mma(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, *, fmt: str, tile_counter: torch.Tensor,
           residual: torch.Tensor | None = None, splits: int = 0, depth: int = 2, then_silu: bool = False,
           then_norm: torch.Tensor | None = None, counter: torch.Tensor | None = None, eps: float = 1e-6,
           then_quant: tuple | None = None) -> torch.Tensor:
    """x [M ≤ 8, K] (as :func:`w8_gemv`'s for ``fmt``), w from :func:`pack_w8m`, scale as :func:`w8_gemv`'s →
    (x · wᵀ) · scale, float16 [M, N], on tensor cores; added to ``residual`` in place (one rounding) when given.
    ``tile_counter``, ``splits`` (at most K / 128), ``then_*``: as :func:`w4a16_mma`'s; ``depth``: steps of 32 k loaded
    ahead per warp (W8M_DEPTHS)."""
    mod = _built()
    out, then, ret = _then(x, w.shape[0] * MMA_TILE, residual, then_silu, then_norm, counter, eps, then_quant)
    mod.w8_mma(x, w, scale, W8_FORMATS[fmt], out, residual is not None, tile_counter, splits, depth, *then)
    return ret


def w8_mma_splits(fmt: str, n: int, k: int, requested: int = 0, depth: int = 2) -> int:
    """The K split :func:`w8_mma` takes for ``fmt`` and an [n, k] weight at ``depth`` on this GPU."""
    return _built().w8_mma_splits(W8_FORMATS[fmt], depth, n, k, requested)


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
               prequant: torch.Tensor | None = None, norm: torch.Tensor | None = None,
               then_silu: bool = False, then_norm: torch.Tensor | None = None,
               counter: torch.Tensor | None = None, eps: float = 1e-6,
               then_quant: tuple | None = None, grid: int = 0, pdl: bool = False,
               stage_batch: bool = True) -> torch.Tensor:
    """x [M ≤ 4, K] float16 → x · (q · s)ᵀ [M, N]; added to ``residual`` in place (one rounding) when given.
    One row (:func:`fuses`) may bring the pre-quant scale: the input is then x · prequant, rounded as
    ``cuda_kernels.act_prep`` rounds it; and ``norm`` (KernelConfig.norm_prologue; grid ≠ 0, not with
    then_norm): the input is RMSNorm(x) · norm (· prequant), every block computing the row's statistics as a
    ``then_norm`` epilogue would have: the same bits as that epilogue followed by this GEMV. One row may also end
    with the next linear's prologue, as ``cuda_kernels.gemv`` does: ``then_silu`` returns SiLU · gate of y's
    halves, ``then_norm`` (with residual and counter, one int32 zero left zero) RMSNorm(residual + y) · then_norm;
    ``then_quant`` (prequant or None, act_scale [1], 1 int8 / 2 e4m3) that result quantized for the next linear,
    as act_prep would. ``grid`` (one row only unless 0): 0 one block per row block; -1 the persistent kernel
    (KernelConfig.w4g_persistent) on as many blocks as the GPU holds at once; n > 0 on at most n blocks (the
    tests' way to give each block several row blocks). The same bits whichever. ``pdl`` (grid ≠ 0, compute
    capability ≥ 9.0: :func:`pdl_ok`): the persistent kernel launched with programmatic dependent launch, so that
    it starts, and loads its first weights, while the kernel before it in the stream finishes (gemv_common.cuh);
    the same bits. ``stage_batch`` (with prequant; KernelConfig.w4g_stage_batch): x and prequant loaded for the
    staging eight units a thread at a time, all before any is used (else four at a time); the same bits."""
    mod = _built()
    out, then, ret = _then(x, w.shape[0], residual, then_silu, then_norm, counter, eps, then_quant)
    mod.w4a16_gemv(x, w, scales, group, out, residual is not None, GEMV_TILES.index(tuple(tile)),
                   _NONE if prequant is None else prequant, _NONE if norm is None else norm, *then, grid, pdl,
                   stage_batch)
    return ret


def grid(persistent: bool, rows: int) -> int:
    """The ``grid`` a handler passes to :func:`w4a16_gemv` / :func:`w8_gemv`: the persistent form on what the GPU
    holds at once (-1) where it is chosen and the call has one row (the kernels take it for one row only), else 0."""
    return -1 if persistent and rows == 1 else 0


def pdl_ok(device: torch.device) -> bool:
    """Whether the GPU has the kernels' grid-dependency instructions (compute capability 9.0 or later), for
    ``pdl``: a handler asks once, at load, where KernelConfig.gemv_pdl names its format; decode attention
    (cuda_kernels.DecodeAttention, KernelConfig.attn_pdl) once per decode state."""
    return torch.cuda.get_device_capability(device) >= (9, 0)


def fuses(rows: int, inp: int) -> bool:
    """Whether the GEMV can apply the pre-quant scale itself: one row, staged whole in 48 KiB of shared memory."""
    return rows == 1 and inp * 2 <= 48 * 1024


def w8g_ok(inp: int, dtype: torch.dtype) -> bool:
    """Whether the 8-bit GEMV takes this linear: float16 output, K a multiple of 16 (16-byte rows)."""
    return dtype == torch.float16 and inp % 16 == 0


def w8_gemv(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, *, fmt: str,
            residual: torch.Tensor | None = None, tile: tuple[int, int] | None = None, then_silu: bool = False,
            then_norm: torch.Tensor | None = None, counter: torch.Tensor | None = None,
            eps: float = 1e-6, then_quant: tuple | None = None, grid: int = 0, pdl: bool = False,
            norm: torch.Tensor | None = None, prequant: torch.Tensor | None = None,
            act_scale: torch.Tensor | None = None) -> torch.Tensor:
    """x [M ≤ 4, K] (float16 for W8A16; int8 / e4m3 quantized by act_prep for W8A8 / FP8), w [N, K] int8 or e4m3,
    scale [N] (float16 for W8A16, float32 for W8A8) or [1] (FP8, float32) → (x · wᵀ) · scale, float16 [M, N];
    added to ``residual`` in place (one rounding) when given. ``tile``: one of GEMV_TILES (None: the format's
    W8G_TILES entry). ``then_silu`` / ``then_norm`` / ``then_quant`` / ``grid`` (KernelConfig.w8g_persistent) /
    ``pdl``: as :func:`w4a16_gemv`'s. ``norm`` (KernelConfig.norm_prologue; grid ≠ 0, not with then_norm): x is the
    float16 residual stream [1, K] and the input RMSNorm(x) · norm, times ``prequant`` and quantized by
    ``act_scale`` (float32 [1]) for W8A8 / FP8 as act_prep does, every block computing it: the same bits as a
    then_norm epilogue with that then_quant followed by this GEMV."""
    mod = _built()
    out, then, ret = _then(x, w.shape[0], residual, then_silu, then_norm, counter, eps, then_quant)
    mod.w8_gemv(x, w, scale, W8_FORMATS[fmt], out, residual is not None,
                GEMV_TILES.index(tuple(tile or W8G_TILES[fmt])), *then, grid, pdl,
                *(_NONE if t is None else t for t in (norm, prequant, act_scale)))
    return ret


def wq_gemm_ok(out: int, inp: int, group: int, dtype: torch.dtype, bits: int) -> bool:
    """Whether :func:`wq_gemm` takes this linear (csrc/cutlass/wq_gemm.cuh's contract): float16, TMA's 16-byte rows
    (K a multiple of 16 for int8, 32 for int4; N of 8), a scale a channel (``group`` == K) or groups of a multiple
    of 64 (the kernel's K tile) dividing K."""
    return (dtype == torch.float16 and inp % (16 if bits == 8 else 32) == 0 and out % 8 == 0
            and (group == inp or (group % 64 == 0 and inp % group == 0)))


def sq_gemm_ok(out: int, inp: int, dtype: torch.dtype) -> bool:
    """Whether :func:`sq_gemm` takes this linear (csrc/cutlass/sq_gemm.cu's contract): float16 out, TMA's 16-byte
    rows (K a multiple of 16, N of 8)."""
    return dtype == torch.float16 and inp % 16 == 0 and out % 8 == 0


def sq_gemm(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, *, residual: torch.Tensor | None = None) -> torch.Tensor:
    """SmoothQuant's prefill y [M, N] = (x [M, K] · w [N, K]ᵀ in int32) · s [N] (float32: activation scale · weight
    scale) rounded to float16, through CUTLASS's Hopper int8 GEMM (KernelConfig.sq_prefill_gemm "cutlass"); with
    ``residual`` [M, N]: residual + y in float16, in place (returned). The tl.dot path's arithmetic, the same bits."""
    return _built(load_cutlass).sq_gemm(x.contiguous(), w, s, residual)


def pack_int4_cutlass(q: torch.Tensor) -> torch.Tensor:
    """int [N, K] in [-8, 7] → int8 [N, K / 2]: two k a byte, the even one in the low nibble (CUTLASS's int4b_t
    along K, two's complement), the layout :func:`wq_gemm` reads."""
    q = q.to(torch.int16)
    return (((q[:, 1::2] & 0xF) << 4) | (q[:, 0::2] & 0xF)).to(torch.uint8).view(torch.int8).contiguous()


def wq_gemm(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, *, bits: int, group: int,
            tile: int = 0) -> torch.Tensor:
    """y [M, N] = x [M, K] · (q · s)ᵀ through CUTLASS's Hopper mixed-input GEMM (KernelConfig.wq_prefill_cutlass):
    w int8 [N, K] (bits 8) or :func:`pack_int4_cutlass`'s [N, K / 2] (bits 4); s float16 [K / group, N] (N
    contiguous); ``tile`` an index of :data:`WQ_GEMM_TILES`. q · s is rounded to float16 before the MMA, as the
    dequantize-then-cuBLAS path rounds it; float32 sums."""
    return _built(load_cutlass).wq_gemm(x.contiguous(), w, s, bits, group, tile)
