"""A corpus of bad input across every CLI: one ``error: ...`` line, exit status 2, no traceback, nothing written.

Each case runs the real CLI in a subprocess (cwd: an empty work folder, so a default output path would show up
there) and checks:

- exit status 2, no "Traceback", the last stderr line starts with ``error:`` and is the only one that does, and
  it names what is wrong (the case's fragments);
- nothing was written: every file under the case's folder (work folder, cache, the inputs themselves) has the
  same size and mtime afterwards, and no file appeared -- except what the case lists as legitimately written
  before the problem could be known (e.g. a model conversion that had to run to discover NaN activations);
- where a case carries a secret (a storage password), it appears nowhere in the output.

Cases already covered elsewhere are not repeated here (see docs/reliability.md for the full map):
tests/test_cli_bad_input.py (experiments.evaluate: --model nonexistent/GGUF of another architecture/junk GGUF,
datasets, numeric flags, unknown recipe, --device, --checkpoint missing tensor/wrong shape), tests/test_search.py
(--min-rouge1 range, both/neither gate, --n-trials 0, malformed and unreachable --storage, unknown --recipes),
tests/test_checkpoint.py (config.json field types, truncated/junk/missing rank0.safetensors, MIXED_PRECISION),
tests/test_model_source.py (non-LLaMa, pickle-only, truncated weights, no tokenizer, empty GGUF),
tests/test_calibration.py and tests/test_recipes.py (damaged statistics cache, recipe validation).
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from tests import searchkit as kit

SECRET = "hunter2-Secret"


@dataclass
class Case:
    id: str
    module: str
    args: list[str] | Callable[["Ctx"], list[str]]
    fragments: tuple[str, ...]
    setup: Callable[["Ctx"], None] | None = None
    cache: str = "empty"  # "empty" | "reference" (a hard-linked copy of the crash-test reference cache)
    allow: tuple[str, ...] = ()  # globs (relative to the case folder) that may legitimately appear or change
    env: dict = field(default_factory=dict)
    secret: str | None = None


class Ctx:
    def __init__(self, root: Path, reference: dict):
        self.root, self.reference = root, reference
        self.inp = root / "in"
        self.inp.mkdir()
        self.model = reference["model"]

    def p(self, name: str) -> str:
        return str(self.inp / name)

    def tiny_copy(self, name: str = "tiny") -> Path:
        dst = self.inp / name
        shutil.copytree(self.model, dst)
        return dst

    def ref_checkpoint(self, quantized: bool) -> Path:
        for folder in sorted((self.reference["cache"] / "checkpoints").glob("[!.]*")):
            cfg = json.loads((folder / "config.json").read_text())
            if bool((cfg.get("quantization") or {}).get("quant_algo")) == quantized:
                return folder
        raise AssertionError("the reference cache has no such checkpoint")

    def checkpoint_copy(self, quantized: bool, name: str = "ckpt") -> Path:
        dst = self.inp / name
        shutil.copytree(self.ref_checkpoint(quantized), dst)
        return dst


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        target = data
        *parents, last = key.split("__")
        for parent in parents:
            target = target.setdefault(parent, {})
        target[last] = value
    path.unlink()  # never write through a hard link into the shared reference cache
    path.write_text(json.dumps(data))


def _replace(path: Path, data: bytes) -> None:
    path.unlink()  # a fresh inode: the reference cache's file (hard-linked) stays intact
    path.write_bytes(data)


# -- setups ------------------------------------------------------------------------------------------------------
def _truncated_weights(c: Ctx) -> None:
    w = c.tiny_copy() / "model.safetensors"
    _replace(w, w.read_bytes()[:200_000])


def _config_wrong_type(c: Ctx) -> None:
    _edit_json(c.tiny_copy() / "config.json", hidden_size="64")


def _config_huge_layers(c: Ctx) -> None:
    _edit_json(c.tiny_copy() / "config.json", num_hidden_layers=100_000_000)


def _config_kv_heads(c: Ctx) -> None:
    _edit_json(c.tiny_copy() / "config.json", num_key_value_heads=3)


def _nan_activations(c: Ctx) -> None:
    from safetensors.torch import load_file, save_file

    w = c.tiny_copy() / "model.safetensors"
    tensors = load_file(str(w))
    tensors["model.layers.0.mlp.down_proj.weight"][:, :] = float("nan")
    w.unlink()
    save_file(tensors, str(w), metadata={"format": "pt"})


def _truncated_gguf(c: Ctx) -> None:
    from quant.model_source import default_gguf

    with open(default_gguf(), "rb") as src:
        Path(c.p("trunc.gguf")).write_bytes(src.read(8_000_000))


def _junk_parquet(c: Ctx) -> None:
    Path(c.p("data.parquet")).write_bytes(b"PAR1" + b"\x00garbage" * 64)


def _foreign_db(c: Ctx) -> None:
    import sqlite3

    con = sqlite3.connect(c.p("foreign.db"))
    con.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
    con.commit()
    con.close()


def _junk_db(c: Ctx) -> None:
    Path(c.p("study.db")).write_bytes(b"SQLite format 2\x00" + os.urandom(512))


def _results_with_junk_db(c: Ctx) -> None:
    (c.root / "work" / "results").mkdir(parents=True)
    (c.root / "work" / "results" / "study.db").write_bytes(os.urandom(4096))


def _results_with_empty_db(c: Ctx) -> None:
    (c.root / "work" / "results").mkdir(parents=True)
    (c.root / "work" / "results" / "study.db").write_bytes(b"")


def _empty_results(c: Ctx) -> None:
    (c.root / "work" / "results").mkdir(parents=True)


def _valid_db(c: Ctx) -> None:
    import optuna

    optuna.create_study(study_name="other", storage=f"sqlite:///{c.p('valid.db')}")


def _study_measured_differently(c: Ctx) -> None:
    """The reference search's own study, continued with another --num-samples."""
    results = c.root / "work" / "results"
    results.mkdir(parents=True)
    shutil.copy(c.reference["cache"].parent / "results" / "study.db", results / "study.db")


