"""Run a study's pipeline: ``python -m search.run study=NAME [key=value ...]``.

The rungs (new configurations to the first rung, the best-ranked continued from their rung
checkpoints up to the long budget; see ``search.scheduler``) -> final (test numbers), then a
summary. Running the same command again resumes: finished trials are kept, promotions are not
duplicated, and a finished study trains nothing. ``stage=screen`` runs the rungs up to
``stages.screen.epochs``, ``stage=promote`` all of them, ``stage=final`` the final stage;
``workers=N devices=...`` starts N worker processes (see ``search.worker``); ``--dry-run``
prints the resolved config and search space and touches no storage; ``--status`` prints where
the study stands (progress, the summary) from storage and trains and writes nothing.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from search.cli import config_from_args, guarded, parser, split_study
from search.config import direction_of, load_locations, metric_of, public_config, storage_url
from search.database import redact
from search.naming import RUNG_TO_ATTR, format_metric
from search.space import apply, baseline_params, distribution, ordered

if TYPE_CHECKING:  # torch loads only once the input is known to be good
    from models.data import ImageSplits


def print_dry_run(cfg: DictConfig) -> None:
    shown = public_config(cfg)
    shown["storage"] = redact(storage_url(cfg))
    space = shown.get("search", {}).get("space", {})
    for name, spec in space.items():  # each parameter as a study file would write it
        space[name] = _as_written(spec)
    print(OmegaConf.to_yaml(shown), end="")
    print(f"# metric: {metric_of(cfg)} ({direction_of(cfg)})")
    print(f"# search space ({len(cfg.search.space)} parameters):")
    for name in ordered(cfg.search.space):
        spec = cfg.search.space[name]
        cond = ""
        if spec.when:
            cond = "  when " + ", ".join(
                f"{k} in {OmegaConf.to_object(v) if OmegaConf.is_list(v) else [v]}"
                for k, v in spec.when.items()
            )
        print(f"#   {name:22s} -> {spec.target:32s} {distribution(spec)!r}{cond}")
    print(f"# baseline (the study's own settings, enqueued first): {baseline_params(cfg)}")


def _as_written(spec: dict[str, Any]) -> dict[str, Any]:
    """A search-space parameter without the schema's unused fields: a categorical one has no
    type or range, a range no choices; ``log``, ``step`` and ``when`` only where set."""
    keep = {"target": spec.get("target")}
    if spec.get("choices") is not None:
        keep["choices"] = spec["choices"]
    else:
        keep.update({k: spec.get(k) for k in ("type", "low", "high")})
        if spec.get("type") == "int":  # the schema stores the bounds as numbers: 0.0 for 0
            keep.update({k: int(spec[k]) for k in ("low", "high") if spec.get(k) is not None})
        keep.update({k: spec[k] for k in ("log", "step") if spec.get(k)})
    if spec.get("when"):
        keep["when"] = spec["when"]
    return keep


def _fmt(metric: str, value: float | None) -> str:
    return "-" if value is None else format_metric(metric, value)


def _leg(best: dict[str, Any], stage: str) -> str:
    """Under rungs, which configuration a stage's best trial trains and to how many epochs:
    its value is taken there (the deepest rung ranks first, see search.stages.top_trials).
    A configuration is numbered by its first trial in the screen study, so only there does a
    trial's own number say which configuration it is."""
    attrs = best["user_attrs"]
    if RUNG_TO_ATTR not in attrs:
        return ""
    epochs = int(attrs[RUNG_TO_ATTR])
    at = f"at {epochs} epoch{'' if epochs == 1 else 's'}"
    config = int(attrs.get("config", best["number"]))
    if stage == "screen" and config == best["number"]:
        return f" ({at})"
    return f" (configuration #{config}, {at})"


def print_summary(cfg: DictConfig, summary: dict[str, Any]) -> None:
    metric = summary["metric"]
    print(f"\n== {cfg.name}: {cfg.task} on {cfg.data.name}, metric {metric} ==")
    for stage, entry in summary["stages"].items():
        c = entry["counts"]
        counts = ", ".join(f"{v} {k.lower()}" for k, v in c.items() if v)
        print(f"{stage:8s} [{entry['study']}] {counts or 'no trials'}")
        best = entry.get("best")
        if best and stage != "final":
            value = _fmt(metric, best["value"])
            print(f"         best #{best['number']}{_leg(best, stage)}: {metric} {value}")
            shown = apply(cfg, best["params"])
            params = ", ".join(
                f"{n}={OmegaConf.select(shown, cfg.search.space[n].target)}" for n in best["params"]
            )
            print(f"         params: {params}")
        if stage == "promote" and entry.get("lineage"):
            links = ", ".join(f"#{n} <- {s}#{t}" for n, (s, t) in entry["lineage"].items())
            print(f"         lineage: {links}")
        if stage == "final" and best:
            attrs = best["user_attrs"]
            acc = " / ".join(
                _fmt("val_accuracy", attrs.get(f"{s}_accuracy")) for s in ("train", "val", "test")
            )
            print(f"         accuracy train / val / test: {acc}")
            if "test_mae" in attrs:
                mae = " / ".join(f"{attrs[f'{s}_mae']:.4f}" for s in ("train", "val", "test"))
                print(f"         reconstruction MAE train / val / test: {mae}")
            source = f"{attrs.get('source_study')} trial #{attrs.get('source_trial')}"
            encoder = (
                f", encoder {attrs['encoder_checkpoint']}" if "encoder_checkpoint" in attrs else ""
            )
            print(f"         from {source}{encoder}")
        for number, reason in entry["failures"].items():
            print(f"         failed #{number}: {reason}")
        for number, reason in entry.get("given_up", {}).items():
            print(f"         given up: configuration #{number} ({reason})")


