"""Exactly-once coordination through the study database itself.

A claim is a row with a unique key in a small table beside Optuna's: inserting it succeeds for
exactly one process, on SQLite and PostgreSQL alike, however many workers race. The stages use
claims to enqueue promotions once, to hand each waiting trial to one worker, and to hand out the
screen's trial slots, so no head process is needed.
"""

from __future__ import annotations

import os
import random
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

from storage.retry import retry_call, retry_seconds_for
from storage.urls import redact

T = TypeVar("T")
_METADATA = sa.MetaData()
CLAIMS = sa.Table(
    "ssl_search_claims",
    _METADATA,
    sa.Column("key", sa.String(512), primary_key=True),
    sa.Column("owner", sa.String(256), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
)


def _pid_namespace() -> str:
    """This process's PID namespace (Linux: the inode of /proc/self/ns/pid), "" where unknown:
    containers on one host may share its name but not its process ids."""
    try:
        return "".join(c for c in os.readlink("/proc/self/ns/pid") if c.isdigit())
    except OSError:
        return ""


def default_owner() -> str:
    """``host:pid``, then ``/<pid namespace>`` where known: the process taking a claim."""
    namespace = _pid_namespace()
    return f"{socket.gethostname()}:{os.getpid()}" + (f"/{namespace}" if namespace else "")


def this_machine() -> str:
    """``host/<pid namespace>``: where a pid of this process means this process."""
    return f"{socket.gethostname()}/{_pid_namespace()}"


def owner_host(owner: str) -> str:
    """The machine named by an owner (:func:`default_owner`): the part before the first ``:``."""
    return owner.partition(":")[0]


def process_alive(pid: int, started_by: float | None = None) -> bool:
    """Whether process ``pid`` of this machine runs (another user's counts as running). An
    exited process its parent has not reaped yet (a zombie) does not; with ``started_by`` (a
    ``time.time()``), neither does one that started after it: the pid was reused since, by
    another process (a reboot, a busy machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    fields = _proc_stat(pid)
    if fields is None:
        return True  # no /proc here: the signal's word
    if fields[0] == "Z":
        return False
    started = _started_at(fields)
    return started_by is None or started is None or started <= started_by + _START_SLACK_S


_START_SLACK_S = 1.0  # /proc/stat's boot time is in whole seconds


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name, from the state on; None
    where there is none."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rpartition(")")[2].split()


def _started_at(fields: list[str]) -> float | None:
    """When the process of these ``/proc/<pid>/stat`` fields started (``time.time()``)."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
        boot = next(float(line.split()[1]) for line in lines if line.startswith("btime "))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, StopIteration, IndexError, ValueError):
        return None


def owner_pid(owner: str) -> int | None:
    """The process id named by an owner (:func:`default_owner`); None if it names none."""
    pid = owner.partition(":")[2].partition("/")[0]
    return int(pid) if pid.isdigit() else None


def _pid_here(owner: str) -> int | None:
    """The process id named by ``owner`` if it names a process of this machine and PID
    namespace (where a pid means a process we can look at); None otherwise."""
    pid, here = owner_pid(owner), _pid_namespace()
    local = owner_host(owner) == socket.gethostname() and bool(here)
    return pid if local and owner.partition("/")[2] == here else None


def owner_gone(owner: str, taken_at: float | None = None) -> bool:
    """Whether the process named by a claim's ``owner`` (:func:`default_owner`) is known to be
    gone: it ran on this machine, in this PID namespace, and no longer runs (or its pid is
    another process's, started after the claim was taken at ``taken_at``). One on another
    machine or in another container, or named without its namespace: not known."""
    pid = _pid_here(owner)
    return pid is not None and not process_alive(pid, taken_at)


def owner_alive(owner: str, taken_at: float | None = None) -> bool:
    """Whether the process named by ``owner`` is known to run: one of this machine, in this
    PID namespace, that still runs (and started before its claim was taken at ``taken_at``);
    not known for any other."""
    pid = _pid_here(owner)
    return pid is not None and process_alive(pid, taken_at)


