"""The TensorRT-LLM backend, as far as it can be exercised without TensorRT-LLM (it cannot be installed here).

- ``trtllm-build`` command lines of every recipe against the flags TensorRT-LLM 1.x accepts (read from
  ``tensorrt_llm/commands/build.py`` @ 008b2b8d and ``tensorrt_llm/plugin/plugin.py`` @ c20322ff).
- The build's subprocess handling (failure, timeout, missing engine, atomic success, cache hit) against a *test
  double* of the ``trtllm-build`` executable: a script this file writes, put first on PATH. It stands in for the
  subprocess boundary only; no engine is built and nothing it writes is ever run as an engine.
- ``--backend`` resolution in the CLIs, with the real (absent) ``tensorrt_llm``.
- ModelOpt's Hugging Face export (FP16, FP8) on a tiny LLaMa: what it writes, that transformers loads it, and that
  the PyTorch runtime reads it.
"""
from __future__ import annotations

import copy
import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch

from quant.errors import UserError
from quant.recipes import Recipe
from quant.trtllm import Workload, build_command, build_engine, plugin_plan

# -- what trtllm-build (TensorRT-LLM 1.x) accepts, flag → allowed values (a set) or a type -------------------
SEVERITIES = {"internal_error", "error", "warning", "info", "verbose", "debug", "trace"}
ACCEPTED = {
    "--checkpoint_dir": str, "--output_dir": str,
    "--max_batch_size": int, "--max_input_len": int, "--max_seq_len": int, "--max_num_tokens": int,
    "--max_beam_width": int, "--workers": int,
    "--kv_cache_type": {"continuous", "paged", "disabled"},
    "--log_level": SEVERITIES,
    # PluginConfig (plugin.py): plugin dtype options + "disable"; features enable|disable.
    "--gpt_attention_plugin": {"auto", "float16", "float32", "bfloat16", "int32", "disable"},
    "--gemm_plugin": {"auto", "float16", "float32", "bfloat16", "int32", "fp8", "nvfp4", "disable"},
    "--use_paged_context_fmha": {"enable", "disable"},
    "--context_fmha": {"enable", "disable"},
    "--remove_input_padding": {"enable", "disable"},
}
RECIPES = {
    "fp16": Recipe("fp16"),
    "int8_wo": Recipe("int8_wo"),
    "smoothquant": Recipe("smoothquant", alpha=0.5),
    "int4_awq": Recipe("int4_awq", group_size=64),
    "int4_gptq": Recipe("int4_gptq", group_size=64),
    "w4a8_awq": Recipe("w4a8_awq"),
    "fp8": Recipe("fp8"),
    "fp16-kvint8": Recipe("fp16", kv_cache="int8"),
    "int8_wo-kvfp8": Recipe("int8_wo", kv_cache="fp8"),
    "fp8-kvfp8": Recipe("fp8", kv_cache="fp8"),
}


def parse_flags(cmd: list[str]) -> dict[str, str]:
    assert cmd[0] == "trtllm-build"
    rest = cmd[1:]
    assert len(rest) % 2 == 0, "every flag we pass takes one value"
    flags = dict(zip(rest[::2], rest[1::2]))
    assert len(flags) == len(rest) // 2, "no flag repeated"
    return flags


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_build_command_uses_only_documented_flags(name, tmp_path):
    w = Workload(batch_size=4, input_len=300, output_len=100)
    recipe = RECIPES[name]
    flags = parse_flags(build_command(tmp_path / "ckpt", tmp_path / "eng", recipe, w))
    for flag, value in flags.items():
        assert flag in ACCEPTED, f"{flag} is not a trtllm-build 1.x flag"
        allowed = ACCEPTED[flag]
        if allowed is int:
            assert int(value) > 0
        elif isinstance(allowed, set):
            assert value in allowed, f"{flag} {value}"
    assert "--paged_kv_cache" not in flags  # deprecated in 1.x
    # Sized from the workload.
    assert flags["--checkpoint_dir"] == str(tmp_path / "ckpt") and flags["--output_dir"] == str(tmp_path / "eng")
    assert (flags["--max_batch_size"], flags["--max_input_len"]) == ("4", "300")
    assert flags["--max_seq_len"] == "400" and flags["--max_num_tokens"] == "1200"
    assert flags["--kv_cache_type"] == "paged" and flags["--gpt_attention_plugin"] == "auto"
    # GEMM plugin: auto except FP8 (left at its default, disabled).
    assert flags.get("--gemm_plugin") == (None if recipe.kind == "fp8" else "auto")
    # Paged context FMHA: off where TRT-LLM's builder would turn it off itself.
    expect_fmha = "disable" if recipe.kv_cache == "int8" or (recipe.kv_cache == "fp8" and recipe.kind != "fp8") \
        else "enable"
    assert flags["--use_paged_context_fmha"] == expect_fmha