def _study_with_tampered_calibration(c: Ctx) -> None:
    import optuna
    from optuna.distributions import CategoricalDistribution

    study = optuna.create_study(study_name="s", storage=f"sqlite:///{c.p('s.db')}")
    attrs = {"recipe": {"kind": "fp16"}, "label": "fp16", "rouge1": 20.0, "tpot_ms": 1.0, "ttft_ms": 1.0,
             "tokens_per_s": 1.0, "feasible": True, "rouge1_ci": [19.0, 21.0], "checkpoint": ""}
    study.add_trial(optuna.trial.create_trial(params={"kind": "fp16"},
                                              distributions={"kind": CategoricalDistribution(["fp16"])},
                                              value=1.0, user_attrs=attrs))
    study.set_user_attr("calibration", {"source": "aclsum", "bogus": 1})


def _corrupt_fp16_record(c: Ctx) -> None:
    for path in (c.root / "cache" / "evaluations").glob("*.json"):
        if json.loads(path.read_text())["recipe"] == {"kind": "fp16", "alpha": None, "group_size": None,
                                                      "awq_alpha_step": None, "awq_clip": False,
                                                      "kv_cache": "none", "exclude": []}:
            _replace(path, path.read_bytes()[:300])
            return
    raise AssertionError("no fp16 record in the reference cache")


def _corrupt_stats(c: Ctx) -> None:
    (tensors,) = (c.root / "cache" / "calib").glob("*/stats.safetensors")
    _replace(tensors, tensors.read_bytes()[:-64])


def _nan_scale_checkpoint(c: Ctx) -> None:
    from safetensors.torch import load_file, save_file

    w = c.checkpoint_copy(quantized=True) / "rank0.safetensors"
    tensors = load_file(str(w))
    name = next(n for n in tensors if n.endswith("scaling_factor"))
    tensors[name] = tensors[name].clone().fill_(float("nan"))
    w.unlink()
    save_file(tensors, str(w))


def _checkpoint_field(**changes):
    def setup(c: Ctx) -> None:
        _edit_json(c.checkpoint_copy(quantized=False) / "config.json", **changes)
    return setup


def _mixed_precision_junk_cfg(c: Ctx) -> None:
    ckpt = c.checkpoint_copy(quantized=True)
    _edit_json(ckpt / "config.json", quantization__quant_algo="MIXED_PRECISION")
    (ckpt / "quant_cfg.json").unlink(missing_ok=True)
    (ckpt / "quant_cfg.json").write_text('{"quantized_layers": {')