def print_status(cfg: DictConfig) -> None:
    """Where study ``cfg.name`` stands, from storage, with the settings it was made with: its
    progress and the summary. Opens no new study and writes nothing."""
    import optuna

    from reporting.store import open_existing_storage, require_study, stored_config
    from search import load_studies, progress, summarize

    url = storage_url(cfg)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_existing_storage(url)
    require_study(storage, str(cfg.name), url, "; python -m search.run starts it")
    stored = stored_config(storage, str(cfg.name), [], url)
    studies = load_studies(stored, url)
    print(f"study {cfg.name}: storage {redact(url)}: {progress(studies, stored)}")
    print_summary(stored, summarize(studies, stored))


def without_result(summary: dict[str, Any]) -> list[str]:
    """``study#N: reason`` for each configuration that ended without a result."""
    return [
        f"{entry['study']}#{number}: {reason}"
        for entry in summary["stages"].values()
        for number, reason in entry["without_result"].items()
    ]


@guarded
def main() -> int:
    p = parser(
        "python -m search.run",
        __doc__.split("\n\n")[1],
        "examples:\n  python -m search.run study=quickstart\n"
        "  python -m search.run study=mnist_guided data.root=../shared/data stages.screen.trials=40\n"
        "  python -m search.run study=cifar_contrastive workers=4 devices=0,1 "
        "storage=postgresql+psycopg://user@host/db",
    )
    p.add_argument("--dry-run", action="store_true", help="print the resolved config; no storage")
    p.add_argument("--no-progress", action="store_true", help="hide per-batch progress bars")
    p.add_argument(
        "--status",
        action="store_true",
        help="print where the study stands (progress, summary); trains and writes nothing",
    )
    args = p.parse_args()
    if args.status:  # reads storage only: the study need not be trainable on this machine
        study, rest = split_study(args.overrides)
        print_status(load_locations(study, rest))
        return 0
    cfg = config_from_args(args.overrides)
    if args.dry_run:
        print_dry_run(cfg)
        return 0
    # Heavy imports (torch, optuna) wait until the input is known to be good.
    import optuna

    from reporting.store import open_existing_storage, require_study
    from search import (
        check_checkpoints_reachable,
        check_devices,
        install_sigterm_as_interrupt,
        interrupted_exit_code,
        load_data,
        open_studies,
    )

    # What only this machine can tell (its devices, the checkpoints URL, its copy of the data)
    # is checked before the study is written: bad input writes nothing.
    check_devices(cfg)
    check_checkpoints_reachable(cfg)
    url = storage_url(cfg)
    if cfg.stage == "final":  # evaluates a search that ran; on a new name it made empty studies
        require_study(
            open_existing_storage(url),
            str(cfg.name),
            url,
            "; stage=final evaluates a search that ran: run it without stage=final first",
        )
    splits = load_data(cfg)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    print(f"study {cfg.name}: storage {redact(url)}", flush=True)
    # Schema and studies exist before any worker starts; this process samples nothing itself.
    # Images other than the study's are refused before this run writes to it.
    studies = open_studies(cfg, url, seed_offset=0, splits=splits)
    if int(cfg.workers) > 1:
        splits = None  # spawned workers load their own; the launcher keeps no copy
    install_sigterm_as_interrupt()
    try:  # a signal at any point from here on, the summary included, stops it the same way
        return _run_and_summarize(cfg, url, studies, not args.no_progress, splits)
    except KeyboardInterrupt:
        print(
            "\ninterrupted: running trials were re-enqueued (if any had started); run the "
            "same command again to resume them from their last checkpoint",
            file=sys.stderr,
        )
        return interrupted_exit_code()


def _run_and_summarize(
    cfg: DictConfig, url: str, studies: Any, progress: bool, splits: ImageSplits | None = None
) -> int:
    """Run the workers (one in this process trains on ``splits`` when given), print the
    summary; the exit code."""
    from reporting.artifacts import make_trial_artifact_hook
    from search import (
        StageError,
        StorageUnavailableError,
        WorkersFailed,
        resolved_paths,
        run_workers,
        summarize,
    )

    try:
        hook = make_trial_artifact_hook(resolved_paths(cfg)["artifacts"])
        run_workers(cfg, url, progress=progress, hooks=[hook], splits=splits)
        summary = summarize(studies, cfg)
    except StorageUnavailableError as error:
        # Its running trial is re-enqueued (or retried once its heartbeat is missed).
        print(f"error: {error}; run the same command again once it is back", file=sys.stderr)
        return 1
    except (StageError, WorkersFailed) as error:
        print(f"error: {error}", file=sys.stderr)
        try:
            print_summary(cfg, summarize(studies, cfg))
        except StorageUnavailableError as gone:
            print(f"error: no summary: {gone}", file=sys.stderr)
        return 1
    print_summary(cfg, summary)
    lost = without_result(summary)
    if lost:
        print(
            f"error: {len(lost)} configuration(s) ended without a result: " + "; ".join(lost),
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
