"""``python -m experiments.evaluate``: one recipe on one model → ROUGE (with CI) and latency, as a table and JSON.

The chain is the product's contract: resolve the model, write the recipe's TRT-LLM checkpoint, load *that
folder* in a runtime, summarize the dataset, score it, then time the workload. The JSON record carries
everything needed to reproduce or compare the result (versions, machine, checkpoint path, per-sample output).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from calibration.data import CalibSpec, add_calib_args, calib_spec_from_args
from calibration.datasets import load_samples
from experiments import environment
from experiments.device_use import DeviceUse, device_identity
from experiments.prompts import PromptBuilder
from quant import faults
from quant.atomic import atomic_write_json, ensure_writable_file
from quant.cache_budget import add_cache_budget_arg, apply_cache_budget_arg
from quant.backends import backend_device, resolve_backend
from quant.errors import ArgumentParser, UserError, cli_entry, positive_int, seed_int
from quant.model_source import load_eos_ids, resolve_model
from quant.recipes import parse_recipe_arg

DEFAULTS = dict(dataset="aclsum", split="test", num_samples=50, seed=0, max_input_len=512, max_output_len=100,
                batch_size=8, input_len=512, output_len=64, latency_repeats=3)


@dataclass
class EvalSettings:
    model: str | None = None
    dataset: str = DEFAULTS["dataset"]
    split: str = DEFAULTS["split"]
    num_samples: int = DEFAULTS["num_samples"]
    seed: int = DEFAULTS["seed"]
    input_column: str | None = None
    reference_column: str | None = None
    max_input_len: int = DEFAULTS["max_input_len"]
    max_output_len: int = DEFAULTS["max_output_len"]
    batch_size: int = DEFAULTS["batch_size"]
    input_len: int = DEFAULTS["input_len"]
    output_len: int = DEFAULTS["output_len"]
    latency_repeats: int = DEFAULTS["latency_repeats"]
    device: str = "cpu"
    compute_dtype: str = "bfloat16"  # the low-precision CPU kernels (int8/int4) only pay off in bf16
    backend: str = "torch"  # resolved: "torch" | "trtllm" (quant.backends.resolve_backend turns "auto" into one)
    ppl_docs: int = 20  # aclsum val papers for perplexity (0: skip)
    ppl_seq_len: int = 512
    progress: bool = True
    trust_remote_code: bool = False  # --trust-remote-code: lets a HF folder's own Python code run (off by default)


def add_common_args(parser: argparse.ArgumentParser, *, seed_help: str | None = None) -> None:
    """Model, data and workload flags, shared by evaluate and the search."""
    d = DEFAULTS
    parser.add_argument("--model", default=None, help="'default' (embedded SmolLM2-135M-Instruct), a .gguf file or a HF folder")
    add_trust_remote_code_arg(parser)
    add_cache_budget_arg(parser)
    parser.add_argument("--dataset", default=d["dataset"], help="aclsum | cnn_dailymail | a .jsonl/.json/.parquet/.csv file or datasets folder")
    parser.add_argument("--split", default=d["split"], help="dataset split the articles come from")
    parser.add_argument("--num-samples", type=positive_int, default=d["num_samples"],
                        help="articles to summarize (clamped to the split's size, said when it is)")
    parser.add_argument("--seed", type=seed_int, default=d["seed"],
                        help=seed_help or "sample selection, latency prompts and the bootstrap CI")
    parser.add_argument("--input-column", default=None, help="column of the text to summarize (default: the dataset's known one)")
    parser.add_argument("--reference-column", default=None,
                        help="column of the reference summary (default: the dataset's known one)")
    parser.add_argument("--max-input-len", type=positive_int, default=d["max_input_len"], help="prompt tokens; only the article is truncated")
    parser.add_argument("--max-output-len", type=positive_int, default=d["max_output_len"], help="summary token budget")
    parser.add_argument("--batch-size", type=positive_int, default=d["batch_size"], help="batch for summaries and the latency workload")
    parser.add_argument("--input-len", type=positive_int, default=d["input_len"], help="latency workload: prompt tokens")
    parser.add_argument("--output-len", type=positive_int, default=d["output_len"], help="latency workload: generated tokens")
    parser.add_argument("--latency-repeats", type=positive_int, default=d["latency_repeats"],
                        help="timed runs of the latency workload (mean and 95%% t interval)")
    parser.add_argument("--device", default="auto",
                        help="auto (cuda when a CUDA GPU is visible, else cpu) | cpu | cuda[:N]")
    parser.add_argument("--compute-dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                        help="activation dtype of the runtime (auto: float16 on CUDA, the checkpoints' dtype and what "
                             "the Triton kernels are tuned for; bfloat16 on CPU, where PyTorch's int8/int4 kernels "
                             "are fast)")
    parser.add_argument("--backend", default="auto", choices=("auto", "torch", "trtllm"),
                        help="runtime: the PyTorch runtime, or a TensorRT-LLM engine built from the checkpoint "
                             "(auto: trtllm when tensorrt_llm imports and a CUDA GPU is visible)")
    parser.add_argument("--ppl-docs", type=int, default=None,
                        help="aclsum val papers for perplexity (0 skips it; default 20, 0 with the trtllm backend)")
    parser.add_argument("--ppl-seq-len", type=positive_int, default=512, help="tokens per held-out perplexity document")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_trust_remote_code_arg(parser: argparse.ArgumentParser) -> None:
    """``--trust-remote-code`` for every CLI that takes ``--model`` (off: a model folder's Python never runs)."""
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="let transformers run Python code shipped in the --model folder (off by default; "
                             "only for folders you trust)")


