"""Search methods replayed on a stored table of real learning curves, in simulated time.

The default table (``benchmarks/tables/mnist-guided-curves.csv``, made by ``benchmarks/tabulate.py``
with the project's trainer; the command is its first line) holds every epoch's metric and
seconds of 100 configurations of the MNIST guided study's space at reduced width on a subset
(20 of them with a second seed); ``tables/quickstart-curves.csv`` is a smaller, noisier one
(``table=``). The study and overrides a table was drawn from are read from its header. Five
methods are replayed on it by :func:`benchmarks.simulate.simulate` with 1, 8 and 64 simulated
workers, ``reps`` times each (repetition ``r`` uses seed ``r`` for everything it draws):

random
    random search: every configuration trained from scratch to the full budget.
optuna-hyperband
    plain Optuna (:class:`benchmarks.simulate.OptunaHyperband`): one in-memory study, TPE with
    the study's sampler settings, ``HyperbandPruner(min_resource=first,
    max_resource=full budget, reduction_factor=eta)``, ask/tell with one open trial per busy
    worker, ``report``/``should_prune`` every epoch, no continuation. TPE suggests parameters
    in the study's own space (``search.space.suggest``); the trial trains the tabulated
    configuration nearest to them (``benchmarks.simulate.Nearest``).
pipeline
    the previous screen -> barrier -> retrain top-k pipeline (median pruning in the screen).
asha-random
    the new scheduler alone, :func:`search.scheduler.decide`, continuing trials from rung
    checkpoints (a continuation costs only the epochs it adds), new configurations drawn at
    random (as in Li et al.).
asha
    the service as ``search.run`` runs it (:class:`benchmarks.simulate.AshaTpe`): the same
    decisions, new configurations suggested by the study's TPE fitted on each configuration's
    first-rung result (``search.sampling.FirstLegSampler``); nearest tabulated configuration
    as for optuna-hyperband.
syne-asha (on request: ``methods=...,syne-asha``, needs ``syne-tune``)
    an outside reference, Syne Tune's ``AsynchronousSuccessiveHalving`` (stopping type, the
    only one its version 0.16 ships; :class:`benchmarks.simulate.SyneTuneAsha`).

Configurations for random, pipeline and asha-random are draws with replacement from the table
(each a configuration, uniformly, and one of its seeds); TPE (optuna-hyperband, asha) picks its
own. **Budgets**: every method sees the same number of configurations, chosen per worker count
as a user who grows the search with the workers would, less than in proportion (``configs``,
default 81 at 1 worker, 216 = 27 per worker at 8, 576 = 9 per worker at 64; other worker counts
``per_worker`` x workers); asha and the pipeline send ``configurations / eta^(rungs - 1)`` of them
(3, 8, 21) to the full budget; the pipeline screens for ``screen_epochs`` epochs. The replay's
cost limits the largest: plain Optuna's TPE re-reads every trial at each ask, so 1,728 trials (27
per worker at 64) took 313 s of CPU for one repetition here (profiled), 576 took 18 s.

Reported per method and worker count, medians over repetitions: epochs (all workers) and
simulated seconds until a full-budget result reaches the target (the 90th percentile of the
table's full-budget values, every seed pooled, a diverged run counting as the worst; a
repetition that never reaches it counts as infinite), how many repetitions reached it, the
epochs when the first full-budget result came (no method reaches the target sooner; with W busy
workers it is about W x the full budget), the best full-budget value within the epochs asha
used in the same repetition (equal budget), the epochs spent, and worker utilization (busy
worker-seconds / (workers x seconds until the last job ended)). The last line of the output is::

    ratio to random <x>, to optuna-hyperband <y>, utilization@8 <u8>, utilization@64 <u64>

with x, y asha's median epochs to target over the other method's, at ``ratio_workers`` (8), and
u8, u64 asha's median utilization at 8 and 64 workers ("-" for a worker count not run).
"""

from __future__ import annotations