class Claims:
    """Unique keys taken at most once, stored in the study database.

    Each operation rides out transient database faults like the study storage does (see
    :mod:`storage.retry`), for ``retry_seconds`` (default: that of the storage owning
    ``engine``).
    """

    def __init__(
        self, engine: sa.Engine, owner: str | None = None, retry_seconds: float | None = None
    ) -> None:
        self.engine = engine
        self.owner = owner or default_owner()
        self.retry_seconds = retry_seconds_for(engine) if retry_seconds is None else retry_seconds
        # Masked by the storage URLs' rule: a ?password= in the query too, not only user:pw@.
        self.target = redact(engine.url.render_as_string(hide_password=False))
        for attempt in range(10):
            try:
                self._retry(
                    "create claims table", lambda: _METADATA.create_all(engine, checkfirst=True)
                )
                break
            except (IntegrityError, OperationalError, ProgrammingError):
                # Another process created the table between our check and our CREATE.
                if attempt == 9:
                    raise
                time.sleep(0.1 + random.random() * 0.3)

    def _retry(self, what: str, fn: Callable[[], T]) -> T:
        return retry_call(fn, target=self.target, what=what, seconds=self.retry_seconds)

    def take(self, key: str) -> bool:
        """True for the one caller that inserts ``key`` first; False for everyone after.

        A duplicate key is never retried. If a retry meets the row a lost attempt did commit
        (same owner, same timestamp), the key is this caller's.
        """
        stamp = time.time()
        attempts = 0

        def attempt() -> bool:
            nonlocal attempts
            attempts += 1
            try:
                with self.engine.begin() as conn:
                    conn.execute(
                        CLAIMS.insert().values(key=key, owner=self.owner, created_at=stamp)
                    )
                return True
            except IntegrityError:
                if attempts == 1:
                    return False
                with self.engine.connect() as conn:
                    row = conn.execute(
                        sa.select(CLAIMS.c.owner, CLAIMS.c.created_at).where(CLAIMS.c.key == key)
                    ).first()
                return row is not None and row[0] == self.owner and row[1] == stamp

        return self._retry("take claim", attempt)

    def release(self, key: str, own_only: bool = False) -> None:
        """Give ``key`` back, e.g. when the work it guarded could not be done; ``own_only``: only
        if this owner holds it (a take interrupted mid-way may or may not have)."""

        def attempt() -> None:
            where = CLAIMS.c.key == key
            if own_only:
                where = where & (CLAIMS.c.owner == self.owner)
            with self.engine.begin() as conn:
                conn.execute(CLAIMS.delete().where(where))

        self._retry("release claim", attempt)

    def release_if_taken_at(self, key: str, taken_at: float) -> bool:
        """Give ``key`` back only if it is still the claim taken at ``taken_at`` (as
        :meth:`taken_at` showed it), not one someone took again since; whether it was."""

        def attempt() -> bool:
            with self.engine.begin() as conn:
                return (
                    conn.execute(
                        CLAIMS.delete().where(
                            (CLAIMS.c.key == key) & (CLAIMS.c.created_at == taken_at)
                        )
                    ).rowcount
                    > 0
                )

        return self._retry("release claim", attempt)

    def release_all(self, prefix: str) -> int:
        """Give back every key that starts with ``prefix``; how many there were."""

        def attempt() -> int:
            with self.engine.begin() as conn:
                return conn.execute(
                    CLAIMS.delete().where(CLAIMS.c.key.startswith(prefix, autoescape=True))
                ).rowcount

        return self._retry("release claims", attempt)

    def holder(self, key: str) -> tuple[str, float] | None:
        """(owner, when it was taken) of claim ``key``; None when no one holds it."""

        def attempt() -> tuple[str, float] | None:
            with self.engine.connect() as conn:
                row = conn.execute(
                    sa.select(CLAIMS.c.owner, CLAIMS.c.created_at).where(CLAIMS.c.key == key)
                ).first()
                return None if row is None else (str(row[0]), float(row[1]))

        return self._retry("read claim", attempt)

    def holds(self, key: str) -> bool:
        """Whether this owner holds claim ``key`` (not someone who took it back meanwhile)."""
        holder = self.holder(key)
        return holder is not None and holder[0] == self.owner

    def taken(self, prefix: str) -> list[str]:
        """Keys already taken that start with ``prefix``."""
        return list(self.taken_at(prefix))

    def taken_at(self, prefix: str) -> dict[str, float]:
        """Keys already taken that start with ``prefix``, with when (``time.time()`` of the
        taker's machine) each was taken."""

        def attempt() -> dict[str, float]:
            with self.engine.connect() as conn:
                rows = conn.execute(
                    sa.select(CLAIMS.c.key, CLAIMS.c.created_at).where(
                        CLAIMS.c.key.startswith(prefix, autoescape=True)
                    )
                )
                return {r[0]: float(r[1]) for r in rows}

        return self._retry("list claims", attempt)
