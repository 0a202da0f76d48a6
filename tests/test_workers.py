"""Many workers on one study: real processes, real signals, real SQLite and PostgreSQL."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from optuna.trial import TrialState

from models.training import Run
from search.config import load_config
from search.naming import PRETRAIN_FILE
from search.objective import TrialRunner
from search.stages import failure_reason, open_studies, run_stages
from storage.claims import Claims

REPO = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")

# Screen trials of four unpruned epochs give a worker something to be killed in the middle of.
# Heartbeats: 2 s apart, and a trial counts as dead after 20 s of silence. Several workers share
# two cores here (and other jobs may too), so a live but slow worker can miss a beat or two; 20 s
# of silence only happens to a dead one. The killed worker's trial is failed and retried about
# 20 s after the kill, which is what the kill test waits for.
WORKER_STUDY = [
    "search.space.channels.choices=[8]",
    "data.train_subset=500",
    "stages.screen.trials=6",
    "stages.screen.epochs=4",
    "search.pruner.name=none",
    "stages.promote.top_k=2",
    "stages.promote.epochs=6",  # the long run is at least the screen (up to 6 below)
    "train.probe.epochs=2",
    "heartbeat_interval=2",
    "grace_period=20",
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


def checkpoint_of(runs_dir: Path, trial: optuna.trial.FrozenTrial) -> Path | None:
    """The trial's pretraining checkpoint (rewritten after each epoch), once it has a folder."""
    folder = trial.user_attrs.get("checkpoint_dir")  # relative to the checkpoints root
    return None if folder is None else runs_dir / "checkpoints" / folder / PRETRAIN_FILE


def wait_for_checkpointed_trial(
    url: str, name: str, runs_dir: Path, timeout: float
) -> optuna.trial.FrozenTrial:
    """A RUNNING screen trial that has written its first checkpoint, so a retry can resume it.

    The marker is the checkpoint file itself: the database is not read until one exists, so
    this never races the workers creating the schema.
    """
    study_name = f"{name}.screen"
    deadline = time.monotonic() + timeout
    # Checkpoints live under <checkpoints>/<study>-<study identity>/trial-NNNNN/.
    while not any((runs_dir / "checkpoints").glob(f"{study_name}-*/trial-*/{PRETRAIN_FILE}")):
        if time.monotonic() > deadline:
            raise AssertionError(f"no screen trial wrote a checkpoint within {timeout}s")
        time.sleep(0.2)
    study = optuna.load_study(study_name=study_name, storage=url)
    while time.monotonic() < deadline:
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        # The least advanced first: the most time left to act before it finishes.
        for t in sorted(running, key=lambda t: t.user_attrs.get("epochs_run", 0)):
            path = checkpoint_of(runs_dir, t)
            if "worker" in t.user_attrs and path is not None and path.is_file():
                return t
        time.sleep(0.2)
    raise AssertionError(f"no running screen trial with a checkpoint within {timeout}s")


def worker_pid(trial: optuna.trial.FrozenTrial) -> int:
    """The process running ``trial``: its ``worker`` attr is ``hostname:pid/namespace``."""
    from storage.claims import owner_host, owner_pid

    assert owner_host(trial.user_attrs["worker"]) == socket.gethostname(), trial.user_attrs
    return owner_pid(trial.user_attrs["worker"])


def start_run(args: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "search.run", "study=quickstart", "--no-progress", *args],
        cwd=cwd,
        env=ENV,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )


def run_and_kill_one_worker(
    args: list[str], cwd: Path, find_victim: Callable[[], optuna.trial.FrozenTrial]
) -> tuple[optuna.trial.FrozenTrial, str]:
    """Run ``search.run`` with ``args``, SIGKILL the worker of the trial ``find_victim``
    returns, and wait for the run to succeed; (that trial as it was, the run's output)."""
    log = cwd / "run.log"
    proc = start_run(args, cwd, log)
    try:
        victim = find_victim()
        os.kill(worker_pid(victim), signal.SIGKILL)
        assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    return victim, log.read_text()


