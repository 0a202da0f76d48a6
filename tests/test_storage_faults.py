"""Transient storage faults are ridden out: a real PostgreSQL restart, a real held SQLite lock.

No storage is mocked: the PostgreSQL test restarts the local server while a thread keeps calling
the storage; the SQLite tests hold the database file's write lock from another process.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import re
import shutil
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from optuna.trial import TrialState

from storage.claims import Claims
from storage.retry import RETRIED_METHODS, RetryingRDBStorage, is_transient
from storage.urls import StorageUnavailableError, open_storage
from tests.conftest import hold_sqlite_lock

# ---- helpers ---------------------------------------------------------------------------------


def _wait_for_postgres(timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = subprocess.run(
            ["pg_isready", "-h", "127.0.0.1", "-p", "5432"], capture_output=True, timeout=10
        )
        if done.returncode == 0:
            return
        time.sleep(0.2)
    raise AssertionError("PostgreSQL did not come back within 60 s")


def _restart_postgres() -> None:
    clusters = sorted(p.name for p in Path("/etc/postgresql").iterdir())
    subprocess.run(
        [
            "pg_ctlcluster",
            "--skip-systemctl-redirect",
            clusters[0],
            "main",
            "restart",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )


@pytest.fixture
def pg_fault_url(postgres_db_url: str) -> Iterator[str]:
    """A database of this test's own (conftest's: dropped at the end, waiting for the server
    if it is still restarting)."""
    if shutil.which("pg_ctlcluster") is None or not Path("/etc/postgresql").is_dir():
        pytest.skip("no local PostgreSQL cluster to restart")
    try:
        yield postgres_db_url
    finally:
        _wait_for_postgres()


@contextlib.contextmanager
def _losing_commit_answers(engine: sqlalchemy.engine.Engine) -> Iterator[dict[str, bool]]:
    """While ``lose["next"]`` (set at the start) holds, the next commit on ``engine`` is stored,
    then its answer is lost (the connection 'drops'); the flag is cleared when that happens."""
    lose = {"next": True}

    def commit(conn) -> None:  # noqa: ANN001
        if lose["next"]:
            lose["next"] = False
            conn.connection.driver_connection.commit()  # the change is stored ...
            raise sqlalchemy.exc.OperationalError(  # ... and the answer is lost
                "COMMIT", None, ConnectionResetError("server closed the connection")
            )

    sqlalchemy.event.listen(engine, "commit", commit)
    try:
        yield lose
    finally:
        sqlalchemy.event.remove(engine, "commit", commit)


def _sqlite_storage(tmp_path: Path, **kwargs) -> tuple[RetryingRDBStorage, Path]:
    db = tmp_path / "faults.db"
    storage = open_storage(f"sqlite:///{db}", **kwargs)
    assert isinstance(storage, RetryingRDBStorage)
    return storage, db


# ---- every database call is wrapped ---------------------------------------------------------


def test_every_storage_method_optuna_calls_is_retried() -> None:
    """The abstract storage and heartbeat API, and every backend method Optuna's cache calls."""
    from optuna.storages import BaseStorage
    from optuna.storages._cached_storage import _CachedStorage
    from optuna.storages._heartbeat import BaseHeartbeat

    no_database = {"get_heartbeat_interval", "get_heartbeat_stale_trial_callback"}
    needed = set(BaseStorage.__abstractmethods__ | BaseHeartbeat.__abstractmethods__)
    needed |= set(re.findall(r"self\._backend\.(\w+)\(", inspect.getsource(_CachedStorage)))
    needed -= no_database
    needed |= {"set_trial_state_values", "_get_stale_trial_ids"}
    wrapped = set(RETRIED_METHODS) | {
        "record_heartbeat",
        "set_trial_state_values",
        "_get_stale_trial_ids",
        "_create_new_trial",
        "create_new_trial",
    }
    assert needed <= wrapped, f"not retried: {sorted(needed - wrapped)}"
    for name in wrapped:
        assert getattr(RetryingRDBStorage, name) is not getattr(optuna.storages.RDBStorage, name), (
            name
        )


# ---- non-transient errors are raised at once ------------------------------------------------


