"""Search efficiency: the rung scheduler against random search at equal epochs, training for real.

For each seed, on a CPU-sized problem, in this process, with one SQLite file per method and seed
(a temporary folder), one worker:

asha
    the project's default scheduler (``search.pruner: asha``), run through
    ``search.stages.run_stages`` with ``stage=promote`` (the rungs up to the long budget, no final
    stage): the report's configuration first, then TPE; every new configuration trains to the
    first rung, and one that ranks in the top 1/eta of the results recorded at its rung is
    continued from its rung checkpoint to the next; at most ``top_k`` reach the long budget. Its
    total epochs are the seed's budget B.
random
    random search: ``RandomSampler``, no pruning, every configuration trained from scratch to the
    long budget (the learning-rate schedule over the same long budget as asha's legs), until it
    has used ``random_budget`` x B epochs: past B, so that its epochs to the target are measured
    where it needs more than B.
pipeline (optional: ``methods=asha,random,pipeline``)
    the previous pipeline, ``search.stages.run_screen`` + ``run_promote``: a screen of
    ``screen_epochs`` pruned by ``pipeline_pruner`` (Hyperband), a barrier, the top-k retrained
    from scratch to the long budget.

Epochs are counted per leg, in the order the legs ran: a leg costs the epochs it trained, not the
epoch it ended at (a rung leg's ``epochs_added``: continuing from rung 3 to rung 9 costs 6; a run
from scratch its ``epochs_run``; a diverged run also the epoch that diverged). A *full-budget
value* is a run's validation metric at the long budget (its last epoch, what the study ranks): a
rung leg that ended at the last rung, a random-search run, a promoted run. Compared, per seed and
as medians over seeds:

- best full-budget value at equal epochs: the best full-budget value a method had within B;
- epochs to the target: the epochs a method had spent when one of its full-budget values first
  reached the target (a seed that never does counts as infinite in the medians). The target is
  ``target=<value>``, or by default the 90th percentile of all random-search full-budget values,
  pooled over seeds ("as good as the best 1 in 10 configurations trained in full");
- the ratio asha / random of epochs to the target (goal of issue 12: <= 1/3).

Wall seconds are shown too, each method's with its set-up (the data; for asha and the pipeline
also the study's baselines, scored once); the machine's load moves them, not the epochs or values
(1 thread on a CPU repeats a run exactly: the study names are fixed per method and seed).

Problems (``study=``), each option left empty taking the preset's value, else the study file's:
``quickstart`` as the study file has it (SimCLR on scikit-learn digits, 12 configurations, rungs
1, 3, 9, top 2 to the long budget of 9 epochs); ``mnist_guided`` (default) at reduced width:
channels 8 or 16 (the study's own model, so the report's configuration queued first and the
baselines' untrained encoder, at 16: ``channels`` sets the widest as ``model.channels``), 1,000
training / 500 validation MNIST images (digits where MNIST is missing), 12 configurations,
rungs 1, 3, 9, top 2, 4 TPE start-up trials.

Modes (the first argument ``mode=...``; each takes its own options, see ``--help``):

- ``mode=train`` (default): the above, training for real.
- ``mode=tabulate``: make the table of real learning curves (``benchmarks/tabulate.py``).
- ``mode=simulate``: replay random search, plain Optuna (TPE + Hyperband), the previous
  pipeline and the new scheduler on the stored table, in simulated time
  (``benchmarks/replay.py``); its last line is
  ``ratio to random <x>, to optuna-hyperband <y>, utilization@8 <u8>, utilization@64 <u64>``.
"""

from __future__ import annotations

import math
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks._common import (
    Option,
    boolean,
    bounded_ratio,
    csv,
    csv_int,
    default_data_root,
    fmt,
    log,
    machine,
    mnist_available,
    parse_options,
    table,
)