@pytest.mark.slow
@pytest.mark.parametrize(
    "backend,workers", [pytest.param("postgres", 4, marks=pytest.mark.postgres), ("sqlite", 2)]
)
def test_sigkilled_worker_trial_is_retried_and_resumed(tmp_path, request, backend, workers):
    url = (
        request.getfixturevalue("postgres_db_url")
        if backend == "postgres"
        else f"sqlite:///{tmp_path / 'study.db'}"
    )
    name = f"kill-{uuid.uuid4().hex[:8]}"
    # Kill exactly the worker that owns a trial mid-way: it has checkpointed an epoch.
    victim, output = run_and_kill_one_worker(
        [*WORKER_STUDY, f"name={name}", f"storage={url}", f"workers={workers}", "devices=cpu",
         f"runs_dir={tmp_path}"],
        tmp_path,
        lambda: wait_for_checkpointed_trial(url, name, tmp_path, timeout=300),
    )  # fmt: skip
    assert "database is locked" not in output
    assert "Traceback" not in output, output[-3000:]
    trials = all_trials(url, name)
    assert_consistent(trials, top_k=2)
    screen = trials["screen"]
    killed = next(t for t in screen if t.number == victim.number)
    assert killed.state == TrialState.FAIL, "the trial finished before its worker was killed"
    assert "heartbeat" in failure_reason(killed, screen)
    retry = next(t for t in screen if t.system_attrs.get("failed_trial") == victim.number)
    assert retry.state == TrialState.COMPLETE
    assert retry.user_attrs["resumed_from_epoch"] >= 1
    assert retry.params == killed.params
    # Six screen slots ran, plus the one retry: no trial was lost or run twice.
    assert len([t for t in screen if "failed_trial" not in t.system_attrs]) == 6


@pytest.mark.slow
@pytest.mark.parametrize(
    "backend", [pytest.param("postgres", marks=pytest.mark.postgres), "sqlite"]
)
def test_eight_workers_start_at_once_on_an_empty_database(tmp_path, request, backend):
    url = (
        request.getfixturevalue("postgres_db_url")
        if backend == "postgres"
        else f"sqlite:///{tmp_path / 'empty.db'}"
    )
    args = [
        "study=quickstart", f"storage={url}", f"runs_dir={tmp_path}", "stage=screen",
        "stages.screen.trials=8", "stages.screen.epochs=1", "train.max_batches=2",
        "search.space.channels.choices=[8]", "device=cpu", "--no-progress", "--create",
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
    try:
        outputs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, (p, out) in enumerate(zip(procs, outputs, strict=True)):
        assert p.returncode == 0, f"worker {i} crashed:\n{out[-3000:]}"
        assert "Traceback" not in out
    screen = optuna.load_study(study_name="quickstart.screen", storage=url).get_trials()
    # Exactly once: eight trials, each run to its end by one of these workers, none retried,
    # the baseline enqueued once and each of the seven new-trial slots handed out once.
    assert sorted(t.number for t in screen) == list(range(8))
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in screen)
    assert not any("failed_trial" in t.system_attrs for t in screen)
    assert [t.number for t in screen if t.user_attrs.get("baseline") == "report"] == [0]
    pids = {p.pid for p in procs}
    assert all(worker_pid(t) in pids for t in screen)
    engine = sqlalchemy.create_engine(url)
    try:
        claims = Claims(engine)
        assert sorted(claims.taken("quickstart.screen/slot/")) == sorted(
            f"quickstart.screen/slot/{i}" for i in range(7)
        )
        assert "quickstart.screen/baseline" in claims.taken("quickstart.screen/baseline")
    finally:
        engine.dispose()
    # No assertion on how many workers got a trial: on two cores one worker can finish all
    # eight one-epoch trials while the others are still importing torch, and that is correct.
    # The race this test is about (eight processes creating the schema and claiming the same
    # slots at once) is covered by the exactly-once checks above.


