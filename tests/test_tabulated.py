"""The tabulated benchmark: the stored table of real curves and the replay on it (no training)."""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest

from benchmarks import replay as replay_module
from benchmarks.replay import (
    DEFAULT_TABLE,
    Setup,
    final_line,
    load_params,
    replay,
)
from benchmarks.simulate import (
    Asha,
    AshaTpe,
    Job,
    Nearest,
    OptunaHyperband,
    ParamSpace,
    RandomSearch,
    arm,
    config_of,
    default_target,
    load_table,
    simulate,
    synthetic_params,
    synthetic_table,
    table_from_frame,
)
from benchmarks.tabulate import configs_path, draw_configs, read_done, table_study
from search.scheduler import rungs

REPO = Path(__file__).resolve().parent.parent
TABLE = REPO / DEFAULT_TABLE
LONG = 27
FINAL = re.compile(
    r"^ratio to random ([<>]?\d+\.\d{3}|-), to optuna-hyperband ([<>]?\d+\.\d{3}|-), "
    r"utilization@8 (\d\.\d{3}|-), utilization@64 (\d\.\d{3}|-)$"
)


@pytest.fixture(scope="module")
def synthetic() -> Setup:
    """Crossing, noisy curves with two seeds per configuration and a one-parameter space."""
    table = synthetic_table(n_configs=60, epochs=LONG, seeds=2, noise=0.01, crossing=0.5)
    return Setup(
        table=table,
        params=synthetic_params(table, LONG),
        space=ParamSpace.unit_interval(),
        long_budget=LONG,
        per_worker=9,
        n_startup_trials=5,
    )


def optuna_method(setup: Setup, n_trials: int, seed: int = 0) -> OptunaHyperband:
    return OptunaHyperband(
        space=setup.space,
        params=setup.params,
        seeds={c: len(v) for c, v in setup.table.items()},
        n_trials=n_trials,
        first=1,
        long_budget=LONG,
        eta=3,
        direction="maximize",
        seed=seed,
        n_startup_trials=5,
    )


# ---- the stored table ------------------------------------------------------------------------


TABLES = sorted((REPO / "benchmarks" / "tables").glob("*-curves.csv"))


def test_the_default_table_is_stored() -> None:
    assert TABLE in TABLES


@pytest.mark.parametrize("path", TABLES, ids=lambda p: p.stem)
def test_stored_table_is_what_the_benchmark_needs(path: Path) -> None:
    """>= 100 configurations to 30 epochs (10x the first rung), >= 20 with a second seed,
    seconds per epoch, the command that made it, the study and overrides it was drawn from, and
    the parameters of every configuration, all of them in that study's space."""
    from search.config import load_config

    header = path.read_text().splitlines()[0]
    assert header.startswith("# made by: python -m benchmarks.tabulate")
    study, overrides = table_study(path)
    space = load_config(study, overrides).search.space
    table = load_table(path)
    assert len(table) >= 100
    assert sum(len(curves) >= 2 for curves in table.values()) >= 20
    epochs = {len(c.metric) for curves in table.values() for c in curves}
    assert epochs == {30}
    for curves in table.values():
        for curve in curves:
            finite = [m for m in curve.metric if not math.isnan(m)]
            assert all(0.0 <= m <= 1.0 for m in finite)  # accuracies
            assert all(s >= 0 for s in curve.seconds) and curve.seconds[0] > 0
    params = load_params(configs_path(path), table)
    assert set(params) == set(table)
    for values in params.values():
        assert set(values) <= set(space)
        if "channels" in values:  # the table's reduced widths, as its overrides say
            assert values["channels"] in list(space.channels.choices)
    assert read_done(path) == {
        (c, k) for c, curves in table.items() for k in range(len(curves))
    }  # every curve is complete: a rerun of the command trains nothing


