"""The cache's disk budget: large entries are evicted least recently used first, never one in use.

A search over a dozen recipes of an 8B model writes a dozen checkpoints (16 GB in FP16, 4-8 GB quantized) and
as many HF exports: more than a 64 GiB disk holds. With a budget (``--cache-max-gb`` or
``$QUANT_SUITE_CACHE_MAX_GB``; none by default), every builder of a large entry first makes room for it
(:func:`reserve`, with an upper bound of its size) and checks again once it is written (:func:`settle`), so the
cache never exceeds the budget by more than the small entries (evaluation records, statistics) written between.

Large entries, the evictable ones, are the folders under ``checkpoints/``, ``hf_exports/``, ``engines/`` and
``models/``. An entry is *in use* while some process holds a shared ``flock`` on its folder (:class:`Pin`: the
model a run converted, for the whole run; a checkpoint, while a candidate has it open), or while its builder holds
``.<name>.lock`` (:func:`build_lock`): the evictor takes both exclusively without waiting, and skips the entry
when it cannot. Locks are the kernel's, so they hold across the workers of one study that share the cache folder,
and go away with a killed process. Recency is the mtime of the entry's folder, set at each use. An evicted entry
is renamed away first, then deleted: a reader sees it whole or not at all.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from quant import faults
from quant.atomic import write_error
from quant.errors import EnvironmentProblem, UserError
from quant.paths import cache_root

ENV = "QUANT_SUITE_CACHE_MAX_GB"
EVICTABLE = ("checkpoints", "hf_exports", "engines", "models")
GB = 1e9


def budget_bytes() -> int | None:
    """The budget in bytes, or None (no budget): ``$QUANT_SUITE_CACHE_MAX_GB``, which ``--cache-max-gb`` sets."""
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return None
    try:
        gb = float(raw)
    except ValueError:
        raise UserError(f"${ENV}: {raw!r} is not a number of gigabytes") from None
    if not gb > 0 or gb != gb or gb == float("inf"):
        raise UserError(f"${ENV}: {raw!r} must be a positive number of gigabytes")
    return int(gb * GB)


def add_cache_budget_arg(parser) -> None:
    parser.add_argument("--cache-max-gb", type=float, default=None, metavar="GB",
                        help=f"disk budget of the cache folder (${ENV}); least recently used checkpoints, exports "
                             "and model conversions are deleted to stay within it, never one in use")


def apply_cache_budget_arg(args) -> None:
    """``--cache-max-gb`` → ``$QUANT_SUITE_CACHE_MAX_GB`` for this process and the workers it starts (the cache
    folder is configured the same way), checked now so that a bad value is one line before any work."""
    value = getattr(args, "cache_max_gb", None)
    if value is not None:
        if not 0 < value < float("inf"):  # (NaN fails this too)
            raise UserError(f"--cache-max-gb {value:g}: must be a positive number of gigabytes")
        os.environ[ENV] = repr(value)
    budget_bytes()


def _size(path: Path) -> int:
    """Bytes on disk of a file or folder (allocated blocks: what fills the disk)."""
    try:
        if path.is_file() or path.is_symlink():
            return path.lstat().st_blocks * 512
        return sum(p.lstat().st_blocks * 512 for p in path.rglob("*"))
    except OSError:
        return 0  # vanished while walked (another worker evicting): counts as gone


def usage() -> int:
    root = cache_root()
    return _size(root) if root.is_dir() else 0


@dataclass(frozen=True)
class Entry:
    path: Path
    size: int
    last_used: float


def entries() -> list[Entry]:
    """Finished large entries, least recently used first."""
    out = []
    for kind in EVICTABLE:
        folder = cache_root() / kind
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            if path.name.startswith(".") or not path.is_dir() or not (path / "config.json").is_file():
                continue
            try:
                last = path.stat().st_mtime
            except OSError:
                continue
            out.append(Entry(path, _size(path), last))
    return sorted(out, key=lambda e: (e.last_used, str(e.path)))


def _marker(path: Path, what: str) -> Path:
    return path.parent / f".{path.name}.{what}"


def touch(path: Path) -> None:
    """Record a use of the entry at ``path``: its folder's mtime is its recency for eviction (a finished entry's
    folder is never written again, so only uses move it)."""
    try:
        os.utime(path)
    except OSError:
        pass  # a read-only cache has no budget to keep


class Pin:
    """The entry at ``path`` is in use by its holder until :meth:`close` (or until the holder is collected, or its
    process ends: the kernel drops the lock with the descriptor). It is a shared ``flock`` on the entry's folder
    itself, so pinning writes nothing; taking it counts as a use (recency). A path outside the cache (a user's
    folder, read in place) or not built yet is not pinned."""

    def __init__(self, path: Path):
        self.path, self._fd = Path(path), None
        try:
            if not self.path.is_dir() or not self.path.resolve().is_relative_to(cache_root().resolve()):
                return
            self._fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            return  # evicted meanwhile, or unreadable: nothing to hold
        fcntl.flock(self._fd, fcntl.LOCK_SH)
        touch(self.path)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self):
        self.close()


@contextmanager
def build_lock(out: Path):
    """One builder per checkpoint across processes: a second worker waits, then finds the folder built."""
    lock_path = _marker(out, "lock")
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(lock_path, "a")
    except OSError as exc:
        raise (write_error(lock_path, exc) or exc) from None
    with fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        # The concurrency tests read these events ($QUANT_SUITE_TRACE) to prove no two holders ever overlap.
        faults.trace("lock.acquired", key=out.name)
        try:
            yield
        finally:
            faults.trace("lock.released", key=out.name)
            fcntl.flock(fh, fcntl.LOCK_UN)


def _try_evict(entry: Entry) -> bool:
    """Delete ``entry`` unless a process uses (pins) or builds it; True when deleted."""
    fds: list[int] = []
    try:
        fds.append(os.open(entry.path, os.O_RDONLY | os.O_DIRECTORY))
        lock = _marker(entry.path, "lock")
        if lock.exists():
            fds.append(os.open(lock, os.O_RDONLY))
        for fd in fds:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
        faults.point("cache.evict")  # crash test: locks held, entry not yet renamed away
        gone = entry.path.parent / f".tmp-evicted-{entry.path.name}-{os.getpid()}"
        try:
            os.replace(entry.path, gone)
        except OSError:
            return False  # evicted by another worker meanwhile
        shutil.rmtree(gone, ignore_errors=True)
        faults.trace("cache.evicted", key=entry.path.name)
        return True
    except OSError:
        return False
    finally:
        for fd in fds:
            os.close(fd)


def reserve(need: int, *, for_what: Path, log=None) -> None:
    """Make room for ``need`` more bytes (an upper bound of the entry about to be written to ``for_what``) by
    evicting least recently used entries not in use. Raises when the entries in use alone leave too little."""
    budget = budget_bytes()
    if budget is None:
        return
    used = usage()
    if used + need <= budget:
        return
    for entry in entries():
        if entry.path == Path(for_what):
            continue
        if _try_evict(entry):
            used -= entry.size
            if log:
                log(f"cache budget {budget / GB:g} GB: evicted {entry.path.parent.name}/{entry.path.name} "
                    f"({entry.size / GB:.2f} GB, last used {time.strftime('%Y-%m-%d %H:%M', time.localtime(entry.last_used))})")
            if used + need <= budget:
                return
    raise EnvironmentProblem(
        f"cache budget {budget / GB:g} GB (${ENV}, --cache-max-gb) cannot hold {for_what.name} (up to "
        f"{need / GB:.2f} GB): {used / GB:.2f} GB are taken by entries in use or not evictable in {cache_root()}")


def settle(written: Path, *, log=None) -> None:
    """After ``written`` is complete: evict others until the cache is within its budget again (the estimate given
    to :func:`reserve` was an upper bound, so this rarely evicts)."""
    if budget_bytes() is not None and usage() > budget_bytes():
        reserve(0, for_what=Path(written), log=log)
