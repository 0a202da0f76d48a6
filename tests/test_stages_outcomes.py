"""What the stages hand the user, with real storage: the final of the best long-budget run
whichever the metric's direction, promotions that are not lost when queueing them is
interrupted, the machine a continued leg's checkpoint comes from, stage=screen and
stage=promote of a rung study, the previous pipeline's promotions with several workers, and
what the summary counts as a configuration lost.

As in ``test_rungs``, training is replaced by :class:`test_rungs.CurveRunner` (a trial's value
is a fixed function of its parameters and rung), so these tests take seconds.
"""

from __future__ import annotations

import textwrap
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from test_rungs import RUNG_STUDY, CurveRunner, run_scripts

from search.config import load_config
from search.scheduler import Continue, decide
from search.stages import (
    Studies,
    long_budget_trials,
    open_studies,
    progress,
    run_final,
    run_rungs,
    run_stages,
    scheduler_records,
    scheduler_settings,
    summarize,
    top_trials,
)
from storage.claims import Claims


def _leg(value: float, **attrs) -> optuna.trial.FrozenTrial:  # noqa: ANN003
    """A completed leg with ``attrs`` as its user attrs (no params: CurveRunner samples them)."""
    return optuna.trial.create_trial(value=value, user_attrs=attrs)


def test_a_minimized_metric_evaluates_its_lowest_long_budget_run_in_the_final(
    tmp_path: Path,
) -> None:
    """``search.metric=val_mae``: the best run at the long budget is the lowest, and that is
    the one the final stage evaluates (not the worst)."""
    url = f"sqlite:///{tmp_path / 'mae.db'}"
    cfg = load_config(
        "mnist_autoencoder", [*RUNG_STUDY, "search.metric=val_mae", "name=mae", f"storage={url}"]
    )
    studies = open_studies(cfg, url)
    for config, value in [(3, 0.30), (5, 0.10), (8, 0.20)]:
        studies.promote.add_trial(
            _leg(value, config=config, rung_from=9, rung_to=27, checkpoint_dir=f"c/{config}")
        )
    assert [t.value for t in long_budget_trials(studies, cfg)] == [0.10, 0.20, 0.30]
    run_final(studies, CurveRunner(cfg), cfg)
    (final,) = studies.final.get_trials()
    assert final.state == TrialState.COMPLETE
    assert final.user_attrs["source_value"] == 0.10
    assert final.user_attrs["source_checkpoint_dir"] == "c/5"
    assert progress(studies, cfg).final == 1


class FailingFinal(CurveRunner):
    """:class:`CurveRunner` whose final stage fails as an out-of-memory GPU does: with its
    reason, so it is not retried."""

    def objective(self, stage: str):  # noqa: ANN201
        if stage != "final":
            return super().objective(stage)

        def run(trial: optuna.Trial) -> float:
            trial.set_user_attr("fail_reason", "OutOfMemoryError: CUDA out of memory")
            raise RuntimeError("CUDA out of memory")

        return run


def test_a_final_that_failed_for_good_is_tried_once_more_by_a_later_run_only(
    tmp_path: Path,
) -> None:
    """A final whose retries are spent is not tried again in the run it failed in (its workers
    opened the study before it failed), and is tried once more by a later run: else no rerun
    could ever give the search its test numbers."""
    url = f"sqlite:///{tmp_path / 'again.db'}"
    cfg = load_config(
        "mnist_autoencoder", [*RUNG_STUDY, "search.metric=val_mae", "name=again", f"storage={url}"]
    )
    studies = open_studies(cfg, url)
    for config, value in [(3, 0.30), (5, 0.10)]:
        studies.promote.add_trial(
            _leg(value, config=config, rung_from=9, rung_to=27, checkpoint_dir=f"c/{config}")
        )
    run_final(studies, FailingFinal(cfg), cfg)
    run_final(studies, FailingFinal(cfg), cfg)  # the same run again: nothing new
    assert [t.state for t in studies.final.get_trials()] == [TrialState.FAIL]
    time.sleep(0.01)
    later = open_studies(cfg, url)  # a later run
    run_final(later, CurveRunner(cfg), cfg)
    finals = later.final.get_trials()
    assert [t.state for t in finals] == [TrialState.FAIL, TrialState.COMPLETE]
    assert finals[1].user_attrs["source_checkpoint_dir"] == "c/5"  # the same source
    run_final(open_studies(cfg, url), CurveRunner(cfg), cfg)  # complete: nothing more
    assert len(later.final.get_trials()) == 2
    assert progress(later, cfg).final == 1