def settings_from_args(args: argparse.Namespace, backend=None) -> EvalSettings:
    """``backend``: the resolved :class:`~quant.backends.BackendChoice` (None: the PyTorch runtime)."""
    apply_cache_budget_arg(args)
    name = backend.name if backend is not None else "torch"
    device = resolve_device(args.device)  # settings hold the concrete device: it is part of the evaluation key
    if backend is not None:
        device = backend_device(backend, device)
    ppl_docs = args.ppl_docs
    if ppl_docs is None:
        ppl_docs = 0 if name == "trtllm" else 20
    elif ppl_docs > 0 and name == "trtllm":  # a caller's default (the search's 8): TensorRT-LLM exposes no logits
        print(f"note: perplexity skipped (--ppl-docs {ppl_docs}): the TensorRT-LLM runner exposes no logits",
              file=sys.stderr)
        ppl_docs = 0
    return EvalSettings(
        model=args.model, dataset=args.dataset, split=args.split, num_samples=args.num_samples, seed=args.seed,
        input_column=args.input_column, reference_column=args.reference_column, max_input_len=args.max_input_len,
        max_output_len=args.max_output_len, batch_size=args.batch_size, input_len=args.input_len,
        output_len=args.output_len, latency_repeats=args.latency_repeats,
        device=device, compute_dtype=resolve_compute_dtype(args.compute_dtype, device), ppl_docs=ppl_docs, ppl_seq_len=args.ppl_seq_len,
        progress=not args.no_progress, backend=name, trust_remote_code=args.trust_remote_code,
    )


