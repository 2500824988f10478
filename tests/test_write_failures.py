"""A full disk or a read-only results folder: one clear line naming the path, exit status 2, no half-written file.

How the failures are made real (the tests run as root here, and root ignores file permissions, so
``chmod 0500`` on a results folder would *not* fail for it):

- read-only: a tmpfs mounted and remounted ``ro`` -- the kernel refuses every write with EROFS, root or not;
  and, needing no mount at all, a --results-dir whose parent is a regular file (ENOTDIR for everyone);
- disk full: a tmpfs of a few KiB or MiB (ENOSPC), filled where needed.

Mounting needs CAP_SYS_ADMIN; where it is refused those tests skip with the reason (the parent-is-a-file test
always runs). /dev/full is not used as a target: every write here is temp-file-then-rename, which must not
(and, since this change, does not) replace a device node -- tests/test_bad_input_corpus.py checks that.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import searchkit as kit


@pytest.fixture
def tmpfs(tmp_path):
    mounted: list[Path] = []

    def mount(name: str, size: str, *, read_only: bool = False, prepare=None) -> Path:
        path = tmp_path / name
        path.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()}): needs CAP_SYS_ADMIN")
        mounted.append(path)
        if prepare:
            prepare(path)
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, default_model):
    return kit.crash_reference(tmp_path_factory, default_model)


def _fill(path: Path) -> None:
    """Write until ENOSPC: the file system is then completely full."""
    import os

    fd = os.open(path / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)


def test_read_only_results_dir_fails_before_any_work(tmpfs, tmp_path, reference):
    ro = tmpfs("ro", "1m", read_only=True, prepare=lambda p: (p / "results").mkdir())
    cache = tmp_path / "cache"
    t0 = time.monotonic()
    proc = kit.run(kit.search_cmd(reference["model"], ro / "results", "--min-rouge1", "0"), kit.env_for(cache))
    line = kit.error_line(proc)
    assert f"--results-dir {ro / 'results'} is not writable: Read-only file system" in line
    assert time.monotonic() - t0 < 60 and not cache.exists(), "model work happened before the refusal"


def test_results_dir_under_a_regular_file(tmp_path, reference):
    (tmp_path / "afile").write_text("x")
    proc = kit.run(kit.search_cmd(reference["model"], tmp_path / "afile" / "results", "--min-rouge1", "0"),
                   kit.env_for(tmp_path / "cache"))
    line = kit.error_line(proc)
    assert "--results-dir" in line and f"{tmp_path / 'afile'} is a file, not a folder" in line
    assert not (tmp_path / "cache").exists()


def test_disk_full_while_writing_the_report(tmpfs, tmp_path, reference):
    """The report and plots of a finished study onto a 64 KiB file system: the plots do not fit."""
    full = tmpfs("full", "64k")
    db = tmp_path / "study.db"
    shutil.copy(reference["cache"].parent / "results" / "study.db", db)
    proc = kit.run([sys.executable, "-m", "experiments.plot", "--storage", f"sqlite:///{db}", "--results-dir",
                    str(full)], kit.env_for(tmp_path / "cache"))
    line = kit.error_line(proc)
    assert line.startswith(f"error: cannot write {full}/") and line.endswith(": No space left on device"), line
    assert kit.tmp_leftovers(full) == [], "a temporary file was left on the full disk"


def test_disk_full_cache_during_model_conversion(tmpfs, tmp_path, reference):
    """The conversion's weights (written by safetensors, which wraps ENOSPC in its own error) do not fit."""
    cache = tmpfs("cache", "4m")
    proc = kit.run([sys.executable, "-m", "calibration", "--model", str(reference["model"]), "--calib-samples", "2",
                    "--calib-seq-len", "16", "--plot-dir", str(tmp_path / "plots")], kit.env_for(cache))
    line = kit.error_line(proc)
    assert line.startswith(f"error: cannot write {cache}/models/") and "No space left on device" in line
    assert kit.tmp_leftovers(cache) == [] and [p for p in (cache / "models").iterdir() if not p.name.endswith((".lock", ".use", ".used"))] == []


def test_full_disk_refuses_evaluate_before_any_work(tmpfs, tmp_path):
    full = tmpfs("full", "64k", prepare=_fill)
    cache = tmp_path / "cache"
    proc = kit.run([sys.executable, "-m", "experiments.evaluate", "--out", str(full / "r.json"), "--no-progress"],
                   kit.env_for(cache))
    line = kit.error_line(proc)
    assert f"the folder of --out {full} is not writable: No space left on device" in line
    assert not cache.exists() and not (full / "r.json").exists()


@pytest.mark.slow
def test_search_stops_on_a_full_cache_instead_of_pruning(tmpfs, tmp_path, reference):
    """A trial whose checkpoint does not fit is not the recipe's fault: the search exits 2 naming the path, the
    trial is FAIL (not PRUNED: it is retried once there is space), nothing half-written is published."""
    src = kit.snapshot(reference, tmp_path / "seed", "quantized")  # the quantized trial must build its checkpoint
    used = sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
    cache = tmpfs("cache", f"{used // 1024 + 3 * 1024}k", prepare=lambda p: shutil.copytree(src, p, dirs_exist_ok=True))
    db = tmp_path / "study.db"
    proc = kit.run(kit.search_cmd(reference["model"], tmp_path / "results", *kit.THRESHOLD, "--storage",
                                  f"sqlite:///{db}"), kit.env_for(cache))
    line = kit.error_line(proc)
    assert line.startswith(f"error: cannot write {cache}/checkpoints/") and "No space left on device" in line
    study = kit.load_study(f"sqlite:///{db}")
    states = {t.number: t.state.name for t in study.trials}
    assert "PRUNED" not in states.values() and list(states.values()).count("FAIL") == 1, states
    kit.validate_cache(cache)
    assert kit.tmp_leftovers(cache / "checkpoints") == []