# Trials with these temperatures go wrong inside training (see the test below).
DIVERGING_TEMPERATURE = 0.456
RAISING_TEMPERATURE = 0.321


@pytest.mark.slow
def test_nan_and_raising_trials_fail_with_reasons_and_the_study_completes(tmp_path, monkeypatch):
    study = tmp_path / "faulty.yaml"
    base = (REPO / "studies" / "quickstart.yaml").read_text()
    study.write_text(base)
    cfg = load_config(
        str(study),
        [
            f"runs_dir={tmp_path}",
            "data.train_subset=300",
            "train.max_batches=2",
            "stages.screen.trials=2",
            "stages.screen.epochs=2",
            "stages.promote.top_k=1",
            "stages.promote.epochs=2",
            "train.probe.epochs=1",
            "search.pruner.name=none",
            "search.space.channels.choices=[8]",
        ],
    )
    # The configuration checks now refuse every setting that used to make a trial go wrong
    # (a learning rate of 1e30, an even kernel size), so the faults are planted: one trial's
    # training batches turn into NaN, so the training code itself finds a non-finite loss,
    # and another trial hits a bug.
    prepare_images, pretrain = Run.prepare_images, Run.pretrain

    def diverging_prepare_images(self, x_uint8, augment=None):
        x = prepare_images(self, x_uint8, augment)
        if self.temperature == DIVERGING_TEMPERATURE and augment is not None:
            return x * float("nan")
        return x

    def buggy_pretrain(self, *args, **kwargs):
        if self.temperature == RAISING_TEMPERATURE:
            raise ValueError(f"simulated bug at temperature {self.temperature}")
        return pretrain(self, *args, **kwargs)

    monkeypatch.setattr(Run, "prepare_images", diverging_prepare_images)
    monkeypatch.setattr(Run, "pretrain", buggy_pretrain)
    studies = open_studies(cfg, f"sqlite:///{tmp_path / 'faulty.db'}")
    common = {"channels": 8, "batch_size": 64, "optimizer": "adam", "adam_lr": 3.0e-3}
    studies.screen.enqueue_trial(
        {**common, "temperature": DIVERGING_TEMPERATURE, "aug_strength": 1.0}
    )
    studies.screen.enqueue_trial(
        {**common, "temperature": RAISING_TEMPERATURE, "aug_strength": 1.0}
    )
    run_stages(studies, TrialRunner(cfg, device="cpu", progress=False), cfg)
    screen = studies.screen.get_trials()
    failed = {t.number: failure_reason(t, screen) for t in screen if t.state == TrialState.FAIL}
    assert any("NonFiniteLossError" in r and "nan" in r for r in failed.values()), failed
    assert any("ValueError: simulated bug" in r for r in failed.values()), failed
    assert len(failed) == 2, failed
    assert studies.final.get_trials()[0].state == TrialState.COMPLETE


def test_a_trial_failing_while_sampling_its_parameters_says_why(tmp_path):
    cfg = load_config(
        "quickstart",
        [
            f"runs_dir={tmp_path}",
            "name=badparam",
            "stage=screen",
            "stages.screen.trials=1",
            "stages.screen.epochs=1",
            "train.max_batches=2",
            "search.space.channels.choices=[8]",
        ],
    )
    studies = open_studies(cfg, f"sqlite:///{tmp_path / 'badparam.db'}")
    # Optuna refuses a fixed categorical value outside the choices, inside suggest(): the
    # trial must still say why it failed, not read as a worker that died.
    studies.screen.enqueue_trial({"channels": 4})
    runner = TrialRunner(cfg, device="cpu", progress=False)
    studies.screen.optimize(runner.screen, n_trials=1, catch=(Exception,))
    screen = studies.screen.get_trials()
    (bad,) = [t for t in screen if t.state == TrialState.FAIL]
    assert "ValueError" in failure_reason(bad, screen), failure_reason(bad, screen)


