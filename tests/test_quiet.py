"""quant.quiet: the libraries' output held without -v, shown with it, credentials redacted in both channels."""
from __future__ import annotations

import subprocess
import sys

from quant import quiet

REPO_ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
SECRET = "S3cret-never-print"
URL = f"postgresql://user:{SECRET}@db/quant"


def _held_output(verbose: bool, monkeypatch, capsys) -> str:
    monkeypatch.setenv(quiet.VERBOSE_ENV, "1" if verbose else "0")
    with quiet.held("ModelOpt"):
        print(f"current rank: 0 (storage {URL})")
        print("Inserted 756 quantizers", file=sys.stderr)
    out = capsys.readouterr()
    return out.out + out.err


def test_held_prints_stay_back_without_verbose(monkeypatch, capsys):
    assert _held_output(False, monkeypatch, capsys) == ""


def test_held_prints_show_with_verbose_labelled_and_redacted(monkeypatch, capsys):
    shown = _held_output(True, monkeypatch, capsys)
    assert "[ModelOpt] current rank: 0 (storage postgresql://user:***@db/quant)" in shown
    assert "[ModelOpt] Inserted 756 quantizers" in shown and SECRET not in shown


def _warn(verbose: bool) -> subprocess.CompletedProcess:
    code = ("import warnings; from quant import quiet\n"
            f"quiet.configure({verbose})\n"
            f"warnings.warn('cannot reach {URL}')\n")  # attributed to __main__: a library, not the suite
    return subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)


def test_library_warnings_are_hidden_without_verbose_and_redacted_with_it():
    assert _warn(False).stderr == ""
    shown = _warn(True).stderr
    assert "UserWarning: cannot reach postgresql://user:***@db/quant" in shown and SECRET not in shown
