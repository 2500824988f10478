"""Peer engines of experiments.bench and the bench's interleaved-ratio bookkeeping, on the CPU.

The peers' fast paths (CUDA graphs, torchao's and GemLite's GPU kernels) need a GPU; here the HF static-cache decode
loop runs eagerly on a tiny random LLaMa and must reproduce HF ``generate`` token for token, and the bench's rows,
intervals, crossover and targets are computed from timings given to them."""
from __future__ import annotations

from importlib import metadata

import pytest
import torch

from quant.errors import UserError


def test_static_cache_decode_loop_matches_hf_generate():
    from experiments.peers import HFPeer

    peer = HFPeer("tiny", "hf-compile", torch.device("cpu"), seed=3, max_len=48, compile=False)
    prompts = [list(range(5, 17)), list(range(40, 52))]
    ids = torch.tensor(prompts)
    want = peer.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, min_new_tokens=10,
                               do_sample=False, pad_token_id=0)[:, 12:].tolist()
    for _ in range(2):  # the second call reuses (resets) the batch's static cache
        g = peer.generate(prompts, 10)
        assert g.tokens == want and g.decode_steps == 9 and all(s > 0 for s in g.step_s)
    assert peer.describe()["cuda_graph_skips"] == peer.describe()["compiled_graphs"] == 0  # eager: none compiled
    emb = peer.model.get_input_embeddings().weight
    assert peer.weight_bytes == sum(p.numel() * 2 for p in peer.model.parameters()) - emb.numel() * 2
    with pytest.raises(UserError, match="equal-length prompts"):
        peer.generate([[1, 2, 3], [1, 2]], 4)
    with pytest.raises(UserError, match="exceed its static cache"):
        peer.generate([list(range(40))], 9)


def test_peer_refusals(monkeypatch):
    from experiments import peers

    with pytest.raises(UserError, match="unknown peer 'vllm'"):
        peers.HFPeer("tiny", "vllm", torch.device("cpu"), max_len=8)

    real = metadata.version

    def missing(name):
        if name == "torchao":
            raise metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(peers.metadata, "version", missing)
    with pytest.raises(UserError, match="peer torchao-int4wo needs the torchao package"):
        peers.peer_versions("torchao-int4wo")


def test_group_int4_round_trip_is_within_half_a_step():
    from experiments.peers import _group_int4

    w = torch.randn(48, 384, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.1, 8, 384)
    q, scale, zero = _group_int4(w, 128)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15 and scale.shape == zero.shape == (48, 3)
    back = ((q.float().reshape(48, 3, 128) - zero[..., None]) * scale[..., None]).reshape(48, 384)
    assert ((back - w).abs().reshape(48, 3, 128) <= scale[..., None] / 2 + 1e-5).all()


class _Engine:
    n_layers, n_kv, head_dim, kv_algo, weight_bytes = 2, 2, 8, None, 10**9


def _row(engine, recipe, B, tpot, ref_tpot, ttft=0.02):
    from experiments.bench import cell_row

    t = {"tpot": tpot, "ttft": [ttft] * len(tpot), "extra_bytes": 0}
    ref = {"tpot": ref_tpot, "ttft": [0.03] * len(ref_tpot), "extra_bytes": 0}
    return cell_row(engine, recipe, _Engine(), 512, B, 64, t, 0, 4000.0, ref)


def test_speedups_are_paired_by_round_with_an_interval():
    """A drift that hits both engines in the same round cancels in the paired ratio: exactly 2x here."""
    drift = [1.0, 1.3, 0.9, 1.6, 1.1]
    row = _row("quant-runtime", "int4_awq", 1, [0.002 * d for d in drift], [0.004 * d for d in drift])
    assert row["speedup"] == pytest.approx(2.0) and row["speedup_ci"] == pytest.approx([2.0, 2.0])
    assert row["ttft_speedup"] == pytest.approx(1.5) and row["rounds"] == 5
    noisy = _row("quant-runtime", "int4_awq", 1, [0.002, 0.0021, 0.0019, 0.0022, 0.002], [0.004] * 5)
    lo, hi = noisy["speedup_ci"]
    assert lo < noisy["speedup"] < hi and lo > 1.7


