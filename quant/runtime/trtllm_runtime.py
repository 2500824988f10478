"""The TensorRT-LLM runner: a built engine behind the same interface as :class:`~quant.runtime.torch_runtime.TorchRuntime`.

It wraps ``tensorrt_llm.runtime.ModelRunnerCpp`` (``tensorrt_llm/runtime/model_runner_cpp.py``; the commits of
every TensorRT-LLM file followed here are in docs/tensorrt-llm.md), imported only when a runner is created, so
this module imports everywhere. Nothing here was executed against TensorRT-LLM on the machine this was written
on (it cannot be installed there); the calls follow that file:

- ``ModelRunnerCpp.from_dir(engine_dir, rank=0, max_batch_size=, max_beam_width=1, max_tokens_in_paged_kv_cache=,
  kv_cache_enable_block_reuse=False, device_ids=)`` (input/output limits left at the engine's).
  Block reuse stays off (it is off by default too): the latency workload repeats the same prompts, and reusing
  their KV blocks would time a cache hit instead of a prefill. The paged KV pool is sized to the engine's own
  ``max_batch_size × max_seq_len`` tokens instead of 90 % of free GPU memory, so memory figures compare recipes.
- ``generate(batch_input_ids: List[Tensor], max_new_tokens=, end_id=, pad_id=, top_k=1, num_beams=1,
  return_dict=True, output_sequence_lengths=True)`` returns ``output_ids`` [batch, beams, max_seq_len] (prompt
  then generated tokens, padded with ``end_id``) and ``sequence_lengths`` [batch, beams] (prompt + generated).
- EOS: ``end_id`` is the first EOS id, further EOS ids go in ``stop_words_list``. ``ignore_eos`` passes
  ``end_id=-1``, an id no token has — what TensorRT-LLM's own LLM API does for ``SamplingParams(ignore_eos=True)``
  (``tensorrt_llm/executor/base_worker.py``: ``end_id=-1 if
  request.sampling_params.ignore_eos else request.sampling_params.end_id``, and no stop words).
"""
from __future__ import annotations

import json
import math
import struct
import time
from pathlib import Path

import torch

from quant.errors import UserError
from quant.runtime.torch_runtime import Generation
from quant.trtllm import plugin_plan, trtllm_version

_NO_LOGITS = ("perplexity needs the model's logits, which the TensorRT-LLM runner does not expose (engines are "
              "built without --gather_context_logits, which would make every generate call copy them back); "
              "measure perplexity with --backend torch, or pass --ppl-docs 0")


def checkpoint_decode_bytes(checkpoint_dir: Path) -> int:
    """Bytes one decode step reads from a TRT-LLM checkpoint's weights as stored (int8/int4/fp8 stay packed):
    every tensor but the embedding table, of which only the batch's rows are gathered (the same rule as
    TorchRuntime.weight_bytes). Read from the safetensors header only."""
    path = Path(checkpoint_dir) / "rank0.safetensors"
    try:
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
    except (OSError, ValueError, struct.error) as exc:
        raise UserError(f"checkpoint {checkpoint_dir}: cannot read {path.name} ({exc})") from None
    sizes = {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}
    total = sum(sizes.values())
    if "lm_head.weight" in sizes:  # the embedding is gathered, not read; a tied model reads it as lm_head
        total -= sizes.get("transformer.vocab_embedding.weight", 0)
    return total


