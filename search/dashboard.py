"""Open a study in optuna-dashboard: ``python -m search.dashboard study=NAME [port=8080]``.

Serves optuna-dashboard from this process (through its Python API) on 127.0.0.1 only, with the
storage URL and artifact folder from the study's settings (``runs_dir=``, ``storage=``,
``artifacts_dir=`` overrides apply), and prints the URL to open. Every trial's figures are under
its "Artifacts" panel. ``study=`` may also name a study that exists only in storage.

Read-only unless --allow-edits: every request but GET and HEAD (rename or delete a study, notes,
tell, artifact uploads) is refused with 403 and a one-line reason, so a click cannot delete or
rename a stage study the search and the report rely on. Requests whose Host header is not a
loopback name (127.0.0.1, localhost or [::1], with any port) are refused with 403 whatever the
method, and so are requests a browser sends from a page of another site (its Origin header): a
web page in another browser tab cannot use the server, through DNS rebinding or otherwise.

The storage URL is ``storage=`` when given, else the environment variable SSL_SEARCH_STORAGE
when set, else the study's own (default sqlite:///<runs_dir>/ssl-search.db). A URL with a
password belongs in SSL_SEARCH_STORAGE, never on a command line, where any user of the machine
can read it (/proc/PID/cmdline); the other commands read it with
storage='${oc.env:SSL_SEARCH_STORAGE}' (quotes included). For example::

    read -rs SSL_SEARCH_STORAGE && export SSL_SEARCH_STORAGE   # type the URL, unechoed
    python -m search.dashboard study=quickstart

--print-command prints the equivalent optuna-dashboard command instead (any password shown as
***; that plain command serves read-write). Stop the server with Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from urllib.parse import urlsplit
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from models.errors import UsageError
from reporting.store import locate, open_existing_storage, require_study
from search.cli import guarded, parser, split_study
from search.config import resolved_paths, storage_url
from search.database import (
    STORAGE_ENV,
    check_url,
    has_secret,
    redact,
)
from search.naming import STAGES, stage_study_name

HOST = "127.0.0.1"
# Host header names a request may carry (any port): the server's own loopback names.
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
READ_METHODS = ("GET", "HEAD")

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def dashboard_command(url: str, artifacts_dir: str, port: int, host: str = HOST) -> list[str]:
    """The optuna-dashboard command line for ``url`` and ``artifacts_dir``, secrets masked."""
    exe = shutil.which("optuna-dashboard", path=os.path.dirname(sys.executable))
    prefix = [exe] if exe else [sys.executable, "-m", "optuna_dashboard._cli"]  # same venv
    return [
        *prefix,
        redact(url),
        "--host",
        host,
        "--port",
        str(port),
        "--artifact-dir",
        artifacts_dir,
    ]


# ---- the guard: read-only, loopback Host names only --------------------------------------


def host_name(header: str | None) -> str | None:
    """The name of a ``Host`` header without its port, lowercased; None when malformed."""
    text = (header or "").strip().lower()
    if text.startswith("["):  # [IPv6]:port
        name, sep, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else rest
        if not sep or (rest and not rest.startswith(":")):
            return None
    else:
        name, _, port = text.partition(":")
    if not name or (port and not port.isdigit()):
        return None
    return name


def is_loopback_host(header: str | None) -> bool:
    """Whether a ``Host`` header names this machine's loopback (127.0.0.1, localhost, [::1])."""
    return host_name(header) in LOOPBACK_NAMES


def is_loopback_origin(header: str | None) -> bool:
    """Whether an ``Origin`` header is absent or a page served from a loopback name.

    A browser sends ``Origin`` with every cross-site request: a page elsewhere (or ``null``,
    a sandboxed or local file) must not drive the dashboard even where edits are allowed.
    """
    if header is None:
        return True
    try:
        parts = urlsplit(header.strip())
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and parts.hostname in LOOPBACK_NAMES


class DashboardGuard:
    """WSGI layer in front of optuna-dashboard: loopback Host names only; read-only by default.

    A refused request gets 403 and ``{"reason": "..."}`` (the dashboard shows a failed
    request's ``reason``); ``log``, when given, is called with one line per refusal.
    """

    def __init__(
        self, app: WSGIApp, *, allow_edits: bool = False, log: Callable[[str], None] | None = None
    ) -> None:
        self.app = app
        self.allow_edits = allow_edits
        self.log = log

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        method = str(environ.get("REQUEST_METHOD", "GET")).upper()
        path = str(environ.get("PATH_INFO", ""))
        host = environ.get("HTTP_HOST")
        if not is_loopback_host(host):
            return self.refuse(
                start_response,
                f"{method} {path} refused: Host {host!r} is not 127.0.0.1, localhost or [::1]",
            )
        origin = environ.get("HTTP_ORIGIN")
        if not is_loopback_origin(origin):
            return self.refuse(
                start_response, f"{method} {path} refused: request from another site ({origin!r})"
            )
        if method not in READ_METHODS and not self.allow_edits:
            return self.refuse(
                start_response,
                f"{method} {path} refused: the dashboard is read-only; restart "
                "python -m search.dashboard with --allow-edits to rename, delete or annotate",
            )
        return self.app(environ, start_response)

    def refuse(self, start_response: Callable[..., Any], reason: str) -> list[bytes]:
        if self.log is not None:
            self.log(reason)
        body = (json.dumps({"reason": reason}) + "\n").encode()
        start_response(
            "403 Forbidden",
            [("Content-Type", "application/json"), ("Content-Length", str(len(body)))],
        )
        return [body]


