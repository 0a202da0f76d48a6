"""Search methods on a table of learning curves, in simulated time (no training).

The model is Syne Tune's simulator backend on tabulated benchmarks: a table holds, for each
configuration and seed, the metric after every epoch and the seconds each epoch took. ``N``
simulated workers take work from a *method* through an event queue in simulated time, one event
per trained epoch; a job that continues a trial from a checkpoint costs only the epochs it adds.
Nothing reads the clock: a run is a function of the table, the method and the seed.

Methods (behind :class:`Method`: ``start``/``ask``/``tell``/``done``; more can be added):

asha-random
    :mod:`search.scheduler` itself: each free worker asks :func:`search.scheduler.decide` for
    work, with the records the method keeps as storage would; new configurations in the draw
    order (random).
asha
    the service's method (:class:`AshaTpe`): the same decisions, new configurations from the
    study's TPE sampler, fitted on each configuration's first-rung result.
random
    random search: each configuration trained from scratch to the long budget.
pipeline
    the previous screen -> promote pipeline: ``screen_trials`` configurations to
    ``screen_epochs`` (optionally pruned by a median rule: after an epoch, a trial worse than
    the median of the completed screen trials at that epoch stops, once ``n_startup``
    completed, like Optuna's ``MedianPruner``); a barrier (every screen trial finished); then the
    ``top_k`` completed ones retrained from scratch to the long budget (same configuration and
    seed, hence the same curve).
optuna-hyperband
    plain Optuna (:class:`OptunaHyperband`): one study, TPE and ``HyperbandPruner``, asked and
    told per epoch; a pruned trial stops for good, nothing is continued.

By default all methods draw new configurations in one seeded random order of the table's
configurations, and each configuration keeps one seed's curve (drawn with the same seed) for
the whole run; ``simulate(draws=n)`` draws with replacement instead, a seed per draw (needed
when a method wants more configurations than the table has, and by ``optuna-hyperband``).
A NaN in the table (a run that diverged) ends the job in that epoch, as a failed trial.
The tabulated benchmark on the project's own curves is ``benchmarks/replay.py``.

Reported per method: epochs (by all workers) and simulated seconds until the best long-budget
value reaches a target, the best long-budget value within a budget of epochs, worker utilization
(busy worker-seconds / (workers x seconds until the last job ends)) and the best-so-far curve
against epochs. The table file (CSV, columns ``config_id, seed, epoch, metric, seconds``,
epochs from 1) is loaded by :func:`load_table`; :func:`synthetic_frame` makes one for tests::

    python -m benchmarks.simulate                     # a synthetic table
    python -m benchmarks.simulate table=curves.csv long_budget=50 workers=1,4,16

Example::

    >>> table = synthetic_table(n_configs=60, epochs=27, seed=0)
    >>> asha = Asha(rungs=[1, 3, 9, 27], eta=3, top_k=3, max_trials=40, direction="maximize")
    >>> result = simulate(table, asha, workers=4, seed=0, long_budget=27)
    >>> result.epochs < 40 * 27 and 0 < result.utilization <= 1
    True
"""

from __future__ import annotations

import heapq
import math
import random
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd

from search.scheduler import (
    Continue,
    Decision,
    Direction,
    Finished,
    StartNew,
    TrialRecord,
    Wait,
    decide,
    ranking,
)
from search.scheduler import rungs as make_rungs

COLUMNS = ("config_id", "seed", "epoch", "metric", "seconds")


def arm(config: str, seed: int) -> str:
    """The key of one curve, ``config@seed`` (seed: its place in the table's seed order)."""
    return f"{config}@{seed}"


def config_of(key: str) -> str:
    """The configuration of a key made by :func:`arm` (a plain configuration id unchanged)."""
    return key.rsplit("@", 1)[0] if "@" in key else key


# ---- the table --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Curve:
    """One training run: ``metric[e - 1]`` after epoch ``e``; ``seconds[e - 1]`` it took."""

    metric: tuple[float, ...]
    seconds: tuple[float, ...]


Table = dict[str, list[Curve]]  # configuration id -> its curves, one per seed (seed order)


def table_from_frame(frame: pd.DataFrame) -> Table:
    """A :data:`Table` from rows ``config_id, seed, epoch, metric, seconds`` (epochs 1..E)."""
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"learning-curve table: missing column(s) {', '.join(missing)}")
    rows = frame.loc[:, list(COLUMNS)].copy()
    rows["config_id"] = rows["config_id"].astype(str)
    rows = rows.sort_values(["config_id", "seed", "epoch"], kind="stable")
    table: Table = {}
    for (config, seed), group in rows.groupby(["config_id", "seed"], sort=True):
        epochs = group["epoch"].to_numpy()
        if not np.array_equal(epochs, np.arange(1, len(epochs) + 1)):
            raise ValueError(f"config {config} seed {seed}: epochs must run 1, 2, ... once each")
        table.setdefault(str(config), []).append(
            Curve(
                tuple(float(v) for v in group["metric"]),
                tuple(float(s) for s in group["seconds"]),
            )
        )
    if not table:
        raise ValueError("learning-curve table: no rows")
    return table


