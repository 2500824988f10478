"""experiments.kernel_quality on the real default model and data. On the CPU every kernel configuration runs the same
kernels, so the paired comparison must come out exactly unchanged: a check of its machinery (the same articles
and documents for every configuration, the pairing, the record and the table); the kernels themselves are compared
on a GPU (experiments/results/gpu/kernels)."""
from __future__ import annotations

import json

import pytest

from experiments.kernel_quality import compare, judge, main, paired

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
        assert v["unchanged"] and v["p_holm"] == 1.0 and v["same_summaries"] == 2 and v["articles"] == 2
        assert v["rouge1_diff"] == {"mean": 0.0, "ci": [0.0, 0.0], "n": 2, "p": 1.0}
        assert v["nll_diff"] == {"mean": 0.0, "ci": [0.0, 0.0], "n": 2, "p": 1.0}
    printed = capsys.readouterr()
    assert "| fp16 | nothen |" in printed.out and "unchanged" in printed.out
    assert "checks the machinery only" in printed.err


BASE = {"per_article": [30.0, 40.0, 35.0, 20.0, 25.0, 33.0], "doc_nll": [2.0, 2.5, 3.0],
        "summaries": ["a", "b", "c", "d", "e", "f"]}
SHIFTED_ROUGE1 = [33.0, 43.5, 38.0, 23.2, 28.1, 36.4]  # BASE's articles, every one about 3 points higher


def _run(*gots) -> tuple[list[str], list[dict]]:
    recipes = [{"recipe": f"r{i}", "versus_reference": {"v": compare(BASE, g)}} for i, g in enumerate(gots)]
    return judge(recipes), recipes


def test_a_consistent_shift_is_changed_and_noise_around_zero_is_not():
    """The verdict's rule on made-up per-item scores (no model): a consistent shift is CHANGED, noise around zero
    is not, identical scores are unchanged with p 1, and an interval on one item bounds nothing."""
    shifted = {**BASE, "per_article": SHIFTED_ROUGE1, "summaries": ["a", *"xyzuv"]}
    noisy = {**BASE, "per_article": [31.0, 39.0, 36.0, 19.0, 25.5, 32.5]}
    changed, recipes = _run(shifted)
    assert changed == ["r0@v"] and recipes[0]["versus_reference"]["v"]["same_summaries"] == 1
    assert _run(noisy)[0] == [] and _run(BASE)[1][0]["versus_reference"]["v"]["p_holm"] == 1.0
    assert compare(BASE, BASE)["rouge1_diff"] == {"mean": 0.0, "ci": [0.0, 0.0], "n": 6, "p": 1.0}
    one = paired([1.0], [2.0])
    assert one["mean"] == 1.0 and one["ci"][0] == float("-inf") and one["p"] == 1.0


def test_the_verdict_holds_the_false_alarm_rate_over_the_whole_run():
    """A shift whose own interval excludes 0 (p about 0.01) is changed when it is one of a run's two tests, and
    not when it is one of twenty (Holm: 0.01 × 20 > 0.05): at 95 % each, twenty tests would call about one row
    changed by chance alone. Its 95 % interval is shown either way."""
    small = {**BASE, "per_article": [a + d for a, d in zip(BASE["per_article"], [0.5, 1.0, 1.5, 0.2, 0.9, 1.3])]}
    d = compare(BASE, small)["rouge1_diff"]
    assert d["ci"][0] > 0 and 0.005 < d["p"] < 0.025
    assert _run(small)[0] == ["r0@v"]
    changed, recipes = _run(small, *[BASE] * 9)
    assert changed == [] and recipes[0]["versus_reference"]["v"]["p_holm"] == pytest.approx(20 * d["p"])


def test_from_record_prints_the_table_again_and_writes_nothing(tmp_path, capsys):
    """--from-record recomputes every comparison from a record's per-item scores; a bad record is one line, exit 2."""
    shifted = {**BASE, "per_article": SHIFTED_ROUGE1, "summaries": list("abcdez"),
               "rouge1": 34.0, "perplexity": 12.0}
    ref = {**BASE, "rouge1": 31.0, "perplexity": 12.0}
    rec = tmp_path / "kq.json"
    rec.write_text(json.dumps({"recipes": [{"recipe": "fp8", "configs": {"reference": ref, "default": shifted}}]}))
    assert main(["--from-record", str(rec)]) == 1
    out, err = capsys.readouterr()
    assert "| fp8 | default | 34.00 | +3.20 [" in out and "5/6 | 12.000 |" in out and "CHANGED" in out
    assert err.strip() == "changed: fp8@default" and sorted(tmp_path.iterdir()) == [rec]
    for bad in ('{"recipes": [{"recipe": "fp8"}]}', json.dumps({"recipes": [{"recipe": "fp8", "configs": {
            "reference": BASE, "default": BASE}}]}), "not json"):  # no configs; no ROUGE-1 to show; not JSON
        (tmp_path / "bad.json").write_text(bad)
        assert main(["--from-record", str(tmp_path / "bad.json")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: --from-record") and "not a kernel_quality record" in err[0]
    assert main(["--from-record", str(tmp_path / "none.json")]) == 2
    assert capsys.readouterr().err.strip().endswith("none.json: cannot read it (No such file or directory)")


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