class TrtllmRuntime:
    """Greedy decoding of a TensorRT-LLM engine; ``generate`` returns the same :class:`Generation` as TorchRuntime.

    Timing: ``ModelRunnerCpp.generate`` (non-streaming) returns only when every sequence finished and exposes no
    per-step times. With ``ignore_eos=True`` (the latency workload: every sequence produces exactly
    ``max_new_tokens``) each call therefore makes two runs of the same batch: a 1-token generate, whose wall time
    is the TTFT (prefill + first token), and the full one. Time per output token is
    ``(full - ttft) / (max_new_tokens - 1)`` — the method of ``experiments/bench_runtime.py`` — and
    ``Generation.step_s`` holds that average once per decode step (equal values, not individual step times), so
    ``ttft_s + sum(step_s)`` is the full run's wall time. Without ``ignore_eos`` sequences stop at different
    steps and no such split exists: ``ttft_s`` is NaN and ``step_s`` empty (summaries do not use timings).
    """

    name = "trtllm"
    supports_logits = False  # see logits(); TorchRuntime has them

    def __init__(self, engine_dir: Path, *, checkpoint_dir: Path | None = None, device: str = "cuda",
                 runner=None):
        self.engine_dir = Path(engine_dir)
        try:
            config = json.loads((self.engine_dir / "config.json").read_text())
            pretrained, build = config["pretrained_config"], config["build_config"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UserError(f"engine {self.engine_dir}: unreadable config.json ({exc})") from None
        self.config = config
        self.vocab = int(pretrained["vocab_size"])
        self.dtype_name = pretrained.get("dtype", "float16")
        quant = pretrained.get("quantization") or {}
        self.quant_algo, self.kv_algo = quant.get("quant_algo"), quant.get("kv_cache_quant_algo")
        self.max_batch_size = int(build["max_batch_size"])
        self.max_input_len = int(build["max_input_len"])
        self.max_seq_len = int(build["max_seq_len"])
        dev = torch.device(device if str(device).startswith("cuda") else "cuda")
        self.device = torch.device("cuda", dev.index if dev.index is not None else 0)
        self.checkpoint_path = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.weight_bytes = checkpoint_decode_bytes(checkpoint_dir) if checkpoint_dir is not None else 0
        if runner is None:
            from tensorrt_llm.runtime import ModelRunnerCpp  # only here: the package exists only on GPU machines

            runner = ModelRunnerCpp.from_dir(  # input/output limits: the engine's own (None)
                str(self.engine_dir), rank=0, max_batch_size=self.max_batch_size, max_beam_width=1,
                max_tokens_in_paged_kv_cache=self.max_batch_size * self.max_seq_len,
                kv_cache_enable_block_reuse=False, device_ids=[self.device.index])
        self.runner = runner
        self._peak_bytes = 0

    @classmethod
    def from_dir(cls, engine_dir: str | Path, **kwargs) -> "TrtllmRuntime":
        return cls(Path(engine_dir), **kwargs)

    # -- generation --------------------------------------------------------------------------------------
    def _check(self, prompts: list[list[int]], max_new_tokens: int) -> None:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise UserError("generate needs at least one non-empty prompt")
        if max_new_tokens <= 0:
            raise UserError("max_new_tokens must be > 0")
        longest = max(len(p) for p in prompts)
        if len(prompts) > self.max_batch_size:
            raise UserError(f"batch of {len(prompts)} exceeds the engine's max_batch_size {self.max_batch_size}")
        if longest > self.max_input_len or longest + max_new_tokens > self.max_seq_len:
            raise UserError(f"prompt of {longest} tokens + {max_new_tokens} new exceeds the engine's limits "
                            f"(max_input_len {self.max_input_len}, max_seq_len {self.max_seq_len})")

    def _run(self, prompts: list[list[int]], max_new_tokens: int, end_id: int, pad_id: int,
             stop_ids: list[int]) -> tuple[dict, float]:
        batch = [torch.tensor(p, dtype=torch.int32) for p in prompts]
        kwargs = {}
        if stop_ids:
            kwargs["stop_words_list"] = [[[s] for s in stop_ids] for _ in prompts]
        torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        out = self.runner.generate(batch, max_new_tokens=max_new_tokens, end_id=end_id, pad_id=pad_id, top_k=1,
                                   num_beams=1, return_dict=True, output_sequence_lengths=True, streaming=False,
                                   **kwargs)
        torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - t0
        free, total = torch.cuda.mem_get_info(self.device)
        self._peak_bytes = max(self._peak_bytes, total - free)
        return out, elapsed

    def generate(self, prompts: list[list[int]], max_new_tokens: int, eos_ids: list[int] | tuple[int, ...] = (),
                 *, ignore_eos: bool = False, pad_id: int = 0) -> Generation:
        self._check(prompts, max_new_tokens)
        eos = [] if ignore_eos else list(eos_ids)
        end_id = eos[0] if eos else -1
        ttft = math.nan
        if ignore_eos and max_new_tokens > 1:
            _, ttft = self._run(prompts, 1, end_id, pad_id, [])
        out, total = self._run(prompts, max_new_tokens, end_id, pad_id, eos[1:])
        tokens = parse_output(out, [len(p) for p in prompts], eos)
        if ignore_eos:
            if max_new_tokens == 1:
                ttft, steps = total, []
            else:
                steps = [(total - ttft) / (max_new_tokens - 1)] * (max_new_tokens - 1)
        else:
            steps = []
        return Generation(tokens=tokens, prompt_lens=[len(p) for p in prompts], ttft_s=ttft, step_s=steps)

    def logits(self, ids: list[int]) -> torch.Tensor:
        raise UserError(_NO_LOGITS)

    # -- memory (read by experiments.latency instead of PyTorch's allocator, which never sees the engine) --
    memory_kind = "GPU memory in use (cudaMemGetInfo, whole device)"

    def reset_peak_memory(self) -> None:
        self._peak_bytes = 0

    def peak_memory_mb(self) -> float | None:
        return self._peak_bytes / 2**20 if self._peak_bytes else None

    def describe(self) -> dict:
        plan = plugin_plan(self.quant_algo, self.kv_algo, self.checkpoint_path)
        return {"backend": self.name, "version": trtllm_version(), "device": str(self.device),
                "compute_dtype": self.dtype_name, "kernels": [plan["gemm"]], "attention": plan["attention"],
                "emulated": False, "emulated_parts": [],
                "kv_cache": (self.kv_algo or self.dtype_name).lower(), "engine": str(self.engine_dir),
                "timing": "TTFT = wall time of a 1-token generate; TPOT = (full - TTFT) / (n - 1)"}


def parse_output(out: dict, prompt_lens: list[int], eos_ids: list[int]) -> list[list[int]]:
    """Generated tokens per prompt from ModelRunnerCpp's dict: ``output_ids[b, 0, prompt_len:sequence_length]``,
    cut before the first EOS (whether or not the runtime kept the end token in the sequence)."""
    ids = out["output_ids"]
    lengths = out["sequence_lengths"]
    eos_set = set(eos_ids)
    tokens = []
    for b, plen in enumerate(prompt_lens):
        end = int(lengths[b][0])
        row = [int(t) for t in ids[b][0][plen:end].tolist()]
        cut = next((j for j, t in enumerate(row) if t in eos_set), len(row))
        tokens.append(row[:cut])
    return tokens