def load_table(path: str | Path) -> Table:
    """The learning-curve table in CSV file ``path`` (see :func:`table_from_frame`); lines
    starting with ``#`` (the command that made it) are skipped."""
    return table_from_frame(pd.read_csv(path, comment="#"))


def synthetic_frame(
    n_configs: int = 200,
    epochs: int = 100,
    seeds: int = 1,
    seed: int = 0,
    noise: float = 0.0,
    crossing: float = 0.0,
) -> pd.DataFrame:
    """Made-up accuracy curves (to maximize) in the table's CSV layout.

    Configuration ``c`` approaches its own ceiling ``a_c`` as ``a_c * (1 - exp(-epoch / tau_c))``.
    With ``crossing=0`` every ``tau_c`` is the same, so the ranking of configurations is the same
    after every epoch (rank-consistent curves); ``crossing > 0`` spreads ``tau_c`` (log-normal,
    that standard deviation), so slow starters can overtake. ``noise`` adds Gaussian noise per
    epoch and seed. Each configuration has its own seconds per epoch (0.5-1.5 s, +-5 % jitter).
    """
    rng = np.random.default_rng(seed)
    ceiling = rng.uniform(0.5, 0.95, n_configs)
    tau = max(1.0, epochs / 10) * np.exp(crossing * rng.standard_normal(n_configs))
    cost = rng.uniform(0.5, 1.5, n_configs)
    epoch = np.arange(1, epochs + 1)
    parts = []
    for c in range(n_configs):
        for s in range(seeds):
            metric = ceiling[c] * (1 - np.exp(-epoch / tau[c]))
            metric = metric + noise * rng.standard_normal(epochs)
            seconds = cost[c] * rng.uniform(0.95, 1.05, epochs)
            parts.append(
                pd.DataFrame(
                    {
                        "config_id": f"c{c:04d}",
                        "seed": s,
                        "epoch": epoch,
                        "metric": metric,
                        "seconds": seconds,
                    }
                )
            )
    return pd.concat(parts, ignore_index=True)


def synthetic_table(*args: int | float, **kwargs: int | float) -> Table:
    """:func:`synthetic_frame` (same arguments and defaults) as a :data:`Table`."""
    return table_from_frame(synthetic_frame(*args, **kwargs))


def synthetic_params(table: Table, long_budget: int, seed: int = 0) -> dict[str, dict[str, float]]:
    """A one-parameter space for a synthetic table: ``x`` in [0, 1] is a configuration's rank by
    its mean long-budget value (1 = best) plus uniform noise of +-0.1, so a sampler can learn
    where the good configurations are (pair with :meth:`ParamSpace.unit_interval`)."""
    rng = np.random.default_rng(seed)
    mean = {c: float(np.mean([cv.metric[long_budget - 1] for cv in table[c]])) for c in table}
    ranked = sorted(table, key=lambda c: (mean[c], c))
    scale = max(len(ranked) - 1, 1)
    return {
        c: {"x": float(np.clip(i / scale + rng.uniform(-0.1, 0.1), 0.0, 1.0))}
        for i, c in enumerate(ranked)
    }


def default_target(
    table: Table, long_budget: int, direction: Direction, quantile: float = 0.9
) -> float:
    """As good as the best 1 in 10 configurations trained in full: the 90th percentile of the
    table's long-budget values (all seeds pooled; the 10th when minimizing). A run that
    diverged (NaN) counts as the worst value."""
    values = np.array([c.metric[long_budget - 1] for curves in table.values() for c in curves])
    worst = -np.inf if direction == "maximize" else np.inf
    values = np.where(np.isnan(values), worst, values)
    q = quantile if direction == "maximize" else 1 - quantile
    with np.errstate(invalid="ignore"):  # interpolating between two diverged runs: NaN
        target = float(np.quantile(values, q))
    return worst if math.isnan(target) else target


