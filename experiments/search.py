"""``python -m quant.search --min-rouge1 14``: the fastest recipe whose ROUGE-1 stays above a threshold.

An optuna study whose trials are the recipes the search measured. What to measure next is decided by a
deterministic policy over latency classes (quant/space.py), so identical runs measure identical recipes; each
trial measures a recipe in stages (experiments/stages.py): a cheap held-out NLL proxy first, then summaries of
article blocks until the accuracy gate's interval is on one side of the threshold (experiments/stats.py), then
latency with its interval. Candidates that could be the fastest are compared interleaved in one process until
their latency ratios are resolved (experiments/confirm.py); what is still within the resolution is a tie, and
the pick among a tie follows a stated rule.

Resumable and distributed: trials live in the ``--storage`` (SQLite file by default; any optuna URL, e.g.
PostgreSQL for several workers); every measurement stage is cached by what produced it in the shared cache; the
budget ``--n-trials`` counts distinct recipes measured by the study, so re-running the same command continues
where a killed run stopped, and a trial whose worker died is marked FAIL and its recipe planned again.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
import time
from pathlib import Path

from calibration.data import add_calib_args, calib_spec_from_args
from calibration.datasets import load_samples
from experiments.device_use import DeviceUse, announce_device, device_identity, pin_gpu
from experiments.evaluate import Candidate, add_common_args, settings_from_args
from experiments.report import summarize_study, write_outputs
from quant import faults
from quant.atomic import ensure_writable_dir
from quant.backends import resolve_backend
from quant.codehash import code_hash
from quant.errors import (EXIT_NO_PASS, ArgumentParser, EnvironmentProblem, Terminated, UserError, cli_entry,
                          nonneg_int, positive_int, seed_int)
from quant.model_source import resolve_model
from quant.recipes import KINDS, Recipe
from quant.servers import SERVERS, add_serve_with_arg
from quant.space import Fact, Space, confirmation_key, contenders, narrow, next_action
from quant.study_store import (RESULTS_DIR, STUDY_DB, check_same_measurement, claim, is_default_storage,
                               open_search_study, open_storage, quiet_user_error_tracebacks, reap_dead_trials, redact,
                               storage_url, worker_identity)

SEARCH_DEFAULTS = dict(num_samples=100, block_size=8, max_output_len=64, batch_size=4, input_len=32, output_len=16,
                       latency_repeats=3, ppl_docs=4, ppl_seq_len=128, calib_samples=8, calib_seq_len=128,
                       n_trials=5)


def parse_args(argv):
    p = ArgumentParser(prog="python -m quant.search", description=__doc__.splitlines()[0])
    gate = p.add_mutually_exclusive_group(required=True)
    gate.add_argument("--min-rouge1", type=float, help="absolute ROUGE-1 threshold (0-100)")
    gate.add_argument("--max-rouge1-drop", type=float,
                      help="allowed mean drop of ROUGE-1 below the FP16 baseline on the same articles (points)")
    p.add_argument("--confidence", type=float, default=None,
                   help="gate on a one-sided bound at this level instead of the point estimate: the lower bound of "
                        "mean ROUGE-1 (--min-rouge1) or the upper bound of the paired mean drop (--max-rouge1-drop)")
    add_common_args(p, seed_help="orders the policy's first screening of kinds (give each worker of a study its "
                                 "own); the evaluation uses --eval-seed")
    # Separate from --seed since workers were told to differ in --seed: as the evaluation's seed too, it made
    # workers of one study score recipes on different papers and evaluate the same recipe twice.
    p.add_argument("--eval-seed", type=seed_int, default=0,
                   help="article selection, latency prompts and held-out texts of every evaluation (the same for all "
                        "workers of a study: checked)")
    p.add_argument("--block-size", type=positive_int, default=SEARCH_DEFAULTS["block_size"],
                   help="articles in the first block of the sequential gate; later looks double it, up to "
                        "--num-samples (the ceiling)")
    add_calib_args(p)
    p.add_argument("--n-trials", type=positive_int, default=SEARCH_DEFAULTS["n_trials"],
                   help="distinct recipes the study should measure (a rerun continues up to this number)")
    p.add_argument("--timeout", type=float, default=None,
                   help="optional cap in seconds: no new trial starts after it")
    p.add_argument("--resolution", type=float, default=0.03,
                   help="latency comparisons run until every ratio's CI half-width is within this (0.03 = ±3%%)")
    p.add_argument("--confirm-seconds", type=float, default=60.0,
                   help="time cap of one interleaved latency comparison (reported when hit)")
    p.add_argument("--storage", default=None, help="optuna storage URL (default: sqlite in --results-dir); "
                   "put credentials in $QUANT_SEARCH_STORAGE instead of the command line (argv is visible to "
                   "every user of the machine); passwords are never printed")
    p.add_argument("--gpu", type=nonneg_int, default=None, metavar="N",
                   help="run this worker on GPU N of those visible (sets $CUDA_VISIBLE_DEVICES): start one worker "
                        "per GPU on one --storage; workers that share a GPU never time a latency while another "
                        "works on it")
    p.add_argument("--study-name", default="quant-search", help="the optuna study (a rerun continues it)")
    p.add_argument("--recipes", default=",".join(KINDS), help="comma-separated kinds to search")
    add_serve_with_arg(p)
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR,
                   help="report.md, trials.csv, best_recipe.yaml, plots (and study.db without --storage)")
    p.set_defaults(**{k: v for k, v in SEARCH_DEFAULTS.items() if k not in ("n_trials", "block_size")})
    args = p.parse_args(argv)
    if args.min_rouge1 is not None and not 0 <= args.min_rouge1 <= 100:
        raise UserError(f"--min-rouge1 must be in [0, 100], got {args.min_rouge1:g}")
    if args.max_rouge1_drop is not None and not 0 <= args.max_rouge1_drop <= 100:
        raise UserError(f"--max-rouge1-drop must be in [0, 100], got {args.max_rouge1_drop:g}")
    if args.confidence is not None and not 0 < args.confidence < 1:
        raise UserError(f"--confidence must be in (0, 1), got {args.confidence:g}")
    for flag, value in (("--timeout", args.timeout), ("--confirm-seconds", args.confirm_seconds)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise UserError(f"{flag} must be > 0 seconds (a finite number), got {value:g}")
    if not 0 < args.resolution < 1:
        raise UserError(f"--resolution must be in (0, 1), got {args.resolution:g}")
    if args.ppl_docs is not None and args.ppl_docs <= 0:
        raise UserError("--ppl-docs must be > 0 for the search (the held-out NLL is its proxy)")
    return args


GARBAGE_LOGITS = "garbage model: NaN/Inf in the logits (non-finite held-out perplexity)"


class PlannedSampler:
    """Gives each trial the parameters the policy planned (set before ``study.ask()``): no WAITING trials to
    leak from a crash, and the study still shows every parameter as a categorical in optuna-dashboard."""

    def __init__(self) -> None:
        self.planned: dict = {}

    def infer_relative_search_space(self, study, trial):
        return {}

    def sample_relative(self, study, trial, search_space):
        return {}

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self.planned[param_name]


def _sampler():
    import optuna

    # A real BaseSampler subclass (optuna checks), made here so importing this module stays cheap.
    return type("Planned", (PlannedSampler, optuna.samplers.BaseSampler), {})()


class Search:
    def __init__(self, args):
        self.args = args
        self.kinds = [k.strip() for k in args.recipes.split(",") if k.strip()]
        unknown = [k for k in self.kinds if k not in KINDS]
        if unknown or not self.kinds:
            raise UserError(f"--recipes: unknown kind(s) {', '.join(unknown) or '(none given)'} (known: {', '.join(KINDS)})")
        # Trials run on the resolved backend; it (and, for trtllm, the GPU) is part of every evaluation's cache key.
        self.backend = resolve_backend(args.backend, args.device)
        # (settings_from_args resolves --device and refuses one that is not there)
        self.settings = settings_from_args(argparse.Namespace(**{**vars(args), "seed": args.eval_seed}), self.backend)
        if not args.verbose:  # one line per decision; each candidate's progress bars and build notes with -v
            self.settings = dataclasses.replace(self.settings, progress=False)
        if self.backend.name == "trtllm":
            raise UserError("the search's proxy needs logits, which the TensorRT-LLM runner does not expose; "
                            "use --backend torch")
        self.calib = calib_spec_from_args(args)
        s = self.settings
        self.samples = load_samples(s.dataset, split=s.split, num_samples=args.num_samples, seed=s.seed,
                                    input_column=s.input_column, reference_column=s.reference_column)
        if len(self.samples) < args.num_samples:
            print(f"--num-samples {args.num_samples}: the {s.split} split has {len(self.samples)} articles; the gate's "
                  f"ceiling is {len(self.samples)}", file=sys.stderr)
        from experiments.stages import block_bounds

        self.bounds = block_bounds(min(args.block_size, len(self.samples)), len(self.samples))
        from experiments.stats import Gate

        if args.min_rouge1 is not None:
            self.gate = Gate("absolute", args.min_rouge1, args.confidence, tuple(self.bounds))
        else:
            self.gate = Gate("drop", args.max_rouge1_drop, args.confidence, tuple(self.bounds))
        self.model = None  # load_model(): after the storage is known to open (cheap checks first)
        self.device = None  # load_model(): this worker's DeviceUse
        self.log = lambda m: print(m, file=sys.stderr)

    def load_model(self) -> None:
        from experiments.stages import Measurer

        self.backend.announce()  # here, not when resolved: after the flags and the storage were checked
        args = self.args
        self.model = resolve_model(args.model, trust_remote_code=args.trust_remote_code)
        self.config = json.loads((self.model.hf_dir / "config.json").read_text())
        cfg = self.config
        self.kinds, group_sizes, kv_caches, dropped = narrow(self.kinds, cfg, SERVERS[args.serve_with])
        for why in dropped:  # what the model's shapes or the server rule out, said once
            print(f"not searched: {why}", file=sys.stderr)
        if not self.kinds:
            raise UserError(f"--recipes {args.recipes}: no kind left to search on this model for "
                            f"--serve-with {args.serve_with}")
        self.device = DeviceUse(device_identity(self.settings.device))
        announce_device(self.device, self.settings.device)
        ranked = ()
        if any(k != "fp16" for k in self.kinds):
            from calibration.stats import get_stats

            with self.device.shared():
                ranked = tuple(get_stats(self.model, self.calib).ranked_layers())
        self.space = Space(tuple(self.kinds), group_sizes, ranked, self.settings.device, kv_caches)
        self.measurer = Measurer(self.settings, self.model, self.calib, self.backend, samples=self.samples,
                                 bounds=self.bounds, proxy_docs=self.settings.ppl_docs,
                                 proxy_seq_len=self.settings.ppl_seq_len,
                                 log=self.log if args.verbose else lambda m: None, device=self.device)

    def prepare_baseline(self) -> None:
        """The FP16 baseline's proxy and first article block, which every trial is paired with: measured (or read)
        by every worker before its first trial, under the cache's lock. A drop gate measured against a broken FP16
        model would make garbage the yardstick: refused."""
        ppl = self.measurer.proxy(Recipe("fp16"))[0]["perplexity"]["perplexity"]
        if self.gate.kind == "drop" and not math.isfinite(ppl):
            raise UserError(f"--max-rouge1-drop: the FP16 baseline of {self.args.model or 'default'} is a "
                            "garbage model (NaN/Inf in the logits); give an absolute --min-rouge1 instead")
        if math.isfinite(ppl):
            self.measurer.block(Recipe("fp16"), 0)
        self.measurer.release()

    def measure(self, trial, params: dict, facts) -> float:
        """Measure one recipe; the trial's value is its mean time per output token.

        Stages, cheapest verdict first: latency (with its interval); if, timed interleaved with a recipe that
        already passed the gate, it is shown slower, it can never be the answer and its accuracy is not measured
        ("slower"); else the held-out NLL proxy; if that is certainly worse than a recipe that failed the gate, generation is skipped
        ("fail by proxy"); else article blocks under the sequential gate."""
        import optuna

        from experiments.stats import mean_ci

        recipe = self.space.recipe(params)
        result: dict = {"recipe": recipe.to_dict(), "label": recipe.label, "hash": recipe.hash,
                        "emulated_parts": self.space.emulated(params)}
        trial.set_user_attr("recipe", recipe.to_dict())
        trial.set_user_attr("recipe_hash", recipe.hash)
        trial.set_user_attr("label", recipe.label)
        t0 = time.perf_counter()
        cached = []

        def prune(reason: str):
            result["pruned_reason"] = reason
            trial.set_user_attr("result", result)
            trial.set_user_attr("pruned_reason", reason)
            raise optuna.TrialPruned(reason)

        try:
            recipe.validate_for(self.config, device=self.settings.device)
            lat, c = self.measurer.latency(recipe)
            cached.append(c)
            latency = lat["latency"]
            m, lo, hi = mean_ci(latency["tpot_runs_ms"])
            result["checkpoint"] = lat["checkpoint"]
            result["latency"] = {**{k: latency[k] for k in ("tpot_ms", "ttft_ms", "tokens_per_s", "peak_memory_mb",
                                                             "weight_bytes", "load")},
                                 "tpot_mean_ms": m, "tpot_ci": [lo, hi], "runs": len(latency["tpot_runs_ms"])}
            result["emulated"] = bool(lat["runtime"]["emulated"])
            result["kernels"] = lat["runtime"]["kernels"]
            slower = self._slower_than_passing(recipe, result, facts)
            if slower is not None:
                result["gate"] = {"status": "slower", "slower_than": slower["number"], "n": 0,
                                  "interleaved": slower["interleaved"]}
                result["feasible"] = False
            else:
                self._accuracy(recipe, result, facts, cached)
        except EnvironmentProblem:
            raise  # a full disk or a damaged cache is not the recipe's fault: stop (exit 2), retry on the next run
        except UserError as exc:
            prune(str(exc))
        if result.get("pruned_reason"):
            prune(result["pruned_reason"])
        result["cached"] = all(cached)
        result["trial_s"] = time.perf_counter() - t0
        feasible = result["feasible"]
        trial.set_user_attr("result", result)
        trial.set_user_attr("constraint", 0.0 if feasible else 1.0)
        trial.set_user_attr("device", {**self.device.identity, "other_workers": self.device.others()})
        g = result["gate"]
        iv = g.get("interleaved")
        ratio = f": ×{iv['ratio']:.3f} [{iv['ci'][0]:.3f}, {iv['ci'][1]:.3f}] interleaved" if iv else ""
        note = {"slower": f"slower than #{g.get('slower_than')}{ratio} (accuracy not measured)",
                "fail": "FAIL" + (f" (proxy: worse than #{g['skipped_by_proxy']})"
                                  if g.get("skipped_by_proxy") is not None else ""), "pass": "pass"}[g["status"]]
        flag = "  (emulated: not pickable)" if result["emulated"] else ""
        flag += "  (machine loaded while timed)" if latency["load"]["loaded"] else ""
        acc = (f"ROUGE-1 {result['rouge1']:6.2f}  drop {result['drop']:+6.2f}" if "rouge1" in result
               else f"{'':14s}  {'':11s}")
        proxy = f"proxy {result['proxy']['nll_gap']:+.4f}" if "proxy" in result else f"{'':13s}"
        self.summary_line = (f"trial {trial.number}: {recipe.label:28s} n={g['n']:<3d} {acc}  {proxy}  "
                             f"TPOT {m:7.2f} ms [{lo:.2f}, {hi:.2f}]  {note}"
                             f"{'  (cached)' if result['cached'] else ''}{flag}")
        faults.point("trial.commit")  # crash test: measured, attributes stored, not yet COMPLETE
        return m

    def _slower_than_passing(self, recipe, result: dict, facts) -> dict | None:
        """A recipe that passed the gate and this one is shown slower than, interleaved: this recipe can never be
        the answer, so its accuracy is not measured. Returns {number, interleaved: that comparison's ratio}.

        The trials' own intervals only nominate the passing recipe to compare with (the fastest whose interval lies
        wholly below this one's): they were timed minutes apart, and drift between trials exceeds their widths (on
        the 2-core box two INT4 recipes with the same kernels measured 4.5 % apart, the order flipping between
        runs). Only the two timed in alternation (experiments/confirm.py), with this one outside the tie, decide."""
        lat = result["latency"]
        if result["emulated"] or lat["load"]["loaded"]:
            return None
        below = [f for f in facts if f.status == "pass" and not f.emulated and f.tpot_ci and not f.loaded
                 and f.tpot_ci[1] < lat["tpot_ci"][0]]
        if not below:
            return None
        other = min(below, key=lambda f: (f.tpot_ci[1], f.number))
        rec = self._interleaved({recipe.hash: recipe, other.hash: self.space.recipe(other.params)})
        if recipe.hash in rec["tie"]:
            return None
        q = rec["ratios"][recipe.hash]
        return {"number": other.number, "interleaved": {"ratio": q["ratio"], "ci": [q["low"], q["high"]],
                                                         "rounds": rec["rounds"]}}

    def _accuracy(self, recipe, result: dict, facts, cached: list) -> None:

        proxy, c = self.measurer.proxy(recipe)
        cached.append(c)
        ppl = proxy["perplexity"]
        result["perplexity"] = ppl["perplexity"]
        if not math.isfinite(ppl["perplexity"]):
            result["pruned_reason"] = GARBAGE_LOGITS
            return
        base_proxy = self.measurer.proxy(Recipe("fp16"))[0]["perplexity"]["doc_nll"]
        gaps = [a - b for a, b in zip(ppl["doc_nll"], base_proxy)]
        result["proxy"] = {"nll_gap": sum(gaps) / len(gaps), "docs": len(gaps), "doc_nll": ppl["doc_nll"]}
        worse_than = self._certainly_worse(ppl["doc_nll"], facts)
        if worse_than is not None:
            result["gate"] = {"status": "fail", "skipped_by_proxy": worse_than, "n": 0}
            result["feasible"] = False
        else:
            try:
                self._gate(recipe, result, cached)
            except UserError as exc:
                if str(exc).startswith("garbage model"):
                    result["pruned_reason"] = str(exc)
                    return
                raise

    def _certainly_worse(self, doc_nll: list[float], facts) -> int | None:
        """The trial number of a recipe that failed the gate and whose held-out NLL this one's exceeds with 95 %
        confidence (paired by document): generation is skipped, the recipe fails by proxy."""
        from experiments.stats import one_sided_bound

        for f in facts:
            if f.status == "fail" and f.doc_nll:
                diffs = [a - b for a, b in zip(doc_nll, f.doc_nll)]
                if len(diffs) >= 2 and one_sided_bound(diffs, 0.95, upper=False) > 0:
                    return f.number
        return None

    def _gate(self, recipe, result: dict, cached: list) -> None:
        """Score article blocks until the gate decides; record ROUGE-1 and the paired drop, each with its CI."""
        from experiments.stats import mean_ci

        scores, ids = [], []
        for i in range(len(self.bounds)):
            rec, c = self.measurer.block(recipe, i)
            cached.append(c)
            if not rec["health"]["ok"]:
                raise UserError("garbage model: " + "; ".join(rec["health"]["reasons"]))
            scores += rec["rouge"]["per_sample_rouge1"]
            ids += [x["id"] for x in rec["samples"]]
            drops = self._drops(scores, ids)
            verdict = self.gate.decide(drops if self.gate.kind == "drop" else scores, final=i == len(self.bounds) - 1)
            if verdict.status != "continue":
                break
        r, rlo, rhi = mean_ci(scores)
        d, dlo, dhi = mean_ci(drops)
        result.update(rouge1=r, rouge1_ci=[rlo, rhi], drop=d, drop_ci=[dlo, dhi], n=len(scores),
                      gate={"status": verdict.status, "n": verdict.n, "mean": verdict.mean, "bound": verdict.bound,
                            "looks": i + 1}, feasible=verdict.passed)

    def _drops(self, scores: list[float], ids: list[str]) -> list[float]:
        """FP16 baseline minus ``scores``, article by article (the baseline's blocks scored as needed, cached)."""

        base, base_ids = [], []
        for i in range(len(self.bounds)):
            if len(base) >= len(scores):
                break
            rec = self.measurer.block(Recipe("fp16"), i)[0]
            base += rec["rouge"]["per_sample_rouge1"]
            base_ids += [x["id"] for x in rec["samples"]]
        assert base_ids[:len(ids)] == ids, "baseline and candidate scored on different articles"
        return [b - s for b, s in zip(base, scores)]

    # -- the policy's inputs, read back from the study ---------------------------------------------------------
    def facts(self, study):
        from optuna.trial import TrialState

        out = []
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
            r = t.user_attrs.get("result")
            if not r or t.user_attrs.get("repeat_of") is not None or not self.space.contains(t.params):
                continue
            lat = r.get("latency") or {}
            status = "pruned" if t.state == TrialState.PRUNED else r["gate"]["status"]
            proxy = r.get("proxy") or {}
            out.append(Fact(params=dict(t.params), hash=r["hash"], status=status, emulated=bool(r.get("emulated")),
                            tpot_ci=tuple(lat["tpot_ci"]) if lat.get("tpot_ci") else None,
                            proxy=proxy.get("nll_gap"), number=t.number, doc_nll=tuple(proxy.get("doc_nll") or ()),
                            loaded=bool((lat.get("load") or {}).get("loaded"))))
        return out

    def confirm(self, study, hashes) -> dict:
        """Compare ``hashes`` interleaved, record the comparison in the study, return it."""
        by_hash = {t.user_attrs.get("recipe_hash"): t for t in study.get_trials(deepcopy=False)
                   if t.user_attrs.get("result") and t.user_attrs.get("repeat_of") is None}
        labels = {h: by_hash[h].user_attrs["label"] for h in hashes}
        # One line, finished when the comparison is (its table follows in the summary): a default search prints
        # at most 30 lines.
        print(f"comparing latency interleaved: {', '.join(labels[h] for h in sorted(hashes))} …", end="",
              file=sys.stderr, flush=True)
        rec = self._interleaved({h: self.space.recipe(by_hash[h].params) for h in hashes})
        rec["key"] = confirmation_key(hashes)
        rec["labels"] = labels
        rec["code"] = _comparison_code()
        confirmations = list(study.user_attrs.get("confirmations", []))
        confirmations.append(rec)
        study.set_user_attr("confirmations", confirmations)
        ties = ", ".join(labels[h] for h in rec["tie"])
        print(f" {rec['rounds']} rounds in {rec['seconds']:.0f} s{' (time cap hit)' if rec['capped'] else ''}: "
              f"leader {labels[rec['leader']]}; tie set: {ties}", file=sys.stderr)
        return rec

    def _interleaved(self, recipes: dict) -> dict:
        """hash → Recipe, timed in alternation in this process (experiments/confirm.py): the comparison record."""
        from experiments.confirm import compare

        self.measurer.release()
        with self.device.shared():
            cands = {h: Candidate(self.settings, r, model=self.model, calib=self.calib, log=lambda m: None,
                                  backend=self.backend) for h, r in recipes.items()}
        s = self.settings
        try:
            with self.device.exclusive():
                return compare({h: c.runtime for h, c in cands.items()}, batch_size=s.batch_size,
                               input_len=s.input_len, output_len=s.output_len, seed=s.seed,
                               resolution=self.args.resolution, max_seconds=self.args.confirm_seconds)
        finally:
            for c in cands.values():
                c.close()

    # -- the answer ---------------------------------------------------------------------------------------------
    def answer(self, study) -> dict | None:
        """The chosen recipe: the single contender, or the stated rule over the final comparison's tie set."""
        from experiments.confirm import PICK_RULE, pick

        facts = self.facts(study)
        group = contenders(facts)
        if not group:
            return None
        results = {t.user_attrs["result"]["hash"]: t.user_attrs["result"] for t in study.get_trials(deepcopy=False)
                   if t.user_attrs.get("result") and t.user_attrs.get("repeat_of") is None and
                   t.state.name == "COMPLETE"}
        confirmation = None
        if len(group) == 1:
            tie = [group[0].hash]
        else:
            key = confirmation_key(f.hash for f in group)
            confirmation = next((c for c in current_confirmations(study) if c["key"] == key), None)
            if confirmation is None:
                confirmation = self.confirm(study, [f.hash for f in group])
            tie = confirmation["tie"]
        facts_for_pick = {h: {"weight_bytes": results[h]["latency"]["weight_bytes"],
                              "kv_cache": results[h]["recipe"]["kv_cache"], "rouge1": results[h]["rouge1"],
                              "label": results[h]["label"]} for h in tie}
        chosen = pick(tie, facts_for_pick)
        ans = {"chosen": chosen, "label": results[chosen]["label"], "tie": tie,
               "tie_labels": [results[h]["label"] for h in tie], "rule": PICK_RULE, "serve_with": self.args.serve_with,
               "confirmation": confirmation["key"] if confirmation else None}
        study.set_user_attr("answer", ans)
        return ans


@functools.lru_cache(maxsize=1)
def _comparison_code() -> str:
    return code_hash("experiments.confirm")


def current_confirmations(study) -> list[dict]:
    """The study's interleaved comparisons made by this code's rule: one made by an older rule (another tie level,
    say) is never read as this one's verdict; its candidates are compared again."""
    return [c for c in study.user_attrs.get("confirmations", []) if c.get("code") == _comparison_code()]


def measurement_fingerprint(search: Search) -> dict:
    """What makes two trials' numbers comparable: evaluation settings, model, calibration, gate."""
    a = search.args
    settings = {k: v for k, v in dataclasses.asdict(search.settings).items()
                if k not in ("progress", "model", "trust_remote_code")}
    return {"settings": settings, "model_hash": search.model.content_hash, "calibration": search.calib.key,
            "gate": search.gate.to_dict(),
            "policy": {"resolution": a.resolution}}


def _running_elsewhere(study, me: int | None) -> frozenset[str]:
    from optuna.trial import TrialState

    return frozenset(t.user_attrs.get("recipe_hash") for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                     if t.number != me and t.user_attrs.get("recipe_hash"))


def _distinct_measured(study) -> int:
    from optuna.trial import TrialState

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    return len({t.user_attrs.get("recipe_hash") for t in done if t.user_attrs.get("repeat_of") is None})


def search_loop(search: Search, study, sampler) -> str:
    """Trials until the budget is spent, the policy converges, or --timeout; returns why it stopped."""
    import optuna

    args, t0 = search.args, time.monotonic()
    choices = search.space.choices()
    while True:
        if _distinct_measured(study) >= args.n_trials:
            return f"budget of {args.n_trials} distinct recipes measured"
        if args.timeout is not None and time.monotonic() - t0 >= args.timeout:
            return f"--timeout {args.timeout:g} s reached"
        taken = _running_elsewhere(study, None)
        action = next_action(search.space, search.facts(study), current_confirmations(study),
                             seed=args.seed, taken=taken)
        if action.what == "confirm":
            search.confirm(study, action.candidates)
            continue
        if action.what == "done":
            if taken:  # other workers' results may still open a new wave
                time.sleep(2.0)
                continue
            return action.reason
        sampler.planned = action.params
        recipe = search.space.recipe(action.params)

        def objective(trial):
            # Who runs it: if this process dies, the next start on this machine can tell (reap_dead_trials).
            trial.set_user_attr("worker", worker_identity())
            for name in action.params:
                trial.suggest_categorical(name, choices[name])
            twin = claim(study, trial, recipe.hash)
            if twin is not None:  # not counted: the earlier trial measures this recipe
                raise optuna.TrialPruned(f"repeat of trial {twin}")
            try:
                value = search.measure(trial, action.params, search.facts(study))
            except optuna.TrialPruned as exc:
                search.log(f"trial {trial.number}: {recipe.label:28s} pruned: {exc}")
                raise
            search.log(search.summary_line)
            return value

        # One trial through study.optimize: optuna's heartbeat runs while it measures (a worker that dies on another
        # host is failed by fail_stale_trials), and an exception marks it FAIL before propagating.
        study.optimize(objective, n_trials=1, catch=())
        search.measurer.release()
        faults.point("trial.committed")


def run(args) -> int:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    quiet_user_error_tracebacks()
    # Before any model work: a results folder that cannot be written fails now, not after the whole search.
    ensure_writable_dir(args.results_dir, "--results-dir")
    pin_gpu(args.gpu, args.device)  # before anything asks CUDA which GPUs there are
    search = Search(args)
    url = storage_url(args, create_dir=False)
    # A storage URL given by the user, or an existing default database, is opened before the model work (a typo
    # or a damaged file fails before a model conversion); a new default SQLite file is only created once the
    # model is known to load.
    default_db = args.results_dir / STUDY_DB
    early = not is_default_storage(args) or (default_db.is_file() and default_db.stat().st_size > 0)
    storage = open_storage(url) if early else None
    try:
        search.load_model()
        return _run_study(args, search, url, storage)
    finally:
        if search.device is not None:  # its registration file goes (a killed worker's: the next worker's start)
            search.device.close()


def _run_study(args, search: Search, url: str, storage) -> int:
    if storage is None:
        storage_url(args)  # creates --results-dir for the default database
    sampler = _sampler()
    study, _created = open_search_study(url, args.study_name, sampler=sampler, storage=storage)
    check_same_measurement(study, measurement_fingerprint(search))
    reaped = reap_dead_trials(study)
    if reaped:
        print(f"trial(s) {', '.join(map(str, reaped))}: their worker died; marked FAIL (not counted)", file=sys.stderr)
    print(f"study {args.study_name!r} in {redact(url)}: {len(study.trials)} trial(s) so far; space of "
          f"{search.space.size()} recipes; gate {search.gate.kind} {search.gate.threshold:g}"
          f"{f' at {search.gate.confidence:g} confidence' if search.gate.confidence else ''} on up to "
          f"{len(search.samples)} articles (looks at {', '.join(map(str, search.bounds))})", file=sys.stderr)
    stop = None
    try:
        study.set_user_attr("gate", search.gate.to_dict())
        study.set_user_attr("workload", {"batch_size": args.batch_size, "input_len": args.input_len,
                                         "output_len": args.output_len, "device": search.settings.device,
                                         "compute_dtype": search.settings.compute_dtype})
        # What `quant.build --from-study` needs to rebuild the winner without the search's flags.
        study.set_user_attr("model", args.model or "default")
        study.set_user_attr("calibration", dataclasses.asdict(search.calib))
        excluded = [p for p in search.space.enumerate() if search.space.emulated(p)]
        study.set_user_attr("space", {"size": search.space.size(), "emulated_here": len(excluded)})
        search.prepare_baseline()
        stop = search_loop(search, study, sampler)
        study.set_user_attr("stopped", stop)
        search.answer(study)
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM (quant/errors.Terminated): report what finished, re-raise
        why = "SIGTERM" if isinstance(exc, Terminated) else "Ctrl-C"
        print(f"interrupted ({why}): reporting the trials finished so far; the same command resumes", file=sys.stderr)
        study.set_user_attr("stopped", f"interrupted ({why})")
        stop = exc
    summary = summarize_study(study)
    write_outputs(study, summary, args.results_dir)
    print(summary.table())
    print(summary.verdict())
    if summary.best is not None:
        print(f"best recipe written to {args.results_dir / 'best_recipe.yaml'}")
    if isinstance(stop, KeyboardInterrupt):
        raise stop  # cli_entry: exit 130 (Ctrl-C) or 143 (SIGTERM)
    return 0 if summary.best is not None else EXIT_NO_PASS


@cli_entry
def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))

