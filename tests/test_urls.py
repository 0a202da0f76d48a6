"""storage.urls: parsing storage URLs, refusing unsupported ones, never showing a password."""

from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path

import optuna
import pytest
from sqlalchemy.engine import make_url

from models.errors import UsageError
from search.config import load_config
from storage.urls import (
    SUPPORTED,
    StorageError,
    check_url,
    folder_problem,
    open_storage,
    redact,
)

SECRET = "s3cret"


# ---- parsing -------------------------------------------------------------------------------


def test_postgres_url_is_parsed_into_its_parts():
    parsed = check_url(f"postgresql+psycopg://alice:{SECRET}@db.example:6543/studies")
    assert parsed.get_backend_name() == "postgresql"
    assert parsed.drivername == "postgresql+psycopg"
    assert (parsed.username, parsed.password) == ("alice", SECRET)
    assert (parsed.host, parsed.port, parsed.database) == ("db.example", 6543, "studies")
    assert SECRET not in str(parsed)  # printing the parsed URL hides the password too


def test_supported_backends_are_sqlite_and_postgresql():
    assert set(SUPPORTED) == {"sqlite", "postgresql"}
    assert issubclass(StorageError, ValueError)


@pytest.mark.parametrize(
    "url,backend",
    [
        (f"mysql://bob:{SECRET}@h/db", "mysql"),
        (f"mysql+pymysql://bob:{SECRET}@h:3306/db", "mysql"),
        (f"mssql+pyodbc://bob:{SECRET}@h/db", "mssql"),
        (f"oracle://bob:{SECRET}@h/db", "oracle"),
        ("redis://localhost:6379/0", "redis"),
    ],
)
def test_unsupported_backends_are_refused_by_name(url, backend):
    with pytest.raises(StorageError) as raised:
        check_url(url)
    message = str(raised.value)
    assert message.startswith("storage: unsupported database")
    assert repr(backend) in message and "allowed: sqlite, postgresql" in message
    assert SECRET not in message and "\n" not in message


def test_unknown_driver_of_a_supported_backend_is_refused():
    with pytest.raises(StorageError, match=r"no driver for 'postgresql\+nosuch'") as raised:
        check_url(f"postgresql+nosuch://bob:{SECRET}@h/db")
    assert SECRET not in str(raised.value)
    assert "bob:***@h" in str(raised.value)


@pytest.mark.parametrize(
    "url",
    ["", "not a url", f"postgresql+psycopg://alice:{SECRET}@db:port/x"],
)
def test_unparsable_urls_are_refused_with_an_example_and_no_password(url):
    with pytest.raises(StorageError, match="^storage: cannot parse") as raised:
        check_url(url)
    message = str(raised.value)
    assert "sqlite:///runs/ssl-search.db" in message  # shows what a good one looks like
    assert SECRET not in message


# ---- hiding passwords ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "url,expected",
    [
        (
            f"postgresql+psycopg://alice:{SECRET}@db.example:5432/studies",
            "postgresql+psycopg://alice:***@db.example:5432/studies",
        ),
        (f"postgresql+psycopg://alice:{SECRET}@db/x", "postgresql+psycopg://alice:***@db/x"),
        (f"postgresql://:{SECRET}@db/x", "postgresql://:***@db/x"),  # password, no user
        # Percent-encoded characters in the password (here '@' and ':').
        ("postgresql+psycopg://alice:p%40ss%3Aw0rd@db/x", "postgresql+psycopg://alice:***@db/x"),
        (f"mysql://bob:{SECRET}@h/db", "mysql://bob:***@h/db"),  # any backend, even refused ones
        # A Unix socket given in the query keeps its path.
        (
            f"postgresql+psycopg://alice:{SECRET}@/x?host=/run/postgresql",
            "postgresql+psycopg://alice:***@/x?host=%2Frun%2Fpostgresql",
        ),
    ],
)
def test_redact_masks_the_password(url, expected):
    shown = redact(url)
    assert shown == expected
    for secret in (SECRET, "p%40ss", "p@ss", "w0rd"):
        assert secret not in shown
    assert make_url(shown).password == "***"  # still a URL, with the mask as its password


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+psycopg://postgres@127.0.0.1:5432/test",
        "postgresql+psycopg://db.example/studies",
        "sqlite:///runs/ssl-search.db",
        "sqlite:////abs/path/ssl-search.db",
    ],
)
def test_redact_leaves_urls_without_a_password_alone(url):
    assert redact(url) == url


@pytest.mark.parametrize(
    "url",
    [
        "",
        "not a url",
        f"postgresql+psycopg://alice:{SECRET}@db:port/x",
        f"sqlite:/alice:{SECRET}@x.db",  # looks like SQLite, but could hold a password
        f"sqlite:/x.db?token={SECRET}",
    ],
)
def test_redact_of_an_unparsable_url_shows_nothing_of_it(url):
    assert redact(url) == "<unparsable storage URL>"


def test_an_unparsable_sqlite_url_is_shown_back_since_it_cannot_hold_a_password():
    with pytest.raises(StorageError, match="^storage: cannot parse 'sqlite:/runs/x.db'; "):
        check_url("sqlite:/runs/x.db")  # one slash short of sqlite:///runs/x.db


def test_redact_masks_a_password_given_as_a_query_parameter():
    shown = redact(f"postgresql+psycopg://alice@db/x?password={SECRET}&sslmode=require")
    assert SECRET not in shown
    assert "sslmode=require" in shown


def test_errors_about_a_url_never_show_its_password(tmp_path):
    # Port 1 on the loopback refuses at once: a mistyped port as likely as a restart, so it is
    # refused at once (not waited for) in one line naming the URL, masked, with what to check.
    import time

    started = time.monotonic()
    with pytest.raises(StorageError, match="^storage: cannot connect to") as raised:
        open_storage(f"postgresql+psycopg://alice:{SECRET}@127.0.0.1:1/nowhere", retry_seconds=30)
    assert time.monotonic() - started < 10
    message = str(raised.value)
    assert SECRET not in message and "alice:***@127.0.0.1:1/nowhere" in message
    assert "\n" not in message and message.endswith(
        "check the host and port (if the server is restarting, run again once it is up)"
    )


def test_a_server_that_says_it_is_starting_up_is_waited_for_and_a_refusal_is_not():
    """What PostgreSQL answers while it restarts, against a wrong URL's errors."""
    import sqlalchemy.exc

    from storage.urls import _restarting

    def error(text: str) -> sqlalchemy.exc.OperationalError:
        return sqlalchemy.exc.OperationalError("connect", None, Exception(text))

    assert _restarting(error("FATAL:  the database system is starting up"))
    assert _restarting(error("FATAL:  the database system is shutting down"))
    assert not _restarting(error('FATAL:  password authentication failed for user "alice"'))
    assert not _restarting(error('FATAL:  database "nowhere" does not exist'))
    assert not _restarting(error("connection failed: ... port 1 failed: Connection refused"))
    assert not _restarting(ValueError("the database system is starting up"))  # not the driver's


@pytest.mark.postgres
def test_a_login_the_server_refuses_is_a_wrong_url_at_once(postgres_db_url):
    """A server that answers and refuses (an unknown role, here) is a wrong URL: refused at
    once, in one line, password masked; not waited for as a restart would be."""
    import time

    url = make_url(postgres_db_url).set(username="nobody_here", password=SECRET)
    started = time.monotonic()
    with pytest.raises(StorageError, match="^storage: cannot connect to") as raised:
        open_storage(url.render_as_string(hide_password=False), retry_seconds=30)
    assert time.monotonic() - started < 10
    message = str(raised.value)
    assert SECRET not in message and "nobody_here:***@" in message and "\n" not in message


# ---- SQLite paths --------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:"])
def test_in_memory_sqlite_is_refused(url):
    with pytest.raises(StorageError, match="in-memory SQLite database cannot be shared"):
        check_url(url)


