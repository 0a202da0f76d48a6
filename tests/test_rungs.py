"""Rungs over the whole budget with real storage: exactly-once promotions, promotions justified
by rank when they were made, reproducible decisions, continuation from the rung checkpoint.

The scheduling loop (``search.stages.run_rungs``) runs for real, in real processes, on real
SQLite files and a real PostgreSQL database. Only the training is replaced, by
:class:`CurveRunner`: a trial's value is a fixed function of its parameters and its rung, so
these tests take seconds and their outcome does not depend on timing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import socket
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import optuna
import pandas as pd
import pytest
from conftest import run_module, wait_until_a_zombie
from omegaconf import DictConfig
from optuna.trial import FrozenTrial, TrialState

from search.config import load_config
from search.naming import rung_ladder, trained_nothing
from search.objective import CheckpointUnreachableError
from search.scheduler import Finished, StartNew, Wait, decide, promotion_justified
from search.space import suggest
from search.stages import (
    StageError,
    Studies,
    _start_screen,
    give_up,
    long_budget_trials,
    open_studies,
    progress,
    records_from_snapshot,
    run_rungs,
    run_stages,
    scheduler_records,
    scheduler_settings,
    summarize,
    top_trials,
)
from storage.claims import Claims

REPO = Path(__file__).resolve().parent.parent

# 30 configurations, rungs 1, 3, 9, 27, at most 3 at the long budget.
RUNG_STUDY = [
    "stages.screen.trials=30",
    "stages.screen.epochs=3",
    "stages.promote.epochs=27",
    "stages.promote.top_k=3",
    "search.pruner.name=asha",
    "search.pruner.min_resource=1",
    "search.pruner.reduction_factor=3",
    "search.sampler.name=random",
    "heartbeat_interval=2",
    "grace_period=20",
]


class CurveRunner:
    """Stands in for :class:`search.objective.TrialRunner` without training: a configuration's
    value at rung ``r`` is ``quality * (1 - exp(-r / 4))``, its quality fixed by its params."""

    def __init__(self, cfg, pause_s: float = 0.0) -> None:  # noqa: ANN001
        self.cfg = cfg
        self.pause_s = pause_s
        self.first = rung_ladder(cfg)[0]

    def baselines(self) -> dict[str, float]:
        return {"pixels": 0.1}

    def objective(self, stage: str):  # noqa: ANN201
        def run(trial: optuna.Trial) -> float:
            params = suggest(trial, self.cfg.search.space)
            rung = int(trial.user_attrs.get("rung_to", self.first))
            trial.set_user_attr("rung_to", rung)
            trial.set_user_attr("stage", stage)
            digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).digest()
            quality = 0.5 + 0.5 * int.from_bytes(digest[:4], "big") / 2**32
            if self.pause_s:
                time.sleep(self.pause_s * (1 + digest[4] / 255))  # interleave the workers
            return quality * (1 - math.exp(-rung / 4))

        return run


def check_rung_study(url: str, cfg) -> list[optuna.trial.FrozenTrial]:  # noqa: ANN001
    """Finished, every leg once, every promotion justified when made, the cap kept."""
    screen = optuna.load_study(study_name=f"{cfg.name}.screen", storage=url).get_trials()
    promote = optuna.load_study(study_name=f"{cfg.name}.promote", storage=url).get_trials()
    # A worker that found the queue emptied under it prunes the trial Optuna sampled instead;
    # a leg queued twice trains once (search.stages._twin_of): both train nothing.
    legs = [t for t in screen + promote if not trained_nothing(t.user_attrs)]
    assert all(t.state == TrialState.COMPLETE for t in legs), [t.state for t in legs]
    screen = [t for t in screen if t in legs]
    settings = scheduler_settings(cfg)
    first, last = settings["rungs"][0], settings["rungs"][-1]
    # Every configuration was started once, and each rung of it was trained once.
    new = [t for t in screen if "rung_from" not in t.user_attrs]
    at_last = [t for t in legs if t.user_attrs.get("rung_to") == last]
    assert 1 <= len(at_last) <= settings["top_k"]  # at most top_k reached the long budget
    # The trial budget was spent, unless the long budget filled first (then nothing new could
    # reach it: the search is over).
    assert len(new) == int(cfg.stages.screen.trials) or (
        len(new) < int(cfg.stages.screen.trials) and len(at_last) == settings["top_k"]
    )
    keys = Counter(
        (t.user_attrs.get("config", t.number), t.user_attrs.get("rung_to", first)) for t in legs
    )
    assert max(keys.values()) == 1, [k for k, n in keys.items() if n > 1]
    # Legs up to the screen's epochs are screen trials, the rest promote trials.
    for t in legs:
        to = t.user_attrs.get("rung_to", first)
        assert (t in screen) == (to <= int(cfg.stages.screen.epochs))
    # Each promotion ranked in the top 1/eta at its rung when it was made, and the results it
    # was ranked on are the results stored (none changed or vanished afterwards).
    stored = {
        (t.user_attrs.get("config", t.number), t.user_attrs.get("rung_to", first)): t.value
        for t in legs
    }
    continued = [t for t in legs if "rung_from" in t.user_attrs]
    assert continued
    for t in continued:
        attrs = t.user_attrs
        snapshot = records_from_snapshot(attrs["promotion"]["records"])
        assert promotion_justified(snapshot, attrs["config"], attrs["rung_from"], **settings)
        for record in snapshot:
            for rung, value in record.results.items():
                assert stored[(record.number, rung)] == value
        assert attrs["promotion"]["rank"] <= max(1, attrs["promotion"]["of"] // settings["eta"])
    return legs


def run_rungs_in_time(studies, runner, cfg, timeout: float = 120, on_trial=None) -> None:  # noqa: ANN001
    """:func:`run_rungs` in a thread; fails the test if it has not ended within ``timeout``."""
    import threading

    loop = threading.Thread(target=run_rungs, args=(studies, runner, cfg, on_trial), daemon=True)
    loop.start()
    loop.join(timeout=timeout)
    assert not loop.is_alive(), "run_rungs did not end"


def finished_study_with_a_short_grace(tmp_path: Path, name: str):  # noqa: ANN201
    """A finished rung study with grace_period 2 s; (cfg, studies, settings, a configuration
    that stopped at the first rung)."""
    url = f"sqlite:///{tmp_path / (name + '.db')}"
    cfg = load_config(
        "quickstart",
        [*RUNG_STUDY, f"name={name}", f"storage={url}", "heartbeat_interval=1", "grace_period=2"],
    )
    studies = open_studies(cfg, url)
    run_rungs(studies, CurveRunner(cfg), cfg)
    settings = scheduler_settings(cfg)
    waiting = next(r for r in scheduler_records(studies, cfg) if r.sent_to == settings["rungs"][0])
    return cfg, studies, settings, waiting


def add_failed_leg(studies, config: int, user_attrs: dict, system_attrs: dict):  # noqa: ANN001, ANN201
    """Add configuration ``config``'s leg 1 -> 3 to the screen as a failed trial; returns it."""
    source = next(t for t in studies.screen.get_trials() if t.number == config)
    studies.screen.add_trial(
        optuna.trial.create_trial(
            state=TrialState.FAIL,
            params=source.params,
            distributions=source.distributions,
            user_attrs={"config": config, "rung_from": 1, "rung_to": 3, **user_attrs},
            system_attrs=system_attrs,
        )
    )
    return studies.screen.get_trials()[-1]


def _run_in_process(tmp_path: Path, name: str) -> list[tuple]:
    url = f"sqlite:///{tmp_path / (name + '.db')}"
    cfg = load_config("quickstart", [*RUNG_STUDY, f"name={name}", f"storage={url}"])
    studies = open_studies(cfg, url)
    order: list[tuple] = []

    def on_trial(stage: str, number: int) -> None:
        t = studies.find_trial(f"{cfg.name}.{stage}", number)
        order.append(
            (stage, t.user_attrs.get("config", number), t.user_attrs.get("rung_to"), t.params)
        )

    run_rungs(studies, CurveRunner(cfg), cfg, on_trial)
    check_rung_study(url, cfg)
    return order


def test_one_worker_promotes_by_rank_and_repeats_decision_for_decision(tmp_path: Path) -> None:
    first = _run_in_process(tmp_path, "alpha")
    again = _run_in_process(tmp_path, "again")  # another name: decisions may not depend on it
    assert first == again
    # Asynchronous: continuations started before the last new configuration did.
    last_new = max(i for i, step in enumerate(first) if step[2] in (None, 1))
    assert any(step[2] > 1 for step in first[:last_new])
    # Promotions went by rank, not by run order: the best configuration at the first rung
    # reached a higher rung, and some early configurations stopped at the first rung.
    url = f"sqlite:///{tmp_path / 'alpha.db'}"
    cfg = load_config("quickstart", [*RUNG_STUDY, "name=alpha", f"storage={url}"])
    studies = open_studies(cfg, url)
    records = scheduler_records(studies, cfg)
    best = max(records, key=lambda r: r.results[1])
    assert best.reached > 1
    assert any(r.reached == 1 for r in records if r.number < 5)
    assert long_budget_trials(studies, cfg)[0].user_attrs["rung_to"] == 27