GOAL = 1 / 3
METHODS = ("asha", "random", "pipeline")
# Per study, the values of the options left empty (the study file's where a key is absent).
PRESETS: dict[str, dict[str, Any]] = {
    "quickstart": {},
    "mnist_guided": {
        "channels": "8,16",
        "train_subset": 1000,
        "val_subset": 500,
        "screen_trials": 12,
        "screen_epochs": 3,
        "top_k": 2,
        "promote_epochs": 9,
        "first_rung": 1,
        "eta": 3,
        "startup_trials": 4,
    },
}
# option -> the study keys it sets
STUDY_KEYS: dict[str, tuple[str, ...]] = {
    "train_subset": ("data.train_subset",),
    "val_subset": ("data.val_subset",),
    "screen_trials": ("stages.screen.trials",),
    "screen_epochs": ("stages.screen.epochs",),
    "top_k": ("stages.promote.top_k",),
    "promote_epochs": ("stages.promote.epochs", "train.epochs"),
    "first_rung": ("search.pruner.min_resource",),
    "eta": ("search.pruner.reduction_factor",),
    "startup_trials": ("search.sampler.n_startup_trials",),
}


@dataclass
class Final:
    epochs: int  # the method's epochs when this full-budget value was measured
    value: float
    label: str  # which leg, e.g. "#3 3->9"


@dataclass
class Outcome:
    method: str
    seed: int
    finals: list[Final] = field(default_factory=list)
    epochs: int = 0  # all epochs the method trained, every leg counted once
    legs: int = 0
    configs: int = 0
    wall_s: float = 0.0

    def best_final(self, budget: int, maximize: bool) -> float | None:
        values = [f.value for f in self.finals if f.epochs <= budget and not math.isnan(f.value)]
        if not values:
            return None
        return max(values) if maximize else min(values)

    def to_target(self, target: float, maximize: bool) -> Final | None:
        for f in self.finals:
            if (f.value >= target) if maximize else (f.value <= target):
                return f
        return None


def epochs_used(trial: Any) -> int:
    """Epochs one leg trained: ``epochs_added`` for a rung leg (a continuation costs what it
    added, not its rung), else ``epochs_run`` less the rung it started from; plus the epoch whose
    training loss diverged, when one did."""
    attrs = trial.user_attrs
    if "epochs_added" in attrs:
        used = int(attrs["epochs_added"])
    else:
        used = max(0, int(attrs.get("epochs_run", 0)) - int(attrs.get("rung_from", 0)))
    # The trainer stops mid-epoch when the training loss diverges: that epoch is in no count
    # yet. A metric that became NaN was measured after its epoch, which epochs_run (and
    # epochs_added) already hold.
    if "training loss became" in str(attrs.get("fail_reason") or ""):
        used += 1
    return used


def reached_full_budget(trial: Any, full: int) -> bool:
    """A completed run whose value is measured at the long budget."""
    if trial.state.name != "COMPLETE" or trial.value is None:
        return False
    attrs = trial.user_attrs
    if "rung_to" in attrs:
        return int(attrs["rung_to"]) >= full
    return int(attrs.get("epochs_run", 0)) >= full


def leg_label(trial: Any, stage: str, method: str) -> str:
    attrs = trial.user_attrs
    if "rung_to" in attrs:
        config = attrs.get("config", trial.number)
        return f"#{config} {attrs.get('rung_from', 0)}->{attrs['rung_to']}"
    return f"{stage if method == 'pipeline' else method} #{trial.number}"


def record(outcome: Outcome, trial: Any, stage: str, full: int) -> None:
    """Add one finished leg to the method's timeline."""
    attrs = trial.user_attrs
    used = epochs_used(trial)
    outcome.epochs += used
    outcome.legs += 1
    new = "rung_from" not in attrs and "duplicate_of" not in attrs and stage != "promote"
    if new and (used or trial.state.name != "PRUNED"):
        outcome.configs += 1
    label = leg_label(trial, stage, outcome.method)
    if reached_full_budget(trial, full):
        outcome.finals.append(Final(outcome.epochs, float(trial.value), label))
    value = "-" if trial.value is None else f"{trial.value:.4f}"
    log(
        f"    [{outcome.method} seed {outcome.seed}] {label} {trial.state.name} {value} "
        f"({used} epochs, total {outcome.epochs})"
    )


def base_overrides(opts: dict[str, Any], name: str, folder: Path, seed: int) -> list[str]:
    return [
        *opts["overrides"],
        f"name={name}",
        f"storage=sqlite:///{folder / (name + '.db')}",
        f"runs_dir={folder / name}",
        f"train.seed={1000 * seed}",
        f"train.device={opts['device']}",
        "train.progress=false",
    ]


