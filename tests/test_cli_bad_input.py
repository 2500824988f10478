"""``python -m experiments.evaluate`` with bad input: exit 2, one ``error:`` line, no traceback, no record.

Each case runs the real CLI in a subprocess with an *empty* model cache: a case that did any model work
before refusing would convert the default model into it, which the test catches (and would take ~30 s).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
PROG = "python -m experiments.evaluate"
MAX_SECONDS = 60  # loose: a healthy refusal takes ~2-4 s alone, ~15 s on a loaded 2-core machine


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    cache = tmp_path / "empty-cache"
    out = tmp_path / "r.json"
    env = {
        **os.environ,
        "QUANT_SUITE_CACHE": str(cache),
        "HF_DATASETS_CACHE": str(tmp_path / "hf-datasets"),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "experiments.evaluate", *args, "--out", str(out), "--no-progress"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    proc.elapsed = time.perf_counter() - t0
    assert not out.exists(), "a refused run wrote its --out record"
    assert not (cache / "models").exists(), f"model work happened before the refusal: {sorted(cache.rglob('*'))}"
    assert not (cache / "checkpoints").exists(), "a checkpoint was built before the refusal"
    return proc


def _error_line(proc: subprocess.CompletedProcess, prefix: str = "error: ") -> str:
    """The run failed with status 2 and its stderr ends in exactly one error line, with no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-4000:])
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines, "nothing on stderr"
    last = lines[-1]
    assert last.startswith(prefix), last
    assert len(last) > len(prefix) + 5
    assert sum(1 for line in lines if line.startswith(("error:", f"{PROG}: error:"))) == 1, proc.stderr
    assert proc.elapsed < MAX_SECONDS, f"refusal took {proc.elapsed:.1f} s: validation happens too late"
    return last


def _user_error(tmp_path: Path, *args: str, fragments: tuple[str, ...]) -> str:
    line = _error_line(_run(tmp_path, *args))
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    return line


def _flag_error(tmp_path: Path, flag: str, value: str, fragment: str) -> str:
    """argparse's refusal, routed through UserError: ``error: argument <flag>: ...``, status 2, no usage block."""
    line = _error_line(_run(tmp_path, flag, value), prefix=f"error: argument {flag}: ")
    assert fragment in line, line
    return line


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _copy_checkpoint_with(src: Path, dst: Path, edit) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        if f.name != "rank0.safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    with safe_open(str(src / "rank0.safetensors"), framework="pt") as fh:
        tensors = {name: fh.get_tensor(name) for name in fh.keys()}
    edit(tensors)
    save_file(tensors, str(dst / "rank0.safetensors"))
    return dst


# ------------------------------------------------------------------------------------------ --model


def test_model_nonexistent(tmp_path):
    _user_error(tmp_path, "--model", "/nonexistent", fragments=("--model /nonexistent", "no such file or folder"))


def test_model_gguf_of_another_architecture(tmp_path):
    import gguf

    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    _user_error(tmp_path, "--model", str(path), fragments=("'gpt2'", "only LLaMa-family"))


def test_model_junk_gguf(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"junk" * 64)
    _user_error(tmp_path, "--model", str(path), fragments=("is not a readable GGUF file",))


# ------------------------------------------------------------------------------------------ --dataset


def test_dataset_unknown_name(tmp_path):
    _user_error(tmp_path, "--dataset", "nosuchdataset", fragments=("unknown dataset 'nosuchdataset'",))


def test_dataset_without_usable_columns(tmp_path):
    path = _jsonl(tmp_path / "data.jsonl", [{"title": "a", "body": "b"}, {"title": "c", "body": "d"}])
    _user_error(tmp_path, "--dataset", str(path),
                fragments=("cannot tell which columns", "title", "body", "--input-column"))


def test_dataset_named_column_missing(tmp_path):
    path = _jsonl(tmp_path / "data.jsonl", [{"article": "a", "highlights": "b"}])
    _user_error(tmp_path, "--dataset", str(path), "--input-column", "text",
                fragments=("no column 'text'", "--input-column"))


def test_dataset_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    _user_error(tmp_path, "--dataset", str(path), fragments=(str(path), "is empty"))


def test_dataset_not_json(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"article": "a", "highlights": \n')
    _user_error(tmp_path, "--dataset", str(path), fragments=("broken.jsonl: line 1 is not JSON",))


def test_dataset_unknown_split(tmp_path):
    _user_error(tmp_path, "--split", "nosuchsplit", fragments=("aclsum has no split 'nosuchsplit'",))


# ------------------------------------------------------------------------------------------ numeric flags


@pytest.mark.parametrize("flag,value,fragment", [
    ("--num-samples", "0", "must be > 0, got 0"),
    ("--max-input-len", "0", "must be > 0, got 0"),
    ("--max-output-len", "-1", "must be > 0, got -1"),
    ("--batch-size", "0", "must be > 0, got 0"),
    ("--latency-repeats", "0", "must be > 0, got 0"),
    ("--num-samples", "ten", "expected a positive integer, got 'ten'"),
    ("--compute-dtype", "float64", "invalid choice: 'float64'"),
])
def test_bad_flag_value(tmp_path, flag, value, fragment):
    _flag_error(tmp_path, flag, value, fragment)


# ------------------------------------------------------------------------------------------ recipe, device


def test_unknown_recipe(tmp_path):
    _user_error(tmp_path, "--recipe", "int3", fragments=("unknown recipe 'int3'",))


def test_device_cuda_without_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible here")
    _user_error(tmp_path, "--device", "cuda", fragments=("--device cuda", "no CUDA GPU"))


def test_device_unknown(tmp_path):
    _user_error(tmp_path, "--device", "tpu", fragments=("--device 'tpu'", "expected cpu or cuda"))


# ------------------------------------------------------------------------------------------ --checkpoint


def test_checkpoint_nonexistent(tmp_path):
    _user_error(tmp_path, "--checkpoint", str(tmp_path / "nope"), fragments=("no such folder",))


def test_checkpoint_missing_tensor(tmp_path, default_fp16_checkpoint):
    name = "transformer.layers.7.mlp.fc.weight"
    folder = _copy_checkpoint_with(default_fp16_checkpoint, tmp_path / "ckpt", lambda t: t.pop(name))
    _user_error(tmp_path, "--checkpoint", str(folder), fragments=(str(folder), "missing 1 tensor(s)", name))


def test_checkpoint_wrong_shape(tmp_path, default_fp16_checkpoint):
    import torch

    name = "transformer.layers.3.attention.dense.weight"
    folder = _copy_checkpoint_with(default_fp16_checkpoint, tmp_path / "ckpt",
                                   lambda t: t.__setitem__(name, torch.zeros(576, 512, dtype=torch.float16)))
    _user_error(tmp_path, "--checkpoint", str(folder),
                fragments=(name, "shape [576, 512]", "expected [576, 576]"))
