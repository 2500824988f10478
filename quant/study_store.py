"""Where a search's trials live: an optuna storage opened by URL, the study, and the trials of dead workers.

SQLite (one file, several processes of one host) or any optuna URL, e.g. PostgreSQL for workers on several
hosts. Only optuna's public API is used on the study. Passwords that come with a URL are never printed.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import os
import re
import sqlite3
import time
import warnings
from pathlib import Path
from urllib.parse import unquote

from quant.errors import EnvironmentProblem, UserError

# The storage rule, for every command that opens a study: --storage, else $QUANT_SEARCH_STORAGE (where a
# PostgreSQL password belongs: argv is visible in `ps`), else SQLite in the results folder.
STORAGE_ENV = "QUANT_SEARCH_STORAGE"
RESULTS_DIR = Path("results/search")
STUDY_DB = "study.db"


def is_default_storage(args) -> bool:
    return not (args.storage or os.environ.get(STORAGE_ENV))


def storage_url(args, *, create_dir: bool = True) -> str:
    url = args.storage or os.environ.get(STORAGE_ENV)
    if url:
        return url
    if create_dir:
        args.results_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(args.results_dir / STUDY_DB).resolve()}"


def existing_storage_url(storage: str | None, results_dir: Path = RESULTS_DIR) -> str:
    """The storage a read-only command opens (same rule); the default SQLite file must already exist."""
    url = storage or os.environ.get(STORAGE_ENV)
    if url:
        return url
    if not (results_dir / STUDY_DB).is_file():
        raise UserError(f"no study database in {results_dir} (pass --storage)")
    return f"sqlite:///{(results_dir / STUDY_DB).resolve()}"


def open_storage(url: str, *, create: bool = True):
    import optuna

    db = url[len("sqlite:///"):] if url.startswith("sqlite:///") else None
    if not create and db and not db.startswith(":memory:") and (not Path(db).is_file() or Path(db).stat().st_size == 0):
        # Reading a study (plot, build --from-study) never writes optuna's schema into a missing or empty file.
        raise UserError(f"no study database at {db} (missing or empty)")
    if not create and db and not db.startswith(":memory:"):
        _check_optuna_sqlite(db)
    storage = None
    for attempt in range(8):
        try:
            with _schema_lock(url), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # optuna's experimental/deprecation notes on every start
                storage = optuna.storages.RDBStorage(
                    url, heartbeat_interval=20, grace_period=60,
                    engine_kwargs=_engine_kwargs(url, writer=create),
                )
            if url.startswith("sqlite") and create:  # a reader takes no write lock: a running search never waits on it
                _sqlite_immediate(storage.engine)
            break
        except Exception as exc:  # sqlalchemy raises many types for bad URLs / unreachable servers
            # Workers starting together on an empty database race to create optuna's schema: the loser sees a
            # unique violation (PostgreSQL) or "table ... already exists" (SQLite, found by four workers in
            # tests/test_concurrency.py) and simply retries once the winner committed.
            racing = "IntegrityError" in type(exc).__name__ or "already exists" in str(exc) \
                or ("database is locked" in str(exc) and create)
            if racing and attempt < 7:
                time.sleep(0.3 + 0.5 * attempt)
                continue
            detail = _driver_detail(str(exc), url)
            raise UserError(f"cannot open storage {redact(url)}: {type(exc).__name__}: {detail}") from None
    return storage


def _check_optuna_sqlite(db: str) -> None:
    """A read-only look (``mode=ro``) that an existing SQLite file holds optuna's tables: opening another
    database through optuna would create its schema inside it."""
    try:
        con = sqlite3.connect(f"{Path(db).absolute().as_uri()}?mode=ro", uri=True, timeout=READER_BUSY_S)
        try:
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            con.close()
    except sqlite3.Error as exc:
        raise UserError(f"cannot open storage sqlite:///{db}: {exc}") from None
    if not {"studies", "trials", "version_info"} <= tables:
        raise UserError(f"{db} is not an optuna study database (no optuna tables in it)")


@contextlib.contextmanager
def _schema_lock(url: str):
    """SQLite (one host): serialize optuna's schema creation behind a lock file next to a new database (an
    existing one is only opened: nothing is written beside it)."""
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


# sqlite3's busy timeout: how long a connection waits for a lock another process holds. Workers of one search
# (tests/test_concurrency.py runs four) wait their turn for the write lock; a read-only command (plot, build
# --from-study) takes no write lock, so it waits only while a writer commits, and gives up soon with one line.
WRITER_BUSY_S = 120.0
READER_BUSY_S = 10.0


def _engine_kwargs(url: str, *, writer: bool = True) -> dict:
    if not url.startswith("sqlite"):
        return {"pool_pre_ping": True}
    return {"connect_args": {"timeout": WRITER_BUSY_S if writer else READER_BUSY_S}}


@contextlib.contextmanager
def reading(url: str):
    """Around a read-only command's use of a study: a database another process keeps locked is one line."""
    try:
        yield
    except Exception as exc:  # sqlalchemy's OperationalError, whatever the driver wraps it in
        if "database is locked" not in str(exc):
            raise
        raise EnvironmentProblem(f"{redact(url)} stayed locked by another process for {READER_BUSY_S:g} s (a search "
                                 "writing it holds the lock only while it commits); try again") from None


# scheme:// and the userinfo of a URL; greedy: the userinfo ends at the *last* '@', even past a '/' or '#' of
# the password (one pattern for what is hidden and what is searched for in a driver's message).
_USERINFO = re.compile(r"^([A-Za-z][\w+.-]*://)(.*)@")


