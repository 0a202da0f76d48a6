"""storage.trial_retry: failures spend a configuration's retries, stops on purpose do not."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from conftest import REPO_ROOT
from optuna.trial import TrialState

from storage.claims import Claims
from storage.trial_retry import FREE_RETRIES_ATTR, RetryFailedTrial, retries_spent, retry_claim_key
from storage.urls import open_storage


def _fail_latest(study: optuna.Study) -> optuna.trial.FrozenTrial:
    """Run the next trial (the queued retry, if any) and fail it; the failed trial."""
    trial = study.ask()
    study.tell(trial, state=TrialState.FAIL)
    return study.get_trials()[-1]


def test_counted_retries_stop_at_max_retry_and_free_ones_do_not(tmp_path: Path) -> None:
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'r.db'}")
    retry = RetryFailedTrial(max_retry=1)
    failed = _fail_latest(study)
    for _ in range(3):  # stopped on purpose three times: each retried, none counted
        retry(study, failed, counted=False)
        assert study.get_trials()[-1].state == TrialState.WAITING
        failed = _fail_latest(study)
    assert failed.system_attrs[FREE_RETRIES_ATTR] == 3 and retries_spent(failed) == 0
    retry(study, failed)  # a failure: spends the one retry
    failed = _fail_latest(study)
    assert retries_spent(failed) == 1
    before = len(study.get_trials())
    retry(study, failed)  # a second failure: no retry left
    assert len(study.get_trials()) == before
    # Optuna's own reader still sees the whole chain: trial 4 retries 0 (and 1, 2, 3).
    assert optuna.storages.RetryHeartbeatStaleTrialCallback.retry_history(failed) == [0, 1, 2, 3]
    assert optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(failed) == 0


def test_a_retry_keeps_the_trials_user_attrs(tmp_path: Path) -> None:
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'r.db'}")
    trial = study.ask()
    trial.set_user_attr("config", 4)
    study.tell(trial, state=TrialState.FAIL)
    RetryFailedTrial(max_retry=1)(study, study.get_trials()[-1])
    retry = study.get_trials()[-1]
    assert retry.state == TrialState.WAITING and retry.user_attrs == {"config": 4}


def test_a_trial_is_retried_once_whoever_asks(tmp_path: Path) -> None:
    """Two processes each took one failure for theirs (say, one failed the trial as stale while
    the other's own FAIL was lost in doubt): one retry is queued, not two legs of one
    configuration that would train in one folder."""
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'r.db'}")
    failed = _fail_latest(study)
    RetryFailedTrial(max_retry=3)(study, failed)
    RetryFailedTrial(max_retry=3)(study, failed, counted=False)
    assert [t.state for t in study.get_trials()] == [TrialState.FAIL, TrialState.WAITING]
    again = _fail_latest(study)  # the retry fails in turn: it has a retry of its own
    RetryFailedTrial(max_retry=3)(study, again)
    assert [t.state for t in study.get_trials()][-1] == TrialState.WAITING
    assert len(study.get_trials()) == 3


_RACER = """
import sys, optuna
from storage.trial_retry import RetryFailedTrial
optuna.logging.set_verbosity(optuna.logging.WARNING)
storage = optuna.storages.RDBStorage(sys.argv[1])
study = optuna.load_study(study_name="race", storage=storage)
failed = [t for t in study.get_trials() if t.state == optuna.trial.TrialState.FAIL]
retry = RetryFailedTrial(max_retry=3, engine=storage.engine)
print("ready", flush=True)
sys.stdin.readline()  # all start together
for trial in failed:
    retry(study, trial)
"""


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_processes_asking_at_the_same_moment_queue_one_retry(tmp_path, backend, request):
    """Each failure asked for by four processes at once (a stale trial failed by one worker's
    heartbeat check while its own worker requeues it, say): the look for a retry and its insert
    are two steps, so before the claim several passed the look and queued two or three legs
    of one configuration."""
    if backend == "postgres":
        url = request.getfixturevalue("postgres_db_url")
    else:
        url = f"sqlite:///{tmp_path / 'r.db'}"
    study = optuna.create_study(storage=url, study_name="race")
    for _ in range(8):
        study.tell(study.ask(), state=TrialState.FAIL)
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", _RACER, url],
            cwd=REPO_ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    for racer in racers:
        assert racer.stdout.readline().strip() == "ready"
    for racer in racers:
        racer.stdin.write("go\n")
        racer.stdin.flush()
    for racer in racers:
        racer.stdin.close()
        assert racer.wait(timeout=120) == 0
    retries = [t for t in study.get_trials() if t.state == TrialState.WAITING]
    retried = sorted(t.system_attrs["failed_trial"] for t in retries)
    assert retried == list(range(8)), retried


def test_a_retry_whose_taker_died_before_queueing_it_is_taken_over(tmp_path: Path) -> None:
    """The claim of a retry held by a process of this machine that is gone (killed between its
    claim and its insert) does not keep the configuration from its retry."""
    url = f"sqlite:///{tmp_path / 'r.db'}"
    study = optuna.create_study(storage=url, study_name="taken")
    failed = _fail_latest(study)
    key = retry_claim_key("taken", failed.number)
    took = subprocess.run(
        [sys.executable, "-c", _TAKE_AND_DIE, url, key], cwd=REPO_ROOT, capture_output=True
    )
    assert took.returncode == 0, took.stderr
    storage = optuna.storages.RDBStorage(url)
    assert Claims(storage.engine).holder(key) is not None  # held by a process now gone
    RetryFailedTrial(max_retry=3, engine=storage.engine)(study, failed)
    assert [t.state for t in study.get_trials()] == [TrialState.FAIL, TrialState.WAITING]
    RetryFailedTrial(max_retry=3, engine=storage.engine)(study, failed)  # and only once
    assert len(study.get_trials()) == 2


_TAKE_AND_DIE = """
import sys, sqlalchemy
from storage.claims import Claims
assert Claims(sqlalchemy.create_engine(sys.argv[1])).take(sys.argv[2])
"""


def test_the_storages_heartbeat_retry_claims_in_its_database_and_still_pickles(
    tmp_path: Path,
) -> None:
    """The callback Optuna calls for a stale trial is the once-only one, on the study database,
    also in a storage unpickled in another process (an engine does not pickle)."""
    storage = open_storage(f"sqlite:///{tmp_path / 's.db'}", heartbeat_interval=5, grace_period=30)
    callback = storage.get_heartbeat_stale_trial_callback()
    assert isinstance(callback, RetryFailedTrial) and callback.engine is storage.engine
    again = pickle.loads(pickle.dumps(storage))
    assert again.get_heartbeat_stale_trial_callback().engine is again.engine
