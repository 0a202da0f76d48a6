"""Search methods on a table of learning curves, in simulated time (no training).

The model is Syne Tune's simulator backend on tabulated benchmarks: a table holds, for each
configuration and seed, the metric after every epoch and the seconds each epoch took. ``N``
simulated workers take work from a *method* through an event queue in simulated time, one event
per trained epoch; a job that continues a trial from a checkpoint costs only the epochs it adds.
Nothing reads the clock: a run is a function of the table, the method and the seed.

Methods (behind :class:`Method`: ``start``/``ask``/``tell``/``done``; more can be added):

asha
    :mod:`search.scheduler` itself: each free worker asks :func:`search.scheduler.decide` for
    work, with the records the method keeps as storage would.
random
    random search: each configuration trained from scratch to the long budget.
pipeline
    the previous screen -> promote pipeline: ``screen_trials`` configurations to
    ``screen_epochs`` (optionally pruned by a median rule: after an epoch, a trial worse than
    the median of the completed screen trials at that epoch stops, once ``n_startup``
    completed, like Optuna's ``MedianPruner``); a barrier (every screen trial finished); then the
    ``top_k`` completed ones retrained from scratch to the long budget (same configuration and
    seed, hence the same curve).

All methods draw new configurations in one seeded random order of the table's configurations,
and each configuration keeps one seed's curve (drawn with the same seed) for the whole run.

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
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
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
    """The learning-curve table in CSV file ``path`` (see :func:`table_from_frame`)."""
    return table_from_frame(pd.read_csv(path))


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


def default_target(
    table: Table, long_budget: int, direction: Direction, quantile: float = 0.9
) -> float:
    """As good as the best 1 in 10 configurations trained in full: the 90th percentile of the
    table's long-budget values (all seeds pooled; the 10th when minimizing)."""
    values = [curve.metric[long_budget - 1] for curves in table.values() for curve in curves]
    q = quantile if direction == "maximize" else 1 - quantile
    return float(np.quantile(values, q))


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

    name = "asha"

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
            config = _draw(self.configs, number, self.name)
            self.trials[number] = TrialRecord(number, {}, running_to=decision.to_rung)
            return Job(number, config, 0, decision.to_rung)
        if isinstance(decision, Continue):
            number, to = decision.number, decision.to_rung
            self.trials[number] = replace(self.trials[number], running_to=to, promoted_to=to)
            return Job(number, self.configs[number], decision.from_rung, to)
        return decision

    def tell(self, job: Job, epoch: int, value: float) -> bool:
        if epoch == job.stop:  # the job ends at a rung
            trial = self.trials[job.trial]
            results = {**trial.results, epoch: value}
            self.trials[job.trial] = replace(trial, results=results, running_to=None)
        return True

    def done(self, job: Job, epoch: int) -> None:
        pass


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
        if job.trial >= self.screen_trials:
            return True
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
) -> Result:
    """Run ``method`` with ``workers`` simulated workers on ``table``; deterministic per seed."""
    if workers < 1:
        raise ValueError(f"workers: need at least 1, got {workers}")
    rng = random.Random(seed)
    order = sorted(table)
    rng.shuffle(order)
    curve_of = {c: table[c][rng.randrange(len(table[c]))] for c in sorted(table)}
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
            if not 0 <= answer.start < answer.stop <= len(curve_of[answer.config].metric):
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
        keep = method.tell(job, epoch, value)
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
        budgets = [r.epochs for r in runs["asha"]]  # equal budget: what ASHA used, per seed
        for name, results in runs.items():
            hits = [r.reached(target) for r in results]
            at_budget = [r.best_within(b) for r, b in zip(results, budgets, strict=True)]
            rows.append(
                [
                    name,
                    f"{sum(h is not None for h in hits)}/{len(hits)}",
                    fmt(median([h.epochs for h in hits if h])),
                    fmt(median([h.time for h in hits if h])),
                    fmt(median([v for v in at_budget if v is not None]), 4),
                    fmt(median([r.epochs for r in results])),
                    fmt(median([r.utilization for r in results]), 3),
                    fmt(median([(r.first_idle or r.end_time) / r.end_time for r in results]), 2),
                ]
            )
        print(f"### {workers} worker(s), medians over seeds {options['seeds']}\n")
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