def test_plugin_plan_follows_quant_mode(tmp_path):
    assert "weight_only_quant_matmul_plugin" in plugin_plan("W8A16")["gemm"]
    assert "weight_only_groupwise_quant_matmul_plugin" in plugin_plan("W4A16_AWQ")["gemm"]
    assert "FP8 activations" in plugin_plan("W4A8_AWQ")["gemm"] and plugin_plan("W4A8_AWQ")["gemm_plugin"] == "auto"
    assert "TensorRT INT8 GEMM" in plugin_plan("W8A8_SQ_PER_CHANNEL")["gemm"]  # not a *_PLUGIN SQ algo
    assert plugin_plan("FP8")["gemm_plugin"] == "disable" and plugin_plan(None)["gemm_plugin"] == "auto"
    assert "paged context FMHA off" in plugin_plan("W8A16", "INT8")["attention"]
    assert "FP8 context FMHA" in plugin_plan("FP8", "FP8")["attention"]
    with pytest.raises(UserError, match="NVFP4"):
        plugin_plan("NVFP4")
    # Without a recipe the formats come from the checkpoint's config.json.
    ckpt = tmp_path / "ck"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8"}}))
    flags = parse_flags(build_command(ckpt, tmp_path / "e", None, Workload(2, 16, 8)))
    assert "--gemm_plugin" not in flags and flags["--use_paged_context_fmha"] == "enable"


def test_blackwell_rejects_integer_formats_before_building():
    from quant.trtllm import check_gpu_support

    with pytest.raises(UserError, match="SM>=100"):
        check_gpu_support("W8A16", None, (10, 0))
    with pytest.raises(UserError, match="W4A8_AWQ"):
        check_gpu_support("W4A8_AWQ", None, (10, 0))
    check_gpu_support("W8A16", None, (9, 0))
    check_gpu_support("FP8", None, (10, 0))


# -- the build subprocess, against a test double of trtllm-build ----------------------------------------------
DOUBLE = '''#!{python}
"""TEST DOUBLE of TensorRT-LLM's trtllm-build, for the subprocess boundary only: TensorRT-LLM cannot be installed
on the machine these tests run on. It builds nothing; it writes what Engine.save would name, or fails/hangs."""
import json, os, subprocess, sys, time
args = sys.argv[1:]
out = args[args.index("--output_dir") + 1]
with open(os.environ["TRTLLM_DOUBLE_COUNT"], "a") as fh:
    fh.write(" ".join(args) + "\\n")
mode = os.environ.get("TRTLLM_DOUBLE_MODE", "ok")
print("[TensorRT-LLM] TensorRT-LLM version: test-double", flush=True)
if mode == "fail":
    print("[TensorRT-LLM][INFO] Set gemm_plugin to auto.")
    print("Traceback (most recent call last):")
    print('  File "tensorrt_llm/commands/build.py", line 1, in <module>')
    print("RuntimeError: [TensorRT-LLM][ERROR] CUDA runtime error in cudaMalloc: out of memory", flush=True)
    sys.exit(3)
if mode == "hang":
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    with open(os.environ["TRTLLM_DOUBLE_PIDS"], "w") as fh:
        fh.write(f"{{os.getpid()}} {{child.pid}}")
    time.sleep(600)
os.makedirs(out, exist_ok=True)
with open(os.path.join(out, "config.json"), "w") as fh:
    json.dump({{"version": "test-double", "pretrained_config": {{"vocab_size": 512, "dtype": "float16"}},
               "build_config": {{"max_batch_size": 2, "max_input_len": 16, "max_seq_len": 24}}}}, fh)
if mode == "ok":
    with open(os.path.join(out, "rank0.engine"), "wb") as fh:
        fh.write(b"not an engine" * 8)
'''


