"""Make a table of real learning curves with the project's own trainer (for ``simulate``).

Configurations are drawn (seeded, Optuna's ``RandomSampler``) from one study's ``search.space``
through the path the search uses (:func:`search.space.suggest`, :func:`search.space.apply`,
:class:`models.training.Run`), and each is trained to the full budget with the learning-rate
schedule defined over the full budget (``train.epochs`` = the budget), as the scheduler's trials
are when they continue from a rung's checkpoint. Every epoch records the study's search metric
and the seconds the epoch took (training + the epoch's validation metric). The first
``repeats`` configurations are trained again with a second seed, to measure noise.

Two CSV files (the first is what :func:`benchmarks.simulate.load_table` reads):

``<out>``
    ``config_id, seed, epoch, metric, seconds, train_loss`` (``seed`` is 0 or 1, the
    training seed is in the configurations file); a run that diverged (NaN or infinite loss,
    :class:`models.training.NonFiniteLossError`) has ``metric`` NaN from the epoch that
    diverged on, that epoch's seconds, and 0 seconds after it.
``<out stem>-configs.csv``
    ``config_id, seed0, seed1`` (training seeds) and one column per parameter of the space
    (empty where a conditional parameter is inactive).

Both start with ``#`` lines naming the command that made them. Rows are appended per finished
curve, so an interrupted run continues where it stopped when run again with the same options;
``part=i/n`` lets ``n`` processes share the work (each trains every ``n``-th remaining curve).
"""

from __future__ import annotations

import json
import math
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks._common import REPO_ROOT, Option, default_data_root, log, machine, parse_options

CURVE_COLUMNS = ("config_id", "seed", "epoch", "metric", "seconds", "train_loss")
DEFAULT_OUT = "benchmarks/tables/quickstart-curves.csv"


def configs_path(out: Path) -> Path:
    return out.with_name(out.stem + "-configs.csv")


def study_overrides(opts: dict[str, Any]) -> list[str]:
    """The study overrides of a table: sizes that make it CPU-cheap, then ``extra``."""
    out = [
        f"train.epochs={opts['epochs']}",
        "train.device=cpu",
        "train.progress=false",
    ]
    for key in ("train_subset", "val_subset"):
        if opts[key]:
            out.append(f"data.{key}={opts[key]}")
    if opts["val_fraction"]:
        out.append(f"data.val_fraction={opts['val_fraction']}")
    if opts["max_batches"]:
        out.append(f"train.max_batches={opts['max_batches']}")
    return out + opts["extra"].split()


def table_study(path: Path) -> tuple[str, list[str]]:
    """The study and the overrides a table was made with, from its header (``# study NAME,
    metric M, overrides: k=v ...``), so that a replay loads the same search space."""
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        match = re.match(r"# study (\S+), metric \S+, overrides: (.*)$", line)
        if match:
            return match.group(1), shlex.split(match.group(2))
    raise ValueError(f"{path}: no '# study ..., overrides: ...' line; not made by tabulate")