def redact(url: str) -> str:
    """Never print a password that came with a storage URL: ``user:***@host``, ``password=***``.

    The password ends at the *last* '@' of the authority (it may itself hold '@' or ':').
    """
    url = re.sub(r"(?i)(\b(?:password|passwd|pwd)\s*=\s*)[^\s&;#'\"]*", r"\1***", url)
    return _USERINFO.sub(
        lambda m: m.group(1) + m.group(2).split(":", 1)[0] + (":***" if ":" in m.group(2) else "") + "@", url)


def _password(url: str) -> str:
    m = _USERINFO.match(url)
    userinfo = m.group(2) if m else ""
    return unquote(userinfo.split(":", 1)[1]) if ":" in userinfo else ""


def _driver_detail(message: str, url: str) -> str:
    """The driver's first line, unless it may carry part of the URL's password: a password holding '@', ':',
    '/', '%', '#' or '?' is split differently by the driver, whose message then quotes a piece of it as a host
    or a user name; for such a password any run of 3 of its characters (all of a shorter one) in the message
    withholds the line. A password without them reaches the driver whole, and drivers do not quote it: the
    line is shown (with the password itself masked, should it appear)."""
    line = redact(message.splitlines()[0][:200]) if message else ""
    secret = _password(url)
    raw = url.split("://", 1)[-1]
    secret_raw = raw[:raw.rfind("@")].split(":", 1)[-1]  # as typed, percent-escapes included
    if secret and secret_raw == secret and not set(secret) & set("@:/%#?"):
        return line.replace(secret, "***")
    n = min(3, len(secret))
    if secret and any(text[i:i + n] in message for text in {secret, secret_raw} for i in range(len(text) - n + 1)):
        return "(the driver's message is withheld: it may quote part of the password)"
    return line


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
    """Mark FAIL the RUNNING trials whose worker died on this machine (SIGKILL, OOM, power loss of a worker); the
    search plans their recipes again. Trials of other hosts: optuna's heartbeat (``fail_stale_trials``) after its
    grace period. Returns the trial numbers reaped."""
    import optuna
    from optuna.trial import TrialState

    me = worker_identity()
    reaped = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if _died_here(t.user_attrs.get("worker"), me):
            try:
                study.tell(t.number, state=TrialState.FAIL)
            except (ValueError, RuntimeError):  # another worker reaped it first
                continue
            reaped.append(t.number)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # experimental-API note
        stale = optuna.storages.fail_stale_trials(study)
    return reaped + list(stale or [])


def open_search_study(url: str, name: str, *, sampler=None, create: bool = True, storage=None):
    """(study, created_now). Exactly one of several workers starting together sees ``created_now``."""
    import optuna

    storage = storage if storage is not None else open_storage(url, create=create)
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


def open_study(url: str, name: str):
    """An existing study, read-only use (plots, ``quant.build --from-study``)."""
    return open_search_study(url, name, create=False)[0]


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


def claim(study, trial, key: str, *, wait_s: float = 60.0, sleep=time.sleep) -> int | None:
    """Claim ``key`` (a recipe hash) for ``trial``: the number of the trial it repeats, or None if it measures.

    The lowest-numbered trial holding a key measures it; a later one is a repeat. Each trial first writes its key,
    then reads the others': of two trials writing at the same instant at least one reads the other's key, but the
    earlier one may be the one that does (and need not yield). So a trial also waits while an earlier trial is
    RUNNING without a key yet (trials write theirs right after creation), up to ``wait_s``: then every earlier
    claim is known and the decision is the same in every worker. Past ``wait_s`` (an earlier worker hung between
    creating its trial and claiming) it measures. Failed trials hold nothing: their key is measured again."""
    from optuna.trial import TrialState

    trial.set_user_attr("recipe_hash", key)
    deadline = time.monotonic() + wait_s
    while True:
        earlier = [t for t in study.get_trials(deepcopy=False, states=(
            TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)) if t.number < trial.number]
        holder = min((t.number for t in earlier if t.user_attrs.get("recipe_hash") == key
                      and t.user_attrs.get("repeat_of") is None), default=None)
        if holder is not None:
            trial.set_user_attr("repeat_of", holder)
            return holder
        if time.monotonic() >= deadline or not any(
                t.state == TrialState.RUNNING and "recipe_hash" not in t.user_attrs for t in earlier):
            return None
        sleep(0.05)


class _NoUserErrorTraceback:
    """optuna logs a failed trial's exception with its traceback; a UserError (damaged cache, full disk) is the
    user's one-line ``error:`` that cli_entry prints last, and Ctrl-C or SIGTERM the user's own stop, not bug
    reports: keep optuna's line, drop the trace."""

    def filter(self, record) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], (UserError, KeyboardInterrupt)):
            record.exc_info, record.exc_text = None, None
        return True


def quiet_user_error_tracebacks() -> None:
    """Keep optuna's log line for a trial failed by a UserError or a stop, without the traceback."""
    logger = logging.getLogger("optuna")
    if not any(isinstance(f, _NoUserErrorTraceback) for f in logger.filters):
        logger.addFilter(_NoUserErrorTraceback())
    for handler in logger.handlers:
        if not any(isinstance(f, _NoUserErrorTraceback) for f in handler.filters):
            handler.addFilter(_NoUserErrorTraceback())
