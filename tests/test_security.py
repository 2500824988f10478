"""Security: no pickle, no model code run unless asked, no password in any output, no path followed from a file.

- Weights only from safetensors: the source tree is parsed (ast, so strings and comments do not count) and no
  ``torch.load`` without ``weights_only=True``, no ``pickle``/``dill``/``joblib`` load, no ``numpy.load`` with
  ``allow_pickle=True``, and no literal ``trust_remote_code=True`` anywhere.
- ``--trust-remote-code``: every CLI that takes --model has it, off by default; a HF folder whose config maps
  the model class to its own Python file is converted *without* running that file, and runs it only with the
  flag -- into another cache entry (the flag is part of the conversion's key), which carries no code.
- Storage credentials: a password given in ``QUANT_SEARCH_STORAGE`` (PostgreSQL) never appears in stdout,
  stderr, the report, CSV, HTML, PNG or YAML outputs, nor in any study/trial attribute.
- Paths in recipe files: a recipe file with ``../../etc/x`` in every field is refused field by field; the
  metadata of a ``best_recipe.yaml`` (its ``checkpoint`` path among them) is never followed: building from such
  a file writes only into the cache.
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests import searchkit as kit

REPO = kit.REPO
SOURCE_DIRS = ("quant", "experiments", "calibration", "tests")


def _python_files() -> list[Path]:
    files = [p for d in SOURCE_DIRS for p in (REPO / d).rglob("*.py")]
    return sorted(files + list(REPO.glob("*.py")))


def _const(node) -> object:
    return node.value if isinstance(node, ast.Constant) else None


def _dotted(node) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def test_no_pickle_loading_and_no_hardcoded_remote_code_anywhere():
    problems = []
    for path in _python_files():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = _dotted(node.func)
            kw = {k.arg: k.value for k in node.keywords if k.arg}
            where = f"{path.relative_to(REPO)}:{node.lineno}"
            if name == "torch.load" and _const(kw.get("weights_only")) is not True:
                problems.append(f"{where}: torch.load without weights_only=True")
            if name in ("pickle.load", "pickle.loads", "cPickle.load", "dill.load", "dill.loads", "joblib.load",
                        "torch.serialization.load", "pickle.Unpickler"):
                problems.append(f"{where}: {name}")
            if name in ("np.load", "numpy.load") and _const(kw.get("allow_pickle")) is True:
                problems.append(f"{where}: {name}(allow_pickle=True)")
            if _const(kw.get("trust_remote_code")) is True:
                problems.append(f"{where}: trust_remote_code=True hard-coded")
            if _const(kw.get("use_safetensors")) is False:
                problems.append(f"{where}: use_safetensors=False")
    assert problems == [], "\n".join(problems)


@pytest.mark.parametrize("module", ["quant.search", "quant.build", "experiments.evaluate", "calibration",
                                    "experiments.recipe_table", "experiments.bench_runtime"])
def test_every_model_cli_has_trust_remote_code_off_by_default(module):
    proc = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "--trust-remote-code" in proc.stdout, proc.stdout[-2000:]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, default_model):
    return kit.crash_reference(tmp_path_factory, default_model)


def test_model_code_runs_only_with_trust_remote_code(reference, tmp_path):
    import shutil

    evil = tmp_path / "evil"
    shutil.copytree(reference["model"], evil)
    config = json.loads((evil / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "evil_model.LlamaForCausalLM"}
    (evil / "config.json").write_text(json.dumps(config))
    (evil / "evil_model.py").write_text(
        "import os, pathlib\n"
        "pathlib.Path(os.environ['EVIL_MARKER']).write_text('this code ran')\n"
        "from transformers import LlamaForCausalLM as _Base\n\n\n"
        "class LlamaForCausalLM(_Base):\n    pass\n")
    marker, cache = tmp_path / "marker", tmp_path / "cache"
    env = kit.env_for(cache, EVIL_MARKER=str(marker), HF_MODULES_CACHE=str(tmp_path / "hf-modules"))
    cmd = [sys.executable, "-m", "calibration", "--model", str(evil), "--calib-samples", "2", "--calib-seq-len", "16",
           "--plot-dir", str(tmp_path / "plots")]

    plain = kit.run(cmd, env)
    assert plain.returncode == 0, plain.stderr[-2000:]
    assert not marker.exists(), "the model folder's Python code ran without --trust-remote-code"
    entries = {p.name for p in (cache / "models").glob("[!.]*")}  # (not the entries' lock and use markers)
    assert len(entries) == 1

    trusted = kit.run([*cmd, "--trust-remote-code"], env)
    assert trusted.returncode == 0, trusted.stderr[-2000:]
    assert marker.read_text() == "this code ran", "--trust-remote-code did not reach transformers"
    after = {p.name for p in (cache / "models").glob("[!.]*")}
    assert len(after) == 2 and entries < after, "a trusted conversion must not share the untrusted one's key"
    for folder in (cache / "models").glob("[!.]*"):  # and no cached conversion carries or points at code
        assert not list(folder.glob("*.py")) and "auto_map" not in (folder / "config.json").read_text()


def test_storage_password_never_reaches_any_output(reference, tmp_path):
    from tests.test_search import _pg_url

    base = _pg_url()
    from sqlalchemy.engine import make_url

    secret = "Pw-9f3e2a-never-print-me"
    url = make_url(base).set(password=secret).render_as_string(hide_password=False)
    probe = subprocess.run([sys.executable, "-c", "import sqlalchemy, sys; sqlalchemy.create_engine(sys.argv[1])"
                            ".connect().close()", url], capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        pytest.skip("the test server checks passwords; this test needs one that accepts any (trust auth, as "
                    ".ci/start-postgres starts it)")
    name = f"secret-{tmp_path.name}"
    results = tmp_path / "results"
    cache = kit.snapshot(reference, tmp_path / "cache", None)
    proc = kit.run(kit.search_cmd(reference["model"], results, *kit.THRESHOLD, "--study-name", name),
                   kit.env_for(cache, QUANT_SEARCH_STORAGE=url))
    assert proc.returncode == 0, proc.stderr[-3000:].replace(secret, "<SECRET>")
    assert secret not in proc.stdout and secret not in proc.stderr
    for path in results.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), f"the password is in {path}"
    import optuna

    storage = optuna.storages.get_storage(url)
    study = optuna.load_study(study_name=name, storage=storage)
    try:
        system_attrs = storage.get_study_system_attrs(storage.get_study_id_from_name(name))  # public storage API
        blob = json.dumps([study.user_attrs, system_attrs]
                          + [[t.user_attrs, t.system_attrs, t.params] for t in study.trials], default=str)
        assert secret not in blob
        # The plot CLI on the same storage prints nothing of it either.
        plot = kit.run([sys.executable, "-m", "experiments.plot", "--study-name", name, "--results-dir",
                        str(tmp_path / "plots")], kit.env_for(cache, QUANT_SEARCH_STORAGE=url))
        assert plot.returncode == 0, plot.stderr[-2000:].replace(secret, "<SECRET>")
        assert secret not in plot.stdout + plot.stderr
        for path in (tmp_path / "plots").rglob("*"):
            assert secret.encode() not in path.read_bytes(), f"the password is in {path}"
    finally:
        optuna.delete_study(study_name=name, storage=url)


HOSTILE = "../../etc/x"
FIELDS = {
    "kind": ("kind", "unknown recipe '../../etc/x'"),
    "alpha": ("kind: smoothquant\nalpha", "alpha must be a number"),
    "group_size": ("kind: int4_awq\ngroup_size", "group_size must be an integer"),
    "awq_alpha_step": ("kind: int4_awq\nawq_alpha_step", "awq_alpha_step must be a number"),
    "awq_clip": ("kind: int4_awq\nawq_clip", "awq_clip must be true or false"),
    "kv_cache": ("kind: fp8\nkv_cache", "unknown kv_cache '../../etc/x'"),
    "exclude": ("kind: int8_wo\nexclude", "exclude pattern '../../etc/x' matches no layer"),
    "unknown": ("kind: fp16\noutput", "unknown recipe field(s): output"),
}


def _sandbox(tmp_path: Path) -> Path:
    work = tmp_path / "work" / "a" / "b"  # ../../etc/x from here is tmp_path/work/etc/x
    work.mkdir(parents=True)
    return work


@pytest.mark.parametrize("field", FIELDS)
def test_recipe_file_with_a_path_in_a_field_is_refused(field, reference, tmp_path):
    work = _sandbox(tmp_path)
    prefix, fragment = FIELDS[field]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"{prefix}: {HOSTILE}\n")
    cache = kit.snapshot(reference, tmp_path / "cache", None)
    before = {p for p in tmp_path.rglob("*")}
    proc = subprocess.run([sys.executable, "-m", "quant.build", "--recipe", str(recipe), "--model",
                           str(reference["model"])], cwd=work, env=kit.env_for(cache), capture_output=True,
                          text=True, timeout=300)
    line = kit.error_line(proc)
    assert fragment in line, line
    assert {p for p in tmp_path.rglob("*")} <= before, "a refused build wrote"
    assert not (tmp_path / "work" / "etc").exists()


def test_best_recipe_metadata_paths_are_never_followed(reference, tmp_path):
    work = _sandbox(tmp_path)
    best = tmp_path / "best_recipe.yaml"
    best.write_text(f"recipe:\n  kind: fp16\ncheckpoint: {HOSTILE}\nstudy: {HOSTILE}\ntrial: {HOSTILE}\n"
                    f"threshold: {HOSTILE}\nrouge1: {HOSTILE}\n")
    cache = kit.snapshot(reference, tmp_path / "cache", None)
    proc = subprocess.run([sys.executable, "-m", "quant.build", "--recipe", str(best), "--model",
                           str(reference["model"])], cwd=work, env=kit.env_for(cache), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"checkpoint   {cache / 'checkpoints'}" in proc.stdout, proc.stdout
    assert HOSTILE not in proc.stdout
    assert not (tmp_path / "work" / "etc").exists() and sorted(p.name for p in work.iterdir()) == []


@pytest.mark.parametrize("command", [["experiments.plot", "--study-name", "s"],
                                     ["quant.search", "--min-rouge1", "14", "--model", "no-such-model"]])
def test_a_wrong_storage_password_is_one_line_without_the_password(command, tmp_path):
    """Against a server that checks passwords: .ci/start-postgres checks quant_pw's (every other user is trusted).
    Whether it comes on the command line or in $QUANT_SEARCH_STORAGE, a refused password is one line, exit 2,
    and no part of it is printed; nothing is written."""
    from sqlalchemy.engine import make_url

    from tests.test_search import _pg_url

    base = make_url(_pg_url()).set(username="quant_pw")
    right = base.set(password="quant-pw").render_as_string(hide_password=False)
    probe = subprocess.run([sys.executable, "-c", "import sqlalchemy, sys; sqlalchemy.create_engine(sys.argv[1])"
                            ".connect().close()", right], capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        pytest.skip("the test server has no password-checked user quant_pw (.ci/start-postgres creates it)")
    secret = "Wrong-7c1d-never-print-me"
    wrong = base.set(password=secret).render_as_string(hide_password=False)
    results = tmp_path / "results"
    for how in ("flag", "env"):
        argv = [*command, "--results-dir", str(results)] + (["--storage", wrong] if how == "flag" else [])
        env = kit.env_for(tmp_path / "cache", **({"QUANT_SEARCH_STORAGE": wrong} if how == "env" else {}))
        proc = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, timeout=120, env=env,
                              cwd=kit.REPO)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 2, out[-2000:].replace(secret, "<SECRET>")
        assert "password authentication failed" in out and "quant_pw:***@" in out, out
        assert secret not in out and secret[:8] not in out
        assert len(proc.stderr.strip().splitlines()) == 1, out.replace(secret, "<SECRET>")
        assert not results.exists() or not any(results.iterdir())