def dashboard_app(
    storage: Any,
    artifacts_dir: str | os.PathLike[str],
    *,
    allow_edits: bool = False,
    log: Callable[[str], None] | None = None,
) -> DashboardGuard:
    """optuna-dashboard's WSGI app on ``storage`` (an Optuna storage), behind the guard."""
    import optuna_dashboard
    from optuna.artifacts import FileSystemArtifactStore

    app = optuna_dashboard.wsgi(
        storage, artifact_store=FileSystemArtifactStore(os.fspath(artifacts_dir))
    )
    return DashboardGuard(app, allow_edits=allow_edits, log=log)


class ThreadedServer(ThreadingMixIn, WSGIServer):
    """wsgiref's server, one thread per request (a dashboard page asks for several at once)."""

    daemon_threads = True


class QuietHandler(WSGIRequestHandler):
    """No line per request; the guard reports what it refuses."""

    def log_message(self, *args: Any) -> None:
        pass


def serve(app: WSGIApp, port: int, host: str = HOST) -> WSGIServer:
    """A server bound to ``host:port`` (0: any free port) for ``app``; call serve_forever()."""
    try:
        return make_server(host, port, app, server_class=ThreadedServer, handler_class=QuietHandler)
    except OSError as error:
        raise UsageError(f"port: cannot listen on {host}:{port}: {error.strerror}") from error


def _study_pages(storage: Any, name: str | None, port: int) -> list[str]:
    """Dashboard URLs of the study's three stage studies (when storage already holds them)."""
    if not name:
        return []
    pages = []
    for stage in STAGES:
        try:
            study_id = storage.get_study_id_from_name(stage_study_name(name, stage))
        except KeyError:
            continue
        pages.append(f"  {stage:8s} http://{HOST}:{port}/dashboard/studies/{study_id}")
    return pages


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@guarded
def main() -> int:
    p = parser("python -m search.dashboard", __doc__.split("\n\n")[0], __doc__.split("\n\n", 1)[1])
    p.add_argument(
        "--print-command",
        action="store_true",
        help="print the equivalent optuna-dashboard command (passwords masked); serve nothing",
    )
    p.add_argument(
        "--allow-edits",
        action="store_true",
        help="let the dashboard rename and delete studies and write notes (default: read-only)",
    )
    args: argparse.Namespace = p.parse_args()
    port, rest = 8080, []
    for item in args.overrides:
        if item.startswith("port="):
            try:
                port = int(item.split("=", 1)[1])
            except ValueError as error:
                raise UsageError(f"port: {item.split('=', 1)[1]!r} is not a port number") from error
            if not 0 < port < 65536:
                raise UsageError(f"port: must be within [1, 65535], got {port}")
        else:
            rest.append(item)
    study, overrides = split_study(rest, default="all")
    name, cfg = locate(study, overrides)
    from_env = os.environ.get(STORAGE_ENV, "").strip()
    given = any(o.startswith("storage=") for o in overrides)
    url = from_env if from_env and not given else storage_url(cfg)
    check_url(url)
    artifacts = resolved_paths(cfg)["artifacts"]
    if args.print_command:
        print(" ".join(dashboard_command(url, str(artifacts), port)))
        if has_secret(url):
            _log(
                "note: the password is masked (***) and must not go on a command line; put the "
                f"URL in {STORAGE_ENV} and run python -m search.dashboard, which reads it there"
            )
        _log("note: optuna-dashboard run this way accepts edits and any Host header")
        return 0
    storage = open_existing_storage(url)
    if name is not None:
        require_study(storage, name, url, "; without study= it serves every study, also later ones")
    artifacts.mkdir(parents=True, exist_ok=True)
    server = serve(dashboard_app(storage, artifacts, allow_edits=args.allow_edits, log=_log), port)
    mode = "read-write (--allow-edits)" if args.allow_edits else "read-only"
    print(f"optuna-dashboard for {redact(url)} (artifacts in {artifacts}), {mode}")
    print(f"open http://{HOST}:{port}/dashboard")
    for line in _study_pages(storage, name, port):
        print(line)
    print("Ctrl-C stops it.", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", flush=True)
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
