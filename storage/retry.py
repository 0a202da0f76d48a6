"""Riding out transient storage faults: a PostgreSQL restart, a SQLite file locked for a while.

Every storage call the search makes goes through :func:`retry_call`: an error that says the
database is briefly out of reach (a dropped or refused connection, a server shutting down or
starting up, "database is locked") is retried with exponential backoff and jitter for a bounded
time; any other error (a duplicate key, a missing trial, a finished trial, a bad value) is raised
at once. Past the bound, :class:`~storage.urls.StorageUnavailableError` is raised with a one-line
message naming the storage (password masked) and the last error.

:class:`RetryingRDBStorage` is Optuna's ``RDBStorage`` with every method that touches the
database wrapped this way, including the ones Optuna's cache and heartbeat code call directly
(``_create_new_trial``, ``_get_trials``, ``record_heartbeat``, ``_get_stale_trial_ids``, ...).
Its stale trials also include those that never sent a heartbeat (their process died between
taking the trial and starting to beat); see :meth:`RetryingRDBStorage._get_stale_trial_ids`.
A retried write is safe: attribute, parameter, intermediate-value and heartbeat writes are
upserts, and a state change whose first attempt committed before its connection dropped is
recognised on the retry (see :meth:`RetryingRDBStorage.set_trial_state_values`).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import math
import random
import sqlite3
import sys
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any, TypeVar

import optuna
import sqlalchemy
from optuna.trial import TrialState
from sqlalchemy import exc as sa_exc

from storage.urls import StorageUnavailableError, redact

__all__ = [
    "FAILED_AT_ATTR",
    "RETRY_LIMIT_ATTR",
    "RETRY_SECONDS",
    "RetryingRDBStorage",
    "StorageUnavailableError",
    "is_transient",
    "retry_call",
    "retry_seconds_for",
]

RETRY_SECONDS = 60.0
"""How long a failing storage call is retried, counted from its first transient failure."""
FAILED_AT_ATTR = "failed_at"
# System attr of a failed trial: the max_retries of the process that failed it. A failure is
# retried under the limit in force when it happened (storage.trial_retry.retry_allowed): a later
# run that raises the limit does not revive a failure whose place was given to another.
RETRY_LIMIT_ATTR = "max_retries_when_failed"
"""Trial system attr: when (``time.time()``, comparable across time zones, unlike Optuna's naive
local ``datetime_complete``) the trial was failed; set just before its state becomes FAIL."""
CREATION_MARK_ATTR = "ssl_search_creation"
"""Trial system attr: a one-off mark of the call that created the trial from a template (see
:meth:`RetryingRDBStorage._create_new_trial`)."""
FIRST_DELAY_S = 0.1
MAX_DELAY_S = 5.0

_log = logging.getLogger(__name__)
T = TypeVar("T")


# ---- what counts as transient ----------------------------------------------------------------


def _classify(error: BaseException) -> bool | None:
    """True/False for an error that decides it; None for a wrapper to look through."""
    if isinstance(error, sa_exc.IntegrityError):
        return False
    if isinstance(error, sa_exc.DBAPIError):
        if error.connection_invalidated:
            return True
        verdict = _classify(error.orig) if error.orig is not None else None
        if verdict is not None:
            return verdict
        return isinstance(error, sa_exc.OperationalError)
    if isinstance(error, (sa_exc.DisconnectionError, sa_exc.TimeoutError)):
        return True  # a dead pooled connection, or no free connection in the pool for a while
    if isinstance(error, sa_exc.PendingRollbackError):
        return True  # an earlier failure left the session waiting; the retry starts a new one
    if isinstance(error, sqlite3.Error):
        if isinstance(error, sqlite3.OperationalError):
            message = str(error).lower()
            return "locked" in message or "busy" in message
        return False
    for driver in ("psycopg", "psycopg2"):
        module = sys.modules.get(driver)
        if module is not None and isinstance(error, module.Error):
            # Connection failures, "server is shutting down / starting up", admin shutdown,
            # serialization failures and deadlocks; not syntax, data or constraint errors.
            return isinstance(error, (module.OperationalError, module.InterfaceError))
    if isinstance(error, optuna.exceptions.StorageInternalError):
        return None  # Optuna wraps every SQLAlchemy error in it: judge the cause
    return isinstance(error, ConnectionError)


def is_transient(error: BaseException) -> bool:
    """Whether ``error`` says the database is briefly unreachable or busy, so a retry may work."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        verdict = _classify(current)
        if verdict is not None:
            return verdict
        current = current.__cause__ or current.__context__
    return False