def draw_configs(cfg: Any, n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` parameter sets from the study's space: Optuna's RandomSampler with ``seed``,
    through :func:`search.space.suggest` (conditional parameters only when active)."""
    import optuna

    from search.space import suggest

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    out = []
    for _ in range(n):
        trial = study.ask()
        out.append(suggest(trial, cfg.search.space))
        study.tell(trial, 0.0)
    return out


def read_done(out: Path) -> set[tuple[str, int]]:
    """(config_id, seed) pairs whose whole curve is already in ``out``."""
    import pandas as pd

    if not out.is_file():
        return set()
    rows = pd.read_csv(out, comment="#")
    counts = rows.groupby(["config_id", "seed"]).size()
    last = int(rows["epoch"].max()) if len(rows) else 0
    return {(str(c), int(s)) for (c, s), k in counts.items() if k == last}


def train_curve(cfg: Any, splits: Any, params: dict[str, Any], seed: int) -> list[dict[str, Any]]:
    """One run of ``params`` with training seed ``seed`` to ``train.epochs``: a row per epoch."""
    from models.training import NonFiniteLossError, Run
    from search.config import to_dataclasses
    from search.space import apply

    tcfg = apply(cfg, params)
    tcfg.train.seed = seed
    _, model_cfg, train_cfg = to_dataclasses(tcfg)
    metric = cfg.search.metric
    epochs = int(tcfg.train.epochs)
    rows: list[dict[str, Any]] = []

    def on_epoch(report: Any) -> None:
        nonlocal mark
        rows.append(
            {
                "epoch": report.epoch,
                "metric": float(report.metrics[metric]),
                "seconds": round(report.seconds + report.eval_seconds, 4),
                "train_loss": float(report.train_loss),
            }
        )
        mark = time.perf_counter()

    run = Run(tcfg.task, splits, model_cfg, train_cfg)
    mark = time.perf_counter()
    try:
        run.pretrain(on_epoch=on_epoch)
    except NonFiniteLossError:
        spent = time.perf_counter() - mark  # the epoch that diverged
        for epoch in range(len(rows) + 1, epochs + 1):
            seconds = round(spent, 4) if epoch == len(rows) + 1 else 0.0
            rows.append({"epoch": epoch, "metric": math.nan, "seconds": seconds})
            spent = 0.0
    return rows


def main() -> int:
    opts = parse_options(
        "python -m benchmarks.tabulate",
        __doc__.split("\n\n")[0],
        {
            "study": Option("quickstart", str, "study name or YAML path"),
            "out": Option(DEFAULT_OUT, str, "curves CSV (the configurations go beside it)"),
            "configs": Option(100, int, "configurations drawn from the study's space"),
            "repeats": Option(20, int, "of them, how many (the first) get a second seed"),
            "epochs": Option(30, int, "full budget: epochs of every run (train.epochs)"),
            "seed": Option(0, int, "seed of the configuration draw"),
            "train_seed": Option(1000, int, "training seed of config i: this + i (second: + 1e6)"),
            "train_subset": Option(128, int, "train images (0 = all)"),
            "val_subset": Option(0, int, "validation images (0 = all)"),
            "val_fraction": Option(0.0, float, "validation fraction (0 = the study's)"),
            "max_batches": Option(0, int, "batches per epoch cap (0 = none)"),
            "extra": Option("", str, "more study overrides, space-separated key=value"),
            "limit": Option(0, int, "stop after this many new curves (0 = all); for sizing"),
            "part": Option(
                "0/1", str, "i/n: train every n-th curve from the i-th (n processes share a table)"
            ),
            "threads": Option(1, int, "torch CPU threads"),
            "data_root": Option(
                default_data_root(), str, "folder holding MNIST/raw (not recorded)"
            ),
        },
        epilog="example:\n  python -m benchmarks.tabulate\n"
        "  python -m benchmarks.tabulate configs=3 repeats=0 limit=3 out=/tmp/probe.csv",
    )
    import optuna
    import pandas as pd
    import torch
    from filelock import FileLock

    from models.data import load_splits
    from search.config import load_config, to_dataclasses

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(opts["threads"])
    part, _, parts = opts["part"].partition("/")
    if not (part.isdigit() and parts.isdigit() and int(part) < int(parts)):
        print(f"error: part: expected i/n with 0 <= i < n, got {opts['part']!r}", file=sys.stderr)
        return 2
    out = Path(opts["out"])
    if not out.is_absolute():
        out = REPO_ROOT / out
    out.parent.mkdir(parents=True, exist_ok=True)
    # the data folder is this machine's, so it stays out of the recorded overrides
    cfg = load_config(opts["study"], [f"data.root={opts['data_root']}", *study_overrides(opts)])
    params = draw_configs(cfg, opts["configs"], opts["seed"])
    ids = [f"c{i:03d}" for i in range(len(params))]
    seeds = {i: [opts["train_seed"] + n] for n, i in enumerate(ids)}
    for i in ids[: opts["repeats"]]:
        seeds[i].append(seeds[i][0] + 1_000_000)
    # limit= only splits the work into several calls; the table does not depend on it
    given = [
        a for a in sys.argv[1:] if not a.lstrip("-").startswith(("limit=", "part=", "data_root="))
    ]
    command = " ".join(["python -m benchmarks.tabulate", shlex.join(given)])
    header = (
        f"# made by: {command.strip()}\n# study {opts['study']}, metric {cfg.search.metric}, "
        f"overrides: {shlex.join(study_overrides(opts))}\n"
    )
    configs = pd.DataFrame(
        [
            {"config_id": i, "seed0": s[0], "seed1": s[1] if len(s) > 1 else None, **p}
            for (i, s), p in zip(seeds.items(), params, strict=True)
        ]
    )
    cpath = configs_path(out)
    if cpath.is_file():
        stored = pd.read_csv(cpath, comment="#")
        if not stored.equals(pd.read_csv(_csv_buffer(configs))):
            raise SystemExit(f"error: {cpath} holds other configurations; use another out=")
    else:
        cpath.write_text(header + configs.to_csv(index=False))
    if not out.is_file():
        out.write_text(header + ",".join(CURVE_COLUMNS) + "\n")
    done = read_done(out)
    todo = [(i, k) for k in (0, 1) for i in ids if k < len(seeds[i]) and (i, k) not in done]
    todo = todo[int(part) :: int(parts)]
    if opts["limit"]:
        todo = todo[: opts["limit"]]
    log(f"{len(done)} curves done, {len(todo)} to train; {machine()}")
    data_cfg, _, _ = to_dataclasses(cfg)
    splits = load_splits(data_cfg)
    log(f"{len(splits.train_y)} train / {len(splits.val_y)} val images")
    started = time.perf_counter()
    for n, (config_id, k) in enumerate(todo, 1):
        t0 = time.perf_counter()
        p = params[ids.index(config_id)]
        rows = train_curve(cfg, splits, p, seeds[config_id][k])
        frame = pd.DataFrame([{"config_id": config_id, "seed": k, **r} for r in rows])
        with FileLock(str(out) + ".lock"), out.open("a") as f:  # parts append to one file
            f.write(frame.reindex(columns=CURVE_COLUMNS).to_csv(index=False, header=False))
        last = rows[-1]["metric"]
        log(
            f"[{n}/{len(todo)}] {config_id} seed {k} {json.dumps(p)}: {cfg.search.metric} "
            f"{last:.4f} in {time.perf_counter() - t0:.1f}s "
            f"(total {time.perf_counter() - started:.0f}s)"
        )
    log(f"done: {time.perf_counter() - started:.0f}s for {len(todo)} curves")
    return 0


def _csv_buffer(frame: Any) -> Any:
    import io

    return io.StringIO(frame.to_csv(index=False))


if __name__ == "__main__":
    raise SystemExit(main())
