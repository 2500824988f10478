"""``python -m experiments.scale``: every recipe kind through the search's own stages at a big model's shape.

A synthetic model folder (random weights, HF safetensors written shard by shard, so writing it never holds the
model in memory; a byte-level BPE tokenizer trained on aclsum with the model's vocabulary) is resolved, calibrated,
quantized, exported, loaded and timed by the functions the search calls — ``resolve_model``, ``get_stats``,
``build_checkpoint``, and the search's :class:`~experiments.stages.Measurer` stages (latency, held-out NLL, one
block of summaries). Random weights give garbage text: accuracy is recorded, never gated, and no stage is
skipped. Per stage and recipe it records wall time, peak host RSS (the kernel's high-water mark, reset before
each stage), peak GPU memory, and the cache's size on disk after it; ``--cache-max-gb`` is the search's budget.

    python -m experiments.scale --shape llama3-8b --recipes fp16,int8_wo,smoothquant,int4_awq,fp8 \\
        --workdir /data/scale --cache-max-gb 40 --out experiments/results/gpu/scale-8b.json

``--layers`` and ``--vocab`` shrink the shape (the CPU rehearsal in CI: the 8B width with 2 layers). The model
folder is written once per (shape, layers, vocab, seed) under ``--workdir`` and reused by later runs, so a study
can be spread over several commands (the GPU machine's 10-minute limit); the record of each run names its
recipes, and ``--merge A.json B.json … --out all.json`` makes one record of them, by recipe (:func:`merge`).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from quant import cache_budget
from quant.cache_budget import add_cache_budget_arg, apply_cache_budget_arg
from quant.errors import ArgumentParser, UserError, cli_entry, positive_int

GB = 1e9


# -- the synthetic model --------------------------------------------------------------------------------------
def model_config(shape: str, layers: int | None, vocab: int | None) -> dict:
    from quant.runtime.random_checkpoint import SHAPES

    if shape not in SHAPES:
        raise UserError(f"--shape {shape!r}: choose from {', '.join(sorted(SHAPES))}")
    d = dict(SHAPES[shape])
    d["num_hidden_layers"] = layers or d["num_hidden_layers"]
    d["vocab_size"] = vocab or d["vocab_size"]
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", **d,
        "hidden_act": "silu", "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
        "rope_theta": 500000.0,
        # Llama-3.1's rope scaling: the runtime and the exports carry it as the real 8B has it
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
        "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1, "torch_dtype": "float16", "initializer_range": 0.02,
        "attention_bias": False, "mlp_bias": False,
    }


def _tensor_shapes(cfg: dict):
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * (h // cfg["num_attention_heads"])
    yield "model.embed_tokens.weight", (v, h)
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        yield p + "input_layernorm.weight", (h,)
        yield p + "post_attention_layernorm.weight", (h,)
        for name, shape in (("q_proj", (h, h)), ("k_proj", (kv, h)), ("v_proj", (kv, h)), ("o_proj", (h, h))):
            yield p + f"self_attn.{name}.weight", shape
        for name, shape in (("gate_proj", (i, h)), ("up_proj", (i, h)), ("down_proj", (h, i))):
            yield p + f"mlp.{name}.weight", shape
    yield "model.norm.weight", (h,)
    yield "lm_head.weight", (v, h)


def write_synthetic_model(folder: Path, cfg: dict, *, seed: int = 0, shard_bytes: float = 2e9) -> Path:
    """Random fp16 weights in HF safetensors shards of at most ``shard_bytes`` (one shard in memory at a time),
    with an index, config, generation config and tokenizer; written to a temporary sibling, then renamed."""
    import torch
    from safetensors.torch import save_file

    from quant.atomic import atomic_dir, atomic_write_json

    folder = Path(folder)
    if (folder / "config.json").is_file():
        return folder
    gen = torch.Generator().manual_seed(seed)
    with atomic_dir(folder) as tmp:
        shard, size, names, weight_map, total = {}, 0, [], {}, 0

        def flush():
            nonlocal shard, size
            if shard:
                name = f"model-{len(names) + 1:05d}.safetensors"
                save_file(shard, str(tmp / name), metadata={"format": "pt"})
                names.append(name)
                weight_map.update({k: name for k in shard})
                shard, size = {}, 0

        for name, shape in _tensor_shapes(cfg):
            if name.endswith("norm.weight"):
                t = torch.ones(shape, dtype=torch.float16)
            else:  # std 1/sqrt(in): activations keep their scale through 32 layers
                t = (torch.randn(shape, generator=gen) * shape[-1] ** -0.5).to(torch.float16)
            nbytes = t.numel() * 2
            if size and size + nbytes > shard_bytes:
                flush()
            shard[name], size, total = t, size + nbytes, total + nbytes
        flush()
        final = {}
        for n, name in enumerate(names):  # the HF shard names carry the count
            final[name] = f"model-{n + 1:05d}-of-{len(names):05d}.safetensors"
            (tmp / name).rename(tmp / final[name])
        atomic_write_json(tmp / "model.safetensors.index.json",
                          {"metadata": {"total_size": total}, "weight_map": {k: final[v] for k, v in weight_map.items()}})
        atomic_write_json(tmp / "config.json", cfg)
        atomic_write_json(tmp / "generation_config.json",
                          {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"]})
        _write_tokenizer(tmp, cfg["vocab_size"])
    return folder


def _write_tokenizer(folder: Path, vocab: int) -> None:
    """A byte-level BPE with exactly ``vocab`` ids, trained on aclsum's train split (seconds): every id the
    prompts produce exists in the model, and the tokenizer's length is the model's vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from calibration.datasets import load_samples

    texts = [s.article for s in load_samples("aclsum", split="train", num_samples=100, seed=0)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    # 100 papers yield ~5.8k merges: the rest of a large vocabulary (128256) is filled with tokens that never
    # occur, so the tokenizer's size is the model's (the runtime checks the two agree).
    tok.add_tokens([f"<unused_{i}>" for i in range(vocab - tok.get_vocab_size())])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>")
    fast.save_pretrained(folder)


# -- measurement ------------------------------------------------------------------------------------------------
def _reset_peak_rss() -> None:
    """Reset the kernel's high-water mark of this process's RSS (Linux ≥ 4.0: ``5`` to clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


class Stages:
    """Times stages and records their peaks: ``with stages("checkpoint", recipe): ...``; ``save(rows)`` after
    each one, so a run cut short (the GPU machine's 10-minute limit) keeps what finished."""

    def __init__(self, log, save=lambda rows: None):
        self.rows: list[dict] = []
        self.log, self.save = log, save

    def __call__(self, stage: str, recipe: str = "", *, required: bool = False):
        """``required``: every later stage needs this one; if it fails the run ends with its error in one line
        (the record as it stands saved) instead of going on to stages that cannot start."""
        return _Stage(self, stage, recipe, required)


class _Stage:
    def __init__(self, owner: Stages, stage: str, recipe: str, required: bool):
        self.owner, self.row, self.required = owner, {"stage": stage, "recipe": recipe}, required

    def __enter__(self):
        import torch

        self.cuda = torch.cuda.is_available()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        _reset_peak_rss()
        self.disk0 = cache_budget.usage()
        self.t0 = time.perf_counter()
        return self.row

    def __exit__(self, kind, exc, tb):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
        disk = cache_budget.usage()
        self.row.update(wall_s=time.perf_counter() - self.t0, peak_rss_bytes=_peak_rss(),
                        peak_gpu_bytes=torch.cuda.max_memory_allocated() if self.cuda else 0,
                        cache_bytes=disk, cache_written_bytes=max(0, disk - self.disk0))
        if exc is not None:
            self.row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
        self.owner.rows.append(self.row)
        self.owner.log(_row_line(self.row))
        self.owner.save(self.owner.rows)
        if self.required and isinstance(exc, Exception):
            raise UserError(f"stage {self.row['stage']} failed ({self.row['error']}); the stages after it need it")
        return isinstance(exc, Exception)  # a recipe's failure is a row; signals and exits go on


def _row_line(r: dict) -> str:
    extra = f"  {r['error']}" if "error" in r else ""
    return (f"{r['recipe'] or '-':24s} {r['stage']:12s} {r['wall_s']:8.1f} s  RSS {r['peak_rss_bytes'] / GB:6.2f} GB"
            f"  GPU {r['peak_gpu_bytes'] / GB:6.2f} GB  cache {r['cache_bytes'] / GB:6.2f} GB"
            f" (+{r['cache_written_bytes'] / GB:.2f}){extra}")


def run(args, save=lambda rec: None) -> dict:
    from calibration.data import CalibSpec
    from calibration.datasets import load_samples
    from calibration.stats import get_stats
    from experiments.device_use import DeviceUse, device_identity
    from experiments.evaluate import settings_from_args
    from experiments.search import SEARCH_DEFAULTS
    from experiments.stages import Measurer, block_bounds
    from quant.apply import build_checkpoint, fp16_bytes
    from quant.backends import resolve_backend
    from quant.model_source import resolve_model
    from quant.recipes import parse_recipe_arg

    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    cfg = model_config(args.shape, args.layers, args.vocab)
    name = f"{args.shape}-l{cfg['num_hidden_layers']}-v{cfg['vocab_size']}-s{args.seed}"
    recipes = [parse_recipe_arg(r.strip()) for r in args.recipes.split(",") if r.strip()]
    head = {"recipes": [r.label for r in recipes], "config": cfg,
            "cache_budget_bytes": int(args.cache_max_gb * GB) if args.cache_max_gb else None}
    stages = Stages(log, lambda rows: save({**head, "rows": rows}))
    with stages("write_model", required=True):
        folder = write_synthetic_model(Path(args.workdir) / "models" / name, cfg, seed=args.seed)
    with stages("resolve", required=True):
        model = resolve_model(str(folder))
    fp16 = fp16_bytes(model)
    head["model"] = {"folder": str(folder), "config": cfg, "fp16_bytes": fp16, "content_hash": model.content_hash}
    log(f"model {folder}: {fp16 / GB:.2f} GB fp16, read {'in place' if model.hf_dir == folder.resolve() else 'converted'}")
    calib = CalibSpec(num_samples=args.calib_samples, seq_len=args.calib_seq_len)
    with stages("calib_stats", required=True):
        get_stats(model, calib)
    backend = resolve_backend("torch", args.device)
    settings = settings_from_args(_settings_namespace(args, SEARCH_DEFAULTS, folder), backend)
    samples = load_samples("aclsum", split="test", num_samples=args.num_samples, seed=0)
    measurer = Measurer(settings, model, calib, backend, samples=samples, bounds=block_bounds(len(samples), len(samples)),
                        proxy_docs=args.ppl_docs, proxy_seq_len=args.ppl_seq_len, log=lambda m: None,
                        device=DeviceUse(device_identity(settings.device)))
    for recipe in recipes:
        label = recipe.label
        with stages("checkpoint", label) as row:
            ckpt = build_checkpoint(model, recipe, calib if recipe.needs_calibration else None)
            row["checkpoint_bytes"] = sum(f.stat().st_size for f in ckpt.iterdir())
        if "error" in stages.rows[-1]:
            continue
        with stages("latency", label) as row:
            lat = measurer.latency(recipe)[0]["latency"]
            row["tpot_ms"], row["ttft_ms"] = lat["tpot_ms"], lat["ttft_ms"]
        with stages("proxy", label) as row:
            row["perplexity"] = measurer.proxy(recipe)[0]["perplexity"]["perplexity"]
        with stages("accuracy", label) as row:
            row["rouge1"] = measurer.block(recipe, 0)[0]["rouge"]["rouge1"]  # recorded, never gated
        measurer.release()
    return {**head, "rows": stages.rows}


STAGES_PER_RECIPE = ("checkpoint", "latency", "proxy", "accuracy")


def merge(records: list[dict]) -> dict:
    """One record from runs that split the recipes between them (the GPU machine's 10-minute limit): per recipe,
    the rows of the last run that went through all its stages without an error (else its last attempt, errors
    and all); the model stages of every run; each row marked with the index of its run in ``runs``. Complete when
    every recipe has such a run. UserError for records of different models."""
    hashes = {r["model"]["content_hash"] for r in records if "model" in r}
    if len(hashes) > 1:
        raise UserError(f"the records are of {len(hashes)} different models; merge runs of one model")
    order = list(dict.fromkeys(row["recipe"] for r in records for row in r["rows"] if row["recipe"]))
    rows = [{**row, "run": i} for i, r in enumerate(records) for row in r["rows"] if not row["recipe"]]
    complete = True
    for recipe in order:
        attempts = [(i, [row for row in r["rows"] if row["recipe"] == recipe]) for i, r in enumerate(records)]
        attempts = [(i, got) for i, got in attempts if got]
        whole = [(i, got) for i, got in attempts if [x["stage"] for x in got] == list(STAGES_PER_RECIPE)
                 and not any("error" in x for x in got)]
        complete &= bool(whole)
        i, got = (whole or attempts)[-1]
        rows += [{**x, "run": i} for x in got]
    last = next((r for r in reversed(records) if "model" in r), records[-1])
    return {"recipes": order, "config": last.get("config"), "model": last.get("model"),
            "cache_budget_bytes": last.get("cache_budget_bytes"), "rows": rows, "complete": complete,
            "runs": [{k: r.get(k) for k in ("command", "created", "machine", "complete")} for r in records]}


def _settings_namespace(args, defaults: dict, folder: Path):
    """The search's evaluation settings (its defaults: latency workload, batch), with this run's model, article
    count and output length."""
    import argparse

    return argparse.Namespace(**{
        **defaults, "model": str(folder), "trust_remote_code": False, "dataset": "aclsum", "split": "test",
        "num_samples": args.num_samples, "input_column": None, "reference_column": None, "max_input_len": 256,
        "max_output_len": args.max_output_len, "device": args.device, "compute_dtype": "auto", "seed": 0,
        "ppl_docs": args.ppl_docs, "ppl_seq_len": args.ppl_seq_len, "no_progress": True,
        "cache_max_gb": args.cache_max_gb})


@cli_entry
def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m experiments.scale", description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama3-8b")
    p.add_argument("--layers", type=positive_int, default=None, help="fewer layers than the shape has")
    p.add_argument("--vocab", type=positive_int, default=None, help="another vocabulary size (tokenizer trained to it)")
    p.add_argument("--recipes", default="fp16,int8_wo,smoothquant,int4_awq,int4_gptq,w4a8_awq,fp8,fp8:kv_cache=fp8")
    p.add_argument("--workdir", type=Path,
                   help="where the synthetic model folder is written (reused); required unless --merge")
    p.add_argument("--merge", type=Path, nargs="+", metavar="RECORD",
                   help="merge these records of runs that split the recipes into --out (runs nothing)")
    add_cache_budget_arg(p)
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calib-samples", type=positive_int, default=8)
    p.add_argument("--calib-seq-len", type=positive_int, default=128)
    p.add_argument("--num-samples", type=positive_int, default=4, help="articles summarized per recipe (recorded)")
    p.add_argument("--max-output-len", type=positive_int, default=16)
    p.add_argument("--ppl-docs", type=positive_int, default=2)
    p.add_argument("--ppl-seq-len", type=positive_int, default=128)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    from quant.atomic import atomic_write_json

    if args.merge:
        records = []
        for path in args.merge:
            try:
                records.append(json.loads(path.read_text()))
            except (OSError, ValueError) as exc:
                raise UserError(f"--merge {path}: not a readable record ({type(exc).__name__})") from None
            if not isinstance(records[-1], dict) or not isinstance(records[-1].get("rows"), list):
                raise UserError(f"--merge {path}: not a record of experiments.scale (no rows)")
        rec = merge(records)
        atomic_write_json(args.out, rec)
        print(table(rec))
        return 0
    if args.workdir is None:
        p.error("--workdir is required (unless --merge)")

    apply_cache_budget_arg(args)
    from experiments import environment

    about = dict(command="python -m experiments.scale " + " ".join(sys.argv[1:] if argv is None else argv),
                 machine=environment.machine(), created=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    rec = run(args, save=lambda part: atomic_write_json(args.out, {**part, **about, "complete": False}))
    rec = {**rec, **about, "complete": True}
    atomic_write_json(args.out, rec)
    print(table(rec))
    return 0


def table(rec: dict) -> str:
    runs = "runs" in rec  # a merged record: each row's run
    cols = ["recipe", "stage", "wall s", "peak RSS GB", "peak GPU GB", "cache GB (+written)", "result"]
    cols += ["run"] if runs else []
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rec["rows"]:
        result = r.get("error") or ", ".join(f"{k} {r[k]:.4g}" for k in ("tpot_ms", "perplexity", "rouge1") if k in r)
        lines.append(f"| {r['recipe'] or '—'} | {r['stage']} | {r['wall_s']:.1f} | {r['peak_rss_bytes'] / GB:.2f} | "
                     f"{r['peak_gpu_bytes'] / GB:.2f} | {r['cache_bytes'] / GB:.2f} (+{r['cache_written_bytes'] / GB:.2f}) "
                     f"| {result} |" + (f" {r['run'] + 1} |" if runs else ""))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
