"""``python -m quant.search --min-rouge1 14``: the fastest recipe whose ROUGE-1 stays above a threshold.

An optuna study over the recipe space (kind, SmoothQuant alpha, AWQ group size, KV-cache dtype, FP16 fallback
of the layers with the strongest activation outliers). Each trial builds its TRT-LLM checkpoint, runs it,
and reports measured latency (time per output token at the stated workload) as the objective; ROUGE-1 enters
through optuna's ``constraints_func`` so the sampler learns from infeasible trials instead of discarding them.

Resumable and distributed by construction: trials live in the ``--storage`` (SQLite file by default; any
optuna URL, e.g. PostgreSQL for several workers), evaluations are cached by recipe hash in the shared cache,
and the budget ``--n-trials`` counts finished trials of the study, so re-running the same command continues
where a killed run stopped.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

from quant.errors import ArgumentParser, UserError, cli_entry, positive_int

SEARCH_DEFAULTS = dict(num_samples=16, max_output_len=64, batch_size=4, input_len=256, output_len=32,
                       latency_repeats=2, ppl_docs=8, ppl_seq_len=256, calib_samples=16, calib_seq_len=128,
                       n_trials=8, timeout=480.0)
ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
FALLBACK_K = (0, 2, 4)


def parse_args(argv):
    from experiments.evaluate import add_common_args
    from quant.apply import add_calib_args

    p = ArgumentParser(prog="python -m quant.search", description=__doc__.splitlines()[0])
    gate = p.add_mutually_exclusive_group(required=True)
    gate.add_argument("--min-rouge1", type=float, help="absolute ROUGE-1 threshold (0-100)")
    gate.add_argument("--max-rouge1-drop", type=float, help="allowed ROUGE-1 drop below the FP16 baseline (points)")
    p.add_argument("--confidence", type=float, default=None,
                   help="constrain the lower end of this bootstrap CI of ROUGE-1 (e.g. 0.95) instead of the mean")
    add_common_args(p)
    add_calib_args(p)
    p.add_argument("--n-trials", type=positive_int, default=SEARCH_DEFAULTS["n_trials"],
                   help="finished trials the study should hold (a rerun continues up to this number)")
    p.add_argument("--timeout", type=float, default=SEARCH_DEFAULTS["timeout"], help="seconds; no new trial starts after it")
    p.add_argument("--storage", default=None, help="optuna storage URL (default: sqlite in --results-dir); "
                   "credentials may come from $QUANT_SEARCH_STORAGE instead of the command line")
    p.add_argument("--study-name", default="quant-search")
    p.add_argument("--recipes", default="fp16,int8_wo,smoothquant,int4_awq,fp8", help="comma-separated kinds to search")
    p.add_argument("--results-dir", type=Path, default=Path("results/search"))
    p.set_defaults(**{k: v for k, v in SEARCH_DEFAULTS.items() if k not in ("n_trials", "timeout")})
    args = p.parse_args(argv)
    if args.min_rouge1 is not None and not 0 <= args.min_rouge1 <= 100:
        raise UserError(f"--min-rouge1 must be in [0, 100], got {args.min_rouge1:g}")
    if args.max_rouge1_drop is not None and not 0 <= args.max_rouge1_drop <= 100:
        raise UserError(f"--max-rouge1-drop must be in [0, 100], got {args.max_rouge1_drop:g}")
    if args.confidence is not None and not 0 < args.confidence < 1:
        raise UserError(f"--confidence must be in (0, 1), got {args.confidence:g}")
    if args.timeout <= 0:
        raise UserError("--timeout must be > 0 seconds")
    return args


def storage_url(args) -> str:
    import os

    url = args.storage or os.environ.get("QUANT_SEARCH_STORAGE")
    if url:
        return url
    args.results_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(args.results_dir / 'study.db').resolve()}"


def open_study(url: str, name: str, seed: int, *, create: bool = True):
    import optuna
    from optuna.samplers import TPESampler

    storage = None
    for attempt in range(5):
        try:
            storage = optuna.storages.RDBStorage(
                url, heartbeat_interval=20, grace_period=60,
                engine_kwargs={"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True},
            )
            break
        except Exception as exc:  # sqlalchemy raises many types for bad URLs / unreachable servers
            # Workers starting together on an empty database race to create optuna's schema: the loser
            # sees a unique violation and simply retries once the winner committed.
            if "IntegrityError" in type(exc).__name__ and attempt < 4:
                time.sleep(0.5 + attempt)
                continue
            detail = redact(str(exc).splitlines()[0][:200]) if str(exc) else ""
            raise UserError(f"cannot open storage {redact(url)}: {type(exc).__name__}: {detail}") from None
    sampler = TPESampler(seed=seed, constraints_func=constraints, n_startup_trials=4, multivariate=True,
                         group=True)
    if not create:
        try:
            return optuna.load_study(study_name=name, storage=storage, sampler=sampler)
        except KeyError:
            raise UserError(f"no study named {name!r} in {redact(url)}") from None
    return optuna.create_study(study_name=name, storage=storage, sampler=sampler, direction="minimize",
                               load_if_exists=True)


def redact(url: str) -> str:
    """Never print a password that came with a storage URL."""
    import re

    return re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", url)


def constraints(trial) -> list[float]:
    # optuna treats values <= 0 as satisfied.
    return [trial.user_attrs.get("constraint", math.inf)]


def suggest_recipe(trial, kinds: list[str], group_sizes: list[int], ranked_layers: list[str]):
    from quant.recipes import Recipe

    kind = trial.suggest_categorical("kind", kinds)
    params: dict = {"kind": kind}
    if kind == "smoothquant":
        params["alpha"] = trial.suggest_categorical("alpha", ALPHAS)
    if kind == "int4_awq":
        params["group_size"] = trial.suggest_categorical("group_size", group_sizes)
    params["kv_cache"] = trial.suggest_categorical("kv_cache", ("none", "int8", "fp8"))
    if kind != "fp16":
        k = trial.suggest_categorical("fp16_fallback", FALLBACK_K)
        params["exclude"] = tuple(ranked_layers[:k])
    return Recipe.from_dict(params)


class Search:
    def __init__(self, args):
        from experiments.evaluate import check_device, settings_from_args
        from quant.apply import calib_spec_from_args
        from quant.backends import resolve_backend
        from quant.model_source import resolve_model
        from quant.recipes import GROUP_SIZES, KINDS

        self.args = args
        self.kinds = [k.strip() for k in args.recipes.split(",") if k.strip()]
        unknown = [k for k in self.kinds if k not in KINDS]
        if unknown or not self.kinds:
            raise UserError(f"--recipes: unknown kind(s) {', '.join(unknown) or '(none given)'} (known: {', '.join(KINDS)})")
        # Trials run on the resolved backend; it (and, for trtllm, the GPU) is part of every evaluation's cache key.
        self.backend = resolve_backend(args.backend, args.device)
        self.settings = settings_from_args(args, self.backend)
        check_device(self.settings.device)
        self.calib = calib_spec_from_args(args)
        from experiments.datasets import load_samples

        load_samples(self.settings.dataset, split=self.settings.split, num_samples=1, seed=self.settings.seed,
                     input_column=self.settings.input_column, reference_column=self.settings.reference_column)
        self.model = resolve_model(args.model)
        cfg = json.loads((self.model.hf_dir / "config.json").read_text())
        self.num_layers = cfg["num_hidden_layers"]
        self.group_sizes = [g for g in GROUP_SIZES if cfg["hidden_size"] % g == 0 and cfg["intermediate_size"] % g == 0]
        if "int4_awq" in self.kinds and not self.group_sizes:
            self.kinds.remove("int4_awq")
        self.ranked_layers: list[str] | None = None
        self.threshold: float | None = args.min_rouge1

    def layers_by_outliers(self) -> list[str]:
        if self.ranked_layers is None:
            from calibration.stats import get_stats

            self.ranked_layers = get_stats(self.model, self.calib).ranked_layers()
        return self.ranked_layers

    def evaluate(self, recipe) -> tuple[dict, bool]:
        from experiments.evaluate import evaluate
        from experiments.store import cached_evaluate, evaluation_key

        key = evaluation_key(self.model.content_hash, recipe, self.calib, self.settings)
        return cached_evaluate(key, lambda: evaluate(self.settings, recipe, calib=self.calib,
                                                     log=lambda m: print(m, file=sys.stderr), backend=self.backend))

    def rouge_for_constraint(self, record: dict) -> float:
        r = record["rouge"]
        if self.args.confidence is None:
            return r["rouge1"]
        from experiments.rouge import bootstrap_ci

        return bootstrap_ci(r["per_sample_rouge1"], confidence=self.args.confidence, seed=self.settings.seed)[0]

    def baseline(self) -> dict:
        from quant.recipes import Recipe

        record, _ = self.evaluate(Recipe("fp16"))
        if self.threshold is None:
            self.threshold = record["rouge"]["rouge1"] - self.args.max_rouge1_drop
        return record

    def objective(self, trial) -> float:
        import optuna

        ranked = self.layers_by_outliers() if any(k != "fp16" for k in self.kinds) else []
        recipe = suggest_recipe(trial, self.kinds, self.group_sizes, ranked)
        trial.set_user_attr("recipe", recipe.to_dict())
        trial.set_user_attr("recipe_hash", recipe.hash)
        trial.set_user_attr("label", recipe.label)
        trial.set_user_attr("backend", self.backend.name)
        trial.set_user_attr("backend_version", self.backend.version)
        t0 = time.perf_counter()
        try:
            recipe.validate_for(json.loads((self.model.hf_dir / "config.json").read_text()), device=self.settings.device)
            record, cached = self.evaluate(recipe)
        except UserError as exc:
            trial.set_user_attr("pruned_reason", str(exc))
            raise optuna.TrialPruned(str(exc)) from None
        health = record.get("health") or {"ok": True}
        if not health["ok"]:
            # A broken model is never a fast success: record why, keep it out of the feasible set.
            reason = "garbage model: " + "; ".join(health["reasons"])
            trial.set_user_attr("pruned_reason", reason)
            trial.set_user_attr("rouge1", record["rouge"]["rouge1"])
            raise optuna.TrialPruned(reason)
        lat, rouge = record["latency"], record["rouge"]
        value = self.rouge_for_constraint(record)
        trial.set_user_attr("constraint", self.threshold - value)
        trial.set_user_attr("rouge1", rouge["rouge1"])
        trial.set_user_attr("rouge1_ci", rouge["rouge1_ci"])
        trial.set_user_attr("rouge1_for_constraint", value)
        trial.set_user_attr("rouge2", rouge["rouge2"])
        trial.set_user_attr("rougeL", rouge["rougeL"])
        trial.set_user_attr("threshold", self.threshold)
        trial.set_user_attr("feasible", value >= self.threshold)
        trial.set_user_attr("tpot_ms", lat["tpot_ms"])
        trial.set_user_attr("ttft_ms", lat["ttft_ms"])
        trial.set_user_attr("tokens_per_s", lat["tokens_per_s"])
        trial.set_user_attr("peak_memory_mb", lat["peak_memory_mb"])
        trial.set_user_attr("emulated", lat["emulated"])
        trial.set_user_attr("perplexity", (record.get("perplexity") or {}).get("perplexity"))
        trial.set_user_attr("checkpoint", record["checkpoint"]["path"])
        trial.set_user_attr("checkpoint_bytes", record["checkpoint"]["size_bytes"])
        trial.set_user_attr("cached", cached)
        trial.set_user_attr("timings_s", record["timings_s"])
        trial.set_user_attr("trial_s", time.perf_counter() - t0)
        print(f"trial {trial.number}: {recipe.label:28s} ROUGE-1 {rouge['rouge1']:6.2f}  "
              f"TPOT {lat['tpot_ms']:7.2f} ms  {'pass' if value >= self.threshold else 'FAIL'}"
              f"{'  (cached)' if cached else ''}", file=sys.stderr)
        return lat["tpot_ms"]


def run(args) -> int:
    import optuna
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    from experiments.report import summarize_study, write_outputs

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    search = Search(args)
    url = storage_url(args)
    study = open_study(url, args.study_name, args.seed)
    print(f"study {args.study_name!r} in {redact(url)}: {len(study.trials)} trial(s) so far", file=sys.stderr)
    try:
        baseline = search.baseline()
        study.set_user_attr("threshold", search.threshold)
        study.set_user_attr("baseline_rouge1", baseline["rouge"]["rouge1"])
        study.set_user_attr("workload", {"batch_size": args.batch_size, "input_len": args.input_len,
                                         "output_len": args.output_len, "device": args.device})
        # What `quant.build --from-study` needs to rebuild the winner without the search's flags.
        study.set_user_attr("model", args.model or "default")
        study.set_user_attr("calibration", dataclasses.asdict(search.calib))
        if "fp16" in search.kinds and not any(t.params.get("kind") == "fp16" for t in study.trials):
            study.enqueue_trial({"kind": "fp16", "kv_cache": "none"}, skip_if_exists=True)
        done = (TrialState.COMPLETE, TrialState.PRUNED)
        remaining = args.n_trials - len(study.get_trials(deepcopy=False, states=done))
        if remaining > 0:
            study.optimize(search.objective, n_trials=remaining, timeout=args.timeout, catch=(),
                           callbacks=[MaxTrialsCallback(args.n_trials, states=done)])
    except KeyboardInterrupt:
        print("interrupted: reporting the trials finished so far", file=sys.stderr)
    summary = summarize_study(study)
    write_outputs(study, summary, args.results_dir)
    print(summary.table())
    print(summary.verdict())
    if summary.best is not None:
        print(f"best recipe written to {args.results_dir / 'best_recipe.yaml'}")
    return 0


@cli_entry
def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
