"""Faults and misuse: nothing lost, nothing trained twice, nothing resumed that is not its own.

Real SQLite files, real checkpoints, real ``search.run`` processes and real signals.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from search import (
    PRETRAIN_FILE,
    TrialRunner,
    load_config,
    open_studies,
    run_stages,
    stage_study_name,
    summarize,
)
from search.database import WORKER_STORAGE_ENV
from search.pool import STOP_GRACE_S, STOP_WAIT_S
from tests.conftest import REPO_ROOT, hold_sqlite_lock, interrupt_and_collect, run_module

# Every test here trains or starts search.run processes.
pytestmark = pytest.mark.slow

# Tiny screens on scikit-learn's digits: every trial trains 2 epochs of 2 batches.
TINY = [
    "stage=screen",
    "stages.screen.epochs=2",
    "train.max_batches=2",
    "search.pruner.name=none",
    "search.space.channels.choices=[8]",
    "train.knn_max_train=200",
]


def screen_trials(url: str, name: str = "quickstart") -> list[optuna.trial.FrozenTrial]:
    study = optuna.load_study(study_name=stage_study_name(name, "screen"), storage=url)
    return study.get_trials(deepcopy=False)


def run_screen(tmp_path: Path, *overrides: str) -> tuple[str, list[optuna.trial.FrozenTrial]]:
    cfg = load_config("quickstart", [f"runs_dir={tmp_path}", *TINY, *overrides])
    url = cfg.storage or f"sqlite:///{tmp_path / 'ssl-search.db'}"
    studies = open_studies(cfg, url)
    run_stages(studies, TrialRunner(cfg, device="cpu", progress=False), cfg)
    return url, screen_trials(url, cfg.name)


def checkpoint_of(tmp_path: Path, trial: optuna.trial.FrozenTrial) -> Path:
    return tmp_path / "checkpoints" / trial.user_attrs["checkpoint_dir"] / PRETRAIN_FILE


# ---- 0: a checkpoint is resumed only by the trial it belongs to ------------------------------


def test_another_storage_with_the_same_name_and_runs_dir_trains_from_scratch(tmp_path):
    first_url, first = run_screen(tmp_path, "stages.screen.trials=2")
    assert all(t.state == TrialState.COMPLETE for t in first)
    # Same study name, same runs_dir (so the same checkpoints folder), another database and
    # other settings: before, every trial "resumed" the first study's finished checkpoints.
    other = f"sqlite:///{tmp_path / 'other.db'}"
    _, second = run_screen(
        tmp_path, "stages.screen.trials=2", f"storage={other}", "train.temperature=0.9"
    )
    assert [t.state for t in second] == [TrialState.COMPLETE] * 2
    for t in second:
        assert t.user_attrs.get("resumed_from_epoch") is None, t.user_attrs
        assert t.user_attrs["epochs_run"] == 2
    assert {t.user_attrs["checkpoint_dir"] for t in second}.isdisjoint(
        t.user_attrs["checkpoint_dir"] for t in first
    )
    # The first study's checkpoints are untouched.
    assert all(checkpoint_of(tmp_path, t).is_file() for t in first)


def test_a_deleted_database_with_kept_runs_folder_trains_from_scratch(tmp_path):
    url, first = run_screen(tmp_path, "stages.screen.trials=1")
    Path(url.removeprefix("sqlite:///")).unlink()
    _, again = run_screen(tmp_path, "stages.screen.trials=1")
    assert again[0].state == TrialState.COMPLETE
    assert again[0].user_attrs.get("resumed_from_epoch") is None
    assert again[0].user_attrs["checkpoint_dir"] != first[0].user_attrs["checkpoint_dir"]


def _enqueue_retry_of_first_trial(url: str) -> None:
    """Make trial #0's configuration run again as a retry of #0 (as after a killed worker)."""
    study = optuna.load_study(study_name=stage_study_name("quickstart", "screen"), storage=url)
    first = study.get_trials(deepcopy=True)[0]
    first.state = TrialState.FAIL  # the callback reads only number, params, attrs
    optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3)(study, first)


