"""Who can serve which recipe: the servers' loading rules as data, each cell with the source it was read from.

A recipe is (weight format × KV-cache format × FP16 fallback × INT4 group size); each server either loads that
checkpoint or refuses it. The facts were read from the servers' own source (docs/serving.md says how, and what could
not be read); ``python -m quant.servers`` prints the table docs/serving.md holds, and a test keeps the two equal.
``--serve-with`` (search, build) narrows the space to one server's cells.
"""
from __future__ import annotations

from dataclasses import dataclass

from quant.errors import ArgumentParser, UserError, cli_entry

# Where each fact comes from: file @ commit (or release). TensorRT-LLM's repository (2.5 GB) could not be mirrored
# here; its files were read from the stored index, one version each, named by that version's commit.
TRTLLM_LINEAR = "NVIDIA/TensorRT-LLM tensorrt_llm/_torch/modules/linear.py @00bbf71e796406ea8593a77cbfb828356182db16"
TRTLLM_CONFIG = "NVIDIA/TensorRT-LLM tensorrt_llm/_torch/model_config.py @008e0af8980fc560003631ba4ac37828836a91c8"
TRTLLM_ATTENTION = ("NVIDIA/TensorRT-LLM tensorrt_llm/_torch/attention_backend/trtllm.py (TrtllmAttention: FP8 KV "
                    "scales stay 1.0) @00bede19e84a4fb39595453335b3ff856d017e78")
TRTLLM_HW = "NVIDIA/TensorRT-LLM docs/source/features/quantization.md @09d4c79ba941a5c2c62c878c3572c0dcc8b85efa"
TRTLLM_ENGINE = ("NVIDIA/TensorRT-LLM 1.2.x engine backend: docs/source/legacy/reference/precision.md "
                 "@b2ae043f7c2e6099d21c8d15ddbc9c0a79550eb3 (LLaMA row), support-matrix.md "
                 "@17552a447517c3110b3fe07cffd73204fb22b615, tensorrt_llm/models/modeling_utils.py "
                 "@01ea6d79d454bb3ab10c7510a6f706ba039090c2 (kv_cache_quant_algo, quant_cfg.json)")
VLLM = "vllm-project/vllm 0.34.0 (git 62d4bc3c7) vllm/model_executor/layers/quantization/modelopt.py"
VLLM_GATE = "vllm-project/vllm 0.34.0 vllm/transformers_utils/model_arch_config_convertor.py:248-270"
VLLM_KV = "vllm-project/vllm 0.34.0 vllm/utils/torch_utils.py:463-515, model_executor/layers/quantization/kv_cache.py"
SGLANG = "sgl-project/sglang 0.5.23 python/sglang/srt/layers/quantization/modelopt_quant.py"
SGLANG_KV = "sgl-project/sglang 0.5.23 python/sglang/srt/mem_cache/kv_cache_dtype.py:49-59"
TRTLLM_GROUPS = ("TensorRT-LLM's CUTLASS fpA_intB finegrained GEMM: group size 64 or 128 (its check as seen in "
                 "onnxruntime's copy of the kernel; not found in TensorRT-LLM's own stored source)")

HF_KV_REASON = ("ModelOpt 0.47's Hugging Face export writes FP8 and NVFP4 KV caches only (its postprocess_state_dict "
                "asserts on INT8), and neither current TensorRT-LLM's PyTorch backend nor vLLM reads an INT8 KV "
                "cache; use kv_cache=fp8, or --format trtllm for TensorRT-LLM 1.x engines")


def hf_export_refusal(recipe) -> str | None:
    """Why a recipe has no Hugging Face export, or None."""
    if recipe.kv_cache == "int8":
        return f"{recipe.label}: INT8 KV cache has no Hugging Face export: {HF_KV_REASON}"
    return None


ALL_GPUS = "SM 8.0+"
FP8_GPUS = "SM 8.9+ (Ada, Hopper, Blackwell)"
# tensorrt_llm/builder.py build() refuses INT8/INT4 weights, SmoothQuant and the INT8 KV cache on SM 10.x
# (quant.trtllm.check_gpu_support says so before a build)
ENGINE_INT_GPUS = "SM 8.0–9.0; builder.py refuses SM 10.x"


@dataclass(frozen=True)
class Cell:
    ok: bool
    source: str
    gpus: str = ""  # GPU generations, where it narrows
    note: str = ""

    def mark(self, ref: int) -> str:
        return ("yes" + (f" ({self.gpus})" if self.gpus else "") if self.ok else "no") + \
            (f"; {self.note}" if self.note else "") + f" [{ref}]"


