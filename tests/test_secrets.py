"""Passwords are never printed, stored or passed on a command line.

``redact`` masks every form a storage URL can carry a secret in (``user:password@``,
``?password=``, ``?sslpassword=``, tokens, keys); the commands print only masked URLs; and a real
search on PostgreSQL (trust authentication accepts any password) with a password in each form
leaves it in no output, no file under ``runs_dir``, no database row and no process's arguments.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import sqlalchemy
from conftest import REPO_ROOT, TINY_STAGES, interrupt_and_collect
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from search.database import STORAGE_ENV, has_secret, is_secret_query_key, redact

SECRET = "s3cret-7f3a9c"


# ---- redact ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url,shown",
    [
        (
            f"postgresql+psycopg://alice:{SECRET}@db.example:5432/studies",
            "postgresql+psycopg://alice:***@db.example:5432/studies",
        ),
        (
            f"postgresql+psycopg://alice@db/x?password={SECRET}",
            "postgresql+psycopg://alice@db/x?password=***",
        ),
        (
            f"postgresql+psycopg://alice@db/x?PassWord={SECRET}&sslmode=require",
            "postgresql+psycopg://alice@db/x?PassWord=***&sslmode=require",
        ),
        (
            f"postgresql+psycopg://alice@db/x?sslpassword={SECRET}&sslkey=/home/a/k.pem",
            "postgresql+psycopg://alice@db/x?sslkey=***&sslpassword=***",
        ),
        (
            f"postgresql+psycopg://alice:{SECRET}@db/x?password={SECRET}2&connect_timeout=5",
            "postgresql+psycopg://alice:***@db/x?connect_timeout=5&password=***",
        ),
        (f"postgresql://db/x?passwd={SECRET}", "postgresql://db/x?passwd=***"),
        (f"postgresql://db/x?pwd={SECRET}", "postgresql://db/x?pwd=***"),
        (f"postgresql://db/x?secret={SECRET}", "postgresql://db/x?secret=***"),
        (f"postgresql://db/x?Token={SECRET}", "postgresql://db/x?Token=***"),
        (f"postgresql://db/x?api_key={SECRET}", "postgresql://db/x?api_key=***"),
        (f"postgresql://db/x?access_token={SECRET}", "postgresql://db/x?access_token=***"),
        # The same key twice: every value is masked.
        (
            f"postgresql://db/x?password={SECRET}&password={SECRET}2",
            "postgresql://db/x?password=***",
        ),
        # Percent-encoded characters in a query password.
        ("postgresql://db/x?password=p%40ss%26w0rd", "postgresql://db/x?password=***"),
    ],
)
def test_redact_masks_every_form_of_a_secret(url, shown):
    assert has_secret(url)
    masked = redact(url)
    assert masked == shown
    for secret in (SECRET, "p%40ss", "p@ss", "w0rd", "/home/a/k.pem"):
        assert secret not in masked
    make_url(masked)  # still a URL


@pytest.mark.parametrize(
    "key", ["password", "PASSWORD", "sslpassword", "passwd", "pwd", "secret", "client_secret"]
)
def test_secret_query_keys(key):
    assert is_secret_query_key(key)
    assert is_secret_query_key(key.upper())


@pytest.mark.parametrize(
    "key", ["token", "access_token", "api_key", "apikey", "sslkey", "passphrase", "credentials"]
)
def test_more_secret_query_keys(key):
    assert is_secret_query_key(key)


@pytest.mark.parametrize(
    "key",
    ["sslmode", "host", "port", "connect_timeout", "application_name", "sslrootcert", "options"],
)
def test_ordinary_query_keys_are_shown(key):
    assert not is_secret_query_key(key)


@pytest.mark.parametrize(
    "url",
    [
        "sqlite:///runs/ssl-search.db",
        "postgresql+psycopg://postgres@127.0.0.1:5432/test",
        "postgresql+psycopg://alice@/x?host=/run/postgresql&sslmode=require",
    ],
)
def test_urls_without_a_secret_are_shown_as_they_are(url):
    assert not has_secret(url)
    assert make_url(redact(url)) == make_url(url)


# ---- what the commands print -----------------------------------------------------------------

SECRET_URL = (
    f"postgresql+psycopg://alice:{SECRET}-user@db.example:5432/studies"
    f"?password={SECRET}-query&sslpassword={SECRET}-ssl&sslmode=require"
)


@pytest.mark.slow
def test_dashboard_print_command_masks_the_password_and_says_where_it_goes(tmp_path):
    env = {STORAGE_ENV: SECRET_URL}
    done = run_env("search.dashboard", "study=quickstart", f"runs_dir={tmp_path}", env=env)
    assert done.returncode == 0, done.stderr
    assert SECRET not in done.stdout + done.stderr
    assert "alice:***@db.example:5432/studies" in done.stdout
    assert "password=***" in done.stdout and "sslpassword=***" in done.stdout
    assert "sslmode=require" in done.stdout
    assert STORAGE_ENV in done.stderr and "must not go on a command line" in done.stderr
    # Given as storage= (its own command line already holds it), the printout is masked too.
    done = run_env(
        "search.dashboard", "study=quickstart", f"runs_dir={tmp_path}", f"storage={SECRET_URL}"
    )
    assert done.returncode == 0, done.stderr
    assert SECRET not in done.stdout + done.stderr and "password=***" in done.stdout


@pytest.mark.slow
def test_run_header_masks_the_password(tmp_path):
    done = run_env(
        "search.run",
        "study=quickstart",
        f"runs_dir={tmp_path}",
        "storage=${oc.env:" + STORAGE_ENV + "}",
        "--dry-run",
        env={STORAGE_ENV: SECRET_URL},
        print_command=False,
    )
    assert done.returncode == 0, done.stderr
    assert SECRET not in done.stdout + done.stderr
    assert "alice:***@db.example" in done.stdout and "password=***" in done.stdout


@pytest.mark.parametrize(
    "text,shown",
    [
        # SQLAlchemy ends a password at its first '@' and shows the rest as the host
        (f"postgresql+psycopg://alice:p@{SECRET}@db/x", "postgresql+psycopg://alice:***@db/x"),
        # urllib ends it at the first '/' and shows the rest as the path
        (f"s3://key:ab/{SECRET}@bucket/ckpt", "s3://key:***@bucket/ckpt"),
        # quoted in a message, several URLs, a query secret beside an ordinary value
        (
            f"got 'postgresql://a:{SECRET}@h/x\\n' and ftp://b:c/{SECRET}@h/p?token={SECRET}&n=1",
            "got 'postgresql://a:***@h/x\\n' and ftp://b:***@h/p?token=***&n=1",
        ),
        # a quote, a blank or '?' in it: a parser takes them, a message's quotes do not end it
        (
            f"got \"storage=postgresql://a:it's {SECRET}?@h/x\" (no '=')",
            "got \"storage=postgresql://a:***@h/x\" (no '=')",
        ),
        # a path with ':' and '@' is no password: nothing to mask
        (
            "sqlite:///runs/a:b@c.db and s3://bucket/v:2@x",
            "sqlite:///runs/a:b@c.db and s3://bucket/v:2@x",
        ),
    ],
)
def test_a_password_holding_an_unencoded_at_or_slash_is_masked_whole(text, shown):
    from search.database import mask_secrets
    from storage.checkpoint_store import redact_location

    assert mask_secrets(text) == shown
    url = text.split()[0]
    if "postgresql" in url:
        assert SECRET not in redact(url) and has_secret(url)
    if url.startswith("s3://key"):
        assert redact_location(url) == shown


@pytest.mark.parametrize(
    "override",
    [
        f"storage=postgresql+psycopg://alice:p@{SECRET}@127.0.0.1:1/x",  # refused: '@' in it
        f"checkpoints_dir=s3://key:ab/{SECRET}@bucket/ckpt",  # refused: '/' in it
        f"storage:postgresql+psycopg://alice:{SECRET}@127.0.0.1:1/x",  # ':' for '='
        # ':' for '=', a password holding a quote, a blank, '?' or '"' (quoted by repr)
        f"storage:postgresql+psycopg://alice:it's {SECRET}?@127.0.0.1:1/x",
        f"storage=postgresql+psycopg://alice:a\"{SECRET}'@127.0.0.1:1/x\x01",
        f"storage=postgresql+psycopg://alice:{SECRET}@127.0.0.1:1/x\n",  # a control character
        "storage=${oc.env:SSL_SEARCH_TEST_URL}",  # the same, from an environment variable
        "storage=${oc.env:SSL_SEARCH_TEST_URL_2}",  # '${' in it: it resolves to an interpolation
    ],
)
def test_a_refused_url_is_quoted_without_its_password(override):
    """Each is refused with one line (exit 2) that quotes the URL, its password masked."""
    done = run_env(
        "search.run",
        "study=quickstart",
        override,
        "--dry-run",
        env={
            "SSL_SEARCH_TEST_URL": f"postgresql+psycopg://alice:{SECRET}@127.0.0.1:1/x\n",
            "SSL_SEARCH_TEST_URL_2": f"postgresql+psycopg://alice:{SECRET}${{x}}@127.0.0.1:1/x",
        },
        print_command=False,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert SECRET not in done.stdout + done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(("error: storage", "error: checkpoints_dir")) and "***" in line, line


def test_a_checkpoints_url_password_is_masked_where_the_config_is_stored_and_printed(tmp_path):
    """The study keeps its resolved config (a user attr the dashboard shows) and --dry-run
    prints it: the checkpoints_dir URL's password appears in neither."""
    import optuna

    from search import load_config, open_studies, stage_study_name

    location = f"memory://alice:{SECRET}@host/ckpt"
    cfg = load_config("quickstart", [f"runs_dir={tmp_path}", f"checkpoints_dir={location}"])
    url = f"sqlite:///{tmp_path / 'ssl-search.db'}"
    open_studies(cfg, url)
    stored = optuna.load_study(study_name=stage_study_name(cfg.name, "screen"), storage=url)
    assert stored.user_attrs["config"]["checkpoints_dir"] == "memory://alice:***@host/ckpt"
    assert SECRET not in json.dumps(stored.user_attrs)
    done = run_env(
        "search.run",
        "study=quickstart",
        f"runs_dir={tmp_path}",
        f"checkpoints_dir={location}",
        "--dry-run",
        print_command=False,
    )
    assert done.returncode == 0, done.stderr
    assert SECRET not in done.stdout + done.stderr
    assert "memory://alice:***@host/ckpt" in done.stdout