def test_a_checkpoint_written_for_other_settings_is_set_aside_not_resumed(tmp_path):
    url, first = run_screen(tmp_path, "stages.screen.trials=1")
    path = checkpoint_of(tmp_path, first[0])
    # The retry of trial #0 runs under other settings (another projection width): its folder holds a
    # checkpoint whose fingerprint differs. (The study refuses to be opened with other settings;
    # a worker of another version, or a study edited in storage, is what gets here.)
    _enqueue_retry_of_first_trial(url)
    same = load_config("quickstart", [f"runs_dir={tmp_path}", *TINY, "stages.screen.trials=1"])
    cfg = load_config(
        "quickstart",
        [f"runs_dir={tmp_path}", *TINY, "stages.screen.trials=1", "model.projection_dim=32"],
    )
    run_stages(open_studies(same, url), TrialRunner(cfg, device="cpu", progress=False), cfg)
    retry = screen_trials(url)[-1]
    assert retry.state == TrialState.COMPLETE
    assert retry.user_attrs.get("resumed_from_epoch") is None
    assert "other settings" in retry.user_attrs["checkpoint_discarded"]
    assert path.with_name(path.name + ".mismatch").is_file()
    assert retry.user_attrs["epochs_run"] == 2


# ---- 1: a corrupt checkpoint never loses the configuration -----------------------------------