def _safetensors_overlong_header(c: Ctx) -> None:
    ckpt = c.checkpoint_copy(quantized=False)
    header = json.dumps({"transformer.vocab_embedding.weight": {"dtype": "F16", "shape": [49152, 64],
                                                                "data_offsets": [0, 49152 * 64 * 2]}}).encode()
    _replace(ckpt / "rank0.safetensors", struct.pack("<Q", len(header)) + header + b"\x00" * 1024)


def _recipe_file(text: str | bytes):
    def setup(c: Ctx) -> None:
        f = Path(c.p("recipe.yaml"))
        f.write_bytes(text) if isinstance(text, bytes) else f.write_text(text)
    return setup


def _existing_dir(name: str):
    def setup(c: Ctx) -> None:
        (c.root / "work" / name).mkdir(parents=True)
    return setup


def _file_in_the_way(c: Ctx) -> None:
    (c.root / "work").mkdir(exist_ok=True)
    (c.root / "work" / "afile").write_text("x")


def _jsonl(rows):
    def setup(c: Ctx) -> None:
        Path(c.p("data.jsonl")).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return setup


def _bin_source(c: Ctx) -> None:
    Path(c.p("calib.bin")).write_bytes(b"\x00" * 16)


def _junk_table(c: Ctx) -> None:
    Path(c.p("table.json")).write_text("[1, 2, 3]")


S = "quant.search"
B = "quant.build"
CK = "quant.checkpoint"
EV = "experiments.evaluate"
PL = "experiments.plot"
CA = "calibration"
FAST = kit.SEARCH_FLAGS


def _search(*extra):
    return lambda c: ["--model", str(c.model), *FAST, *extra]


