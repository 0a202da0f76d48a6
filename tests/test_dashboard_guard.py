"""search.dashboard serves optuna-dashboard read-only, and only to loopback Host names.

The dashboard runs in this process (its WSGI app behind :class:`search.dashboard.DashboardGuard`,
on wsgiref) against a small real SQLite storage made with Optuna, on a free loopback port; the
requests are plain ``urllib``. One test starts ``python -m search.dashboard`` itself.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from conftest import REPO_ROOT, interrupt_and_collect, run_module

from search.dashboard import (
    dashboard_app,
    host_name,
    is_loopback_host,
    is_loopback_origin,
    serve,
)
from search.database import STORAGE_ENV

STUDY = "demo.screen"


def make_storage(path: Path) -> str:
    """A SQLite file holding one study, ``demo.screen``, with one finished trial."""
    url = f"sqlite:///{path}"
    study = optuna.create_study(study_name=STUDY, storage=url, direction="maximize")
    study.optimize(lambda trial: trial.suggest_float("x", 0.0, 1.0), n_trials=1)
    return url


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def request(
    url: str,
    method: str = "GET",
    body: dict | None = None,
    host: str | None = None,
    origin: str | None = None,
) -> tuple[int, bytes]:
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if host is not None:
        headers["Host"] = host
    if origin is not None:
        headers["Origin"] = origin
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as response:  # noqa: S310 - loopback
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def study_names(url: str) -> list[str]:
    return sorted(optuna.get_all_study_names(storage=url))


class Served:
    """The guarded dashboard on a free loopback port, in a thread of this process."""

    def __init__(self, url: str, artifacts: Path, allow_edits: bool) -> None:
        self.storage = optuna.storages.RDBStorage(url)
        self.refusals: list[str] = []
        app = dashboard_app(
            self.storage, artifacts, allow_edits=allow_edits, log=self.refusals.append
        )
        self.server = serve(app, 0)
        self.base = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def study_id(self) -> int:
        status, body = request(f"{self.base}/api/studies")
        assert status == 200
        return next(
            s["study_id"] for s in json.loads(body)["study_summaries"] if s["study_name"] == STUDY
        )

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)
        self.storage.engine.dispose()


@pytest.fixture
def storage_url(tmp_path: Path) -> str:
    return make_storage(tmp_path / "guard.db")


def _serving(storage_url: str, tmp_path: Path, *, allow_edits: bool) -> Iterator[Served]:
    served = Served(storage_url, tmp_path / "artifacts", allow_edits=allow_edits)
    try:
        yield served
    finally:
        served.close()


@pytest.fixture
def read_only(storage_url: str, tmp_path: Path) -> Iterator[Served]:
    yield from _serving(storage_url, tmp_path, allow_edits=False)


@pytest.fixture
def editable(storage_url: str, tmp_path: Path) -> Iterator[Served]:
    yield from _serving(storage_url, tmp_path, allow_edits=True)


# ---- Host names --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "header,name",
    [
        ("127.0.0.1", "127.0.0.1"),
        ("127.0.0.1:8080", "127.0.0.1"),
        ("LocalHost:80", "localhost"),
        ("[::1]", "::1"),
        ("[::1]:8080", "::1"),
        ("evil.example:8080", "evil.example"),
        ("localhost:http", None),
        ("[::1", None),
        ("[::1]x", None),
        ("", None),
        (None, None),
    ],
)
def test_host_name_of_a_header(header, name):
    assert host_name(header) == name


@pytest.mark.parametrize(
    "header", ["127.0.0.1", "127.0.0.1:8123", "localhost", "localhost:8123", "[::1]:8123"]
)
def test_loopback_hosts_are_accepted(header):
    assert is_loopback_host(header)


@pytest.mark.parametrize(
    "header",
    [
        "evil.example",
        "evil.example:8080",
        "127.0.0.1.evil.example",
        "localhost.evil.example:8080",
        "127.0.0.2",
        "0.0.0.0:8080",
        "::1",  # an IPv6 address in a Host header is bracketed
        "",
        None,
    ],
)
def test_other_hosts_are_refused(header):
    assert not is_loopback_host(header)


@pytest.mark.parametrize(
    "origin,ok",
    [
        (None, True),
        ("http://127.0.0.1:8080", True),
        ("http://localhost", True),
        ("https://[::1]:8443", True),
        ("http://evil.example", False),
        ("http://127.0.0.1.evil.example:8080", False),
        ("null", False),
        ("file://", False),
        ("http://127.0.0.1:port", False),
    ],
)
def test_origins(origin, ok):
    assert is_loopback_origin(origin) is ok


# ---- read-only by default ------------------------------------------------------------------


def test_reads_are_served(read_only: Served):
    status, body = request(f"{read_only.base}/api/studies")
    assert status == 200
    assert [s["study_name"] for s in json.loads(body)["study_summaries"]] == [STUDY]
    status, body = request(f"{read_only.base}/api/studies/{read_only.study_id()}")
    assert status == 200 and len(json.loads(body)["trials"]) == 1
    assert request(f"{read_only.base}/api/meta", method="HEAD")[0] == 200
    assert request(f"{read_only.base}/dashboard")[0] == 200
    assert read_only.refusals == []


def test_every_write_is_refused_and_nothing_changes(read_only: Served, storage_url: str):
    sid = read_only.study_id()
    writes = [
        ("POST", f"/api/studies/{sid}/rename", {"study_name": "../../../outside.screen"}),
        ("DELETE", f"/api/studies/{sid}", {"remove_associated_artifacts": True}),
        ("PUT", f"/api/studies/{sid}/note", {"version": 0, "body": "hello"}),
        ("POST", "/api/studies", {"study_name": "new.screen", "directions": ["maximize"]}),
        ("PATCH", f"/api/studies/{sid}", {"study_name": "x"}),
        ("POST", "/api/trials/1/user-attrs", {"user_attrs": {"a": 1}}),
        ("OPTIONS", "/api/studies", None),
    ]
    for method, path, body in writes:
        status, answer = request(f"{read_only.base}{path}", method=method, body=body)
        assert status == 403, (method, path, status, answer)
        reason = json.loads(answer)["reason"]
        assert "read-only" in reason and "--allow-edits" in reason and "\n" not in reason
    assert study_names(storage_url) == [STUDY]
    assert read_only.study_id() == sid
    assert optuna.load_study(study_name=STUDY, storage=storage_url).user_attrs == {}
    assert len(read_only.refusals) == len(writes)


def test_a_foreign_host_is_refused_even_for_reads(read_only: Served):
    for host in ("evil.example", f"evil.example:{read_only.server.server_port}", "attacker"):
        status, answer = request(f"{read_only.base}/api/studies", host=host)
        assert status == 403, host
        assert "is not 127.0.0.1, localhost or [::1]" in json.loads(answer)["reason"]
    port = read_only.server.server_port
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "localhost"):
        assert request(f"{read_only.base}/api/studies", host=host)[0] == 200, host


# ---- --allow-edits -------------------------------------------------------------------------


def test_with_allow_edits_rename_and_delete_go_through(editable: Served, storage_url: str):
    sid = editable.study_id()
    status, answer = request(
        f"{editable.base}/api/studies/{sid}/rename",
        method="POST",
        body={"study_name": "renamed.screen"},
    )
    assert status == 201, answer
    assert study_names(storage_url) == ["renamed.screen"]
    new_id = json.loads(answer)["study_id"]
    status, _ = request(f"{editable.base}/api/studies/{new_id}", method="DELETE", body={})
    assert status == 204
    assert study_names(storage_url) == []


def test_with_allow_edits_a_foreign_host_or_page_still_cannot_write(
    editable: Served, storage_url: str
):
    sid = editable.study_id()
    delete = f"{editable.base}/api/studies/{sid}"
    assert request(delete, method="DELETE", body={}, host="evil.example")[0] == 403
    for origin in ("http://evil.example", "null"):
        status, answer = request(delete, method="DELETE", body={}, origin=origin)
        assert status == 403 and "another site" in json.loads(answer)["reason"]
    assert study_names(storage_url) == [STUDY]
    # The dashboard's own page sends its loopback origin.
    status, _ = request(
        f"{editable.base}/api/studies/{sid}/note",
        method="PUT",
        body={"version": 1, "body": "checked"},
        origin=editable.base,
    )
    assert status == 204, status


# ---- the command ---------------------------------------------------------------------------


@pytest.mark.slow
def test_help_says_read_only_loopback_and_where_a_password_goes():
    done = run_module("search.dashboard", "--help")
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())
    assert "--allow-edits" in text and "Read-only unless --allow-edits" in text
    assert "refused with 403" in text and "127.0.0.1, localhost or [::1]" in text
    assert STORAGE_ENV in text and "never on a command line" in text


@pytest.mark.slow
def test_the_command_serves_read_only_from_the_storage_in_the_environment(
    storage_url: str, tmp_path: Path
):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = dict(os.environ, PYTHONUNBUFFERED="1", **{STORAGE_ENV: storage_url})
    proc = subprocess.Popen(
        [sys.executable, "-m", "search.dashboard", f"runs_dir={tmp_path}", f"port={port}"],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                status, body = request(f"{base}/api/studies")
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                assert time.monotonic() < deadline, "the dashboard did not answer"
                time.sleep(0.3)
        assert status == 200
        sid = json.loads(body)["study_summaries"][0]["study_id"]
        assert request(f"{base}/api/studies/{sid}", method="DELETE", body={})[0] == 403
        assert study_names(storage_url) == [STUDY]
    finally:
        out = interrupt_and_collect(proc, timeout=15)
    assert f"optuna-dashboard for {storage_url}" in out and "read-only" in out
    assert "DELETE" in out and "refused" in out  # the refusal is reported where it runs


# ---- a study renamed to leave the report folder ----------------------------------------------


def renamed_outside(tmp_path: Path) -> tuple[str, str]:
    """(storage URL under tmp_path/runs, a name ``../../../outside-XXXX``) with its 3 stages."""
    runs = tmp_path / "runs"
    runs.mkdir()
    url = f"sqlite:///{runs / 'ssl-search.db'}"
    name = f"../../../outside-{uuid.uuid4().hex[:8]}"
    for stage in ("screen", "promote", "final"):
        optuna.create_study(study_name=f"{name}.{stage}", storage=url)
    return url, name


def test_report_names_from_storage_that_leave_the_folder_are_skipped(tmp_path, caplog):
    from reporting.store import study_names as reportable

    url, name = renamed_outside(tmp_path)
    optuna.create_study(study_name="fine.screen", storage=url)
    storage = optuna.storages.RDBStorage(url)
    try:
        with caplog.at_level(logging.WARNING):
            assert reportable(storage) == ["fine"]
            assert reportable(storage) == ["fine"]
    finally:
        storage.engine.dispose()
    warned = [r.getMessage() for r in caplog.records if r.name == "reporting.store"]
    assert len(warned) == 1  # once per process
    assert warned[0].startswith(f"warning: study: skipping {name!r}") and "\n" not in warned[0]


def test_write_report_refuses_a_name_that_leaves_the_folder(tmp_path):
    from models.errors import UsageError
    from reporting.report import write_report

    url, name = renamed_outside(tmp_path)
    storage = optuna.storages.RDBStorage(url)
    try:
        with pytest.raises(UsageError, match=r"^study: '\.\./\.\./\.\./outside-\w+' cannot name"):
            write_report(name, storage, url, [], out_dir=tmp_path / "runs" / "report")
    finally:
        storage.engine.dispose()
    assert not list(tmp_path.parent.glob("outside-*"))
    assert not (tmp_path / "runs" / "report").exists()


@pytest.mark.parametrize("name", ["a/b", "../x", "..", ".", "a\\b", "x\x00y", "tab\there", ""])
def test_output_path_refuses_names_that_are_not_one_file_name(tmp_path, name):
    from models.errors import UsageError
    from reporting.report import output_path

    with pytest.raises(UsageError, match="^study: "):
        output_path(tmp_path, name, ".md")


def test_output_path_refuses_a_file_that_resolves_elsewhere(tmp_path):
    from models.errors import UsageError
    from reporting.report import output_path

    out = tmp_path / "report"
    out.mkdir()
    assert output_path(out, "fine.v2", "-trials.csv") == out / "fine.v2-trials.csv"
    (out / "planted.md").symlink_to(tmp_path / "elsewhere.md")
    with pytest.raises(UsageError, match="would be written outside"):
        output_path(out, "planted", ".md")


def test_checkpoint_folders_outside_the_checkpoints_folder_are_refused(tmp_path):
    from optuna.trial import create_trial

    from reporting.store import final_checkpoint_paths
    from search import load_config

    cfg = load_config("quickstart", [f"runs_dir={tmp_path}"])
    inside = create_trial(
        value=1.0, user_attrs={"source_checkpoint_dir": "a/t1", "checkpoint_dir": "a/t2"}
    )
    source, probe = final_checkpoint_paths(cfg, inside)
    assert source.parent == tmp_path / "checkpoints" / "a" / "t1"
    outside = create_trial(
        value=1.0, user_attrs={"source_checkpoint_dir": "../../x", "checkpoint_dir": "a/t2"}
    )
    with pytest.raises(FileNotFoundError, match="outside"):
        final_checkpoint_paths(cfg, outside)


@pytest.mark.slow
def test_report_command_skips_or_refuses_such_a_name(tmp_path):
    url, name = renamed_outside(tmp_path)
    runs = tmp_path / "runs"
    done = run_module("search.report", "study=all", f"runs_dir={runs}")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert lines[0].startswith(f"warning: study: skipping {name!r}"), done.stderr
    assert lines[-1].startswith("error: study: no study in"), done.stderr
    done = run_module("search.report", f"study={name}", f"runs_dir={runs}")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: study: {name!r} cannot name report files: it holds a path separator, so its "
        "files would leave the report folder"
    ]
    assert not list(tmp_path.parent.glob("outside-*")) and not (runs / "report").exists()
