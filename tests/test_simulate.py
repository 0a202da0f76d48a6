"""The simulated-time benchmark (benchmarks/simulate.py) on synthetic learning curves."""

from __future__ import annotations

import doctest
import importlib.util
from collections.abc import Sequence
from pathlib import Path

import pytest

import benchmarks.simulate as simulate_module
from benchmarks.simulate import (
    Asha,
    Job,
    Pipeline,
    RandomSearch,
    default_target,
    load_table,
    simulate,
    synthetic_frame,
    synthetic_table,
    table_from_frame,
)
from search.scheduler import Continue, Finished, StartNew, Wait, promotion_justified, rungs

LONG = 27
LADDER = rungs(1, LONG, 3)  # [1, 3, 9, 27]


@pytest.fixture(scope="module")
def table() -> dict:
    """Rank-consistent curves: every configuration keeps its rank after every epoch."""
    return synthetic_table(n_configs=120, epochs=LONG, seed=0)


def asha(max_trials: int = 81, top_k: int = 3) -> Asha:
    return Asha(rungs=LADDER, eta=3, top_k=top_k, max_trials=max_trials, direction="maximize")


def test_module_examples() -> None:
    assert doctest.testmod(simulate_module).failed == 0


# ---- the table -----------------------------------------------------------------------------


def test_csv_round_trip(tmp_path: Path) -> None:
    frame = synthetic_frame(n_configs=4, epochs=5, seeds=2, noise=0.01, seed=3)
    assert list(frame.columns) == ["config_id", "seed", "epoch", "metric", "seconds"]
    frame.sample(frac=1.0, random_state=0).to_csv(tmp_path / "curves.csv", index=False)
    table = load_table(tmp_path / "curves.csv")
    assert table == table_from_frame(frame)
    assert sorted(table) == ["c0000", "c0001", "c0002", "c0003"]
    assert all(len(curves) == 2 and len(curves[0].metric) == 5 for curves in table.values())


def test_table_errors() -> None:
    frame = synthetic_frame(n_configs=2, epochs=4)
    with pytest.raises(ValueError, match="missing column"):
        table_from_frame(frame.drop(columns="seconds"))
    with pytest.raises(ValueError, match="epochs must run"):
        table_from_frame(frame[frame["epoch"] != 2])


def test_synthetic_curves_are_rank_consistent(table: dict) -> None:
    def order(epoch: int) -> list[str]:
        return sorted(table, key=lambda c: table[c][0].metric[epoch - 1])

    assert order(1) == order(9) == order(LONG)
    crossing = synthetic_table(n_configs=60, epochs=LONG, seed=0, crossing=1.0)
    assert sorted(crossing, key=lambda c: crossing[c][0].metric[0]) != sorted(
        crossing, key=lambda c: crossing[c][0].metric[-1]
    )


# ---- the simulator -------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 8])
def test_deterministic_for_a_seed(table: dict, workers: int) -> None:
    first = simulate(table, asha(), workers=workers, seed=5, long_budget=LONG)
    again = simulate(table, asha(), workers=workers, seed=5, long_budget=LONG)
    assert first == again
    other = simulate(table, asha(), workers=workers, seed=6, long_budget=LONG)
    assert [j for _, _, j in other.jobs] != [j for _, _, j in first.jobs]


@pytest.mark.parametrize("workers", [1, 8])
def test_asha_continues_from_checkpoints_and_every_promotion_is_justified(
    table: dict, workers: int
) -> None:
    method = asha()
    result = simulate(table, method, workers=workers, seed=0, long_budget=LONG)
    # a continuation costs only the epochs it adds: each trial costs its highest rung
    highest = {}
    for _, _, job in result.jobs:
        assert job.start in (0, *LADDER) and job.stop in LADDER
        highest[job.trial] = max(highest.get(job.trial, 0), job.stop)
    assert result.epochs == sum(highest.values())
    assert len(highest) <= 81 and sum(h == LONG for h in highest.values()) <= 3
    settings = method.settings
    for records, decision in method.decisions:
        if isinstance(decision, Continue):
            assert promotion_justified(records, decision.number, decision.from_rung, **settings)
    assert isinstance(method.decisions[-1][1], Finished)
    assert result.full and all(p.epochs <= result.epochs for p in result.full)
    if workers == 1:
        assert result.utilization == pytest.approx(1.0)
        assert result.first_idle is None


