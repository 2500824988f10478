"""The real offline path of a Hugging Face Hub read, in a fresh interpreter.

``datasets`` reads HF_DATASETS_OFFLINE once, at import, so the test process (which imported it long ago) cannot
go offline itself; an empty HF_HOME makes sure no cached copy answers instead."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def offline_user_error(tmp_path: Path, monkeypatch, import_line: str, call: str) -> str:
    """stdout of ``call`` run offline: the UserError's message (the child exits 1 when no UserError was raised)."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    script = (
        f"{import_line}\n"
        "from quant.errors import UserError\n"
        "try:\n"
        f"    {call}\n"
        "except UserError as exc:\n"
        "    print(exc)\n"
        "else:\n"
        f"    raise SystemExit({call!r} + ' succeeded although offline')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout
