"""Storage URLs: checking them, hiding passwords, and opening Optuna's RDB storage safely.

SQLite (the default, one file under ``runs/``) is put in WAL mode with a long busy timeout so
several local workers can share it; PostgreSQL (``postgresql+psycopg://``) is the choice when
workers run on several machines. Opening retries table creation, because several processes
creating Optuna's schema on an empty database at the same instant collide.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import sqlalchemy
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DatabaseError, NoSuchModuleError, SQLAlchemyError

if TYPE_CHECKING:
    import optuna

SUPPORTED = ("sqlite", "postgresql")
SQLITE_TIMEOUT_S = 120


class StorageError(ValueError):
    """The storage URL cannot be used; the message is one line and never shows a password."""


class StorageUnavailableError(RuntimeError):
    """The storage stayed unreachable or locked past the retry bound (see ``storage.retry``).

    Not a bad URL (that is :class:`StorageError`): the database was there and went away, e.g. a
    PostgreSQL server that did not come back, or a SQLite file another process kept locked. The
    message is one line: the storage (password masked), the operation, how long it was retried,
    and the first line of the last database error.
    """

    def __init__(
        self,
        message: str,
        *,
        target: str = "",
        operation: str = "",
        seconds: float = 0.0,
        reason: str = "",
    ) -> None:
        super().__init__(message)
        self.target = target
        self.operation = operation
        self.seconds = seconds
        self.reason = reason


# Query parameters that carry a secret (matched case-insensitively): a name containing one of
# these words, or ending in "key" (``api_key``, ``sslkey``, ``private_key``). libpq reads
# ``password`` and ``sslpassword`` from the query as readily as from ``user:password@``.
SECRET_QUERY_WORDS = (
    "password",
    "passwd",
    "passphrase",
    "pwd",
    "secret",
    "token",
    "credential",
    "signature",  # X-Amz-Signature of a presigned URL
)
# Whole names that carry a secret: an Azure SAS token's signature.
SECRET_QUERY_NAMES = ("sig",)
MASK = "***"
# Rendered in place of a masked query value, then replaced by MASK: SQLAlchemy would otherwise
# percent-encode the asterisks (``%2A%2A%2A``).
_MASK_PLACEHOLDER = "MASKED0000000000000000"


def is_secret_query_key(key: str) -> bool:
    """Whether a URL query parameter named ``key`` holds a secret (its value is masked)."""
    name = key.strip().lower()
    return (
        any(word in name for word in SECRET_QUERY_WORDS)
        or name.endswith("key")
        or name in SECRET_QUERY_NAMES
    )


# "scheme://user:" where a password may follow: the user part holds no "/", "@" or "?", so a
# path such as sqlite:///runs/a:b.db never reads as one.
_USERINFO = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/@?:\s]*:")


def password_spans(text: str, *, url: bool = False) -> list[tuple[int, int]]:
    """Where the passwords of the URLs in ``text`` lie (start, end), read the cautious way:
    a password runs to the last ``@`` on its line before the next URL, so one holding an
    unencoded ``@``, ``/``, ``?``, quote or blank is covered whole. URL parsers end it at the
    first ``@`` (SQLAlchemy) or ``/`` (urllib) and show the rest as the host or the path; a
    message may show a little less than it could (an ``@`` later on the line), never a secret.

    >>> url = "postgresql+psycopg://me:p@ss/w0rd@db/studies"
    >>> [url[a:b] for a, b in password_spans(url)]
    ['p@ss/w0rd']
    >>> said = "got 'postgresql://me:it's a s?cret@db/x'"
    >>> [said[a:b] for a, b in password_spans(said)]
    ["it's a s?cret"]

    ``url``: ``text`` is one URL, checked rather than shown: its password ends before its
    query, whose values may hold an ``@`` of their own (``?application_name=me@laptop``).
    """
    matches = list(_USERINFO.finditer(text))
    spans = []
    for i, match in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        for stop in ("\n", "?") if url else ("\n",):
            found = text.find(stop, match.end(), end)
            end = found if found >= 0 else end
        at = text.rfind("@", match.end(), end)
        if at >= 0:
            spans.append((match.end(), at))
    return spans


_SECRET_QUERY_VALUE = re.compile(r"([?&])([^=&?#\s'\"]+)=([^&#\s'\"]*)")


def mask_secrets(text: str) -> str:
    """``text`` (a URL, or a message that quotes one) with every password of
    ``user:password@`` and every secret query value (:func:`is_secret_query_key`) replaced by
    ``***``, read the cautious way of :func:`password_spans`.

    >>> mask_secrets("got 'storage=postgresql://me:p@ss@db/x?sslpassword=k&port=1'")
    "got 'storage=postgresql://me:***@db/x?sslpassword=***&port=1'"
    """
    for start, end in reversed(password_spans(text)):
        text = text[:start] + MASK + text[end:]

    def query(match: re.Match[str]) -> str:
        sep, key, _ = match.groups()
        return f"{sep}{key}={MASK}" if is_secret_query_key(key) else match.group(0)

    return _SECRET_QUERY_VALUE.sub(query, text)


def redact(url: str) -> str:
    """The URL with every secret replaced by ``***``.

    Masks the password of ``user:password@`` and the value of every secret query parameter
    (``?password=``, ``?sslpassword=``, ``?token=``, ...; see :func:`is_secret_query_key`). An
    unparsable URL is shown as ``<unparsable storage URL>``, since what part of it is a
    password cannot be told; one that names SQLite, with no user or query, holds none.

    >>> redact("postgresql+psycopg://me:hunter2@db/studies"), redact("sqlite:/runs/x.db")
    ('postgresql+psycopg://me:***@db/studies', 'sqlite:/runs/x.db')
    """
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        if url.startswith("sqlite:") and not any(c in url for c in "@?") and url.isprintable():
            return url
        return "<unparsable storage URL>"
    secret = {key: _MASK_PLACEHOLDER for key in parsed.query if is_secret_query_key(key)}
    if secret:
        parsed = parsed.update_query_dict(secret)
    shown = parsed.render_as_string(hide_password=True)
    return mask_secrets(shown.replace(_MASK_PLACEHOLDER, MASK) if secret else shown)


def folder_problem(folder: str | os.PathLike[str]) -> str | None:
    """Why ``folder`` cannot be made or written (a file in the way, a symlink loop, no write
    permission on the nearest existing parent), in words; None when it can.

    Permissions can say yes where a write fails (root on ``/sys`` or on an NFS export with
    root squashing), so the nearest existing folder is also tried: a folder is made in it and
    removed at once, leaving nothing behind.

    >>> folder_problem("/etc/hostname/checkpoints")
    '/etc/hostname is not a folder'
    """
    try:
        path = Path(folder).expanduser().resolve()
    except (OSError, RuntimeError) as error:  # RuntimeError: a symlink loop (Python < 3.13)
        return f"cannot follow it: {error}"
    existing = next((p for p in [path, *path.parents] if p.exists()), None)
    if existing is None:
        return None
    if not existing.is_dir():
        return f"{existing} is not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    try:
        probe = tempfile.mkdtemp(prefix=".ssl-search-write-check-", dir=existing)
    except OSError as error:
        return f"{existing} is not writable ({error.strerror or error})"
    with contextlib.suppress(OSError):
        os.rmdir(probe)
    return None


def _looks_like_a_path(text: str) -> bool:
    """Whether ``text``, not a URL, is a file path (``runs/x.db``, ``/data/x.sqlite``): a
    name with a folder or a database suffix and no ``:``, ``@`` or ``?``, so that it cannot
    hold a password and may be shown back."""
    return (
        bool(text)
        and text.isprintable()
        and not any(c in text for c in ":@?")
        and ("/" in text or text.endswith((".db", ".sqlite", ".sqlite3")))
    )


def sqlite_file(url: str) -> Path | None:
    """The file an SQLite ``url`` names (``~`` expanded, the query left out), or None when
    ``url`` names a server or cannot be parsed.

    >>> sqlite_file("sqlite:///runs/x.db?mode=ro"), sqlite_file("postgresql://db/x")
    (PosixPath('runs/x.db'), None)
    """
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        return None
    if parsed.get_backend_name() != "sqlite" or not parsed.database:
        return None
    return _sqlite_path(parsed)


def _sqlite_path(parsed: sqlalchemy.engine.URL) -> Path:
    """The file of a parsed SQLite URL. With ``uri=true`` the database is an SQLite URI
    (``sqlite:///file:runs/x.db?mode=ro&uri=true``), whose path follows ``file:`` and which
    SQLite reads as written (no ``~``); otherwise it is a path, ``~`` being the home folder."""
    database = parsed.database or ""
    if database.startswith("file:") and str(parsed.query.get("uri", "")).lower() in ("true", "1"):
        return Path(urlsplit(database).path)
    return Path(database).expanduser()


def has_secret(url: str) -> bool:
    """Whether ``url`` holds a password or another secret that :func:`redact` masks."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        return True  # cannot tell: treat it as secret
    return mask_secrets(url) != url or parsed.password is not None


def check_url(url: str) -> sqlalchemy.engine.URL:
    """Parse and check ``url`` without writing anything; raise :class:`StorageError`."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as error:
        if _looks_like_a_path(url):
            raise StorageError(
                f"storage: {url!r} is a file path, not a URL; write an SQLite file as "
                f"sqlite:///{url} (e.g. sqlite:///runs/ssl-search.db; an absolute path takes "
                "four slashes), or a server as postgresql+psycopg://user@host:5432/db"
            ) from error
        raise StorageError(
            f"storage: cannot parse {redact(url)!r}; expected e.g. sqlite:///runs/ssl-search.db "
            "or postgresql+psycopg://user@host:5432/db"
        ) from error
    if parsed.get_backend_name() not in SUPPORTED:
        raise StorageError(
            f"storage: unsupported database {parsed.get_backend_name()!r} in {redact(url)}; "
            "allowed: sqlite, postgresql (postgresql+psycopg)"
        )
    try:
        parsed.get_dialect().import_dbapi()
    except NoSuchModuleError as error:
        raise StorageError(
            f"storage: no driver for {parsed.drivername!r} in {redact(url)}"
        ) from error
    except ImportError as error:  # a dialect SQLAlchemy knows, its driver package not installed
        raise StorageError(
            f"storage: the driver of {parsed.drivername!r} is not installed ({error}); "
            "use postgresql+psycopg://, which ssl-search installs"
        ) from None
    if any("@" in url[a:b] for a, b in password_spans(url, url=True)):
        raise StorageError(
            # The URL last: a message is masked again when shown, and an '@' after the URL
            # would read as the end of its password.
            "storage: the password holds an unencoded '@', which ends it early; percent-encode "
            f"it (%40): {redact(url)}"
        )
    if parsed.get_backend_name() == "sqlite":
        # (an SQLite URI with no path, file:?uri=true, is a temporary database: Path "." here)
        if not parsed.database or str(_sqlite_path(parsed)) in (".", ":memory:"):
            raise StorageError(
                "storage: an in-memory SQLite database cannot be shared or resumed; give a file, "
                "e.g. sqlite:///runs/ssl-search.db"
            )
        path = _sqlite_path(parsed)
        if path.is_dir():
            raise StorageError(
                f"storage: {path} is a folder, not an SQLite database file; give a file in it, "
                f"e.g. sqlite:///{path / 'ssl-search.db'}"
            )
        folder = path.parent
        if (problem := folder_problem(folder)) is not None:
            raise StorageError(f"storage: cannot create a database under {folder}: {problem}")
    return parsed


def _prepare_sqlite(parsed: sqlalchemy.engine.URL) -> None:
    path = _sqlite_path(parsed)
    path.parent.mkdir(parents=True, exist_ok=True)
    # WAL lets readers (the dashboard, other workers) proceed while one worker writes; the
    # journal mode is stored in the file, so setting it once is enough.
    try:
        with sqlite3.connect(path, timeout=SQLITE_TIMEOUT_S) as conn:
            conn.execute("PRAGMA journal_mode=WAL")
    except sqlite3.DatabaseError as error:
        raise _unusable_sqlite(path, error) from None


def _unusable_sqlite(path: Path, error: BaseException) -> BaseException:
    """A :class:`StorageError` for a file that SQLite cannot open as a database (not one, or
    not openable there); ``error`` itself when the database is only busy (a fault, retried)."""
    text = str(getattr(error, "orig", None) or error)
    if "locked" in text or "busy" in text:
        return error
    return StorageError(f"storage: cannot open {path} as an SQLite database: {text}")


# What a server that is restarting answers: a command started meanwhile waits for it, as every
# storage call rides out a restart. A refused connection is not among them: nothing listening
# there is as likely a mistyped port as a restart, and a typo must fail at once (exit 2).
_SERVER_RESTARTING = (
    "the database system is starting up",
    "the database system is shutting down",
    "the database system is in recovery mode",
    "the database system is not yet accepting connections",
)


def _restarting(error: BaseException) -> bool:
    text = str(getattr(error, "orig", None) or error).lower()
    return isinstance(error, SQLAlchemyError) and any(s in text for s in _SERVER_RESTARTING)


def _check_server(url: str, parsed: sqlalchemy.engine.URL, retry_seconds: float) -> None:
    """Connect once to the server of ``url``: a :class:`StorageError` (the URL is wrong) for a
    refused login, an unknown database or host, or nothing listening at the port; a server
    that answers it is starting up or shutting down is waited for up to ``retry_seconds``,
    then :class:`StorageUnavailableError` (not the input's fault)."""
    from storage.retry import retry_call  # (imports this module)

    engine = sqlalchemy.create_engine(url, connect_args={"connect_timeout": 10})

    def connect() -> None:
        with engine.connect():
            pass

    try:
        retry_call(
            connect,
            target=redact(url),
            what="connect",
            seconds=retry_seconds,
            on_retry=engine.dispose,
            transient=_restarting,
        )
    except SQLAlchemyError as error:
        reason = str(getattr(error, "orig", error)).strip().splitlines()[0]
        hint = (
            "; check the host and port (if the server is restarting, run again once it is up)"
            if "connection refused" in reason.lower()
            else ""
        )
        raise StorageError(f"storage: cannot connect to {redact(url)}: {reason}{hint}") from error
    finally:
        engine.dispose()


def open_storage(
    url: str,
    *,
    heartbeat_interval: int | None = None,
    grace_period: int | None = None,
    max_retry: int = 3,
    attempts: int = 12,
    retry_seconds: float | None = None,
    busy_timeout: float = SQLITE_TIMEOUT_S,
    create: bool = True,
) -> optuna.storages.RDBStorage:
    """Open (creating when needed, unless not ``create``) Optuna's storage at ``url``.

    With ``create`` False a database without Optuna's tables is a :class:`StorageError` and
    nothing is written to it (a mistyped URL must not gain an empty schema).

    With ``heartbeat_interval`` set, running trials send heartbeats; a trial silent for
    ``grace_period`` seconds is failed by :func:`optuna.storages.fail_stale_trials` and
    re-enqueued up to ``max_retry`` times.

    Every database call of the returned storage (an ``RDBStorage``) is retried on transient
    faults (a PostgreSQL restart, a SQLite lock outlasting ``busy_timeout`` seconds) for
    ``retry_seconds`` (default :data:`storage.retry.RETRY_SECONDS`), then raises
    :class:`StorageUnavailableError`.
    """
    # imported here so that checking a URL stays light
    from storage.retry import RETRY_SECONDS, RetryingRDBStorage
    from storage.trial_retry import RetryFailedTrial

    parsed = check_url(url)
    engine_kwargs: dict = {}
    if parsed.get_backend_name() == "sqlite" and parsed.database.startswith("~"):
        # The file check_url checked (sqlite:///~/x.db: in the home folder, as runs_dir=~/x
        # is), not a folder named "~" in the working directory, which SQLite would open.
        parsed = parsed.set(database=str(Path(parsed.database).expanduser()))
        url = parsed.render_as_string(hide_password=False)
    if parsed.get_backend_name() == "sqlite":
        if not create and not (path := _sqlite_path(parsed)).is_file():
            raise StorageError(
                f"storage: no database at {path}; run python -m search.run first, or pass "
                "runs_dir=... / storage=... where the study ran"
            )
        if create:  # (WAL is a property of the file: one made here has it already)
            _prepare_sqlite(parsed)
        engine_kwargs["connect_args"] = {"timeout": busy_timeout}
    else:
        _check_server(url, parsed, RETRY_SECONDS if retry_seconds is None else retry_seconds)
        # Test pooled connections before use, so those a server restart killed are replaced.
        engine_kwargs["pool_pre_ping"] = True
        if "connect_timeout" not in parsed.query:
            engine_kwargs["connect_args"] = {"connect_timeout": 10}
    if not create:
        probe = sqlalchemy.create_engine(url, **engine_kwargs)
        try:
            has_tables = sqlalchemy.inspect(probe).has_table("studies")
        except DatabaseError as error:
            if parsed.get_backend_name() != "sqlite":
                raise
            raise _unusable_sqlite(_sqlite_path(parsed), error) from None
        finally:
            probe.dispose()
        if not has_tables:
            raise StorageError(
                f"storage: no studies in {redact(url)} (no Optuna tables there); run python -m "
                "search.run first, or pass storage=... where the study ran"
            )
    heartbeat = {}
    if heartbeat_interval:
        heartbeat = {
            "heartbeat_interval": heartbeat_interval,
            "grace_period": grace_period,
            "heartbeat_stale_trial_callback": RetryFailedTrial(max_retry=max_retry),
        }
    retry = RETRY_SECONDS if retry_seconds is None else retry_seconds
    for attempt in range(attempts):
        try:
            return RetryingRDBStorage(
                url, engine_kwargs=engine_kwargs, retry_seconds=retry, **heartbeat
            )
        except SQLAlchemyError:
            # Another process is creating the same tables right now: wait and look again.
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 + random.random() * (0.3 * (attempt + 1)))
    raise AssertionError("unreachable")
