"""storage.claims: keys taken exactly once, on a real SQLite file and a real PostgreSQL database.

Each thread gets its own engine and owner, as separate worker processes would, and a barrier
lines them up so that they really race.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import wait_until_a_zombie

from storage.claims import (
    CLAIMS,
    Claims,
    default_owner,
    owner_alive,
    owner_gone,
    owner_host,
)
from storage.urls import SQLITE_TIMEOUT_S

THREADS = 16


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database of the backend: a SQLite file in WAL mode, or a PostgreSQL database."""
    if request.param == "postgres":
        return request.getfixturevalue("postgres_db_url")
    path = tmp_path / "claims.db"
    with sqlite3.connect(path) as conn:  # as storage.urls.open_storage prepares it
        conn.execute("PRAGMA journal_mode=WAL")
    return f"sqlite:///{path}"


@pytest.fixture
def new_engine(url: str) -> Iterator[Callable[[], sa.Engine]]:
    """Makes engines on ``url`` (one per simulated worker); all disposed after the test."""
    engines: list[sa.Engine] = []

    def make() -> sa.Engine:
        kwargs = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}} if url.startswith("sqlite") else {}
        engine = sa.create_engine(url, **kwargs)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.dispose()


def race(count: int, work: Callable[[int], object]) -> list[object]:
    """Run ``work(i)`` in ``count`` threads released at the same instant; re-raise any error."""
    barrier = threading.Barrier(count)
    results: list[object] = [None] * count
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait(timeout=60)
            results[i] = work(i)
        except BaseException as error:  # noqa: BLE001 - reported below, in the test's thread
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "a thread hung"
    if errors:
        raise errors[0]
    return results


def owners(engine: sa.Engine) -> dict[str, str]:
    with engine.connect() as conn:
        return dict(conn.execute(sa.select(CLAIMS.c.key, CLAIMS.c.owner)).all())


def test_one_of_many_threads_takes_a_key(new_engine):
    Claims(new_engine())  # the table exists; the race is on the row alone
    workers = [Claims(new_engine(), owner=f"worker-{i}") for i in range(THREADS)]
    won = race(THREADS, lambda i: workers[i].take("study.screen/slot/0"))
    assert won.count(True) == 1 and won.count(False) == THREADS - 1, won
    winner = won.index(True)
    assert owners(new_engine()) == {"study.screen/slot/0": f"worker-{winner}"}


def test_many_keys_each_go_to_exactly_one_thread(new_engine):
    Claims(new_engine())
    workers = [Claims(new_engine(), owner=f"worker-{i}") for i in range(THREADS)]
    keys = [f"study.promote/waiting/{n}" for n in range(5)]
    taken = race(THREADS, lambda i: [k for k in keys if workers[i].take(k)])
    flat = [k for mine in taken for k in mine]
    assert sorted(flat) == sorted(keys)  # every key once, none twice
    stored = owners(new_engine())
    for i, mine in enumerate(taken):
        assert all(stored[k] == f"worker-{i}" for k in mine)


def test_release_lets_the_key_be_taken_again(new_engine):
    engine = new_engine()
    first, second = Claims(engine, owner="first"), Claims(engine, owner="second")
    assert first.take("study.promote/enqueue")
    assert not second.take("study.promote/enqueue")
    assert not first.take("study.promote/enqueue")  # not even by its owner: once means once
    first.release("study.promote/enqueue")
    assert first.taken("study.promote/") == []
    assert second.take("study.promote/enqueue")
    assert owners(engine) == {"study.promote/enqueue": "second"}
    second.release("never/taken")  # releasing a free key is a no-op
    assert second.taken("") == ["study.promote/enqueue"]


def test_taken_lists_the_keys_under_a_prefix(new_engine):
    claims = Claims(new_engine())
    keys = [
        "qs.screen/slot/0",
        "qs.screen/slot/1",
        "qs.screen/slot/10",
        "qs.screen/waiting/3",
        "qs.screen/baseline",
        "qs.screenx/slot/0",
        "other.screen/slot/0",
    ]
    for key in keys:
        assert claims.take(key)
    assert sorted(claims.taken("qs.screen/slot/")) == [
        "qs.screen/slot/0",
        "qs.screen/slot/1",
        "qs.screen/slot/10",
    ]
    assert claims.taken("qs.screen/waiting/") == ["qs.screen/waiting/3"]
    assert claims.taken("qs.promote/") == []
    assert sorted(claims.taken("")) == sorted(keys)
    # Another Claims on the same database (another worker) sees the same keys.
    assert sorted(Claims(new_engine()).taken("qs.")) == sorted(k for k in keys if k[:3] == "qs.")