@pytest.fixture
def build_double(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    exe = bin_dir / "trtllm-build"
    exe.write_text(DOUBLE.format(python=sys.executable))
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("QUANT_SUITE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TRTLLM_DOUBLE_COUNT", str(tmp_path / "count.txt"))
    monkeypatch.setenv("TRTLLM_DOUBLE_PIDS", str(tmp_path / "pids.txt"))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"quantization": {"quant_algo": None}}))

    def build(mode: str, **kw):
        monkeypatch.setenv("TRTLLM_DOUBLE_MODE", mode)
        return build_engine(ckpt, Recipe("fp16"), Workload(2, 16, 8), source_key="m-r", **kw)

    def calls() -> int:
        path = tmp_path / "count.txt"
        return len(path.read_text().splitlines()) if path.exists() else 0

    build.calls = calls
    build.engines = tmp_path / "cache" / "engines"
    return build


def _leftovers(engines: Path) -> list[str]:
    """Engine folders or temporary build folders (a failed build must leave neither; its log may stay)."""
    return sorted(p.name for p in engines.iterdir() if p.is_dir()) if engines.exists() else []


def test_build_failure_is_one_line_with_the_log_tail(build_double):
    with pytest.raises(UserError) as err:
        build_double("fail")
    msg = str(err.value)
    assert "\n" not in msg
    assert "exited with status 3" in msg and "cudaMalloc: out of memory" in msg
    log = Path(msg.rsplit("full log: ", 1)[1].rstrip(")"))
    assert log.is_file() and "trtllm-build --checkpoint_dir" in log.read_text()
    assert _leftovers(build_double.engines) == []