def test_non_transient_errors_are_not_retried(tmp_path: Path) -> None:
    storage, _ = _sqlite_storage(tmp_path, retry_seconds=30)
    study = optuna.create_study(storage=storage, study_name="s")
    trial_id = storage.create_new_trial(study._study_id)
    other_id = storage.create_new_trial(study._study_id)
    claims = Claims(storage.engine)
    assert claims.retry_seconds == 30

    started = time.monotonic()
    with pytest.raises(KeyError):
        storage.set_trial_user_attr(10_000_000, "a", 1)
    with pytest.raises(optuna.exceptions.DuplicatedStudyError):
        storage.create_new_study([optuna.study.StudyDirection.MINIMIZE], "s")
    assert claims.take("k") is True
    assert claims.take("k") is False  # IntegrityError: someone else's, never retried
    storage.set_trial_state_values(trial_id, TrialState.COMPLETE, [1.0])
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        storage.set_trial_user_attr(trial_id, "a", 1)
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        storage.set_trial_state_values(trial_id, TrialState.COMPLETE, [1.0])
    storage.set_trial_param(other_id, "x", 0.5, optuna.distributions.FloatDistribution(0, 1))
    with pytest.raises(ValueError):  # incompatible with the study's earlier "x"
        storage.set_trial_param(
            other_id, "x", 0, optuna.distributions.CategoricalDistribution(["a", "b"])
        )
    assert time.monotonic() - started < 3.0

    # The classification itself, on real errors.
    with (
        pytest.raises(sqlalchemy.exc.OperationalError) as no_table,
        storage.engine.connect() as conn,
    ):
        conn.execute(sqlalchemy.text("SELECT * FROM no_such_table"))
    assert not is_transient(no_table.value)
    with (
        pytest.raises(sqlalchemy.exc.IntegrityError) as duplicate,
        storage.engine.begin() as conn,
    ):
        conn.execute(sqlalchemy.text("INSERT INTO ssl_search_claims VALUES ('k', 'x', 0)"))
    assert not is_transient(duplicate.value)


# ---- a write whose commit was lost is not done twice ----------------------------------------


def test_a_retried_state_change_recognises_its_own_lost_commit(tmp_path: Path) -> None:
    """The connection 'drops' right after the commit: a finishing change's retry sees it done
    and succeeds. A pop's retry answers False (the trial might be another process's, see the
    next test); the trial it did take never beats and is failed as stale, then retried."""
    storage, _ = _sqlite_storage(tmp_path, retry_seconds=10, heartbeat_interval=1, grace_period=1)
    study = optuna.create_study(storage=storage, study_name="s")
    study.enqueue_trial({})
    waiting = study.get_trials(states=(TrialState.WAITING,))[0]._trial_id
    running = storage.create_new_trial(study._study_id)
    with _losing_commit_answers(storage.engine) as lose:
        assert storage.set_trial_state_values(running, TrialState.COMPLETE, [0.5]) is True
        assert lose["next"] is False
        lose["next"] = True
        assert storage.set_trial_state_values(waiting, TrialState.RUNNING) is False
        assert lose["next"] is False
    assert storage.get_trial(running).state == TrialState.COMPLETE
    assert storage.get_trial(running).values == [0.5]
    assert storage.get_trial(waiting).state == TrialState.RUNNING
    # Without a lost attempt, the same calls keep Optuna's meaning.
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        storage.set_trial_state_values(running, TrialState.COMPLETE, [0.5])
    assert storage.set_trial_state_values(waiting, TrialState.RUNNING) is False
    # The orphan: no process trains it, so it never beats; past the grace period it is failed
    # and its retry queued, so the configuration is not lost.
    assert storage._get_stale_trial_ids(study._study_id) == []  # first seen now
    time.sleep(1.2)
    optuna.storages.fail_stale_trials(study)
    assert storage.get_trial(waiting).state == TrialState.FAIL
    [retry] = study.get_trials(states=(TrialState.WAITING,))
    assert optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(retry) == 0


