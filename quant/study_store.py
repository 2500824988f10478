"""Where a search's trials live: an optuna storage opened by URL, the study, and the trials of dead workers.

SQLite (one file, several processes of one host) or any optuna URL, e.g. PostgreSQL for workers on several
hosts. Only optuna's public API is used on the study. Passwords that come with a URL are never printed.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import time
import warnings
from pathlib import Path

from quant.errors import UserError


def is_default_storage(args) -> bool:
    return not (args.storage or os.environ.get("QUANT_SEARCH_STORAGE"))


def storage_url(args, *, create_dir: bool = True) -> str:
    url = args.storage or os.environ.get("QUANT_SEARCH_STORAGE")
    if url:
        return url
    if create_dir:
        args.results_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(args.results_dir / 'study.db').resolve()}"


def open_storage(url: str, *, create: bool = True):
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
                    url, heartbeat_interval=20, grace_period=60,
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
