"""Workers sharing a measuring device: a latency is timed only while no other worker works on the device.

The locks are flock()s on files, which conflict between open file descriptions even inside one process, so two
:class:`DeviceUse` objects here stand for two workers; every step is a non-blocking attempt whose outcome is
fixed by the state before it (no timing). The waiting exclusive claim's turnstile is checked by a thread that
blocks in it, detected from /proc/locks (a blocked flock shows as a waiter), not by sleeping. The search
workers' trace check (tests/test_concurrency.py) covers real processes.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from experiments.device_use import DeviceUse, pin_gpu
from quant.errors import UserError

CPU = {"key": "cpu", "name": "cpu", "device": "cpu"}


@pytest.fixture
def workers(tmp_path):
    made = [DeviceUse(CPU, tmp_path) for _ in range(3)]
    yield made
    for w in made:
        w.close()


def test_exclusive_waits_for_every_shared_span_and_blocks_new_ones(workers):
    a, b, c = workers
    assert a.others() == 2
    assert a.try_shared() and c.try_shared()  # any number of shared spans at once
    assert not b.try_exclusive()  # a latency never starts while another worker works on the device
    a.release()
    assert not b.try_exclusive()
    c.release()
    assert b.try_exclusive()
    assert not a.try_shared() and not c.try_exclusive()  # nor does any work start while it times
    b.release()
    assert a.try_shared()


def test_reentrant_and_the_exclusive_span_gives_up_its_own_shared_claim(workers):
    a, b, _ = workers
    with a.shared():
        with a.shared():
            assert not b.try_exclusive()
        with a.exclusive():  # inside its own shared span: no self-deadlock
            assert not b.try_shared()
        assert not b.try_exclusive()  # shared again after the exclusive span
    assert b.try_exclusive()
    b.release()


def _waiters(lock: Path) -> int:
    """Blocked flock()s on ``lock``: /proc/locks lists each as ``-> FLOCK ... maj:min:inode``."""
    inode = lock.stat().st_ino
    return sum(1 for line in Path("/proc/locks").read_text().splitlines()
               if "->" in line and line.split()[6].endswith(f":{inode}"))


def test_a_waiting_latency_is_not_starved_by_new_shared_spans(workers, tmp_path):
    a, b, c = workers
    assert a.try_shared()
    lock = tmp_path / "cpu.lock"
    entered = threading.Event()

    def latency():
        with b.exclusive():
            entered.set()

    t = threading.Thread(target=latency, daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    while not _waiters(lock) and time.monotonic() < deadline:  # until b waits on the lock
        time.sleep(0.01)
    assert _waiters(lock) == 1 and not entered.is_set()
    assert not c.try_shared()  # the turnstile: no new work while a latency waits
    a.release()
    t.join(30)
    assert entered.is_set() and c.try_shared()
    c.release()


def test_a_dead_worker_is_not_counted(tmp_path):
    a, b = DeviceUse(CPU, tmp_path), DeviceUse(CPU, tmp_path)
    assert a.others() == 1
    b.close()
    assert a.others() == 0
    a.close()


def test_gpu_pinning_refusals(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    with pytest.raises(UserError, match="only 2 GPU"):
        pin_gpu(2, "auto")
    with pytest.raises(UserError, match="--device cpu"):
        pin_gpu(0, "cpu")
    pin_gpu(None, "auto")  # no --gpu: nothing changes
    import os

    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3,5"