def is_busy(error: BaseException) -> bool:
    """Whether ``error`` is SQLite's "database is locked/busy": nothing was committed."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, sqlite3.OperationalError):
            message = str(current).lower()
            return "locked" in message or "busy" in message
        orig = current.orig if isinstance(current, sa_exc.DBAPIError) else None
        current = orig or current.__cause__ or current.__context__
    return False


def first_line(error: BaseException) -> str:
    """The first line of the innermost database error's message (no SQL, no parameters)."""
    current = error
    if isinstance(current, optuna.exceptions.StorageInternalError) and current.__cause__:
        current = current.__cause__
    text = str(current).strip()
    line = text.splitlines()[0].strip() if text else ""
    return line or type(current).__name__


# ---- the retry loop --------------------------------------------------------------------------


def retry_call(
    fn: Callable[[], T],
    *,
    target: str,
    what: str,
    seconds: float = RETRY_SECONDS,
    on_retry: Callable[[], None] | None = None,
    transient: Callable[[BaseException], bool] = is_transient,
) -> T:
    """``fn()``, retried on transient storage errors for ``seconds`` after the first one.

    ``target`` names the storage in messages (already redacted), ``what`` the operation.
    ``on_retry`` runs before each retry (e.g. to drop a session bound to a dead connection).
    ``transient`` says which errors a retry may mend (the database's, :func:`is_transient`, by
    default). Other errors propagate unchanged; past the bound,
    :class:`StorageUnavailableError` is raised from the last error.
    """
    attempts = 0
    delay = FIRST_DELAY_S
    started: float | None = None
    while True:
        attempts += 1
        try:
            result = fn()
        except Exception as error:
            if not transient(error):
                raise
            now = time.monotonic()
            if started is None:
                started = now
                _log.warning(
                    "storage: %s on %s failed (%s); retrying for up to %.0f s",
                    what,
                    target,
                    first_line(error),
                    seconds,
                )
            elapsed = now - started
            if elapsed >= seconds:
                raise StorageUnavailableError(
                    f"storage unavailable: {target}: {what} still failing after retrying for "
                    f"{elapsed:.1f} s ({attempts} attempts): {first_line(error)}",
                    target=target,
                    operation=what,
                    seconds=elapsed,
                    reason=first_line(error),
                ) from error
            if on_retry is not None:
                try:
                    on_retry()
                except Exception:  # noqa: BLE001 - cleanup of a broken connection may fail too
                    _log.debug("storage: cleanup before a retry failed", exc_info=True)
            time.sleep(min(random.uniform(delay / 2, delay), seconds - elapsed))
            delay = min(delay * 2, MAX_DELAY_S)
            continue
        if started is not None:
            _log.warning(
                "storage: %s on %s succeeded after %.1f s (%d attempts)",
                what,
                target,
                time.monotonic() - started,
                attempts,
            )
        return result


_ENGINE_RETRY_SECONDS: weakref.WeakKeyDictionary[sqlalchemy.Engine, float] = (
    weakref.WeakKeyDictionary()
)


def retry_seconds_for(engine: sqlalchemy.Engine) -> float:
    """The retry bound of the storage that owns ``engine`` (:data:`RETRY_SECONDS` if none)."""
    return _ENGINE_RETRY_SECONDS.get(engine, RETRY_SECONDS)


# ---- Optuna's RDB storage, retried -----------------------------------------------------------

# Every RDBStorage method that reads or writes the database, public or called by Optuna's own
# _CachedStorage / heartbeat code. Nested calls (get_best_trial -> get_trial) are retried once,
# as a whole, by the outermost one.
RETRIED_METHODS = (
    # studies
    "create_new_study",
    "delete_study",
    "set_study_user_attr",
    "set_study_system_attr",
    "get_study_id_from_name",
    "get_study_name_from_id",
    "get_study_directions",
    "get_study_user_attrs",
    "get_study_system_attrs",
    "get_all_studies",
    # trials (creating one: see RetryingRDBStorage._create_new_trial)
    "set_trial_param",
    "_set_trial_param",
    "get_trial_id_from_study_id_trial_number",
    "get_trial_number_from_id",
    "get_trial_param",
    "get_trial_params",
    "set_trial_intermediate_value",
    "set_trial_user_attr",
    "set_trial_system_attr",
    "get_trial_user_attrs",
    "get_trial_system_attrs",
    "get_trial",
    "get_all_trials",
    "_get_trials",
    "get_n_trials",
    "get_best_trial",
    "_get_best_trial_id",
    # schema
    "get_current_version",
)