@pytest.mark.parametrize("direction", ["maximize", "minimize"])
def test_a_tie_at_the_long_budget_goes_to_the_configuration_the_scheduler_ranks_first(
    tmp_path: Path, direction: str
) -> None:
    """kNN accuracy is k / n_val, so ties are common on small validation sets. Two
    configurations tie at the long budget; the later one's leg was stored first. The final
    stage evaluates the one the scheduler ranks first (ties: the lower configuration), and
    ``top_trials`` (the summary's best) names the same one, not whichever leg came first."""
    metric = "knn_accuracy" if direction == "maximize" else "val_mae"
    url = f"sqlite:///{tmp_path / 'tie.db'}"
    cfg = load_config(
        "mnist_autoencoder", [*RUNG_STUDY, f"search.metric={metric}", "name=tie", f"storage={url}"]
    )
    studies = open_studies(cfg, url)
    worse = 0.5 if direction == "maximize" else 0.9
    for config, value in [(5, 0.8125), (2, 0.8125), (1, worse)]:
        studies.promote.add_trial(
            _leg(value, config=config, rung_from=9, rung_to=27, checkpoint_dir=f"c/{config}")
        )
    ranked = [t.user_attrs["config"] for t in long_budget_trials(studies, cfg)]
    assert ranked == [2, 5, 1]
    assert top_trials(studies.promote, 1)[0].user_attrs["config"] == 2
    run_final(studies, CurveRunner(cfg), cfg)
    (final,) = studies.final.get_trials()
    assert final.user_attrs["source_checkpoint_dir"] == "c/2"


def _three_first_legs(tmp_path: Path, name: str):  # noqa: ANN202
    """A rung study (rungs 1 and 3, top_k 1) whose three configurations have their rung-1
    result, each trained on another machine; (cfg, studies, settings, the decision)."""
    url = f"sqlite:///{tmp_path / (name + '.db')}"
    cfg = load_config(
        "quickstart",
        [*RUNG_STUDY, f"name={name}", f"storage={url}", "stages.screen.epochs=1",
         "stages.promote.epochs=3", "stages.promote.top_k=1"],
    )  # fmt: skip
    studies = open_studies(cfg, url)
    for number, value in enumerate([0.5, 0.9, 0.7]):
        studies.screen.add_trial(
            _leg(value, rung_to=1, checkpoint_dir=f"c/{number}", worker=f"host-{number}:7/ns")
        )
    settings = scheduler_settings(cfg)
    decision = decide(scheduler_records(studies, cfg), **settings)
    assert decision == Continue(number=1, from_rung=1, to_rung=3)  # the best, to the long budget
    return cfg, studies, settings, decision


def _continue(studies: Studies, cfg, settings, decision) -> bool:  # noqa: ANN001
    from search.stages import _enqueue_continuation

    records = scheduler_records(studies, cfg)
    return _enqueue_continuation(studies, cfg, decision, records, settings, seats_taken=0)


