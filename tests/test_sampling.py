"""The sampler of a rung-scheduled study learns from first legs only (real SQLite studies)."""

from __future__ import annotations

import doctest
import math
import statistics
from pathlib import Path

import optuna
import pytest
from optuna.distributions import FloatDistribution

import search.sampling as sampling
from search.config import ConfigError, load_config
from search.sampling import FirstLegSampler
from search.stages import make_sampler

X = FloatDistribution(0.0, 1.0)


def first_rung_value(x: float) -> float:
    return -((x - 0.2) ** 2)  # best first-rung results near x = 0.2


def suggestions(sampler: optuna.samplers.BaseSampler, path: Path) -> list[float]:
    """Ten first legs spread over [0, 1], fifteen continuations of x = 0.9 with a later rung's
    (higher) value, then twenty new configurations: where does the sampler put them?"""
    study = optuna.create_study(storage=f"sqlite:///{path}", sampler=sampler, direction="maximize")
    for i in range(10):
        x = i / 9
        study.add_trial(
            optuna.trial.create_trial(
                params={"x": x}, distributions={"x": X}, value=first_rung_value(x)
            )
        )
    for _ in range(15):
        study.add_trial(
            optuna.trial.create_trial(
                params={"x": 0.9}, distributions={"x": X}, value=1.0, user_attrs={"rung_from": 1}
            )
        )
    out = []
    for _ in range(20):
        trial = study.ask()
        x = trial.suggest_float("x", 0.0, 1.0)
        study.tell(trial, first_rung_value(x))
        out.append(x)
    return out


def tpe() -> optuna.samplers.TPESampler:
    return optuna.samplers.TPESampler(seed=0, n_startup_trials=5, multivariate=True)


def test_continuations_do_not_steer_the_sampler(tmp_path: Path) -> None:
    ours = suggestions(FirstLegSampler(tpe()), tmp_path / "first-legs.db")
    plain = suggestions(tpe(), tmp_path / "all-legs.db")
    assert statistics.median(ours) < 0.45  # where the first-rung results are good
    assert statistics.median(plain) > 0.7  # what seeing every leg does: the continued config


def test_continuations_do_not_steer_univariate_tpe_either(tmp_path: Path) -> None:
    """Univariate TPE (and parameters outside the relative space) sample through
    ``sample_independent``: it too sees first legs only."""
    univariate = optuna.samplers.TPESampler(seed=0, n_startup_trials=5, multivariate=False)
    ours = suggestions(FirstLegSampler(univariate), tmp_path / "first-legs.db")
    assert statistics.median(ours) < 0.45


def test_a_conditional_space_gets_grouped_multivariate_tpe() -> None:
    """The report's spaces are conditional (``when:``): TPE must model them jointly, by group."""
    tpe = make_sampler(load_config("mnist_contrastive")).base
    assert tpe._multivariate and tpe._group  # Optuna's own flags: no public accessor
    assert not sampling.make_tpe(0, 10, conditional=False)._group


def test_the_view_hides_continuations_and_skipped_configurations(tmp_path: Path) -> None:
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'v.db'}")
    study.add_trial(optuna.trial.create_trial(params={"x": 0.1}, distributions={"x": X}, value=1))
    study.add_trial(
        optuna.trial.create_trial(
            params={"x": 0.1}, distributions={"x": X}, value=2, user_attrs={"rung_from": 1}
        )
    )
    for skipped in ({"duplicate_of": 0}, {"prune_reason": "nothing queued: another worker..."}):
        study.add_trial(
            optuna.trial.create_trial(
                params={"x": 0.1},
                distributions={"x": X},
                state=optuna.trial.TrialState.PRUNED,
                user_attrs=skipped,
            )
        )
    view = sampling._FirstLegView(study)
    assert [t.value for t in view.get_trials()] == [1]  # neither continuations nor skipped
    assert [t.value for t in view._get_trials(deepcopy=False, use_cache=True)] == [1]
    assert [t.value for t in view.trials] == [1]
    assert view.study_name == study.study_name and len(study.trials) == 4


def diverging_suggestions(sampler: optuna.samplers.BaseSampler, path: Path) -> list[float]:
    """Sixty configurations of a learning rate, log-scaled over [1e-4, 10]: training diverges
    above 1 (failed, with the trainer's reason) and is best just below it. The last fifty lrs
    proposed, after the random start-up."""
    study = optuna.create_study(storage=f"sqlite:///{path}", sampler=sampler, direction="maximize")
    proposed = []
    for _ in range(60):
        trial = study.ask()
        lr = trial.suggest_float("lr", 1e-4, 10.0, log=True)
        proposed.append(lr)
        if lr > 1.0:
            trial.set_user_attr("fail_reason", "NonFiniteLossError: loss is nan at epoch 1")
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        else:
            study.tell(trial, -abs(math.log10(lr)))
    return proposed[10:]