def resolve_device(device: str) -> str:
    """``auto`` → ``cuda`` when PyTorch sees a CUDA GPU, else ``cpu``; anything else is checked as given."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return check_device(device)


def resolve_compute_dtype(compute_dtype: str, device: str) -> str:
    if compute_dtype != "auto":
        return compute_dtype
    return "float16" if str(device).startswith("cuda") else "bfloat16"


def check_device(device: str) -> str:
    import torch

    if device == "cpu":
        return device
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: no CUDA GPU is visible on this machine")
        return device
    raise UserError(f"--device {device!r}: expected cpu or cuda[:N]")


def summarize(runtime, builder, samples, *, batch_size: int, max_output_len: int, eos_ids, progress: bool):
    """Greedy summaries in batches of similar prompt length (less padding); returns texts in sample order."""
    from tqdm import tqdm

    prompts = [builder(s.article) for s in samples]
    order = sorted(range(len(samples)), key=lambda i: len(prompts[i]))
    texts: list[str] = [""] * len(samples)
    generated: list[list[int]] = [[] for _ in samples]
    bar = tqdm(total=len(samples), desc="summaries", unit="doc", disable=not progress, file=sys.stderr)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        gen = runtime.generate([prompts[i] for i in idx], max_output_len, eos_ids)
        for i, tokens in zip(idx, gen.tokens):
            texts[i] = builder.decode(tokens)
            generated[i] = tokens
        bar.update(len(idx))
        faults.point("eval.summaries")  # crash test: mid-evaluation, nothing of it written yet
    bar.close()
    return texts, prompts, generated


class Candidate:
    """One recipe's checkpoint loaded in a runtime, measured stage by stage: perplexity/NLL on held-out text,
    summaries of given samples with their ROUGE, latency of the workload. The search caches each stage on its
    own (experiments/store.py); :func:`evaluate` runs them all. The checkpoint is built (or read from the
    cache) on construction, the runtime opened on first use."""

    def __init__(self, settings: EvalSettings, recipe, *, model=None, calib=None, checkpoint: Path | None = None,
                 log=print, backend=None):
        from transformers import AutoTokenizer

        from quant import cache_budget
        from quant.apply import build_checkpoint

        if calib is None and recipe.needs_calibration and checkpoint is None:
            calib = CalibSpec()
        self.settings, self.recipe, self.calib, self.log = settings, recipe, calib, log
        self.device = check_device(settings.device)
        self.timings: dict[str, float] = {}
        t0 = time.perf_counter()
        self.model = model or resolve_model(settings.model, trust_remote_code=settings.trust_remote_code)
        self.timings["model_s"] = time.perf_counter() - t0
        self.tokenizer = AutoTokenizer.from_pretrained(self.model.hf_dir)
        self.builder = PromptBuilder(self.tokenizer, settings.max_input_len)
        self.eos_ids = load_eos_ids(self.model.hf_dir)
        t0 = time.perf_counter()
        self.external = checkpoint is not None
        self.ckpt_dir = Path(checkpoint) if checkpoint is not None else build_checkpoint(self.model, recipe, calib, log=log)
        # In use until close(): the cache's budget never evicts it under this candidate (just built or used, it is
        # the most recently used entry: the last an eviction would pick before this pin).
        self._pin = cache_budget.Pin(self.ckpt_dir)
        self.timings["checkpoint_s"] = time.perf_counter() - t0
        log(f"checkpoint: {self.ckpt_dir}")
        if backend is None or backend.name != settings.backend:
            backend = resolve_backend(settings.backend, self.device)
        self.backend = backend
        self._runtime = None

    @property
    def runtime(self):
        if self._runtime is None:
            from quant.backends import open_runtime
            from quant.trtllm import Workload

            s = self.settings
            # A TensorRT-LLM engine is sized for both the summaries (prompts <= max_input_len) and the latency workload.
            workload = Workload(s.batch_size, s.max_input_len, s.max_output_len).covering(
                Workload(s.batch_size, s.input_len, s.output_len))
            t0 = time.perf_counter()
            self._runtime = open_runtime(self.backend, self.ckpt_dir, model=self.model,
                                         recipe=None if self.external else self.recipe, workload=workload,
                                         device=self.device, compute_dtype=s.compute_dtype, log=self.log)
            self.timings["runtime_s"] = time.perf_counter() - t0
            if self._runtime.vocab > len(self.tokenizer):
                raise UserError(f"checkpoint vocab {self._runtime.vocab} does not match the tokenizer of --model "
                                f"({len(self.tokenizer)})")
        return self._runtime

    def close(self) -> None:
        """Done with the checkpoint: its runtime goes, and the cache may evict it (quant.cache_budget)."""
        self._runtime = None
        self._pin.close()

    def checkpoint_info(self) -> dict:
        return {"path": str(self.ckpt_dir), "size_bytes": sum(f.stat().st_size for f in self.ckpt_dir.iterdir())}

    def describe(self) -> dict:
        b = self.backend
        return {**self.runtime.describe(), "backend": b.name, "version": b.version, "backend_reason": b.reason}

    def summarize(self, samples) -> dict:
        """Greedy summaries of ``samples`` scored with ROUGE; the health check of what was generated."""
        from experiments import rouge
        from experiments.health import check as check_health

        s = self.settings
        t0 = time.perf_counter()
        texts, prompts, generated = summarize(self.runtime, self.builder, samples, batch_size=s.batch_size,
                                              max_output_len=s.max_output_len, eos_ids=self.eos_ids,
                                              progress=s.progress)
        self.timings["summaries_s"] = self.timings.get("summaries_s", 0.0) + time.perf_counter() - t0
        scores = rouge.score(texts, [x.reference for x in samples], seed=s.seed)
        health = check_health(self.runtime, prompts[0], generated, s.max_output_len, None)
        return {"rouge": scores.to_dict(), "health": health, "prompts_tokens": [len(p) for p in prompts],
                "samples": [{"id": x.id, "prediction": t, "reference": x.reference, "rouge1": r}
                            for x, t, r in zip(samples, texts, scores.per_sample_rouge1)]}

    def heldout_nll(self, num_docs: int, seq_len: int) -> dict:
        """Per-document mean NLL (nats/token) on held-out text and the perplexity over all of it."""
        from experiments.perplexity import heldout_texts, perplexity

        t0 = time.perf_counter()
        result = perplexity(self.runtime, self.tokenizer, heldout_texts(num_docs=num_docs, seed=self.settings.seed),
                            seq_len=seq_len)
        self.timings["perplexity_s"] = time.perf_counter() - t0
        return result

    def latency(self, repeats: int | None = None):
        from experiments import latency

        s = self.settings
        t0 = time.perf_counter()
        lat = latency.measure(self.runtime, batch_size=s.batch_size, input_len=s.input_len,
                              output_len=s.output_len, repeats=repeats or s.latency_repeats, seed=s.seed)
        self.timings["latency_s"] = time.perf_counter() - t0
        return lat


def evaluate(settings: EvalSettings, recipe, *, calib=None, checkpoint: Path | None = None, log=print,
             backend=None) -> dict:
    """Run the whole chain for one recipe (or an existing checkpoint folder); return the JSON-able record.

    ``backend``: the :class:`~quant.backends.BackendChoice` the CLI resolved (its reason goes into the record);
    None resolves ``settings.backend`` here."""

    # Cheap input checks first, so bad data fails before minutes of model work.
    samples = load_samples(settings.dataset, split=settings.split, num_samples=settings.num_samples,
                           seed=settings.seed, input_column=settings.input_column,
                           reference_column=settings.reference_column)
    # Building and summarizing share the device with other processes' work; the latency takes it alone (as the
    # search's workers do: experiments.device_use).
    use = DeviceUse(device_identity(settings.device))
    try:
        with use.shared():
            cand = Candidate(settings, recipe, calib=calib, checkpoint=checkpoint, log=log, backend=backend)
            try:
                return _evaluate(cand, settings, recipe, samples, checkpoint, log, use)
            finally:
                cand.close()
    finally:
        use.close()


def _evaluate(cand, settings, recipe, samples, checkpoint, log, use: DeviceUse) -> dict:
    summary = cand.summarize(samples)
    ppl = cand.heldout_nll(settings.ppl_docs, settings.ppl_seq_len) if settings.ppl_docs else None
    health = summary["health"]
    if ppl is not None and not math.isfinite(ppl["perplexity"]):
        health = {**health, "ok": False, "reasons": [*health["reasons"], "non-finite perplexity"]}
    if not health["ok"]:
        log("unhealthy model: " + "; ".join(health["reasons"]))
    with use.exclusive():
        lat = cand.latency()
    model = cand.model
    return {
        "recipe": recipe.to_dict() if checkpoint is None else None,
        "recipe_label": recipe.label if checkpoint is None else f"checkpoint:{Path(checkpoint).name}",
        "recipe_hash": recipe.hash if checkpoint is None else None,
        "model": {"source": model.source, "kind": model.source_kind, "hash": model.content_hash},
        "checkpoint": cand.checkpoint_info(),
        "dataset": {"name": settings.dataset, "split": settings.split, "num_samples": len(samples),
                    "seed": settings.seed, "max_input_len": settings.max_input_len,
                    "max_output_len": settings.max_output_len, "chat_template": cand.builder.uses_chat_template,
                    "mean_prompt_tokens": sum(summary["prompts_tokens"]) / len(samples)},
        "rouge": summary["rouge"],
        "perplexity": ppl,
        "health": health,
        "calibration": dataclasses.asdict(cand.calib) if cand.calib is not None and recipe.needs_calibration else None,
        "latency": lat.to_dict(),
        "runtime": cand.describe(),
        "versions": environment.versions(),
        "machine": environment.machine(),
        "timings_s": cand.timings,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "samples": summary["samples"],
    }


def format_record(rec: dict) -> str:
    r, lat = rec["rouge"], rec["latency"]
    lo, hi = r["rouge1_ci"]
    rows = [
        ("recipe", rec["recipe_label"]),
        ("model", f"{rec['model']['source']} ({rec['model']['hash'][:12]})"),
        ("dataset", f"{rec['dataset']['name']}/{rec['dataset']['split']} n={rec['dataset']['num_samples']}"),
        ("ROUGE-1", f"{r['rouge1']:.2f}  [{lo:.2f}, {hi:.2f}] {int(r['confidence'] * 100)}% CI"),
        ("ROUGE-2 / L / Lsum", f"{r['rouge2']:.2f} / {r['rougeL']:.2f} / {r['rougeLsum']:.2f}"),
        ("perplexity", f"{rec['perplexity']['perplexity']:.2f} (aclsum val, {rec['perplexity']['docs']} docs × "
                       f"≤{rec['perplexity']['seq_len']} tokens)" if rec.get("perplexity") else "skipped"),
        ("workload", f"batch {lat['batch_size']}, in {lat['input_len']}, out {lat['output_len']}, {lat['device']}"),
        ("TTFT", f"{lat['ttft_ms']:.1f} ms  (min {lat['ttft_ms_min']:.1f}, max {lat['ttft_ms_max']:.1f})"),
        ("time per output token", f"{lat['tpot_ms']:.2f} ms  (min {lat['tpot_ms_min']:.2f}, max {lat['tpot_ms_max']:.2f})"),
        ("throughput", f"{lat['tokens_per_s']:.1f} tok/s end-to-end, {lat['decode_tokens_per_s']:.1f} tok/s decode"),
        ("peak memory", f"{lat['peak_memory_mb']:.0f} MB ({lat['peak_memory_kind']})" if lat["peak_memory_mb"] else "n/a"),
        ("weights read / step", f"{lat['weight_bytes'] / 2**20:.1f} MiB → {lat['implied_bandwidth_gbs']:.1f} GB/s implied"),
        ("kernels", ", ".join(rec["runtime"]["kernels"]) + (" (emulated)" if lat["emulated"] else "")),
        ("checkpoint", f"{rec['checkpoint']['path']} ({rec['checkpoint']['size_bytes'] / 2**20:.1f} MiB)"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


@cli_entry
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m experiments.evaluate", description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--recipe", default="fp16",
                        help="a recipe file (.yaml/.json) or kind[:key=value,...]: fp16, int8_wo, smoothquant:alpha=0.8, "
                             "int4_awq:group_size=64, fp8; any with kv_cache=int8|fp8 and exclude=PATTERN+PATTERN")
    add_calib_args(parser)
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="evaluate this TRT-LLM checkpoint folder (or ModelOpt HF export, torch backend) instead "
                             "of building --recipe (tokenizer from --model)")
    parser.add_argument("--out", type=Path, default=None, help="JSON record path (default: results/eval-<recipe>-<dataset>.json)")
    args = parser.parse_args(argv)
    # Imported after the flags are read: torch costs seconds, and --help or a bad flag need none of it.
    from quant.checkpoint import load_checkpoint
    from quant.hf_checkpoint import checkpoint_format, load_hf_export
    recipe = parse_recipe_arg(args.recipe)
    if args.ppl_docs is not None and args.ppl_docs < 0:
        raise UserError("--ppl-docs must be >= 0")
    backend = resolve_backend(args.backend, args.device)
    if backend.name == "trtllm" and args.ppl_docs:
        raise UserError(f"--ppl-docs {args.ppl_docs}: perplexity needs logits, which the TensorRT-LLM runner does "
                        "not expose; use --backend torch for perplexity, or --ppl-docs 0")
    settings = settings_from_args(args, backend)
    if args.checkpoint is not None:
        # A broken folder fails here, before any model work.
        if checkpoint_format(args.checkpoint) == "hf":
            if backend.name == "trtllm":
                raise UserError(f"--checkpoint {args.checkpoint} is a Hugging Face export, which TensorRT-LLM runs "
                                "through tensorrt_llm.LLM, not as an engine; pass its TRT-LLM checkpoint instead")
            load_hf_export(args.checkpoint)
        else:
            load_checkpoint(args.checkpoint)
    label = recipe.label if args.checkpoint is None else args.checkpoint.name
    out = args.out or Path("results") / f"eval-{label}-{Path(settings.dataset).stem}.json"
    ensure_writable_file(out)  # before minutes of evaluation, not after them
    backend.announce()  # every input checked: the choice of backend is news, not noise before an error
    record = evaluate(settings, recipe, calib=calib_spec_from_args(args), checkpoint=args.checkpoint,
                      log=lambda m: print(m, file=sys.stderr), backend=backend)
    atomic_write_json(out, record)
    print(format_record(record))
    print(f"record: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