def test_table_study_reads_the_header_tabulate_writes(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text(
        "# made by: python -m benchmarks.tabulate study=x\n"
        "# study mnist_guided, metric val_accuracy, overrides: train.epochs=30 "
        "'search.space.channels.choices=[8,16]'\nconfig_id,seed,epoch,metric,seconds\n"
    )
    assert table_study(path) == (
        "mnist_guided",
        ["train.epochs=30", "search.space.channels.choices=[8,16]"],
    )
    path.write_text("config_id,seed,epoch,metric,seconds\n")
    with pytest.raises(ValueError, match="not made by tabulate"):
        table_study(path)


def test_configurations_are_drawn_from_the_study_space_reproducibly() -> None:
    from search.config import load_config

    cfg = load_config("quickstart")
    first, again = draw_configs(cfg, 5, 0), draw_configs(cfg, 5, 0)
    assert first == again != draw_configs(cfg, 5, 1)
    for params in first:
        assert params["channels"] in (8, 16)
        assert f"{params['optimizer']}_lr" in params  # the active branch only
        assert not {f"{o}_lr" for o in ("adam", "sgd", "lars")} - {
            f"{params['optimizer']}_lr"
        } & set(params)


# ---- pieces of the replay ----------------------------------------------------------------------


def test_nearest_maps_to_the_closest_tabulated_configuration() -> None:
    space = ParamSpace(
        suggest=lambda trial: {},
        distributions={
            "optimizer": optuna.distributions.CategoricalDistribution(["adam", "sgd"]),
            "channels": optuna.distributions.CategoricalDistribution([8, 16]),
            "adam_lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True),
            "sgd_lr": optuna.distributions.FloatDistribution(1e-3, 1.0, log=True),
        },
        conditional=True,
    )
    params = {
        "a": {"optimizer": "adam", "channels": 8.0, "adam_lr": 1e-3},  # 8.0: as read from a CSV
        "b": {"optimizer": "adam", "channels": 16, "adam_lr": 1e-3},
        "c": {"optimizer": "sgd", "channels": 8, "sgd_lr": 0.1},
    }
    nearest = Nearest(params, space)
    assert nearest({"optimizer": "adam", "channels": 8, "adam_lr": 2e-3}) == "a"
    assert nearest({"optimizer": "adam", "channels": 16, "adam_lr": 9e-3}) == "b"
    assert nearest({"optimizer": "sgd", "channels": 16, "sgd_lr": 0.5}) == "c"


def test_draws_with_replacement_use_every_seed(synthetic: Setup) -> None:
    method = RandomSearch(long_budget=LONG, n_trials=200)
    result = simulate(synthetic.table, method, workers=4, seed=0, long_budget=LONG, draws=200)
    keys = [job.config for _, _, job in result.jobs]
    assert len(keys) == 200 and len(set(keys)) < 200  # with replacement
    assert {k.rsplit("@", 1)[1] for k in keys} == {"0", "1"}
    assert {config_of(k) for k in keys} <= set(synthetic.table)
    assert config_of(arm("c0001", 1)) == "c0001" == config_of("c0001")


def diverging_table() -> dict:
    """Configuration d0 diverges in epoch 3 (NaN from there, as tabulate writes it)."""
    frame = pd.concat(
        [
            pd.DataFrame(
                {
                    "config_id": c,
                    "seed": 0,
                    "epoch": range(1, 10),
                    "metric": [0.1 * i + (0.5 if c == "d1" else 0) for i in range(1, 10)],
                    "seconds": 1.0,
                }
            )
            for c in ("d0", "d1", "d2")
        ]
    )
    frame.loc[(frame.config_id == "d0") & (frame.epoch >= 3), "metric"] = np.nan
    return table_from_frame(frame)


def test_a_diverged_run_ends_its_job_and_ranks_last() -> None:
    table = diverging_table()
    # the diverged run counts as the worst of three: p90 lies 80% of the way from 0.9 to 1.4
    assert default_target(table, 9, "maximize") == pytest.approx(1.3)
    assert default_target(table, 9, "maximize", quantile=0.0) == -math.inf
    run = simulate(table, RandomSearch(long_budget=9, n_trials=3), workers=1, seed=0, long_budget=9)
    assert run.epochs == 9 + 9 + 3  # d0 stops in the epoch that diverged
    assert {p.config for p in run.full} == {"d1", "d2"}
    asha = Asha(rungs=[1, 3, 9], eta=3, top_k=1, max_trials=3, direction="maximize")
    simulate(table, asha, workers=1, seed=0, long_budget=9)
    failed = [r for r in asha.trials.values() if r.failed]
    assert all(asha.configs[r.number] == "d0" for r in failed)


# ---- plain Optuna ---------------------------------------------------------------------------


def test_optuna_hyperband_prunes_and_keeps_several_trials_open(synthetic: Setup) -> None:
    method = optuna_method(synthetic, n_trials=60)
    seen_open = []
    tell = method.tell

    def spying_tell(job: Job, epoch: int, value: float) -> bool:
        seen_open.append(len(method.open))
        return tell(job, epoch, value)

    method.tell = spying_tell  # type: ignore[method-assign]
    result = simulate(synthetic.table, method, workers=8, seed=0, long_budget=LONG, draws=60)
    states = [t.state for t in method.study.trials]
    pruned = states.count(optuna.trial.TrialState.PRUNED)
    assert len(states) == 60 and pruned == method.pruned > 0
    assert states.count(optuna.trial.TrialState.COMPLETE) == len(result.full)
    aimed = [j for _, _, j in result.jobs if j.stop == LONG]
    assert len(aimed) == 60  # every trial aims at the full budget ...
    assert result.epochs < 60 * LONG  # ... and pruning stopped some: no continuation
    assert all(j.start == 0 for _, _, j in result.jobs)
    assert max(seen_open) == 8  # one open trial per busy worker
    assert 0.0 < result.utilization <= 1.0
    # pruned trials hold the epochs they trained as intermediate values
    for trial in method.study.trials:
        if trial.state == optuna.trial.TrialState.PRUNED:
            assert 1 <= max(trial.intermediate_values) < LONG


def test_optuna_replay_is_deterministic_per_seed(synthetic: Setup) -> None:
    runs = [
        simulate(
            synthetic.table,
            optuna_method(synthetic, 30, s),
            workers=4,
            seed=s,
            long_budget=LONG,
            draws=30,
        )
        for s in (3, 3, 4)
    ]
    assert runs[0].jobs == runs[1].jobs != runs[2].jobs


def test_the_services_asha_fits_its_sampler_on_first_legs(synthetic: Setup) -> None:
    """asha draws new configurations from TPE, which learns what the service's sampler learns:
    each configuration's result at the first rung, once (continuations are hidden from it)."""
    configs = synthetic.budget(4)[0]

    def run() -> AshaTpe:
        method = synthetic.method("asha", 4, seed=0)
        assert isinstance(method, AshaTpe)
        simulate(synthetic.table, method, workers=4, seed=0, long_budget=LONG, draws=configs)
        return method

    method = run()
    told = method.study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert any(len(r.results) > 1 for r in method.trials.values())  # some were continued
    first = sorted(r.results[1] for r in method.trials.values() if 1 in r.results)
    assert sorted(t.value for t in told) == pytest.approx(first)
    assert len(method.study.trials) == len(method.trials)  # one sampler trial per configuration
    for number, trial in zip(sorted(method.trials), method.study.trials, strict=True):
        nearest = Nearest(synthetic.params, synthetic.space)(trial.params)
        assert config_of(method.keys[number]) == nearest  # the configuration TPE asked for
    again = run()
    assert [t.params for t in again.study.trials] == [t.params for t in method.study.trials]
    assert again.keys == method.keys


# ---- the whole replay ------------------------------------------------------------------------


def test_replay_on_a_synthetic_table(synthetic: Setup) -> None:
    target = default_target(synthetic.table, LONG, "maximize")
    runs = replay(
        synthetic,
        methods=list(replay_module.METHODS),
        workers=[1, 8],
        reps=2,
        target=target,
    )
    assert set(runs) == {(m, w) for m in replay_module.METHODS for w in (1, 8)}
    for (name, workers), summaries in runs.items():
        configs, top_k = synthetic.budget(workers)
        assert [s.seed for s in summaries] == [0, 1]
        for s in summaries:
            assert 0.0 < s.utilization <= 1.0
            assert s.epochs > 0 and s.end_time > 0
            if name == "random":
                assert s.epochs == configs * LONG and s.full_runs == s.trials == configs
            if name in ("asha", "asha-random"):
                assert s.trials <= configs
            if name in ("asha", "asha-random", "pipeline"):
                assert s.full_runs <= top_k
        if workers == 1:
            assert all(s.utilization == pytest.approx(1.0) for s in summaries)
    assert synthetic.budget(8) == (72, 2)  # 9 per worker, 1/27 to the full budget
    assert dataclasses.replace(synthetic, admit=3).budget(8) == (72, 24)
    assert dataclasses.replace(synthetic, configs={8: 100}).budget(8) == (100, 3)
    line = final_line(runs, 8)
    assert FINAL.match(line), line
    assert line.endswith("utilization@64 -")


def test_diagnostics_measure_rank_consistency_and_seed_noise() -> None:
    from benchmarks.replay import diagnostics

    steady = synthetic_table(n_configs=40, epochs=LONG, seeds=2)  # rank-consistent, no noise
    found = diagnostics(steady, rungs(1, LONG, 3), LONG)
    assert set(found) == {"rung 1", "rung 3", "rung 9", "seeds"}
    assert all(v == pytest.approx(1.0) for v in found.values())
    noisy = synthetic_table(n_configs=40, epochs=LONG, seeds=2, noise=0.3, crossing=1.0)
    assert all(v < 0.9 for v in diagnostics(noisy, rungs(1, LONG, 3), LONG).values())


def test_diagnostics_rank_a_diverged_run_last_when_minimizing_too() -> None:
    """A loss table is the accuracy table mirrored (value -> -value): the same rank
    correlations, a diverged run (NaN) the worst in both directions, never the best."""
    from benchmarks.replay import diagnostics
    from benchmarks.simulate import Curve

    noisy = synthetic_table(n_configs=40, epochs=LONG, seeds=2, noise=0.3, crossing=1.0)
    first = next(iter(noisy))
    seed0 = noisy[first][0]  # diverges after rung 3: finite at rungs 1 and 3, NaN at 9 and 27
    noisy[first] = [
        Curve(seed0.metric[:4] + tuple([math.nan] * (LONG - 4)), seed0.seconds),
        *noisy[first][1:],
    ]
    mirrored = {
        key: [Curve(tuple(-v for v in c.metric), c.seconds) for c in curves]
        for key, curves in noisy.items()
    }
    ladder = rungs(1, LONG, 3)
    at_most = diagnostics(noisy, ladder, LONG, "maximize")
    at_least = diagnostics(mirrored, ladder, LONG, "minimize")
    assert at_least.keys() == at_most.keys() == {"rung 1", "rung 3", "rung 9", "seeds"}
    for key, value in at_most.items():
        assert math.isfinite(value)  # the seed pair with a NaN is left out of "seeds"
        assert at_least[key] == pytest.approx(value)


def test_final_line_counts_a_miss_as_infinite() -> None:
    from benchmarks.replay import Summary

    def summary(name: str, hit: float) -> Summary:
        return Summary(name, 8, 0, 100, 10.0, 0.5, hit, hit)

    runs = {
        ("asha", 8): [summary("asha", 30.0)],
        ("random", 8): [summary("random", math.inf)],
        ("optuna-hyperband", 8): [summary("optuna-hyperband", 60.0)],
    }
    # Random search missed within the 100 epochs it spent: asha's 30 is at most 30 / 100 of what
    # it would have needed, a bound, not the 0.000 that dividing by infinity gives.
    assert final_line(runs, 8) == (
        "ratio to random <0.300, to optuna-hyperband 0.500, utilization@8 0.500, utilization@64 -"
    )
    runs[("asha", 8)] = [summary("asha", math.inf)]  # asha missed within its 100 epochs
    assert final_line(runs, 8) == (
        "ratio to random -, to optuna-hyperband >1.667, utilization@8 0.500, utilization@64 -"
    )


def test_simulate_mode_on_the_stored_table(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from benchmarks import search_efficiency

    figure = tmp_path / "best.png"
    argv = ["search_efficiency", "mode=simulate", "reps=2", "workers=1,8", "configs=1:4,8:16"]
    monkeypatch.setattr(sys, "argv", [*argv, "jobs=1", f"figure={figure}"])
    assert search_efficiency.main() == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert FINAL.match(out[-1]), out[-1]
    assert "### 8 worker(s): 16 configurations, 1 to the full budget" in out
    assert figure.stat().st_size > 1000