def _retried(name: str) -> Callable[..., Any]:
    method = getattr(optuna.storages.RDBStorage, name)

    @functools.wraps(method)
    def wrapper(self: RetryingRDBStorage, *args: Any, **kwargs: Any) -> Any:
        return self.retrying(name, lambda: method(self, *args, **kwargs))

    return wrapper


def _same_values(stored: Sequence[float] | None, wanted: Sequence[float] | None) -> bool:
    if wanted is None:
        return True
    if stored is None or len(stored) != len(wanted):
        return False
    return all(
        a == b or (math.isnan(a) and math.isnan(b)) for a, b in zip(stored, wanted, strict=True)
    )


def _transactional_reads(engine: sqlalchemy.Engine) -> None:
    """Make each SQLite transaction take the write lock at its first statement, reads included.

    Python's sqlite3 driver opens a transaction only before a write, so the read that decides
    a write (Optuna's "is this trial still WAITING?" before setting it RUNNING) runs outside it:
    two processes could both see WAITING and both pop the same trial. ``BEGIN IMMEDIATE`` (on
    SQLAlchemy's documented hooks) makes the read and the write one step: the second process
    waits for the first (the busy timeout) and then reads the trial as it now is. Transactions
    are short, so the waits are too; many workers belong on PostgreSQL anyway.
    """

    @sqlalchemy.event.listens_for(engine, "connect")
    def _no_driver_transactions(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None

    @sqlalchemy.event.listens_for(engine, "begin")
    def _begin_with_the_write_lock(conn: sqlalchemy.Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections made before the hooks (schema checks) are not reused


# Optuna's trials and heartbeats tables as its schema names them (read only; Optuna stores a
# trial's state as its name, a PostgreSQL enum there: compared as text).
_TRIALS = sqlalchemy.table(
    "trials",
    sqlalchemy.column("trial_id"),
    sqlalchemy.column("number"),
    sqlalchemy.column("study_id"),
    sqlalchemy.column("state"),
    sqlalchemy.column("datetime_start", sqlalchemy.DateTime),
)
_HEARTBEATS = sqlalchemy.table("trial_heartbeats", sqlalchemy.column("trial_id"))
_TRIAL_SYSTEM_ATTRS = sqlalchemy.table(
    "trial_system_attributes",
    sqlalchemy.column("trial_id"),
    sqlalchemy.column("key"),
    sqlalchemy.column("value_json"),
)


class RetryingRDBStorage(optuna.storages.RDBStorage):
    """``RDBStorage`` whose database calls ride out transient faults for ``retry_seconds``."""

    def __init__(self, url: str, *args: Any, retry_seconds: float = RETRY_SECONDS, **kwargs: Any):
        self.retry_seconds = retry_seconds
        self.retry_target = redact(url)
        self._local = threading.local()
        # (study id, trial id) of a RUNNING trial with no heartbeat -> when this process first saw it
        self._never_beat: dict[tuple[int, int], float] = {}
        super().__init__(url, *args, **kwargs)
        _ENGINE_RETRY_SECONDS[self.engine] = retry_seconds
        if self.engine.dialect.name == "sqlite":
            _transactional_reads(self.engine)
        self._bind_retry_callback()

    def _bind_retry_callback(self) -> None:
        """Give the heartbeat's retry callback this database, where its once-only claims are
        taken (:class:`storage.trial_retry.RetryFailedTrial`; it is not pickled with it)."""
        callback = self.get_heartbeat_stale_trial_callback()
        if callback is not None and hasattr(callback, "engine"):
            callback.engine = self.engine

    def __getstate__(self) -> dict[Any, Any]:
        state = super().__getstate__()
        state.pop("_local", None)
        return state

    def __setstate__(self, state: dict[Any, Any]) -> None:
        self._local = threading.local()
        self._never_beat = {}
        super().__setstate__(state)
        _ENGINE_RETRY_SECONDS[self.engine] = self.retry_seconds
        self._bind_retry_callback()

    def _drop_session(self) -> None:
        # The thread's session may hold a connection that died; start the retry afresh.
        self.remove_session()

    def retrying(self, what: str, fn: Callable[[], T]) -> T:
        """``fn()`` retried on transient faults, unless an outer storage call already is."""
        if getattr(self._local, "active", False):
            return fn()
        self._local.active = True
        try:
            return retry_call(
                fn,
                target=self.retry_target,
                what=what,
                seconds=self.retry_seconds,
                on_retry=self._drop_session,
            )
        finally:
            self._local.active = False

    def record_heartbeat(self, trial_id: int) -> None:
        """As Optuna's, retried; past the retry bound, one warning instead of an error.

        Optuna calls it from its heartbeat thread, which an error would end for good: the
        trial would train on with no heartbeat once the storage is back, be failed as stale by
        another worker and retried beside itself. Kept alive, the thread beats again at its
        next interval. (If no beat reached the storage for ``grace_period``, another worker
        does fail it; this worker's next write to it then fails, and it goes on with other
        work: see search.stages._run_one.)
        """
        try:
            self.retrying(
                "record_heartbeat",
                lambda: optuna.storages.RDBStorage.record_heartbeat(self, trial_id),
            )
        except StorageUnavailableError as error:
            _log.warning(
                "storage: heartbeat of trial id %d not recorded (%s); trying again in %s s",
                trial_id,
                error.reason or error,
                self.heartbeat_interval,
            )

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        """As Optuna's (RUNNING, last heartbeat older than the grace period), plus RUNNING
        trials that have sent no heartbeat at all for a grace period, timed by this process.

        Optuna sets a trial RUNNING (pops or creates it) and starts its heartbeat a moment
        later; a process killed or interrupted in between (while the sampler runs, say) leaves a
        RUNNING trial that Optuna never counts as stale, and the study would wait for it
        forever. How long it has been silent is measured from when this process first saw it
        (``time.monotonic``), so no two machines' clocks are compared.
        """
        stale = self._stale_by_heartbeat(study_id)  # Optuna's rule, retried

        def running_without_heartbeat() -> list[int]:
            with self.engine.connect() as conn:
                return list(
                    conn.execute(
                        sqlalchemy.select(_TRIALS.c.trial_id)
                        .select_from(
                            _TRIALS.outerjoin(
                                _HEARTBEATS, _HEARTBEATS.c.trial_id == _TRIALS.c.trial_id
                            )
                        )
                        .where(
                            _TRIALS.c.study_id == study_id,
                            sqlalchemy.cast(_TRIALS.c.state, sqlalchemy.String(16))
                            == TrialState.RUNNING.name,
                            _HEARTBEATS.c.trial_id.is_(None),
                        )
                    ).scalars()
                )

        silent = self.retrying("_get_stale_trial_ids", running_without_heartbeat)
        now = time.monotonic()
        # One storage serves several studies: forget only this study's trials that beat since.
        for key in [k for k in self._never_beat if k[0] == study_id and k[1] not in silent]:
            del self._never_beat[key]
        grace = (
            self.grace_period
            if self.grace_period is not None
            else 2 * (self.heartbeat_interval or 0)
        )
        orphaned = [
            t for t in silent if now - self._never_beat.setdefault((study_id, t), now) > grace
        ]
        return [*stale, *(t for t in orphaned if t not in stale)]

    def create_new_trial(
        self, study_id: int, template_trial: optuna.trial.FrozenTrial | None = None
    ) -> int:
        made = self._create_new_trial(study_id, template_trial)
        return self.get_trial_id_from_study_id_trial_number(study_id, made.number)

    def _create_new_trial(
        self, study_id: int, template_trial: optuna.trial.FrozenTrial | None = None
    ) -> optuna.trial.FrozenTrial:
        """As Optuna's, retried; a trial made from a template (enqueued, or a failed trial's
        retry) is created once even when a lost commit leaves its first attempt in doubt.

        Such a trial carries a one-off mark (system attr :data:`CREATION_MARK_ATTR`); every
        attempt, Optuna's own deadlock retries included, first looks in the study for a trial
        with that mark (:meth:`_get_prepared_new_trial`, inside the attempt's transaction,
        which holds the study's row lock). Without it, a second copy of a continuation leg
        would train the same configuration in the same folder. A fresh trial (``ask``) has no
        template: a copy made that way never beats and is failed as stale.
        """
        if template_trial is not None:
            template_trial = copy.copy(template_trial)
            template_trial.system_attrs = {
                **template_trial.system_attrs,
                CREATION_MARK_ATTR: uuid.uuid4().hex,
            }
        return self.retrying(
            "_create_new_trial", lambda: self._optuna_create_new_trial(study_id, template_trial)
        )

    def _get_prepared_new_trial(
        self, study_id: int, template_trial: optuna.trial.FrozenTrial | None, session: Any
    ) -> Any:
        mark = (
            None if template_trial is None else template_trial.system_attrs.get(CREATION_MARK_ATTR)
        )
        if mark is not None:
            made = session.execute(
                sqlalchemy.select(_TRIALS.c.trial_id, _TRIALS.c.number, _TRIALS.c.datetime_start)
                .join(_TRIAL_SYSTEM_ATTRS, _TRIAL_SYSTEM_ATTRS.c.trial_id == _TRIALS.c.trial_id)
                .where(
                    _TRIALS.c.study_id == study_id,
                    _TRIAL_SYSTEM_ATTRS.c.key == CREATION_MARK_ATTR,
                    _TRIAL_SYSTEM_ATTRS.c.value_json == json.dumps(mark),
                )
            ).one_or_none()
            if made is not None:  # an attempt whose answer was lost had made it
                # Optuna reads these three of the trial it made (to build the FrozenTrial).
                return SimpleNamespace(
                    trial_id=made.trial_id, number=made.number, datetime_start=made.datetime_start
                )
        return self._optuna_prepared_new_trial(study_id, template_trial, session)

    def set_trial_state_values(
        self, trial_id: int, state: TrialState, values: Sequence[float] | None = None
    ) -> bool:
        """As Optuna's, retried; a retry finds out whether a lost attempt had committed. A trial
        being failed is stamped first (:data:`FAILED_AT_ATTR`, :data:`RETRY_LIMIT_ATTR`).

        Only a connection lost during the commit leaves that in doubt: the change may be
        stored although the call failed. A "database is locked" (SQLite busy) error means the
        transaction did not commit, so its retry is an ordinary one: if another process popped
        the waiting trial meanwhile, this call answers False and Optuna pops the next.

        After a doubtful attempt the retry sees a finished trial (``UpdateFinishedTrialError``)
        or, for WAITING -> RUNNING, a trial no longer waiting (False). A finished trial that
        already has exactly the state and values asked for is this call's success (if another
        process finished it the same way, :class:`storage.trial_retry.RetryFailedTrial` still
        queues one retry only). A trial no longer waiting is never taken for this call's pop:
        another process may have popped it meanwhile, and two workers would train one trial in
        one folder. If it was this call's pop after all, the trial never beats, and
        :meth:`_get_stale_trial_ids` fails it after ``grace_period`` so that it is retried.
        """
        doubtful: list[bool] = []  # an attempt was lost in doubt
        if state == TrialState.FAIL:  # finished already: the state change below answers for it
            limit = getattr(self.get_heartbeat_stale_trial_callback(), "max_retry", None)
            with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
                self.set_trial_system_attr(trial_id, FAILED_AT_ATTR, time.time())
                if limit is not None:
                    self.set_trial_system_attr(trial_id, RETRY_LIMIT_ATTR, int(limit))

        def attempt() -> bool:
            try:
                changed = optuna.storages.RDBStorage.set_trial_state_values(
                    self, trial_id, state, values
                )
            except optuna.exceptions.UpdateFinishedTrialError:
                if doubtful and state.is_finished():
                    trial = self.get_trial(trial_id)
                    if trial.state == state and _same_values(trial.values, values):
                        return True
                raise
            except Exception as error:
                if is_transient(error) and not is_busy(error):
                    doubtful.append(True)
                raise
            return changed

        return self.retrying("set_trial_state_values", attempt)


for _name in RETRIED_METHODS:
    setattr(RetryingRDBStorage, _name, _retried(_name))
del _name
# Optuna's own stale-trial rule, retried, for RetryingRDBStorage._get_stale_trial_ids to extend.
setattr(RetryingRDBStorage, "_stale_by_heartbeat", _retried("_get_stale_trial_ids"))  # noqa: B010
# Optuna's own trial creation, which RetryingRDBStorage._create_new_trial and
# _get_prepared_new_trial extend (Optuna 5's RDBStorage internals, as every retried method above;
# tests/test_storage_faults.py checks them against a commit whose answer is lost).
for _alias, _name in (
    ("_optuna_create_new_trial", "_create_new_trial"),
    ("_optuna_prepared_new_trial", "_get_prepared_new_trial"),
):
    setattr(RetryingRDBStorage, _alias, getattr(optuna.storages.RDBStorage, _name))
del _alias, _name