import importlib.util
import math
import statistics
import sys
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from benchmarks._common import (
    REPO_ROOT,
    Option,
    bounded_ratio,
    csv,
    csv_int,
    fmt,
    log,
    parse_options,
    table,
)
from benchmarks.simulate import (
    Asha,
    AshaTpe,
    Method,
    OptunaHyperband,
    ParamSpace,
    Pipeline,
    RandomSearch,
    SyneTuneAsha,
    Table,
    TabulatedTpe,
    default_target,
    load_table,
    simulate,
)
from benchmarks.tabulate import table_study
from search.sampling import startup_trials
from search.scheduler import Direction
from search.scheduler import rungs as make_rungs

DEFAULT_TABLE = "benchmarks/tables/mnist-guided-curves.csv"
DEFAULT_FIGURE = "docs/tabulated-best-so-far.png"
METHODS = ("random", "optuna-hyperband", "pipeline", "asha-random", "asha")
# Outside references, replayed when asked for (``methods=...,syne-asha``; needs syne-tune).
OPTIONAL_METHODS = ("syne-asha",)


def budgets(text: str) -> dict[int, int]:
    """``"1:81,8:216"`` -> {1: 81, 8: 216}."""
    out = {}
    for part in csv(text):
        workers, sep, configs = part.partition(":")
        if not sep:
            raise ValueError(f"expected W:N pairs, got {part!r}")
        out[int(workers)] = int(configs)
    return out


# ---- the context of one replay ----------------------------------------------------------------