@pytest.mark.slow
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
        wait_for_checkpointed_trial(url, "quickstart", tmp_path, timeout=300)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    said = log.read_text()  # one line saying what to do, not Optuna's warning and a traceback
    assert "interrupted: running trials were re-enqueued" in said
    assert "Traceback" not in said and "failed with" not in said, said[-3000:]
    screen = all_trials(url, "quickstart")["screen"]
    assert [t.state for t in screen] == [TrialState.FAIL, TrialState.WAITING]
    assert "interrupted" in screen[0].user_attrs["fail_reason"]
    assert failure_reason(screen[0], screen).endswith("; retried as trial 1")  # not run yet
    again = start_run(args, tmp_path, tmp_path / "again.log")
    assert again.wait(timeout=600) == 0, (tmp_path / "again.log").read_text()[-3000:]
    screen = all_trials(url, "quickstart")["screen"]
    assert screen[1].state == TrialState.COMPLETE
    resumed = screen[1].user_attrs["resumed_from_epoch"]
    assert resumed >= 1
    assert failure_reason(screen[0], screen) == (
        f"interrupted (Ctrl-C or SIGTERM); retried as trial 1, resumed from epoch {resumed}"
    )
    assert screen[1].user_attrs.get("fail_reason") is None


def test_failure_reason_tells_what_became_of_an_interrupted_trial(tmp_path):
    """Said only once known: the retry's number, and whether it resumed from a checkpoint."""
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'db.sqlite'}")

    def interrupted(max_retry: int, **attrs: int) -> optuna.trial.FrozenTrial:
        trial = study.ask()
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        trial.set_user_attr("fail_reason", "interrupted (Ctrl-C or SIGTERM)")
        study.tell(trial, state=TrialState.FAIL)
        failed = study.get_trials()[-1]
        optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry)(study, failed)
        return failed

    def reason(number: int) -> str:
        trials = study.get_trials()
        return failure_reason(trials[number], trials)

    interrupted(max_retry=3)  # trial 0; its retry is trial 1, killed in its first epoch
    assert reason(0) == "interrupted (Ctrl-C or SIGTERM); retried as trial 1"
    retry = study.ask()
    study.tell(retry, 0.5)
    assert reason(0) == (
        "interrupted (Ctrl-C or SIGTERM); retried as trial 1, from epoch 0 (no checkpoint yet)"
    )
    interrupted(max_retry=0)  # trial 2: no retries allowed
    assert reason(2) == "interrupted (Ctrl-C or SIGTERM); not retried (retries exhausted)"
    # A continuation had resumed from its rung; its queued retry inherits that attr, which
    # says nothing yet about the retry.
    interrupted(max_retry=3, resumed_from_epoch=3)  # trial 3, its retry trial 4
    assert study.get_trials()[4].user_attrs["resumed_from_epoch"] == 3  # inherited
    assert reason(3) == "interrupted (Ctrl-C or SIGTERM); retried as trial 4"
    # Its configuration given up meanwhile, the retry fails before training: it resumed nothing.
    retry = study.ask()
    retry.set_user_attr("fail_reason", "given up: host b lost its disk")
    study.tell(retry, state=TrialState.FAIL)
    assert reason(3) == "interrupted (Ctrl-C or SIGTERM); retried as trial 4, which trained nothing"