# ---- methods --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """Train configuration ``config`` (the method's trial ``trial``) from epoch ``start``
    (0: from scratch, else from its checkpoint) until epoch ``stop``."""

    trial: int
    config: str
    start: int
    stop: int


class Method(Protocol):
    """A search method as the simulator drives it.

    ``start`` gets the configurations in the order new ones are to be drawn; ``ask`` is called
    for each free worker (in worker order) at the start and after each job ends, and says what
    to train, ``Wait()`` or ``Finished()`` (nothing left and nothing running); ``tell`` reports
    each trained epoch and returns False to stop the job there (pruning); ``done`` says the job
    ended at ``epoch``.
    """

    name: str

    def start(self, configs: Sequence[str]) -> None: ...

    def ask(self) -> Job | Wait | Finished: ...

    def tell(self, job: Job, epoch: int, value: float) -> bool: ...

    def done(self, job: Job, epoch: int) -> None: ...


def _draw(configs: Sequence[str], number: int, name: str) -> str:
    if number >= len(configs):
        raise ValueError(f"{name}: the table has only {len(configs)} configurations")
    return configs[number]


class Asha:
    """:func:`search.scheduler.decide` as a method: trial ``n`` is configuration ``n`` of the
    order; its records are what storage would hold."""

    name = "asha-random"

    def __init__(
        self, *, rungs: Sequence[int], eta: int, top_k: int, max_trials: int, direction: Direction
    ) -> None:
        self.settings: dict[str, Any] = dict(  # decide's keywords
            rungs=list(rungs), eta=eta, top_k=top_k, max_trials=max_trials, direction=direction
        )
        self.configs: list[str] = []
        self.trials: dict[int, TrialRecord] = {}  # what storage would hold, by trial number
        self.decisions: list[tuple[list[TrialRecord], Decision]] = []  # (records, decision)

    def start(self, configs: Sequence[str]) -> None:
        self.configs = list(configs)
        self.keys: dict[int, str] = {}  # trial number -> the table key it trains
        self.trials = {}
        self.decisions = []

    def records(self) -> list[TrialRecord]:
        return list(self.trials.values())

    def ask(self) -> Job | Wait | Finished:
        records = self.records()
        decision = decide(records, **self.settings)
        self.decisions.append((records, decision))
        if isinstance(decision, StartNew):
            number = len(self.trials)
            self.keys[number] = self.new_config(number)
            self.trials[number] = TrialRecord(number, {}, running_to=decision.to_rung)
            return Job(number, self.keys[number], 0, decision.to_rung)
        if isinstance(decision, Continue):
            number, to = decision.number, decision.to_rung
            self.trials[number] = replace(self.trials[number], running_to=to, promoted_to=to)
            return Job(number, self.keys[number], decision.from_rung, to)
        return decision

    def new_config(self, number: int) -> str:
        """The configuration (table key) of new trial ``number``: the next in the draw order."""
        return _draw(self.configs, number, self.name)

    def tell(self, job: Job, epoch: int, value: float) -> bool:
        if math.isnan(value):
            # Diverged: failed, with the worst result (NaN) at the rung it was training to, as
            # the service records it (search.stages.scheduler_records).
            trial = self.trials[job.trial]
            results = {**trial.results, job.stop: math.nan}
            self.trials[job.trial] = replace(trial, results=results, running_to=None, failed=True)
            return False
        if epoch == job.stop:  # the job ends at a rung
            trial = self.trials[job.trial]
            results = {**trial.results, epoch: value}
            self.trials[job.trial] = replace(trial, results=results, running_to=None)
        return True

    def done(self, job: Job, epoch: int) -> None:
        pass


class TabulatedTpe:
    """TPE as the project builds it (``search.stages.make_sampler``: multivariate, grouped for a
    conditional space) suggesting in the study's space (:class:`ParamSpace`); a suggestion trains
    the nearest tabulated configuration (:class:`Nearest`), one of its seeds drawn at random."""

    def __init__(
        self,
        space: ParamSpace,
        params: Mapping[str, Mapping[str, Any]],
        seeds: Mapping[str, int],
        seed: int,
        n_startup_trials: int = 10,
    ) -> None:
        self.space = space
        self.nearest = Nearest(params, space)
        self.seeds = dict(seeds)
        self.seed = seed
        self.n_startup_trials = n_startup_trials

    def sampler(self) -> Any:
        from search.sampling import make_tpe

        return make_tpe(self.seed, self.n_startup_trials, self.space.conditional)

    def draw(self, trial: Any, rng: random.Random) -> str:
        """The table key ``trial`` trains; sets its user attr ``config``."""
        config = self.nearest(self.space.suggest(trial))
        trial.set_user_attr("config", config)
        return arm(config, rng.randrange(self.seeds[config]))


class AshaTpe(Asha):
    """The service's method: :func:`search.scheduler.decide` decides, and a new configuration's
    parameters come from the study's sampler, as in ``search.stages.run_rungs``.

    There a new configuration is a trial of the *screen* study, whose sampler (TPE, multivariate,
    grouped for a conditional space, behind :class:`search.sampling.FirstLegSampler`: see
    ``search.stages.make_sampler``) learns from each configuration's first leg, its value at the
    first rung; continuations are hidden from it. So here: TPE suggests parameters in the
    study's space (:class:`ParamSpace`), the trial trains the nearest tabulated configuration
    (:class:`Nearest`) with one of its seeds drawn at random, and each first leg's result is
    told to TPE, through the same :class:`search.sampling.FirstLegSampler` (a diverged first
    leg fails with the trainer's reason, which the sampler reads as the worst value). Needs
    ``simulate(draws=...)`` keys.
    """

    name = "asha"

    def __init__(self, *, tpe: TabulatedTpe, **settings: Any) -> None:
        super().__init__(**settings)
        self.tpe = tpe

    def start(self, configs: Sequence[str]) -> None:
        import optuna

        from search.sampling import FirstLegSampler

        super().start(configs)
        self.rng = random.Random(self.tpe.seed)
        self.study = optuna.create_study(
            direction=self.settings["direction"], sampler=FirstLegSampler(self.tpe.sampler())
        )
        self.first_legs: dict[int, Any] = {}  # trial number -> its open optuna.Trial

    def new_config(self, number: int) -> str:
        trial = self.study.ask()
        self.first_legs[number] = trial
        return self.tpe.draw(trial, self.rng)

    def tell(self, job: Job, epoch: int, value: float) -> bool:
        import optuna

        going_on = super().tell(job, epoch, value)
        if job.start == 0 and (math.isnan(value) or epoch == job.stop):
            trial = self.first_legs.pop(job.trial)
            if math.isnan(value):
                from search.naming import DIVERGED

                trial.set_user_attr("fail_reason", f"{DIVERGED}: loss is nan at epoch {epoch}")
                self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
            else:
                self.study.tell(trial, value)
        return going_on


class RandomSearch:
    """Every configuration trained from scratch to the long budget, ``n_trials`` of them."""

    name = "random"

    def __init__(self, *, long_budget: int, n_trials: int) -> None:
        self.long_budget = long_budget
        self.n_trials = n_trials
        self.configs: list[str] = []
        self.started = self.running = 0

    def start(self, configs: Sequence[str]) -> None:
        self.configs = list(configs)
        self.started = self.running = 0

    def ask(self) -> Job | Wait | Finished:
        if self.started < self.n_trials:
            number = self.started
            self.started += 1
            self.running += 1
            return Job(number, _draw(self.configs, number, self.name), 0, self.long_budget)
        return Wait() if self.running else Finished()

    def tell(self, job: Job, epoch: int, value: float) -> bool:
        return True

    def done(self, job: Job, epoch: int) -> None:
        self.running -= 1


class SyneTuneAsha(RandomSearch):
    """Syne Tune's ``AsynchronousSuccessiveHalving`` as an outside reference (optional: ``pip
    install syne-tune``). Version 0.16 ships only its *stopping* type (adapted from Ray Tune):
    a trial runs on unless, at a rung, it is below the top ``1/eta`` of the results recorded
    there so far; the promotion type (pause and resume) is gone. Its rung rule decides every
    stop; new configurations are random search's (its default searcher draws at random too),
    ``max_trials`` of them, each trained from scratch towards the long budget.
    """

    name = "syne-asha"

    def __init__(
        self, *, first: int, eta: int, long_budget: int, max_trials: int, direction: Direction
    ) -> None:
        super().__init__(long_budget=long_budget, n_trials=max_trials)
        self.settings = dict(
            time_attr="epoch",
            max_t=long_budget,
            grace_period=first,
            reduction_factor=eta,
            do_minimize=direction == "minimize",
        )

    def start(self, configs: Sequence[str]) -> None:
        from syne_tune.config_space import uniform
        from syne_tune.optimizer.schedulers.asha import AsynchronousSuccessiveHalving

        super().start(configs)
        self.scheduler = AsynchronousSuccessiveHalving(
            {"draw": uniform(0.0, 1.0)}, metric="value", random_seed=0, **self.settings
        )
        self.trials: dict[int, Any] = {}

    def ask(self) -> Job | Wait | Finished:
        from syne_tune.backend.trial_status import Trial

        answer = super().ask()
        if isinstance(answer, Job):
            trial = Trial(trial_id=answer.trial, config={"draw": 0.5}, creation_time=datetime.now())
            self.trials[answer.trial] = trial
            self.scheduler.on_trial_add(trial)
        return answer

    def tell(self, job: Job, epoch: int, value: float) -> bool:
        from syne_tune.optimizer.scheduler import SchedulerDecision

        if math.isnan(value):
            return False
        decision = self.scheduler.on_trial_result(
            self.trials[job.trial], {"epoch": epoch, "value": value}
        )
        return decision == SchedulerDecision.CONTINUE


class Pipeline:
    """The previous screen -> promote pipeline (see the module docstring)."""

    name = "pipeline"

    def __init__(
        self,
        *,
        screen_trials: int,
        screen_epochs: int,
        top_k: int,
        long_budget: int,
        direction: Direction,
        prune: bool = True,
        n_startup: int = 5,
    ) -> None:
        self.screen_trials = screen_trials
        self.screen_epochs = screen_epochs
        self.top_k = top_k
        self.long_budget = long_budget
        self.direction = direction
        self.prune = prune
        self.n_startup = n_startup
        self.start([])

    def start(self, configs: Sequence[str]) -> None:
        self.configs = list(configs)
        self.curves: dict[int, dict[int, float]] = {}  # screen trial -> epoch -> value
        self.completed: dict[int, float] = {}  # screen trial -> final screen value
        self.running = 0
        self.queue: list[Job] | None = None  # promotions, once the screen is over

    def ask(self) -> Job | Wait | Finished:
        if len(self.curves) < self.screen_trials:
            number = len(self.curves)
            self.curves[number] = {}
            self.running += 1
            return Job(number, _draw(self.configs, number, self.name), 0, self.screen_epochs)
        if self.queue is None:
            if self.running:
                return Wait()  # the barrier: the top-k is known once every screen trial ended
            records = [TrialRecord(n, {0: v}) for n, v in self.completed.items()]
            best = ranking(records, 0, self.direction)[: self.top_k]
            self.queue = [
                Job(self.screen_trials + i, self.configs[n], 0, self.long_budget)
                for i, n in enumerate(best)
            ]
        if self.queue:
            self.running += 1
            return self.queue.pop(0)
        return Wait() if self.running else Finished()

    def tell(self, job: Job, epoch: int, value: float) -> bool:
        if job.trial >= self.screen_trials or math.isnan(value):
            return True  # a NaN (diverged) ends the job: the trial failed, it is not ranked
        self.curves[job.trial][epoch] = value
        if epoch == job.stop:
            self.completed[job.trial] = value
            return True
        return not (self.prune and self._worse_than_median(epoch, value))

    def _worse_than_median(self, epoch: int, value: float) -> bool:
        if math.isnan(value):
            return True
        if len(self.completed) < self.n_startup:
            return False
        median = statistics.median(self.curves[n][epoch] for n in self.completed)
        return value < median if self.direction == "maximize" else value > median

    def done(self, job: Job, epoch: int) -> None:
        self.running -= 1


@dataclass(frozen=True)
class ParamSpace:
    """A search space as Optuna sees it: ``suggest`` asks a trial for a parameter set (only the
    active parameters of a conditional space); ``distributions`` give each parameter's range,
    for :class:`Nearest`. ``conditional``: TPE models each branch apart (``group=True``), as
    the project's sampler does for a space with ``when:``."""

    suggest: Callable[[Any], dict[str, Any]]
    distributions: Mapping[str, Any]
    conditional: bool = False

    @classmethod
    def unit_interval(cls) -> ParamSpace:
        """One float ``x`` in [0, 1] (the space of :func:`synthetic_params`)."""
        import optuna

        return cls(
            suggest=lambda trial: {"x": trial.suggest_float("x", 0.0, 1.0)},
            distributions={"x": optuna.distributions.FloatDistribution(0.0, 1.0)},
        )

    @classmethod
    def of_study(cls, cfg: Any) -> ParamSpace:
        """The space of a loaded study config (``search.space``), suggested by the search's own
        :func:`search.space.suggest`."""
        from search.space import distribution, suggest

        space = cfg.search.space
        return cls(
            suggest=lambda trial: suggest(trial, space),
            distributions={name: distribution(spec) for name, spec in space.items()},
            conditional=any(spec.when for spec in space.values()),
        )