CASES = [
    # -- quant.search: flags, storage, model, data, damaged artifacts -----------------------------------------------
    Case("search-confidence-range", S, ["--min-rouge1", "14", "--confidence", "1.5"], ("--confidence must be in (0, 1)",)),
    Case("search-timeout-zero", S, ["--min-rouge1", "14", "--timeout", "0"], ("--timeout must be > 0",)),
    Case("search-timeout-nan", S, ["--min-rouge1", "14", "--timeout", "nan"], ("--timeout must be > 0", "nan")),
    Case("search-ppl-docs-negative", S, ["--min-rouge1", "14", "--ppl-docs", "-1"], ("--ppl-docs must be > 0",)),
    Case("search-max-drop-negative", S, ["--max-rouge1-drop", "-1"], ("--max-rouge1-drop must be in [0, 100]",)),
    Case("search-recipes-empty", S, ["--min-rouge1", "14", "--recipes", ","], ("--recipes", "(none given)")),
    Case("search-storage-env-unreachable", S, ["--min-rouge1", "14"], ("cannot open storage", "quant:***@"),
         env={"QUANT_SEARCH_STORAGE": f"postgresql://quant:{SECRET}@127.0.0.1:1/nodb"}, secret=SECRET),
    Case("search-seed-negative", S, ["--min-rouge1", "14", "--seed", "-1"],
         ("argument --seed", "must be in [0, 2**32 - 1], got -1")),
    Case("search-seed-too-big", S, ["--min-rouge1", "14", "--seed", str(2**32)], ("argument --seed", "4294967296")),
    Case("search-eval-seed-negative", S, ["--min-rouge1", "14", "--eval-seed", "-1"],
         ("argument --eval-seed", "must be in [0, 2**32 - 1]")),
    Case("search-results-dir-on-proc", S, ["--min-rouge1", "14", "--results-dir", "/proc/quant-results"],
         ("--results-dir /proc/quant-results is not writable",)),
    Case("search-storage-sqlite-unopenable", S, ["--min-rouge1", "14", "--storage", "sqlite:////nonexistent/x.db"],
         ("cannot open storage", "unable to open database file")),
    Case("search-storage-missing-driver", S, ["--min-rouge1", "14", "--storage", f"mysql://u:{SECRET}@localhost/db"],
         ("cannot open storage", "mysql://u:***@localhost/db"), secret=SECRET),
    Case("search-study-db-corrupt", S, ["--min-rouge1", "14", "--results-dir", "results"],
         ("cannot open storage", "file is not a database"), setup=_results_with_junk_db),
    Case("search-model-truncated-safetensors", S, lambda c: ["--min-rouge1", "1", "--model", c.p("tiny")],
         ("model.safetensors is not a readable safetensors file",), setup=_truncated_weights),
    Case("search-model-config-wrong-type", S, lambda c: ["--min-rouge1", "1", "--model", c.p("tiny")],
         ("config.json: hidden_size must be an integer", "'64'"), setup=_config_wrong_type),
    Case("search-model-implausible-layers", S, lambda c: ["--min-rouge1", "1", "--model", c.p("tiny")],
         ("num_hidden_layers must be an integer in [1, 1024]", "100000000"), setup=_config_huge_layers),
    Case("search-study-measured-differently", S,
         lambda c: ["--model", str(c.model), *FAST, *kit.THRESHOLD, "--num-samples", "4", "--results-dir", "results"],
         ("study 'quant-search' was measured differently", "num_samples 3 → 4", "--study-name"),
         setup=_study_measured_differently, cache="reference"),
    Case("search-evaluation-record-corrupt", S, _search(*kit.THRESHOLD, "--results-dir", "results"),
         ("evaluation record", "is unreadable", "delete"), setup=_corrupt_fp16_record, cache="reference",
         allow=("work/results/study.db*",)),  # opened before the baseline reads the record
    Case("search-statistics-cache-truncated", S, _search(*kit.THRESHOLD, "--results-dir", "results"),
         ("stats.safetensors is corrupt or truncated (checksum mismatch)", "delete"), setup=_corrupt_stats,
         cache="reference", allow=("work/results/study.db*",)),
    # -- quant.build ------------------------------------------------------------------------------------------------
    Case("build-recipe-file-not-yaml", B, lambda c: ["--recipe", c.p("recipe.yaml")], ("is not valid YAML/JSON",),
         setup=_recipe_file("kind: [unclosed\n")),
    Case("build-recipe-file-binary", B, lambda c: ["--recipe", c.p("recipe.yaml")],
         ("recipe.yaml is not UTF-8 text",), setup=_recipe_file(bytes(range(256)) * 4)),
    Case("build-recipe-file-duplicate-key", B, lambda c: ["--recipe", c.p("recipe.yaml")],
         ("key 'alpha' given twice",), setup=_recipe_file("kind: smoothquant\nalpha: 0.5\nalpha: 0.9\n")),
    Case("build-recipe-inline-duplicate-key", B, ["--recipe", "smoothquant:alpha=0.5,alpha=0.9"],
         ("alpha given twice",)),
    Case("build-recipe-file-wrong-type", B, lambda c: ["--recipe", c.p("recipe.yaml")],
         ("awq_alpha_step must be a number", "'fast'"), setup=_recipe_file("kind: int4_awq\nawq_alpha_step: fast\n")),
    Case("build-recipe-file-a-list", B, lambda c: ["--recipe", c.p("recipe.yaml")], ("a recipe must be a mapping",),
         setup=_recipe_file("- fp16\n- int8_wo\n")),
    Case("build-recipe-exclude-not-strings", B, lambda c: ["--recipe", c.p("recipe.yaml")],
         ("exclude must be a list of layer patterns",), setup=_recipe_file("kind: int8_wo\nexclude: [1, 2]\n")),
    Case("build-group-size-not-dividing", B,
         lambda c: ["--recipe", "int4_awq:group_size=128", "--model", str(c.model)],
         ("int4_awq group_size 128 does not divide the model's hidden_size 64", "use one of [32, 64]"),
         cache="reference"),
    Case("build-output-exists", B, ["--output", "out"], ("--output out already exists",), setup=_existing_dir("out")),
    Case("build-timeout-zero", B, ["--build-timeout", "0"], ("--build-timeout must be > 0",)),
    Case("build-engine-dir-under-a-file", B, ["--engine-dir", "afile/engine"], ("is a file, not a folder",),
         setup=_file_in_the_way),
    Case("build-from-study-with-recipe", B, ["--from-study", "x", "--recipe", "int8_wo", "--calib-samples", "4"],
         ("--from-study takes the recipe, model and calibration from the study", "drop --recipe, --calib-samples")),
    Case("build-cache-on-proc", B, ["--no-engine"], ("cache folder ($QUANT_SUITE_CACHE) /proc/quant-cache/models",
                                                     "is not writable"), env={"QUANT_SUITE_CACHE": "/proc/quant-cache"}),
    Case("build-model-fake-gguf", B, lambda c: ["--model", c.p("fake.gguf")], ("fake.gguf is not a readable GGUF file",),
         setup=lambda c: Path(c.p("fake.gguf")).write_bytes(b"not a gguf at all" * 100)),
    Case("build-from-study-db-corrupt", B, lambda c: ["--from-study", "x", "--storage", f"sqlite:///{c.p('study.db')}"],
         ("cannot open storage", "file is not a database"), setup=_junk_db),
    Case("build-from-study-tampered-calibration", B,
         lambda c: ["--from-study", "s", "--storage", f"sqlite:///{c.p('s.db')}"],
         ("study 's' has a malformed calibration attribute", "bogus"), setup=_study_with_tampered_calibration),
    Case("build-model-truncated-gguf", B, lambda c: ["--model", c.p("trunc.gguf")],
         ("trunc.gguf is not a readable GGUF file",), setup=_truncated_gguf),
    # -- quant.checkpoint --------------------------------------------------------------------------------------------
    Case("checkpoint-nan-scales", CK, lambda c: [c.p("ckpt")], ("non-finite or non-positive scales",),
         setup=_nan_scale_checkpoint),
    Case("checkpoint-implausible-layers", CK, lambda c: [c.p("ckpt")], ("num_hidden_layers 100000000 is implausible",),
         setup=_checkpoint_field(num_hidden_layers=100_000_000)),
    Case("checkpoint-layer-count-disagrees", CK, lambda c: [c.p("ckpt")],
         ("config.json says num_hidden_layers 7 but rank0.safetensors holds", "a config.json problem"),
         setup=_checkpoint_field(num_hidden_layers=7)),
    Case("checkpoint-quant-algo-not-a-string", CK, lambda c: [c.p("ckpt")],
         ("quantization.quant_algo must be a string or null, got 5",), setup=_checkpoint_field(quantization__quant_algo=5)),
    Case("checkpoint-quant-cfg-not-json", CK, lambda c: [c.p("ckpt")],
         ("MIXED_PRECISION needs a readable quant_cfg.json",), setup=_mixed_precision_junk_cfg),
    Case("checkpoint-safetensors-header-overruns-file", CK, lambda c: [c.p("ckpt")],
         ("rank0.safetensors is unreadable",), setup=_safetensors_overlong_header),
    # -- experiments.evaluate ----------------------------------------------------------------------------------------
    Case("evaluate-out-is-a-folder", EV, ["--out", "outdir"], ("--out outdir exists and is not a regular file",),
         setup=_existing_dir("outdir")),
    Case("evaluate-out-is-a-device", EV, ["--out", "/dev/full"], ("--out /dev/full exists and is not a regular file",)),
    Case("evaluate-ppl-docs-negative", EV, ["--ppl-docs", "-1"], ("--ppl-docs must be >= 0",)),
    Case("evaluate-input-len-zero", EV, ["--input-len", "0"], ("argument --input-len", "must be > 0, got 0")),
    Case("evaluate-calib-source-missing", EV, lambda c: ["--calib-source", c.p("nope.txt")],
         ("unknown calibration source",)),
    Case("evaluate-dataset-corrupt-parquet", EV, lambda c: ["--dataset", c.p("data.parquet")],
         ("could not read", "data.parquet", "as parquet"), setup=_junk_parquet),
    Case("evaluate-checkpoint-dtype-wrong-type", EV, lambda c: ["--checkpoint", c.p("ckpt")],
         ("config.json dtype must be one of", "16"), setup=_checkpoint_field(dtype=16)),
    # -- experiments.plot --------------------------------------------------------------------------------------------
    Case("plot-no-study-db", PL, ["--results-dir", "results"], ("no study database in results",), setup=_empty_results),
    Case("plot-empty-study-db", PL, ["--results-dir", "results"], ("no study database at", "missing or empty"),
         setup=_results_with_empty_db),
    Case("plot-study-db-corrupt", PL, lambda c: ["--storage", f"sqlite:///{c.p('study.db')}"],
         ("cannot open storage", "file is not a database"), setup=_junk_db),
    Case("plot-foreign-sqlite-db", PL, lambda c: ["--storage", f"sqlite:///{c.p('foreign.db')}"],
         ("foreign.db is not an optuna study database",), setup=_foreign_db),
    Case("build-from-study-foreign-sqlite-db", B,
         lambda c: ["--from-study", "x", "--storage", f"sqlite:///{c.p('foreign.db')}"],
         ("foreign.db is not an optuna study database",), setup=_foreign_db),
    Case("plot-unknown-study", PL, lambda c: ["--storage", f"sqlite:///{c.p('valid.db')}", "--study-name", "nope"],
         ("no study named 'nope'",), setup=_valid_db),
    # -- python -m calibration ---------------------------------------------------------------------------------------
    Case("calibration-source-wrong-suffix", CA, lambda c: ["--source", c.p("calib.bin")],
         ("cannot calibrate on", "expected a .txt"), setup=_bin_source),
    Case("calibration-source-without-text-column", CA, lambda c: ["--source", c.p("data.jsonl")],
         ("data.jsonl: no text column among", "--text-column"), setup=_jsonl([{"title": "a", "body": "b"}])),
    Case("calibration-top-zero", CA, ["--top", "0"], ("argument --top", "must be > 0")),
    Case("calibration-seed-negative", CA, ["--seed", "-1"], ("argument --calib-seed/--seed", "must be in [0, 2**32 - 1]")),
    Case("calibration-model-kv-heads", CA, lambda c: ["--model", c.p("tiny")],
         ("num_key_value_heads must be a positive divisor of num_attention_heads", "3"), setup=_config_kv_heads),
    Case("calibration-plot-dir-under-a-file", CA, ["--plot-dir", "afile/plots"], ("is a file, not a folder",),
         setup=_file_in_the_way),
    Case("calibration-nan-activations", CA,
         lambda c: ["--model", c.p("tiny"), "--calib-samples", "2", "--calib-seq-len", "32", "--plot-dir", "plots"],
         ("produces non-finite activations at the input of layers.", "cannot be calibrated"),
         setup=_nan_activations, allow=("cache/models/*", "cache/models/*/*", "cache/hash-memo.json")),  # the conversion must run first
    # -- the other CLIs ----------------------------------------------------------------------------------------------
    Case("recipe-table-record-not-a-table", "experiments.recipe_table",
         lambda c: ["--remeasure-latency", "--out", c.p("table.json")], ("is not a recipe table",), setup=_junk_table),
    Case("bench-runtime-batch-sizes", "experiments.bench_runtime", ["--batch-sizes", "1,x"],
         ("--batch-sizes must be comma-separated positive integers",)),
    # a kernel variant's typo is told before the device check, so on a machine without a GPU too
    Case("bench-unknown-kernel-variant", "experiments.bench", ["--recipes", "fp16,int4_awq@w4mx", "--no-hf"],
         ("unknown recipe(s) int4_awq@w4mx", "@w4m8")),
    Case("attn-bench-tile-out-of-range", "experiments.attn_bench", ["--tiles", "64x0w4,48x0w4"],
         ("--tiles: '48x0w4' is not a tile BxSwW",)),
    Case("attn-bench-out-under-a-file", "experiments.attn_bench", ["--out", "afile/x.json"],
         ("is a file, not a folder",), setup=_file_in_the_way),  # told before the GPU's minutes
    Case("bench-attention-tile-out-of-range", "experiments.bench", ["--recipes", "fp16@attn48x64w4", "--no-hf"],
         ("unknown recipe(s) fp16@attn48x64w4", "@attnBxSwW")),
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, default_model):
    return kit.crash_reference(tmp_path_factory, default_model)