def test_a_trial_enqueued_while_its_commit_answer_is_lost_is_created_once(tmp_path: Path) -> None:
    """An enqueued leg (or a retry) whose insert was stored but whose answer was lost: the
    retry finds it by its creation mark instead of inserting a second copy (two legs of one
    configuration would train in one folder)."""
    storage, _ = _sqlite_storage(tmp_path, retry_seconds=10)
    study = optuna.create_study(storage=storage, study_name="s")
    with _losing_commit_answers(storage.engine) as lose:
        study.enqueue_trial({"x": 0.5}, user_attrs={"config": 3})
        assert lose["next"] is False  # an answer was lost
    [trial] = study.get_trials()
    assert trial.state == TrialState.WAITING and trial.system_attrs["fixed_params"] == {"x": 0.5}
    assert trial.user_attrs == {"config": 3}
    # The same through the storage's own API (no Study, no cache in between), with the
    # connection down long enough (5 more commits refused) that Optuna's own retries give up
    # and this storage's retry makes a fresh call.
    template = optuna.trial.create_trial(state=TrialState.WAITING, params={}, distributions={})
    commits = []

    def commit(conn) -> None:  # noqa: ANN001
        commits.append(1)
        if len(commits) == 1:
            conn.connection.driver_connection.commit()  # stored, and the answer lost
        elif len(commits) <= 6:
            conn.connection.driver_connection.rollback()  # refused
        else:
            return
        raise sqlalchemy.exc.OperationalError(
            "COMMIT", None, ConnectionResetError("server closed the connection")
        )

    sqlalchemy.event.listen(storage.engine, "commit", commit)
    try:
        made = storage.create_new_trial(study._study_id, template)
    finally:
        sqlalchemy.event.remove(storage.engine, "commit", commit)
    assert len(commits) > 6
    assert len(study.get_trials()) == 2 and storage.get_trial(made).state == TrialState.WAITING
    # Without a lost answer, each enqueue is its own trial (the mark is one-off).
    study.enqueue_trial({"x": 0.5}, user_attrs={"config": 3})
    study.enqueue_trial({"x": 0.5}, user_attrs={"config": 3})
    assert len(study.get_trials()) == 4


@pytest.mark.parametrize(
    "lost",
    [
        sqlite3.OperationalError("database is locked"),
        ConnectionResetError("server closed the connection"),
    ],
    ids=["locked", "connection-lost"],
)
def test_a_pop_that_stored_nothing_never_takes_another_process_trial(
    tmp_path: Path, lost: Exception
) -> None:
    """This process's pop stored nothing, and before its retry another process popped the
    waiting trial. The retry must answer False (Optuna then pops the next one), not take the
    other process's trial as its own: two workers would train one trial in one folder, and the
    second would crash on "Cannot tell a COMPLETE trial". "database is locked" (SQLite busy)
    says nothing was stored; a dropped connection leaves it in doubt, and before, a retry that
    then saw the trial RUNNING with a start inside its own lost attempt took it."""
    storage, db = _sqlite_storage(tmp_path, retry_seconds=10)
    study = optuna.create_study(storage=storage, study_name="s")
    study.enqueue_trial({})
    waiting = study.get_trials(states=(TrialState.WAITING,))[0]._trial_id
    other = open_storage(f"sqlite:///{db}")

    def commit(conn) -> None:  # noqa: ANN001
        sqlalchemy.event.remove(storage.engine, "commit", commit)
        conn.connection.driver_connection.rollback()  # the commit stored nothing ...
        assert other.set_trial_state_values(waiting, TrialState.RUNNING) is True  # ... B pops
        raise sqlalchemy.exc.OperationalError("COMMIT", None, lost)

    sqlalchemy.event.listen(storage.engine, "commit", commit)
    assert storage.set_trial_state_values(waiting, TrialState.RUNNING) is False
    assert storage.get_trial(waiting).state == TrialState.RUNNING


def test_two_processes_never_pop_the_same_waiting_trial_on_sqlite(tmp_path: Path) -> None:
    """A has read the trial (WAITING) and is about to set it RUNNING when B tries to pop it:
    B must wait for A and then see RUNNING, not pop it too."""
    storage, db = _sqlite_storage(tmp_path, retry_seconds=10)
    study = optuna.create_study(storage=storage, study_name="s")
    study.enqueue_trial({})
    waiting = study.get_trials(states=(TrialState.WAITING,))[0]._trial_id
    other = open_storage(f"sqlite:///{db}")
    with ThreadPoolExecutor(1) as pool:
        others: list = []

        def before(conn, cursor, statement, *args) -> None:  # noqa: ANN001
            if statement.lstrip().upper().startswith("UPDATE TRIALS") and not others:
                others.append(
                    pool.submit(other.set_trial_state_values, waiting, TrialState.RUNNING)
                )
                time.sleep(1.0)  # B has all the time it needs to pop, if it can

        sqlalchemy.event.listen(storage.engine, "before_cursor_execute", before)
        try:
            mine = storage.set_trial_state_values(waiting, TrialState.RUNNING)
        finally:
            sqlalchemy.event.remove(storage.engine, "before_cursor_execute", before)
        theirs = others[0].result(timeout=30)
    assert (mine, theirs) == (True, False)