def test_a_promotion_interrupted_while_queued_is_decided_again_not_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C (or a storage error) between claiming a promotion and queueing its leg gives the
    claim and the long-budget place back: the next decision queues the leg. Kept, the claim
    would say "promoted" with no leg queued, and the configuration would never be continued."""
    import search.stages as stages

    cfg, studies, settings, decision = _three_first_legs(tmp_path, "stop")
    snapshot = stages._snapshot

    def interrupted(records):  # noqa: ANN001, ANN202
        raise KeyboardInterrupt

    monkeypatch.setattr(stages, "_snapshot", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _continue(studies, cfg, settings, decision)
    assert not studies.promote.get_trials()  # nothing was queued ...
    assert not studies.claims.taken("stop.screen/continue/")  # ... and nothing stays claimed
    assert not studies.claims.taken("stop.screen/long-budget/")
    monkeypatch.setattr(stages, "_snapshot", snapshot)
    assert _continue(studies, cfg, settings, decision)
    (leg,) = studies.promote.get_trials(states=(TrialState.WAITING,))
    assert (leg.user_attrs["config"], leg.user_attrs["rung_from"], leg.user_attrs["rung_to"]) == (
        1,
        1,
        3,
    )
    assert len(studies.claims.taken("stop.screen/long-budget/")) == 1


def test_a_continued_leg_names_the_machine_that_wrote_its_rung_checkpoint(tmp_path: Path) -> None:
    """The leg 1 -> 3 resumes from the checkpoint the configuration's rung-1 leg wrote: it says
    on which machine (``checkpoint_written_on``), so a worker elsewhere that cannot read it is
    known to be at fault (its retry is free, see ``_free_retry``)."""
    cfg, studies, settings, decision = _three_first_legs(tmp_path, "host")
    assert _continue(studies, cfg, settings, decision)
    (leg,) = studies.promote.get_trials(states=(TrialState.WAITING,))
    assert leg.user_attrs["checkpoint_written_on"] == "host-1"
    assert leg.user_attrs["checkpoint_dir"] == "c/1"


# Rungs 1, 3, 9 and 27; the screen holds the legs to 1 and 3. No final: not what is tested.
SMALL_RUNG_STUDY = [
    *RUNG_STUDY,
    "stages.screen.trials=12",
    "stages.final.enabled=false",
]


def test_progress_counts_configurations_not_their_legs(tmp_path: Path) -> None:
    """The progress bar's count of configurations: each configuration once, whatever number of
    legs (to rungs 1 and 3) it has in the screen study."""
    url = f"sqlite:///{tmp_path / 'count.db'}"
    cfg = load_config("quickstart", [*SMALL_RUNG_STUDY, "name=count", f"storage={url}"])
    studies = open_studies(cfg, url)
    run_rungs(studies, CurveRunner(cfg), cfg)
    configurations = len(scheduler_records(studies, cfg))
    assert any(t.user_attrs.get("rung_to") == 3 for t in studies.screen.get_trials())
    assert len(studies.screen.get_trials()) > configurations
    assert progress(studies, cfg).configurations == configurations


def test_stage_screen_then_stage_promote_run_as_rungs_from_run_stages(tmp_path: Path) -> None:
    """``stage=screen`` ranks up to the screen's top rung without the long budget's cap
    (``top_k`` 1, yet more than one configuration reaches rung 3); ``stage=promote`` then
    continues the rungs to the long budget: legs from their rung checkpoints, not runs of
    the previous pipeline from scratch."""
    url = f"sqlite:///{tmp_path / 'split.db'}"
    base = [*SMALL_RUNG_STUDY, "name=split", f"storage={url}", "stages.promote.top_k=1"]
    screen_cfg = load_config("quickstart", [*base, "stage=screen"])
    run_stages(open_studies(screen_cfg, url), CurveRunner(screen_cfg), screen_cfg)
    studies = open_studies(screen_cfg, url)
    at_3 = [t for t in studies.screen.get_trials() if t.user_attrs.get("rung_to") == 3]
    assert len(at_3) > 1
    assert not studies.promote.get_trials()

    cfg = load_config("quickstart", [*base, "stage=promote"])
    run_stages(open_studies(cfg, url), CurveRunner(cfg), cfg)
    best = long_budget_trials(studies, cfg)
    assert [t.user_attrs["rung_to"] for t in best] == [27]  # top_k 1
    promote = studies.promote.get_trials()
    assert promote and all("rung_from" in t.user_attrs for t in promote)


# A worker of the previous pipeline (search.pruner none): the baseline configuration (queued
# first) is the best and ends last, after every other screen trial has ended.
PIPELINE_WORKER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    from test_stages_outcomes import SlowBestBaseline, PIPELINE
    from search.config import load_config
    from search.stages import open_studies, run_stages
    url = sys.argv[1]
    cfg = load_config("quickstart", [*PIPELINE, f"storage={{url}}"])
    run_stages(open_studies(cfg, url), SlowBestBaseline(cfg), cfg)
    """
)
PIPELINE = [
    "name=pipe",
    "search.pruner.name=none",
    "search.sampler.name=random",
    "stages.screen.trials=4",
    "stages.promote.top_k=1",
    "stages.final.enabled=false",
    "heartbeat_interval=2",
    "grace_period=20",
]


class SlowBestBaseline(CurveRunner):
    """:class:`CurveRunner` whose baseline trial scores best and ends only once the other
    screen trials have (and a moment later), so another worker sees a screen with nothing
    waiting while it still trains."""

    def objective(self, stage: str):  # noqa: ANN201
        inner = super().objective(stage)

        def run(trial: optuna.Trial) -> float:
            value = inner(trial)
            if stage != "screen" or trial.user_attrs.get("baseline") != "report":
                return value
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                done = trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if len(done) == int(self.cfg.stages.screen.trials) - 1:
                    break
                time.sleep(0.2)
            time.sleep(3)
            return 1.0

        return run


