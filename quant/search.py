"""``python -m quant.search --min-rouge1 14``: the fastest recipe whose ROUGE-1 stays above a threshold.

An optuna study over the recipe space (kind, SmoothQuant alpha, AWQ group size, KV-cache dtype, FP16 fallback
of the layers with the strongest activation outliers). Each trial builds its TRT-LLM checkpoint, runs it,
and reports measured latency (time per output token at the stated workload) as the objective; ROUGE-1 enters
through optuna's ``constraints_func`` so the sampler learns from infeasible trials instead of discarding them.

Resumable and distributed by construction: trials live in the ``--storage`` (SQLite file by default; any
optuna URL, e.g. PostgreSQL for several workers), evaluations are cached by recipe hash in the shared cache,
and the budget ``--n-trials`` counts finished trials of the study, so re-running the same command continues
where a killed run stopped.

Deterministic across crashes: the sampler's randomness for a trial depends only on (``--seed``, number of
trials finished before it), not on how many processes it took to get there, and a trial whose worker died on
this machine is marked FAIL at the next start (its enqueued parameters, e.g. the FP16 baseline, enqueued
again). So a search killed at any point and re-run with the same command ends with the same finished trials
as one that was never interrupted (docs/reliability.md).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

from quant import faults
from quant.errors import ArgumentParser, EnvironmentProblem, UserError, cli_entry, positive_int

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
    add_common_args(p, seed_help="seeds the sampler (give each worker of a study its own); the evaluation uses "
                                 "--eval-seed")
    # Separate from --seed since workers were told to differ in --seed: as the evaluation's seed too, it made
    # workers of one study score recipes on different papers and evaluate the same recipe twice.
    p.add_argument("--eval-seed", type=int, default=0,
                   help="sample selection, latency prompts and bootstrap CI of every evaluation (the same for all "
                        "workers of a study: checked)")
    add_calib_args(p)
    p.add_argument("--n-trials", type=positive_int, default=SEARCH_DEFAULTS["n_trials"],
                   help="finished trials the study should hold (a rerun continues up to this number)")
    p.add_argument("--timeout", type=float, default=SEARCH_DEFAULTS["timeout"], help="seconds; no new trial starts after it")
    p.add_argument("--storage", default=None, help="optuna storage URL (default: sqlite in --results-dir); "
                   "put credentials in $QUANT_SEARCH_STORAGE instead of the command line (argv is visible to "
                   "every user of the machine); passwords are never printed")
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


def _is_default_storage(args) -> bool:
    return not (args.storage or os.environ.get("QUANT_SEARCH_STORAGE"))


def storage_url(args, *, create_dir: bool = True) -> str:
    url = args.storage or os.environ.get("QUANT_SEARCH_STORAGE")
    if url:
        return url
    if create_dir:
        args.results_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(args.results_dir / 'study.db').resolve()}"


def _retry_enqueued(study, trial) -> None:
    """optuna's heartbeat found ``trial`` dead (another host, or no owner record): run its fixed params again."""
    fixed = trial.system_attrs.get("fixed_params")
    if fixed:
        study.enqueue_trial(fixed)


def _open_storage(url: str, *, create: bool = True):
    import optuna

    db = url[len("sqlite:///"):] if url.startswith("sqlite:///") else None
    if not create and db and not db.startswith(":memory:") and (not Path(db).is_file() or Path(db).stat().st_size == 0):
        # Reading a study (plot, build --from-study) never writes optuna's schema into a missing or empty file.
        raise UserError(f"no study database at {db} (missing or empty)")
    storage = None
    for attempt in range(8):
        try:
            with _schema_lock(url), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # optuna's experimental/deprecation notes on every start
                storage = optuna.storages.RDBStorage(
                    url, heartbeat_interval=20, grace_period=60, heartbeat_stale_trial_callback=_retry_enqueued,
                    engine_kwargs=_engine_kwargs(url),
                )
            if url.startswith("sqlite"):
                _sqlite_immediate(storage.engine)
            break
        except Exception as exc:  # sqlalchemy raises many types for bad URLs / unreachable servers
            # Workers starting together on an empty database race to create optuna's schema: the loser sees a
            # unique violation (PostgreSQL) or "table ... already exists" (SQLite, found by four workers in
            # tests/test_concurrency.py) and simply retries once the winner committed.
            racing = "IntegrityError" in type(exc).__name__ or "already exists" in str(exc) \
                or "database is locked" in str(exc)
            if racing and attempt < 7:
                time.sleep(0.3 + 0.5 * attempt)
                continue
            detail = redact(str(exc).splitlines()[0][:200]) if str(exc) else ""
            raise UserError(f"cannot open storage {redact(url)}: {type(exc).__name__}: {detail}") from None
    return storage