def test_targets_crossover_and_peers_from_rows():
    from experiments.bench import crossover, targets

    ref = [0.004] * 5
    rows = [_row("quant-runtime", "int4_awq", 1, [0.0016] * 5, ref),
            _row("quant-runtime", "int4_awq@kpack", 1, [0.0020] * 5, ref),  # a slower variant: the best one counts
            _row("quant-runtime", "int4_awq", 4, [0.0038, 0.0039, 0.0037, 0.0038, 0.0039], ref),
            _row("quant-runtime", "int4_awq", 8, [0.0050, 0.0051, 0.0049, 0.0050, 0.0052], ref),
            _row("quant-runtime", "int4_awq", 16, [0.0060, 0.0061, 0.0062, 0.0060, 0.0061], ref),
            _row("torchao-int4wo", "int4_awq", 1, [0.0020] * 5, ref)]
    assert crossover(rows) == {512: 8}
    got = {t["target"]: t for t in targets(rows)}
    b1 = got["int4_awq b1 decode, in 512: × fp16"]
    assert b1["measured"] == pytest.approx(2.5) and not b1["met"] and b1["shortfall"] == pytest.approx(1 - 2.5 / 2.6)
    assert got["int4_awq b4 decode, in 512: × fp16"]["met"]
    assert not got["int4_awq b8 decode, in 512: × fp16"]["met"]
    peer = got["int4_awq b1 decode, in 512: × torchao-int4wo (both over fp16)"]
    assert peer["measured"] == pytest.approx(1.25) and not peer["met"] and peer["ci_low"] == pytest.approx(1.25)
    # a peer timed in its own process: the quotient's interval is bounded by the two intervals' ends
    noisy = _row("torchao-int4wo", "int4_awq", 1, [0.0020, 0.0021, 0.0019, 0.0022, 0.0020], ref)
    t = {t["target"]: t for t in targets(rows[:-1] + [noisy])}[
        "int4_awq b1 decode, in 512: × torchao-int4wo (both over fp16)"]
    assert t["ci_low"] == pytest.approx(rows[0]["speedup_ci"][0] / noisy["speedup_ci"][1])
    assert t["ci_low"] < t["measured"] == pytest.approx(rows[0]["speedup"] / noisy["speedup"])
    # HF + torch.compile against the project's FP16, the reference its rows are timed beside
    hf = _row("hf-compile", "fp16", 1, [0.005, 0.0052, 0.0049, 0.005, 0.0051], ref)
    t = {t["target"]: t for t in targets(rows + [hf])}["fp16 b1 decode, in 512: × hf-compile (both over fp16)"]
    assert t["measured"] == pytest.approx(1 / hf["speedup"]) and t["ci_low"] == pytest.approx(1 / hf["speedup_ci"][1])
    assert not t["met"] and t["required"] == 1.5


def test_a_variant_that_speeds_fp16_too_is_taken_over_fp16_with_it():
    """A kernel variant measured on FP16 as well (here ``@fast``: TTFT × 1.2 on FP16) counts for a format only by
    what it gains beyond FP16's own gain: SmoothQuant@fast's 1.5× over plain FP16 is 1.25× over fp16@fast; a variant
    without an FP16 row (``@sqonly``) stays over plain FP16. Peers are compared undivided (both over one FP16)."""
    from experiments.bench import same_variant_fp16, table, targets

    ref = [0.004] * 5
    rows = [_row("quant-runtime", "fp16@fast", 1, ref, ref, ttft=0.025),
            _row("quant-runtime", "smoothquant", 1, [0.0025] * 5, ref, ttft=0.025),
            _row("quant-runtime", "smoothquant@fast", 1, [0.0025] * 5, ref, ttft=0.02)]
    sq = next(r for r in same_variant_fp16(rows) if r["recipe"] == "smoothquant@fast")
    assert sq["ttft_speedup"] == pytest.approx(1.25) and sq["over"] == "fp16@fast"
    assert sq["ttft_speedup_ci"][0] <= 1.25 <= sq["ttft_speedup_ci"][1]
    got = {t["target"]: t for t in targets(rows)}["smoothquant b1 prefill (TTFT), in 512: × fp16"]
    assert got["measured"] == pytest.approx(1.25) and not got["met"]
    assert (got["row"], got["over"]) == ("smoothquant@fast", "fp16@fast")
    assert "| smoothquant@fast / fp16@fast |" in table(rows, targets(rows), None)
    rows.append(_row("quant-runtime", "smoothquant@sqonly", 1, [0.0025] * 5, ref, ttft=0.022))
    got = {t["target"]: t for t in targets(rows)}["smoothquant b1 prefill (TTFT), in 512: × fp16"]
    assert got["measured"] == pytest.approx(0.03 / 0.022)
    assert (got["row"], got["over"]) == ("smoothquant@sqonly", "fp16")
    # decode: the variant's own FP16 row is as fast as FP16, so the quotient is the row's own speed-up
    dec = {t["target"]: t for t in targets(rows)}["smoothquant b1 decode, in 512: × fp16"]
    assert dec["measured"] == pytest.approx(1.6)