def test_failure_reason_names_the_retry_of_a_trial_a_machine_fault_failed(tmp_path):
    """A leg failed by the storage or the checkpoint store going away keeps its stored cause
    and, once queued again (free, see _run_one), says so: the summary does not read as a lost
    configuration. A failure of the configuration itself is not retried and says no more."""
    from storage.trial_retry import RetryFailedTrial

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'db.sqlite'}")
    cause = "StorageUnavailableError: the study's database could not be reached"
    for reason in (cause, "diverged: loss is nan at epoch 2"):  # trials 0 and 1
        trial = study.ask()
        trial.set_user_attr("fail_reason", reason)
        study.tell(trial, state=TrialState.FAIL)
    trials = study.get_trials()
    assert failure_reason(trials[0], trials) == cause  # its retry not queued yet
    RetryFailedTrial(max_retry=0)(study, trials[0], counted=False)  # trial 2
    trials = study.get_trials()
    assert failure_reason(trials[0], trials) == f"{cause}; retried as trial 2"
    assert failure_reason(trials[1], trials) == "diverged: loss is nan at epoch 2"
    retried = study.ask()  # the retry resumes from its checkpoint
    retried.set_user_attr("resumed_from_epoch", 2)
    study.tell(retried, 0.5)
    trials = study.get_trials()
    assert failure_reason(trials[0], trials) == f"{cause}; retried as trial 2, resumed from epoch 2"


# Rungs 1, 3, 9; legs above the first rung are promote trials. Six-epoch 3 -> 9 legs on 500
# images give time to kill a worker in the middle of a continuation (at epoch 5, 6 or 7).
RUNG_KILL_STUDY = [
    "search.space.channels.choices=[8]",
    "data.train_subset=500",
    "stages.screen.trials=6",
    "stages.screen.epochs=1",
    "stages.promote.epochs=9",
    "train.epochs=9",
    "stages.promote.top_k=1",
    "search.pruner.name=asha",
    "search.pruner.min_resource=1",
    "search.pruner.reduction_factor=3",
    "train.probe.epochs=1",
    "heartbeat_interval=2",
    "grace_period=20",
]


def wait_for_continuation_past_its_rung(
    url: str, name: str, timeout: float
) -> optuna.trial.FrozenTrial:
    """A RUNNING continuation leg that has trained (and checkpointed) past the rung it
    started from, so its retry must resume mid-leg."""
    deadline = time.monotonic() + timeout
    study = None
    while time.monotonic() < deadline:
        try:
            study = study or optuna.load_study(study_name=f"{name}.promote", storage=url)
        except KeyError:  # not created yet
            time.sleep(0.5)
            continue
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            started, done = t.user_attrs.get("rung_from"), t.user_attrs.get("epochs_run", 0)
            # Two epochs past its rung (epoch N is reported while its checkpoint is written in
            # the background; epoch N - 1 is on disk by then), two epochs left to kill it in.
            if started is not None and started + 1 < done <= t.user_attrs.get("rung_to", 0) - 2:
                return t
        time.sleep(0.2)
    raise AssertionError(f"no continuation leg past its rung within {timeout}s")


