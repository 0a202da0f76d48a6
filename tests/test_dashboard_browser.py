"""optuna-dashboard against a finished quickstart: its API, an artifact, and headless Chromium.

The browser test is skipped where no Chromium is installed (``.ci/run`` installs Debian's
``chromium``). The server is started through ``python -m search.dashboard`` on a free loopback
port, polled until it answers, and stopped (by its process id) in ``finally``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import REPO_ROOT, run_module

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def chromium_path() -> str | None:
    if Path("/usr/bin/chromium").is_file():
        return "/usr/bin/chromium"
    return shutil.which("chromium") or shutil.which("chromium-browser")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(url: str, timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - loopback only
        return response.status, dict(response.headers), response.read()


def get_json(url: str) -> dict:
    return json.loads(get(url)[2])


def wait_ready(base: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"dashboard exited with {proc.returncode}:\n{out}")
        try:
            if get(f"{base}/api/meta", timeout=2)[0] == 200:
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.3)
    raise AssertionError(f"dashboard did not answer at {base} within {timeout}s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.mark.slow
def test_dashboard_wrapper_binds_to_loopback_with_the_artifact_dir(finished_quickstart):
    runs_dir, overrides = finished_quickstart
    done = run_module(
        "search.dashboard", "study=quickstart", *overrides, "port=8123", "--print-command"
    )
    assert done.returncode == 0, done.stderr
    command = done.stdout.strip()
    assert f"sqlite:///{runs_dir / 'ssl-search.db'}" in command
    assert "--host 127.0.0.1" in command and "--port 8123" in command
    assert f"--artifact-dir {runs_dir / 'artifacts'}" in command
    done = run_module("search.dashboard", "study=quickstart", "port=http")
    assert done.returncode == 2 and done.stderr.startswith("error: port:")


@pytest.mark.slow
@pytest.mark.skipif(
    chromium_path() is None, reason="no Chromium installed (apt-get install chromium)"
)
def test_dashboard_serves_trials_and_artifacts_and_renders_in_chromium(
    finished_quickstart, tmp_path
):
    runs_dir, overrides = finished_quickstart
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "search.dashboard", "study=quickstart", *overrides, f"port={port}"],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_ready(base, proc)
        assert get_json(f"{base}/api/meta")["artifact_is_available"] is True
        studies = {s["study_name"]: s for s in get_json(f"{base}/api/studies")["study_summaries"]}
        assert {"quickstart.screen", "quickstart.promote", "quickstart.final"} <= set(studies)

        # Every stage's trials are listed; finished trials carry their artifacts.
        import optuna

        url = f"sqlite:///{runs_dir / 'ssl-search.db'}"
        artifact = None
        for stage in ("screen", "promote", "final"):
            study_id = studies[f"quickstart.{stage}"]["study_id"]
            detail = get_json(f"{base}/api/studies/{study_id}")
            stored = optuna.load_study(study_name=f"quickstart.{stage}", storage=url)
            assert [t["number"] for t in detail["trials"]] == [t.number for t in stored.trials]
            for trial in detail["trials"]:
                if trial["state"] == "Complete":
                    names = {a["filename"] for a in trial["artifacts"]}
                    assert "learning_curves.png" in names, (stage, trial["number"])
                    if artifact is None:
                        artifact = (study_id, trial["trial_id"], trial["artifacts"][0])
        assert artifact is not None
        study_id, trial_id, meta = artifact
        status, headers, body = get(f"{base}/artifacts/{study_id}/{trial_id}/{meta['artifact_id']}")
        assert status == 200 and headers["Content-Type"] == "image/png"
        assert body[:8] == PNG_MAGIC and len(body) > 5000

        # The study page and the trial page with its artifacts, in headless Chromium.
        screen_id = studies["quickstart.screen"]["study_id"]
        final_id = studies["quickstart.final"]["study_id"]
        pages = {
            "study": f"{base}/dashboard/studies/{screen_id}",
            "trial": f"{base}/dashboard/studies/{final_id}/trials?numbers=0",
        }
        shots = Path(os.environ.get("DASHBOARD_SCREENSHOT_DIR", tmp_path))
        shots.mkdir(parents=True, exist_ok=True)
        for name, page in pages.items():
            shot = shots / f"dashboard-{name}.png"
            chromium(page, tmp_path / f"profile-{name}", screenshot=shot)
            assert shot.is_file() and shot.read_bytes()[:8] == PNG_MAGIC
            assert shot.stat().st_size > 20_000, f"{name} screenshot looks blank"
        dom = chromium(pages["study"], tmp_path / "profile-dom", dump_dom=True)
        assert "quickstart.screen" in dom
    finally:
        stop(proc)
    assert proc.poll() is not None


def chromium(
    url: str, profile: Path, screenshot: Path | None = None, dump_dom: bool = False
) -> str:
    """Load ``url`` in a fresh headless Chromium; save a screenshot or return the DOM."""
    cmd = [
        chromium_path(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--window-size=1400,1000",
        "--virtual-time-budget=8000",
    ]
    cmd += [f"--screenshot={screenshot}"] if screenshot else []
    cmd += ["--dump-dom"] if dump_dom else []
    done = subprocess.run([*cmd, url], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout
