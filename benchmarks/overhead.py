"""Service overhead per trial: the seconds a trial spends outside training, as a fraction.

Runs ``python -m search.run`` (the real CLI, as a user would) with 1-epoch MNIST guided trials at
narrow width on a train subset, against SQLite and PostgreSQL with 1 and 4 workers, then reads
every trial back from storage:

- trial time: Optuna's ``datetime_complete - datetime_start``;
- training: the epoch work recorded in the trial's ``curve`` (``seconds`` + ``eval_seconds`` of
  each epoch: the training batches and the validation metrics);
- in-trial overhead = trial time - training, split into checkpoint writes (``checkpoint_seconds``),
  artifacts (``artifact_seconds``, when recorded), the rest inside the objective (building the
  ``Run``, per-epoch storage writes, pruning checks: ``wall_time_s`` minus the above) and what
  Optuna does around the objective (sampling, trial start/finish, ``trial - wall_time_s``);
- start-up: launch of the command to each worker's first trial start, shown as is and amortized
  over the trials (worker-seconds per trial);
- end-to-end: 1 - training / (workers x command wall time): everything else, including start-up,
  gaps between trials, the tail where some workers wait for the last trial, and the summary.

The study is ``studies/mnist_guided.yaml`` with its search space narrowed to parameters that do not
change the work per trial (learning rate, dropout, weight decay), so all trials are the same size.
Each configuration gets a unique study name and a temporary runs folder; PostgreSQL studies are
deleted afterwards.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from benchmarks._common import (
    REPO_ROOT,
    Option,
    boolean,
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
from search.database import STORAGE_ENV

DEFAULT_POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
GOAL = 0.02
KEEP_PARAMS = ("adam_lr", "classifier_dropout", "weight_decay")


@dataclass
class Trial:
    wall: float  # Optuna's datetime_complete - datetime_start
    train: float  # epoch work: sum of the curve's seconds + eval_seconds
    checkpoint: float
    artifacts: float
    objective_rest: float  # inside wall_time_s, not training or checkpoints
    outside_objective: float  # trial wall - wall_time_s - artifacts
    first: bool = False  # the first trial of its worker process


@dataclass
class Result:
    storage: str
    workers: int
    command: list[str]
    wall_s: float
    trials: list[Trial] = field(default_factory=list)
    failed: int = 0
    startup_s: list[float] = field(default_factory=list)  # one per worker
    gaps_s: list[float] = field(default_factory=list)  # between a worker's consecutive trials
    error: str = ""

    def overhead_fraction(self, steady: bool = False) -> float | None:
        trials = [t for t in self.trials if not (steady and t.first)]
        total = sum(t.wall for t in trials)
        return (total - sum(t.train for t in trials)) / total if total else None

    @property
    def end_to_end_fraction(self) -> float | None:
        capacity = self.workers * self.wall_s
        return 1.0 - sum(t.train for t in self.trials) / capacity if capacity else None

    def mean(self, attr: str) -> float | None:
        return mean([getattr(t, attr) for t in self.trials])


def write_study(folder: Path, channels: int) -> Path:
    """studies/mnist_guided.yaml at ``channels`` width, searching only work-neutral parameters."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(REPO_ROOT / "studies" / "mnist_guided.yaml")
    space = {k: v for k, v in cfg.search.space.items() if k in KEEP_PARAMS}
    if "when" in space.get("adam_lr", {}):
        space["adam_lr"].pop("when")  # the optimizer is fixed to adam (the study's own)
    cfg.search.space = space
    cfg.model.channels = channels
    cfg.description = "benchmarks.overhead: mnist_guided, work-neutral search space"
    path = folder / "mnist_guided_overhead.yaml"
    OmegaConf.save(cfg, path)
    return path


def child_env(opts: dict[str, Any]) -> dict[str, str]:
    """The command's environment; ``threads=N`` sets OMP_NUM_THREADS for a 1-worker run (with
    several workers search.run sets it per worker: CPU cores / workers)."""
    env = dict(os.environ)
    if opts["threads"]:
        env["OMP_NUM_THREADS"] = str(opts["threads"])
    return env


def _local(dt: datetime) -> datetime:
    """Optuna stores naive local datetimes; make them comparable with an aware 'now'."""
    return dt.astimezone()