@pytest.mark.slow
def test_sigkilled_worker_mid_continuation_is_resumed_as_the_same_leg(tmp_path: Path) -> None:
    """Under rungs, a worker killed in the middle of a continuation leg: the leg is failed
    after the grace period, retried by the other worker from the leg's own last checkpoint
    (not from the rung, not from scratch), with the same configuration, seed, folder and rungs;
    nothing is promoted twice and the study ends with its long-budget and final results."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    name = f"rungkill-{uuid.uuid4().hex[:8]}"
    victim, output = run_and_kill_one_worker(
        [*RUNG_KILL_STUDY, f"name={name}", f"storage={url}", "workers=2", "devices=cpu",
         f"runs_dir={tmp_path}"],
        tmp_path,
        lambda: wait_for_continuation_past_its_rung(url, name, timeout=300),
    )  # fmt: skip
    assert "Traceback" not in output, output[-3000:]
    trials = all_trials(url, name)
    promote = trials["promote"]
    killed = next(t for t in promote if t.number == victim.number)
    assert killed.state == TrialState.FAIL, "the leg finished before its worker was killed"
    assert "heartbeat" in failure_reason(killed, promote)
    retry = next(t for t in promote if t.system_attrs.get("failed_trial") == victim.number)
    assert retry.state == TrialState.COMPLETE
    for attr in ("config", "rung_from", "rung_to", "seed", "checkpoint_dir"):
        assert retry.user_attrs[attr] == killed.user_attrs[attr], attr
    assert retry.params == killed.params
    # Resumed from the leg's own checkpoint, past the rung it started from.
    assert retry.user_attrs["resumed_from_epoch"] > killed.user_attrs["rung_from"]
    assert retry.user_attrs["resumed_from_epoch"] >= victim.user_attrs["epochs_run"] - 1
    assert retry.user_attrs["resumed_from_epoch"] <= killed.user_attrs["epochs_run"]
    assert retry.user_attrs["epochs_run"] == retry.user_attrs["rung_to"]
    # Every (configuration, rung) completed once; one configuration at the long budget.
    legs = [
        t
        for t in trials["screen"] + promote
        if t.state == TrialState.COMPLETE and "rung_to" in t.user_attrs
    ]
    keys = [(t.user_attrs.get("config", t.number), t.user_attrs["rung_to"]) for t in legs]
    assert len(keys) == len(set(keys)), keys
    assert sum(t.user_attrs["rung_to"] == 9 for t in legs) == 1
    assert [t.state for t in trials["final"]] == [TrialState.COMPLETE]


def test_a_sigkilled_launchers_worker_config_is_removed_by_the_next_launcher(tmp_path: Path):
    """The file a launcher leaves behind when SIGKILLed goes at the next launch; a live
    launcher's file and files that are not launchers' stay."""
    from search.pool import _this_host, remove_orphaned_worker_configs

    dead = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead.send_signal(signal.SIGKILL)
    dead.wait(timeout=30)
    here = _this_host()
    orphan = tmp_path / f"quickstart.launcher{dead.pid}@{here}-x1y2.yaml"
    older = tmp_path / f"quickstart.launcher{dead.pid}-x1y3.yaml"  # named without the host
    alive = tmp_path / f"quickstart.launcher{os.getpid()}@{here}-a3b4.yaml"
    # Another machine's launcher sharing this runs_dir: its pid is not this machine's to check.
    elsewhere = tmp_path / f"quickstart.launcher{dead.pid}@0123abcd-c5d6.yaml"
    other = tmp_path / "notes.yaml"
    for path in (orphan, older, alive, elsewhere, other):
        path.write_text("name: quickstart\n")
    assert sorted(remove_orphaned_worker_configs(tmp_path)) == sorted([orphan, older])
    assert all(p.exists() for p in (alive, elsewhere, other))
    assert not orphan.exists() and not older.exists()


@pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning")
def test_a_trial_taken_by_a_process_that_stopped_before_its_first_heartbeat_is_retried(
    tmp_path: Path,
) -> None:
    """A process interrupted while the sampler ran (after Optuna set the trial RUNNING, before
    its heartbeat started) leaves a RUNNING trial with no heartbeat; once it has been silent
    for the grace period it is failed and retried like any trial whose worker died."""
    from search import storage_url

    cfg = load_config(
        "quickstart", [f"runs_dir={tmp_path}", "heartbeat_interval=1", "grace_period=2"]
    )
    studies = open_studies(cfg, storage_url(cfg))
    screen = studies.screen
    screen.enqueue_trial({"channels": 8}, user_attrs={"baseline": "report"})

    class InterruptedWhileSampling(optuna.samplers.RandomSampler):
        def before_trial(self, study, trial):  # noqa: ANN001, ANN202
            raise KeyboardInterrupt  # as SIGTERM does, arriving while the sampler runs

    sampler, screen.sampler = screen.sampler, InterruptedWhileSampling()
    with pytest.raises(KeyboardInterrupt):
        screen.optimize(lambda trial: 0.0, n_trials=1)
    screen.sampler = sampler
    [orphan] = screen.get_trials()
    assert orphan.state == TrialState.RUNNING  # and it never sent a heartbeat

    # The rung loop checks the screen and promote studies in turn, on one storage.
    optuna.storages.fail_stale_trials(screen)  # first seen now: not yet silent for 2 s
    optuna.storages.fail_stale_trials(studies.promote)
    assert screen.get_trials()[0].state == TrialState.RUNNING
    time.sleep(2.5)
    optuna.storages.fail_stale_trials(studies.promote)
    optuna.storages.fail_stale_trials(screen)
    failed, retry = screen.get_trials()
    assert failed.state == TrialState.FAIL
    assert retry.state == TrialState.WAITING and retry.params == failed.params
    assert optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(retry) == 0


def test_a_queued_trial_claimed_by_a_process_that_died_before_popping_it_still_runs(
    tmp_path: Path,
) -> None:
    """A process claims the final's queued trial and dies before Optuna pops it: after the
    grace period another process takes the claim over and runs the trial (it waited forever)."""
    from search import storage_url
    from search.stages import _drain, _waiting_key

    cfg = load_config(
        "quickstart", [f"runs_dir={tmp_path}", "heartbeat_interval=1", "grace_period=2"]
    )
    studies = open_studies(cfg, storage_url(cfg))
    final = studies.final
    final.enqueue_trial({"channels": 8}, user_attrs={"source_trial": 0})
    assert Claims(studies.claims.engine, owner="elsewhere:1234").take(_waiting_key(final, 0))

    class Runner:
        def objective(self, stage: str):  # noqa: ANN202
            return lambda trial: 1.0

    began = time.monotonic()
    drain = threading.Thread(target=_drain, args=(studies, "final", Runner(), cfg), daemon=True)
    drain.start()
    drain.join(timeout=60)
    assert not drain.is_alive(), "the final stage still waits for the dead process's claim"
    assert [(t.number, t.state) for t in final.get_trials()] == [(0, TrialState.COMPLETE)]
    assert time.monotonic() - began >= 2  # not before the claim's grace period


def test_a_claim_taken_over_is_not_taken_over_again_on_an_older_sighting(tmp_path: Path):
    """Worker A died holding a queued trial's claim; B took it over. C, which had timed A's
    claim, must not give back B's: only the very claim it timed."""
    from search import storage_url
    from search.stages import _claim_waiting, _held_waiting_since, _waiting_key

    cfg = load_config("quickstart", [f"runs_dir={tmp_path}", "heartbeat_interval=1"])
    studies = open_studies(cfg, storage_url(cfg))
    final = studies.final
    final.enqueue_trial({"channels": 8}, user_attrs={"source_trial": 0})
    key = _waiting_key(final, 0)
    assert Claims(studies.claims.engine, owner="a:1").take(key)
    a_claim = studies.claims.taken_at(key)[key]
    assert _claim_waiting(studies, "final", grace_period=0.5) is None  # first sighting
    time.sleep(0.6)
    assert _claim_waiting(studies, "final", grace_period=0.5) == 0  # B takes A's claim over
    b_claim = studies.claims.taken_at(key)[key]
    _held_waiting_since[key] = (a_claim, time.monotonic() - 10)  # C's sighting of A's claim
    assert _claim_waiting(studies, "final", grace_period=0.5) is None
    assert studies.claims.taken_at(key) == {key: b_claim}  # B's claim stands