class Nearest:
    """The tabulated configuration nearest to a parameter set.

    Distance: the sum over parameters of squared per-parameter distances: a numeric parameter's
    difference on its range scaled to [0, 1] (on a log scale when the range is ``log``); a
    categorical parameter 0 when equal, else 1; a parameter active on one side only 1. Ties go
    to the first configuration in sorted order.
    """

    def __init__(self, params: Mapping[str, Mapping[str, Any]], space: ParamSpace) -> None:
        import optuna

        self.configs = sorted(params)
        self.columns: list[tuple[str, Any, np.ndarray, np.ndarray]] = []
        for name, dist in space.distributions.items():
            present = np.array([_given(params[c].get(name)) for c in self.configs])
            if isinstance(dist, optuna.distributions.CategoricalDistribution):
                values = np.array(
                    [
                        _choice(dist, params[c][name]) if p else -1
                        for c, p in zip(self.configs, present, strict=True)
                    ]
                )
            else:
                values = np.array(
                    [
                        self._scale(dist, float(params[c][name])) if p else 0.0
                        for c, p in zip(self.configs, present, strict=True)
                    ]
                )
            self.columns.append((name, dist, present, values))

    @staticmethod
    def _scale(dist: Any, value: float) -> float:
        low, high = float(dist.low), float(dist.high)
        if high == low:
            return 0.0
        if dist.log:
            return (math.log(value) - math.log(low)) / (math.log(high) - math.log(low))
        return (value - low) / (high - low)

    def __call__(self, query: Mapping[str, Any]) -> str:
        import optuna

        total = np.zeros(len(self.configs))
        for name, dist, present, values in self.columns:
            if not _given(query.get(name)):
                total += present.astype(float)
                continue
            if isinstance(dist, optuna.distributions.CategoricalDistribution):
                d = (values != _choice(dist, query[name])).astype(float)
            else:
                d = np.abs(values - self._scale(dist, float(query[name])))
            total += np.where(present, d**2, 1.0)
        return self.configs[int(np.argmin(total))]


