"""TensorRT-LLM engine build: the ``trtllm-build`` command TensorRT-LLM documents for each recipe.

Flags from ``tensorrt_llm/commands/build.py`` (TRT-LLM 1.x): quantization plugins follow the checkpoint's
quant mode, so the recipe only decides the GEMM plugin: ``auto`` for FP16 and integer formats, off for FP8
(the FP8 GEMM runs through TensorRT's own kernels). The engine is sized from the search's workload.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from quant.recipes import Recipe


@dataclass(frozen=True)
class Workload:
    batch_size: int = 8
    input_len: int = 512
    output_len: int = 100

    @property
    def max_seq_len(self) -> int:
        return self.input_len + self.output_len


def build_command(checkpoint_dir: Path, engine_dir: Path, recipe: Recipe, workload: Workload) -> list[str]:
    cmd = [
        "trtllm-build",
        "--checkpoint_dir", str(checkpoint_dir),
        "--output_dir", str(engine_dir),
        "--gpt_attention_plugin", "auto",
        "--max_batch_size", str(workload.batch_size),
        "--max_input_len", str(workload.input_len),
        "--max_seq_len", str(workload.max_seq_len),
        "--max_num_tokens", str(workload.batch_size * workload.input_len),
        "--kv_cache_type", "paged",
        "--use_paged_context_fmha", "enable",
    ]
    if recipe.kind != "fp8":
        cmd += ["--gemm_plugin", "auto"]
    return cmd


def trtllm_build_available() -> str | None:
    return shutil.which("trtllm-build")