def _staged(
    opts: dict[str, Any],
    method: str,
    seed: int,
    folder: Path,
    extra: list[str],
    run: Callable[[Any, Any, Any, Callable[[str, int], None]], None],
) -> Outcome:
    """Run ``method``'s stages in this process, recording every leg as it finishes."""
    from search import TrialRunner, load_config, long_budget, open_studies, storage_url

    # A fixed name per method and seed (each has its own SQLite file), so a run repeats:
    # Optuna's Hyperband assigns trials to brackets by hashing the study name.
    name = f"eff-{method}-s{seed}"
    cfg = load_config(opts["study"], base_overrides(opts, name, folder, seed) + extra)
    full = long_budget(cfg)
    outcome = Outcome(method, seed)
    started = time.perf_counter()
    studies = open_studies(cfg, storage_url(cfg))
    runner = TrialRunner(cfg, device=opts["device"], progress=False)

    def on_trial(stage: str, number: int) -> None:
        trial = next(t for t in studies.of(stage).get_trials() if t.number == number)
        record(outcome, trial, stage, full)

    run(studies, runner, cfg, on_trial)
    outcome.wall_s = time.perf_counter() - started
    return outcome


def run_asha(opts: dict[str, Any], seed: int, folder: Path) -> Outcome:
    from search import run_stages

    # stage=promote: the rungs up to the long budget, then stop (no final stage).
    extra = ["search.pruner.name=asha", "stage=promote"]
    return _staged(opts, "asha", seed, folder, extra, run_stages)


def run_pipeline(opts: dict[str, Any], seed: int, folder: Path) -> Outcome:
    from search.stages import run_promote, run_screen

    def screen_then_promote(studies: Any, runner: Any, cfg: Any, on_trial: Any) -> None:
        run_screen(studies, runner, cfg, on_trial=on_trial)
        run_promote(studies, runner, cfg, on_trial=on_trial)

    extra = [f"search.pruner.name={opts['pipeline_pruner']}"]
    return _staged(opts, "pipeline", seed, folder, extra, screen_then_promote)


def run_random(opts: dict[str, Any], seed: int, folder: Path, limit: int) -> Outcome:
    import optuna

    from search import (
        TrialRunner,
        baseline_params,
        load_config,
        long_budget,
        open_studies,
        storage_url,
    )

    name = f"eff-random-s{seed}"
    full = long_budget(load_config(opts["study"], opts["overrides"]))
    overrides = base_overrides(opts, name, folder, seed) + [
        "search.sampler.name=random",
        "search.pruner.name=none",
        f"stages.screen.epochs={full}",
    ]
    cfg = load_config(opts["study"], overrides)
    outcome = Outcome("random", seed)
    started = time.perf_counter()
    study = open_studies(cfg, storage_url(cfg)).screen
    if opts["random_baseline"]:
        study.enqueue_trial(baseline_params(cfg), user_attrs={"baseline": "report"})
    runner = TrialRunner(cfg, device=opts["device"], progress=False)
    while outcome.epochs < limit:
        study.optimize(runner.screen, n_trials=1, catch=(Exception,), gc_after_trial=False)
        trial = study.get_trials(deepcopy=False)[-1]
        if trial.state == optuna.trial.TrialState.RUNNING:  # pragma: no cover - defensive
            break
        record(outcome, trial, "screen", full)
    outcome.wall_s = time.perf_counter() - started
    return outcome


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default), q in [0, 100]."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = (len(ordered) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _epochs_text(value: float | None, low: float | None) -> str:
    """Median epochs to target; ``>low`` where the median is a miss (``low``: the median with
    misses counted at their method's total epochs, a lower bound)."""
    if value is None or low is None:
        return "-"
    return f">{fmt(low)}" if math.isinf(value) else fmt(value)


MODES = ("train", "tabulate", "simulate")


