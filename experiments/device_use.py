"""Which workers use a measuring device, and a latency that is timed only while no other worker uses it.

Several search workers on one study share the machine's GPUs (one worker per GPU is the plan, two on one GPU
the mistake users make: an unpinned worker takes GPU 0). A latency timed while another process calibrates or
generates on the same GPU is that process's slowdown, not the recipe's. So each worker holds its device:

- *shared* while it works on it (building a checkpoint, generating summaries, computing perplexity), by
  :meth:`DeviceUse.shared`; any number of workers at once;
- *exclusive* while it times a latency, by :meth:`DeviceUse.exclusive`: it waits until no other worker is
  inside a shared span, and none starts one until it is done. A waiting exclusive claim holds a turnstile that
  new shared spans pass through, so a stream of shared spans cannot starve it.

The locks are the kernel's (``flock``) on files named after the device's identity -- a GPU's UUID, which
``CUDA_VISIBLE_DEVICES`` renumbering does not change, or ``cpu`` -- in a folder of this host
(``$QUANT_SUITE_LOCK_DIR``, else the temporary folder): they hold between the processes of one host and go with
a killed one. Workers in containers that share a GPU but not a temporary folder must be given one folder.

Contract against deadlock: a claim is never held while waiting for a lock whose holder may ask for a new
claim. Evaluation records are computed inside their cache key's lock and ask for a claim there, so a span never
encloses a stage call (``experiments.stages``: spans wrap the work inside ``run()``, after its key is held).
Checkpoint and statistics build locks may be waited for inside a span: their holders either entered them inside
a span of their own (where further claims are reentrant no-ops) or use no claim. Both spans are reentrant
within one :class:`DeviceUse`; an exclusive one inside a shared one gives the shared claim up while it waits.
"""
from __future__ import annotations

import fcntl
import os
import secrets
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

from quant import faults
from quant.errors import UserError

LOCK_DIR_ENV = "QUANT_SUITE_LOCK_DIR"


def device_identity(device: str) -> dict:
    """What the device is: ``key`` (stable across processes of this host), a readable ``name``, and for a GPU
    its index as this process sees it, its UUID, and ``$CUDA_VISIBLE_DEVICES``."""
    if not device.startswith("cuda"):
        return {"key": "cpu", "name": "cpu", "device": device}
    import torch

    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    props = torch.cuda.get_device_properties(index)
    uuid = str(getattr(props, "uuid", "") or f"{props.name}-pci{getattr(props, 'pci_bus_id', index)}")
    uuid = uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"
    return {"key": uuid, "name": props.name, "device": device, "index": index, "uuid": uuid,
            "visible": os.environ.get("CUDA_VISIBLE_DEVICES"), "count": torch.cuda.device_count()}


def lock_dir() -> Path:
    return Path(os.environ.get(LOCK_DIR_ENV) or tempfile.gettempdir()) / "quant-suite-devices"


def _open(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)