@pytest.mark.slow
def test_ctrl_c_to_launcher_and_workers_then_sigterm_loses_nothing(tmp_path):
    """Ctrl-C reaches the launcher and every worker at once, then the launcher (or a batch
    system) sends SIGTERM: the second signal must not cut short the re-enqueueing of the running
    trials, nor print a traceback from inside the clean-up."""
    log = tmp_path / "run.log"
    args = [*WORKER_STUDY, "stages.screen.epochs=6", "workers=2", f"runs_dir={tmp_path}"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "search.run", "study=quickstart", "--no-progress", *args],
        cwd=tmp_path,
        env=ENV,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,  # a process group, as a terminal makes one
    )
    url = f"sqlite:///{tmp_path / 'ssl-search.db'}"
    try:
        wait_for_checkpointed_trial(url, "quickstart", tmp_path, timeout=300)
        os.killpg(proc.pid, signal.SIGINT)
        time.sleep(0.3)
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=120) == 130, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    said = log.read_text()
    assert "Traceback" not in said and "Exception ignored" not in said, said[-3000:]
    assert said.count("interrupted: its running trial was re-enqueued") == 2, said[-3000:]
    screen = all_trials(url, "quickstart")["screen"]
    assert not [t.number for t in screen if t.state == TrialState.RUNNING]
    stopped = [t for t in screen if "interrupted" in str(t.user_attrs.get("fail_reason"))]
    assert stopped, [(t.number, t.state) for t in screen]
    for trial in stopped:  # each has its retry waiting
        assert "; retried as trial" in failure_reason(trial, screen), failure_reason(trial, screen)