WORKER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    from test_rungs import CurveRunner, RUNG_STUDY
    from search.config import load_config
    from search.stages import open_studies, run_rungs
    url, name = sys.argv[1], sys.argv[2]
    cfg = load_config("quickstart", [*RUNG_STUDY, f"name={{name}}", f"storage={{url}}"])
    studies = open_studies(cfg, url)
    run_rungs(studies, CurveRunner(cfg, pause_s=0.05), cfg)
    """
)


def _run_workers(url: str, name: str, count: int) -> None:
    run_scripts(WORKER, [url, name], count)


def run_scripts(script: str, args: list[str], count: int) -> None:
    """Run ``count`` processes of Python ``script`` (``{tests}`` filled in) with ``args``, one
    thread each, until they all end; each must exit 0."""
    script = script.format(tests=str(REPO / "tests"))
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(count)
    ]
    try:
        outputs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]


@pytest.mark.postgres
def test_eight_workers_on_postgres_promote_exactly_once(postgres_db_url: str) -> None:
    _run_workers(postgres_db_url, "rungs8", 8)
    cfg = load_config("quickstart", [*RUNG_STUDY, "name=rungs8", f"storage={postgres_db_url}"])
    legs = check_rung_study(postgres_db_url, cfg)
    assert len(legs) > int(cfg.stages.screen.trials)  # there were continuations


def test_four_workers_on_sqlite_promote_exactly_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'rungs.db'}"
    _run_workers(url, "rungs4", 4)
    cfg = load_config("quickstart", [*RUNG_STUDY, "name=rungs4", f"storage={url}"])
    check_rung_study(url, cfg)


# ---- a real run: training, continuation from checkpoints, the report ------------------------

REAL_RUN = [
    "stages.screen.trials=6",
    "stages.screen.epochs=1",
    "stages.promote.epochs=3",
    "stages.promote.top_k=1",
    "search.pruner.name=asha",
    "search.pruner.min_resource=1",
    "search.pruner.reduction_factor=3",
    "train.max_batches=3",
    "train.probe.epochs=1",
    "search.space.channels.choices=[8]",
]


@pytest.mark.slow
def test_real_run_with_two_workers_continues_legs_and_reports_rungs(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ssl-search.db'}"
    args = ["study=quickstart", f"runs_dir={tmp_path}", "workers=2", "devices=cpu", *REAL_RUN]
    done = run_module("search.run", *args, "--no-progress")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    cfg = load_config("quickstart", [*REAL_RUN, f"storage={url}"])
    legs = check_rung_study(url, cfg)
    continued = [t for t in legs if "rung_from" in t.user_attrs]
    for t in continued:  # trained only the epochs it added, from the rung's checkpoint
        assert t.user_attrs["resumed_from_epoch"] == t.user_attrs["rung_from"]
        assert t.user_attrs["checkpoint_written_on"] == socket.gethostname()
        assert t.user_attrs["epochs_added"] == t.user_attrs["rung_to"] - t.user_attrs["rung_from"]
        assert len(t.intermediate_values) == t.user_attrs["epochs_added"]
    final = optuna.load_study(study_name="quickstart.final", storage=url).get_trials()
    best = long_budget_trials(open_studies(cfg, url), cfg)[0]
    shown = progress(open_studies(cfg, url), cfg)  # what the progress bar ends on
    configs = {t.user_attrs.get("config", t.number) for t in legs}
    at_last = [t for t in legs if t.user_attrs["rung_to"] == rung_ladder(cfg)[-1]]
    assert (shown.configurations, shown.legs, shown.long_budget, shown.final) == (
        len(configs),
        len(legs),
        len(at_last),
        1,
    )
    assert str(shown) == f"legs {len(legs)}, long budget {len(at_last)}/1, final 1/1"
    assert final[0].user_attrs["source_trial"] == best.number
    assert final[0].user_attrs["source_checkpoint_dir"] == best.user_attrs["checkpoint_dir"]

    out = tmp_path / "report"
    report = run_module(
        "search.report", "study=quickstart", f"runs_dir={tmp_path}", "--out", str(out)
    )
    assert report.returncode == 0, report.stderr[-3000:]
    frame = pd.read_csv(out / "quickstart-trials.csv")
    legs_frame = frame[frame["stage"] != "final"]
    assert {"config", "rung_from", "rung_to", "epochs_added"} <= set(frame.columns)
    assert legs_frame["rung_to"].notna().all()
    assert sorted(legs_frame["rung_from"].dropna().astype(int)) == sorted(
        t.user_attrs["rung_from"] for t in continued
    )


def test_a_leg_whose_checkpoint_this_worker_cannot_read_fails_and_says_how_to_share_it(
    tmp_path: Path,
) -> None:
    """Continuing needs the rung checkpoint: never a silent retrain from scratch. The leg goes
    back to the queue for a worker that can read it, and this worker, which would fail every
    leg another worker wrote the same way, stops."""
    from search.objective import TrialRunner
    from search.stages import StageError, _run_one

    url = f"sqlite:///{tmp_path / 'ssl-search.db'}"
    # Two places at the long budget: configurations #4 and #5 are both sent there below.
    overrides = [*REAL_RUN, "stages.promote.top_k=2", f"storage={url}", f"runs_dir={tmp_path}"]
    cfg = load_config("quickstart", overrides)
    studies = open_studies(cfg, url)
    studies.promote.enqueue_trial(
        {"channels": 8, "batch_size": 32, "optimizer": "adam", "adam_lr": 1e-3,
         "temperature": 0.5, "aug_strength": 1.0},
        user_attrs={"config": 4, "rung_from": 1, "rung_to": 3, "seed": 4,
                    "checkpoint_dir": "quickstart.screen-0123456789ab/trial-00004"},
    )  # fmt: skip
    with pytest.raises(StageError) as stopped:
        _run_one(studies, "promote", TrialRunner(cfg, progress=False), 3)
    trial, retry = studies.promote.get_trials()
    assert trial.state == TrialState.FAIL
    reason = trial.user_attrs["fail_reason"]
    assert reason.startswith("CheckpointUnreachableError")
    assert "quickstart.screen-0123456789ab/trial-00004/pretrain.pt" in reason
    assert "checkpoints_dir" in reason and "every worker" in reason
    assert "; nothing was retrained; if it is lost for good, python -m search.give_up" in str(
        stopped.value
    )
    assert str(stopped.value).endswith("go on without it; this worker stopped")
    assert "\n" not in str(stopped.value)
    assert "epochs_run" not in trial.user_attrs  # nothing was trained
    assert not (tmp_path / "checkpoints" / "quickstart.screen-0123456789ab").exists()
    # Queued again, the same leg of the same configuration, for a worker that can read it.
    assert retry.state == TrialState.WAITING
    assert {k: retry.user_attrs[k] for k in ("config", "rung_from", "rung_to")} == {
        "config": 4,
        "rung_from": 1,
        "rung_to": 3,
    }
    # Not known who wrote the checkpoint: the retry was counted (it may be gone for good). One
    # another machine wrote is this machine's setup at fault: free, so that this machine's other
    # workers, each failing it once on their way out, cannot spend the configuration's retries.
    from storage.trial_retry import retries_spent

    with pytest.raises(StageError):
        _run_one(studies, "promote", TrialRunner(cfg, progress=False), 3)
    assert retries_spent(studies.promote.get_trials()[-1]) == 2
    studies.promote.enqueue_trial(
        retry.params,
        user_attrs={**retry.user_attrs, "config": 5, "checkpoint_written_on": "another-host"},
    )
    for _ in range(4):  # max_retries=1, four workers of this machine
        with pytest.raises(StageError):
            _run_one(studies, "promote", TrialRunner(cfg, progress=False), 1)
    last = [t for t in studies.promote.get_trials() if t.user_attrs["config"] == 5][-1]
    assert last.state == TrialState.WAITING and retries_spent(last) == 0
    # Between failing such a leg and queueing its free retry, the configuration is on its way
    # (keeps its place), also with max_retries spent or 0; a counted one with none left is not.
    from search.stages import _retry_on_its_way

    failed = [t for t in studies.promote.get_trials() if t.state == TrialState.FAIL]
    elsewhere = failed[-1]
    here = next(t for t in failed if t.user_attrs["config"] == 4 and retries_spent(t) == 1)
    assert elsewhere.user_attrs["checkpoint_written_on"] == "another-host"
    assert "checkpoint_written_on" not in here.user_attrs
    for max_retries, counted_left in ((0, False), (1, False), (2, True)):
        limit = load_config("quickstart", [*REAL_RUN, f"max_retries={max_retries}"])
        assert _retry_on_its_way(elsewhere, set(), limit)
        assert _retry_on_its_way(here, set(), limit) == counted_left


def test_a_configuration_given_up_fails_its_queued_leg_and_gives_its_place_back(
    tmp_path: Path,
) -> None:
    """A checkpoint lost for good with the machine that wrote it: every worker that takes the
    leg stops (free retries, so no worker's setup spends the configuration), and the study could
    not end. ``python -m search.give_up`` lets it go on without that configuration."""
    from search.objective import TrialRunner
    from search.scheduler import holds_long_budget_seat
    from search.stages import StageError, _run_one, scheduler_records

    url = f"sqlite:///{tmp_path / 'ssl-search.db'}"
    cfg = load_config("quickstart", [*REAL_RUN, f"storage={url}", f"runs_dir={tmp_path}"])
    studies = open_studies(cfg, url)
    long = rung_ladder(cfg)[-1]
    studies.promote.enqueue_trial(
        {"channels": 8, "batch_size": 32, "optimizer": "adam", "adam_lr": 1e-3,
         "temperature": 0.5, "aug_strength": 1.0},
        user_attrs={"config": 4, "rung_from": 1, "rung_to": long, "seed": 4,
                    "checkpoint_dir": "quickstart.screen-0123456789ab/trial-00004",
                    "checkpoint_written_on": "another-host"},
    )  # fmt: skip
    runner = TrialRunner(cfg, progress=False)
    with pytest.raises(StageError) as stopped:
        _run_one(studies, "promote", runner, 1)
    assert (
        "python -m search.give_up study=quickstart configuration=4 (with the study's storage= or"
        in str(stopped.value)
    )

    def record_4():
        return next(r for r in scheduler_records(studies, cfg) if r.number == 4)

    assert record_4().running and holds_long_budget_seat(record_4(), long)

    def give_up(*args: str) -> subprocess.CompletedProcess:
        return run_module("search.give_up", "study=quickstart", f"runs_dir={tmp_path}", *args)

    for args, says in [
        (["configuration=99"], "error: configuration: no configuration #99 in quickstart.screen"),
        (["configuration=four"], "error: configuration: the number a worker's error names"),
        ([], "error: configuration: required"),
        (["configuration=4", "reason="], "error: reason: one line of printable text"),
        (["configuration=4", "reason=a\x1b[31mred"], "error: reason: one line of printable"),
        (["configuration=²"], "error: configuration: the number a worker's error names"),
    ]:
        refused = give_up(*args)
        assert (refused.returncode, refused.stderr.count("\n")) == (2, 1), refused.stderr
        assert refused.stderr.startswith(says), refused.stderr
        assert record_4().running  # nothing was written
    elsewhere = run_module(
        "search.give_up", "study=quickstart", f"runs_dir={tmp_path / 'empty'}", "configuration=4"
    )
    assert elsewhere.returncode == 2 and "error: storage: no database at" in elsewhere.stderr
    assert not (tmp_path / "empty").exists()

    done = give_up("configuration=4", "reason=host b lost its disk")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(
        "configuration #4 of quickstart.screen given up (host b lost its disk): its queued leg "
        "fails when a worker takes it, it is not continued again, its place at the long budget "
        "goes to the next in rank; its recorded results stay\n"
    )
    assert record_4().failed and not record_4().running
    assert not holds_long_budget_seat(record_4(), long)  # the next in rank may take it
    again = give_up("configuration=4")
    assert again.returncode == 2 and "was given up already" in again.stderr

    # The next worker to take the leg fails it at once: nothing trained, nothing queued again.
    number = _run_one(studies, "promote", runner, 1)
    leg = studies.promote.get_trials()[number]
    assert leg.state == TrialState.FAIL
    assert leg.user_attrs["fail_reason"] == "given up: host b lost its disk"
    assert "epochs_run" not in leg.user_attrs
    assert not studies.promote.get_trials(states=(TrialState.WAITING,))
    assert record_4().failed


@pytest.mark.parametrize("damage", ["truncated", "other settings"])
def test_a_leg_whose_rung_checkpoint_is_damaged_or_foreign_fails_without_retraining(
    tmp_path: Path, damage: str
) -> None:
    """A continuation resumes from its rung checkpoint or fails: a truncated upload or a
    checkpoint written for other settings is not a reason to train from epoch 0."""
    import torch

    from search.objective import TrialRunner
    from search.stages import _run_one

    url = f"sqlite:///{tmp_path / 'ssl-search.db'}"
    cfg = load_config("quickstart", [*REAL_RUN, f"storage={url}", f"runs_dir={tmp_path}"])
    studies = open_studies(cfg, url)
    relative = "quickstart.screen-0123456789ab/trial-00004"
    runner = TrialRunner(cfg, progress=False)
    folder = runner.store.local(Path(relative))
    folder.mkdir(parents=True)
    if damage == "truncated":
        (folder / "pretrain.pt").write_bytes(b"half an upload")
    else:  # a readable checkpoint with another run's identity
        torch.save({"epoch": 1, "identity": "0" * 16}, folder / "pretrain.pt")
    before = (folder / "pretrain.pt").read_bytes()
    studies.promote.enqueue_trial(
        {"channels": 8, "batch_size": 32, "optimizer": "adam", "adam_lr": 1e-3,
         "temperature": 0.5, "aug_strength": 1.0},
        user_attrs={"config": 4, "rung_from": 1, "rung_to": 3, "seed": 4,
                    "checkpoint_dir": relative},
    )  # fmt: skip
    number = _run_one(studies, "promote", runner, 0)
    trial = studies.promote.get_trials()[number]
    assert trial.state == TrialState.FAIL
    reason = trial.user_attrs["fail_reason"]
    assert f"{relative}/pretrain.pt" in reason and "configuration #4" in reason, reason
    assert "instead of training from epoch 0" in reason
    assert "python -m search.give_up study=quickstart configuration=4" in reason, reason
    assert ("other settings" in reason) == (damage == "other settings"), reason
    assert (
        "epochs_run" not in trial.user_attrs
        and trial.user_attrs.get("checkpoint_discarded") is None
    )
    assert (folder / "pretrain.pt").read_bytes() == before  # left in place, not set aside
    assert sorted(p.name for p in folder.iterdir()) == ["pretrain.pt"]


def test_stage_screen_then_stage_promote_ends_with_a_long_budget_result(tmp_path: Path) -> None:
    """``stage=screen`` stops at the screen's top rung without taking the long budget's seats,
    so a later ``stage=promote`` can still send configurations there."""
    url = f"sqlite:///{tmp_path / 'split.db'}"
    base = [*RUNG_STUDY, "name=split", f"storage={url}", "stages.screen.epochs=9"]
    screen_cfg = load_config("quickstart", [*base, "stage=screen"])
    studies = open_studies(screen_cfg, url)
    run_rungs(studies, CurveRunner(screen_cfg), screen_cfg, up_to=9)
    assert not studies.claims.taken("split.screen/long-budget/")
    assert not long_budget_trials(studies, screen_cfg)

    cfg = load_config("quickstart", [*base, "stage=promote"])
    studies = open_studies(cfg, url)
    run_rungs(studies, CurveRunner(cfg), cfg)
    at_long_budget = long_budget_trials(studies, cfg)
    assert 1 <= len(at_long_budget) <= int(cfg.stages.promote.top_k)
    check_rung_study(url, cfg)

    # stage=screen again, on legs that went past the screen: nothing is left to run there.
    legs = len(studies.screen.trials) + len(studies.promote.trials)
    run_rungs(open_studies(screen_cfg, url), CurveRunner(screen_cfg), screen_cfg, up_to=9)
    assert len(studies.screen.trials) + len(studies.promote.trials) == legs


class DuplicatePruningRunner(CurveRunner):
    """:class:`CurveRunner` that skips a configuration the study already has, as the real
    :class:`search.objective.TrialRunner` does."""

    def objective(self, stage: str):  # noqa: ANN201
        from search.objective import TrialRunner, stored

        inner = super().objective(stage)

        def run(trial: optuna.Trial) -> float:
            params = suggest(trial, self.cfg.search.space)
            if (same := TrialRunner._duplicate_of(trial, stored(trial), params)) is not None:
                trial.set_user_attr("duplicate_of", same)
                raise optuna.TrialPruned(f"skipped: same configuration as trial #{same}")
            return inner(trial)

        return run


def test_a_space_smaller_than_the_trial_budget_still_ends_with_a_long_budget_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three distinct configurations (one per optimizer), a budget of five: once the slots are
    spent on duplicates
    the loop decides as if the budget were spent, promotes, and ends (it used to wait forever).
    """
    import search.stages as stages

    monkeypatch.setattr(stages, "POLL_S", 0.05)
    fixed = {
        "batch_size": 64, "adam_lr": 0.003, "sgd_lr": 0.01, "lars_lr": 0.1,
        "lars_warmup_epochs": 0, "temperature": 0.5, "aug_strength": 1.0, "channels": 8,
    }  # fmt: skip
    space = [f"search.space.{name}.choices=[{value}]" for name, value in fixed.items()]
    url = f"sqlite:///{tmp_path / 'small.db'}"
    cfg = load_config(
        "quickstart",
        [*RUNG_STUDY, "name=small", f"storage={url}", "stages.screen.trials=5",
         "stages.promote.top_k=1", *space],
    )  # fmt: skip
    studies = open_studies(cfg, url)
    run_rungs_in_time(studies, DuplicatePruningRunner(cfg), cfg)
    records = scheduler_records(studies, cfg)
    assert len(records) <= 4  # the baseline and three sampled: the space holds no more
    assert any("duplicate_of" in t.user_attrs for t in studies.screen.get_trials())
    assert len(long_budget_trials(studies, cfg)) == 1


def _study_whose_last_slot_another_worker_took(tmp_path: Path, name: str, grace: int):  # noqa: ANN202
    """A rung study (five configurations, top_k 1) where four have their first-rung result,
    nothing runs, and another worker has just taken the last slot for the fifth without
    having created its trial yet; (cfg, studies, the slot's key)."""
    url = f"sqlite:///{tmp_path / (name + '.db')}"
    cfg = load_config(
        "quickstart",
        [*RUNG_STUDY, f"name={name}", f"storage={url}", "stages.screen.trials=5",
         "stages.promote.top_k=1", "heartbeat_interval=1", f"grace_period={grace}"],
    )  # fmt: skip
    studies = open_studies(cfg, url)
    runner = CurveRunner(cfg)
    _start_screen(studies, runner, cfg)  # the report's configuration, queued
    studies.screen.optimize(runner.objective("screen"), n_trials=4)  # it and three new ones
    for slot in range(3):  # the three new ones' slots, as run_rungs takes them
        assert studies.claims.take(f"{name}.screen/slot/{slot}")
    assert len(scheduler_records(studies, cfg)) == 4
    key = f"{name}.screen/slot/3"  # the last one
    assert Claims(studies.claims.engine, owner="another-machine:4242").take(key)
    return cfg, studies, key


def test_a_configuration_another_worker_is_starting_is_waited_for_not_decided_without(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between its slot claim and Optuna's ask another worker's new configuration does not
    exist yet. A worker that finds every slot taken must not decide as if the trial budget were
    spent: the endgame would then promote on fewer results than the rule allows (here the best
    at rung 3 out of one result). It waits; once that configuration is in (or its slot comes
    back), every promotion is justified by rank."""
    import threading

    import search.stages as stages

    monkeypatch.setattr(stages, "POLL_S", 0.05)
    cfg, studies, key = _study_whose_last_slot_another_worker_took(tmp_path, "starting", 20)
    loop = threading.Thread(target=run_rungs, args=(studies, CurveRunner(cfg), cfg), daemon=True)
    loop.start()
    time.sleep(2.0)  # forty polls
    legs = studies.screen.get_trials() + studies.promote.get_trials()
    beyond = [t.number for t in legs if t.user_attrs.get("rung_to", 1) > 3]
    assert beyond == [], "promoted past rung 3 while a configuration was still starting"
    assert loop.is_alive()
    studies.claims.release(key)  # the other worker was stopped before it sampled
    loop.join(timeout=60)
    assert not loop.is_alive(), "run_rungs did not end"
    assert len(scheduler_records(studies, cfg)) == 5
    check_rung_study(str(cfg.storage), cfg)


def test_a_slot_whose_taker_died_before_starting_its_configuration_is_not_waited_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other side of the wait: a slot held past grace_period with no trial is a taker that
    died between its claim and Optuna's ask. The study then decides as if the budget were
    spent and still ends with a long-budget result."""
    import search.stages as stages

    monkeypatch.setattr(stages, "POLL_S", 0.05)
    cfg, studies, _ = _study_whose_last_slot_another_worker_took(tmp_path, "lost", 2)
    started = time.monotonic()
    run_rungs_in_time(studies, CurveRunner(cfg), cfg, timeout=60)
    assert time.monotonic() - started >= 1.5  # it waited out the grace period first
    assert len(scheduler_records(studies, cfg)) == 4
    assert len(long_budget_trials(studies, cfg)) == 1


def test_a_configuration_sampled_after_the_long_budget_filled_trains_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker decides to start a new configuration and takes a slot; before Optuna has
    sampled it, another worker sends a configuration to the long budget and fills it (top_k 1).
    The new configuration could no longer reach the long budget: it is pruned as nothing
    queued, trains nothing, and gives its slot back. Before, it trained its first rung."""
    import search.stages as stages
    from search.naming import NOTHING_QUEUED

    monkeypatch.setattr(stages, "POLL_S", 0.05)
    name = "filled"
    url = f"sqlite:///{tmp_path / (name + '.db')}"
    cfg = load_config(
        "quickstart",
        [*RUNG_STUDY, f"name={name}", f"storage={url}", "stages.promote.top_k=1"],
    )
    studies = open_studies(cfg, url)
    runner = CurveRunner(cfg)
    _start_screen(studies, runner, cfg)  # the report's configuration, queued
    studies.screen.optimize(runner.objective("screen"), n_trials=1)  # it, at rung 1
    params = studies.screen.get_trials()[0].params
    for stage, rung_from, rung_to in (("screen", 1, 3), ("promote", 3, 9)):
        leg = {"config": 0, "rung_from": rung_from, "rung_to": rung_to}
        studies.of(stage).enqueue_trial(params, user_attrs=leg)
        studies.of(stage).optimize(runner.objective(stage), n_trials=1)
    # Alone at rung 9 it does not rank in the top third: the scheduler starts a new one.
    assert isinstance(decide(scheduler_records(studies, cfg), **scheduler_settings(cfg)), StartNew)
    real_claim_slot = stages._claim_slot
    filled: list[str] = []

    def claim_then_another_worker_fills_the_long_budget(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        slot = real_claim_slot(*args, **kwargs)
        if slot is not None and not filled:
            filled.append(slot)
            other = optuna.load_study(study_name=f"{name}.promote", storage=url)
            other.enqueue_trial(params, user_attrs={"config": 0, "rung_from": 9, "rung_to": 27})
        return slot

    monkeypatch.setattr(stages, "_claim_slot", claim_then_another_worker_fills_the_long_budget)
    run_rungs_in_time(studies, runner, cfg, timeout=60)
    assert filled, "no slot was taken"
    screen = studies.screen.get_trials()
    sampled = [t for t in screen if t.user_attrs.get("config", t.number) != 0]
    assert [t.state for t in sampled] == [TrialState.PRUNED]
    reason = sampled[0].user_attrs["prune_reason"]
    assert reason.startswith(NOTHING_QUEUED) and "long budget" in reason, reason
    assert studies.claims.taken(f"{name}.screen/slot/") == []  # its slot was given back
    assert [t.user_attrs["rung_to"] for t in long_budget_trials(studies, cfg)] == [27]


def test_a_storage_outage_while_checking_a_new_configuration_prunes_it_and_stops_the_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check that a freshly sampled configuration is still wanted reads the storage; an
    outage past the retry bound there is the machine's fault, not the configuration's. The
    sample is pruned as nothing queued (it trained nothing, its slot goes back) and the worker
    stops in one line, as for an outage anywhere else. Before, Optuna failed the trial, its
    retry spent one of the configuration's max_retries and trained it outside any slot."""
    import search.stages as stages
    from search.database import StorageUnavailableError
    from search.naming import NOTHING_QUEUED

    name = "outage"
    url = f"sqlite:///{tmp_path / (name + '.db')}"
    cfg = load_config("quickstart", [*RUNG_STUDY, f"name={name}", f"storage={url}"])
    studies = open_studies(cfg, url)
    runner = CurveRunner(cfg)
    _start_screen(studies, runner, cfg)
    studies.screen.optimize(runner.objective("screen"), n_trials=1)  # the report's, at rung 1
    real_records, real_claim_slot = stages.scheduler_records, stages._claim_slot
    outage: list[str] = []

    def claim_then_the_storage_goes_away(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        slot = real_claim_slot(*args, **kwargs)
        if slot is not None and not outage:
            outage.append(slot)
        return slot

    def records_unless_down(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        if len(outage) == 1:  # the first read after the slot was taken: the check
            outage.append("read")
            raise StorageUnavailableError("storage sqlite:///outage.db unreachable for 60 s")
        return real_records(*args, **kwargs)

    monkeypatch.setattr(stages, "_claim_slot", claim_then_the_storage_goes_away)
    monkeypatch.setattr(stages, "scheduler_records", records_unless_down)
    with pytest.raises(StorageUnavailableError, match="unreachable"):
        run_rungs(studies, runner, cfg)
    assert outage == [outage[0], "read"], "the outage was not hit in the check"
    sampled = [t for t in studies.screen.get_trials() if t.user_attrs.get("config", t.number)]
    assert [t.state for t in sampled] == [TrialState.PRUNED]
    assert sampled[0].user_attrs["prune_reason"].startswith(NOTHING_QUEUED)
    assert studies.claims.taken(f"{name}.screen/slot/") == []  # its slot was given back
    assert not studies.screen.get_trials(states=(TrialState.WAITING, TrialState.FAIL))
    monkeypatch.undo()
    run_rungs(studies, runner, cfg)  # the storage is back: the worker is started again
    check_rung_study(url, cfg)


def test_a_claimed_continuation_not_yet_queued_counts_as_running_until_taken_back(
    tmp_path: Path,
) -> None:
    """Between a worker's claim of a promotion and its enqueue, the others must not take the
    study for finished (a worker that did would start the final stage without the long-budget
    result). A claim whose taker went silent for grace_period (it died between the two steps)
    is given back by a worker and the promotion decided again: never given up for it."""
    from search.scheduler import Finished, Wait, decide
    from search.stages import _take_back_unqueued

    cfg, studies, settings, waiting = finished_study_with_a_short_grace(tmp_path, "pending")
    assert decide(scheduler_records(studies, cfg), **settings) == Finished()
    key = f"pending.screen/continue/{waiting.number}/{settings['rungs'][1]}"
    assert studies.claims.take(key)  # a worker claims it and has not queued it yet
    pending = {r.number: r for r in scheduler_records(studies, cfg)}[waiting.number]
    assert pending.running_to == settings["rungs"][1] and pending.running
    assert decide(scheduler_records(studies, cfg), **settings) == Wait()
    _take_back_unqueued(studies, cfg)  # within grace_period: its taker may be queueing it
    assert key in studies.claims.taken("pending.screen/continue/")
    time.sleep(2.2)  # the claimer is silent past grace_period
    silent = {r.number: r for r in scheduler_records(studies, cfg)}[waiting.number]
    assert silent.running and not silent.failed  # on its way until a worker takes it back
    _take_back_unqueued(studies, cfg)
    assert key not in studies.claims.taken("pending.screen/continue/")
    back = {r.number: r for r in scheduler_records(studies, cfg)}[waiting.number]
    assert not back.running and not back.failed and back.promoted_to is None
    # Decided again on the records as they are: it does not rank for the rung it was claimed
    # for (it was planted there), so the study is finished, without it failed.
    assert decide(scheduler_records(studies, cfg), **settings) == Finished()


def test_a_promotion_claimed_by_a_live_but_slow_process_is_left_to_it(tmp_path: Path) -> None:
    """A claimer on this machine still running past grace_period is slow (riding out a storage
    outage, say), not dead: its claim stays until it is gone. One on another machine cannot be
    looked at and is taken back; if it was only slow, it finds its claim gone and queues
    nothing (the leg is queued once, by whoever decides the promotion again)."""
    from search.scheduler import Continue
    from search.stages import _enqueue_continuation, _take_back_unqueued

    cfg, studies, settings, waiting = finished_study_with_a_short_grace(tmp_path, "slow")
    to = settings["rungs"][1]
    key = f"slow.screen/continue/{waiting.number}/{to}"
    slow = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert Claims(studies.claims.engine, owner=_owner_of(slow.pid)).take(key)
        time.sleep(2.2)
        _take_back_unqueued(studies, cfg)
        assert studies.claims.holder(key)[0] == _owner_of(slow.pid)  # alive: left to it
        slow.kill()
        wait_until_a_zombie(slow.pid)  # dead, not yet reaped (its parent waits on another)
        _take_back_unqueued(studies, cfg)
        assert studies.claims.holder(key) is None  # gone: taken back
    finally:
        slow.kill()
        slow.wait(timeout=30)

    class TakenBackMeanwhile(Claims):
        """This process's claims, where another worker takes a promotion back right after
        this one claims it (this one stalled past grace_period)."""

        def take(self, key: str) -> bool:
            taken = super().take(key)
            if taken and "/continue/" in key:
                Claims(self.engine, owner="another-host:7/1").release(key)
            return taken

    stalled = dataclasses.replace(studies, claims=TakenBackMeanwhile(studies.claims.engine))
    decision = Continue(number=waiting.number, from_rung=settings["rungs"][0], to_rung=to)
    records = scheduler_records(studies, cfg)
    assert not _enqueue_continuation(stalled, cfg, decision, records, settings, 0)
    assert not any(
        t.user_attrs.get("config") == waiting.number and t.user_attrs.get("rung_to") == to
        for t in studies.screen.get_trials()
    )


def test_a_retry_the_retry_rule_refuses_is_not_waited_for(tmp_path: Path) -> None:
    """A chain that spent more retries than a later run's lower max_retries, interrupted
    (a free retry) and its retry never queued: the retry is refused, and nobody waits for it
    (the study used to wait for it forever); under the old limit it is queued, once."""
    from search.objective import INTERRUPTED_REASON
    from search.scheduler import Finished
    from search.stages import _owed_retries, _retry_late
    from storage.retry import FAILED_AT_ATTR

    cfg, studies, settings, waiting = finished_study_with_a_short_grace(tmp_path, "lowered")
    failed = add_failed_leg(
        studies,
        waiting.number,
        {"fail_reason": INTERRUPTED_REASON},
        {FAILED_AT_ATTR: time.time() - 10, "retry_history": [90, 91, 92]},
    )
    lowered = load_config(
        "quickstart",
        [*RUNG_STUDY, "name=lowered", f"storage={cfg.storage}", "heartbeat_interval=1"]
        + ["grace_period=2", "max_retries=1"],
    )
    assert _owed_retries(studies, lowered, "screen") == []
    _retry_late(studies, lowered, "screen")
    assert len(studies.screen.get_trials()) == failed.number + 1
    assert decide(scheduler_records(studies, lowered), **settings) == Finished()
    assert [t.number for t in _owed_retries(studies, cfg, "screen")] == [failed.number]
    _retry_late(studies, cfg, "screen")
    _retry_late(studies, cfg, "screen")
    (retry,) = studies.screen.get_trials()[failed.number + 1 :]
    assert retry.system_attrs["retry_history"] == [90, 91, 92, failed.number]


def test_a_promotion_whose_claimer_died_before_queueing_it_is_decided_again(
    tmp_path: Path,
) -> None:
    """A worker on another machine claims a promotion and dies before queueing the leg. The
    study goes on, and after grace_period the claim goes back and the promotion is decided
    again: the configuration is not lost (it used to be recorded failed, its place given to
    the next in rank), and every promotion made is still justified by rank."""
    from search.scheduler import Continue, decide

    url = f"sqlite:///{tmp_path / 'orphan.db'}"
    cfg = load_config(
        "quickstart",
        [*RUNG_STUDY, "name=orphan", f"storage={url}", "heartbeat_interval=1", "grace_period=2"],
    )
    studies = open_studies(cfg, url)
    settings = scheduler_settings(cfg)
    dead = Claims(studies.claims.engine, owner="another-host:4242/4026531836")
    planted: list[tuple[Continue, str]] = []

    def on_trial(_stage: str, _number: int) -> None:
        decision = decide(scheduler_records(studies, cfg), **settings)
        if not planted and isinstance(decision, Continue):
            key = f"orphan.screen/continue/{decision.number}/{decision.to_rung}"
            assert dead.take(key)  # the other machine's worker claims it, then dies
            planted.append((decision, key))

    run_rungs_in_time(studies, CurveRunner(cfg), cfg, on_trial=on_trial)
    check_rung_study(url, cfg)
    ((decision, key),) = planted
    holder = studies.claims.holder(key)
    assert holder is None or holder[0] != dead.owner  # taken back
    record = {r.number: r for r in scheduler_records(studies, cfg)}[decision.number]
    assert not record.failed and not record.running
    continued = [
        t
        for t in studies.screen.get_trials() + studies.promote.get_trials()
        if t.user_attrs.get("config") == decision.number
        and t.user_attrs.get("rung_to") == decision.to_rung
    ]
    # Continued after all when it still ranked once the claim was back; then by a live worker.
    assert len(continued) == (0 if holder is None else 1)


def test_a_leg_queued_twice_trains_once(tmp_path: Path, monkeypatch) -> None:
    """The one race claims leave open (a claimer frozen past grace_period between re-reading
    its claim and inserting the leg, while another process took the claim back and queued
    it) queues a leg twice. Here every leg is queued twice: each later copy trains nothing
    (SKIPPED, ``duplicate_of``), so each configuration is continued once, counts once at its
    rung, and the study ends as it would have."""
    from search import stages

    url = f"sqlite:///{tmp_path / 'twice.db'}"
    cfg = load_config("quickstart", [*RUNG_STUDY, "name=twice", f"storage={url}"])
    studies = open_studies(cfg, url)
    queue_once = stages._queue_leg

    def queue_twice(*args, **kwargs) -> None:  # noqa: ANN002, ANN003
        queue_once(*args, **kwargs)
        queue_once(*args, **kwargs)

    monkeypatch.setattr(stages, "_queue_leg", queue_twice)
    run_rungs_in_time(studies, CurveRunner(cfg), cfg)
    check_rung_study(url, cfg)
    legs = [
        t
        for t in studies.screen.get_trials() + studies.promote.get_trials()
        if t.user_attrs.get("rung_from") is not None
    ]
    copies = [t for t in legs if "duplicate_of" in t.user_attrs]
    trained = [t for t in legs if "duplicate_of" not in t.user_attrs]
    assert trained and len(copies) == len(trained)
    assert {t.state for t in copies} == {TrialState.PRUNED}
    assert {t.state for t in trained} == {TrialState.COMPLETE}
    continued = [(t.user_attrs["config"], t.user_attrs["rung_to"]) for t in trained]
    assert len(continued) == len(set(continued))  # each leg trained once
    for study in (studies.screen, studies.promote):  # each copy names its twin in its study
        trials = {t.number: t for t in study.get_trials()}
        for copy in (t for t in trials.values() if "duplicate_of" in t.user_attrs):
            twin = trials[copy.user_attrs["duplicate_of"]]
            assert twin.number < copy.number and "duplicate_of" not in twin.user_attrs
            for attr in ("config", "rung_from", "rung_to"):
                assert twin.user_attrs[attr] == copy.user_attrs[attr]


def test_a_leg_queued_beyond_the_long_budgets_places_trains_nothing(
    tmp_path: Path, monkeypatch
) -> None:
    """The race's other outcome: the frozen claimer queues its leg to the long budget after
    another process took its claim back and promoted *another* configuration there, so top_k
    + 1 legs are queued for it. Here the leg that fills the long budget's last place is
    followed by one more, of the furthest configuration not promoted there. That
    one trains nothing (PRUNED, ``beyond_long_budget_places``); top_k train there, and the
    study ends."""
    from search import stages
    from search.scheduler import Continue

    url = f"sqlite:///{tmp_path / 'beyond.db'}"
    # One place at the long budget: its first promotion there fills it.
    overrides = [*RUNG_STUDY, "stages.promote.top_k=1", "name=beyond", f"storage={url}"]
    cfg = load_config("quickstart", overrides)
    studies = open_studies(cfg, url)
    settings = scheduler_settings(cfg)
    long, top_k = settings["rungs"][-1], settings["top_k"]
    queue_once = stages._queue_leg
    queued_long: list[int] = []
    extra: list[int] = []

    def queue_and_one_more(studies_, cfg_, decision, records, settings_) -> None:  # noqa: ANN001
        queue_once(studies_, cfg_, decision, records, settings_)
        if decision.to_rung != long:
            return
        queued_long.append(decision.number)
        if len(queued_long) == top_k and not extra:
            other = next(
                r
                for r in sorted(records, key=lambda r: -(r.reached or 0))
                if r.reached is not None and r.number not in queued_long and r.sent_to < long
            )
            extra.append(other.number)
            leg = Continue(other.number, other.reached, long)
            queue_once(studies_, cfg_, leg, records, settings_)

    monkeypatch.setattr(stages, "_queue_leg", queue_and_one_more)
    run_rungs_in_time(studies, CurveRunner(cfg), cfg)
    assert extra, "no configuration was left to queue beyond the places"
    check_rung_study(url, cfg)
    at_long = [t for t in studies.promote.get_trials() if t.user_attrs.get("rung_to") == long]
    trained = [t for t in at_long if t.state == TrialState.COMPLETE]
    assert sorted(t.user_attrs["config"] for t in trained) == sorted(queued_long)
    assert len(trained) == top_k
    (skipped,) = [t for t in at_long if t.user_attrs["config"] == extra[0]]
    assert skipped.state == TrialState.PRUNED and trained_nothing(skipped.user_attrs)
    assert "place(s) were held" in skipped.user_attrs["prune_reason"]


@pytest.mark.parametrize("then", ["returns", "writes", "interrupted"])
def test_a_trial_another_worker_failed_as_stale_while_it_ran_does_not_stop_this_worker(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], then: str
) -> None:
    """Its heartbeats could not reach the storage for grace_period, so another worker failed
    it as stale (and queued its retry) while it trained on. Whether its objective then wrote
    to the trial or simply returned, Optuna cannot record its end: this worker says so in one
    line and goes on (before, an UpdateFinishedTrialError or Optuna's "Should not reach"
    AssertionError ended it with a traceback). Stopped meanwhile (Ctrl-C, SIGTERM), it stops."""
    from search.stages import _run_one

    url = f"sqlite:///{tmp_path / 'stale.db'}"
    cfg = load_config("quickstart", [*RUNG_STUDY, "name=stale", f"storage={url}"])
    studies = open_studies(cfg, url)

    class FailedMeanwhile(CurveRunner):
        def objective(self, stage: str):  # noqa: ANN202
            inner = super().objective(stage)

            def run(trial: optuna.Trial) -> float:
                value = inner(trial)
                other = optuna.storages.RDBStorage(url)  # another worker's connection
                other.set_trial_state_values(trial._trial_id, TrialState.FAIL)
                other.engine.dispose()
                if then == "writes":
                    trial.set_user_attr("epochs_run", 1)  # its next epoch's write
                if then == "interrupted":
                    raise KeyboardInterrupt
                return value

            return run

    if then == "interrupted":
        with pytest.raises(KeyboardInterrupt):
            _run_one(studies, "screen", FailedMeanwhile(cfg), max_retries=3)
        assert "and this worker goes on" not in capsys.readouterr().out
        return
    number = _run_one(studies, "screen", FailedMeanwhile(cfg), max_retries=3)
    assert number == 0
    assert studies.screen.get_trials()[0].state == TrialState.FAIL
    assert "another worker failed it as stale" in capsys.readouterr().out
    # The worker goes on: its next trial runs and completes.
    assert _run_one(studies, "screen", CurveRunner(cfg), max_retries=3) == 1
    assert studies.screen.get_trials()[1].state == TrialState.COMPLETE


class DivergingRunner(CurveRunner):
    """:class:`CurveRunner` whose first leg to the long budget diverges (fails on its own
    merits, with its reason, as the real runner records it)."""

    def __init__(self, cfg) -> None:  # noqa: ANN001
        super().__init__(cfg)
        self.last = rung_ladder(cfg)[-1]
        self.diverged: list[int] = []

    def objective(self, stage: str):  # noqa: ANN201
        inner = super().objective(stage)

        def run(trial: optuna.Trial) -> float:
            if int(trial.user_attrs.get("rung_to", 0)) == self.last and not self.diverged:
                self.diverged.append(int(trial.user_attrs["config"]))
                trial.set_user_attr("fail_reason", "NonFiniteLossError: loss is nan at epoch 12")
                raise RuntimeError("diverged")
            return inner(trial)

        return run


def test_a_long_run_that_diverges_gives_its_place_to_the_next_in_rank(tmp_path: Path) -> None:
    """top_k 1: the first configuration sent to the long budget diverges there; its place goes
    back, the next in rank takes it, and the study ends with a long-budget result (it used to
    end without one, and the final stage had nothing to evaluate)."""
    url = f"sqlite:///{tmp_path / 'diverge.db'}"
    cfg = load_config(
        "quickstart", [*RUNG_STUDY, "name=diverge", f"storage={url}", "stages.promote.top_k=1"]
    )
    studies = open_studies(cfg, url)
    runner = DivergingRunner(cfg)
    run_rungs(studies, runner, cfg)
    assert len(runner.diverged) == 1
    best = long_budget_trials(studies, cfg)
    assert len(best) == 1 and best[0].user_attrs["config"] != runner.diverged[0]
    assert len(studies.claims.taken("diverge.screen/long-budget/")) == 2
    records = {r.number: r for r in scheduler_records(studies, cfg)}
    diverged = records[runner.diverged[0]]
    # Its result at the rung it diverged on to is the worst, NaN: one of the rung's n, last.
    assert diverged.failed and math.isnan(diverged.results[runner.last])
    settings = scheduler_settings(cfg)
    snapshot = records_from_snapshot(best[0].user_attrs["promotion"]["records"])
    assert math.isnan({r.number: r for r in snapshot}[runner.diverged[0]].results[runner.last])
    assert promotion_justified(snapshot, best[0].user_attrs["config"], 9, **settings)


class LostCheckpointRunner(CurveRunner):
    """:class:`CurveRunner` for which the rung checkpoint of the first leg sent to the long
    budget is gone, as :class:`search.objective.TrialRunner` reports it; ``lost`` holds its
    configuration once per attempt."""

    def __init__(self, cfg) -> None:  # noqa: ANN001
        super().__init__(cfg)
        self.last = rung_ladder(cfg)[-1]
        self.lost: list[int] = []

    def objective(self, stage: str):  # noqa: ANN201
        inner = super().objective(stage)

        def run(trial: optuna.Trial) -> float:
            config = trial.user_attrs.get("config")
            if int(trial.user_attrs.get("rung_to", 0)) == self.last and (
                not self.lost or config == self.lost[0]
            ):
                self.lost.append(int(config))
                error = CheckpointUnreachableError("lost/pretrain.pt", "gone with its disk")
                trial.set_user_attr("fail_reason", f"{type(error).__name__}: {error}")
                raise error
            return inner(trial)

        return run


def test_a_study_stuck_on_a_lost_checkpoint_goes_on_once_the_configuration_is_given_up(
    tmp_path: Path,
) -> None:
    """top_k 1: the first configuration sent to the long budget lost its rung checkpoint. Every
    worker that takes its leg stops; once it is given up, the next worker fails that leg without
    training, the next in rank takes the place, and the study ends with a long-budget result."""
    url = f"sqlite:///{tmp_path / 'lost.db'}"
    cfg = load_config(
        "quickstart", [*RUNG_STUDY, "name=lost", f"storage={url}", "stages.promote.top_k=1"]
    )
    studies = open_studies(cfg, url)
    runner = LostCheckpointRunner(cfg)
    for _ in range(2):  # two workers, one after the other: each stops on the same leg
        with pytest.raises(StageError, match="gone with its disk; this worker stopped"):
            run_rungs(studies, runner, cfg)
    lost = runner.lost[0]
    assert not long_budget_trials(studies, cfg)
    assert "given up (its checkpoint is lost)" in give_up(
        studies, cfg, lost, "its checkpoint is lost"
    )
    run_rungs(studies, runner, cfg)
    best = long_budget_trials(studies, cfg)
    assert len(best) == 1 and best[0].user_attrs["config"] != lost
    legs = [
        t
        for t in studies.promote.get_trials()
        if t.user_attrs.get("config") == lost and t.user_attrs["rung_to"] == runner.last
    ]
    assert [t.state for t in legs] == [TrialState.FAIL] * 3  # two workers stopped, then given up
    assert runner.lost == [lost, lost]  # the third attempt never reached training
    assert legs[-1].user_attrs["fail_reason"] == "given up: its checkpoint is lost"
    assert {r.number: r for r in scheduler_records(studies, cfg)}[lost].failed
    # Given up on purpose: the study ended, not a configuration lost (search.run exits 0).
    assert not any(e["without_result"] for e in summarize(studies, cfg)["stages"].values())
    idle = next(r for r in scheduler_records(studies, cfg) if r.reached == 1 and not r.failed)
    said = give_up(studies, cfg, idle.number, "a second thought")
    assert said.endswith(
        "it had no leg queued or running, it is not continued again; its recorded results stay"
    )
    snapshot = records_from_snapshot(best[0].user_attrs["promotion"]["records"])
    settings = scheduler_settings(cfg)
    assert promotion_justified(snapshot, best[0].user_attrs["config"], 9, **settings)


class GiveUpWhileTraining(CurveRunner):
    """:class:`CurveRunner` whose first leg to the long budget is given up while it trains
    (its checkpoint was readable after all); ``said`` holds what give_up answered and what
    another worker would decide at that moment."""

    def __init__(self, cfg, studies) -> None:  # noqa: ANN001
        super().__init__(cfg)
        self.studies = studies
        self.said: list = []

    def objective(self, stage: str):  # noqa: ANN201
        inner = super().objective(stage)

        def run(trial: optuna.Trial) -> float:
            if (
                int(trial.user_attrs.get("rung_to", 0)) == rung_ladder(self.cfg)[-1]
                and not self.said
            ):
                config = int(trial.user_attrs["config"])
                self.said.append(config)
                self.said.append(give_up(self.studies, self.cfg, config, "a second thought"))
                records = scheduler_records(self.studies, self.cfg)
                self.said.append(decide(records, **scheduler_settings(self.cfg)))
            return inner(trial)

        return run


def test_a_configuration_given_up_while_its_leg_trains_keeps_that_leg_and_its_place(
    tmp_path: Path,
) -> None:
    """top_k 1: giving up a configuration whose long leg is training on a healthy worker does
    not free its place (a second long run would exceed top_k) nor end the study under it."""
    url = f"sqlite:///{tmp_path / 'training.db'}"
    cfg = load_config(
        "quickstart", [*RUNG_STUDY, "name=training", f"storage={url}", "stages.promote.top_k=1"]
    )
    studies = open_studies(cfg, url)
    runner = GiveUpWhileTraining(cfg, studies)
    run_rungs(studies, runner, cfg)
    config, said, decided = runner.said
    assert said.endswith(
        "given up (a second thought): its leg in training runs to its end, it is not continued "
        "again; its recorded results stay"
    )
    assert decided == Wait()  # not Finished, and no other configuration sent to the long budget
    best = long_budget_trials(studies, cfg)
    assert [t.user_attrs["config"] for t in best] == [config]
    assert not any(e["without_result"] for e in summarize(studies, cfg)["stages"].values())


def test_a_killed_leg_awaiting_its_retry_still_counts_as_running(tmp_path: Path) -> None:
    """Optuna fails a dead worker's trial and queues its retry in two steps: in between the
    configuration is on its way (its place kept, the study not finished). If the process that
    failed it died before queueing the retry (here: after claiming it, on another machine), a
    worker queues the retry once grace_period has passed (counted from ``failed_at``), and the
    configuration goes on; it used to be given up."""
    from search.scheduler import Finished, Wait, decide
    from search.stages import _retry_late
    from storage.retry import FAILED_AT_ATTR
    from storage.trial_retry import retry_claim_key

    cfg, studies, settings, waiting = finished_study_with_a_short_grace(tmp_path, "window")
    # the leg 1 -> 3 of that configuration, failed by heartbeat (stamped as the storage does),
    # its retry not yet queued
    failed = add_failed_leg(studies, waiting.number, {}, {FAILED_AT_ATTR: time.time()})
    dead = Claims(studies.claims.engine, owner="another-host:4242/4026531836")
    assert dead.take(retry_claim_key("window.screen", failed.number))
    record = {r.number: r for r in scheduler_records(studies, cfg)}[waiting.number]
    assert record.running and not record.failed
    assert decide(scheduler_records(studies, cfg), **settings) == Wait()
    _retry_late(studies, cfg, "screen")  # within grace_period: its taker may be queueing it
    assert len(studies.screen.get_trials()) == failed.number + 1
    time.sleep(2.2)
    record = {r.number: r for r in scheduler_records(studies, cfg)}[waiting.number]
    assert record.running and not record.failed  # never given up for a dead process
    _retry_late(studies, cfg, "screen")
    _retry_late(studies, cfg, "screen")  # once, however often it is looked at
    retry = studies.screen.get_trials()[failed.number + 1 :]
    assert [(t.state, t.system_attrs["retry_history"]) for t in retry] == [
        (TrialState.WAITING, [failed.number])
    ]
    assert {k: retry[0].user_attrs[k] for k in ("config", "rung_from", "rung_to")} == {
        "config": waiting.number,
        "rung_from": 1,
        "rung_to": 3,
    }
    run_rungs_in_time(studies, CurveRunner(cfg), cfg)
    assert studies.screen.get_trials()[failed.number + 1].state == TrialState.COMPLETE
    assert decide(scheduler_records(studies, cfg), **settings) == Finished()


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used")
def test_a_failure_under_a_lower_max_retries_stays_failed_when_a_later_run_raises_it(
    tmp_path: Path,
) -> None:
    """A leg to the long budget failed with no reason (as a killed worker's is, by heartbeat)
    under max_retries=0: not retried, its place free for the next in rank. A later run with
    max_retries=3 must not revive it, which would put a second configuration at a long budget
    of top_k 1: a failure is retried under the limit in force when it happened."""
    from search.stages import _retry_late
    from storage.retry import RETRY_LIMIT_ATTR

    url = f"sqlite:///{tmp_path / 'raised.db'}"
    base = [*RUNG_STUDY, "name=raised", f"storage={url}", "stages.promote.top_k=1",
            "max_retries=0", "heartbeat_interval=1", "grace_period=2"]  # fmt: skip
    cfg = load_config("quickstart", base)
    studies = open_studies(cfg, url)
    run_rungs_in_time(studies, CurveRunner(cfg), cfg)
    *_, below, last = scheduler_settings(cfg)["rungs"]
    (holder,) = long_budget_trials(studies, cfg)
    source = next(
        t
        for t in studies.promote.get_trials()
        if t.user_attrs.get("rung_to") == below
        and t.user_attrs["config"] != holder.user_attrs["config"]
    )
    other = source.user_attrs["config"]
    studies.promote.enqueue_trial(
        source.params,
        user_attrs={"config": other, "rung_from": below, "rung_to": last,
                    "checkpoint_dir": source.user_attrs.get("checkpoint_dir")},
    )  # fmt: skip
    studies.promote.tell(studies.promote.ask(), state=TrialState.FAIL)  # through the storage
    failed = studies.promote.get_trials()[-1]
    assert failed.system_attrs[RETRY_LIMIT_ATTR] == 0

    raised = load_config("quickstart", [*base, "max_retries=3"])
    again = open_studies(raised, url)
    record = {r.number: r for r in scheduler_records(again, raised)}[other]
    assert record.failed and not record.running
    assert decide(scheduler_records(again, raised), **scheduler_settings(raised)) == Finished()
    time.sleep(2.2)  # past grace_period: a retry a dead process owed would be queued now
    _retry_late(again, raised, "promote")
    assert [t.state for t in again.promote.get_trials()][-1] == TrialState.FAIL  # none queued
    assert len(long_budget_trials(again, raised)) == 1


def test_a_seat_no_configuration_holds_is_free_again(tmp_path: Path) -> None:
    """A long-budget seat claim left by a take interrupted mid-way (or by an older version) is
    counted as free, so the study still reaches the long budget (it used to spin forever)."""
    url = f"sqlite:///{tmp_path / 'leaked.db'}"
    cfg = load_config(
        "quickstart", [*RUNG_STUDY, "name=leaked", f"storage={url}", "stages.promote.top_k=1"]
    )
    studies = open_studies(cfg, url)
    assert studies.claims.take("leaked.screen/long-budget/0")  # held by no configuration
    run_rungs_in_time(studies, CurveRunner(cfg), cfg)
    assert len(long_budget_trials(studies, cfg)) == 1
    assert len(studies.claims.taken("leaked.screen/long-budget/")) == 2
    check_rung_study(url, cfg)


@pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning")  # ask/tell, no optimize
def test_a_failed_trial_is_stamped_with_when_it_failed(tmp_path: Path) -> None:
    """``failed_at`` (time.time()) tells how long ago a trial failed on any machine, whatever
    its time zone; Optuna's own timestamps are naive local times."""
    from storage.retry import FAILED_AT_ATTR

    url = f"sqlite:///{tmp_path / 'stamp.db'}"
    cfg = load_config("quickstart", [*RUNG_STUDY, "name=stamp", f"storage={url}"])
    studies = open_studies(cfg, url)
    trial = studies.promote.ask()
    before = time.time()
    studies.promote.tell(trial, state=TrialState.FAIL)
    stamped = studies.promote.get_trials()[0].system_attrs[FAILED_AT_ATTR]
    assert before <= stamped <= time.time()


def test_deleting_a_study_keeps_the_claims_of_a_study_whose_name_extends_it(tmp_path: Path):
    """``exp`` and ``exp.v2`` share a storage: deleting ``exp`` gives back its claims only."""
    from search.stages import delete_stage_studies

    url = f"sqlite:///{tmp_path / 'two.db'}"
    kept = {}
    for name in ("exp", "exp.v2"):
        cfg = load_config("quickstart", [*RUNG_STUDY, f"name={name}", f"storage={url}"])
        studies = open_studies(cfg, url)
        for key in ("long-budget/0", "continue/3/9"):
            assert studies.claims.take(f"{studies.screen.study_name}/{key}")
        kept[name] = studies
    before = sorted(kept["exp.v2"].claims.taken("exp.v2."))
    assert {"exp.v2.screen/continue/3/9", "exp.v2.screen/long-budget/0"} <= set(before)
    delete_stage_studies("exp", url)
    assert sorted(kept["exp.v2"].claims.taken("exp.v2.")) == before
    assert kept["exp"].claims.taken("exp.screen/") == []


@pytest.mark.parametrize("direction", ["maximize", "minimize"])
def test_the_best_trial_of_a_stage_is_taken_at_its_deepest_rung(tmp_path: Path, direction):
    """A rung-1 value and a rung-3 value are taken at different budgets: the best of a stage
    (summary, report) is the best at the deepest rung reached, then by value."""
    from search.stages import top_trials

    study = optuna.create_study(
        storage=f"sqlite:///{tmp_path / 'rank.db'}", study_name="s", direction=direction
    )
    good, bad = (0.99, 0.2) if direction == "maximize" else (0.01, 0.8)
    for value, rung in [(good, 1), (bad, 3), ((good + bad) / 2, 3), (good, 1)]:
        study.add_trial(
            optuna.trial.create_trial(value=value, user_attrs={"rung_to": rung}, params={})
        )
    assert [(t.user_attrs["rung_to"], t.value) for t in top_trials(study, 4)] == [
        (3, (good + bad) / 2),
        (3, bad),
        (1, good),
        (1, good),
    ]
    assert [t.number for t in top_trials(study, 4)][2:] == [0, 3]  # ties in trial order


def test_baselines_interrupted_while_scored_are_scored_by_the_next_run(tmp_path: Path) -> None:
    from search.stages import BASELINES_ATTR, record_baselines

    url = f"sqlite:///{tmp_path / 'b.db'}"
    cfg = load_config("quickstart", [*RUNG_STUDY, f"storage={url}"])
    studies = open_studies(cfg, url)

    class Interrupted(CurveRunner):
        def baselines(self) -> dict[str, float]:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        record_baselines(studies, Interrupted(cfg))
    record_baselines(open_studies(cfg, url), CurveRunner(cfg))
    assert studies.screen.user_attrs[BASELINES_ATTR] == {"pixels": 0.1}


@pytest.mark.slow
def test_the_final_trials_figure_gets_every_leg_of_the_configuration_it_continues(
    tmp_path: Path,
) -> None:
    """The final trial's learning-curve artifact starts with the pretraining of the promoted
    configuration: every leg of it (rungs 1 -> 3 -> 9), not only the last leg's epochs."""
    from search import TrialRunner

    url = f"sqlite:///{tmp_path / 'ssl-search.db'}"
    overrides = [f"runs_dir={tmp_path}", f"storage={url}", *REAL_RUN, "stages.promote.epochs=9"]
    cfg = load_config("quickstart", overrides)
    studies = open_studies(cfg, url)
    runner = TrialRunner(
        cfg,
        device="cpu",
        progress=False,
        find_trial=studies.find_trial,
        source_curve=studies.pretrain_curve,
    )
    seen: dict[str, list[int]] = {}

    def hook(trial, run, tcfg, extra) -> None:  # noqa: ANN001, ARG001
        if trial.user_attrs.get("stage") == "final":
            seen["epochs"] = [row["epoch"] for row in extra["source_curve"]]
            seen["last_leg"] = extra["source_trial"].user_attrs["rung_from"]

    runner.hooks.append(hook)
    run_stages(studies, runner, cfg)
    assert seen["last_leg"] == 3  # the promoted trial is the 3 -> 9 leg ...
    assert seen["epochs"] == list(range(1, 10))  # ... and the figure shows epochs 1 to 9


def test_interruptions_do_not_spend_a_configurations_retries(tmp_path: Path) -> None:
    """A job stopped three times (Ctrl-C, SIGTERM, preemption) in the same long leg keeps its
    configuration with ``max_retries=1``: only failures spend retries, not stops on purpose."""
    url = f"sqlite:///{tmp_path / 'p.db'}"
    cfg = load_config("quickstart", [*RUNG_STUDY, f"storage={url}", "max_retries=1"])
    stopped: list[int] = []

    class Preempted(CurveRunner):
        def objective(self, stage: str):  # noqa: ANN202
            run = super().objective(stage)

            def preempted(trial: optuna.Trial) -> float:
                if trial.user_attrs.get("rung_to") == 27 and len(stopped) < 3:
                    stopped.append(int(trial.user_attrs["config"]))
                    raise KeyboardInterrupt
                return run(trial)

            return preempted

    for _ in range(3):
        with pytest.raises(KeyboardInterrupt):
            run_rungs(open_studies(cfg, url), Preempted(cfg), cfg)
    run_rungs(open_studies(cfg, url), Preempted(cfg), cfg)
    assert len(stopped) == 3 and len(set(stopped)) == 1, stopped  # the same leg, 3 times
    promote = optuna.load_study(study_name=f"{cfg.name}.promote", storage=url).get_trials()
    at_last = [
        t for t in promote if t.user_attrs.get("rung_to") == 27 and t.state == TrialState.COMPLETE
    ]
    finished = [t for t in at_last if t.user_attrs.get("config") == stopped[0]]
    assert len(finished) == 1  # the fourth try reached the long budget
    from storage.trial_retry import retries_spent

    assert retries_spent(finished[0]) == 0  # three retries, none of them spent


def test_baselines_claimed_by_a_process_killed_while_scoring_them_are_scored_again(
    tmp_path: Path,
) -> None:
    """SIGKILL while scoring the baselines leaves their claim taken: a later run takes it over
    when its taker is known to be gone (this machine, process gone) or the claim is stale (another
    machine, over BASELINES_CLAIM_STALE_S); a live taker elsewhere keeps it."""

    from search.stages import BASELINES_ATTR, BASELINES_CLAIM_STALE_S, record_baselines
    from storage.claims import CLAIMS, Claims

    url = f"sqlite:///{tmp_path / 'b.db'}"
    cfg = load_config("quickstart", [*RUNG_STUDY, f"storage={url}"])
    studies = open_studies(cfg, url)
    key = f"{studies.screen.study_name}/baselines"
    engine = studies.claims.engine

    dead = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead.kill()
    dead.wait(timeout=30)
    assert Claims(engine, owner=_owner_of(dead.pid)).take(key)
    record_baselines(open_studies(cfg, url), CurveRunner(cfg))
    assert studies.screen.user_attrs[BASELINES_ATTR] == {"pixels": 0.1}

    # Another machine's taker: kept while fresh, taken over once stale.
    other = open_studies(
        load_config("quickstart", [*RUNG_STUDY, "name=other", f"storage={url}"]), url
    )
    other_key = f"{other.screen.study_name}/baselines"
    assert Claims(engine, owner="elsewhere:1").take(other_key)
    record_baselines(other, CurveRunner(cfg))
    assert BASELINES_ATTR not in other.screen.user_attrs
    with engine.begin() as conn:  # taken long ago
        conn.execute(
            CLAIMS.update()
            .where(CLAIMS.c.key == other_key)
            .values(created_at=time.time() - BASELINES_CLAIM_STALE_S - 60)
        )
    record_baselines(other, CurveRunner(cfg))
    assert other.screen.user_attrs[BASELINES_ATTR] == {"pixels": 0.1}


def _a_later_run_found_a_better_long_budget_result(
    tmp_path: Path,
) -> tuple[DictConfig, str, Studies, FrozenTrial, FrozenTrial]:
    """A finished rung study (its final evaluates its best run at the long budget) to which a
    later run added a better result there, as a larger top_k would bring: the config, storage
    URL, studies, the best run the final evaluated and the better one."""
    url = f"sqlite:///{tmp_path / 'f.db'}"
    cfg = load_config("quickstart", [*RUNG_STUDY, f"storage={url}"])
    run_stages(open_studies(cfg, url), CurveRunner(cfg), cfg)
    studies = open_studies(cfg, url)
    (first,) = studies.final.get_trials()
    best = long_budget_trials(studies, cfg)[0]
    assert first.user_attrs["source_trial"] == best.number
    better = optuna.trial.create_trial(
        params=best.params,
        distributions=best.distributions,
        value=best.value + 0.5,
        user_attrs={"config": 99, "rung_to": 27, "stage": "promote", "checkpoint_dir": "c/99"},
    )
    studies.promote.add_trial(better)
    return cfg, url, studies, best, studies.promote.get_trials()[-1]


def test_a_better_long_budget_result_found_by_a_later_run_gets_its_own_final(
    tmp_path: Path,
) -> None:
    """A rerun with a larger budget that finds a better run at the long budget evaluates it
    in the final stage too; the earlier final stays, and nothing is evaluated twice."""
    from search.stages import run_final

    cfg, url, studies, best, newest = _a_later_run_found_a_better_long_budget_result(tmp_path)
    run_final(studies, CurveRunner(cfg), cfg)
    run_final(open_studies(cfg, url), CurveRunner(cfg), cfg)  # again: nothing new
    finals = studies.final.get_trials()
    assert [t.user_attrs["source_trial"] for t in finals] == [best.number, newest.number]
    assert all(t.state == TrialState.COMPLETE for t in finals)
    assert progress(studies, cfg).final == 1  # the best's final is done


def test_the_final_shown_is_the_best_long_budget_runs_even_when_an_earlier_final_scored_higher(
    tmp_path: Path,
) -> None:
    """The configuration found is the best run at the long budget, as the search ranks it:
    the summary and the report show its final, not whichever final scored the highest probe
    accuracy; until its final completes, the earlier best's stands in."""
    from reporting.tables import best_params_frame
    from search import found_final

    cfg, _, studies, _, newest = _a_later_run_found_a_better_long_budget_result(tmp_path)
    (first,) = studies.final.get_trials()
    assert found_final(studies, cfg).number == first.number  # its final is still to come
    assert progress(studies, cfg).final == 0
    its_final = optuna.trial.create_trial(
        params=first.params,
        distributions=first.distributions,
        value=first.value / 2,  # a lower probe accuracy than the earlier best's final
        user_attrs={"source_study": studies.promote.study_name, "source_trial": newest.number},
    )
    studies.final.add_trial(its_final)
    shown = found_final(studies, cfg)
    assert shown.user_attrs["source_trial"] == newest.number
    assert summarize(studies, cfg)["stages"]["final"]["best"]["number"] == shown.number
    stage_studies = {stage: studies.of(stage) for stage in ("screen", "promote", "final")}
    assert found_final(stage_studies, cfg).number == shown.number  # as the report loads them
    by_stage = best_params_frame(cfg, stage_studies).set_index("stage")  # the report's table
    assert by_stage.loc["final", "number"] == shown.number
    assert progress(studies, cfg).final == 1


def test_a_failure_whose_work_a_later_attempt_did_or_the_user_gave_up_leaves_no_result_missing(
    tmp_path: Path,
) -> None:
    """The exit code's list of configurations without a result: a final that failed for good
    and a later run's attempt at the same promoted trial completed has its result; a leg of a
    configuration the user then gave up (its checkpoint unreadable) was ended on purpose.
    Before, both kept the run's exit code at 1 for good."""
    url = f"sqlite:///{tmp_path / 'f.db'}"
    cfg = load_config("quickstart", [*RUNG_STUDY, f"storage={url}"])
    run_stages(open_studies(cfg, url), CurveRunner(cfg), cfg)
    studies = open_studies(cfg, url)
    (done,) = studies.final.get_trials()
    failed_final = optuna.trial.create_trial(  # an earlier run's attempt, its retries spent
        params=done.params,
        distributions=done.distributions,
        state=TrialState.FAIL,
        user_attrs={
            **done.user_attrs,
            "fail_reason": "CheckpointError: pretrain-best.pt is unreadable",
        },
    )
    studies.final.add_trial(failed_final)
    records = scheduler_records(studies, cfg)
    short = next(r.number for r in records if max(r.results) < rung_ladder(cfg)[-1])
    leg = next(t for t in studies.screen.get_trials() if t.number == short)
    failed_leg = optuna.trial.create_trial(
        params=leg.params,
        distributions=leg.distributions,
        state=TrialState.FAIL,
        user_attrs={
            "config": short,
            "rung_from": 1,
            "rung_to": 3,
            "fail_reason": "CheckpointError: pretrain.pt is unreadable",
        },
    )
    studies.promote.add_trial(failed_leg)
    lost = studies.promote.get_trials()[-1].number
    # A leg to the next rung of a configuration whose earlier leg completed: not the same work.
    stopped_at_9 = {r.number for r in records if max(r.results) == 9}
    earlier = next(
        t
        for t in studies.promote.get_trials()
        if t.user_attrs.get("rung_to") == 9 and t.user_attrs["config"] in stopped_at_9
    )
    next_leg = optuna.trial.create_trial(
        params=earlier.params,
        distributions=earlier.distributions,
        state=TrialState.FAIL,
        user_attrs={
            **{k: earlier.user_attrs[k] for k in ("config", "source_study", "source_trial")},
            "rung_from": 9,
            "rung_to": 27,
            "fail_reason": "CheckpointError: pretrain.pt is unreadable",
        },
    )
    studies.promote.add_trial(next_leg)
    missing = summarize(studies, cfg)["stages"]
    assert not missing["final"]["without_result"]
    assert sorted(missing["promote"]["without_result"]) == [lost, lost + 1]
    give_up(studies, cfg, short, "its checkpoint is corrupt")
    assert list(summarize(studies, cfg)["stages"]["promote"]["without_result"]) == [lost + 1]


def test_a_step_claimed_by_a_process_that_died_on_this_machine_is_taken_over(
    tmp_path: Path,
) -> None:
    """An enqueue-once step (the baseline trial, the promotions, the final) whose claim a
    killed process left is done by the next process, not waited on for two minutes."""

    from search.stages import _enqueue_once
    from storage.claims import Claims

    url = f"sqlite:///{tmp_path / 'e.db'}"
    studies = open_studies(load_config("quickstart", [*RUNG_STUDY, f"storage={url}"]), url)
    dead = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead.kill()
    dead.wait(timeout=30)
    key = f"{studies.final.study_name}/enqueue/x"
    assert Claims(studies.claims.engine, owner=_owner_of(dead.pid)).take(key)
    done: list[int] = []
    started = time.monotonic()
    _enqueue_once(studies, key, lambda: done.append(1) or 1, studies.final)
    assert done == [1] and time.monotonic() - started < 30
    assert studies.final.user_attrs[f"enqueued:{key}"] == 1


def test_the_previous_pipeline_promotes_what_a_larger_top_k_adds_on_a_rerun(tmp_path: Path):
    """search.pruner none/hyperband: a rerun with a larger top_k (and screen) promotes the
    configurations its top-k adds; the ones already promoted are not trained again."""
    url = f"sqlite:///{tmp_path / 'np.db'}"
    base = [f"storage={url}", f"runs_dir={tmp_path}", "search.pruner.name=none"]
    base += ["stages.final.enabled=false", "search.sampler.name=random"]
    first = load_config("quickstart", [*base, "stages.screen.trials=6", "stages.promote.top_k=2"])
    run_stages(open_studies(first, url), CurveRunner(first), first)
    later = load_config("quickstart", [*base, "stages.screen.trials=10", "stages.promote.top_k=4"])
    studies = open_studies(later, url)
    run_stages(studies, CurveRunner(later), later)
    promoted = [t.user_attrs["source_trial"] for t in studies.promote.get_trials()]
    best = [t.number for t in top_trials(studies.screen, 4)]
    assert sorted(promoted) == sorted(best), (promoted, best)
    assert progress(studies, later).long_budget == 4


def _owner_of(pid: int) -> str:
    """A claim owner naming process ``pid`` of this machine and PID namespace."""
    from storage.claims import default_owner

    host_and_pid, _, namespace = default_owner().partition("/")
    return f"{host_and_pid.partition(':')[0]}:{pid}/{namespace}"


def test_a_claim_of_another_pid_namespace_or_without_one_is_never_taken_for_gone() -> None:
    """Containers on one host share its name, not its process ids: only a process of this
    machine and PID namespace is known to be gone."""
    from storage.claims import owner_gone

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=30)
    assert owner_gone(_owner_of(dead.pid))
    assert not owner_gone(_owner_of(os.getpid()))  # alive
    host = socket.gethostname()
    assert not owner_gone(f"{host}:{dead.pid}")  # no namespace: an older owner, not known
    assert not owner_gone(f"{host}:{dead.pid}/1")  # another container
    assert not owner_gone(f"elsewhere:{dead.pid}/{_owner_of(0).partition('/')[2]}")


def test_the_summary_says_at_which_rung_a_stage_best_was_measured(capsys) -> None:
    """A screen study holds legs at several rungs: its best (the deepest rung first) is named
    with its configuration and epochs, so it is not read against 1-epoch values in the log."""
    from search.run import print_summary
    from search.space import baseline_params

    cfg = load_config("quickstart", REAL_RUN)
    params = baseline_params(cfg)

    def stage(number: int, attrs: dict) -> dict:
        best = {"number": number, "value": 0.9653, "params": params, "user_attrs": attrs}
        counts = {"COMPLETE": 1}
        return {"study": "q", "counts": counts, "best": best, "failures": {}, "lineage": {}}

    summary = {
        "metric": "knn_accuracy",
        "stages": {
            "screen": stage(15, {"rung_to": 1}),  # a first leg: trial and configuration #15
            "promote": stage(1, {"rung_to": 9, "config": 14}),
            "final": {"study": "q", "counts": {}, "failures": {}},
        },
    }
    print_summary(cfg, summary)
    out = capsys.readouterr().out
    assert "best #15 (at 1 epoch): knn_accuracy 96.53%" in out
    assert "best #1 (configuration #14, at 9 epochs): knn_accuracy 96.53%" in out
    # A promote trial numbered like its configuration is still a promote trial: named in full.
    summary["stages"]["promote"] = stage(14, {"rung_to": 9, "config": 14})
    print_summary(cfg, summary)
    assert "best #14 (configuration #14, at 9 epochs)" in capsys.readouterr().out


def test_status_tells_where_a_study_stands_and_writes_nothing(tmp_path: Path) -> None:
    """``search.run --status``: progress and the summary from storage, with the settings the
    study was made with; the database is byte for byte what it was (no sampler seed claimed,
    no config stored)."""
    import sqlite3

    path = tmp_path / "status.db"
    url = f"sqlite:///{path}"
    cfg = load_config("quickstart", [*RUNG_STUDY, "name=status", f"storage={url}"])
    studies = open_studies(cfg, url)
    run_rungs(studies, CurveRunner(cfg), cfg)
    some = next(r for r in scheduler_records(studies, cfg) if r.reached == 1)
    give_up(studies, cfg, some.number, "a lost disk")

    def dump() -> list[str]:
        with sqlite3.connect(path) as conn:
            return list(conn.iterdump())

    before = dump()
    shown = run_module(
        "search.run", "study=quickstart", "name=status", f"storage={url}", "--status"
    )
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    legs = sum(len(studies.of(s).get_trials()) for s in ("screen", "promote"))
    at_long = len(long_budget_trials(studies, cfg))
    assert (
        lines[0] == f"study status: storage {url}: legs {legs}, long budget {at_long}/3, final 0/1"
    )
    assert "== status: contrastive on digits, metric knn_accuracy ==" in shown.stdout
    assert f"given up: configuration #{some.number} (a lost disk)" in shown.stdout
    assert dump() == before
    missing = run_module(
        "search.run", "study=quickstart", "name=nothing", f"storage={url}", "--status"
    )
    assert missing.returncode == 2 and "no study 'nothing'" in missing.stderr
    assert dump() == before


def test_progress_says_when_the_long_budget_holds_more_than_top_k_now_allows() -> None:
    """A rerun with a smaller ``top_k`` than an earlier run's: not "3/2"."""
    from search.stages import Progress

    fits = Progress(configurations=12, planned=12, legs=20, long_budget=2, top_k=2, final=1,
                    final_planned=1)  # fmt: skip
    assert str(fits) == "legs 20, long budget 2/2, final 1/1"
    more = Progress(configurations=13, planned=12, legs=24, long_budget=3, top_k=2, final=0,
                    final_planned=0)  # fmt: skip
    assert str(more) == "legs 24, long budget 3 (top_k now 2)"