def test_a_diverged_configuration_steers_the_sampler_away_from_its_region(tmp_path: Path) -> None:
    """Optuna's samplers skip failed trials, so a TPE that saw a diverged run as a failure
    would go on proposing its region; seen as the worst result, that region counts as bad."""
    tpe = lambda: sampling.make_tpe(0, 10, conditional=False)  # noqa: E731
    ours = diverging_suggestions(FirstLegSampler(tpe()), tmp_path / "worst.db")
    plain = diverging_suggestions(tpe(), tmp_path / "skipped.db")
    assert sum(lr > 1.0 for lr in plain) >= 40  # all but a few diverge: the best lies next door
    assert sum(lr > 1.0 for lr in ours) <= 25


def test_the_view_shows_a_diverged_first_leg_as_the_worst_result(tmp_path: Path) -> None:
    """Diverged: COMPLETE at -inf (maximizing) or +inf in the sampler's view, and still FAIL
    in storage; a leg that failed for another reason (interrupted) stays a failure."""
    failed = optuna.trial.TrialState.FAIL
    for direction, worst in (("maximize", -math.inf), ("minimize", math.inf)):
        study = optuna.create_study(
            storage=f"sqlite:///{tmp_path / f'{direction}.db'}", direction=direction
        )
        reasons = ("NonFiniteLossError: loss is nan at epoch 3", "KeyboardInterrupt: stopped")
        for reason in reasons:
            study.add_trial(
                optuna.trial.create_trial(
                    params={"x": 0.1},
                    distributions={"x": X},
                    state=failed,
                    user_attrs={"fail_reason": reason},
                )
            )
        view = sampling._FirstLegView(study)
        complete = view.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
        assert [(t.number, t.value) for t in complete] == [(0, worst)]  # not the interrupted one
        assert [t.state for t in view.get_trials()] == [optuna.trial.TrialState.COMPLETE, failed]
        assert not view.get_trials(states=(failed,))[0].user_attrs["fail_reason"].startswith("Non")
        assert [t.state for t in study.get_trials(deepcopy=False)] == [failed, failed]


@pytest.mark.parametrize(
    ("overrides", "kind"),
    [
        ([], FirstLegSampler),  # the quickstart runs on rungs
        (["search.pruner.name=hyperband"], optuna.samplers.TPESampler),
        (["search.sampler.name=random"], optuna.samplers.RandomSampler),
    ],
)
def test_make_sampler_wraps_tpe_under_rungs(overrides: list[str], kind: type) -> None:
    sampler = make_sampler(load_config("quickstart", overrides))
    assert type(sampler) is kind
    if kind is FirstLegSampler:
        assert isinstance(sampler.base, optuna.samplers.TPESampler)


def test_examples_in_the_docstring_hold() -> None:
    failures, tried = doctest.testmod(sampling)
    assert tried >= 3 and failures == 0


@pytest.mark.parametrize(
    ("study", "overrides", "expected"),
    [
        ("quickstart", [], 6),  # the study file sets it
        ("mnist_guided", [], 10),  # rungs 1, 3, 10: TPE's default covers the 9 first legs
        # rungs 1, 3, 10, 30: 27 first-rung results before the first full-budget decision
        ("mnist_guided", ["stages.promote.epochs=30", "train.epochs=30"], 27),
        (
            "mnist_guided",
            ["stages.promote.epochs=30", "train.epochs=30", "search.pruner.name=hyperband"],
            10,
        ),
        (
            "mnist_guided",
            ["stages.promote.epochs=30", "train.epochs=30", "search.sampler.n_startup_trials=5"],
            5,
        ),
    ],
)
def test_tpe_starts_at_random_for_as_many_configurations_as_the_ladder_needs(
    study: str, overrides: list[str], expected: int
) -> None:
    sampler = make_sampler(load_config(study, overrides))
    tpe = sampler.base if isinstance(sampler, FirstLegSampler) else sampler
    assert tpe._n_startup_trials == expected


def test_a_negative_start_up_count_is_refused_and_none_is_the_default() -> None:
    assert load_config("mnist_guided").search.sampler.n_startup_trials is None
    with pytest.raises(ConfigError, match=r"search.sampler.n_startup_trials: must be an integer"):
        load_config("mnist_guided", ["search.sampler.n_startup_trials=-1"])