@contextlib.contextmanager
def _schema_lock(url: str):
    """SQLite (one host): serialize optuna's schema creation behind a lock file next to a new database (an
    existing one is only opened: nothing is written beside it)."""
    import fcntl

    db = url[len("sqlite:///"):] if url.startswith("sqlite:///") else None
    fresh = db and not db.startswith(":memory:") and Path(db).parent.is_dir() and \
        (not Path(db).exists() or Path(db).stat().st_size == 0)
    if not fresh:
        yield
        return
    try:
        fh = open(f"{db}.lock", "a")
    except OSError:  # a read-only folder: no lock; the retry above still covers the race
        yield
        return
    with fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _sqlite_immediate(engine) -> None:
    """Every SQLite transaction starts with BEGIN IMMEDIATE (SQLAlchemy's documented pysqlite recipe).

    pysqlite opens a transaction only at the first write, so optuna's read-check-write steps -- above all
    "take this WAITING trial: is it still WAITING? then RUNNING", whose SELECT ... FOR UPDATE SQLite ignores --
    ran their check without any lock: two of four workers took the same enqueued trial and one died with
    "Cannot tell a COMPLETE trial" (tests/test_concurrency.py). Taking the write lock at BEGIN makes each
    storage call atomic; a worker waits for it up to the busy timeout.
    """
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection, _record):
        dbapi_connection.isolation_level = None  # no implicit BEGIN from pysqlite: SQLAlchemy's below instead

    @event.listens_for(engine, "begin")
    def _begin(conn):
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections opened before the listeners (schema check) are not reused


def _engine_kwargs(url: str) -> dict:
    if not url.startswith("sqlite"):
        return {"pool_pre_ping": True}
    # Several workers on one SQLite file (tests/test_concurrency.py runs four): a writer waits up to this long for
    # the file lock (sqlite3's busy timeout) instead of failing at once with "database is locked". pysqlite
    # starts a transaction only at the first write, so readers never hold a lock a writer deadlocks on.
    return {"connect_args": {"timeout": 120}}


def trial_seed(seed: int, finished: int) -> int:
    return int.from_bytes(hashlib.sha256(f"quant-search|{seed}|{finished}".encode()).digest()[:4], "little")


class CrashDeterministicSampler:
    """optuna's TPE (constraints, multivariate, group), re-seeded for each trial from (seed, trials finished).

    A plain ``TPESampler(seed=s)`` draws from one random stream per process: a run killed after k trials and
    started again draws trial k+1 from the start of the stream -- the parameters of an earlier trial -- so the
    resumed study differs from an uninterrupted one. Here trial k's draws depend only on the seed, k and the
    finished trials (what TPE learns from), which a resumed run reproduces exactly.
    """

    def __init__(self, seed: int, **tpe_kwargs):
        self._seed = seed
        self._kwargs = tpe_kwargs
        self._tpe = self._make(seed)

    def _make(self, seed: int):
        from optuna.samplers import TPESampler

        with warnings.catch_warnings():  # experimental/deprecation notes, once per trial otherwise
            warnings.simplefilter("ignore")
            return TPESampler(seed=seed, **self._kwargs)

    def before_trial(self, study, trial) -> None:
        from optuna.trial import TrialState

        finished = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))
        self._tpe = self._make(trial_seed(self._seed, finished))
        self._tpe.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self._tpe.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._tpe.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._tpe.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values) -> None:
        self._tpe.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._tpe.reseed_rng()


def _sampler(seed: int):
    import optuna

    # A real BaseSampler subclass (optuna checks), made here so importing this module stays cheap.
    cls = type("CrashDeterministicTPE", (CrashDeterministicSampler, optuna.samplers.BaseSampler), {})
    return cls(seed, constraints_func=constraints, n_startup_trials=4, multivariate=True, group=True)