@pytest.mark.parametrize("damage", ["truncate", "garble", "empty"])
def test_a_corrupt_checkpoint_is_kept_aside_and_the_trial_trains_from_epoch_0(tmp_path, damage):
    url, first = run_screen(tmp_path, "stages.screen.trials=1")
    path = checkpoint_of(tmp_path, first[0])
    data = path.read_bytes()
    damaged = {"truncate": data[: len(data) // 2], "garble": os.urandom(len(data)), "empty": b""}[
        damage
    ]
    path.write_bytes(damaged)
    _enqueue_retry_of_first_trial(url)
    cfg = load_config("quickstart", [f"runs_dir={tmp_path}", *TINY, "stages.screen.trials=1"])
    studies = open_studies(cfg, url)
    run_stages(studies, TrialRunner(cfg, device="cpu", progress=False), cfg)
    retry = screen_trials(url)[-1]
    assert retry.state == TrialState.COMPLETE, retry.user_attrs
    assert retry.params == first[0].params
    assert "unreadable" in retry.user_attrs["checkpoint_discarded"]
    assert path.with_name(path.name + ".corrupt").read_bytes() == damaged  # kept for inspection
    assert path.is_file()  # a fresh, good checkpoint
    assert summarize(studies, cfg)["stages"]["screen"]["without_result"] == {}


def test_a_garbage_promoted_checkpoint_fails_the_final_with_a_reason_and_exit_1(tmp_path):
    base = [
        f"runs_dir={tmp_path}",
        *[o for o in TINY if not o.startswith("stage=")],
        "stages.screen.trials=1",
        "stages.promote.top_k=1",
        "stages.promote.epochs=2",  # the long run is at least the screen
        "train.probe.epochs=1",
    ]
    done = run_module(
        "search.run", "study=quickstart", "stages.final.enabled=false", *base, "--no-progress"
    )
    assert done.returncode == 0, done.stderr[-2000:]
    url = f"sqlite:///{tmp_path / 'ssl-search.db'}"
    promoted = optuna.load_study(
        study_name=stage_study_name("quickstart", "promote"), storage=url
    ).get_trials()[0]
    # Every encoder checkpoint the final could use (the last epoch's and the best one's).
    for path in checkpoint_of(tmp_path, promoted).parent.glob("*.pt"):
        path.write_bytes(b"not a checkpoint at all")
    done = run_module("search.run", "study=quickstart", "stage=final", *base, "--no-progress")
    assert done.returncode == 1, done.stdout[-2000:]
    final = optuna.load_study(study_name=stage_study_name("quickstart", "final"), storage=url)
    (trial,) = final.get_trials()
    assert trial.state == TrialState.FAIL
    assert "unreadable" in trial.user_attrs["fail_reason"]
    assert "weights_only" not in trial.user_attrs["fail_reason"]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 1 configuration(s) ended without a result: quickstart.final#0")
    # Said in the worker's line for the trial, not under Optuna's traceback.
    said = done.stdout + done.stderr
    assert "Traceback" not in said and "failed with parameters" not in said, said[-3000:]
    assert "quickstart.final #0 FAIL" in said and "unreadable" in said


# ---- 2: no configuration proposed twice --------------------------------------------------------


def test_a_rerun_samples_new_configurations_not_the_first_runs_again(tmp_path):
    url, _ = run_screen(tmp_path, "stages.screen.trials=2")
    # The same study asked for more trials, as after a crash: a new process, a new seed stream.
    _, trials = run_screen(tmp_path, "stages.screen.trials=4")
    params = [tuple(sorted(t.params.items())) for t in trials]
    assert len(trials) == 4 and len(set(params)) == 4, params


def test_two_processes_at_once_train_distinct_configurations(tmp_path):
    args = [
        "study=quickstart",
        f"runs_dir={tmp_path}",
        *TINY,
        "stages.screen.trials=6",
        "search.sampler.name=random",
        "--no-progress",
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    url = f"sqlite:///{tmp_path / 'ssl-search.db'}"
    # Create the schema first (several processes creating tables at once collide).
    open_studies(load_config("quickstart", [f"runs_dir={tmp_path}", *TINY]), url, seed_offset=0)
    procs = [
        subprocess.Popen([sys.executable, "-m", "search.run", *args], cwd=REPO_ROOT, env=env)
        for _ in range(2)
    ]
    assert [p.wait(timeout=600) for p in procs] == [0, 0]
    trained = [t for t in screen_trials(url) if "duplicate_of" not in t.user_attrs]
    params = [tuple(sorted(t.params.items())) for t in trained]
    assert len(params) == 6 and len(set(params)) == 6, params


def test_a_space_smaller_than_the_budget_skips_duplicates_and_ends(tmp_path):
    # Three configurations in all: every parameter pinned to one choice but the optimizer.
    space = [
        f"search.space.{name}.choices=[{value}]"
        for name, value in [
            ("batch_size", 64),
            ("adam_lr", 0.003),
            ("sgd_lr", 0.01),
            ("lars_lr", 0.1),
            ("lars_warmup_epochs", 0),
            ("temperature", 0.5),
            ("aug_strength", 1.0),
        ]
    ]
    cfg_overrides = [*TINY, "stages.screen.trials=4", "search.sampler.name=random"]
    url, trials = run_screen(tmp_path, *cfg_overrides, *space)
    trained = [t for t in trials if "duplicate_of" not in t.user_attrs]
    skipped = [t for t in trials if "duplicate_of" in t.user_attrs]
    assert len({t.params["optimizer"] for t in trained}) == len(trained) == 3
    assert skipped and all(t.state == TrialState.PRUNED for t in skipped)
    assert all("same configuration as trial" in t.user_attrs["prune_reason"] for t in skipped)
    assert all(t.user_attrs.get("epochs_run") is None for t in skipped)  # nothing trained


# ---- 6: the launcher reports failed workers and stops them on a signal ------------------------


def test_when_every_worker_fails_the_launcher_exits_1_with_each_workers_error(tmp_path):
    # The launcher checks the data itself before it starts workers, so the workers' failure is
    # planted in them alone: Python imports sitecustomize at start-up, and only a launched
    # worker has the storage URL in its environment.
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import os, sys\n"
        f"if os.environ.get({WORKER_STORAGE_ENV!r}):\n"
        "    sys.exit('error: data unreadable on this worker (planted by the test)')\n"
    )
    done = run_module(
        "search.run",
        "study=quickstart",
        f"runs_dir={tmp_path / 'runs'}",
        "workers=2",
        "--no-progress",
        PYTHONPATH=f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    )
    assert done.returncode == 1, (done.returncode, done.stderr[-2000:])
    line = [x for x in done.stderr.splitlines() if x.startswith("error: every worker failed")]
    assert line, done.stderr[-2000:]
    assert "w0:cpu" in line[0] and "w1:cpu" in line[0] and "data" in line[0]


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def _launch_two_workers(tmp_path: Path, background: bool = False) -> subprocess.Popen:
    """``search.run`` with two worker processes on a long screen, returned once a trial has
    trained an epoch (its checkpoint is the marker)."""
    args = [
        "study=quickstart",
        f"runs_dir={tmp_path}",
        "stage=screen",
        "workers=2",
        "stages.screen.trials=4",
        "stages.screen.epochs=50",
        "stages.promote.epochs=50",  # the long run is at least the screen
        "search.pruner.name=none",
        "search.space.channels.choices=[8]",
        "--no-progress",
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1")

    def as_background_job() -> None:  # what a shell does for `cmd &`
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    launcher = subprocess.Popen(
        [sys.executable, "-m", "search.run", *args],
        cwd=REPO_ROOT,
        env=env,
        preexec_fn=as_background_job if background else None,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while not list((tmp_path / "checkpoints").glob(f"*/trial-*/{PRETRAIN_FILE}")):
        assert time.monotonic() < deadline and launcher.poll() is None, "no trial got going"
        time.sleep(0.5)
    return launcher


def _assert_stopped_and_requeued(workers: list[int], url: str) -> None:
    for pid in workers:
        assert (
            not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
        )
    trials = screen_trials(url)
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    waiting = [t for t in trials if t.state == TrialState.WAITING]
    assert waiting, [(t.number, t.state) for t in trials]  # re-enqueued to resume


@pytest.mark.parametrize("background", [False, True])
def test_sigterm_to_the_launcher_stops_its_workers_and_requeues(tmp_path, background):
    launcher = _launch_two_workers(tmp_path, background)
    workers = _children(launcher.pid)
    assert len(workers) == 2
    launcher.send_signal(signal.SIGTERM)
    assert launcher.wait(timeout=60) == 128 + signal.SIGTERM  # 143: a TERM, not a Ctrl-C
    _assert_stopped_and_requeued(workers, f"sqlite:///{tmp_path / 'ssl-search.db'}")


def test_workers_stopped_during_a_storage_outage_requeue_once_it_ends(tmp_path):
    """The launcher waits for its stopped workers as long as their re-enqueue may retry a
    storage call (the retry bound), not less: a worker killed mid-outage would leave its trial
    RUNNING, to be retried by the heartbeat as a counted retry. Here the database is locked for
    longer than the signal grace (``STOP_GRACE_S``), within the retry bound."""
    launcher = _launch_two_workers(tmp_path)
    workers = _children(launcher.pid)
    assert len(workers) == 2
    db = tmp_path / "ssl-search.db"
    locked_s = STOP_GRACE_S + 15
    assert locked_s < STOP_WAIT_S
    holder = hold_sqlite_lock(db, locked_s, tmp_path)
    stopped_at = time.monotonic()
    launcher.send_signal(signal.SIGTERM)
    try:
        assert launcher.wait(timeout=STOP_WAIT_S + 60) == 128 + signal.SIGTERM
    finally:
        holder.wait(timeout=locked_s + 30)
    # The workers could not re-enqueue before the lock was released: the outage was real.
    assert time.monotonic() - stopped_at >= locked_s - 1
    _assert_stopped_and_requeued(workers, f"sqlite:///{db}")


# ---- 3: a storage fault is ridden out, not a crash or a lost trial -----------------------------


def _restart_postgres() -> None:
    cluster = sorted(os.listdir("/etc/postgresql"))[0]
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", cluster, "main", "restart"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    for _ in range(120):
        ready = subprocess.run(["pg_isready", "-h", "127.0.0.1", "-p", "5432", "-q"])
        if ready.returncode == 0:
            return
        time.sleep(0.5)
    raise AssertionError("PostgreSQL did not come back")


@pytest.mark.postgres
def test_a_postgres_restart_during_a_trial_is_ridden_out(tmp_path, postgres_db_url):
    if not Path("/etc/postgresql").is_dir() or os.geteuid() != 0:
        pytest.skip("needs the local PostgreSQL cluster and root to restart it")
    args = [
        "study=quickstart",
        f"runs_dir={tmp_path}",
        f"storage={postgres_db_url}",
        *TINY,
        "stages.screen.trials=2",
        "stages.screen.epochs=6",
        "--no-progress",
    ]
    run = subprocess.Popen(
        [sys.executable, "-m", "search.run", *args],
        cwd=REPO_ROOT,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while not list((tmp_path / "checkpoints").glob(f"*/trial-*/{PRETRAIN_FILE}")):
        assert time.monotonic() < deadline and run.poll() is None, run.communicate()
        time.sleep(0.2)
    _restart_postgres()  # mid-trial: the first trial has trained an epoch, not six
    out, err = run.communicate(timeout=600)
    assert run.returncode == 0, err[-3000:]
    assert "Traceback" not in err
    trials = screen_trials(postgres_db_url)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2, [
        (t.number, t.state, t.user_attrs.get("fail_reason")) for t in trials
    ]


# ---- 5: a stage study deleted from the dashboard does not leave the study stuck ----------------


def test_a_deleted_stage_study_is_recreated_and_its_stale_claims_released(tmp_path):
    url, first = run_screen(tmp_path, "stages.screen.trials=1")
    optuna.delete_study(study_name=stage_study_name("quickstart", "screen"), storage=url)
    # Before, its claim rows (baseline enqueued, slot 0 taken) outlived it: a rerun waited for
    # an enqueue that never came, then exited 1. Now the new study starts clean, saying so.
    with pytest.warns(UserWarning, match="released .* claim"):
        _, again = run_screen(tmp_path, "stages.screen.trials=1")
    assert [t.state for t in again] == [TrialState.COMPLETE]
    assert again[0].user_attrs["checkpoint_dir"] != first[0].user_attrs["checkpoint_dir"]


def test_search_train_interrupted_says_how_to_resume_and_resumes(tmp_path):
    """Ctrl-C in ``search.train``: one line (no traceback), exit 130, and the same command
    continues from the last checkpoint instead of starting over."""
    args = [
        "-m",
        "search.train",
        "study=quickstart",
        f"runs_dir={tmp_path}",
        "train.epochs=40",
        "train.progress=false",
        "train.knn_max_train=200",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")

    def start() -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, *args],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    proc = start()
    seen = ""
    while "[pretrain 2/40]" not in seen:  # two epochs done: a checkpoint is on disk
        line = proc.stdout.readline()
        assert line, f"search.train ended early:\n{seen}"
        seen += line
    out = seen + interrupt_and_collect(proc, timeout=120)
    assert proc.returncode == 130, out
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out
    assert "interrupted: run the same command again to resume" in out
    # The same command again resumes: its first trained epoch is past epoch 2.
    again = start()
    first_epoch = ""
    while not first_epoch.startswith("[pretrain "):
        first_epoch = again.stdout.readline()
        assert first_epoch, "search.train ended before training"
    interrupt_and_collect(again, timeout=120)
    assert int(first_epoch.split()[1].split("/")[0]) > 2, first_epoch
