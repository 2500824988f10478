"""experiments.kernel_quality on the real default model and data. On the CPU every kernel configuration runs the same
kernels, so the paired comparison must come out exactly unchanged: a check of its machinery (the same articles
and documents for every configuration, the pairing, the record and the table); the kernels themselves are compared
on a GPU (experiments/results/gpu/kernels)."""
from __future__ import annotations

import json

import pytest

from experiments.kernel_quality import compare, main, paired

SMALL = ["--recipe", "fp16", "--num-samples", "2", "--max-output-len", "12", "--batch-size", "2", "--ppl-docs", "2",
         "--ppl-seq-len", "48", "--device", "cpu", "--no-progress"]


@pytest.mark.slow
def test_every_configuration_on_the_same_articles_unchanged_on_cpu(tmp_path, capsys, default_fp16_checkpoint):
    out = tmp_path / "kq.json"
    assert main([*SMALL, "--variants", "default,nothen", "--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec["articles"] == 2 and rec["documents"] == 2 and rec["device"] == "cpu"
    (r,) = rec["recipes"]
    assert r["recipe"] == "fp16" and list(r["configs"]) == ["reference", "default", "nothen"]
    ref = r["configs"]["reference"]
    assert len(ref["per_article"]) == 2 and len(ref["doc_nll"]) == 2 and all(ref["summaries"])
    for name in ("default", "nothen"):
        v = r["versus_reference"][name]
        assert v["unchanged"] and v["same_summaries"] == 2 and v["articles"] == 2
        assert v["rouge1_diff"] == {"mean": 0.0, "ci": [0.0, 0.0], "n": 2}
        assert v["nll_diff"] == {"mean": 0.0, "ci": [0.0, 0.0], "n": 2}
    printed = capsys.readouterr()
    assert "| fp16 | nothen |" in printed.out and "unchanged" in printed.out
    assert "checks the machinery only" in printed.err


def test_a_difference_outside_its_interval_is_changed_and_one_inside_is_not():
    """The verdict's rule on made-up per-item scores (no model): a consistent shift is CHANGED, noise around zero
    is not, and an interval on one item bounds nothing (it cannot call a change)."""
    base = {"per_article": [30.0, 40.0, 35.0, 20.0], "doc_nll": [2.0, 2.5, 3.0], "summaries": ["a", "b", "c", "d"]}
    shifted = {**base, "per_article": [33.0, 43.5, 38.0, 23.2], "summaries": ["a", "x", "y", "z"]}
    noisy = {**base, "per_article": [31.0, 39.0, 36.0, 19.0]}
    assert not compare(base, shifted)["unchanged"] and compare(base, shifted)["same_summaries"] == 1
    assert compare(base, noisy)["unchanged"]
    assert compare(base, base)["rouge1_diff"] == {"mean": 0.0, "ci": [0.0, 0.0], "n": 4}
    one = paired([1.0], [2.0])
    assert one["mean"] == 1.0 and one["ci"][0] == float("-inf")


@pytest.mark.parametrize("argv, needle", [
    (["--variants", "default,nosuch"], "--variants"),
    (["--variants", "then,then"], "--variants"),
    (["--ppl-docs", "-1"], "--ppl-docs"),
])
def test_bad_input_is_one_line_and_exit_2_with_no_file(tmp_path, capsys, argv, needle):
    out = tmp_path / "kq.json"
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and needle in err[0]
    assert not out.exists()