def test_a_peer_whose_cuda_graphs_were_skipped_is_marked_and_kept_out_of_the_targets():
    """Inductor's own skip counter, read the way HFPeer.describe reads it: a graph compiled for CUDA graphs
    (``reduce-overhead``) on a CPU tensor is one inductor cannot capture, the case it counts. A peer row carrying
    skips stays in the table, marked, with no target taken against it."""
    from experiments.bench import table, targets
    from experiments.peers import _compile_counts

    before = _compile_counts()
    step = torch.compile(lambda x: torch.relu(x) * 2 + 1, mode="reduce-overhead", fullgraph=True)
    step(torch.randn(8))
    step(torch.randn(8))  # the same graph again: no new one
    assert [now - then for now, then in zip(_compile_counts(), before)] == [1, 1]

    ref = [0.004] * 5
    ours = _row("quant-runtime", "int4_awq", 1, [0.0016] * 5, ref)
    slow = dict(_row("torchao-int4wo", "int4_awq", 1, [0.0070] * 5, ref), cuda_graph_skips=2)
    got = [t["target"] for t in targets([ours, slow])]
    assert "int4_awq b1 decode, in 512: × fp16" in got and not any("torchao" in t for t in got)
    assert "| torchao-int4wo ² |" in table([ours, slow], [], None) and "CUDA graph" in table([ours, slow], [], None)


def test_a_peer_from_its_own_process_joins_the_record_marked():
    """What ``--peer-process own`` keeps of the record a peer's child process wrote (the child itself needs a GPU)."""
    from experiments.bench import merge_peer

    ref = [0.004] * 5
    child = {"rows": [_row("quant-runtime", "fp16", 1, ref, ref), _row("hf-compile", "fp16", 1, [0.005] * 5, ref)],
             "describe": {"hf-compile": {"engine": "hf-compile"}}, "failed": {}}
    record = {"peer_references": {}, "describe": {}, "failed": {}}
    rows = merge_peer(record, child, "hf-compile", "exit 0")
    assert [r["engine"] for r in rows] == ["hf-compile"] and rows[0]["process"] == "own"
    assert rows[0]["speedup"] == pytest.approx(0.8)
    assert [r["engine"] for r in record["peer_references"]["hf-compile"]] == ["quant-runtime"]
    assert record["describe"]["hf-compile"] == {"engine": "hf-compile"} and record["failed"] == {}
    from experiments.bench import table

    assert "| hf-compile ¹ |" in table(rows, [], None) and "process of its own" in table(rows, [], None)
    # no row: the child's own reason, else how its process ended
    merge_peer(record, {"rows": [], "failed": {"gemlite-a16w4": "ImportError: x"}}, "gemlite-a16w4", "exit 0")
    merge_peer(record, {}, "torchao-int8wo", "stopped after --peer-timeout 900 s")
    assert record["failed"] == {"gemlite-a16w4": "ImportError: x",
                                "torchao-int8wo": "its process ended (stopped after --peer-timeout 900 s) with no row"}


def test_the_budget_stops_starting_work_and_caps_a_peer():
    """--budget on a made-up clock (the bench itself needs a GPU): a peer's process gets the smaller of its own
    limit and what is left; nothing starts with less than START_S left; no budget never refuses."""
    from experiments.bench import Budget

    now = [100.0]
    b = Budget(600, clock=lambda: now[0])
    assert b.refusal() is None and b.peer_limit(150) == (150.0, "--peer-timeout")
    now[0] += 400  # 600 - 15 kept for the end - 400 = 185 s left
    assert b.left() == pytest.approx(185.0) and b.peer_limit(900) == (pytest.approx(185.0), "--budget")
    now[0] += 130  # 55 s left: below START_S
    assert b.refusal() == "not started: 55 s of --budget 600 s left"
    now[0] += 100
    assert b.refusal() == "not started: 0 s of --budget 600 s left"
    assert Budget(None).refusal() is None and Budget(None).peer_limit(900) == (900.0, "--peer-timeout")
