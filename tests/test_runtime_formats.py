"""Every checkpoint format, end to end: ModelOpt quantizes a tiny random LLaMa, exports it, the runtime executes it.

Reference: ModelOpt's own fake-quant model, read *after* export, because the exporter edits it in place to what
the checkpoint holds (one AWQ pre-quant scale and one FP8 weight/activation scale for the fused qkv and fc/gate
linears). Two more facts of the checkpoint are applied to it before comparing ("aligned"): the pre-quant scales
are stored in fp16 (the export dtype), and TRT-LLM has one KV scale per layer, ``kv_cache_scaling_factor`` =
max(k scale, v scale), FP8 ones clamped to ≥ 1, where the fake-quant model calibrated K and V separately — so the
K/V quantizers get the exported scale. What is left is rounding ties (ModelOpt's fake quant rounds weight ties
away from zero, its exporter to even) and rare one-step flips of an activation/KV quantization after 1e-7
float differences upstream.

Measured relative logits error ‖rt − fq‖/‖fq‖ (float32 compute, 2-core CPU): W8A16 8.6e-4 (three tie weights per
layer), SmoothQuant + INT8 KV 3e-7, AWQ g64 7e-7, FP8 + FP8 KV 7e-4 (one FP8 activation flip); each bound is ≥ 4×
the observation and ≤ 1/4 of the effects it must see (float model vs fake quant: 2e-2 … 3e-1; dropping the KV
quantization: 3e-2 INT8, 1e-1 FP8). Without the alignment the same runtime is 3.5e-2 (SmoothQuant: fp16 pre-quant
scales), 1.1e-1 (FP8 KV: clamped scale 1.0) away. bfloat16 compute (measured, bound): W8A16 1.2e-2 / 0.03,
SmoothQuant 4.1e-2 / 0.1, AWQ 1.4e-2 / 0.05, FP8 1.0e-1 / 0.25 — FP8 activations and KV (3 mantissa bits) turn
bf16's rounding of their inputs into whole-step flips, so there it only bounds drift.
"""
from __future__ import annotations

import copy
import json
import shutil
import warnings

import pytest
import torch

from quant.checkpoint import Checkpoint, load_checkpoint
from quant.runtime.kv_cache import QuantizedKVCache
from quant.runtime.torch_runtime import TorchRuntime
from tests.conftest import rel

VOCAB = 49152
CASES = {
    # name: (ModelOpt config, group size, KV cache, quant_algo, kernel, bound on the relative logits error vs the
    #        aligned fake-quant model for float32 compute, and for bfloat16 compute)
    "int8_wo": ("INT8_WEIGHT_ONLY_CFG", None, None, "W8A16", "int8pack_mm", 4e-3, 0.03),
    "int8_sq_kv_int8": ("INT8_SMOOTHQUANT_CFG", None, "INT8", "W8A8_SQ_PER_CHANNEL", "int_mm", 1e-3, 0.1),
    "int4_awq_g64": ("INT4_AWQ_CFG", 64, None, "W4A16_AWQ", "int4pack_mm_cpu", 1e-3, 0.05),
    "int4_gptq_g64": ("INT4_AWQ_CFG+gptq", 64, None, "W4A16_AWQ", "int4pack_mm_cpu", 1e-3, 0.05),
    "w4a8_awq": ("W4A8_AWQ_BETA_CFG", None, None, "W4A8_AWQ", "fp8-from-int4|scaled_mm", 5e-3, 0.25),
    "fp8_kv_fp8": ("FP8_DEFAULT_CFG", None, "FP8", "FP8", "scaled_mm", 5e-3, 0.25),
}
KV_QUANTIZER = {"INT8": {"num_bits": 8, "axis": None}, "FP8": {"num_bits": (4, 3), "axis": None}}
KV_BOUND = {"INT8": 127.0, "FP8": 448.0}