def test_no_worker_idles_while_configurations_may_start(table: dict) -> None:
    """Every Wait comes after the trial budget is spent or the long budget is full."""
    method = asha(max_trials=60)
    simulate(table, method, workers=8, seed=1, long_budget=LONG)
    for records, decision in method.decisions:
        if isinstance(decision, Wait):
            admitted = sum(r.sent_to == LONG for r in records)
            assert len(records) >= 60 or admitted >= 3
    assert sum(isinstance(d, StartNew) for _, d in method.decisions) <= 60


@pytest.mark.parametrize("seed", [0, 1])
def test_asha_keeps_eight_workers_busy(seed: int) -> None:
    """Utilization >= 0.9 at 8 workers once the budget is large next to one full run.

    Idle time comes only at the end, when no configuration may start any more and the last
    promotions run one after the other; its share is at most about one full run (27 epochs
    here) per worker's work, so the budget is sized at 729 configurations (3^6; the long
    budget admits 729 / 3^3 = 27) for about 200 epochs per worker.
    """
    table = synthetic_table(n_configs=800, epochs=LONG, seed=1)
    result = simulate(table, asha(max_trials=729, top_k=27), workers=8, seed=seed, long_budget=LONG)
    assert result.utilization >= 0.9


@pytest.mark.parametrize("workers", [1, 8])
def test_asha_reaches_the_target_in_fewer_epochs_than_random_search(
    table: dict, workers: int
) -> None:
    target = default_target(table, LONG, "maximize")
    for seed in range(3):
        ours = simulate(table, asha(), workers=workers, seed=seed, long_budget=LONG)
        theirs = simulate(
            table,
            RandomSearch(long_budget=LONG, n_trials=len(table)),
            workers=workers,
            seed=seed,
            long_budget=LONG,
        )
        hit, their_hit = ours.reached(target), theirs.reached(target)
        assert hit is not None and their_hit is not None
        assert hit.epochs < their_hit.epochs
        # at equal budget (what ASHA used), ASHA's best is at least random search's
        best, their_best = ours.best_within(ours.epochs), theirs.best_within(ours.epochs)
        assert their_best is None or best >= their_best


def test_random_search_and_pipeline_jobs(table: dict) -> None:
    random_run = simulate(
        table, RandomSearch(long_budget=LONG, n_trials=10), workers=3, seed=0, long_budget=LONG
    )
    assert [(j.start, j.stop) for _, _, j in random_run.jobs] == [(0, LONG)] * 10
    assert random_run.epochs == 10 * LONG and len(random_run.full) == 10
    assert random_run.best_curve() == sorted(random_run.best_curve())

    settings = {
        "screen_trials": 20, "screen_epochs": 5, "top_k": 3, "long_budget": LONG,
        "direction": "maximize",
    }  # fmt: skip
    pipeline = Pipeline(**settings)
    run = simulate(table, pipeline, workers=4, seed=0, long_budget=LONG)
    screen = [(t, j) for t, _, j in run.jobs if j.stop == 5]
    promote = [(t, j) for t, _, j in run.jobs if j.stop == LONG]
    assert len(screen) == 20 and len(promote) == 3
    # the barrier: no promotion before every screen trial ended; promotions start from scratch
    assert min(t for t, _ in promote) >= max(t for t, _ in screen)
    assert all(j.start == 0 for _, j in promote)
    best_screen = sorted(pipeline.completed, key=lambda n: -pipeline.completed[n])[:3]
    assert [j.config for _, j in promote] == [screen[n][1].config for n in best_screen]
    assert len(pipeline.completed) < 20  # the median rule pruned some screen trials
    unpruned = Pipeline(**settings, prune=False)
    full = simulate(table, unpruned, workers=4, seed=0, long_budget=LONG)
    assert full.epochs == 20 * 5 + 3 * LONG > run.epochs
    assert run.utilization < 1.0 and run.first_idle is not None  # the barrier idles workers


@pytest.mark.skipif(
    importlib.util.find_spec("syne_tune") is None, reason="syne-tune is not installed"
)
def test_syne_tunes_stopping_asha_stops_trials_below_the_rung_cut(table: dict) -> None:
    """The outside reference: Syne Tune's rung rule stops a trial at rung r unless it is in
    the top 1/eta of the results recorded at r so far; on rank-consistent curves it keeps the
    best configurations going to the full budget, and a seed repeats exactly."""
    from benchmarks.simulate import SyneTuneAsha

    def run():
        method = SyneTuneAsha(first=1, eta=3, long_budget=LONG, max_trials=60, direction="maximize")
        return simulate(table, method, workers=4, seed=0, long_budget=LONG)

    first, again = run(), run()
    assert [(j.trial, j.config) for _, _, j in first.jobs] == [
        (j.trial, j.config) for _, _, j in again.jobs
    ]
    assert len(first.jobs) == 60 and all((j.start, j.stop) == (0, LONG) for _, _, j in first.jobs)
    assert 0 < len(first.full) < 60  # some stopped early, some reached the full budget
    assert first.epochs < 60 * LONG / 3
    everyone = simulate(
        table, RandomSearch(long_budget=LONG, n_trials=60), workers=4, seed=0, long_budget=LONG
    )
    best = max(p.value for p in everyone.full)
    assert max(p.value for p in first.full) == best  # rank-consistent: the best is never stopped