def analyse(result: Result, url: str, name: str, launch: datetime) -> None:
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    from search import learning_curve, stage_study_name

    study = optuna.load_study(study_name=stage_study_name(name, "screen"), storage=url)
    by_worker: dict[str, list[tuple[datetime, datetime, Trial]]] = {}
    for t in study.get_trials(deepcopy=False):
        curve = learning_curve(t.user_attrs)
        if t.state not in (TrialState.COMPLETE, TrialState.PRUNED) or not curve:
            result.failed += 1
            continue
        start, complete = _local(t.datetime_start), _local(t.datetime_complete)
        wall = (complete - start).total_seconds()
        train = sum(c["seconds"] + c["eval_seconds"] for c in curve)
        ckpt = sum(c.get("checkpoint_seconds", 0.0) for c in curve)
        artifacts = float(t.user_attrs.get("artifact_seconds", 0.0))
        inside = float(t.user_attrs.get("wall_time_s", train + ckpt))
        trial = Trial(
            wall=wall,
            train=train,
            checkpoint=ckpt,
            artifacts=artifacts,
            objective_rest=max(inside - train - ckpt, 0.0),
            outside_objective=wall - inside - artifacts,
        )
        result.trials.append(trial)
        worker = str(t.user_attrs.get("worker", "?"))
        by_worker.setdefault(worker, []).append((start, complete, trial))
    if "?" in by_worker:  # no worker attr: take the earliest starts as each worker's first
        spans = sorted(by_worker["?"], key=lambda s: s[0])[: result.workers]
        result.startup_s = [(s - launch).total_seconds() for s, _, _ in spans]
        for _, _, trial in spans:
            trial.first = True
        return
    for spans in by_worker.values():
        spans.sort(key=lambda s: s[0])
        spans[0][2].first = True
        result.startup_s.append((spans[0][0] - launch).total_seconds())
        result.gaps_s += [
            (nxt[0] - prev[1]).total_seconds() for prev, nxt in zip(spans, spans[1:], strict=False)
        ]


def cleanup_postgres(url: str, name: str) -> None:
    from search import delete_stage_studies

    delete_stage_studies(name, url)


def run_config(storage: str, workers: int, opts: dict[str, Any]) -> Result:
    folder = Path(tempfile.mkdtemp(prefix="ssl-bench-overhead-"))
    name = f"bench-overhead-{storage}-w{workers}-{uuid.uuid4().hex[:8]}"
    url = f"sqlite:///{folder / 'overhead.db'}" if storage == "sqlite" else opts["postgres"]
    study = write_study(folder, opts["channels"])
    trials = opts["trials_per_worker"] * workers
    cmd = [
        sys.executable,
        "-m",
        "search.run",
        f"study={study}",
        f"data.root={opts['data_root']}",
        f"data.train_subset={opts['train_subset']}",
        f"data.val_subset={opts['val_subset']}",
        f"stages.screen.trials={trials}",
        "stages.screen.epochs=1",
        "stage=screen",
        f"workers={workers}",
        "devices=cpu",
        # The URL (maybe with a password) travels in the environment, not on the command line.
        "storage=${oc.env:" + STORAGE_ENV + "}",
        f"name={name}",
        f"runs_dir={folder}",
        "--no-progress",
    ]
    log(f"\n== {storage}, {workers} worker(s), {trials} trials: {' '.join(cmd[1:])}")
    launch = datetime.now().astimezone()
    started = time.perf_counter()
    sink = subprocess.DEVNULL if opts["quiet"] else sys.stderr
    env = dict(child_env(opts), **{STORAGE_ENV: url})
    proc = subprocess.run(cmd, cwd=REPO_ROOT, stdout=sink, stderr=sink, env=env)
    wall = time.perf_counter() - started
    result = Result(storage, workers, cmd, wall)  # cmd holds no password (see above)
    try:
        if proc.returncode != 0:
            result.error = f"search.run exited with code {proc.returncode}"
        analyse(result, url, name, launch)
    except Exception as error:  # a failed configuration is reported, the others still run
        result.error = result.error or f"{type(error).__name__}: {error}"
    finally:
        if storage == "postgres" and not opts["keep"]:
            try:
                cleanup_postgres(url, name)
            except Exception as error:
                log(f"warning: could not delete the PostgreSQL studies {name}.*: {error}")
        if opts["keep"]:
            log(f"kept {folder} (study {name})")
        else:
            shutil.rmtree(folder, ignore_errors=True)
    return result