def test_sqlite_relative_and_absolute_paths(tmp_path):
    assert check_url("sqlite:///runs/ssl-search.db").database == "runs/ssl-search.db"
    absolute = tmp_path / "a" / "b.db"
    assert check_url(f"sqlite:///{absolute}").database == str(absolute)
    assert str(absolute).startswith("/")  # so the URL above had four slashes


def test_checking_a_sqlite_url_creates_nothing(tmp_path):
    deep = tmp_path / "not" / "yet" / "there" / "study.db"
    check_url(f"sqlite:///{deep}")  # a missing folder is fine: opening will create it
    assert not (tmp_path / "not").exists()


def test_sqlite_under_a_file_is_refused(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(StorageError, match="cannot create a database under"):
        check_url(f"sqlite:///{blocker / 'sub' / 'study.db'}")


def test_opening_sqlite_creates_the_folders_in_wal_mode(tmp_path):
    path = tmp_path / "new" / "folder" / "study.db"
    storage = open_storage(f"sqlite:///{path}", heartbeat_interval=5, grace_period=30)
    assert path.is_file()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert storage.get_heartbeat_interval() == 5
    study = optuna.create_study(storage=storage, study_name="s")
    assert optuna.load_study(study_name="s", storage=f"sqlite:///{path}")._study_id == (
        study._study_id
    )
    storage.engine.dispose()


def test_a_sqlite_file_under_the_home_folder_is_opened_there(tmp_path, monkeypatch):
    """sqlite:///~/x.db is the file in the home folder that check_url checked (as runs_dir=~/x
    is that folder), not one in a folder named "~" of the working directory."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    storage = open_storage("sqlite:///~/runs/study.db")
    optuna.create_study(storage=storage, study_name="s")
    storage.engine.dispose()
    assert (tmp_path / "home" / "runs" / "study.db").is_file()
    assert not (tmp_path / "~").exists()
    home = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path}/home/runs/study.db")
    assert home.study_name == "s"


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def test_several_openers_at_once_on_an_empty_database(backend, tmp_path: Path, request):
    """Workers starting together all create Optuna's schema; every one of them succeeds."""
    url = (
        request.getfixturevalue("postgres_db_url")
        if backend == "postgres"
        else f"sqlite:///{tmp_path / 'empty.db'}"
    )
    count = 4
    barrier = threading.Barrier(count)
    opened: list[optuna.storages.RDBStorage] = []
    errors: list[BaseException] = []

    def open_one() -> None:
        try:
            barrier.wait(timeout=60)
            opened.append(open_storage(url))
        except BaseException as error:  # noqa: BLE001 - reported in the test's thread
            errors.append(error)

    threads = [threading.Thread(target=open_one) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    try:
        assert not errors, errors
        assert len(opened) == count
        optuna.create_study(storage=opened[0], study_name="shared")
        assert [s.study_name for s in optuna.get_all_study_summaries(opened[-1])] == ["shared"]
    finally:
        for storage in opened:
            storage.engine.dispose()


def test_folder_problems_are_said_not_raised(tmp_path):
    """A symlink loop, a file in the way or a folder this user cannot write: each in words
    (the callers make one line of it), never a traceback."""
    loop = tmp_path / "loop"
    loop.symlink_to(tmp_path / "back")
    (tmp_path / "back").symlink_to(loop)
    assert "cannot follow it" in folder_problem(loop / "runs")
    with pytest.raises(StorageError, match="cannot create a database under .*cannot follow it"):
        check_url(f"sqlite:///{loop / 'study.db'}")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert folder_problem(blocker / "a" / "b") == f"{blocker} is not a folder"
    assert folder_problem(tmp_path / "new" / "deep") is None
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert folder_problem(locked / "runs") == f"{locked} is not writable"


def test_a_study_with_a_runs_dir_through_a_symlink_loop_is_one_line(tmp_path):
    loop = tmp_path / "loop"
    loop.symlink_to(tmp_path / "back")
    (tmp_path / "back").symlink_to(loop)
    for setting in ("runs_dir", "checkpoints_dir", "artifacts_dir"):
        overrides = [f"runs_dir={tmp_path / 'runs'}", f"{setting}={loop / 'x'}"]
        with pytest.raises(UsageError) as caught:
            load_config("quickstart", overrides)
        message = str(caught.value)
        assert "cannot follow it" in message and "\n" not in message, message


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+psycopg://me:pw@db:5432/studies?application_name=me%40laptop",
        "postgresql+psycopg://me:pw@db:5432/studies?application_name=me@laptop",
        "postgresql+psycopg://me:pw@db/x?sslrootcert=/home/me@corp/ca.pem",
    ],
)
def test_an_at_in_the_query_is_not_taken_for_one_in_the_password(url):
    """The check for an unencoded '@' in the password ends it before the query; masking a
    message stays the cautious way (to the last '@' on its line)."""
    from storage.urls import check_url, mask_secrets

    check_url(url)
    assert "pw" not in mask_secrets(url)