def test_two_workers_of_the_previous_pipeline_promote_once_the_whole_screen_has_ended(
    tmp_path: Path,
) -> None:
    """search.pruner none, two workers, top_k 1: the worker that runs out of screen trials
    waits for the one still training before it ranks the screen, so the best configuration
    (which ends last) is promoted, and only it, once."""
    url = f"sqlite:///{tmp_path / 'pipe.db'}"
    cfg = load_config("quickstart", [*PIPELINE, f"storage={url}"])
    open_studies(cfg, url, seed_offset=0)  # the schema first, as the launcher does
    run_scripts(PIPELINE_WORKER, [url], 2)
    studies = open_studies(cfg, url)
    screen = studies.screen.get_trials()
    assert [t.state for t in screen] == [TrialState.COMPLETE] * 4
    assert screen[0].user_attrs["baseline"] == "report" and screen[0].value == 1.0
    promote = studies.promote.get_trials()
    assert [t.user_attrs["source_trial"] for t in promote] == [0]
    assert promote[0].state == TrialState.COMPLETE


class SeedingRunner(CurveRunner):
    """:class:`CurveRunner` that keeps a seed as :class:`search.objective.TrialRunner` does: the
    seed a trial was queued with (a promotion carries its source's), else a new one of its own."""

    def objective(self, stage: str):  # noqa: ANN201
        inner = super().objective(stage)
        first = {"screen": 1000, "promote": 2000, "final": 3000}[stage]

        def run(trial: optuna.Trial) -> float:
            if trial.user_attrs.get("seed") is None:
                trial.set_user_attr("seed", first + trial.number)
            return inner(trial)

        return run


def test_the_previous_pipeline_promotes_a_configuration_with_its_screen_seed(
    tmp_path: Path,
) -> None:
    """search.pruner none: a promoted run is the screen trial's run for the long budget, the
    same params and the same seed (a new seed would be another run of the configuration)."""
    url = f"sqlite:///{tmp_path / 'seed.db'}"
    cfg = load_config(
        "quickstart",
        [f"storage={url}", "search.pruner.name=none", "stages.final.enabled=false",
         "search.sampler.name=random", "stages.screen.trials=4", "stages.promote.top_k=2"],
    )  # fmt: skip
    studies = open_studies(cfg, url)
    run_stages(studies, SeedingRunner(cfg), cfg)
    screen = {t.number: t for t in studies.screen.get_trials()}
    promote = studies.promote.get_trials()
    assert len(promote) == 2
    for t in promote:
        source = screen[t.user_attrs["source_trial"]]
        assert t.params == source.params
        assert t.user_attrs["seed"] == source.user_attrs["seed"] == 1000 + source.number


def test_a_diverged_trial_is_a_result_not_a_configuration_lost(tmp_path: Path) -> None:
    """The summary's ``without_result`` (``search.run`` exits 1 when it is not empty) lists the
    failures that lost their configuration: a bug, say, with no retry. A run whose training
    diverged failed on its own merits, which is a result for a search."""
    url = f"sqlite:///{tmp_path / 'nan.db'}"
    cfg = load_config("quickstart", [*RUNG_STUDY, "name=nan", f"storage={url}"])
    studies = open_studies(cfg, url)
    for reason in ["NonFiniteLossError: loss is nan at epoch 2", "ValueError: a bug"]:
        studies.screen.add_trial(
            optuna.trial.create_trial(
                state=TrialState.FAIL, user_attrs={"fail_reason": reason, "rung_to": 1}
            )
        )
    screen = summarize(studies, cfg)["stages"]["screen"]
    assert sorted(screen["failures"]) == [0, 1]
    assert screen["without_result"] == {1: "ValueError: a bug"}


def _pipeline_study(tmp_path: Path, name: str, *overrides: str):  # noqa: ANN202
    """The quickstart as the previous pipeline (search.pruner none, random sampling) in a new
    SQLite file ``name``.db; (its URL, cfg, studies)."""
    url = f"sqlite:///{tmp_path / (name + '.db')}"
    cfg = load_config(
        "quickstart",
        [f"storage={url}", f"runs_dir={tmp_path}", "search.pruner.name=none",
         "search.sampler.name=random", *overrides],
    )  # fmt: skip
    return url, cfg, open_studies(cfg, url)