def modelopt_config(name: str, group: int | None, kv: str | None) -> dict:
    import modelopt.torch.quantization as mtq

    name, _, algorithm = name.partition("+")
    cfg = copy.deepcopy(getattr(mtq, name))
    if algorithm:  # the same quantizers, another calibration algorithm (GPTQ)
        cfg["algorithm"] = {"method": algorithm}
    if group is not None:
        entries = [e for e in cfg["quant_cfg"] if e.get("quantizer_name") == "*weight_quantizer"]
        assert len(entries) == 1 and -1 in entries[0]["cfg"]["block_sizes"]
        entries[0]["cfg"]["block_sizes"][-1] = group
    if kv is not None:
        cfg["quant_cfg"].append({"quantizer_name": "*[kv]_bmm_quantizer", "cfg": dict(KV_QUANTIZER[kv])})
    return cfg


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    from tests.tiny import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("fmt") / "hf", vocab=VOCAB)


@pytest.fixture(scope="module")
def tokens():
    g = torch.Generator().manual_seed(0)
    calib = [torch.randint(0, VOCAB, (2, 16), generator=g) for _ in range(3)]
    return calib, torch.randint(0, VOCAB, (40,), generator=g).tolist()


_built: dict[str, dict] = {}


@pytest.fixture
def built(request, tiny_hf, tokens, tmp_path_factory):
    """Quantize + export once per case; the module's tests share the result."""
    case = request.param
    if case in _built:
        return _built[case]
    import modelopt.torch.quantization as mtq
    from transformers import AutoModelForCausalLM

    from quant.export import export_checkpoint

    torch.set_num_threads(2)
    cfg_name, group, kv, *_ = CASES[case]
    calib, ids = tokens
    model = AutoModelForCausalLM.from_pretrained(tiny_hf, dtype=torch.float32).eval()
    with torch.no_grad():
        float_logits = model(torch.tensor([ids])).logits[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mtq.quantize(model, modelopt_config(cfg_name, group, kv), lambda m: [m(b) for b in calib])
        with torch.no_grad():
            before_export = model(torch.tensor([ids])).logits[0]
        ckpt = export_checkpoint(model, tmp_path_factory.mktemp(case) / "ckpt")
    with torch.no_grad():
        after_export = model(torch.tensor([ids])).logits[0]
    rt = TorchRuntime.from_dir(ckpt)
    # align the fake-quant model with what the checkpoint stores (see the module docstring)
    for module in model.modules():
        iq = getattr(module, "input_quantizer", None)
        if iq is not None and getattr(iq, "pre_quant_scale", None) is not None:
            iq.pre_quant_scale = iq.pre_quant_scale.half().float()
    if cfg_name.startswith("W4A8"):
        _w4a8_weights_as_stored(model, load_checkpoint(ckpt))
    if kv is not None:
        for i, layer in enumerate(model.model.layers):
            amax = torch.tensor(rt.kv_scales[i].item() * KV_BOUND[kv])
            layer.self_attn.k_bmm_quantizer.amax = amax
            layer.self_attn.v_bmm_quantizer.amax = amax.clone()
    with torch.no_grad():
        aligned = model(torch.tensor([ids])).logits[0]
    _built[case] = dict(ckpt=ckpt, rt=rt, ids=ids, float=float_logits, before=before_export, after=after_export,
                        aligned=aligned, logits=rt.logits(ids))
    return _built[case]


def _w4a8_weights_as_stored(model, ckpt: Checkpoint) -> None:
    """W4A8: TensorRT-LLM's loader rounds s/s2 to float16 before the INT4 → FP8 conversion, ModelOpt's fake quant
    does not; a one-in-a-few-hundred FP8 step that a tiny random model turns into 7e-2 of logits (5e-3 without it).
    So the fake-quant weights become the stored ones as that loader reads them (tests/test_server_loaders.py checks
    that reading against TRT-LLM's code), and the comparison checks the activations and the rest of the runtime."""
    from quant.names import HF_MODULES
    from quant.runtime.schemes.w4a8_awq import w4a8_fp8_weight

    for i, layer in enumerate(model.model.layers):
        for lin, modules in HF_MODULES.items():
            p = f"transformer.layers.{i}.{lin}."
            t = ckpt.tensors
            w = w4a8_fp8_weight(t[p + "weight"], t[p + "weights_scaling_factor"], t[p + "weights_scaling_factor_2"])
            rows = w.float() * t[p + "weights_scaling_factor_2"].float()
            for name in modules:
                module = layer.get_submodule(name)
                module.weight.data = rows[: module.out_features].to(module.weight.dtype)
                rows = rows[module.out_features:]
                module.weight_quantizer.disable()


def each_case(fn):
    return pytest.mark.parametrize("built", sorted(CASES), indirect=True)(fn)


@each_case
def test_checkpoint_quant_block(built, request):
    _, group, kv, algo, *_ = CASES[request.node.callspec.params["built"]]
    cfg = json.loads((built["ckpt"] / "config.json").read_text())
    q = cfg["quantization"]
    assert q["quant_algo"] == algo and q["kv_cache_quant_algo"] == kv
    if group is not None:  # GPTQ has no pre-quant scale: the export says so (quant.export.fix_config)
        gptq = "gptq" in CASES[request.node.callspec.params["built"]][0]
        assert q["group_size"] == group and q["has_zero_point"] is False and q["pre_quant_scale"] is not gptq
    ckpt = load_checkpoint(built["ckpt"])
    assert set(ckpt.layer_algos.values()) == {algo}
    if kv is not None:  # TRT-LLM's one scale per layer is max(k, v) of ModelOpt's two
        t = ckpt.tensors
        for i in range(ckpt.num_layers):
            p = f"transformer.layers.{i}.attention."
            assert torch.equal(t[p + "kv_cache_scaling_factor"],
                               torch.maximum(t[p + "k_cache_scaling_factor"], t[p + "v_cache_scaling_factor"]))


@each_case
def test_runtime_logits_match_modelopt_fake_quant(built, request):
    bound = CASES[request.node.callspec.params["built"]][5]
    ours, aligned = built["logits"], built["aligned"]
    err = rel(ours, aligned)
    assert err <= bound, f"relative logits error {err:.2e} > {bound:.0e}"
    assert (ours.argmax(-1) == aligned.argmax(-1)).float().mean() >= 0.95
    # the bound sees quantization: the float model and the pre-export fake quant are both far beyond it
    assert rel(built["float"], aligned) > 4 * bound


@each_case
def test_describe_names_the_kernel_and_kv_mode(built, request):
    _, _, kv, _, kernel, *_ = CASES[request.node.callspec.params["built"]]
    info = built["rt"].describe()
    assert info["kernels"] == [kernel]
    linear_emulated = kernel.endswith("scaled_mm")
    assert info["emulated"] == (linear_emulated or kv is not None)
    assert ("kv_cache" in info["emulated_parts"]) == (kv is not None)
    assert info["kv_cache"] == ("float32" if kv is None else f"{kv.lower()} (dequantize on read)")


@pytest.mark.parametrize("built", ["int8_sq_kv_int8", "fp8_kv_fp8"], indirect=True)
def test_quantized_kv_cache(built, request):
    kv = CASES[request.node.callspec.params["built"]][2]
    rt, ids, aligned = built["rt"], built["ids"], built["aligned"]
    cache = rt._new_cache(2, 48)
    assert isinstance(cache, QuantizedKVCache)
    assert cache.k.dtype == {"INT8": torch.int8, "FP8": torch.float8_e4m3fn}[kv] and cache.k.element_size() == 1
    # the KV quantization is visible: the same runtime with a float cache is farther from the reference
    rt.kv_algo = None
    try:
        no_kv = rt.logits(ids)
    finally:
        rt.kv_algo = kv
    assert rel(no_kv, aligned) > 4 * rel(built["logits"], aligned)
    # decode through the quantized cache = prefill of the whole sequence (slot by slot, same quantization)
    prompt, nxt = ids[:30], ids[30:34]
    with torch.inference_mode():
        c = rt._new_cache(1, 34)
        mask = torch.ones(1, 34, dtype=torch.bool)
        rt._forward(torch.tensor([prompt]), torch.arange(30)[None], c, 0, mask[:, :30], last_only=True)
        for j, tok in enumerate(nxt):
            step = rt._forward(torch.tensor([[tok]]), torch.tensor([[30 + j]]), c, 30 + j, mask[:, : 31 + j],
                               last_only=True)[0, -1]
            full = rt.logits(ids[: 31 + j])[-1]
            assert rel(step, full) <= 1e-3
    gen = rt.generate([ids[:7], ids[:12]], 5, ignore_eos=True)
    assert [len(t) for t in gen.tokens] == [5, 5]


@each_case
def test_bfloat16_compute_stays_close(built, request):
    bound = CASES[request.node.callspec.params["built"]][6]
    rt = TorchRuntime.from_dir(built["ckpt"], compute_dtype="bfloat16")
    assert rel(rt.logits(built["ids"]), built["aligned"]) <= bound


@pytest.mark.parametrize("built", ["int4_awq_g64"], indirect=True)
def test_mixed_precision_per_layer_group_size(built, tmp_path):
    """MIXED_PRECISION: quant_cfg.json's per-layer group_size (ModelOpt drops it from config.json) reaches the
    AWQ handlers. Layer 0 stays W4A16_AWQ g64, layer 1 becomes fp16 (its dequantized weight with the pre-quant
    scale folded in), so the logits must stay those of the all-AWQ checkpoint up to fp16 rounding."""
    from safetensors.torch import load_file, save_file

    from quant import formats
    from quant.names import LINEARS
    from quant.runtime.schemes.base import unpack_int4_rows

    folder = shutil.copytree(built["ckpt"], tmp_path / "mixed")
    tensors = load_file(folder / "rank0.safetensors")
    quantized = {}
    for lin in LINEARS:
        p0, p1 = f"transformer.layers.0.{lin}", f"transformer.layers.1.{lin}"
        quantized[p0] = {"quant_algo": "W4A16_AWQ", "group_size": 64, "has_zero_point": False, "pre_quant_scale": True}
        q = unpack_int4_rows(tensors.pop(p1 + ".weight")).float()
        s = tensors.pop(p1 + ".weights_scaling_factor").float().repeat_interleave(64, dim=1)
        pre = tensors.pop(p1 + ".prequant_scaling_factor").float()
        tensors[p1 + ".weight"] = (q * s * pre[None, :]).half()
    save_file(tensors, folder / "rank0.safetensors")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization"] = {"quant_algo": "MIXED_PRECISION", "kv_cache_quant_algo": None}
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "quant_cfg.json").write_text(json.dumps(
        {"quant_algo": "MIXED_PRECISION", "kv_cache_quant_algo": None, "quantized_layers": quantized}))

    algos = formats.layer_algos(cfg, folder)
    groups = formats.layer_group_sizes(cfg, folder)
    assert groups["layers.0.attention.qkv"] == 64 and algos["layers.1.mlp.fc"] is None
    spec = formats.expected_tensors(cfg, algos, groups)  # what the validator checks, with per-layer groups
    assert set(spec) == set(tensors)
    assert all(spec[n].shape_ok(tuple(t.shape)) and t.dtype in spec[n].dtypes for n, t in tensors.items())
    ckpt = Checkpoint(path=folder, config=cfg, tensors=tensors, layer_algos=algos)
    rt = TorchRuntime(ckpt)
    assert rt.describe()["kernels"] == ["dense", "int4pack_mm_cpu"]
    assert rel(rt.logits(built["ids"]), built["logits"]) <= 1e-2