def open_study(url: str, name: str, seed: int, *, create: bool = True):
    return open_search_study(url, name, seed, create=create)[0]


def open_search_study(url: str, name: str, seed: int, *, create: bool = True, storage=None):
    """(study, created_now). Exactly one of several workers starting together sees ``created_now``."""
    import optuna

    storage = storage if storage is not None else _open_storage(url, create=create)
    sampler = _sampler(seed)
    if not create:
        try:
            return optuna.load_study(study_name=name, storage=storage, sampler=sampler), False
        except KeyError:
            raise UserError(f"no study named {name!r} in {redact(url)}") from None
    try:
        # The database's unique study name decides who created it (DuplicatedStudyError for everyone else).
        return optuna.create_study(study_name=name, storage=storage, sampler=sampler, direction="minimize"), True
    except optuna.exceptions.DuplicatedStudyError:
        return optuna.load_study(study_name=name, storage=storage, sampler=sampler), False


def redact(url: str) -> str:
    """Never print a password that came with a storage URL: ``user:***@host``, ``password=***``.

    The password ends at the *last* '@' of the authority (it may itself hold '@' or ':').
    """
    import re

    url = re.sub(r"(?i)(\b(?:password|passwd|pwd)\s*=\s*)[^\s&;#'\"]*", r"\1***", url)
    return re.sub(r"^([A-Za-z][\w+.-]*://)([^/?#]*)@",
                  lambda m: m.group(1) + m.group(2).split(":", 1)[0] + (":***" if ":" in m.group(2) else "") + "@",
                  url)


# -- who runs a trial: a trial whose worker died on this machine can be told from one still running ---------
def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (None: no such process, or a zombie)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


@functools.lru_cache(maxsize=1)
def worker_identity() -> dict:
    ident: dict = {"pid": os.getpid()}
    for key, read in (("boot_id", lambda: Path("/proc/sys/kernel/random/boot_id").read_text().strip()),
                      ("pidns", lambda: os.readlink("/proc/self/ns/pid")), ("start", lambda: _proc_start(os.getpid()))):
        try:
            ident[key] = read()
        except OSError:
            pass
    return ident


def _died_here(owner, me: dict) -> bool:
    """True only when ``owner`` ran on this machine, in this PID namespace, and that process is gone."""
    if not isinstance(owner, dict) or not me.get("boot_id") or not me.get("pidns") or not me.get("start"):
        return False
    if owner.get("boot_id") != me["boot_id"] or owner.get("pidns") != me["pidns"]:
        return False  # another host or container: optuna's heartbeat (grace period) decides
    if not isinstance(owner.get("pid"), int) or not owner.get("start"):
        return False
    return _proc_start(owner["pid"]) != owner["start"]  # gone, a zombie, or the pid reused by a newer process