def test_a_sqlite_url_naming_a_folder_is_refused_before_anything_is_written(tmp_path):
    folder = tmp_path / "runs"
    folder.mkdir()
    with pytest.raises(StorageError, match=r"is a folder, not an SQLite database file"):
        open_storage(f"sqlite:///{folder}")
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize("create", [True, False])
def test_a_file_that_is_not_a_sqlite_database_is_refused_and_left_as_it_was(tmp_path, create):
    notes = tmp_path / "notes.md"
    notes.write_text("# not a database\n" * 200)
    before = notes.read_bytes()
    with pytest.raises(StorageError, match=r"cannot open .*notes\.md as an SQLite database"):
        open_storage(f"sqlite:///{notes}", create=create)
    assert notes.read_bytes() == before


def test_the_unencoded_at_message_keeps_its_words_and_host_once_masked_for_showing():
    """A message is masked again when shown: the refusal must survive that whole."""
    from storage.urls import check_url, mask_secrets

    with pytest.raises(StorageError) as refused:
        check_url("postgresql+psycopg://postgres:se@cret@127.0.0.1:5432/db")
    shown = mask_secrets(str(refused.value))
    assert "unencoded '@'" in shown and "percent-encode it (%40)" in shown, shown
    assert "127.0.0.1:5432/db" in shown, shown
    assert "cret" not in shown and "se@" not in shown, shown


@pytest.mark.parametrize(
    "path,url",
    [
        ("runs/ssl-search.db", "sqlite:///runs/ssl-search.db"),
        ("/data/studies.sqlite", "sqlite:////data/studies.sqlite"),
        ("x.db", "sqlite:///x.db"),
    ],
)
def test_a_file_path_given_as_storage_is_shown_back_with_the_url_to_write(path, url):
    """A path cannot hold a password, so the refusal names it (not '<unparsable ...>') and
    the URL that means it."""
    with pytest.raises(StorageError) as refused:
        check_url(path)
    message = str(refused.value)
    assert message.startswith(f"storage: {path!r} is a file path, not a URL; "), message
    assert f"write an SQLite file as {url} " in message and "\n" not in message


@pytest.mark.parametrize("text", ["me:pw@db/x", "db?password=pw", "x.db:pw"])
def test_what_could_hold_a_password_is_not_read_as_a_path(text):
    with pytest.raises(StorageError, match="^storage: cannot parse '<unparsable storage URL>'"):
        check_url(text)


def test_sqlite_file_is_the_path_without_the_query_home_or_uri_wrapping(tmp_path, monkeypatch):
    from storage.urls import sqlite_file

    monkeypatch.setenv("HOME", str(tmp_path))
    assert sqlite_file("sqlite:///runs/x.db?mode=ro") == Path("runs/x.db")
    assert sqlite_file("sqlite:////abs/x.db") == Path("/abs/x.db")
    assert sqlite_file("sqlite:///~/x.db") == tmp_path / "x.db"
    assert sqlite_file("sqlite:///file:runs/x.db?mode=ro&uri=true") == Path("runs/x.db")
    assert sqlite_file("sqlite:///file:/abs/x.db?uri=true") == Path("/abs/x.db")
    assert sqlite_file("sqlite:///file:x.db") == Path("file:x.db")  # no uri=true: a file name
    assert sqlite_file("postgresql+psycopg://db/x") is None
    assert sqlite_file("not a url") is None