PROFILE_TARGETS = [
    # (label, file suffix or "~" for builtins, function name)
    ("whole trials (optuna _run_trial)", "optuna/study/_optimize.py", "_run_trial"),
    ("  epoch work (Run.pretrain)", "models/training.py", "pretrain"),
    ("  data loading (load_splits)", "models/data.py", "load_splits"),
    ("  Run.__init__", "models/training.py", "__init__"),
    ("  checkpoint writes", "models/checkpoints.py", "save_checkpoint"),
    ("  artifacts (figures + upload)", "reporting/artifacts.py", "hook"),
    ("  trial.set_user_attr", "optuna/trial/_trial.py", "set_user_attr"),
    ("  trial.report + should_prune", "optuna/trial/_trial.py", "report|should_prune"),
    ("  study.ask (sampling)", "optuna/study/study.py", "ask"),
    ("  tell (finish the trial)", "optuna/study/_tell.py", "_tell_with_warning"),
    ("gc.collect (all calls)", "~", "<built-in method gc.collect>"),
]


def profile_table(path: Path, trials: int) -> list[list[str]]:
    """Cumulative seconds per trial of the functions above, from a cProfile dump."""
    import pstats

    stats = pstats.Stats(str(path)).stats  # (file, line, name) -> (cc, nc, tt, ct, callers)
    rows = []
    for label, suffix, names in PROFILE_TARGETS:
        wanted = set(names.split("|"))
        total, calls = 0.0, 0
        for (file, _line, name), (_cc, nc, _tt, ct, _callers) in stats.items():
            if name in wanted and (file == suffix if suffix == "~" else file.endswith(suffix)):
                total += ct
                calls += nc
        rows.append([label, calls, fmt(total, 2), fmt(total / max(trials, 1), 3)])
    return rows


def run_profiled(opts: dict[str, Any]) -> tuple[list[list[str]], int]:
    """One extra sqlite, 1-worker run under cProfile (not part of the timing table)."""
    folder = Path(tempfile.mkdtemp(prefix="ssl-bench-overhead-prof-"))
    name = f"bench-overhead-profile-{uuid.uuid4().hex[:8]}"
    study = write_study(folder, opts["channels"])
    trials = opts["trials_per_worker"]
    dump = folder / "search.prof"
    cmd = [
        sys.executable,
        "-m",
        "cProfile",
        "-o",
        str(dump),
        "-m",
        "search.run",
        f"study={study}",
        f"data.root={opts['data_root']}",
        f"data.train_subset={opts['train_subset']}",
        f"data.val_subset={opts['val_subset']}",
        f"stages.screen.trials={trials}",
        "stages.screen.epochs=1",
        "stage=screen",
        "workers=1",
        "devices=cpu",
        f"storage=sqlite:///{folder / 'overhead.db'}",
        f"name={name}",
        f"runs_dir={folder}",
        "--no-progress",
    ]
    log(f"\n== profiled: {' '.join(cmd[1:])}")
    sink = subprocess.DEVNULL if opts["quiet"] else sys.stderr
    subprocess.run(cmd, cwd=REPO_ROOT, stdout=sink, stderr=sink, check=True, env=child_env(opts))
    try:
        return profile_table(dump, trials), trials
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def pct(value: float | None) -> str:
    return "-" if value is None or value != value else f"{value * 100:.2f}%"


