"""Under the rung scheduler, the sampler learns from one result per configuration.

A configuration's legs are separate trials of the screen study: its first leg (value at the
first rung) and each continuation that stays within the screen (``rung_from`` set, the same
parameters, the value at a later rung). A sampler that saw them all would count a continued
configuration several times, at budgets whose values do not compare (the same parameters score
higher after more epochs), and drift towards what was already promoted. :class:`FirstLegSampler`
gives the wrapped sampler a view of the study without the continuations, so TPE models the
first-rung value, the one every configuration has. On the tabulated MNIST benchmark
(``docs/performance.md``) the service reached the target in 16 of 20 repetitions with one worker
this way (TPE's default start-up), 10 of 20 when TPE saw every leg.

The first-rung value ranks configurations only loosely (rank correlation 0.58 with the 30-epoch
value on that benchmark), and nothing checks TPE's favourites at a higher budget before the ladder
has sent a configuration to the top: that takes ``eta^(rungs - 1)`` first-rung results. So under
rungs TPE samples that many configurations at random before its model takes over
(:func:`startup_trials`), unless the study sets ``search.sampler.n_startup_trials``; on the same
benchmark the service then reached the target in 20 of 20 repetitions (16 with TPE's default 10).

Example::

    >>> import optuna
    >>> sampler = FirstLegSampler(optuna.samplers.TPESampler(seed=0))
    >>> study = optuna.create_study(sampler=sampler, direction="maximize")
    >>> study.enqueue_trial({"x": 0.9}, user_attrs={"rung_from": 1})  # a continuation
    >>> _ = study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    >>> len(first_legs(study.get_trials()))
    2
"""

from __future__ import annotations

import copy
import math
from collections.abc import Container, Sequence
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from search.naming import diverged, is_continuation, trained_nothing

# TPE's own default number of random configurations before its model takes over.
TPE_STARTUP_TRIALS = 10


def startup_trials(configured: int | None, rungs: Sequence[int] | None, eta: int) -> int:
    """Random configurations before TPE models: ``configured`` when the study sets it, else
    TPE's default (10), raised under rungs to the ``eta^(len(rungs) - 1)`` first-rung results
    the scheduler needs before its first full-budget decision. When that is as many as the
    study's configurations (``stages.screen.trials``), every one is drawn at random: ASHA as Li
    et al. ran it; set ``search.sampler.n_startup_trials`` to let TPE model sooner.

    >>> startup_trials(None, [1, 3, 10, 30], 3), startup_trials(None, [1, 3, 9], 3)
    (27, 10)
    >>> startup_trials(6, [1, 3, 10, 30], 3), startup_trials(None, None, 3)
    (6, 10)
    """
    if configured is not None:
        return int(configured)
    if not rungs:
        return TPE_STARTUP_TRIALS
    return max(TPE_STARTUP_TRIALS, eta ** (len(rungs) - 1))


def make_tpe(seed: int, n_startup_trials: int, conditional: bool) -> optuna.samplers.TPESampler:
    """TPE as the project sets it up: multivariate, and for a conditional space (``when:``)
    grouped, so each branch is modelled on its own."""
    return optuna.samplers.TPESampler(
        seed=seed, n_startup_trials=n_startup_trials, multivariate=True, group=conditional
    )


def first_legs(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """The trials that sampled their configuration and trained it (new configurations and
    their retries). Skipped ones are left out: TPE would count them toward its random start-up
    and take a duplicate of a good configuration, pruned without a value, for a bad one."""
    return [
        t for t in trials if not is_continuation(t.user_attrs) and not trained_nothing(t.user_attrs)
    ]


def as_worst(trial: FrozenTrial, direction: StudyDirection) -> FrozenTrial:
    """A copy of failed ``trial`` that reads as COMPLETE with a value worse than any other
    (-inf when maximizing, +inf when minimizing): how a diverged configuration is shown to the
    sampler, so its region counts as bad and towards the random start-up."""
    worst = copy.copy(trial)  # the storage's cached trial stays as it is
    worst.state = TrialState.COMPLETE
    worst.value = -math.inf if direction == StudyDirection.MAXIMIZE else math.inf
    return worst


class _FirstLegView:
    """The study as the wrapped sampler sees it: every attribute is the study's, but the trial
    lists leave out continuations, and a first leg that diverged reads as the worst result
    (Optuna's samplers skip failed trials, so TPE would go on proposing its region)."""

    def __init__(self, study: optuna.Study) -> None:
        self._study = study

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)

    def _get_trials(
        self,
        deepcopy: bool = True,
        states: Container[TrialState] | None = None,
        use_cache: bool = False,
    ) -> list[FrozenTrial]:
        # What Optuna's samplers call; answered with the public API (``use_cache`` only spares
        # re-reading finished trials). If a new Optuna stopped calling it, the view would pass
        # continuations through: tests/test_sampling.py checks that they do not steer TPE.
        return self.get_trials(deepcopy=deepcopy, states=states)

    def get_trials(
        self, deepcopy: bool = True, states: Container[TrialState] | None = None
    ) -> list[FrozenTrial]:
        asked = None if states is None else (*states, TrialState.FAIL)
        legs = []
        for leg in first_legs(self._study.get_trials(deepcopy=deepcopy, states=asked)):
            if leg.state == TrialState.FAIL and diverged(leg.user_attrs):
                leg = as_worst(leg, self._study.direction)
            if states is None or leg.state in states:
                legs.append(leg)
        return legs

    @property
    def trials(self) -> list[FrozenTrial]:
        return self.get_trials()


class FirstLegSampler(optuna.samplers.BaseSampler):
    """``base`` (TPE, ...) fitted on first legs only; trial hooks see the real study."""

    def __init__(self, base: optuna.samplers.BaseSampler) -> None:
        self.base = base

    def infer_relative_search_space(
        self, study: optuna.Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        view: Any = _FirstLegView(study)  # duck-typed: a Study for what samplers read
        return self.base.infer_relative_search_space(view, trial)

    def sample_relative(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        search_space: dict[str, BaseDistribution],
    ) -> dict[str, Any]:
        view: Any = _FirstLegView(study)
        return self.base.sample_relative(view, trial, search_space)

    def sample_independent(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        view: Any = _FirstLegView(study)
        return self.base.sample_independent(view, trial, param_name, param_distribution)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.base.before_trial(study, trial)

    def after_trial(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        state: TrialState,
        values: Sequence[float] | None,
    ) -> None:
        self.base.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.base.reseed_rng()