def test_an_existing_database_is_found_whatever_the_url_adds_to_its_path(tmp_path, monkeypatch):
    """Opening existing storage (report, status, worker, give_up) used to cut the path out of
    the URL by hand: '?mode=ro' became part of the file name ('no database at x.db?mode=ro')
    while a run opened the same URL. Every reader now asks storage for the file."""
    from reporting.store import open_existing_storage

    monkeypatch.setenv("HOME", str(tmp_path))
    path = tmp_path / "runs" / "x.db"
    optuna.create_study(storage=open_storage(f"sqlite:///{path}"), study_name="s")
    for url in (
        f"sqlite:///{path}?mode=ro",
        "sqlite:///~/runs/x.db",
        f"sqlite:///file:{path}?mode=ro&uri=true",
    ):
        storage = open_existing_storage(url)
        assert [s.study_name for s in storage.get_all_studies()] == ["s"], url
        storage.engine.dispose()
    with pytest.raises(StorageError) as missing:
        open_existing_storage(f"sqlite:///{tmp_path / 'other.db'}?mode=ro")
    assert str(missing.value).startswith(f"storage: no database at {tmp_path / 'other.db'}; ")
    assert not (tmp_path / "other.db").exists()


def test_an_sqlite_uri_names_the_file_sqlite_opens(tmp_path, monkeypatch):
    """With uri=true the database is an SQLite URI: the file checked and put in WAL mode is
    the one SQLite opens, not a file literally named 'file:...'."""
    monkeypatch.chdir(tmp_path)
    storage = open_storage("sqlite:///file:runs/u.db?uri=true")
    optuna.create_study(storage=storage, study_name="s")
    storage.engine.dispose()
    assert sorted(p.name for p in (tmp_path / "runs").iterdir() if p.suffix == ".db") == ["u.db"]
    assert not any("file:" in p.name for p in tmp_path.rglob("*"))
    with sqlite3.connect(tmp_path / "runs" / "u.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with pytest.raises(StorageError, match="in-memory SQLite database cannot be shared"):
        check_url("sqlite:///file::memory:?uri=true")


@pytest.mark.skipif(not Path("/sys").is_dir(), reason="needs Linux's /sys")
def test_a_folder_whose_permissions_say_yes_but_refuses_writes_is_said(tmp_path):
    """Root passes every permission check, yet /sys (like an NFS export that squashes root)
    refuses new entries: found before a study starts, not at its first checkpoint. The check
    leaves nothing behind where writes succeed."""
    problem = folder_problem("/sys/ssl-search/checkpoints")
    assert problem is not None and problem.startswith("/sys is not writable"), problem
    with pytest.raises(StorageError, match="^storage: cannot create a database under /sys/x: "):
        check_url("sqlite:////sys/x/study.db")
    (tmp_path / "kept").write_text("")
    assert folder_problem(tmp_path / "new" / "deep") is None
    assert folder_problem(tmp_path) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]


@pytest.mark.skipif(not Path("/sys").is_dir(), reason="needs Linux's /sys")
def test_a_study_whose_checkpoints_dir_refuses_writes_is_refused_before_it_starts(tmp_path):
    runs = tmp_path / "runs"
    with pytest.raises(UsageError) as caught:
        load_config("quickstart", [f"runs_dir={runs}", "checkpoints_dir=/sys/ssl-search/ck"])
    message = str(caught.value)
    assert message.startswith("checkpoints_dir: cannot make the folder /sys/ssl-search/ck: "), (
        message
    )
    assert "/sys is not writable" in message and "\n" not in message
    assert not runs.exists()