def main() -> int:
    opts = parse_options(
        "python -m benchmarks.overhead",
        __doc__.split("\n\n")[0],
        {
            "storages": Option("sqlite,postgres", csv, "sqlite and/or postgres"),
            "workers": Option("1,4", csv_int, "worker counts to measure"),
            "trials_per_worker": Option(3, int, "1-epoch trials per worker"),
            "train_subset": Option(
                20000, int, "MNIST train images per epoch (trial length: ~10-20 s, 1 worker)"
            ),
            "val_subset": Option(2000, int, "validation images evaluated per epoch"),
            "channels": Option(8, int, "network width"),
            "threads": Option(0, int, "OMP_NUM_THREADS of the command; 0 = inherit"),
            "postgres": Option(
                DEFAULT_POSTGRES, str, "PostgreSQL URL (a unique study name is used)"
            ),
            "data_root": Option(default_data_root(), str, "folder holding MNIST/raw"),
            "profile": Option(
                False, boolean, "also run sqlite x1 under cProfile and print where time goes"
            ),
            "keep": Option(False, boolean, "keep the temporary runs folders and studies"),
            "quiet": Option(False, boolean, "hide the search.run output"),
        },
        epilog="examples:\n  python -m benchmarks.overhead\n"
        "  python -m benchmarks.overhead storages=sqlite workers=1 trials_per_worker=2",
    )
    for s in opts["storages"]:
        if s not in ("sqlite", "postgres"):
            raise SystemExit(f"error: storages: unknown {s!r}; allowed: sqlite, postgres")
    if not mnist_available(opts["data_root"]):
        raise SystemExit(f"error: data_root: MNIST not found under {opts['data_root']}/MNIST/raw")
    started = time.perf_counter()
    results = [run_config(s, w, opts) for s in opts["storages"] for w in opts["workers"]]

    rows, detail, errors = [], [], []
    for r in results:
        if r.error:
            errors.append(f"{r.storage} x{r.workers}: {r.error}")
        n = max(len(r.trials), 1)
        trial, train = r.mean("wall"), r.mean("train")
        amortized = sum(r.startup_s) / n if r.startup_s else None
        overhead = r.overhead_fraction()
        rows.append(
            [
                r.storage,
                r.workers,
                f"{len(r.trials)}" + (f" (+{r.failed} failed)" if r.failed else ""),
                fmt(trial, 1),
                fmt(train, 1),
                fmt(trial - train, 2) if trial is not None else "-",
                pct(overhead),
                pct(r.overhead_fraction(steady=True)),
                "yes" if overhead is not None and overhead <= GOAL else "no",
                fmt(mean(r.startup_s), 1),
                f"{fmt(amortized, 2)} ({pct(amortized / trial if amortized and trial else None)})",
                fmt(mean(r.gaps_s), 2) if r.gaps_s else "-",
                pct(r.end_to_end_fraction),
                fmt(r.wall_s, 0),
            ]
        )
        firsts = [t for t in r.trials if t.first]
        detail.append(
            [
                r.storage,
                r.workers,
                fmt(r.mean("checkpoint"), 3),
                fmt(r.mean("artifacts"), 3),
                fmt(r.mean("objective_rest"), 3),
                fmt(mean([t.objective_rest for t in r.trials if not t.first]), 3),
                fmt(r.mean("outside_objective"), 3),
                fmt(mean([t.wall - t.train for t in firsts]), 2),
            ]
        )
    print(
        f"\nper-trial overhead of 1-epoch MNIST guided trials (width {opts['channels']}, "
        f"{opts['train_subset']} train / {opts['val_subset']} val images, batch 32)"
    )
    print(f"machine: {machine()}")
    threads = f"OMP_NUM_THREADS={opts['threads']}" if opts["threads"] else "torch's default"
    print(
        f"training threads: {threads} with 1 worker; with N workers search.run gives each "
        "max(1, CPUs // N)"
    )
    print(
        table(
            [
                "storage",
                "workers",
                "trials",
                "trial s",
                "training s",
                "overhead s",
                "overhead %",
                "overhead % w/o 1st trials",
                "<= 2%",
                "start-up s",
                "start-up per trial s",
                "gap between trials s",
                "end-to-end overhead %",
                "command s",
            ],
            rows,
        )
    )
    print("\nin-trial overhead by source, mean seconds per trial")
    print(
        table(
            [
                "storage",
                "workers",
                "checkpoint",
                "artifacts",
                "objective rest",
                "objective rest w/o 1st trials",
                "outside the objective",
                "overhead of 1st trials",
            ],
            detail,
        )
    )
    print(
        "objective rest: inside wall_time_s but not epoch work or checkpoints (Run setup, the "
        "first trial's data loading, per-epoch storage writes, pruning checks); outside the "
        "objective: trial time - wall_time_s - artifacts (sampling, trial start/finish, the "
        "objective's own gc.collect)."
    )
    print(
        "goal: overhead % (trial time outside training, per trial) <= 2%. Start-up and "
        "end-to-end are shown apart: they amortize over longer studies."
    )
    if opts["profile"]:
        prof_rows, n = run_profiled(opts)
        print(
            f"\nwhere the time goes: one extra sqlite x1 run of {n} trials under cProfile "
            "(cumulative seconds; profiling inflates Python-heavy code such as storage calls)"
        )
        print(table(["function", "calls", "total s", "per trial s"], prof_rows))
    for e in errors:
        print(f"error: {e}")
    print(f"total time {time.perf_counter() - started:.0f}s")
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
