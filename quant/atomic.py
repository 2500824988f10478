"""Write-then-rename helpers: a reader never sees a half-written file or folder.

A crash (or SIGKILL) leaves at worst a ``.tmp-*`` sibling, which no reader looks at and which a later writer
of the same target removes once it is stale (see :func:`_remove_stale`).

These helpers are also the one place where a failing write (disk full, read-only file system, no permission,
a parent that is a file) becomes a one-line :class:`~quant.errors.UserError` naming the path, instead of a
traceback from deep inside a library; ``fault=`` names the :mod:`quant.faults` point between the temporary
write and the rename.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import stat
import tempfile
import time
from pathlib import Path
from typing import Iterator

from quant import faults
from quant.errors import EnvironmentProblem, UserError

# Errors that say "this place cannot be written" (as opposed to a bug): reported as one line, exit status 2.
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EEXIST,
                errno.EISDIR, errno.EFBIG}


def _errno_of(exc: BaseException, depth: int = 0) -> int | None:
    """The errno behind an exception: an OSError's, or one a library wrapped into its own type and message
    (safetensors: "I/O error: No space left on device (os error 28)"), or its cause's."""
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    text = str(exc)
    match = re.search(r"os error (\d+)", text)
    if match:
        return int(match.group(1))
    for code in (errno.ENOSPC, errno.EROFS, errno.EDQUOT):
        if os.strerror(code) in text:
            return code
    cause = exc.__cause__ or exc.__context__
    return _errno_of(cause, depth + 1) if cause is not None and depth < 3 else None


def place_error(path: Path, exc: OSError) -> EnvironmentProblem:
    """Creating the folder of ``path`` or a temporary file in it failed: whatever the errno (/proc answers
    ENOENT, a FUSE mount anything), the place cannot be written -- the user's to fix, not a bug."""
    return write_error(path, exc) or EnvironmentProblem(
        f"cannot write {path}: {exc.strerror or os.strerror(exc.errno or 0)}")


def write_error(path: Path, exc: BaseException) -> EnvironmentProblem | None:
    """The UserError for an error met while writing ``path``, or None when it is not a write-place problem."""
    code = _errno_of(exc)
    if code not in WRITE_ERRNOS or not isinstance(exc, Exception):
        return None
    # Only a library's own wrapper of an OSError, not an unrelated bug whose text happens to say "os error".
    if not isinstance(exc, OSError) and code not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG):
        return None
    what = os.strerror(code) if not isinstance(exc, OSError) else (exc.strerror or os.strerror(code))
    if code in (errno.ENOTDIR, errno.EEXIST):
        what = f"{what} (a parent of it is a file, not a folder)"
    return EnvironmentProblem(f"cannot write {path}: {what}")


def ensure_writable_dir(folder: Path, what: str) -> Path:
    """Prove that files can be written into ``folder`` before any long work (one line, exit status 2 if not).

    A real write of a probe file (deleted at once) into ``folder`` or, when it does not exist yet, into its
    nearest existing ancestor -- nothing is created: root passes every permission check, but not a read-only
    or full file system, and a missing folder's parent may be a file.
    """
    folder = Path(folder)
    probe_dir = folder.absolute()
    while not probe_dir.exists() and probe_dir != probe_dir.parent:
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise EnvironmentProblem(f"{what} {folder} cannot be created: {probe_dir} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".tmp-write-probe-", dir=probe_dir)
        try:
            os.write(fd, b"probe")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:  # any errno: /proc answers ENOENT, a FUSE mount anything
        raise EnvironmentProblem(f"{what} {folder} is not writable: {exc.strerror or os.strerror(exc.errno or 0)}") from None
    return folder


def ensure_writable_file(path: Path, flag: str = "--out") -> Path:
    """Before any long work: the record ``path`` that ``flag`` names can be written (not a folder or device there;
    its folder writable, :func:`ensure_writable_dir`): one line, exit status 2 if not."""
    path = Path(path)
    if path.exists() and not path.is_file():
        raise UserError(f"{flag} {path} exists and is not a regular file")
    ensure_writable_dir(path.parent, f"the folder of {flag}")
    return path


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


STALE_AFTER_S = 6 * 3600


def _remove_stale(final: Path) -> None:
    """Delete leftovers of killed writers of ``final``: untouched for hours, so no live writer owns them.

    Age rather than ownership, because a concurrent writer of the same key may be alive right now.
    """
    now = time.time()
    for leftover in final.parent.glob(f".tmp-{final.name}-*"):
        try:
            if now - leftover.stat().st_mtime > STALE_AFTER_S:
                shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink()
        except OSError:
            pass


@contextlib.contextmanager
def atomic_dir(final: Path, *, fault: str | None = None) -> Iterator[Path]:
    """Yield a temporary folder beside ``final``; on success it replaces ``final`` in one rename."""
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    except OSError as exc:
        raise place_error(final, exc) from None
    try:
        yield tmp
        if fault:
            faults.point(fault)
        if final.exists():
            # Another writer (or an earlier run) finished first: same key means same content.
            shutil.rmtree(tmp, ignore_errors=True)
            return
        try:
            os.replace(tmp, final)
        except OSError as exc:
            # Lost a race with a concurrent writer of the same key (unlocked writers, e.g. two workers converting
            # one model): its folder is complete and holds the same content, so ours is simply dropped.
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST) and final.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
                return
            raise
        _fsync_dir(final.parent)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        # A full or read-only disk met by whatever wrote into the folder (ModelOpt, save_pretrained, ...).
        err = write_error(final, exc)
        if err is not None:
            raise err from None
        raise


def atomic_write_bytes(path: Path, data: bytes, *, fault: str | None = None) -> None:
    path = Path(path)
    # os.replace onto a device or a folder would replace it (as root, /dev/full itself): refuse instead.
    with contextlib.suppress(OSError):
        mode = path.stat().st_mode
        if not stat.S_ISREG(mode):
            raise UserError(f"cannot write {path}: it exists and is not a regular file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    except OSError as exc:
        raise place_error(path, exc) from None
    try:
        # mkstemp creates 0600; give the file the mode an ordinary open() would (0666 minus the umask).
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if fault:
            faults.point(fault)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        err = write_error(path, exc) if isinstance(exc, OSError) else None
        if err is not None:
            raise err from None
        raise


def atomic_write_text(path: Path, text: str, *, fault: str | None = None) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), fault=fault)


def atomic_write_json(path: Path, obj, *, fault: str | None = None) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n", fault=fault)