def test_a_promoted_trial_another_worker_popped_first_is_not_replaced_by_a_new_sample(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The previous pipeline's promote stage: this worker claimed the one waiting trial, but by
    the time Optuna popped, it was gone (another worker's pop, or this worker's own pop whose
    commit answer was lost). Optuna then samples a new configuration; before, it trained that
    unscreened configuration for the whole long budget. Now it is pruned as nothing queued."""
    import search.stages as stages
    from search.naming import NOTHING_QUEUED

    url, cfg, studies = _pipeline_study(tmp_path, "ssl-search")
    studies.promote.enqueue_trial({"channels": 8}, user_attrs={"source_trial": 0})
    other = optuna.load_study(study_name=studies.promote.study_name, storage=url)
    real_claim = stages._claim_waiting

    def claim_then_lose_it(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        claimed = real_claim(*args, **kwargs)
        if claimed is not None:  # another process pops it and finishes it meanwhile
            taken = other.ask()
            assert taken.number == claimed
            other.tell(taken, 0.5)
        return claimed

    monkeypatch.setattr(stages, "_claim_waiting", claim_then_lose_it)
    stages._drain(studies, "promote", CurveRunner(cfg), cfg)
    trials = studies.promote.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.PRUNED]
    assert trials[1].user_attrs["prune_reason"].startswith(NOTHING_QUEUED)


def test_a_slot_whose_holder_popped_a_dead_workers_retry_goes_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker claims a slot for a new configuration; before it pops, a dead worker's trial
    goes stale, and Optuna's own ``optimize`` fails it and queues its retry, which that very
    pop takes. The slot was not used: it goes back, and the stage still starts every new
    configuration it planned. Before, the slot was lost, and the screen ended one short (the
    kill test in test_workers saw 5 of 6 now and then)."""
    import search.stages as stages

    url, cfg, studies = _pipeline_study(tmp_path, "slot", "heartbeat_interval=1", "grace_period=2")
    real_claim = stages._claim_slot
    dead: list[int] = []

    def claim_then_a_worker_dies(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        slot = real_claim(*args, **kwargs)
        if slot is not None and not dead:  # a worker's trial, whose worker died: silent
            storage = optuna.storages.RDBStorage(url)
            other = optuna.load_study(study_name=studies.screen.study_name, storage=storage)
            trial = other.ask()
            study_id = storage.get_study_id_from_name(other.study_name)
            storage.record_heartbeat(
                storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
            )
            dead.append(trial.number)
            time.sleep(3.5)  # past grace_period (SQLite keeps whole seconds): optimize fails it
        return slot

    monkeypatch.setattr(stages, "_claim_slot", claim_then_a_worker_dies)
    stages._drain(studies, "screen", CurveRunner(cfg), cfg, new_slots=2)
    trials = studies.screen.get_trials()
    (killed,) = [t for t in trials if t.number in dead]
    assert killed.state == TrialState.FAIL
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
    assert [t.state for t in retries] == [TrialState.COMPLETE]
    assert retries[0].number == killed.number + 1  # the slot holder's pop took the retry
    new = [t for t in trials if t.number not in dead and t not in retries]
    assert [t.state for t in new] == [TrialState.COMPLETE] * 2


def test_a_slot_whose_holder_was_stopped_in_a_queued_trial_goes_back(tmp_path: Path) -> None:
    """A worker on a slot pops a queued trial (one another process claimed, here) and is
    stopped in it (Ctrl-C): the trial goes back to the queue, and so does the slot, which
    started no configuration. Before, the slot stayed taken: the next run of the stage started
    one configuration fewer."""
    import search.stages as stages

    _, cfg, studies = _pipeline_study(tmp_path, "stop")
    studies.screen.enqueue_trial({"channels": 8})
    other = Claims(studies.claims.engine, owner="another-host:7/1")
    assert other.take(stages._waiting_key(studies.screen, 0))  # within its grace period

    class StoppedRunner(CurveRunner):
        def objective(self, stage: str):  # noqa: ANN201
            def run(trial: optuna.Trial) -> float:
                raise KeyboardInterrupt

            return run

    with pytest.raises(KeyboardInterrupt):
        stages._drain(studies, "screen", StoppedRunner(cfg), cfg, new_slots=1)
    trials = studies.screen.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]  # requeued
    assert studies.claims.taken(f"{studies.screen.study_name}/slot/") == []
