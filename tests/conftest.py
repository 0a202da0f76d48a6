"""Shared fixtures: the read-only data copies, a finished quickstart, a PostgreSQL database.

Every test that needs PostgreSQL asks for ``postgres_db_url``: a database of its own, created
empty on the local server and dropped when the test ends (it is marked ``postgres``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch

if TYPE_CHECKING:
    import optuna

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

# Two cores: keep torch from oversubscribing them when pytest runs subprocesses too.
TORCH_THREADS = max(1, min(2, os.cpu_count() or 1))
torch.set_num_threads(TORCH_THREADS)


@pytest.fixture(autouse=True)
def _torch_threads_restored() -> Iterator[None]:
    """A test that runs a benchmark in-process (they set torch's thread count) must not change
    the numbers of the tests after it: results depend on the thread count."""
    yield
    if torch.get_num_threads() != TORCH_THREADS:
        torch.set_num_threads(TORCH_THREADS)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "postgres_db_url" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.postgres)


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
# The smallest stages a finished study gets: two screen trials of one epoch, one continued to 2.
TINY_STAGES = (
    "stages.screen.trials=2",
    "stages.screen.epochs=1",
    "stages.promote.top_k=1",
    "stages.promote.epochs=2",  # rungs 1 and 2: the best configuration is continued (promoted)
    "train.probe.epochs=1",
    "train.max_batches=2",
)
# The quickstart study file's own settings, as parameters of its space (copied by hand from
# studies/quickstart.yaml, not computed).
QUICKSTART_SETTINGS = {
    "channels": 16,
    "batch_size": 64,
    "optimizer": "adam",
    "adam_lr": 3.0e-3,
    "temperature": 0.5,
    "aug_strength": 1.0,
}

# ---- PostgreSQL: one fresh database per test, dropped afterwards ----------------------------

POSTGRES_SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432"
# Databases that exist on every server (``postgres``) or on the CI one (``test``): tests connect
# to one of them only to create and drop their own database, never to store anything there.
MAINTENANCE_DATABASES = ("postgres", "test")
TEST_DATABASE_PREFIX = "ssl_search_"
# How long creating or dropping a database waits for a server that is restarting (a test that
# restarts it on purpose may be running beside this one).
ADMIN_RETRY_S = 60


@pytest.fixture(scope="session")
def postgres_admin():
    """An AUTOCOMMIT engine on the server's maintenance database; skips where it is down.

    It keeps no connection between uses (``NullPool``), so a server restart in between leaves
    nothing stale behind.
    """
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    errors = []
    for database in MAINTENANCE_DATABASES:
        engine = sqlalchemy.create_engine(
            f"{POSTGRES_SERVER}/{database}",
            isolation_level="AUTOCOMMIT",
            poolclass=NullPool,
            connect_args={"connect_timeout": 3},
        )
        try:
            with engine.connect():
                pass
        except Exception as error:  # noqa: BLE001
            engine.dispose()
            errors.append(f"{database}: {str(getattr(error, 'orig', error)).strip()}")
            continue
        yield engine
        engine.dispose()
        return
    pytest.skip(f"PostgreSQL not reachable at {POSTGRES_SERVER}: {'; '.join(errors)}")


def admin_execute(admin, *statements: str, **params: str) -> None:
    """Run ``statements`` in one session, again from the start while the server is away."""
    import sqlalchemy

    deadline = time.monotonic() + ADMIN_RETRY_S
    while True:
        try:
            with admin.connect() as conn:
                for statement in statements:
                    conn.execute(sqlalchemy.text(statement), params)
            return
        except sqlalchemy.exc.OperationalError:
            # The server is restarting, or (DROP) a pooled connection of the test reconnected
            # between terminating the sessions and dropping: try the whole sequence again.
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def create_database(admin, name: str) -> None:
    admin_execute(admin, f'CREATE DATABASE "{name}"')


def drop_database(admin, name: str) -> None:
    """End every session on database ``name`` (a killed worker's too), then drop it."""
    admin_execute(
        admin,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE datname = :name AND pid <> pg_backend_pid()",
        f'DROP DATABASE IF EXISTS "{name}"',
        name=name,
    )


@pytest.fixture
def postgres_db_url(postgres_admin) -> Iterator[str]:
    """A new, empty PostgreSQL database for this test alone: its URL; dropped afterwards.

    Tests never share a database, so none sees another's studies or claims, and a test that
    leaves connections open (a killed worker, an engine still pooled) is still cleaned up.
    """
    name = f"{TEST_DATABASE_PREFIX}{uuid.uuid4().hex[:12]}"
    create_database(postgres_admin, name)
    try:
        yield f"{POSTGRES_SERVER}/{name}"
    finally:
        drop_database(postgres_admin, name)


def run_module(
    module: str, *args: str, timeout: float = 600, **env_vars: str
) -> subprocess.CompletedProcess:
    """``python -m module args`` from the repository root, with ``env_vars`` set in its
    environment; output captured as text."""
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONUNBUFFERED="1", **env_vars)
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_one_line_error(result: subprocess.CompletedProcess, key: str) -> str:
    """``result`` exited 2 with no traceback and one line on stderr naming ``key``; that line."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {key}"), lines[0]
    return lines[0]


def trace_shapes(
    net: torch.nn.Module, x: torch.Tensor, shaped: tuple[type, ...], *, eval_mode: bool = False
) -> list[tuple[str, tuple[int, ...]]]:
    """(layer type, per-sample output shape) for every layer of a ``shaped`` type that ``net(x)``
    runs, in execution order (no gradients; in eval mode first if ``eval_mode``)."""
    seen: list[tuple[str, tuple[int, ...]]] = []
    handles = [
        m.register_forward_hook(
            lambda mod, _inp, out: seen.append((type(mod).__name__, tuple(out.shape[1:])))
        )
        for m in net.modules()
        if isinstance(m, shaped)
    ]
    try:
        if eval_mode:
            net.eval()
        with torch.no_grad():
            net(x)
    finally:
        for h in handles:
            h.remove()
    return seen


def tiny_trained_trial(
    tmp_path: Path, task: str, *, train_subset: int, val_subset: int, **model: Any
) -> tuple[optuna.Study, optuna.trial.Trial, Any]:
    """A running screen trial with a one-epoch curve (digits, 2 batches) in a new SQLite study,
    and the Run of ``task`` that trained it: (study, trial, run)."""
    from dataclasses import asdict

    import optuna

    from models.config import DataConfig, ModelConfig, TrainConfig
    from models.data import load_splits
    from models.training import Run
    from search import curve_attr

    splits = load_splits(
        DataConfig(name="digits", train_subset=train_subset, val_subset=val_subset)
    )
    config = ModelConfig(channels=4, encoder_kernels=[3, 3, 3], **model)
    torch.manual_seed(0)
    run = Run(task, splits, config, TrainConfig(epochs=1, max_batches=2, progress=False))
    history = run.pretrain()
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'db.sqlite'}", study_name="t")
    trial = study.ask()
    trial.set_user_attr("stage", "screen")
    for h in history:
        trial.set_user_attr(curve_attr(h.phase, h.epoch), asdict(h))
    return study, trial, run


def interrupt_and_collect(proc: subprocess.Popen, timeout: float) -> str:
    """Send ``proc`` SIGINT and return its (text) output; killed if it outlives ``timeout`` s."""
    proc.send_signal(signal.SIGINT)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate(timeout=timeout)
    return out


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


def wait_until_a_zombie(pid: int) -> None:
    """Wait until child ``pid`` has exited and is not reaped yet (state Z in /proc)."""
    deadline = time.monotonic() + 30
    while Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z":
        assert time.monotonic() < deadline, f"process {pid} did not exit"
        time.sleep(0.05)


_HOLD_LOCK = textwrap.dedent(
    """
    import sqlite3, sys, time
    from pathlib import Path
    db, marker, seconds = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3])
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("BEGIN EXCLUSIVE")
    marker.write_text("locked")
    time.sleep(seconds)
    conn.execute("COMMIT")
    conn.close()
    """
)


def hold_sqlite_lock(db: Path, seconds: float, tmp_path: Path) -> subprocess.Popen:
    """Another process holding ``db``'s write lock for ``seconds``; returns once it has it."""
    marker = tmp_path / f"locked-{uuid.uuid4().hex[:8]}"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(db), str(marker), str(seconds)]
    )
    deadline = time.monotonic() + 20
    while not marker.exists():
        if holder.poll() is not None or time.monotonic() > deadline:
            holder.kill()
            raise AssertionError("the lock-holding process did not start")
        time.sleep(0.02)
    return holder