def reap_dead_trials(study) -> list[int]:
    """Mark FAIL the RUNNING trials whose worker died on this machine (SIGKILL, OOM, power loss of a worker);
    enqueue their fixed parameters again (the FP16 baseline). Returns the trial numbers reaped."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    me = worker_identity()
    reaped = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not _died_here(t.user_attrs.get("worker"), me):
            continue
        try:
            study._storage.set_trial_user_attr(t._trial_id, "failed_reason", "its worker process died; not counted")
            if not study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                continue
        except UpdateFinishedTrialError:
            continue  # another worker reaped it first
        reaped.append(t.number)
        _retry_enqueued(study, t)
    return reaped


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
        from experiments.evaluate import settings_from_args
        from quant.apply import calib_spec_from_args
        from quant.backends import resolve_backend
        from quant.recipes import KINDS

        self.args = args
        self.kinds = [k.strip() for k in args.recipes.split(",") if k.strip()]
        unknown = [k for k in self.kinds if k not in KINDS]
        if unknown or not self.kinds:
            raise UserError(f"--recipes: unknown kind(s) {', '.join(unknown) or '(none given)'} (known: {', '.join(KINDS)})")
        # Trials run on the resolved backend; it (and, for trtllm, the GPU) is part of every evaluation's cache key.
        self.backend = resolve_backend(args.backend, args.device)
        # (settings_from_args resolves --device and refuses one that is not there)
        self.settings = settings_from_args(argparse.Namespace(**{**vars(args), "seed": args.eval_seed}), self.backend)
        self.calib = calib_spec_from_args(args)
        from experiments.datasets import load_samples

        load_samples(self.settings.dataset, split=self.settings.split, num_samples=1, seed=self.settings.seed,
                     input_column=self.settings.input_column, reference_column=self.settings.reference_column)
        self.model = None  # load_model(): after the storage is known to open (cheap checks first)
        self.ranked_layers: list[str] | None = None
        self.threshold: float | None = args.min_rouge1

    def load_model(self) -> None:
        from quant.model_source import resolve_model
        from quant.recipes import GROUP_SIZES

        args = self.args
        self.model = resolve_model(args.model, trust_remote_code=args.trust_remote_code)
        cfg = json.loads((self.model.hf_dir / "config.json").read_text())
        self.num_layers = cfg["num_hidden_layers"]
        self.group_sizes = [g for g in GROUP_SIZES if cfg["hidden_size"] % g == 0 and cfg["intermediate_size"] % g == 0]
        if "int4_awq" in self.kinds and not self.group_sizes:
            self.kinds.remove("int4_awq")

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
        health = record.get("health") or {"ok": True}
        if self.threshold is None and not health["ok"]:
            # A threshold "1 point below a NaN model" would make garbage the yardstick.
            raise UserError(f"--max-rouge1-drop: the FP16 baseline of {self.args.model or 'default'} is a garbage "
                            f"model ({'; '.join(health['reasons'])}); give an absolute --min-rouge1 instead")
        if self.threshold is None:
            self.threshold = record["rouge"]["rouge1"] - self.args.max_rouge1_drop
        return record

    def objective(self, trial) -> float:
        import optuna

        # Who runs it: if this process dies, the next start on this machine can tell (reap_dead_trials).
        trial.set_user_attr("worker", worker_identity())
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
        except EnvironmentProblem:
            raise  # a full disk or a damaged cache is not the recipe's fault: stop (exit 2), retry on the next run
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
        faults.point("trial.commit")  # crash test: measured, attributes stored, not yet COMPLETE
        return lat["tpot_ms"]


BASELINE_PARAMS = {"kind": "fp16", "kv_cache": "none"}


def enqueue_unfinished_fixed(study, *, with_baseline: bool) -> None:
    """Enqueue again the fixed parameters (the FP16 baseline) of trials that failed and never finished since:
    a worker killed mid-trial, a search stopped by a full disk. Also the baseline of a study that ran trials
    without one (created by an older version, or ``--recipes`` gained fp16)."""
    from optuna.trial import TrialState

    def fixed(t):
        return t.system_attrs.get("fixed_params")

    key = lambda p: json.dumps(p, sort_keys=True)  # noqa: E731
    trials = study.get_trials(deepcopy=False)
    settled = {key(fixed(t)) for t in trials if fixed(t) and t.state != TrialState.FAIL}
    for t in trials:
        if t.state == TrialState.FAIL and fixed(t) and key(fixed(t)) not in settled:
            study.enqueue_trial(fixed(t))
            settled.add(key(fixed(t)))
    if with_baseline and trials and not any((fixed(t) or t.params).get("kind") == "fp16" for t in trials):
        study.enqueue_trial(BASELINE_PARAMS)


def measurement_fingerprint(search: "Search") -> dict:
    """What makes two trials' numbers comparable: evaluation settings, model, calibration, constraint."""
    a = search.args
    settings = {k: v for k, v in dataclasses.asdict(search.settings).items()
                if k not in ("progress", "model", "trust_remote_code")}
    return {"settings": settings, "model_hash": search.model.content_hash, "calibration": search.calib.key,
            "gate": {"min_rouge1": a.min_rouge1, "max_rouge1_drop": a.max_rouge1_drop, "confidence": a.confidence}}


