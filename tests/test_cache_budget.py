"""The cache's disk budget (``--cache-max-gb``): least recently used entries go first, never one in use.

"In use" (a :class:`~quant.cache_budget.Pin`) is a kernel lock held by another process (a subprocess pins an entry and waits on its stdin, so the
test is ordered by that pipe, never by timing) or by a builder; the real checkpoint builds of a tiny LLaMa show
the budget kept across builds.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from quant import cache_budget
from quant.errors import EnvironmentProblem

REPO = Path(__file__).resolve().parent.parent
MB = 1 << 20


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("QUANT_SUITE_CACHE", str(root))
    monkeypatch.delenv(cache_budget.ENV, raising=False)
    return root


def _entry(root: Path, kind: str, name: str, mb: int, last_used: float) -> Path:
    path = root / kind / name
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    (path / "rank0.safetensors").write_bytes(os.urandom(mb * MB))  # random: no sparse or compressed blocks
    os.utime(path, (last_used, last_used))  # the folder's mtime is its recency
    return path


def _pinned_elsewhere(path: Path) -> subprocess.Popen:
    """Another process holding ``path`` in use until its stdin closes."""
    code = ("import sys; from quant import cache_budget; from pathlib import Path; "
            f"pin = cache_budget.Pin(Path({str(path)!r})); print('pinned', flush=True); sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=os.environ.copy())
    assert proc.stdout.readline().strip() == "pinned"
    return proc


def test_least_recently_used_go_first_never_one_in_use(cache, monkeypatch):
    oldest = _entry(cache, "checkpoints", "a", 2, 1000.0)
    older = _entry(cache, "hf_exports", "b", 2, 2000.0)
    newer = _entry(cache, "checkpoints", "c", 2, 3000.0)
    newest = _entry(cache, "models", "d", 2, 4000.0)
    held = _pinned_elsewhere(oldest)
    try:
        used = cache_budget.usage()
        monkeypatch.setenv(cache_budget.ENV, repr((used + 1 * MB) / cache_budget.GB))
        cache_budget.reserve(4 * MB, for_what=cache / "checkpoints" / "new")  # needs 3 MB freed: two entries
        assert oldest.is_dir(), "evicted an entry another process uses"
        assert not older.exists() and not newer.exists(), "the least recently used unpinned entries go first"
        assert newest.is_dir()
        assert not list(cache.rglob(".tmp-evicted-*"))
        assert cache_budget.usage() + 4 * MB <= cache_budget.budget_bytes()
        # What is left in use cannot make room: one line saying so, nothing evicted.
        with pytest.raises(EnvironmentProblem, match="cannot hold new .*in use"):
            cache_budget.reserve(100 * MB, for_what=cache / "checkpoints" / "new")
        assert oldest.is_dir()
    finally:
        held.stdin.close()
        held.wait(timeout=60)
    # Its user gone, the pinned entry is evictable again (the lock died with the process); pinning was a use, so
    # it goes after the entry that was used less recently.
    cache_budget.reserve(6 * MB, for_what=cache / "checkpoints" / "new")
    assert oldest.is_dir() and not newest.exists()
    cache_budget.reserve(8 * MB, for_what=cache / "checkpoints" / "new")
    assert not oldest.exists()


def test_an_entry_being_built_or_pinned_here_is_not_evicted(cache, monkeypatch):
    building = _entry(cache, "checkpoints", "building", 1, 1000.0)
    mine = _entry(cache, "checkpoints", "mine", 1, 2000.0)
    monkeypatch.setenv(cache_budget.ENV, repr(1 * MB / cache_budget.GB))
    pin = cache_budget.Pin(mine)
    try:
        with cache_budget.build_lock(building), pytest.raises(EnvironmentProblem):
            cache_budget.reserve(1 * MB, for_what=cache / "checkpoints" / "new")
        assert building.is_dir() and mine.is_dir()
    finally:
        pin.close()
    cache_budget.reserve(0, for_what=cache / "checkpoints" / "new")
    assert not building.exists() and not mine.exists()


def test_no_budget_evicts_nothing(cache):
    entry = _entry(cache, "checkpoints", "a", 1, 1000.0)
    cache_budget.reserve(10**15, for_what=cache / "checkpoints" / "new")
    assert entry.is_dir()


@pytest.mark.parametrize("value", ["-1", "0", "nan", "lots"])
def test_bad_budget_is_one_line_exit_2(tmp_path, value):
    env = {**os.environ, "QUANT_SUITE_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-m", "quant.build", "--cache-max-gb", value], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "cache").exists()


def test_real_checkpoints_stay_within_the_budget(cache, monkeypatch, tiny_llama_dir, tmp_path):
    """Two real checkpoint builds under a budget that holds one: the second evicts the first once it is no
    longer in use; the model, read in place, is never in the cache at all."""
    from calibration.data import CalibSpec
    from quant.apply import build_checkpoint, fp16_bytes
    from quant.model_source import resolve_model
    from quant.recipes import Recipe

    model = resolve_model(str(tiny_llama_dir))
    assert model.hf_dir == Path(tiny_llama_dir).resolve()
    budget = int(1.5 * fp16_bytes(model))
    monkeypatch.setenv(cache_budget.ENV, repr(budget / cache_budget.GB))
    events = tmp_path / "trace.jsonl"
    monkeypatch.setenv("QUANT_SUITE_TRACE", str(events))
    first = build_checkpoint(model, Recipe("fp16"))
    assert cache_budget.usage() <= budget
    calib = CalibSpec(num_samples=2, seq_len=32)
    pin = cache_budget.Pin(first)  # as a candidate holds its checkpoint while its runtime is open
    with pytest.raises(EnvironmentProblem, match="in use"):
        build_checkpoint(model, Recipe("int8_wo"), calib)
    pin.close()
    second = build_checkpoint(model, Recipe("int8_wo"), calib)
    assert second != first and (second / "config.json").is_file() and not first.exists()
    assert cache_budget.usage() <= budget
    assert '"cache.evicted"' in events.read_text()