def _choice(dist: Any, value: Any) -> int:
    """The index of ``value`` among a categorical distribution's choices (by ``==``, so a CSV's
    8.0 is the choice 8); -1 when it is none of them."""
    return next((i for i, c in enumerate(dist.choices) if c == value), -1)


def _given(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


class OptunaHyperband:
    """Plain Optuna: one flat study, TPE and ``HyperbandPruner``, no continuation.

    Driven by ask-and-tell as a user's workers would: each free worker asks a new trial (so
    several trials are open at once), reports every epoch (``trial.report``) and stops the
    trial when ``trial.should_prune()``; a pruned trial is never resumed, and every trial
    trains from scratch towards the long budget. TPE suggests parameters in the study's space
    (:class:`ParamSpace`); the trial trains the tabulated configuration nearest to them
    (:class:`Nearest`), with one of its seeds drawn at random. Needs ``simulate(draws=...)``
    keys (:func:`arm`). The sampler is the project's (``search.stages.make_sampler``: TPE,
    multivariate, grouped for a conditional space); the pruner has ``min_resource=first``,
    ``max_resource=long_budget`` and ``reduction_factor=eta``. The study is in memory, named
    after ``seed``: Optuna's Hyperband puts a trial in a bracket by hashing the study name.
    """

    name = "optuna-hyperband"

    def __init__(
        self,
        *,
        space: ParamSpace,
        params: Mapping[str, Mapping[str, Any]],
        seeds: Mapping[str, int],
        n_trials: int,
        first: int,
        long_budget: int,
        eta: int,
        direction: Direction,
        seed: int,
        n_startup_trials: int = 10,
    ) -> None:
        self.tpe = TabulatedTpe(space, params, seeds, seed, n_startup_trials)
        self.n_trials = n_trials
        self.first, self.long_budget, self.eta = first, long_budget, eta
        self.direction: Direction = direction
        self.seed = seed
        self.start([])

    def start(self, configs: Sequence[str]) -> None:
        import optuna

        self.rng = random.Random(self.seed)
        self.study = optuna.create_study(
            study_name=f"{self.name}-{self.seed}",
            direction=self.direction,
            sampler=self.tpe.sampler(),
            pruner=optuna.pruners.HyperbandPruner(
                min_resource=self.first,
                max_resource=self.long_budget,
                reduction_factor=self.eta,
            ),
        )
        self.open: dict[int, Any] = {}  # trial number -> its optuna.Trial, while it trains
        self.asked = self.pruned = 0

    def ask(self) -> Job | Wait | Finished:
        if self.asked >= self.n_trials:
            return Wait() if self.open else Finished()
        self.asked += 1
        trial = self.study.ask()
        self.open[trial.number] = trial
        return Job(trial.number, self.tpe.draw(trial, self.rng), 0, self.long_budget)

    def tell(self, job: Job, epoch: int, value: float) -> bool:
        import optuna

        trial = self.open[job.trial]
        if math.isnan(value):  # diverged: the objective raised
            self._close(trial, state=optuna.trial.TrialState.FAIL)
            return False
        trial.report(value, epoch)
        if epoch == self.long_budget:
            self._close(trial, values=value)
            return True
        if trial.should_prune():
            self.pruned += 1
            self._close(trial, state=optuna.trial.TrialState.PRUNED)
            return False
        return True

    def _close(self, trial: Any, **outcome: Any) -> None:
        self.study.tell(trial, **outcome)
        del self.open[trial.number]

    def done(self, job: Job, epoch: int) -> None:
        pass


# ---- the simulator -------------------------------------------------------------------------


@dataclass(frozen=True)
class Point:
    """A long-budget result: when it came (simulated seconds, epochs trained by then)."""

    time: float
    epochs: int
    value: float
    trial: int
    config: str


@dataclass
class Result:
    """One simulated run of one method."""

    method: str
    workers: int
    seed: int
    long_budget: int
    direction: Direction
    jobs: list[tuple[float, int, Job]] = field(default_factory=list)  # (start, worker, job)
    full: list[Point] = field(default_factory=list)  # long-budget results, in arrival order
    epochs: int = 0  # epochs trained by all workers
    end_time: float = 0.0  # when the last job ended
    busy: float = 0.0  # worker-seconds spent training
    first_idle: float | None = None  # when a free worker first got no job while others ran

    @property
    def utilization(self) -> float:
        span = self.workers * self.end_time
        return self.busy / span if span > 0 else 0.0

    def _better(self, a: float, b: float) -> bool:
        return a > b if self.direction == "maximize" else a < b

    def best_curve(self) -> list[tuple[int, float]]:
        """(epochs trained, best long-budget value so far) at each new best."""
        out: list[tuple[int, float]] = []
        for p in self.full:
            if not math.isnan(p.value) and (not out or self._better(p.value, out[-1][1])):
                out.append((p.epochs, p.value))
        return out

    def reached(self, target: float) -> Point | None:
        """The first long-budget result at least as good as ``target`` (None if none)."""
        return next(
            (p for p in self.full if p.value == target or self._better(p.value, target)), None
        )

    def best_within(self, epochs: float) -> float | None:
        """The best long-budget value among those that came within ``epochs`` epochs."""
        values = [v for e, v in self.best_curve() if e <= epochs]
        return values[-1] if values else None

    def best(self) -> float | None:
        curve = self.best_curve()
        return curve[-1][1] if curve else None


def simulate(
    table: Table,
    method: Method,
    *,
    workers: int,
    seed: int,
    long_budget: int,
    direction: Direction = "maximize",
    draws: int | None = None,
) -> Result:
    """Run ``method`` with ``workers`` simulated workers on ``table``; deterministic per seed.

    ``draws=None``: new configurations come in a random order of the table's configurations
    (each at most once) and each keeps one seed's curve for the whole run. ``draws=n``: ``n``
    draws with replacement, each a configuration and one of its seeds (key ``config@seed``,
    see :func:`arm`), so a configuration drawn twice may show another seed's noise; every
    ``config@seed`` can be trained (methods that pick configurations themselves use this).

    A NaN value (a run that diverged) ends its job in that epoch, as the failed trial would.
    """
    if workers < 1:
        raise ValueError(f"workers: need at least 1, got {workers}")
    rng = random.Random(seed)
    configs = sorted(table)
    if draws is None:
        order = list(configs)
        rng.shuffle(order)
        curve_of = {c: table[c][rng.randrange(len(table[c]))] for c in configs}
    else:
        curve_of = {arm(c, k): curve for c in configs for k, curve in enumerate(table[c])}
        order = []
        for _ in range(draws):
            config = rng.choice(configs)
            order.append(arm(config, rng.randrange(len(table[config]))))
    short = [c for c, curve in curve_of.items() if len(curve.metric) < long_budget]
    if short:
        raise ValueError(f"{len(short)} configuration(s) have fewer than {long_budget} epochs")
    method.start(order)
    result = Result(method.name, workers, seed, long_budget, direction)
    events: list[tuple[float, int, int]] = []  # (epoch ends at, sequence, worker)
    sequence = 0
    jobs: dict[int, tuple[Job, float]] = {}  # worker -> (its job, started at)
    trained: dict[int, int] = {}  # worker -> the last epoch its job finished
    idle = list(range(workers))
    now = 0.0

    def schedule(worker: int) -> None:
        """Queue the end of the worker's next epoch."""
        nonlocal sequence
        job, _ = jobs[worker]
        seconds = curve_of[job.config].seconds[trained[worker]]  # of epoch trained + 1
        heapq.heappush(events, (now + seconds, sequence, worker))
        sequence += 1

    def hand_out() -> Job | Wait | Finished | None:
        answer: Job | Wait | Finished | None = None
        while idle:
            answer = method.ask()
            if not isinstance(answer, Job):
                if jobs and result.first_idle is None:
                    result.first_idle = now
                break  # the answer is the same for every other free worker until a job ends
            curve = curve_of.get(answer.config)
            if curve is None or not 0 <= answer.start < answer.stop <= len(curve.metric):
                raise ValueError(f"{method.name}: cannot train {answer}")
            worker = idle.pop(0)
            jobs[worker] = (answer, now)
            trained[worker] = answer.start
            result.jobs.append((now, worker, answer))
            schedule(worker)
        return answer

    answer = hand_out()
    while events:
        now, _, worker = heapq.heappop(events)
        job, started = jobs[worker]
        trained[worker] += 1
        epoch = trained[worker]
        result.epochs += 1
        value = curve_of[job.config].metric[epoch - 1]
        if epoch == long_budget:
            result.full.append(Point(now, result.epochs, value, job.trial, job.config))
        keep = method.tell(job, epoch, value) and not math.isnan(value)
        if keep and epoch < job.stop:
            schedule(worker)
            continue
        result.busy += now - started
        result.end_time = now
        del jobs[worker], trained[worker]
        method.done(job, epoch)
        idle.append(worker)
        idle.sort()
        answer = hand_out()
    if not isinstance(answer, Finished):
        raise RuntimeError(f"{method.name}: waits for work with nothing running")
    return result


# ---- the benchmark -------------------------------------------------------------------------


def methods(options: dict[str, Any]) -> list[Method]:
    """The compared methods, from the benchmark's options."""
    long_budget, direction = options["long_budget"], options["direction"]
    ladder = make_rungs(options["first"], long_budget, options["eta"])
    return [
        Asha(
            rungs=ladder,
            eta=options["eta"],
            top_k=options["top_k"],
            max_trials=options["max_trials"],
            direction=direction,
        ),
        RandomSearch(long_budget=long_budget, n_trials=options["random_trials"]),
        Pipeline(
            screen_trials=options["screen_trials"],
            screen_epochs=options["screen_epochs"],
            top_k=options["top_k"],
            long_budget=long_budget,
            direction=direction,
            prune=options["prune"],
        ),
    ]


def main() -> None:
    from benchmarks._common import Option, boolean, csv_int, fmt, log, median, parse_options, table

    def missed_or(value: float | None) -> str:
        return "not reached" if value is not None and math.isinf(value) else fmt(value)

    options = parse_options(
        "python -m benchmarks.simulate",
        __doc__.split("\n\n")[0],
        {
            "table": Option("", str, "learning-curve CSV (empty: a synthetic table)"),
            "long_budget": Option(100, int, "epochs of a full run (the last rung)"),
            "first": Option(1, int, "epochs of ASHA's first rung"),
            "eta": Option(3, int, "ASHA's reduction factor"),
            "top_k": Option(3, int, "configurations admitted to the long budget (both methods)"),
            "max_trials": Option(81, int, "ASHA's configurations"),
            "random_trials": Option(60, int, "random search's configurations"),
            "screen_trials": Option(30, int, "pipeline: screened configurations"),
            "screen_epochs": Option(10, int, "pipeline: screen epochs"),
            "prune": Option(True, boolean, "pipeline: median pruning in the screen"),
            "direction": Option("maximize", str, "maximize or minimize the table's metric"),
            "target": Option("", str, "target value (empty: the table's 90th percentile)"),
            "workers": Option("1,8", csv_int, "worker counts"),
            "seeds": Option("0,1,2", csv_int, "simulation seeds"),
        },
    )
    if options["table"]:
        curves = load_table(options["table"])
    else:
        curves = synthetic_table(n_configs=300, epochs=options["long_budget"], seed=0)
    target = (
        float(options["target"])
        if options["target"]
        else default_target(curves, options["long_budget"], options["direction"])
    )
    print(f"{len(curves)} configurations, target {target:.4f}\n")
    for workers in options["workers"]:
        rows = []
        runs: dict[str, list[Result]] = {}
        for seed in options["seeds"]:
            for method in methods(options):
                log(f"{method.name}, {workers} worker(s), seed {seed}")
                runs.setdefault(method.name, []).append(
                    simulate(
                        curves,
                        method,
                        workers=workers,
                        seed=seed,
                        long_budget=options["long_budget"],
                        direction=options["direction"],
                    )
                )
        budgets = [r.epochs for r in runs[Asha.name]]  # equal budget: what ASHA used, per seed
        for name, results in runs.items():
            hits = [r.reached(target) for r in results]
            at_budget = [r.best_within(b) for r, b in zip(results, budgets, strict=True)]
            rows.append(
                [
                    name,
                    f"{sum(h is not None for h in hits)}/{len(hits)}",
                    # A run that missed counts as infinite, as in the replay: a median over
                    # the hits alone would favour a method that reached the target less often.
                    missed_or(median([h.epochs if h else math.inf for h in hits])),
                    missed_or(median([h.time if h else math.inf for h in hits])),
                    fmt(median([v for v in at_budget if v is not None]), 4),
                    fmt(median([r.epochs for r in results])),
                    fmt(median([r.utilization for r in results]), 3),
                    fmt(median([(r.first_idle or r.end_time) / r.end_time for r in results]), 2),
                ]
            )
        print(
            f"### {workers} worker(s), medians over seeds {options['seeds']} "
            "(a seed that missed the target counts as infinite)\n"
        )
        headers = [
            "method",
            "reached",
            "epochs to target",
            "seconds to target",
            "best at ASHA's epochs",
            "epochs",
            "utilization",
            "first idle worker (share of run)",
        ]
        print(table(headers, rows) + "\n")


if __name__ == "__main__":
    main()