def check_same_measurement(study, fingerprint: dict) -> None:
    """Refuse to add trials measured differently (other samples, workload, model...) to an existing study."""
    stored = study.user_attrs.get("measurement")
    if stored is None:
        study.set_user_attr("measurement", fingerprint)
        return
    stored = json.loads(json.dumps(stored))
    mine = json.loads(json.dumps(fingerprint))  # tuples → lists, as stored
    if stored == mine:
        return
    diffs = []
    for group in sorted(set(stored) | set(mine)):
        s, m = stored.get(group), mine.get(group)
        if isinstance(s, dict) and isinstance(m, dict):
            diffs += [f"{k} {s.get(k)!r} → {m.get(k)!r}" for k in sorted(set(s) | set(m)) if s.get(k) != m.get(k)]
        elif s != m:
            diffs.append(f"{group} {str(s)[:24]!r} → {str(m)[:24]!r}")
    raise UserError(f"study {study.study_name!r} was measured differently ({'; '.join(diffs[:4])}); its trials would "
                    "not be comparable with this run's: use the study's flags or another --study-name")


class _NoUserErrorTraceback:
    """optuna logs a failed trial's exception with its traceback; a UserError (damaged cache, full disk) is the
    user's one-line ``error:`` that cli_entry prints last, not a bug report: keep optuna's line, drop the trace."""

    def filter(self, record) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], UserError):
            record.exc_info, record.exc_text = None, None
        return True


def _quiet_user_error_tracebacks() -> None:
    import logging

    logger = logging.getLogger("optuna")
    if not any(isinstance(f, _NoUserErrorTraceback) for f in logger.filters):
        logger.addFilter(_NoUserErrorTraceback())
    for handler in logger.handlers:
        if not any(isinstance(f, _NoUserErrorTraceback) for f in handler.filters):
            handler.addFilter(_NoUserErrorTraceback())


def run(args) -> int:
    import optuna
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    from experiments.report import summarize_study, write_outputs

    from quant.atomic import ensure_writable_dir

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    _quiet_user_error_tracebacks()
    # Before any model work: a results folder that cannot be written used to fail after the whole search.
    ensure_writable_dir(args.results_dir, "--results-dir")
    search = Search(args)
    url = storage_url(args, create_dir=False)
    # A storage URL given by the user, or an existing default database, is opened before the model work (a typo
    # or a damaged file used to surface after a model conversion); a new default SQLite file is only created once
    # the model is known to load.
    default_db = args.results_dir / "study.db"
    early = not _is_default_storage(args) or (default_db.is_file() and default_db.stat().st_size > 0)
    storage = _open_storage(url) if early else None
    search.load_model()
    if storage is None:
        storage_url(args)  # creates --results-dir for the default database
    study, created = open_search_study(url, args.study_name, args.seed, storage=storage)
    if created and "fp16" in search.kinds:
        # Only the worker whose create_study succeeded enqueues the baseline (several may start together).
        study.enqueue_trial(BASELINE_PARAMS)
    check_same_measurement(study, measurement_fingerprint(search))
    reaped = reap_dead_trials(study)
    if reaped:
        print(f"trial(s) {', '.join(map(str, reaped))}: their worker died; marked FAIL (not counted)", file=sys.stderr)
    print(f"study {args.study_name!r} in {redact(url)}: {len(study.trials)} trial(s) so far", file=sys.stderr)
    try:
        baseline = search.baseline()
        study.set_user_attr("threshold", search.threshold)
        study.set_user_attr("baseline_rouge1", baseline["rouge"]["rouge1"])
        study.set_user_attr("workload", {"batch_size": args.batch_size, "input_len": args.input_len,
                                         "output_len": args.output_len, "device": search.settings.device,
                                         "compute_dtype": search.settings.compute_dtype})
        # What `quant.build --from-study` needs to rebuild the winner without the search's flags.
        study.set_user_attr("model", args.model or "default")
        study.set_user_attr("calibration", dataclasses.asdict(search.calib))
        enqueue_unfinished_fixed(study, with_baseline="fp16" in search.kinds)
        done = (TrialState.COMPLETE, TrialState.PRUNED)
        remaining = args.n_trials - len(study.get_trials(deepcopy=False, states=done))
        if remaining > 0:
            study.optimize(search.objective, n_trials=remaining, timeout=args.timeout, catch=(),
                           callbacks=[MaxTrialsCallback(args.n_trials, states=done),
                                      lambda *_: faults.point("trial.committed")])
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