def test_release_all_frees_the_keys_under_a_prefix_only(new_engine):
    claims = Claims(new_engine())
    for key in ("qs.screen/slot/0", "qs.screen/slot/1", "qs.screen/baseline", "qs.final/enqueue"):
        assert claims.take(key)
    assert claims.release_all("qs.screen/slot/") == 2
    assert sorted(claims.taken("qs.")) == ["qs.final/enqueue", "qs.screen/baseline"]
    assert claims.release_all("qs.screen/slot/") == 0
    assert claims.take("qs.screen/slot/0")


def test_taken_treats_the_prefix_literally(new_engine):
    claims = Claims(new_engine())
    assert claims.take("mnistXautoencoder.screen/slot/0")
    assert claims.take("a100.screen/slot/0")
    assert claims.taken("mnist_autoencoder.screen/slot/") == []
    assert claims.taken("a%.screen/slot/") == []
    # Worse when giving keys back: another study's claims would be freed.
    assert claims.release_all("mnist_autoencoder.screen/slot/") == 0
    assert claims.taken("mnistX") == ["mnistXautoencoder.screen/slot/0"]


def test_tables_created_by_many_threads_at_once_on_an_empty_database(new_engine, url):
    engines = [new_engine() for _ in range(8)]
    created = race(len(engines), lambda i: Claims(engines[i], owner=f"worker-{i}"))
    assert sa.inspect(engines[0]).has_table(CLAIMS.name)
    won = race(len(created), lambda i: created[i].take("study.final/enqueue"))
    assert won.count(True) == 1, won
    # Creating it again on the existing table is quiet and keeps the rows.
    assert Claims(new_engine()).taken("study.") == ["study.final/enqueue"]


def test_default_owner_names_this_host_process_and_pid_namespace():
    namespace = "".join(c for c in os.readlink("/proc/self/ns/pid") if c.isdigit())
    assert default_owner() == f"{socket.gethostname()}:{os.getpid()}/{namespace}"
    assert owner_host(default_owner()) == socket.gethostname()


def test_release_own_only_leaves_another_owners_claim(new_engine) -> None:
    first, second = Claims(new_engine(), owner="first"), Claims(new_engine(), owner="second")
    assert first.take("k")
    second.release("k", own_only=True)
    assert first.holder("k")[0] == "first"
    first.release("k", own_only=True)
    assert first.holder("k") is None


def test_release_if_taken_at_frees_only_the_claim_seen_then(new_engine) -> None:
    claims = Claims(new_engine(), owner="a")
    assert claims.take("k")
    stamp = claims.taken_at("k")["k"]
    assert claims.release_if_taken_at("k", stamp - 1.0) is False  # taken again since
    assert claims.taken("k") == ["k"]
    assert claims.release_if_taken_at("k", stamp) is True
    assert claims.taken("k") == []
    assert claims.release_if_taken_at("k", stamp) is False  # nothing left to release


def test_a_dead_process_of_this_machine_and_namespace_is_gone() -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=30)
    host_pid, _, namespace = default_owner().partition("/")
    owner = f"{host_pid.partition(':')[0]}:{dead.pid}/{namespace}"
    assert owner_gone(owner)
    assert not owner_gone(default_owner())


def test_a_zombie_or_a_process_started_after_the_claim_is_not_its_taker() -> None:
    """An exited process not reaped yet (its parent, a launcher, waits on another worker) is
    gone; so is the process behind a pid that started after the claim was taken (the pid was
    reused). Either taken for alive would keep a dead taker's claim forever."""
    host_pid, _, namespace = default_owner().partition("/")

    def owner_of(pid: int) -> str:
        return f"{host_pid.partition(':')[0]}:{pid}/{namespace}"

    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        wait_until_a_zombie(zombie.pid)
        assert owner_gone(owner_of(zombie.pid)) and not owner_alive(owner_of(zombie.pid))
    finally:
        zombie.wait(timeout=30)
    later = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        before_it = time.time() - 60  # a claim taken before this process started
        assert owner_gone(owner_of(later.pid), before_it)
        assert not owner_alive(owner_of(later.pid), before_it)
        assert owner_alive(owner_of(later.pid), time.time())  # started before: its taker
        assert not owner_gone(owner_of(later.pid), time.time())
    finally:
        later.kill()
        later.wait(timeout=30)


@pytest.mark.postgres
def test_a_password_in_the_query_stays_out_of_the_claims_messages(postgres_db_url: str) -> None:
    """The target named in retry warnings and StorageUnavailableError: libpq reads
    ``?password=`` as readily as ``user:password@`` (the server trusts it and ignores it here)."""
    engine = sa.create_engine(f"{postgres_db_url}?password=hunter2")
    try:
        claims = Claims(engine)
        assert "hunter2" not in claims.target and "password=***" in claims.target
        assert claims.take("k")
    finally:
        engine.dispose()