def run_env(
    module: str, *args: str, env: dict[str, str] | None = None, print_command: bool = True
) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != STORAGE_ENV}
    full_env.update(env or {}, OMP_NUM_THREADS="2", PYTHONUNBUFFERED="1")
    extra = ["--print-command"] if print_command else []
    return subprocess.run(
        [sys.executable, "-m", module, *args, *extra],
        cwd=REPO_ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=300,
    )


# ---- a real search on PostgreSQL with a password in every form -------------------------------


def process_tree(root: int) -> list[int]:
    """``root`` and every process below it, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def watch_arguments(root: int, seen: dict[int, bytes]) -> None:
    """Record the argument list (/proc/PID/cmdline) of ``root`` and its descendants."""
    for pid in process_tree(root):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if args:
            seen[pid] = seen.get(pid, b"") + b"\n" + args


def every_file(folder: Path) -> dict[Path, bytes]:
    out = {}
    for path in folder.rglob("*"):
        if path.is_file():
            try:
                out[path] = path.read_bytes()
            except OSError:  # removed meanwhile (the workers' config file)
                continue
    return out


def database_text(url: str) -> dict[str, str]:
    """table -> every row of it, as text."""
    engine = sqlalchemy.create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            tables = sqlalchemy.inspect(conn).get_table_names()
            return {
                table: "\n".join(
                    str(tuple(row))
                    for row in conn.execute(sqlalchemy.text(f'SELECT * FROM "{table}"'))
                )
                for table in tables
            }
    finally:
        engine.dispose()


def with_secrets(url: str, secrets: dict[str, str]) -> str:
    parsed = make_url(url).set(password=secrets["user"])
    parsed = parsed.update_query_dict({"password": secrets["query"], "sslpassword": secrets["ssl"]})
    return parsed.render_as_string(hide_password=False)


@pytest.mark.slow
@pytest.mark.postgres
def test_a_search_with_a_password_leaks_it_nowhere(postgres_db_url: str, tmp_path: Path):
    secrets = {"user": "userPw-7f3a9c", "query": "queryPw-41be0d", "ssl": "sslPw-c0ffee"}
    url = with_secrets(postgres_db_url, secrets)
    assert all(s in url for s in secrets.values())
    runs = tmp_path / "runs"
    env = {k: v for k, v in os.environ.items() if k != STORAGE_ENV}
    env.update({STORAGE_ENV: url, "OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1"})
    log = tmp_path / "run.log"
    seen: dict[int, bytes] = {}
    worker_files: dict[Path, bytes] = {}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "search.run",
                "study=quickstart",
                "storage=${oc.env:" + STORAGE_ENV + "}",
                f"runs_dir={runs}",
                "workers=2",
                *TINY_STAGES,
                "--no-progress",
            ],
            cwd=REPO_ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 600
            while proc.poll() is None:
                assert time.monotonic() < deadline, "the search did not finish in 10 minutes"
                watch_arguments(proc.pid, seen)
                worker_files.update(
                    every_file(runs / "workers") if (runs / "workers").is_dir() else {}
                )
                time.sleep(0.2)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
    output = log.read_text(errors="replace")
    assert proc.returncode == 0, output[-4000:]
    assert sum(b"search.worker" in args for args in seen.values()) >= 2, seen  # workers seen
    assert worker_files, "the workers' config file was never seen"

    # The dashboard, reading the URL from the environment, on the same storage.
    dashboard_out, pages = serve_dashboard(runs, env, seen)

    files = every_file(runs)
    assert files
    tables = database_text(postgres_db_url)
    assert "study_user_attributes" in tables and "trials" in tables
    for name, secret in secrets.items():
        assert secret not in output, f"{name} password printed by the search"
        assert secret not in dashboard_out, f"{name} password printed by the dashboard"
        for pid, args in seen.items():
            assert secret.encode() not in args, f"{name} password in the arguments of {pid}"
        for path, data in {**worker_files, **files}.items():
            assert secret.encode() not in data, f"{name} password in {path}"
        for table, text in tables.items():
            assert secret not in text, f"{name} password in table {table}"
        for page, body in pages.items():
            assert secret not in body, f"{name} password served at {page}"

    # The config is stored, with the URL masked rather than left out.
    engine = sqlalchemy.create_engine(postgres_db_url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            stored = conn.execute(
                sqlalchemy.text(
                    "SELECT value_json FROM study_user_attributes WHERE key = 'config' LIMIT 1"
                )
            ).scalar_one()
    finally:
        engine.dispose()
    shown = json.loads(stored)["storage"]
    assert shown == redact(url)
    assert "postgres:***@" in shown and "password=***" in shown and "sslpassword=***" in shown
    assert f"storage {redact(url)}" in output  # the run's header shows it masked


def serve_dashboard(
    runs: Path, env: dict[str, str], seen: dict[int, bytes]
) -> tuple[str, dict[str, str]]:
    """Start search.dashboard on the storage in ``env``; (its output, pages it served)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "search.dashboard",
            "study=quickstart",
            f"runs_dir={runs}",
            f"port={port}",
        ],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    pages: dict[str, str] = {}
    try:
        deadline = time.monotonic() + 120
        while "api/studies" not in pages:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline, "the dashboard did not answer"
            watch_arguments(proc.pid, seen)
            try:
                with urllib.request.urlopen(f"{base}/api/studies", timeout=10) as response:  # noqa: S310
                    pages["api/studies"] = response.read().decode()
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.3)
        for study in json.loads(pages["api/studies"])["study_summaries"]:
            page = f"api/studies/{study['study_id']}"
            with urllib.request.urlopen(f"{base}/{page}", timeout=30) as response:  # noqa: S310
                pages[page] = response.read().decode()
        assert len(pages) == 4, sorted(pages)  # the list and the three stage studies
        watch_arguments(proc.pid, seen)
    finally:
        out = interrupt_and_collect(proc, timeout=30)
    return out, pages