def test_a_worker_logs_a_skipped_trial_as_skipped_not_pruned(tmp_path, capsys):
    """A trial that trained nothing on purpose (a duplicate configuration, or the queue emptied
    under the worker) is SKIPPED, as in the summary and the report, not a PRUNED result."""
    from search.pool import _announce

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'log.db'}", study_name="s.promote")
    for attrs in (
        {"prune_reason": "nothing queued: another worker took the queued trial first"},
        {"duplicate_of": 3, "prune_reason": "skipped: same configuration as trial #3"},
        {"prune_reason": "pruned at epoch 2", "epochs_run": 2},
    ):
        study.add_trial(optuna.trial.create_trial(state=TrialState.PRUNED, user_attrs=attrs))
    for number in range(3):
        _announce("w", study, number, "knn_accuracy")
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == [
        "[w] s.promote #0 SKIPPED (nothing queued: another worker took the queued trial first)",
        "[w] s.promote #1 SKIPPED (skipped: same configuration as trial #3)",
    ]
    assert lines[2].startswith("[w] s.promote #2 PRUNED knn_accuracy - (2 epochs")


def test_a_failed_trials_line_gives_its_real_time_and_a_given_up_leg_trains_nothing(
    tmp_path, capsys
) -> None:
    """A trial that failed mid-run has no ``wall_time_s`` (set when training ends): its line
    gives the time it ran, not 0.0 s; a given-up leg says it trained nothing, not that it
    resumed."""
    from datetime import datetime, timedelta

    from search.pool import _announce

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'log.db'}", study_name="s.screen")
    start = datetime(2026, 12, 2, 12, 0, 0)
    for attrs in (
        {"fail_reason": "CheckpointTransferError: checkpoints_dir: cannot upload x"},
        {"fail_reason": "given up: disk died", "resumed_from_epoch": 1},
    ):
        trial = optuna.trial.create_trial(state=TrialState.FAIL, user_attrs=attrs)
        trial.datetime_start, trial.datetime_complete = start, start + timedelta(seconds=2.5)
        study.add_trial(trial)
    for number in range(2):
        _announce("w", study, number, "knn_accuracy")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == (
        "[w] s.screen #0 FAIL knn_accuracy - (- epochs, 2.5s) CheckpointTransferError: "
        "checkpoints_dir: cannot upload x"
    )
    assert lines[1] == (
        "[w] s.screen #1 FAIL knn_accuracy - (trained nothing, 2.5s) given up: disk died"
    )


def test_the_data_line_says_when_a_batch_would_hold_every_training_image(capsys) -> None:
    """On a subset smaller than a batch the space can draw, those batch sizes train alike (one
    batch of all the images): said once, where the data is loaded."""
    from search.pool import load_data

    # 256 is the study's own size, never trained: the space's batch_size always sets it.
    load_data(load_config("quickstart", ["data.train_subset=100", "train.batch_size=256"]))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("data digits: 100 train,")
    assert lines[1] == (
        "note: batch size 128 exceeds the 100 training images: one batch of all of them per "
        "epoch, the same training as batch size 100"
    )
    load_data(load_config("quickstart"))  # 128 images, batches up to 128: nothing to say
    assert len(capsys.readouterr().out.splitlines()) == 1