class DeviceUse:
    """This process's use of its measuring device (one per process; close() when done)."""

    def __init__(self, identity: dict, folder: Path | None = None):
        self.identity = identity
        key = identity["key"].replace("/", "_")
        folder = folder or lock_dir()
        self._workers = folder / f"{key}.workers"
        self._workers.mkdir(parents=True, exist_ok=True)
        self._main = _open(folder / f"{key}.lock")
        self._turn = _open(folder / f"{key}.turn")
        # Registered while alive: a shared lock on a file of our own, which others can test (and which the
        # kernel drops with this process).
        self._me = self._workers / f"{os.getpid()}-{secrets.token_hex(4)}"
        self._reg = _open(self._me)
        fcntl.flock(self._reg, fcntl.LOCK_SH)
        self._mode: str | None = None  # None | "shared" | "exclusive"

    def others(self) -> int:
        """Live workers registered on this device besides this one (stale registrations are removed)."""
        count = 0
        for path in self._workers.iterdir():
            if path == self._me:
                continue
            try:
                fd = os.open(path, os.O_RDWR)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                count += 1
            else:
                path.unlink(missing_ok=True)  # its process is gone
            finally:
                os.close(fd)
        return count

    def _take(self, mode: str, blocking: bool = True) -> bool:
        flag = fcntl.LOCK_EX if mode == "exclusive" else fcntl.LOCK_SH
        nb = 0 if blocking else fcntl.LOCK_NB
        try:
            fcntl.flock(self._turn, fcntl.LOCK_EX | nb)
        except BlockingIOError:
            return False
        try:
            fcntl.flock(self._main, flag | nb)
        except BlockingIOError:
            return False
        finally:
            fcntl.flock(self._turn, fcntl.LOCK_UN)
        self._mode = mode
        faults.trace(f"device.{mode}", key=self.identity["key"])  # after taking: the trace's order is true
        return True

    def _drop(self) -> None:
        faults.trace("device.released", key=self.identity["key"])  # before releasing, for the same reason
        self._mode = None
        fcntl.flock(self._main, fcntl.LOCK_UN)

    @contextmanager
    def shared(self):
        """Work on the device, alongside other workers' work but never inside another's latency."""
        if self._mode is not None:
            yield
            return
        self._take("shared")
        try:
            yield
        finally:
            self._drop()

    @contextmanager
    def exclusive(self):
        """Time on the device: no other worker's shared or exclusive span runs meanwhile."""
        before = self._mode
        if before == "exclusive":
            yield
            return
        if before == "shared":
            self._drop()
        self._take("exclusive")
        try:
            yield
        finally:
            self._drop()
            if before == "shared":
                self._take("shared")

    def try_exclusive(self) -> bool:
        """Take the exclusive claim only if it is free now (for tests and diagnostics); release with release()."""
        return self._mode is None and self._take("exclusive", blocking=False)

    def try_shared(self) -> bool:
        return self._mode is None and self._take("shared", blocking=False)

    def release(self) -> None:
        if self._mode is not None:
            self._drop()

    def close(self) -> None:
        self.release()
        for fd in (self._main, self._turn, self._reg):
            try:
                os.close(fd)
            except OSError:
                pass
        self._me.unlink(missing_ok=True)


def pin_gpu(gpu: int | None, device: str) -> None:
    """``--gpu N``: this process sees only GPU N of those visible now (``$CUDA_VISIBLE_DEVICES`` narrowed, so a
    scheduler's own assignment still holds), set before CUDA is first asked. UserError where that cannot be."""
    if gpu is None:
        return
    import torch

    if device == "cpu":
        raise UserError(f"--gpu {gpu} with --device cpu: give one or the other")
    if torch.cuda.is_initialized():  # (nothing here asks CUDA before this; a guard for future callers)
        raise UserError(f"--gpu {gpu}: CUDA was already initialized in this process")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    entries = [e.strip() for e in visible.split(",")] if visible not in (None, "") else None
    if entries is not None and gpu >= len(entries):
        raise UserError(f"--gpu {gpu}: only {len(entries)} GPU(s) visible ($CUDA_VISIBLE_DEVICES={visible})")
    os.environ["CUDA_VISIBLE_DEVICES"] = entries[gpu] if entries is not None else str(gpu)
    if torch.cuda.device_count() < 1:
        raise UserError(f"--gpu {gpu}: no such CUDA GPU on this machine")


def announce_device(use: DeviceUse, device: str) -> None:
    """One line: the device this worker measures on, how it was chosen, and who else uses it."""
    ident = use.identity
    if ident["key"] == "cpu":
        where = "cpu"
    else:
        pinned = "pinned by $CUDA_VISIBLE_DEVICES" if ident.get("visible") not in (None, "") else \
            f"GPU {ident['index']} of {ident['count']}, not pinned: give --gpu N to spread workers over GPUs" \
            if ident["count"] > 1 else "the only GPU visible"
        where = f"{device} = {ident['name']} {ident['uuid']} ({pinned})"
    others = use.others()
    shared = (f"; {others} other worker(s) on it: this worker times latencies only while none of them works on "
              "it" if others else "")
    print(f"device: {where}{shared}", file=sys.stderr)