class _Stuck:
    name = "stuck"

    def start(self, configs: Sequence[str]) -> None:
        pass

    def ask(self) -> Job | Wait | Finished:
        return Wait()

    def tell(self, job: Job, epoch: int, value: float) -> bool:
        return True

    def done(self, job: Job, epoch: int) -> None:
        pass


def test_a_method_that_waits_on_nothing_is_an_error(table: dict) -> None:
    with pytest.raises(RuntimeError, match="waits"):
        simulate(table, _Stuck(), workers=2, seed=0, long_budget=LONG)
    with pytest.raises(ValueError, match="fewer than"):
        simulate(table, asha(), workers=2, seed=0, long_budget=LONG + 1)
    with pytest.raises(ValueError, match="only 120 configurations"):
        simulate(table, asha(max_trials=500, top_k=500), workers=2, seed=0, long_budget=LONG)


def test_a_diverged_leg_is_recorded_as_the_service_records_it() -> None:
    """Failed, with NaN (the worst) at the rung it was training to: it counts among that
    rung's results, as in ``search.stages.scheduler_records``, and is never continued."""
    method = asha()
    method.start(["a", "b"])
    job = method.ask()
    assert isinstance(job, Job) and job.stop == LADDER[0]
    assert method.tell(job, 1, float("nan")) is False  # the job ends in the epoch it diverged
    (record,) = method.records()
    assert record.failed and not record.running and list(record.results) == [LADDER[0]]
    assert record.results[LADDER[0]] != record.results[LADDER[0]]  # NaN


def test_the_service_tpe_in_the_replay_reads_a_diverged_first_leg_as_the_worst() -> None:
    """AshaTpe tells TPE a diverged first leg as the service does (failed, with the trainer's
    reason), through the same FirstLegSampler, which shows it to TPE as the worst value."""
    import optuna

    from benchmarks.simulate import AshaTpe, ParamSpace, TabulatedTpe
    from search.naming import diverged
    from search.sampling import FirstLegSampler, _FirstLegView

    space = ParamSpace.unit_interval()
    tpe = TabulatedTpe(space, {"a": {"x": 0.2}, "b": {"x": 0.8}}, {"a": 1, "b": 1}, seed=0)
    method = AshaTpe(tpe=tpe, rungs=LADDER, eta=3, top_k=1, max_trials=4, direction="maximize")
    method.start(["a", "b"])
    job = method.ask()
    method.tell(job, 1, float("nan"))
    (failed,) = method.study.get_trials()
    assert failed.state == optuna.trial.TrialState.FAIL and diverged(failed.user_attrs)
    assert isinstance(method.study.sampler, FirstLegSampler)  # what it shows TPE:
    shown = _FirstLegView(method.study).get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert [t.value for t in shown] == [float("-inf")]


def test_the_printed_medians_count_a_seed_that_missed_the_target_as_infinite(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The default synthetic table, where the pipeline misses the target in one seed of three:
    its median epochs to target is the worse of its two hits (the miss is the worst of all),
    not the middle of the hits alone, which would rank it above a method that always hits."""
    import math
    import statistics
    import sys

    monkeypatch.setattr(sys, "argv", ["simulate", "workers=1"])
    simulate_module.main()
    printed = capsys.readouterr().out
    row = next(line for line in printed.splitlines() if line.strip("| ").startswith("pipeline"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    curves = synthetic_table(n_configs=300, epochs=100, seed=0)
    target = default_target(curves, 100, "maximize")
    hits = []
    for seed in (0, 1, 2):
        method = Pipeline(
            screen_trials=30, screen_epochs=10, top_k=3, long_budget=100, direction="maximize"
        )
        hit = simulate(curves, method, workers=1, seed=seed, long_budget=100).reached(target)
        hits.append(hit.epochs if hit else math.inf)
    assert cells[1] == f"{sum(not math.isinf(h) for h in hits)}/3" == "2/3"
    assert (
        cells[2]
        == f"{statistics.median(hits):,.0f}"
        == f"{max(h for h in hits if h < math.inf):,.0f}"
    )