def _dead(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def test_build_timeout_kills_the_process_group(build_double, tmp_path):
    t0 = time.monotonic()
    with pytest.raises(UserError, match=r"timed out after 1\.5 s and was killed"):
        build_double("hang", timeout_s=1.5)
    assert time.monotonic() - t0 < 30
    pids = [int(p) for p in (tmp_path / "pids.txt").read_text().split()]
    deadline = time.monotonic() + 10
    while not all(_dead(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(_dead(p) for p in pids), "the double and its child must both be gone"
    assert _leftovers(build_double.engines) == []


def test_build_without_engine_file_is_an_error(build_double):
    with pytest.raises(UserError, match=r"wrote no engine \(rank0\.engine missing"):
        build_double("noengine")
    assert _leftovers(build_double.engines) == []


def test_build_success_is_atomic_and_cached(build_double):
    engine = build_double("ok")
    assert sorted(p.name for p in engine.iterdir()) == ["build.log", "config.json", "quant_suite_build.json",
                                                        "rank0.engine"]
    assert _leftovers(build_double.engines) == [engine.name]  # no temporary sibling left
    info = json.loads((engine / "quant_suite_build.json").read_text())
    assert info["source_key"] == "m-r" and info["command"][0] == "trtllm-build"
    assert build_double.calls() == 1
    assert build_double("ok") == engine and build_double.calls() == 1  # cache hit: not run again
    # Other build options (workload) are another engine.
    other = build_engine(engine.parent.parent.parent / "ckpt", Recipe("fp16"), Workload(4, 16, 8), source_key="m-r")
    assert other != engine and build_double.calls() == 2


def test_quant_build_runs_trtllm_build_where_it_exists(build_double, tiny_llama_dir, tmp_path, capsys, monkeypatch):
    from quant.build import main

    monkeypatch.setenv("TRTLLM_DOUBLE_MODE", "ok")
    dest = tmp_path / "my-engine"
    assert main(["--model", str(tiny_llama_dir), "--batch-size", "2", "--input-len", "16", "--output-len", "8",
                 "--engine-dir", str(dest)]) == 0
    out = capsys.readouterr().out
    assert f"engine       {dest}" in out and (dest / "rank0.engine").is_file() and (dest / "build.log").is_file()
    flags = parse_flags(json.loads((dest / "quant_suite_build.json").read_text())["command"])
    assert flags["--max_seq_len"] == "24" and flags["--gemm_plugin"] == "auto"
    assert build_double.calls() == 1


# -- --backend in the CLIs (tensorrt_llm really is absent here) -------------------------------------------------
def _no_tensorrt_llm():
    import importlib.util

    if importlib.util.find_spec("tensorrt_llm") is not None:
        pytest.skip("tensorrt_llm is installed here: these tests are about its absence")


def test_backend_trtllm_without_tensorrt_llm_is_one_line_exit_2(capsys):
    _no_tensorrt_llm()
    from experiments.evaluate import main

    assert main(["--backend", "trtllm", "--num-samples", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: --backend trtllm:") and "tensorrt_llm" in err


def test_search_backend_trtllm_without_tensorrt_llm_is_one_line_exit_2(capsys, tmp_path):
    _no_tensorrt_llm()
    from quant.search import main

    assert main(["--min-rouge1", "10", "--backend", "trtllm", "--results-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "tensorrt_llm" in err


def test_trtllm_backend_refuses_explicit_perplexity(capsys, monkeypatch):
    import quant.backends as backends

    # Pretend only the probe succeeded, to reach the perplexity check (no TRT-LLM code runs).
    monkeypatch.setattr(backends, "probe_trtllm", lambda: ("1.0.0", None))
    from experiments.evaluate import main

    assert main(["--backend", "trtllm", "--ppl-docs", "5"]) == 2
    assert "perplexity needs logits" in capsys.readouterr().err


def test_backend_auto_falls_back_to_torch_and_says_so(tiny_llama_dir, tmp_path, capsys):
    _no_tensorrt_llm()
    from experiments.evaluate import main

    out = tmp_path / "rec.json"
    rc = main(["--backend", "auto", "--model", str(tiny_llama_dir), "--num-samples", "1", "--max-output-len", "4",
               "--batch-size", "1", "--input-len", "8", "--output-len", "2", "--latency-repeats", "1",
               "--ppl-docs", "0", "--no-progress", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 0, err[-2000:]
    assert "backend: auto → torch (the tensorrt_llm package is not installed" in err
    rec = json.loads(out.read_text())
    assert rec["runtime"]["backend"] == "torch" and rec["runtime"]["version"] == torch.__version__
    assert "not installed" in rec["runtime"]["backend_reason"]


# -- the runner's handling of ModelRunnerCpp's documented output -----------------------------------------------
class RunnerStandIn:
    """Stands in for ModelRunnerCpp.generate's *documented return format* (model_runner_cpp.py @ 03832911), to test
    our slicing, EOS and timing logic; it emits a fixed token pattern, never a model's output."""

    def __init__(self):
        self.calls = []

    def generate(self, batch, *, max_new_tokens, end_id, pad_id, **kw):
        self.calls.append({"n": max_new_tokens, "end_id": end_id, **kw})
        seqs = [p.tolist() + [100 + j for j in range(max_new_tokens)] for p in batch]
        if end_id == 101:  # the second generated token is the EOS: the runtime stops there
            seqs = [s[: len(p) + 2] for s, p in zip(seqs, batch)]
        width = 24
        ids = torch.tensor([[s + [end_id] * (width - len(s))] for s in seqs])
        return {"output_ids": ids, "sequence_lengths": torch.tensor([[len(s)] for s in seqs])}


def test_runner_output_parsing_eos_and_timing(tmp_path, monkeypatch):
    from quant.runtime.trtllm_runtime import TrtllmRuntime

    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a, **k: (6 * 2**30, 8 * 2**30))
    engine = tmp_path / "engine"
    engine.mkdir()
    (engine / "config.json").write_text(json.dumps({
        "pretrained_config": {"vocab_size": 512, "dtype": "float16", "quantization": {"quant_algo": "W8A16"}},
        "build_config": {"max_batch_size": 2, "max_input_len": 16, "max_seq_len": 24}}))
    stand_in = RunnerStandIn()
    rt = TrtllmRuntime(engine, runner=stand_in)
    gen = rt.generate([[1, 2, 3], [4, 5]], 4, eos_ids=[101, 7])
    assert gen.tokens == [[100], [100]] and stand_in.calls[-1]["end_id"] == 101
    assert stand_in.calls[-1]["stop_words_list"] == [[[7]], [[7]]]
    assert gen.step_s == [] and gen.ttft_s != gen.ttft_s  # NaN: no timing split without ignore_eos
    gen = rt.generate([[1, 2, 3]], 4, eos_ids=[101], ignore_eos=True)
    assert gen.tokens == [[100, 101, 102, 103]]
    assert [c["end_id"] for c in stand_in.calls[-2:]] == [-1, -1] and [c["n"] for c in stand_in.calls[-2:]] == [1, 4]
    assert len(gen.step_s) == 3 and len(set(gen.step_s)) == 1 and gen.ttft_s > 0
    assert rt.peak_memory_mb() == 2048
    with pytest.raises(UserError, match="max_batch_size 2"):
        rt.generate([[1]] * 3, 2)
    with pytest.raises(UserError, match="max_seq_len 24"):
        rt.generate([[1] * 16], 9)
    with pytest.raises(UserError, match="perplexity needs"):
        rt.logits([1, 2])
    d = rt.describe()
    assert d["backend"] == "trtllm" and "weight_only_quant_matmul_plugin" in d["kernels"][0]


# -- ModelOpt's Hugging Face export ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_models(tiny_llama_dir, tmp_path_factory):
    """The tiny LLaMa as fp16, INT8-WO, SmoothQuant and FP8 (ModelOpt, random calibration batch), each exported in
    both formats."""
    import modelopt.torch.quantization as mtq
    from transformers import AutoModelForCausalLM

    from quant.export import export_checkpoint
    from quant.hf_checkpoint import export_hf

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("hfexport")
    out = {}
    configs = {"fp16": None, "int8_wo": mtq.INT8_WEIGHT_ONLY_CFG, "smoothquant": mtq.INT8_SMOOTHQUANT_CFG,
               "fp8": mtq.FP8_DEFAULT_CFG}
    for kind, cfg in configs.items():
        model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
        if cfg is not None:
            ids = torch.randint(1000, 40000, (2, 32))
            with torch.no_grad():
                mtq.quantize(model, copy.deepcopy(cfg), lambda m: m(ids))
        model = model.to(torch.float16)
        export_checkpoint(model, root / f"trt-{kind}")
        export_hf(model, root / f"hf-{kind}", tokenizer_from=tiny_llama_dir, expect=(Recipe(kind).quant_algo, None))
        out[kind] = (root / f"trt-{kind}", root / f"hf-{kind}")
    return out


def test_hf_export_fp16_loads_in_transformers_and_in_the_runtime(tiny_models, tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quant.hf_checkpoint import load_hf_export
    from quant.runtime.torch_runtime import TorchRuntime

    trt, hf = tiny_models["fp16"]
    assert not (hf / "hf_quant_config.json").exists()  # unquantized: a plain HF folder
    config = json.loads((hf / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["torch_dtype"] == "float16"
    assert config["rope_theta"] == 10000.0 and "quantization_config" not in config
    tok = json.loads((hf / "tokenizer_config.json").read_text())
    assert tok["tokenizer_class"] == "PreTrainedTokenizerFast"  # transformers 4.x (TRT-LLM's) knows this class
    ids = [1, 504, 2210, 30, 17, 8810, 31, 42]
    assert AutoTokenizer.from_pretrained(hf)("hello world")["input_ids"] == \
        AutoTokenizer.from_pretrained(tiny_llama_dir)("hello world")["input_ids"]
    with torch.no_grad():
        back = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)(torch.tensor([ids])).logits[0]
        src = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)(torch.tensor([ids])).logits[0]
    assert torch.equal(back, src)
    a = TorchRuntime.from_dir(trt, compute_dtype="float32").logits(ids)
    b = TorchRuntime(load_hf_export(hf), compute_dtype="float32").logits(ids)
    assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["int8_wo", "smoothquant"])
def test_hf_export_per_channel_formats_read_exactly(tiny_models, kind):
    """Per-channel formats concatenate q/k/v exactly: the same logits as the recipe's TRT-LLM checkpoint."""
    from quant.hf_checkpoint import load_hf_export
    from quant.runtime.torch_runtime import TorchRuntime

    trt, hf = tiny_models[kind]
    assert json.loads((hf / "hf_quant_config.json").read_text())["quantization"]["quant_algo"] == Recipe(kind).quant_algo
    ids = [1, 504, 2210, 30, 17, 8810]
    a = TorchRuntime.from_dir(trt, compute_dtype="float32").logits(ids)
    b = TorchRuntime(load_hf_export(hf), compute_dtype="float32").logits(ids)
    assert torch.equal(a, b)


def test_hf_export_fp8_quant_config_and_reader(tiny_models):
    from quant.checkpoint import load_checkpoint
    from quant.hf_checkpoint import load_hf_export
    from quant.runtime.torch_runtime import TorchRuntime

    trt, hf = tiny_models["fp8"]
    quant = json.loads((hf / "hf_quant_config.json").read_text())
    assert quant["producer"]["name"] == "modelopt"
    assert quant["quantization"]["quant_algo"] == "FP8" and quant["quantization"]["kv_cache_quant_algo"] is None
    assert "lm_head" in quant["quantization"]["exclude_modules"]
    block = json.loads((hf / "config.json").read_text())["quantization_config"]
    assert block["quant_method"] == "modelopt" and block["quant_algo"] == "FP8"
    ours, ref = load_hf_export(hf), load_checkpoint(trt)
    for lin in ("attention.qkv", "attention.dense", "mlp.fc", "mlp.gate", "mlp.proj"):
        key = f"transformer.layers.0.{lin}."
        assert ours.tensors[key + "weight"].dtype == torch.float8_e4m3fn
        s_ours, s_ref = ours.tensors[key + "weights_scaling_factor"], ref.tensors[key + "weights_scaling_factor"]
        assert torch.equal(s_ours, s_ref)  # one (max) scale per fused linear, as in the TRT-LLM checkpoint
        w_ours = ours.tensors[key + "weight"].float() * s_ours
        w_ref = ref.tensors[key + "weight"].float() * s_ref
        # Within one FP8 E4M3 step (3 mantissa bits) of the TRT-LLM checkpoint's weights, nearly all identical.
        diff = (w_ours - w_ref).abs()
        assert bool((diff <= w_ref.abs() / 8 + float(s_ref) * 2 ** -9).all())
        assert (diff > 0).float().mean() < 0.05
    logits = TorchRuntime(ours, compute_dtype="float32").logits([1, 504, 2210, 30])
    assert bool(torch.isfinite(logits).all())


@pytest.mark.parametrize("quant, match", [
    ({"quant_algo": "NVFP4"}, "does not read NVFP4 Hugging Face exports"),
    ({"quant_algo": "FP8", "kv_cache_quant_algo": "INT8"}, "KV cache INT8 is not read from a Hugging Face export"),
])
def test_hf_reader_refuses_what_it_does_not_read_with_the_reason(tiny_models, tmp_path, quant, match):
    import shutil

    from quant.hf_checkpoint import load_hf_export

    folder = tmp_path / "other"
    shutil.copytree(tiny_models["fp16"][1], folder)
    (folder / "hf_quant_config.json").write_text(json.dumps({"quantization": quant}))
    with pytest.raises(UserError, match=match):
        load_hf_export(folder)