def main() -> int:
    modes = [a for a in sys.argv[1:] if a.lstrip("-").startswith("mode=")]
    mode = modes[-1].split("=", 1)[1] if modes else "train"
    if mode not in MODES:
        raise SystemExit(f"error: mode: unknown value {mode!r}; allowed: {', '.join(MODES)}")
    sys.argv = [sys.argv[0], *(a for a in sys.argv[1:] if a not in modes)]
    if mode == "tabulate":
        from benchmarks.tabulate import main as tabulate

        return tabulate()
    if mode == "simulate":
        from benchmarks.replay import main as replay

        return replay()
    return train()


def _optional_int(text: str) -> int | None:
    return int(text) if text.strip() else None


def _methods(text: str) -> list[str]:
    names = csv(text)
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise ValueError(f"unknown method {unknown[0]!r}; allowed: {', '.join(METHODS)}")
    if "random" not in names or len(set(names)) < 2:
        raise ValueError("random and at least one of asha, pipeline")
    return list(dict.fromkeys(names))


def train() -> int:
    empty = "empty: preset, else study"
    opts = parse_options(
        "python -m benchmarks.search_efficiency",
        __doc__.split("\n\n")[0],
        {
            "study": Option(
                "mnist_guided", str, "study name or YAML path (presets: quickstart, mnist_guided)"
            ),
            "seeds": Option("0,1,2", csv_int, "seeds (train.seed = 1000 x seed)"),
            "methods": Option(
                "asha,random",
                _methods,
                "random and asha and/or pipeline; B = asha's epochs (else the pipeline's)",
            ),
            "channels": Option(
                "", str, f"channels searched, e.g. 8,16; the widest is the model's ({empty})"
            ),
            "train_subset": Option("", _optional_int, f"train images, 0 = all ({empty})"),
            "val_subset": Option("", _optional_int, f"validation images, 0 = all ({empty})"),
            "screen_trials": Option("", _optional_int, f"configurations asha starts ({empty})"),
            "first_rung": Option("", _optional_int, f"asha's first rung, epochs ({empty})"),
            "eta": Option("", _optional_int, f"reduction factor between rungs ({empty})"),
            "top_k": Option("", _optional_int, f"configurations to the long budget ({empty})"),
            "promote_epochs": Option(
                "", _optional_int, f"the long budget: asha's last rung, random runs ({empty})"
            ),
            "screen_epochs": Option(
                "",
                _optional_int,
                f"screen epochs: the pipeline's screen; asha's first rung may not exceed it ({empty})",
            ),
            "startup_trials": Option("", _optional_int, f"TPE random start-up trials ({empty})"),
            "pipeline_pruner": Option("hyperband", str, "the pipeline's screen pruner"),
            "random_budget": Option(
                2.0, float, "random search runs to this x B epochs (x the pipeline's, if more)"
            ),
            "random_baseline": Option(
                True,
                boolean,
                "give random search the report's configuration first, as the service gives "
                "asha and the pipeline (false: random draws only)",
            ),
            "target": Option(
                "p90", str, "a metric value, or pNN: that percentile of random full-budget values"
            ),
            "device": Option("auto", str, "training device"),
            "threads": Option(
                1, int, "torch CPU threads (epochs and metrics do not depend on it); 0 = default"
            ),
            "data_root": Option(default_data_root(), str, "folder holding MNIST/raw"),
            "extra": Option("", str, "more study overrides, space-separated key=value"),
            "keep": Option(False, boolean, "keep the temporary folder with the SQLite files"),
        },
        epilog="an empty option takes the study's preset (quickstart, mnist_guided: see the\n"
        "module docstring), else the study file's value\n\nexamples:\n  python -m benchmarks.search_efficiency\n"
        "  python -m benchmarks.search_efficiency study=quickstart\n"
        "  python -m benchmarks.search_efficiency methods=asha,random,pipeline seeds=0\n"
        "  python -m benchmarks.search_efficiency train_subset=2000 promote_epochs=27 "
        "screen_trials=27",
    )
    if not (opts["target"].startswith("p") or _is_float(opts["target"])):
        raise SystemExit("error: target: a number, or pNN (e.g. p90)")
    preset = PRESETS.get(Path(opts["study"]).stem, {})
    for key, value in preset.items():
        if opts[key] in (None, ""):
            opts[key] = value
    data_name = "mnist"
    overrides = [f"data.root={opts['data_root']}"]
    if opts["study"].startswith("mnist") and not mnist_available(opts["data_root"]):
        log(f"MNIST not found under {opts['data_root']}: using digits instead")
        overrides.append("data.name=digits")
        data_name = "digits"
    if opts["channels"]:
        # The study at reduced width: its own model too (the report's configuration, queued
        # first, and the baselines' untrained encoder), at the widest channel choice.
        widest = max(int(c) for c in csv(opts["channels"]))
        overrides += [
            f"search.space.channels.choices=[{opts['channels']}]",
            f"model.channels={widest}",
        ]
    for option, keys in STUDY_KEYS.items():
        if opts[option] is not None:
            overrides += [f"{key}={opts[option]}" for key in keys]
    overrides += opts["extra"].split()
    opts["overrides"] = overrides

    import optuna

    from search import long_budget
    from search.cli import config_from_args
    from search.config import direction_of, metric_of
    from search.naming import rung_ladder
    from search.sampling import startup_trials

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

    cfg = config_from_args([f"study={opts['study']}", *overrides])  # validate before running
    if opts["threads"]:
        import torch

        torch.set_num_threads(opts["threads"])
    metric, maximize = metric_of(cfg), direction_of(cfg) == "maximize"
    if cfg.data.name != "mnist":
        data_name = str(cfg.data.name)
    full = long_budget(cfg)
    if opts["device"] == "auto":
        from models.training import resolve_device

        opts["device"] = str(resolve_device("auto"))
    methods = [m for m in opts["methods"] if m != "random"]
    reference = "asha" if "asha" in methods else methods[0]
    runners = {"asha": run_asha, "pipeline": run_pipeline}
    folder = Path(tempfile.mkdtemp(prefix="ssl-bench-efficiency-"))  # one SQLite file per study
    started = time.perf_counter()
    results: list[dict[str, Outcome]] = []
    budgets: list[int] = []
    try:
        for seed in opts["seeds"]:
            outcomes: dict[str, Outcome] = {}
            for method in methods:
                log(f"\n== seed {seed}: {method}")
                outcomes[method] = runners[method](opts, seed, folder)
            budget = outcomes[reference].epochs
            limit = int(round(opts["random_budget"] * max(o.epochs for o in outcomes.values())))
            log(f"== seed {seed}: random search up to {limit} epochs")
            outcomes["random"] = run_random(opts, seed, folder, limit)
            results.append(outcomes)
            budgets.append(budget)
    finally:
        if opts["keep"]:
            log(f"kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)

    if opts["target"].startswith("p"):
        q = float(opts["target"][1:])
        pool = [f.value for r in results for f in r["random"].finals if not math.isnan(f.value)]
        target = percentile(pool, q if maximize else 100 - q) if pool else float("nan")
        target_rule = (
            f"{opts['target']} of the {len(pool)} full-budget values of random search (all seeds)"
        )
    else:
        target = float(opts["target"])
        target_rule = "fixed"

    order = [*methods, "random"]
    to_target: dict[str, list[float]] = {m: [] for m in order}  # a miss: inf
    at_totals: dict[str, list[float]] = {m: [] for m in order}  # a miss: the method's epochs
    best_at_b: dict[str, list[float]] = {m: [] for m in order}
    rows = []
    for outcomes, budget in zip(results, budgets, strict=True):
        hits = {m: outcomes[m].to_target(target, maximize) for m in order}
        for m in order:
            o, hit = outcomes[m], hits[m]
            to_target[m].append(float(hit.epochs) if hit else math.inf)
            at_totals[m].append(float(hit.epochs if hit else o.epochs))
            best = o.best_final(budget, maximize)
            if best is not None:
                best_at_b[m].append(best)
            ratio = "-"
            if m != "random":
                r_hit = hits["random"]
                if hit and r_hit:
                    ratio = f"{hit.epochs / r_hit.epochs:.2f}"
                elif hit or r_hit:  # a miss counted at the method's total epochs: a bound
                    mine = hit.epochs if hit else o.epochs
                    theirs = r_hit.epochs if r_hit else outcomes["random"].epochs
                    ratio = f"{'<' if hit else '>'}{mine / theirs:.2f}"
            rows.append(
                [
                    o.seed,
                    m,
                    budget,
                    o.epochs,
                    f"{o.configs} / {o.legs}",
                    fmt(best, 4),
                    fmt(o.best_final(o.epochs, maximize), 4),
                    f"{hit.epochs} ({hit.label})" if hit else f">{o.epochs}",
                    ratio,
                    f"{o.wall_s:.0f}",
                ]
            )

    ladder = rung_ladder(
        config_from_args([f"study={opts['study']}", *overrides, "search.pruner.name=asha"])
    )
    print(
        f"\nsearch efficiency on {opts['study']} ({cfg.task} on {data_name}, metric {metric}, "
        f"{'maximized' if maximize else 'minimized'}); channels "
        f"{{{opts['channels'] or ','.join(str(c) for c in cfg.search.space.channels.choices)}}}, "
        f"{cfg.data.train_subset or 'all'} train / {cfg.data.val_subset or 'all'} val images; "
        f"long budget {full} epochs"
    )
    if "asha" in methods:
        tpe_startup = startup_trials(
            cfg.search.sampler.n_startup_trials, ladder, int(cfg.search.pruner.reduction_factor)
        )
        print(
            f"asha: rungs {', '.join(map(str, ladder))} (eta {cfg.search.pruner.reduction_factor}), "
            f"{cfg.stages.screen.trials} configurations (TPE, "
            f"{tpe_startup} start-up trials, report's config first), "
            f"top {cfg.stages.promote.top_k} to the long budget, continued from rung checkpoints"
        )
    if "pipeline" in methods:
        print(
            f"pipeline: screen {cfg.stages.screen.trials} trials x <= {cfg.stages.screen.epochs} "
            f"epochs ({opts['pipeline_pruner']} pruning), barrier, top {cfg.stages.promote.top_k} "
            f"retrained from scratch to {full} epochs"
        )
    print(
        f"random: RandomSampler, no pruning, {full} epochs per configuration, up to "
        f"{opts['random_budget']:g} x B epochs"
        + (" (x the pipeline's, if more)" if "pipeline" in methods else "")
        + (", report's config first" if opts["random_baseline"] else "")
    )
    print(f"B: {reference}'s total epochs in the seed; epochs count each leg's added epochs")
    print(f"target: {metric} {'>=' if maximize else '<='} {target:.4f} ({target_rule})")
    print(f"machine: {machine()}")
    print(
        table(
            [
                "seed",
                "method",
                "B",
                "epochs spent",
                "configs / legs",
                "best full-budget @B",
                "best full-budget (all)",
                "epochs to target",
                "ratio to random",
                "wall s",
            ],
            rows,
        )
    )
    med = {m: statistics.median(to_target[m]) for m in order}
    low = {m: statistics.median(at_totals[m]) for m in order}

    def ratio(m: str) -> str:
        return bounded_ratio(med[m], med["random"], low[m], low["random"])

    summary = [
        [
            m,
            f"{sum(1 for e in to_target[m] if not math.isinf(e))}/{len(results)}",
            fmt(_median(best_at_b[m]), 4),
            _epochs_text(med[m], low[m]),
            "-" if m == "random" else ratio(m),
            fmt(_median([float(r[m].epochs) for r in results])),
            fmt(_median([r[m].wall_s for r in results])),
        ]
        for m in order
    ]
    print(
        f"\nmedians over {len(results)} seed(s) (a seed that missed the target counts as "
        "infinite; a median that is a miss shows >N, N the median with misses counted at the "
        "method's total epochs):"
    )
    print(
        table(
            [
                "method",
                "reached target",
                "best full-budget @B",
                "epochs to target",
                "ratio to random",
                "epochs spent",
                "wall s",
            ],
            summary,
        )
    )
    a, r = reference, "random"
    print(
        f"{a} / random, median epochs to target: {_epochs_text(med[a], low[a])} / "
        f"{_epochs_text(med[r], low[r])} = {ratio(a)} (goal <= {GOAL:.2f}); median best "
        f"full-budget @B: {fmt(_median(best_at_b[a]), 4)} / {fmt(_median(best_at_b[r]), 4)}"
    )
    print(f"total time {time.perf_counter() - started:.0f}s")
    return 0


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


if __name__ == "__main__":
    raise SystemExit(main())