def _state(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, reference, tmp_path):
    import fnmatch

    ctx = Ctx(tmp_path, reference)
    work, cache = tmp_path / "work", tmp_path / "cache"
    if case.cache == "reference":
        kit.snapshot(reference, cache, None)
    if case.setup:
        case.setup(ctx)
    work.mkdir(exist_ok=True)
    args = case.args(ctx) if callable(case.args) else case.args
    before = _state(tmp_path)
    env = kit.env_for(cache, HF_DATASETS_CACHE=str(tmp_path / "hf-datasets"), **case.env)
    proc = subprocess.run([sys.executable, "-m", case.module, *args], cwd=work, env=env, capture_output=True,
                          text=True, timeout=300)
    line = kit.error_line(proc)
    for fragment in case.fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    if case.secret:
        assert case.secret not in proc.stdout + proc.stderr, "a password reached the output"
    after = _state(tmp_path)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k)
                     and not k.startswith("hf-datasets") and not any(fnmatch.fnmatch(k, a) for a in case.allow))
    assert changed == [], f"a refused run wrote {changed}"
    if case.id == "evaluate-out-is-a-device":
        assert Path("/dev/full").is_char_device()


def test_the_corpus_covers_every_cli():
    modules = {c.module for c in CASES}
    assert {S, B, CK, EV, PL, CA} <= modules and len(CASES) >= 30
