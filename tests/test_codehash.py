"""Cache keys follow the code that produced the entry (quant/codehash.py), on a small package tree made here."""
from __future__ import annotations

import pytest

import quant.codehash as ch


@pytest.fixture
def tree(tmp_path, monkeypatch):
    (tmp_path / "quant").mkdir()
    (tmp_path / "experiments").mkdir()
    files = {
        "quant/__init__.py": "",
        "quant/a.py": "import os\nfrom quant import b\n\ndef f():\n    from experiments.c import g  # inside a function\n",
        "quant/b.py": "from . import d\n",
        "quant/d.py": "X = 1\n",
        "quant/unrelated.py": "Y = 2\n",
        "experiments/__init__.py": "",
        "experiments/c.py": "def g():\n    return 1\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).write_text(text)
    monkeypatch.setattr(ch, "ROOT", tmp_path)
    ch.closure.cache_clear()
    ch.code_hash.cache_clear()
    yield tmp_path
    ch.closure.cache_clear()
    ch.code_hash.cache_clear()


def test_closure_follows_every_import_transitively(tree):
    names = {str(p.relative_to(tree)) for p in ch.closure("quant.a")}
    assert names == {"quant/__init__.py", "quant/a.py", "quant/b.py", "quant/d.py", "experiments/__init__.py",
                     "experiments/c.py"}


def test_hash_changes_with_any_file_of_the_closure_and_only_those(tree):
    before = ch.code_hash("quant.a")
    (tree / "quant" / "unrelated.py").write_text("Y = 3\n")
    ch.code_hash.cache_clear()
    assert ch.code_hash("quant.a") == before
    (tree / "quant" / "d.py").write_text("X = 2\n")  # two imports away, through a relative import
    ch.code_hash.cache_clear()
    assert ch.code_hash("quant.a") != before


def test_package_versions_are_part_of_the_hash(tree):
    assert ch.code_hash("quant.a", packages=("numpy",)) != ch.code_hash("quant.a")


def test_non_python_code_a_module_declares_is_in_its_closure_and_hash(tree):
    """A module's ``__code_files__`` (the CUDA sources the runtime compiles) count as its code."""
    (tree / "quant" / "csrc").mkdir()
    (tree / "quant" / "csrc" / "k.cu").write_text("// v1\n")
    (tree / "quant" / "ext.py").write_text('__code_files__ = ("csrc/*",)\n')
    (tree / "quant" / "d.py").write_text("from quant import ext\n")
    ch.closure.cache_clear()
    assert "quant/csrc/k.cu" in {str(p.relative_to(tree)) for p in ch.closure("quant.a")}
    before = ch.code_hash("quant.a")
    (tree / "quant" / "csrc" / "k.cu").write_text("// v2\n")
    ch.code_hash.cache_clear()
    assert ch.code_hash("quant.a") != before


def test_real_cache_keys_cover_the_measuring_and_quantizing_code():
    ch.closure.cache_clear()
    names = {p.name for p in ch.closure("experiments.evaluate")}
    # The evaluation key's old hand-kept list missed modules; the closure has them all.
    assert {"evaluate.py", "latency.py", "rouge.py", "health.py", "torch_runtime.py", "linear.py", "w8a16.py", "kv_cache.py",
            "apply.py", "export.py"} <= names
    assert {"w4a16_gemv.cu", "w8_gemv.cu", "gemv_common.cuh", "bindings.cpp"} <= names  # the compiled kernels
    assert {"apply.py", "export.py", "recipes.py"} <= {p.name for p in ch.closure("quant.apply")}
    assert {"data.py", "datasets.py"} <= {p.name for p in ch.closure("calibration.data")}


def test_checkpoint_key_covers_the_calibration_spec_code(monkeypatch):
    """quant.apply takes the calibration spec as a parameter (it sits below the calibration package), so a
    calibrated checkpoint's key must add the spec's own module: it decides the calibration tokens."""
    from types import SimpleNamespace

    from calibration.data import CalibSpec
    from quant import apply
    from quant.recipes import Recipe

    seen = []
    monkeypatch.setattr(apply, "code_hash", lambda *modules, packages=(): seen.append(modules) or "c0de")
    model = SimpleNamespace(short_hash="m0")
    apply.checkpoint_dir(model, Recipe("smoothquant", alpha=0.5), CalibSpec())
    apply.checkpoint_dir(model, Recipe("fp16"))
    assert seen == [("quant.apply", "calibration.data"), ("quant.apply",)]
