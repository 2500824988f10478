"""Claims of recipes by trials (quant/study_store.claim), interleaving by interleaving, on a real SQLite storage.

Several workers create trials and claim recipes on one study; the order in which their writes and reads reach the
storage is what decides. Each test below fixes one order step by step in one process (the storage cannot tell
two processes from two trial handles), so every interleaving the four-worker test can meet is replayed here
deterministically. The ``sleep`` hook is where a waiting trial lets the other worker's write land.
"""
from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState

from quant.study_store import claim


@pytest.fixture
def study(tmp_path):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(storage=f"sqlite:///{tmp_path / 'study.db'}", study_name="claims")


def _never(_s):
    raise AssertionError("this claim had nothing to wait for")


def test_the_earlier_trial_claims_first_and_the_later_one_repeats_it(study):
    a, b = study.ask(), study.ask()  # both created; B has not written its claim yet
    assert claim(study, a, "k", sleep=_never) is None  # a later trial's missing claim is never waited for
    assert claim(study, b, "k", sleep=_never) == a.number
    assert study.trials[b.number].user_attrs["repeat_of"] == a.number
    assert "repeat_of" not in study.trials[a.number].user_attrs


def test_the_later_trial_claims_first_and_waits_for_the_earlier_ones_claim(study):
    """The race the four workers used to lose: B reads before A has written, so B alone cannot know it is
    second. B waits while A is RUNNING without a claim; A's write lands during that wait; B then repeats A."""
    a, b = study.ask(), study.ask()
    landed = []

    def a_writes_now(_s):
        if not landed:
            landed.append(claim(study, a, "k", sleep=_never))

    assert claim(study, b, "k", sleep=a_writes_now) == a.number
    assert landed == [None]  # A measures; it never waited for B


def test_an_earlier_trial_of_another_recipe_only_delays_the_decision(study):
    a, b = study.ask(), study.ask()
    waits = []

    def a_claims_other(_s):
        waits.append(1)
        claim(study, a, "other", sleep=_never)

    assert claim(study, b, "k", sleep=a_claims_other) is None and len(waits) == 1


def test_finished_claims_hold_and_failed_ones_do_not(study):
    a = study.ask()
    assert claim(study, a, "k") is None
    study.tell(a, 1.0)
    f = study.ask()
    assert claim(study, f, "j") is None
    study.tell(f, state=TrialState.FAIL)  # its worker died: the recipe is measured again
    assert claim(study, study.ask(), "k", sleep=_never) == a.number
    assert claim(study, study.ask(), "j", sleep=_never) is None


def test_a_repeat_is_never_the_holder(study):
    a, b = study.ask(), study.ask()
    claim(study, a, "k")
    assert claim(study, b, "k") == a.number
    c = study.ask()
    assert claim(study, c, "k", sleep=_never) == a.number  # the first holder, not the repeat B


def test_an_earlier_trial_that_never_claims_is_waited_for_only_until_the_deadline(study):
    study.ask()  # a worker that hung between creating its trial and claiming
    b = study.ask()
    slept = []
    assert claim(study, b, "k", wait_s=0.3, sleep=slept.append) is None
    assert slept  # it did wait, and then measured


@pytest.mark.parametrize("password", ["p@ss/w0rd#x", "ab:cd@ef", "pc%40t:/q", "only#hash#marks", "s3cr/et"])
def test_no_part_of_a_password_reaches_the_error_line(password):
    """A closed port on 127.0.0.1 (no DNS lookup): the driver's message may quote a piece of a password that holds
    '@ : / % #' as a host or user name; no 3-character run of the password, as typed or decoded, may be printed."""
    from urllib.parse import unquote

    from quant.errors import UserError
    from quant.study_store import open_storage

    url = f"postgresql://quant:{password}@127.0.0.1:1/quant"
    with pytest.raises(UserError) as err:
        open_storage(url)
    line = str(err.value)
    assert line.startswith("cannot open storage postgresql://quant:***@127.0.0.1:1/quant")
    for text in (password, unquote(password)):
        assert not [text[i:i + 3] for i in range(len(text) - 2) if text[i:i + 3] in line], line


# -- read-only commands next to a writer ------------------------------------------------------------------------


def _held(db, how: str):
    """A second connection holding SQLite's write lock (``IMMEDIATE``: what a search's storage call takes) or its
    exclusive lock (``EXCLUSIVE``: a commit, or a tool keeping the file), until closed."""
    import sqlite3

    con = sqlite3.connect(db, isolation_level=None)
    con.execute(f"BEGIN {how}")
    return con


def test_a_reader_never_waits_for_a_search_holding_the_write_lock(study, tmp_path, monkeypatch):
    """Reads take no write lock: with a writer in the middle of a storage call, the study reads at once (the
    busy timeout is cut to 0.2 s, so any wait for the lock would fail this test, not slow it)."""
    import quant.study_store as store

    monkeypatch.setattr(store, "READER_BUSY_S", 0.2)
    study.tell(study.ask(), 1.0)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    con = _held(tmp_path / "study.db", "IMMEDIATE")
    try:
        with store.reading(url):
            seen = store.open_study(url, "claims")
            assert [t.value for t in seen.trials] == [1.0]
    finally:
        con.close()


def test_a_database_kept_locked_is_one_line_for_a_reader(study, tmp_path, monkeypatch):
    import quant.study_store as store
    from quant.errors import UserError

    monkeypatch.setattr(store, "READER_BUSY_S", 0.2)
    study.tell(study.ask(), 1.0)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    store.open_study(url, "claims")  # the schema check and load work while the file is free
    con = _held(tmp_path / "study.db", "EXCLUSIVE")
    try:
        with pytest.raises(UserError, match="locked") as info:
            with store.reading(url):
                store.open_study(url, "claims").trials
    finally:
        con.close()
    assert "\n" not in str(info.value)
