"""Many workers on one study: real processes, real signals, real SQLite and PostgreSQL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from optuna.trial import TrialState

from search.config import load_config
from search.objective import TrialRunner
from search.stages import failure_reason, open_studies, run_stages

REPO = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")

# Screen trials of four unpruned epochs give a worker something to be killed in the middle of.
WORKER_STUDY = [
    "search.space.channels.choices=[8]",
    "data.train_subset=500",
    "stages.screen.trials=6",
    "stages.screen.epochs=4",
    "search.pruner.name=none",
    "stages.promote.top_k=2",
    "stages.promote.epochs=2",
    "train.probe.epochs=2",
    "heartbeat_interval=1",
    "grace_period=4",
]


def all_trials(url: str, name: str) -> dict[str, list[optuna.trial.FrozenTrial]]:
    return {
        stage: optuna.load_study(study_name=f"{name}.{stage}", storage=url).get_trials()
        for stage in ("screen", "promote", "final")
    }


def assert_consistent(trials: dict[str, list[optuna.trial.FrozenTrial]], top_k: int) -> None:
    """Finished, every failure explained, promotions exactly once, a final result."""
    for stage, stage_trials in trials.items():
        for t in stage_trials:
            assert t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL), (
                stage,
                t.number,
                t.state,
            )
            if t.state == TrialState.FAIL:
                assert failure_reason(t, stage_trials)
    promoted = [
        t.user_attrs["source_trial"] for t in trials["promote"] if t.state == TrialState.COMPLETE
    ]
    assert len(promoted) == top_k and len(set(promoted)) == top_k, promoted
    assert [t.state for t in trials["final"]] == [TrialState.COMPLETE]


def wait_for_running_trial_past_epoch_1(
    url: str, name: str, timeout: float
) -> optuna.trial.FrozenTrial:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            study = optuna.load_study(study_name=f"{name}.screen", storage=url)
            for t in study.get_trials(states=(TrialState.RUNNING,)):
                if t.user_attrs.get("epochs_run", 0) >= 1 and "worker" in t.user_attrs:
                    return t
        except KeyError:
            pass  # the study does not exist yet
        time.sleep(0.3)
    raise AssertionError("no trial reached its second epoch in time")


def start_run(args: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "search.run", "study=quickstart", "--no-progress", *args],
        cwd=cwd,
        env=ENV,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )


@pytest.mark.postgres
@pytest.mark.parametrize("backend,workers", [("postgres", 4), ("sqlite", 2)])
def test_sigkilled_worker_trial_is_retried_and_resumed(tmp_path, request, backend, workers):
    url = (
        request.getfixturevalue("postgres_url")
        if backend == "postgres"
        else f"sqlite:///{tmp_path / 'study.db'}"
    )
    name = f"kill-{uuid.uuid4().hex[:8]}"
    log = tmp_path / "run.log"
    proc = start_run(
        [*WORKER_STUDY, f"name={name}", f"storage={url}", f"workers={workers}", "devices=cpu",
         f"runs_dir={tmp_path}"],
        tmp_path,
        log,
    )  # fmt: skip
    try:
        victim = wait_for_running_trial_past_epoch_1(url, name, timeout=240)
        pid = int(victim.user_attrs["worker"].rsplit(":", 1)[1])
        os.kill(pid, signal.SIGKILL)
        assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    output = log.read_text()
    assert "database is locked" not in output
    assert "Traceback" not in output, output[-3000:]
    trials = all_trials(url, name)
    assert_consistent(trials, top_k=2)
    screen = trials["screen"]
    killed = next(t for t in screen if t.number == victim.number)
    assert killed.state == TrialState.FAIL
    assert "heartbeat" in failure_reason(killed, screen)
    retry = next(t for t in screen if t.system_attrs.get("failed_trial") == victim.number)
    assert retry.state == TrialState.COMPLETE
    assert retry.user_attrs["resumed_from_epoch"] >= 1
    assert retry.params == killed.params
    # Six screen slots ran, plus the one retry: no trial was lost or run twice.
    assert len([t for t in screen if "failed_trial" not in t.system_attrs]) == 6


@pytest.mark.parametrize("backend", ["postgres", "sqlite"])
def test_eight_workers_start_at_once_on_an_empty_database(tmp_path, request, backend):
    if backend == "postgres":
        server = request.getfixturevalue("postgres_url")
        db = f"ssl_search_{uuid.uuid4().hex[:10]}"
        admin = sqlalchemy.create_engine(server, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f"CREATE DATABASE {db}"))
        url = server.rsplit("/", 1)[0] + f"/{db}"
    else:
        url = f"sqlite:///{tmp_path / 'empty.db'}"
    try:
        args = [
            "study=quickstart", f"storage={url}", f"runs_dir={tmp_path}", "stage=screen",
            "stages.screen.trials=8", "stages.screen.epochs=1", "train.max_batches=2",
            "search.space.channels.choices=[8]", "device=cpu", "--no-progress",
        ]  # fmt: skip
        env = dict(ENV, OMP_NUM_THREADS="1")
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "search.worker", *args, f"label=w{i}"],
                cwd=tmp_path,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )  # fmt: skip
            for i in range(8)
        ]
        outputs = [p.communicate(timeout=600)[0] for p in procs]
        for i, (p, out) in enumerate(zip(procs, outputs, strict=True)):
            assert p.returncode == 0, f"worker {i} crashed:\n{out[-3000:]}"
            assert "Traceback" not in out
        screen = optuna.load_study(study_name="quickstart.screen", storage=url).get_trials()
        assert len(screen) == 8
        assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in screen)
        workers = Counter(t.user_attrs["worker"] for t in screen)
        assert len(workers) >= 2  # the work really was shared
    finally:
        if backend == "postgres":
            with admin.connect() as conn:
                conn.execute(
                    sqlalchemy.text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :d"
                    ),
                    {"d": db},
                )
                conn.execute(sqlalchemy.text(f"DROP DATABASE IF EXISTS {db}"))
            admin.dispose()


def test_nan_and_raising_trials_fail_with_reasons_and_the_study_completes(tmp_path):
    study = tmp_path / "faulty.yaml"
    base = (REPO / "studies" / "quickstart.yaml").read_text()
    study.write_text(base)
    cfg = load_config(
        str(study),
        [
            f"runs_dir={tmp_path}",
            "data.train_subset=300",
            "stages.screen.trials=2",
            "stages.screen.epochs=2",
            "stages.promote.top_k=1",
            "stages.promote.epochs=2",
            "train.probe.epochs=1",
            "search.pruner.name=none",
            "search.space.channels.choices=[8]",
            "search.space.adam_lr.high=1.0e30",
            "search.space.kernel={target: model.encoder_kernels.0, choices: [5, 4]}",
        ],
    )
    studies = open_studies(cfg, f"sqlite:///{tmp_path / 'faulty.db'}")
    common = {
        "channels": 8,
        "batch_size": 64,
        "optimizer": "adam",
        "temperature": 0.5,
        "aug_strength": 1.0,
    }
    studies.screen.enqueue_trial({**common, "adam_lr": 1.0e30, "kernel": 5})  # diverges
    studies.screen.enqueue_trial({**common, "adam_lr": 3.0e-3, "kernel": 4})  # raises
    run_stages(studies, TrialRunner(cfg, device="cpu", progress=False), cfg)
    screen = studies.screen.get_trials()
    failed = {t.number: failure_reason(t, screen) for t in screen if t.state == TrialState.FAIL}
    assert any("NonFiniteLossError" in r and "nan" in r for r in failed.values()), failed
    assert any("ValueError" in r and "odd" in r for r in failed.values()), failed
    assert studies.final.get_trials()[0].state == TrialState.COMPLETE


def test_ctrl_c_requeues_the_trial_and_the_next_run_resumes_it(tmp_path):
    log = tmp_path / "run.log"
    args = [
        *WORKER_STUDY,
        "stages.screen.trials=1",
        "stages.screen.epochs=6",
        f"runs_dir={tmp_path}",
    ]
    proc = start_run(args, tmp_path, log)
    url = f"sqlite:///{tmp_path / 'ssl-search.db'}"
    try:
        wait_for_running_trial_past_epoch_1(url, "quickstart", timeout=240)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    screen = all_trials(url, "quickstart")["screen"]
    assert [t.state for t in screen] == [TrialState.FAIL, TrialState.WAITING]
    assert "interrupted" in screen[0].user_attrs["fail_reason"]
    again = start_run(args, tmp_path, tmp_path / "again.log")
    assert again.wait(timeout=600) == 0, (tmp_path / "again.log").read_text()[-3000:]
    screen = all_trials(url, "quickstart")["screen"]
    assert screen[1].state == TrialState.COMPLETE
    assert screen[1].user_attrs["resumed_from_epoch"] >= 1
    assert screen[1].user_attrs.get("fail_reason") is None
