"""Search efficiency: the project's screen -> promote pipeline against plain random search.

On a CPU-sized problem (default: ``studies/mnist_guided.yaml`` at width 8-16 on a 1,000-image
MNIST subset, scaled-down stages), for each seed:

pipeline
    the project's method, run in this process through ``search.stages``: the screen stage
    (TPE sampler, the report's configuration enqueued first, Hyperband pruning per epoch), then
    the promote stage (the top-k screen configurations re-trained for the full budget).
random search
    ``RandomSampler`` without pruning, every configuration trained for the full budget (the
    promote length), on the same objective, until it has used ``random_budget`` times the
    pipeline's epochs.

Epochs are counted from the trials' user attrs (``epochs_run``; a promoted trial counts its whole
re-run; a diverged trial counts the epoch that diverged) in the order the trials ran. Compared:

- the best validation metric reached within the pipeline's total epoch budget B (any epoch of any
  trial), and the best *final* value of a full-length run (the pipeline's promoted trials);
- the epochs each method needed before some trial's validation metric first reached the target.
  The target is fixed before anything runs: ``target=<value>``, or by default the 90th
  percentile of the final values of all random-search trials (pooled over seeds), i.e. "as good
  as the best 1 in 10 configurations random search trains in full".

Goal: pipeline epochs-to-target / random epochs-to-target <= 1/3.

Modes (the first argument ``mode=...``; each takes its own options, see ``--help``):

- ``mode=train`` (default): the above, training for real.
- ``mode=tabulate``: make the table of real learning curves (``benchmarks/tabulate.py``).
- ``mode=simulate``: replay random search, plain Optuna (TPE + Hyperband), the previous
  pipeline and the new scheduler on the stored table, in simulated time
  (``benchmarks/replay.py``); its last line is
  ``ratio to random <x>, to optuna-hyperband <y>, utilization@8 <u8>, utilization@64 <u64>``.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks._common import (
    Option,
    boolean,
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


@dataclass
class Event:
    epochs: int  # cumulative epochs of the method when this value was measured
    value: float
    label: str  # which trial, e.g. "screen #3"


@dataclass
class Outcome:
    method: str
    seed: int
    events: list[Event] = field(default_factory=list)
    finals: list[tuple[int, float]] = field(default_factory=list)  # (cum. epochs, final value)
    epochs: int = 0
    trials: int = 0
    wall_s: float = 0.0

    def best(self, budget: int, maximize: bool) -> float | None:
        values = [e.value for e in self.events if e.epochs <= budget]
        if not values:
            return None
        return max(values) if maximize else min(values)

    def best_final(self, budget: int, maximize: bool) -> float | None:
        values = [v for c, v in self.finals if c <= budget]
        if not values:
            return None
        return max(values) if maximize else min(values)

    def to_target(self, target: float, maximize: bool) -> Event | None:
        for e in self.events:
            if (e.value >= target) if maximize else (e.value <= target):
                return e
        return None


def epochs_used(trial: Any) -> int:
    """Epochs a trial trained: ``epochs_run``, plus the epoch that diverged when it did."""
    used = int(trial.user_attrs.get("epochs_run", 0))
    reason = str(trial.user_attrs.get("fail_reason") or "")
    if "NonFiniteLossError" in reason or "training loss became" in reason:
        used += 1
    return used


def record(outcome: Outcome, trial: Any, label: str, metric: str, full_length: int) -> None:
    """Append a finished trial's per-epoch values to the method's timeline."""
    from search import learning_curve

    start = outcome.epochs
    for c in learning_curve(trial.user_attrs):
        if c["phase"] == "pretrain" and metric in c["metrics"]:
            outcome.events.append(
                Event(start + int(c["epoch"]), float(c["metrics"][metric]), label)
            )
    used = epochs_used(trial)
    outcome.epochs = start + used
    outcome.trials += 1
    if trial.value is not None and used >= full_length and trial.state.name == "COMPLETE":
        outcome.finals.append((outcome.epochs, float(trial.value)))
    log(
        f"    [{outcome.method} seed {outcome.seed}] {label} {trial.state.name} "
        f"{'-' if trial.value is None else f'{trial.value:.4f}'} "
        f"({used} epochs, total {outcome.epochs})"
    )


def base_overrides(opts: dict[str, Any], name: str, folder: Path, seed: int) -> list[str]:
    return [
        *opts["overrides"],
        f"name={name}",
        f"storage=sqlite:///{folder / (name + '.db')}",
        f"runs_dir={folder / name}",
        f"train.seed={seed}",
        f"train.device={opts['device']}",
        "train.progress=false",
    ]


def run_pipeline(opts: dict[str, Any], seed: int, folder: Path) -> Outcome:
    from search import TrialRunner, load_config, long_budget, metric_of, open_studies, storage_url
    from search.stages import run_promote, run_screen

    # A fixed name (each study has its own SQLite file): Hyperband assigns trials to brackets
    # by hashing the study name with the trial number, so the name changes which trials prune.
    name = f"eff-pipeline-s{seed}"
    cfg = load_config(opts["study"], base_overrides(opts, name, folder, 1000 * seed))
    metric = metric_of(cfg)
    full = long_budget(cfg)
    outcome = Outcome("pipeline", seed)
    started = time.perf_counter()
    studies = open_studies(cfg, storage_url(cfg))
    runner = TrialRunner(cfg, device=opts["device"], progress=False)

    def on_trial(stage: str, number: int) -> None:
        trial = next(t for t in studies.of(stage).get_trials() if t.number == number)
        record(outcome, trial, f"{stage} #{number}", metric, full)

    run_screen(studies, runner, cfg, on_trial=on_trial)
    run_promote(studies, runner, cfg, on_trial=on_trial)
    outcome.wall_s = time.perf_counter() - started
    return outcome


def run_random(opts: dict[str, Any], seed: int, folder: Path, limit: int) -> Outcome:
    import optuna

    from search import (
        TrialRunner,
        baseline_params,
        load_config,
        long_budget,
        metric_of,
        open_studies,
        storage_url,
    )

    name = f"eff-random-s{seed}"
    probe = load_config(opts["study"], opts["overrides"])
    full = long_budget(probe)
    overrides = base_overrides(opts, name, folder, 1000 * seed) + [
        "search.sampler.name=random",
        "search.pruner.name=none",
        f"stages.screen.epochs={full}",
    ]
    cfg = load_config(opts["study"], overrides)
    metric = metric_of(cfg)
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
        record(outcome, trial, f"random #{trial.number}", metric, full)
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


def train() -> int:
    opts = parse_options(
        "python -m benchmarks.search_efficiency",
        __doc__.split("\n\n")[0],
        {
            "seeds": Option("0,1,2", csv_int, "seeds (train.seed = 1000 x seed)"),
            "study": Option("mnist_guided", str, "study name or YAML path"),
            "channels": Option("8,16", str, "channel choices searched (the space's channels)"),
            "train_subset": Option(1000, int, "train images (MNIST subset)"),
            "val_subset": Option(500, int, "validation images"),
            "screen_trials": Option(10, int, "screen stage trials"),
            "screen_epochs": Option(3, int, "screen stage epochs per trial (pruned)"),
            "top_k": Option(2, int, "configurations promoted"),
            "promote_epochs": Option(6, int, "full budget: promoted runs and random-search runs"),
            "startup_trials": Option(4, int, "TPE random start-up trials"),
            "random_budget": Option(
                2.0, float, "random search runs until this many times the pipeline's epochs"
            ),
            "random_baseline": Option(
                False, boolean, "give random search the report's configuration first, too"
            ),
            "target": Option(
                "p90", str, "a metric value, or pNN: that percentile of random final values"
            ),
            "device": Option("auto", str, "training device"),
            "threads": Option(
                1, int, "torch CPU threads (epochs and metrics do not depend on it); 0 = default"
            ),
            "data_root": Option(default_data_root(), str, "folder holding MNIST/raw"),
            "extra": Option("", str, "more study overrides, space-separated key=value"),
            "keep": Option(False, boolean, "keep the temporary folder with the SQLite files"),
        },
        epilog="examples:\n  python -m benchmarks.search_efficiency\n"
        "  python -m benchmarks.search_efficiency seeds=0,1,2,3,4 screen_trials=20\n"
        "  python -m benchmarks.search_efficiency study=quickstart channels= train_subset=0 "
        "val_subset=0 screen_trials=12 screen_epochs=4 promote_epochs=8 startup_trials=6",
    )
    if not (opts["target"].startswith("p") or _is_float(opts["target"])):
        raise SystemExit("error: target: a number, or pNN (e.g. p90)")
    data_name = "mnist"
    overrides = [f"data.root={opts['data_root']}"]
    if opts["study"].startswith("mnist") and not mnist_available(opts["data_root"]):
        log(f"MNIST not found under {opts['data_root']}: using digits instead")
        overrides.append("data.name=digits")
        data_name = "digits"
    if opts["channels"]:
        overrides.append(f"search.space.channels.choices=[{opts['channels']}]")
    if opts["train_subset"]:
        overrides.append(f"data.train_subset={opts['train_subset']}")
    if opts["val_subset"]:
        overrides.append(f"data.val_subset={opts['val_subset']}")
    overrides += [
        f"stages.screen.trials={opts['screen_trials']}",
        f"stages.screen.epochs={opts['screen_epochs']}",
        f"stages.promote.top_k={opts['top_k']}",
        f"stages.promote.epochs={opts['promote_epochs']}",
        f"train.epochs={opts['promote_epochs']}",
        f"search.sampler.n_startup_trials={opts['startup_trials']}",
        *opts["extra"].split(),
    ]
    opts["overrides"] = overrides

    import optuna

    from search.cli import config_from_args
    from search.config import direction_of, metric_of

    optuna.logging.set_verbosity(optuna.logging.WARNING)

    cfg = config_from_args([f"study={opts['study']}", *overrides])  # validate before running
    if opts["threads"]:
        import torch

        torch.set_num_threads(opts["threads"])
    metric, maximize = metric_of(cfg), direction_of(cfg) == "maximize"
    if opts["device"] == "auto":
        from models.training import resolve_device

        opts["device"] = str(resolve_device("auto"))
    folder = Path(tempfile.mkdtemp(prefix="ssl-bench-efficiency-"))  # one SQLite file per study
    started = time.perf_counter()
    results: list[tuple[Outcome, Outcome, int]] = []
    try:
        for seed in opts["seeds"]:
            log(f"\n== seed {seed}: pipeline")
            pipe = run_pipeline(opts, seed, folder)
            limit = int(round(opts["random_budget"] * pipe.epochs))
            log(f"== seed {seed}: random search up to {limit} epochs")
            rand = run_random(opts, seed, folder, limit)
            results.append((pipe, rand, pipe.epochs))
    finally:
        if opts["keep"]:
            log(f"kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)

    if opts["target"].startswith("p"):
        q = float(opts["target"][1:])
        pool = [v for _, r, _ in results for _, v in r.finals]
        if not maximize:
            q = 100 - q
        target = percentile(pool, q) if pool else float("nan")
        target_rule = (
            f"{opts['target']} of the {len(pool)} final values of full-length random-search "
            f"runs (all seeds)"
        )
    else:
        target = float(opts["target"])
        target_rule = "fixed"

    rows = []
    both: list[tuple[int, int]] = []  # seeds where both methods reached the target
    bounded: list[tuple[int, int]] = []  # seeds where at least one did (misses at their totals)
    for pipe, rand, budget in results:
        hit_p = pipe.to_target(target, maximize)
        hit_r = rand.to_target(target, maximize)
        shown_p = f"{hit_p.epochs} ({hit_p.label})" if hit_p else f">{pipe.epochs}"
        shown_r = f"{hit_r.epochs} ({hit_r.label})" if hit_r else f">{rand.epochs}"
        ep_p = hit_p.epochs if hit_p else pipe.epochs
        ep_r = hit_r.epochs if hit_r else rand.epochs
        if hit_p and hit_r:
            both.append((ep_p, ep_r))
            ratio = f"{ep_p / ep_r:.2f}"
        elif hit_p or hit_r:
            bounded.append((ep_p, ep_r))
            # A miss is counted at the method's total epochs: the true ratio is below (random
            # missed) or above (pipeline missed) the one shown.
            ratio = f"{'<' if hit_p else '>'}{ep_p / ep_r:.2f}"
        else:
            ratio = "- (neither)"
        rows.append(
            [
                pipe.seed,
                budget,
                f"{pipe.trials} / {rand.trials}",
                fmt(pipe.best(budget, maximize), 4),
                fmt(rand.best(budget, maximize), 4),
                fmt(pipe.best_final(budget, maximize), 4),
                fmt(rand.best_final(budget, maximize), 4),
                shown_p,
                shown_r,
                ratio,
                f"{pipe.wall_s:.0f} / {rand.wall_s:.0f}",
            ]
        )

    def summed(pairs: list[tuple[int, int]]) -> str:
        p, r = sum(a for a, _ in pairs), sum(b for _, b in pairs)
        return f"pipeline {p} / random {r} = {p / r:.2f}" if r else "-"

    print(
        f"\nsearch efficiency on {opts['study']} ({cfg.task} on {data_name}, metric {metric}, "
        f"{'maximized' if maximize else 'minimized'}); channels {{{opts['channels'] or 'study'}}}, "
        f"{opts['train_subset'] or 'all'} train / {opts['val_subset'] or 'all'} val images"
    )
    print(
        f"pipeline: screen {opts['screen_trials']} trials x <= {opts['screen_epochs']} epochs "
        f"(TPE, {opts['startup_trials']} start-up trials, report's config first, "
        f"{cfg.search.pruner.name} pruning), promote top {opts['top_k']} x "
        f"{opts['promote_epochs']} epochs; random: RandomSampler, no pruning, "
        f"{opts['promote_epochs']} epochs per trial, up to {opts['random_budget']:g} x B epochs"
        + (", report's config first" if opts["random_baseline"] else "")
    )
    print(f"target: {metric} {'>=' if maximize else '<='} {target:.4f} ({target_rule})")
    print(f"machine: {machine()}")
    print(
        table(
            [
                "seed",
                "budget B (pipeline epochs)",
                "trials pipeline / random",
                "best @B pipeline",
                "best @B random",
                "best full run @B pipeline",
                "best full run @B random",
                "epochs to target pipeline",
                "epochs to target random",
                "ratio",
                "wall s pipeline / random",
            ],
            rows,
        )
    )
    means = [(pipe.best(b, maximize), rand.best(b, maximize)) for pipe, rand, b in results]
    if all(p is not None and r is not None for p, r in means):
        print(
            f"best @B, mean over seeds: pipeline {sum(p for p, _ in means) / len(means):.4f}, "
            f"random {sum(r for _, r in means) / len(means):.4f}"
        )
    print(
        f"epochs to target, summed over the {len(both)} seeds where both reached it: "
        f"{summed(both)} (goal <= {GOAL:.2f})"
    )
    if bounded:
        print(
            f"  with the {len(bounded)} seeds where only one reached it (the miss counted at its "
            f"total epochs, so a bound): {summed(both + bounded)}"
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