@dataclass(frozen=True)
class Server:
    name: str
    label: str
    checkpoint: str  # the format it loads: "trtllm" (TRT-LLM checkpoint → engine) or "hf" (ModelOpt unified HF)
    weights: dict  # quant_algo (None = fp16) → Cell
    kv_cache: dict  # kv_cache_quant_algo → Cell
    fallback: Cell  # FP16 fallback of some linears (exclude_modules)
    group_sizes: tuple[int, ...]  # INT4 group sizes it runs
    group_source: str = ""

    def refusal(self, recipe) -> str | None:
        """None when this server loads ``recipe``'s checkpoint, else why not (one line, with the source)."""
        for what, cell in ((recipe.quant_algo or "fp16", self.weights.get(recipe.quant_algo)),
                           (f"KV cache {recipe.kv_algo}", self.kv_cache.get(recipe.kv_algo)),
                           ("FP16 fallback", self.fallback if recipe.exclude else None)):
            if cell is not None and not cell.ok:
                return f"{self.label} does not load {what} ({cell.note or cell.source})"
        if recipe.block is not None and recipe.block not in self.group_sizes:
            return f"{self.label} runs INT4 group sizes {list(self.group_sizes)}, not {recipe.block}"
        return None


def _no(source: str, note: str = "") -> Cell:
    return Cell(False, source, note=note)


SERVERS: dict[str, Server] = {s.name: s for s in (
    Server(
        "trtllm", "TensorRT-LLM (PyTorch backend, current)", "hf",
        weights={
            None: Cell(True, TRTLLM_LINEAR + " UnquantizedLinearMethod", ALL_GPUS),
            "W8A16": Cell(True, TRTLLM_LINEAR + " WeightOnlyQuantLinearMethod", ALL_GPUS),
            "W8A8_SQ_PER_CHANNEL": _no(TRTLLM_LINEAR, "no SmoothQuant linear method: get_quant_method raises "
                                                      "'unsupported quant mode'"),
            "W4A16_AWQ": Cell(True, TRTLLM_LINEAR + " W4A16_AWQ_LinearMethod", ALL_GPUS),
            "W4A8_AWQ": Cell(True, TRTLLM_LINEAR + " W4A8_AWQ_LinearMethod", "SM 8.9, 9.0 (Ada, Hopper)"),
            "FP8": Cell(True, TRTLLM_LINEAR + " FP8QDQLinearMethod", FP8_GPUS),
        },
        kv_cache={
            None: Cell(True, TRTLLM_CONFIG),
            "INT8": _no(TRTLLM_CONFIG, "the PyTorch backend's KV pool is FP8 or NVFP4 only; the LLM API allows "
                                       "only kv_cache_quant_algo FP8/NVFP4 for a pre-quantized checkpoint"),
            "FP8": Cell(True, TRTLLM_ATTENTION, FP8_GPUS, "scale 1.0: the exported k/v scales are not applied"),
        },
        fallback=Cell(True, TRTLLM_CONFIG + " (exclude_modules, fnmatch)"),
        group_sizes=(64, 128), group_source=TRTLLM_GROUPS,
    ),
    Server(
        "trtllm-engine", "TensorRT-LLM 1.2.x engine (trtllm-build)", "trtllm",
        weights={
            None: Cell(True, TRTLLM_ENGINE, ALL_GPUS),
            "W8A16": Cell(True, TRTLLM_ENGINE, ENGINE_INT_GPUS),
            "W8A8_SQ_PER_CHANNEL": Cell(True, TRTLLM_ENGINE, ENGINE_INT_GPUS),
            "W4A16_AWQ": Cell(True, TRTLLM_ENGINE, ENGINE_INT_GPUS),
            "W4A8_AWQ": Cell(True, TRTLLM_ENGINE, "SM 8.9, 9.0"),
            "FP8": Cell(True, TRTLLM_ENGINE, FP8_GPUS),
        },
        kv_cache={None: Cell(True, TRTLLM_ENGINE), "INT8": Cell(True, TRTLLM_ENGINE, ENGINE_INT_GPUS),
                  "FP8": Cell(True, TRTLLM_ENGINE, FP8_GPUS)},
        fallback=Cell(True, TRTLLM_ENGINE + " (exclude_modules)"),
        group_sizes=(64, 128), group_source=TRTLLM_GROUPS,
    ),
    Server(
        "vllm", "vLLM (ModelOpt loader)", "hf",
        weights={
            None: Cell(True, VLLM, ALL_GPUS),
            **{algo: _no(VLLM_GATE, "not a ModelOpt quant_algo vLLM knows: 'Unknown ModelOpt quant algo'")
               for algo in ("W8A16", "W8A8_SQ_PER_CHANNEL", "W4A16_AWQ", "W4A8_AWQ")},
            "FP8": Cell(True, VLLM + ":150-167 ModelOptFp8Config", ALL_GPUS, "Marlin FP8 weight-only below SM 8.9"),
        },
        kv_cache={None: Cell(True, VLLM_KV), "INT8": _no(VLLM_KV, "falls back to an unquantized cache"),
                  "FP8": Cell(True, VLLM_KV, FP8_GPUS, "k_scale and v_scale applied separately")},
        fallback=Cell(True, VLLM + ":198-233 (exclude_modules)"),
        group_sizes=(),
    ),
    Server(
        "sglang", "SGLang (ModelOpt loader)", "hf",
        weights={
            None: Cell(True, SGLANG, ALL_GPUS),
            **{algo: _no(SGLANG + ":510-515", "quant_method modelopt with this quant_algo raises 'ModelOptFp8Config "
                                              "only supports regular FP8 quantization'")
               for algo in ("W8A16", "W8A8_SQ_PER_CHANNEL", "W4A16_AWQ")},
            "W4A8_AWQ": _no(SGLANG + " w4afp8", "W4AFP8 covers MoE experts only"),
            "FP8": Cell(True, SGLANG + ":510-627 ModelOptFp8Config", FP8_GPUS),
        },
        kv_cache={None: Cell(True, SGLANG_KV), "INT8": _no(SGLANG_KV, "stays in the model dtype"),
                  "FP8": Cell(True, SGLANG_KV, FP8_GPUS, "max(k_scale, v_scale)")},
        fallback=Cell(True, SGLANG + ":308-424 (exclude_modules)"),
        group_sizes=(),
    ),
)}


