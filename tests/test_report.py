"""The report renders a study in any state another worker may leave it in (issue: a worker finishing wrote
report.md while another worker's trial was half-written, and crashed).

Deterministic: the study is written trial by trial through optuna's public API on a real SQLite storage, holding
each trial in the state a concurrent worker can leave it in at the moment the report is written -- RUNNING
with nothing but its worker, RUNNING with its claim, RUNNING with its latency only (stages stored, result not
yet), PRUNED with a reason, FAIL, a repeat -- next to finished trials.
"""
from __future__ import annotations

import csv

import optuna
import pytest
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState

from experiments.report import summarize_study, write_outputs

DIST = {"kind": CategoricalDistribution(["fp16", "int8_wo"])}


def _result(kind: str, tpot: float, rouge1: float | None, *, feasible: bool | None) -> dict:
    lat = {"tpot_mean_ms": tpot, "tpot_ci": [tpot * 0.98, tpot * 1.02], "ttft_ms": 3.0, "tokens_per_s": 100.0,
           "load": {"loaded": False}}
    if rouge1 is None:  # e.g. "slower than a passing trial": latency only, never scored
        return {"hash": f"h-{kind}", "recipe": {"kind": kind}, "latency": lat, "gate": {"slower_than": 0}}
    return {"hash": f"h-{kind}", "recipe": {"kind": kind}, "latency": lat, "n": 8, "rouge1": rouge1,
            "rouge1_ci": [rouge1 - 3, rouge1 + 3], "drop": 35.0 - rouge1, "drop_ci": [-1.0, 2.0],
            "gate": {"status": "pass" if feasible else "fail", "n": 8, "bound": 30.0}, "proxy": {"nll_gap": 0.01},
            "feasible": feasible, "emulated": False, "checkpoint": {"path": "/nowhere"}}


@pytest.fixture
def study(tmp_path):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    s = optuna.create_study(storage=f"sqlite:///{tmp_path / 'study.db'}", study_name="states")
    s.set_user_attr("gate", {"kind": "absolute", "threshold": 14.0, "confidence": None, "bounds": [8, 16]})

    def trial(kind, attrs, state, value=None):
        t = s.ask({"kind": DIST["kind"]}) if kind else s.ask()
        for k, v in attrs.items():
            t.set_user_attr(k, v)
        if state != TrialState.RUNNING:
            s.tell(t, value, state=state) if state == TrialState.COMPLETE else s.tell(t, state=state)
        return t

    trial("fp16", {"label": "fp16", "recipe_hash": "h-fp16", "result": _result("fp16", 30.0, 35.0, feasible=True)},
          TrialState.COMPLETE, 30.0)
    trial("int8_wo", {"label": "int8_wo", "recipe_hash": "h-int8_wo",
                      "result": _result("int8_wo", 20.0, 34.0, feasible=True)}, TrialState.COMPLETE, 20.0)
    trial(None, {"worker": {"pid": 1}}, TrialState.RUNNING)  # just created by another worker
    trial("fp16", {"worker": {"pid": 1}, "recipe_hash": "h-x"}, TrialState.RUNNING)  # claimed, nothing measured
    trial("int8_wo", {"label": "int8_wo-b", "recipe_hash": "h-y",
                      "result": _result("int8_wo", 25.0, None, feasible=None)}, TrialState.PRUNED)
    trial("fp16", {"label": "fp16-c", "pruned_reason": "garbage model"}, TrialState.PRUNED)
    trial("fp16", {"label": "fp16-d", "recipe_hash": "h-z"}, TrialState.FAIL)
    trial("int8_wo", {"label": "int8_wo", "recipe_hash": "h-int8_wo", "repeat_of": 1}, TrialState.PRUNED)
    s.set_user_attr("answer", {"chosen": "h-int8_wo", "label": "int8_wo", "tie": ["h-int8_wo"],
                               "tie_labels": ["int8_wo"], "rule": "fewest weight bytes"})
    return s


def test_the_report_renders_every_trial_state(study, tmp_path):
    summary = summarize_study(study)
    out = tmp_path / "out"
    write_outputs(study, summary, out)
    assert summary.best is not None and summary.best.number == 1
    report = (out / "report.md").read_text()
    assert "int8_wo" in report and "**chosen**" in report
    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert [int(r["number"]) for r in rows] == [0, 1, 2, 3, 4, 5, 6]  # the repeat (#7) is not a row
    assert {r["state"] for r in rows} == {"COMPLETE", "RUNNING", "PRUNED", "FAIL"}
    table = summary.table()
    assert "running" in table and "pruned: garbage model" in table and "slower than #0" in table
    assert summary.verdict().startswith("chosen recipe: int8_wo")
