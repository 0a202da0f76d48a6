"""Open a study in optuna-dashboard: ``python -m search.dashboard study=NAME [port=8080]``.

A thin wrapper around ``optuna-dashboard <storage-url> --artifact-dir <dir>`` that takes the
storage URL and artifact folder from the study's settings (``runs_dir=``, ``storage=``,
``artifacts_dir=`` overrides apply), binds to 127.0.0.1 only, and prints the URL to open. Every
trial's figures are under its "Artifacts" panel. For the default storage this is the same as::

    optuna-dashboard sqlite:///runs/ssl-search.db --artifact-dir runs/artifacts

``study=`` may also name a study that exists only in storage; ``--print-command`` prints the
command instead of running it. Stop the server with Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

from models.errors import UsageError
from reporting.store import locate
from search.cli import guarded, parser, split_study
from search.config import resolved_paths, storage_url
from search.database import check_url, redact
from search.naming import STAGES, stage_study_name

HOST = "127.0.0.1"


def dashboard_command(url: str, artifacts_dir: str, port: int, host: str = HOST) -> list[str]:
    """The optuna-dashboard command line for ``url`` and ``artifacts_dir``."""
    exe = shutil.which("optuna-dashboard", path=os.path.dirname(sys.executable))
    prefix = [exe] if exe else [sys.executable, "-m", "optuna_dashboard._cli"]  # same venv
    return [
        *prefix,
        url,
        "--host",
        host,
        "--port",
        str(port),
        "--artifact-dir",
        artifacts_dir,
    ]


def _study_pages(url: str, name: str | None, port: int) -> list[str]:
    """Dashboard URLs of the study's three stage studies (when storage already holds them)."""
    import optuna

    if not name:
        return []
    try:
        storage = optuna.storages.RDBStorage(url, skip_table_creation=True)
    except Exception:  # noqa: BLE001 - pages are a convenience only
        return []
    pages = []
    for stage in STAGES:
        try:
            study_id = storage.get_study_id_from_name(stage_study_name(name, stage))
        except Exception:  # noqa: BLE001
            continue
        pages.append(f"  {stage:8s} http://{HOST}:{port}/dashboard/studies/{study_id}")
    storage.remove_session()
    return pages


@guarded
def main() -> int:
    p = parser("python -m search.dashboard", __doc__.split("\n\n")[0], __doc__.split("\n\n", 1)[1])
    p.add_argument("--print-command", action="store_true", help="print the command; start nothing")
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
    url = storage_url(cfg)
    check_url(url)
    artifacts = resolved_paths(cfg)["artifacts"]
    cmd = dashboard_command(url, str(artifacts), port)
    if args.print_command:
        print(" ".join(cmd))
        return 0
    if url.startswith("sqlite:///") and not os.path.isfile(url[len("sqlite:///") :]):
        raise UsageError(
            f"storage: no database at {url[len('sqlite:///') :]}; run python -m search.run first"
        )
    artifacts.mkdir(parents=True, exist_ok=True)  # the dashboard refuses a missing folder
    print(f"optuna-dashboard for {redact(url)} (artifacts in {artifacts})")
    print(f"open http://{HOST}:{port}/dashboard")
    for line in _study_pages(url, name, port):
        print(line)
    print("Ctrl-C stops it.", flush=True)
    # Become the server (same process id), so Ctrl-C and kill reach it directly.
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    raise SystemExit(main())