@dataclass
class Setup:
    """Everything a replay needs: the table, its configurations' parameters, the space."""

    table: Table
    params: dict[str, dict[str, Any]]
    space: ParamSpace
    long_budget: int
    first: int = 1
    eta: int = 3
    per_worker: int = 27
    configs: dict[int, int] = field(default_factory=dict)  # workers -> configurations
    admit: int = 0  # configurations / admit go to the full budget (0: eta^(len(rungs) - 1))
    screen_epochs: int = 3
    n_startup_trials: int | None = None  # the study's search.sampler.n_startup_trials
    direction: str = "maximize"

    @property
    def rungs(self) -> list[int]:
        return make_rungs(self.first, self.long_budget, self.eta)

    @property
    def asha_startup_trials(self) -> int:
        """The service's TPE start-up under this ladder (``search.sampling.startup_trials``)."""
        return startup_trials(self.n_startup_trials, self.rungs, self.eta)

    @property
    def optuna_startup_trials(self) -> int:
        """Plain Optuna's: the study's setting, else TPE's default."""
        return startup_trials(self.n_startup_trials, None, self.eta)

    def budget(self, workers: int) -> tuple[int, int]:
        """(configurations, configurations sent to the full budget) for ``workers``."""
        configs = self.configs.get(workers, self.per_worker * workers)
        divisor = self.admit or self.eta ** (len(self.rungs) - 1)
        return configs, max(1, configs // divisor)

    def method(self, name: str, workers: int, seed: int) -> Method:
        configs, top_k = self.budget(workers)
        if name == "random":
            return RandomSearch(long_budget=self.long_budget, n_trials=configs)
        if name in ("asha", "asha-random"):
            settings: dict[str, Any] = dict(
                rungs=self.rungs,
                eta=self.eta,
                top_k=top_k,
                max_trials=configs,
                direction=self.direction,
            )
            if name == "asha-random":
                return Asha(**settings)
            seeds = {c: len(curves) for c, curves in self.table.items()}
            tpe = TabulatedTpe(self.space, self.params, seeds, seed, self.asha_startup_trials)
            return AshaTpe(tpe=tpe, **settings)
        if name == "pipeline":
            return Pipeline(
                screen_trials=configs,
                screen_epochs=self.screen_epochs,
                top_k=top_k,
                long_budget=self.long_budget,
                direction=self.direction,  # type: ignore[arg-type]
            )
        if name == "optuna-hyperband":
            return OptunaHyperband(
                space=self.space,
                params=self.params,
                seeds={c: len(curves) for c, curves in self.table.items()},
                n_trials=configs,
                first=self.first,
                long_budget=self.long_budget,
                eta=self.eta,
                direction=self.direction,  # type: ignore[arg-type]
                seed=seed,
                n_startup_trials=self.optuna_startup_trials,
            )
        if name == "syne-asha":
            return SyneTuneAsha(
                first=self.first,
                eta=self.eta,
                long_budget=self.long_budget,
                max_trials=configs,
                direction=self.direction,  # type: ignore[arg-type]
            )
        allowed = ", ".join((*METHODS, *OPTIONAL_METHODS))
        raise ValueError(f"methods: unknown {name!r}; allowed: {allowed}")


def diagnostics(
    table: Table, rungs: Sequence[int], long_budget: int, direction: Direction = "maximize"
) -> dict[str, float]:
    """How much the table lets a method pick: the rank correlation (Spearman) across
    configurations between the value at each rung and at the full budget (first seed; a
    diverged run ranks last, as the worst value in ``direction``), and the correlation between
    two seeds' full-budget values over the configurations that have two (seed noise: 1 = none)."""
    worst = -np.inf if direction == "maximize" else np.inf

    def ranks(values: np.ndarray) -> np.ndarray:
        return pd.Series(np.nan_to_num(values, nan=worst)).rank().to_numpy()

    first = [curves[0] for curves in table.values()]
    final = ranks(np.array([c.metric[long_budget - 1] for c in first]))
    out = {}
    for rung in rungs[:-1]:
        at = ranks(np.array([c.metric[rung - 1] for c in first]))
        out[f"rung {rung}"] = float(np.corrcoef(at, final)[0, 1])
    pairs = [
        (cs[0].metric[long_budget - 1], cs[1].metric[long_budget - 1])
        for cs in table.values()
        if len(cs) > 1
        and not np.isnan(cs[0].metric[long_budget - 1])
        and not np.isnan(cs[1].metric[long_budget - 1])
    ]  # a diverged seed has no value to correlate
    if len(pairs) > 2:
        a, b = np.array(pairs).T
        out["seeds"] = float(np.corrcoef(a, b)[0, 1])
    return out


def load_params(path: str | Path, curves: Table) -> dict[str, dict[str, Any]]:
    """config_id -> its active parameters, from ``tabulate``'s configurations CSV, for the
    configurations of ``curves``."""
    frame = pd.read_csv(path, comment="#").drop(columns=["seed0", "seed1"], errors="ignore")
    out: dict[str, dict[str, Any]] = {}
    for row in frame.to_dict("records"):
        config = str(row.pop("config_id"))
        out[config] = {k: v for k, v in row.items() if not (isinstance(v, float) and math.isnan(v))}
    missing = sorted(set(curves) - set(out))
    if missing:
        raise ValueError(f"{path}: no parameters for {', '.join(missing[:5])}")
    return {c: out[c] for c in curves}


# ---- one run and its summary ------------------------------------------------------------------


@dataclass
class Summary:
    """What the report needs from one simulated run."""

    method: str
    workers: int
    seed: int
    epochs: int
    end_time: float
    utilization: float
    hit_epochs: float  # inf: never reached the target
    hit_time: float
    best_curve: list[tuple[int, float]] = field(default_factory=list)
    full_runs: int = 0
    trials: int = 0  # trials started (for the pipeline: screened + retrained)
    pruned: int | None = None
    wall_s: float = 0.0

    def best_within(self, epochs: float) -> float | None:
        values = [v for e, v in self.best_curve if e <= epochs]
        return values[-1] if values else None

    @property
    def first_full_epochs(self) -> float:
        """Epochs (all workers) when the first full-budget result came: no method can reach
        the target sooner, and with W busy workers it is about W x the full budget."""
        return float(self.best_curve[0][0]) if self.best_curve else math.inf


_SETUP: Setup | None = None  # per process (set before the pool forks, or by run_one's caller)


def run_one(task: tuple[str, int, int, float]) -> Summary:
    """Simulate ``(method, workers, seed, target)`` on the module's :data:`_SETUP`."""
    name, workers, seed, target = task
    setup = _SETUP
    assert setup is not None, "replay: no setup"
    method = setup.method(name, workers, seed)
    started = time.perf_counter()
    result = simulate(
        setup.table,
        method,
        workers=workers,
        seed=seed,
        long_budget=setup.long_budget,
        direction=setup.direction,  # type: ignore[arg-type]
        draws=setup.budget(workers)[0],
    )
    hit = result.reached(target)
    return Summary(
        method=name,
        workers=workers,
        seed=seed,
        epochs=result.epochs,
        end_time=result.end_time,
        utilization=result.utilization,
        hit_epochs=float(hit.epochs) if hit else math.inf,
        hit_time=hit.time if hit else math.inf,
        best_curve=result.best_curve(),
        full_runs=len(result.full),
        trials=len({job.trial for _, _, job in result.jobs}),
        pruned=getattr(method, "pruned", None),
        wall_s=time.perf_counter() - started,
    )


def replay(
    setup: Setup,
    *,
    methods: Sequence[str],
    workers: Sequence[int],
    reps: int,
    target: float,
    jobs: int = 1,
) -> dict[tuple[str, int], list[Summary]]:
    """Every (method, worker count) ``reps`` times; ``jobs`` processes (fork) share the work."""
    global _SETUP
    _SETUP = setup
    tasks = [(m, w, s, target) for w in workers for m in methods for s in range(reps)]
    # the longest first, so the pool's last tasks are short
    tasks.sort(key=lambda t: -t[1] * (4 if t[0] in ("optuna-hyperband", "asha") else 1))
    out: dict[tuple[str, int], list[Summary]] = {}
    if jobs > 1:
        import multiprocessing

        context = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
            summaries = [_logged(s, i, len(tasks)) for i, s in enumerate(pool.map(run_one, tasks))]
    else:
        summaries = [_logged(run_one(t), i, len(tasks)) for i, t in enumerate(tasks)]
    for s in sorted(summaries, key=lambda s: s.seed):
        out.setdefault((s.method, s.workers), []).append(s)
    return out


def _logged(summary: Summary, index: int, total: int) -> Summary:
    log(
        f"[{index + 1}/{total}] {summary.method}, {summary.workers} worker(s), seed "
        f"{summary.seed}: {summary.epochs} epochs, {summary.wall_s:.1f}s"
    )
    return summary


# ---- the report -------------------------------------------------------------------------------


def target_percentile(direction: Direction) -> str:
    """The percentile of the table's full-budget values that is the target
    (:func:`benchmarks.simulate.default_target`): the best 1 in 10 in ``direction``."""
    return "p90" if direction == "maximize" else "p10"


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else math.nan


def shown(value: float, digits: int = 0) -> str:
    if math.isnan(value):
        return "-"
    if math.isinf(value):
        return "not reached"
    return fmt(value, digits)


def rows_for(
    runs: dict[tuple[str, int], list[Summary]], workers: int, methods: Sequence[str]
) -> list[list[str]]:
    asha = {s.seed: s for s in runs.get(("asha", workers), [])}
    rows = []
    for name in methods:
        summaries = runs.get((name, workers), [])
        if not summaries:
            continue
        at_budget = [
            s.best_within(asha[s.seed].epochs) for s in summaries if s.seed in asha
        ]  # equal budget: the epochs asha used in the same repetition
        values = [v for v in at_budget if v is not None]
        pruned = [s.pruned for s in summaries if s.pruned is not None]
        rows.append(
            [
                name,
                f"{sum(not math.isinf(s.hit_epochs) for s in summaries)}/{len(summaries)}",
                shown(median([s.hit_epochs for s in summaries])),
                shown(median([s.first_full_epochs for s in summaries])),
                shown(median([s.hit_time for s in summaries])),
                f"{shown(median(values), 4)} ({len(values)}/{len(at_budget)})" if asha else "-",
                shown(median([float(s.epochs) for s in summaries])),
                shown(median([float(s.trials) for s in summaries])),
                shown(median([float(s.full_runs) for s in summaries])),
                shown(median([s.utilization for s in summaries]), 3),
                shown(median([float(p) for p in pruned])) if pruned else "-",
            ]
        )
    return rows


HEADERS = [
    "method",
    "reached",
    "epochs to target",
    "epochs to the first full-budget result",
    "simulated s to target",
    "best full-budget value at asha's epochs (reps with one)",
    "epochs spent",
    "trials started",
    "full-budget runs",
    "utilization",
    "pruned trials",
]


def hits_median(runs: dict[tuple[str, int], list[Summary]], name: str, workers: int) -> float:
    """Median epochs to target (a repetition that missed counts as infinite)."""
    return median([s.hit_epochs for s in runs.get((name, workers), [])])


def hits_median_at_least(
    runs: dict[tuple[str, int], list[Summary]], name: str, workers: int
) -> float:
    """A lower bound on :func:`hits_median` when it is a miss: the median with each missed
    repetition counted at the epochs it spent (it would have needed more)."""
    return median(
        [
            s.epochs if math.isinf(s.hit_epochs) else s.hit_epochs
            for s in runs.get((name, workers), [])
        ]
    )


def ratio_text(runs: dict[tuple[str, int], list[Summary]], name: str, workers: int) -> str:
    """asha's median epochs to target over method ``name``'s, at ``workers``, as the final line
    prints it: 3 decimals; a bound (``<x``, ``>x``) where one median is a miss, never the 0 or
    inf that dividing by infinity gives; ``-`` where both are."""
    ours, theirs = hits_median(runs, "asha", workers), hits_median(runs, name, workers)
    if math.isnan(ours) or math.isnan(theirs):
        return "-"
    ours_low = hits_median_at_least(runs, "asha", workers)
    return bounded_ratio(ours, theirs, ours_low, hits_median_at_least(runs, name, workers), 3)


def ratios_line(runs: dict[tuple[str, int], list[Summary]], workers: int) -> str:
    """asha's median epochs to target over each other method's, at ``workers``."""
    parts = [
        f"{name} {ratio_text(runs, name, workers)}"
        for name in (*METHODS, *OPTIONAL_METHODS)
        if name != "asha" and (name, workers) in runs
    ]
    return f"{workers} worker(s): asha epochs to target / " + ", ".join(parts)


def final_line(runs: dict[tuple[str, int], list[Summary]], ratio_workers: int) -> str:
    def hits(name: str) -> float:
        return hits_median(runs, name, ratio_workers)

    def util(workers: int) -> str:
        summaries = runs.get(("asha", workers), [])
        return f"{median([s.utilization for s in summaries]):.3f}" if summaries else "-"

    return (
        f"ratio to random {ratio_text(runs, 'random', ratio_workers)}, "
        f"to optuna-hyperband {ratio_text(runs, 'optuna-hyperband', ratio_workers)}, "
        f"utilization@8 {util(8)}, utilization@64 {util(64)}"
    )


def best_so_far_figure(
    runs: dict[tuple[str, int], list[Summary]],
    workers: int,
    methods: Sequence[str],
    target: float,
    path: Path,
    maximize: bool = True,
) -> Path | None:
    """Median over repetitions of the best full-budget value so far against epochs (PNG)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    summaries = {m: runs.get((m, workers), []) for m in methods}
    if not any(summaries.values()):
        return None
    top = max(s.epochs for ss in summaries.values() for s in ss)
    grid = np.unique(np.geomspace(1, max(top, 2), 300).astype(int))
    figure = Figure(figsize=(6.4, 3.6), dpi=110)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    for name, ss in summaries.items():
        if not ss:
            continue
        worst = -np.inf if maximize else np.inf
        curves = np.full((len(ss), len(grid)), worst)  # no full-budget result yet: the worst
        for i, s in enumerate(ss):
            for epochs, value in s.best_curve:
                curves[i, grid >= epochs] = value
        line = np.median(curves, axis=0)
        end = max(s.epochs for s in ss)  # a run that ended keeps its best
        line = np.where(np.isfinite(line) & (grid <= end), line, np.nan)
        ax.step(grid, line, where="post", label=name)
    ax.axhline(
        target,
        color="grey",
        linestyle=":",
        linewidth=1,
        label=f"target ({target_percentile('maximize' if maximize else 'minimize')})",
    )
    drawn = [v for line in ax.get_lines() for v in line.get_ydata() if np.isfinite(v)]
    if drawn:  # the region around the target, where the methods differ
        best, worst = max(drawn), min(drawn)
        spread = abs(best - target) or abs(target) * 0.01 or 0.01
        low, high = (target - 3 * spread, best) if maximize else (worst, target + 3 * spread)
        ax.set_ylim(max(low, worst) - spread / 4, high + spread / 4)
    ax.set_xscale("log")
    first = min(
        (s.best_curve[0][0] for ss in summaries.values() for s in ss if s.best_curve), default=1
    )
    ax.set_xlim(first / 1.5, top * 1.2)
    ticks = [t for t in (10, 30, 100, 300, 1000, 3000, 10000, 30000) if first / 1.5 <= t <= top]
    ax.set_xticks(ticks, [f"{t:,}" for t in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("epochs trained by all workers")
    ax.set_ylabel("best full-budget value (median)")
    ax.set_title(f"Best so far, {workers} workers, {len(next(iter(summaries.values())))} reps")
    ax.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


def main() -> int:
    options = parse_options(
        "python -m benchmarks.search_efficiency mode=simulate",
        __doc__.split("\n\n")[0],
        {
            "table": Option(DEFAULT_TABLE, str, "learning-curve CSV made by benchmarks.tabulate"),
            "study": Option(
                "", str, "the study whose space the table was drawn from ('' = the table's header)"
            ),
            "workers": Option("1,8,64", csv_int, "simulated worker counts"),
            "reps": Option(20, int, "repetitions per method and worker count (seeds 0..reps-1)"),
            "methods": Option(
                ",".join(METHODS),
                csv,
                f"methods to replay; also {', '.join(OPTIONAL_METHODS)} (Syne Tune's stopping "
                "ASHA, an outside reference: pip install syne-tune)",
            ),
            "configs": Option(
                "1:81,8:216,64:576", budgets, "configurations per worker count W:N, every method"
            ),
            "per_worker": Option(27, int, "configurations per worker for a W not in configs"),
            "admit": Option(
                0,
                int,
                "asha, pipeline: configurations / admit to the full budget (0 = eta^(rungs - 1))",
            ),
            "first": Option(1, int, "first rung (asha) and Hyperband's min_resource"),
            "eta": Option(3, int, "reduction factor (asha, Hyperband)"),
            "screen_epochs": Option(3, int, "pipeline: screen epochs"),
            "long_budget": Option(0, int, "full budget (0 = the table's epochs)"),
            "ratio_workers": Option(8, int, "worker count of the final line's ratios"),
            "figure": Option(DEFAULT_FIGURE, str, "best-so-far PNG at 8 workers ('' = none)"),
            "jobs": Option(2, int, "processes sharing the repetitions"),
        },
        epilog="examples:\n  python -m benchmarks.search_efficiency mode=simulate\n"
        "  python -m benchmarks.search_efficiency mode=simulate reps=3 workers=1,8 figure=",
    )
    allowed = (*METHODS, *OPTIONAL_METHODS)
    for name in options["methods"]:
        if name not in allowed:
            print(
                f"error: methods: unknown {name!r}; allowed: {', '.join(allowed)}", file=sys.stderr
            )
            return 2
    if "syne-asha" in options["methods"] and importlib.util.find_spec("syne_tune") is None:
        print("error: methods: syne-asha needs Syne Tune: pip install syne-tune", file=sys.stderr)
        return 2
    import optuna

    from search.config import direction_of, load_config

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    started = time.perf_counter()
    path = Path(options["table"])
    path = path if path.is_absolute() else REPO_ROOT / path
    curves = load_table(path)
    epochs = min(len(c.metric) for cs in curves.values() for c in cs)
    study, overrides = table_study(path)
    cfg = load_config(options["study"] or study, overrides if not options["study"] else [])
    setup = Setup(
        table=curves,
        params=load_params(path.with_name(path.stem + "-configs.csv"), curves),
        space=ParamSpace.of_study(cfg),
        long_budget=options["long_budget"] or epochs,
        first=options["first"],
        eta=options["eta"],
        per_worker=options["per_worker"],
        configs=options["configs"],
        admit=options["admit"],
        screen_epochs=options["screen_epochs"],
        n_startup_trials=cfg.search.sampler.n_startup_trials,
        direction=direction_of(cfg),
    )
    target = default_target(curves, setup.long_budget, setup.direction)  # type: ignore[arg-type]
    n_curves = sum(len(c) for c in curves.values())
    print(
        f"table {options['table']}: {len(curves)} configurations, {n_curves} curves, full budget "
        f"{setup.long_budget} epochs; target {cfg.search.metric} "
        f"{'>=' if setup.direction == 'maximize' else '<='} {target:.4f} "
        f"({target_percentile(setup.direction)} of the {n_curves} full-budget values)"
    )
    found = diagnostics(curves, setup.rungs, setup.long_budget, setup.direction)
    print(
        "rank correlation with the full-budget value across configurations: "
        + ", ".join(f"{k} {v:.2f}" for k, v in found.items() if k != "seeds")
        + (
            f"; full-budget values of two seeds of one configuration correlate {found['seeds']:.2f}"
            if "seeds" in found
            else ""
        )
    )
    print(
        f"rungs {setup.rungs}, eta {setup.eta}; configurations per method (draws with "
        f"replacement; optuna: TPE's own) by worker count: "
        f"{', '.join(f'{w}: {setup.budget(w)[0]}' for w in options['workers'])}; asha and "
        f"pipeline send configurations / {setup.admit or setup.eta ** (len(setup.rungs) - 1)} "
        "to the full budget; "
        f"pipeline screen {setup.screen_epochs} epochs, median pruning; "
        f"asha: TPE start-up {setup.asha_startup_trials} configurations; "
        f"optuna: TPE (n_startup_trials {setup.optuna_startup_trials}, multivariate, group) + "
        f"HyperbandPruner({setup.first}, {setup.long_budget}, {setup.eta}); "
        f"medians over {options['reps']} repetitions\n"
    )
    runs = replay(
        setup,
        methods=options["methods"],
        workers=options["workers"],
        reps=options["reps"],
        target=target,
        jobs=options["jobs"],
    )
    for workers in options["workers"]:
        configs, top_k = setup.budget(workers)
        print(f"### {workers} worker(s): {configs} configurations, {top_k} to the full budget\n")
        print(table(HEADERS, rows_for(runs, workers, options["methods"])) + "\n")
    if options["figure"] and 8 in options["workers"]:
        figure = Path(options["figure"])
        figure = figure if figure.is_absolute() else REPO_ROOT / figure
        drawn = best_so_far_figure(
            runs, 8, options["methods"], target, figure, setup.direction == "maximize"
        )
        if drawn:
            log(f"figure: {drawn}")
    for workers in options["workers"]:
        print(ratios_line(runs, workers))
    cpu = sum(s.wall_s for ss in runs.values() for s in ss)
    print(
        f"replay time {time.perf_counter() - started:.0f}s ({cpu:.0f}s of simulation, "
        f"{options['jobs']} process(es)); ratios at {options['ratio_workers']} workers"
    )
    print(final_line(runs, options["ratio_workers"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