class _Any:
    """``--serve-with any``: no restriction (the search's default)."""

    name, label, checkpoint, group_sizes = "any", "any server", None, (32, 64, 128)

    def refusal(self, recipe) -> str | None:
        return None


SERVERS["any"] = _Any()
SERVE_WITH = tuple(SERVERS)


def add_serve_with_arg(p) -> None:
    p.add_argument("--serve-with", default="any", choices=SERVE_WITH,
                   help="only recipes this server loads (docs/serving.md): trtllm = TensorRT-LLM's PyTorch backend "
                        "(HF export), trtllm-engine = TensorRT-LLM 1.2.x engines (TRT-LLM checkpoint), vllm, sglang; "
                        "any = no restriction (default)")


def check_servable(recipe, serve_with: str) -> None:
    if why := SERVERS[serve_with].refusal(recipe):
        raise UserError(f"--serve-with {serve_with}: {recipe.label} cannot be served: {why}")


# -- the table docs/serving.md holds ---------------------------------------------------------------------------
ROWS = (("fp16", None), ("int8_wo (W8A16)", "W8A16"), ("smoothquant (W8A8_SQ_PER_CHANNEL)", "W8A8_SQ_PER_CHANNEL"),
        ("int4_awq / int4_gptq (W4A16_AWQ)", "W4A16_AWQ"), ("w4a8_awq (W4A8_AWQ)", "W4A8_AWQ"), ("fp8 (FP8)", "FP8"))


def table() -> str:
    """Markdown: one row per recipe part, one column per server, each cell with its source as a footnote."""
    servers = [s for s in SERVERS.values() if isinstance(s, Server)]
    sources: list[str] = []

    def ref(source: str) -> int:
        if source not in sources:
            sources.append(source)
        return sources.index(source) + 1

    def row(label: str, cells) -> str:
        return f"| {label} | " + " | ".join(c.mark(ref(c.source)) for c in cells) + " |"

    lines = ["| recipe | " + " | ".join(f"`{s.name}`: {s.label}" for s in servers) + " |",
             "|---" * (len(servers) + 1) + "|"]
    lines += [row(label, [s.weights[algo] for s in servers]) for label, algo in ROWS]
    lines += [row(f"KV cache {kv}", [s.kv_cache[kv] for s in servers]) for kv in ("INT8", "FP8")]
    lines.append(row("FP16 fallback (exclude)", [s.fallback for s in servers]))
    lines.append("| INT4 group sizes | " + " | ".join(
        (", ".join(map(str, s.group_sizes)) + f" [{ref(s.group_source)}]") if s.group_sizes else "—"
        for s in servers) + " |")
    lines.append("| checkpoint | " + " | ".join({"hf": "HF export (`--format hf`)",
                                                 "trtllm": "TRT-LLM checkpoint"}[s.checkpoint] for s in servers) + " |")
    return "\n".join(lines) + "\n\n" + "\n".join(f"{i}. {src}" for i, src in enumerate(sources, 1)) + "\n"


@cli_entry
def main(argv: list[str] | None = None) -> int:
    ArgumentParser(prog="python -m quant.servers", description="print the servability table (docs/serving.md)"
                   ).parse_args(argv)
    print(table(), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