def test_a_retried_claim_recognises_its_own_lost_commit(tmp_path: Path) -> None:
    storage, _ = _sqlite_storage(tmp_path, retry_seconds=10)
    claims = Claims(storage.engine)
    with _losing_commit_answers(storage.engine) as lose:
        assert claims.take("mine") is True
    assert lose["next"] is False
    assert claims.taken("mine") == ["mine"]
    assert Claims(storage.engine, owner="other").take("mine") is False


# ---- a real SQLite lock ---------------------------------------------------------------------


@pytest.mark.slow
def test_sqlite_lock_longer_than_the_busy_timeout_is_ridden_out(tmp_path: Path) -> None:
    storage, db = _sqlite_storage(tmp_path, retry_seconds=15, busy_timeout=0.3)
    study = optuna.create_study(storage=storage, study_name="s")
    trial_id = storage.create_new_trial(study._study_id)
    claims = Claims(storage.engine)

    holder = hold_sqlite_lock(db, 2.5, tmp_path)
    started = time.monotonic()
    with ThreadPoolExecutor(3) as pool:
        futures = [
            pool.submit(storage.set_trial_user_attr, trial_id, "epoch", 3),
            pool.submit(storage.record_heartbeat, trial_id),
            pool.submit(claims.take, "s/slot/0"),
        ]
        results = [f.result(timeout=30) for f in futures]
    waited = time.monotonic() - started
    assert holder.wait(timeout=10) == 0
    assert results == [None, None, True]
    assert waited > 1.5, "the calls should have waited for the lock"

    holder = hold_sqlite_lock(db, 2.0, tmp_path)
    assert storage.set_trial_state_values(trial_id, TrialState.COMPLETE, [0.25]) is True
    assert holder.wait(timeout=10) == 0
    trial = storage.get_trial(trial_id)
    assert (trial.state, trial.values, trial.user_attrs) == (
        TrialState.COMPLETE,
        [0.25],
        {"epoch": 3},
    )
    assert claims.taken("s/slot/") == ["s/slot/0"]


@pytest.mark.slow
def test_sqlite_lock_past_the_bound_raises_one_line(tmp_path: Path) -> None:
    storage, db = _sqlite_storage(tmp_path, retry_seconds=1.5, busy_timeout=0.2)
    study = optuna.create_study(storage=storage, study_name="s")
    trial_id = storage.create_new_trial(study._study_id)

    holder = hold_sqlite_lock(db, 30, tmp_path)
    try:
        started = time.monotonic()
        with pytest.raises(StorageUnavailableError) as raised:
            storage.set_trial_state_values(trial_id, TrialState.COMPLETE, [1.0])
        took = time.monotonic() - started
        with pytest.raises(StorageUnavailableError) as raised_claim:
            Claims(storage.engine).take("k")
    finally:
        holder.kill()
        holder.wait(timeout=10)
    message = str(raised.value)
    assert "\n" not in message
    assert str(db) in message and "locked" in message
    assert "set_trial_state_values" in message and "retrying for" in message
    assert raised.value.seconds >= 1.5
    assert 1.5 <= took < 6
    assert "locked" in str(raised_claim.value) and "\n" not in str(raised_claim.value)
    # The lock is gone: the trial was left RUNNING, and can still be finished.
    assert storage.get_trial(trial_id).state == TrialState.RUNNING
    assert storage.set_trial_state_values(trial_id, TrialState.COMPLETE, [1.0]) is True


