"""Shared fixtures: the read-only data copies beside the checkout, and a scratch runs folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

# Two cores: keep torch from oversubscribing them when pytest runs subprocesses too.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The ../shared/data folder (MNIST IDX files and the CIFAR-10 JPEG copy)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data copies not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def mnist_root(shared_data: Path) -> Path:
    if not (shared_data / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file():
        pytest.skip(f"MNIST IDX files not found under {shared_data / 'MNIST' / 'raw'}")
    return shared_data


@pytest.fixture(scope="session")
def cifar_root(shared_data: Path) -> Path:
    if not (shared_data / "cifar10-jpeg" / "train").is_dir():
        pytest.skip(f"CIFAR-10 JPEG copy not found under {shared_data / 'cifar10-jpeg'}")
    return shared_data


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One decoded-image cache for the whole test session (CIFAR JPEGs decode once)."""
    return tmp_path_factory.mktemp("cache")


# ---- a finished quickstart study, shared by the report and dashboard tests ----------------

# Small enough for a test; the median pruner with one startup trial makes pruning likely.
QUICKSTART_OVERRIDES = (
    "stages.screen.trials=5",
    "stages.screen.epochs=3",
    "stages.promote.top_k=2",
    "stages.promote.epochs=3",
    "train.probe.epochs=2",
    "train.max_batches=4",
    "search.pruner.name=median",
    "search.pruner.n_startup_trials=1",
    "search.space.channels.choices=[8]",
)
POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """The local PostgreSQL server (CI starts it); tests skip with the reason where it is down."""
    import sqlalchemy

    try:
        engine = sqlalchemy.create_engine(POSTGRES_URL, connect_args={"connect_timeout": 3})
        with engine.connect():
            pass
        engine.dispose()
    except Exception as error:  # noqa: BLE001
        pytest.skip(f"PostgreSQL not reachable at {POSTGRES_URL}: {error}")
    return POSTGRES_URL


def run_module(module: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m module args`` from the repository root; output captured as text."""
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def finished_quickstart(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """The quickstart study run once per session, small: (runs_dir, the overrides it ran with).

    The overrides include ``runs_dir=...``; pass them on to ``search.report`` or
    ``search.dashboard`` to find the same storage, checkpoints and artifacts.
    """
    runs_dir = tmp_path_factory.mktemp("quickstart-runs")
    overrides = [f"runs_dir={runs_dir}", *QUICKSTART_OVERRIDES]
    done = run_module("search.run", "study=quickstart", *overrides, "--no-progress")
    if done.returncode != 0:
        pytest.fail(
            f"quickstart failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    return runs_dir, overrides
