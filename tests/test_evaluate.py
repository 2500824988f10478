"""End to end on the real default model and real data: checkpoint → runtime → summaries → ROUGE → latency."""
from __future__ import annotations

import json

import pytest

from experiments.evaluate import main

SMALL = ["--num-samples", "3", "--max-output-len", "24", "--batch-size", "2", "--input-len", "32",
         "--output-len", "4", "--latency-repeats", "2", "--no-progress"]


@pytest.mark.slow
def test_evaluate_default_model_on_aclsum(tmp_path, capsys, default_fp16_checkpoint, monkeypatch):
    """... and the latency is timed under the device's exclusive claim, the rest under its shared one (the trace of
    experiments.device_use), as a search worker times it: another process's work never runs inside it."""
    out, trace = tmp_path / "rec.json", tmp_path / "trace.jsonl"
    monkeypatch.setenv("QUANT_SUITE_TRACE", str(trace))
    monkeypatch.setenv("QUANT_SUITE_LOCK_DIR", str(tmp_path / "locks"))
    assert main([*SMALL, "--out", str(out)]) == 0
    device = [e["event"] for e in map(json.loads, trace.read_text().splitlines()) if e["event"].startswith("device.")]
    assert device == ["device.shared", "device.released", "device.exclusive", "device.released", "device.shared",
                      "device.released"]
    rec = json.loads(out.read_text())
    assert rec["recipe"]["kind"] == "fp16" and rec["recipe"]["kv_cache"] == "none" and not rec["recipe"]["exclude"]
    assert rec["checkpoint"]["path"] == str(default_fp16_checkpoint)
    assert rec["dataset"]["num_samples"] == 3 and rec["dataset"]["chat_template"] is True
    r = rec["rouge"]
    assert 5 < r["rouge1"] < 80, "a working 135M model summarizes abstracts with some word overlap"
    lo, hi = r["rouge1_ci"]
    assert lo <= r["rouge1"] <= hi
    assert all(s["prediction"] for s in rec["samples"])
    lat = rec["latency"]
    assert lat["batch_size"] == 2 and lat["input_len"] == 32 and lat["output_len"] == 4
    assert 0 < lat["tpot_ms"] < lat["e2e_ms"] and lat["ttft_ms"] > 0
    assert lat["weight_bytes"] > 100e6 and lat["implied_bandwidth_gbs"] > 0
    assert rec["versions"]["torch"] and rec["versions"]["nvidia-modelopt"].startswith("0.47")
    assert rec["machine"]["cores"] >= 1
    printed = capsys.readouterr().out
    assert "ROUGE-1" in printed and "time per output token" in printed


@pytest.mark.slow
def test_evaluate_local_cnn_dailymail_schema_file(tmp_path, default_fp16_checkpoint):
    """The cnn_dailymail path for offline users: a local file with its schema, no column flags."""
    data = tmp_path / "cnn.jsonl"
    rows = [
        {"id": "a1", "article": "The city council voted on Tuesday to build a new bridge over the river. "
                                "Construction starts next spring and will take two years.",
         "highlights": "Council approves new bridge.\nConstruction takes two years."},
        {"id": "a2", "article": "Scientists found a new species of frog in the rainforest. It is bright blue "
                                "and smaller than a coin.",
         "highlights": "New blue frog species found.\nIt is smaller than a coin."},
    ]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "rec.json"
    assert main([*SMALL, "--dataset", str(data), "--num-samples", "2", "--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert {s["id"] for s in rec["samples"]} == {"a1", "a2"}
    assert rec["rouge"]["n"] == 2