@pytest.mark.slow
def test_a_heartbeat_the_storage_refuses_past_the_bound_warns_and_the_next_one_lands(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Optuna's heartbeat thread ends for good on an error: a heartbeat the storage refuses
    past the retry bound is a warning, and the next beat, once it is back, is recorded."""
    caplog.set_level(logging.WARNING, logger="storage.retry")
    storage, db = _sqlite_storage(
        tmp_path, retry_seconds=1.0, busy_timeout=0.2, heartbeat_interval=1, grace_period=30
    )
    study = optuna.create_study(storage=storage, study_name="s")
    trial_id = storage.create_new_trial(study._study_id)
    holder = hold_sqlite_lock(db, 30, tmp_path)
    try:
        storage.record_heartbeat(trial_id)  # returns: no error for the thread to die of
    finally:
        holder.kill()
        holder.wait(timeout=10)
    assert any("heartbeat of trial id" in r.getMessage() for r in caplog.records)
    storage.record_heartbeat(trial_id)
    optuna.storages.fail_stale_trials(study)  # it beat just now: not stale
    assert storage.get_trial(trial_id).state == TrialState.RUNNING


# ---- a real PostgreSQL restart --------------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.slow
def test_postgres_restart_mid_trial_is_ridden_out(
    pg_fault_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="storage.retry")
    storage = open_storage(pg_fault_url, heartbeat_interval=1, grace_period=30, retry_seconds=45)
    study = optuna.create_study(storage=storage, study_name="s", direction="maximize")
    study_id = study._study_id
    trial_id = storage.create_new_trial(study_id)
    claims = Claims(storage.engine)
    restarted = threading.Event()
    stop = threading.Event()
    errors: list[BaseException] = []
    done: list[int] = []
    after_restart: list[int] = []

    def work() -> None:
        i = 0
        try:
            while not stop.is_set():
                storage.set_trial_user_attr(trial_id, f"k{i}", i)
                storage.record_heartbeat(trial_id)
                storage.set_trial_intermediate_value(trial_id, i, float(i))
                assert len(storage.get_all_trials(study_id)) == 1
                assert claims.take(f"s/slot/{i}") is True
                assert f"s/slot/{i}" in claims.taken("s/slot/")
                done.append(i)
                if restarted.is_set():
                    after_restart.append(i)
                i += 1
                time.sleep(0.02)
        except BaseException as error:  # noqa: BLE001 - reported by the test below
            errors.append(error)

    # Optuna's own loop on a second study: suggest, report, heartbeat thread, finish.
    opt = optuna.create_study(storage=storage, study_name="opt", direction="maximize")

    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", 0.0, 1.0)
        trial.report(x, 0)
        time.sleep(0.05)
        trial.set_user_attr("x", x)
        return x

    def optimize() -> None:
        try:
            opt.optimize(
                objective, callbacks=[lambda study, _: study.stop() if stop.is_set() else None]
            )
        except BaseException as error:  # noqa: BLE001 - reported by the test below
            errors.append(error)

    worker = threading.Thread(target=work)
    optimizer = threading.Thread(target=optimize)
    worker.start()
    optimizer.start()
    try:
        time.sleep(0.5)
        assert done, "the worker made no call before the restart"
        _restart_postgres()
        _wait_for_postgres()
        restarted.set()
        deadline = time.monotonic() + 20
        while len(after_restart) < 5 and time.monotonic() < deadline and worker.is_alive():
            time.sleep(0.1)
    finally:
        stop.set()
        worker.join(timeout=60)
        optimizer.join(timeout=60)
    assert not worker.is_alive() and not optimizer.is_alive()
    assert not errors, f"a storage call failed: {errors[0]!r}"
    assert len(after_restart) >= 5
    assert any("retrying" in r.getMessage() for r in caplog.records), (
        "no call met the restart; the test did not exercise a fault"
    )

    # Nothing was lost or doubled, and the trial's final state change succeeds.
    assert storage.set_trial_state_values(trial_id, TrialState.COMPLETE, [0.9]) is True
    trial = storage.get_trial(trial_id)
    assert trial.state == TrialState.COMPLETE
    assert trial.user_attrs == {f"k{i}": i for i in done}
    assert sorted(claims.taken("s/slot/")) == sorted(f"s/slot/{i}" for i in done)
    assert study.best_value == 0.9
    states = [t.state for t in opt.get_trials()]
    assert len(states) >= 5 and set(states) == {TrialState.COMPLETE}
    storage.engine.dispose()


def test_the_default_grace_period_outlasts_an_outage_the_workers_ride_out() -> None:
    """A trial's last heartbeat can be heartbeat_interval old when the storage goes away; the
    workers retry for RETRY_SECONDS. A grace period within that would have the first worker
    back fail the others' healthy trials as dead (it was 60, the retry bound itself)."""
    from search.config import load_config
    from storage.retry import RETRY_SECONDS

    cfg = load_config("quickstart")
    assert cfg.grace_period > RETRY_SECONDS + cfg.heartbeat_interval
