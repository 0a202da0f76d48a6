"""A study's report, built from storage: the data behind ``python -m search.report``.

Writes ``<runs_dir>/report/NAME.md``, ``NAME-trials.csv`` (every trial of the three stages) and
PNG figures beside them: the report's results table for the configuration the search found next
to the published numbers, the best parameters of each stage, what pruning saved, optimization
history, intermediate values and parameter importances, and the report's three figure kinds
(test reconstructions, latent interpolation, t-SNE of the test set in raw image space and in the
latent space of every task run on the same dataset in this storage). Where a study has too
little data for a figure, the report says so instead.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from optuna.trial import FrozenTrial, TrialState

from reporting import figures
from models.errors import UsageError
from search.config import (
    ConfigError,
    StudyConfig,
    load_config,
    metric_of,
    resolved_paths,
    storage_url,
    study_path,
    to_dataclasses,
)
from search.objective import original_number
from search.space import apply
from search.stages import STAGE_NAMES, failure_reason, top_trials
from models.checkpoints import load_checkpoint
from storage.urls import open_storage, redact

warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

TSNE_MAX_POINTS = 2000
TASK_ORDER = ("autoencoder", "guided", "contrastive")
TASK_LABELS = {
    "autoencoder": "1.2.1 self-supervised autoencoder (frozen encoder)",
    "guided": "1.2.2 classification-guided encoder",
    "contrastive": "1.2.3 contrastive / SimCLR (frozen encoder)",
}
# The report's table (spec/report.md): accuracy in %, train / val / test; MAE train / val / test.
PUBLISHED: dict[tuple[str, str], dict[str, float]] = {
    ("autoencoder", "mnist"): {
        "train_accuracy": 99.34, "val_accuracy": 98.81, "test_accuracy": 98.47,
        "train_mae": 0.0159, "val_mae": 0.0162, "test_mae": 0.0160,
    },
    ("guided", "mnist"): {"train_accuracy": 99.17, "val_accuracy": 99.03, "test_accuracy": 99.14},
    ("contrastive", "mnist"): {
        "train_accuracy": 99.08, "val_accuracy": 98.90, "test_accuracy": 98.88,
    },
    ("autoencoder", "cifar10"): {
        "train_accuracy": 70.21, "val_accuracy": 63.15, "test_accuracy": 63.30,
        "train_mae": 0.296, "val_mae": 0.297, "test_mae": 0.295,
    },
    ("guided", "cifar10"): {"train_accuracy": 81.54, "val_accuracy": 81.44, "test_accuracy": 80.42},
    ("contrastive", "cifar10"): {
        "train_accuracy": 72.38, "val_accuracy": 68.96, "test_accuracy": 69.64,
    },
}  # fmt: skip
SPLITS = ("train", "val", "test")
# Overrides that say where things are on this machine: they apply to every study in storage.
LOCATION_KEYS = (
    "runs_dir",
    "storage",
    "artifacts_dir",
    "checkpoints_dir",
    "data.root",
    "data.cache_dir",
    "data.path",
    "train.device",
)


def location_overrides(overrides: Sequence[str]) -> list[str]:
    """The overrides among ``overrides`` that locate storage, folders, data or the device."""
    return [o for o in overrides if o.split("=", 1)[0] in LOCATION_KEYS]


# ---- finding studies and their configs -------------------------------------------------


def _schema_with(overrides: Sequence[str]) -> DictConfig:
    """The schema's defaults with ``overrides`` (enough to locate storage and folders)."""
    try:
        return OmegaConf.merge(
            OmegaConf.structured(StudyConfig), OmegaConf.from_dotlist(list(overrides))
        )
    except OmegaConfBaseException as error:
        raise ConfigError(f"{getattr(error, 'full_key', None) or 'config'}: {error}") from error


def locate(study: str, overrides: Sequence[str]) -> tuple[str | None, DictConfig]:
    """(study name or None for ``all``, a config giving the storage URL and folders)."""
    if study == "all":
        return None, _schema_with(overrides)
    try:
        study_path(study)
    except ConfigError:  # not a study file: a name of a study in storage
        return study, _schema_with(overrides)
    cfg = load_config(study, list(overrides))
    return str(cfg.name), cfg


def open_report_storage(url: str) -> optuna.storages.BaseStorage:
    """Open existing storage; a missing SQLite file is a usage error, not a new database."""
    if url.startswith("sqlite:///"):
        path = Path(url[len("sqlite:///") :]).expanduser()
        if not path.is_file():
            raise UsageError(
                f"storage: no database at {path}; run python -m search.run first, or pass "
                "runs_dir=... / storage=... where the study ran"
            )
    return open_storage(url)


def study_names(storage: optuna.storages.BaseStorage) -> list[str]:
    """Names of the studies (``<name>`` of ``<name>.screen`` etc.) held in ``storage``."""
    names = {
        s.study_name.rsplit(".", 1)[0]
        for s in storage.get_all_studies()
        if s.study_name.rsplit(".", 1)[-1] in STAGE_NAMES
    }
    return sorted(names)


def stored_config(
    storage: optuna.storages.BaseStorage, name: str, overrides: Sequence[str], url: str
) -> DictConfig:
    """The resolved config the study ran with (stored by the search), then ``overrides``."""
    try:
        study_id = storage.get_study_id_from_name(f"{name}.screen")
    except KeyError as error:
        raise UsageError(
            f"study: no study {name!r} in {redact(url)}; found: "
            f"{', '.join(study_names(storage)) or 'none'}"
        ) from error
    stored = storage.get_study_user_attrs(study_id).get("config")
    if stored is None:
        raise UsageError(f"study: {name!r} in {redact(url)} has no stored config")
    stored = dict(stored)
    stored.pop("storage", None)  # stored redacted; the URL in use is the right one
    try:
        cfg = OmegaConf.merge(
            OmegaConf.structured(StudyConfig), stored, OmegaConf.from_dotlist(list(overrides))
        )
    except OmegaConfBaseException as error:
        raise ConfigError(f"{getattr(error, 'full_key', None) or 'config'}: {error}") from error
    cfg.storage = url
    return cfg


# ---- rebuilding the final trial's networks ---------------------------------------------


class _SplitsCache:
    def __init__(self) -> None:
        self._cache: dict[str, Any] = {}

    def get(self, tcfg: DictConfig) -> Any:
        from models.data import load_splits

        data_cfg, _, _ = to_dataclasses(tcfg)
        key = json.dumps(OmegaConf.to_container(tcfg.data, resolve=True), sort_keys=True)
        if key not in self._cache:
            self._cache[key] = load_splits(data_cfg)
        return self._cache[key]


def final_checkpoint_paths(cfg: DictConfig, final: FrozenTrial) -> tuple[Path, Path]:
    """(pretrain.pt of the promoted trial it continues, probe.pt of the final trial)."""
    ckpts = resolved_paths(cfg)["checkpoints"]
    attrs = final.user_attrs
    source = ckpts / str(attrs["source_study"]) / f"trial-{int(attrs['source_checkpoint']):05d}"
    own = ckpts / f"{cfg.name}.final" / f"trial-{original_number(final):05d}"
    return source / "pretrain.pt", own / "probe.pt"


def rebuild_final_run(
    cfg: DictConfig, final: FrozenTrial, device: str = "auto", splits: Any = None
) -> Any:
    """The final trial's trained networks as a :class:`models.training.Run` (eval only).

    Built like the search's own trials (stored config + trial params via
    :func:`search.space.apply`), the encoder (and decoder / classifier / projection) loaded
    from the promoted trial's ``pretrain.pt``, and the probe's classifier from the final
    trial's ``probe.pt``. Raises FileNotFoundError when a checkpoint is missing.
    """
    from models.training import Run

    tcfg = apply(cfg, final.params)
    _, model_cfg, train_cfg = to_dataclasses(tcfg)
    train_cfg.device = device
    train_cfg.progress = False
    if splits is None:
        splits = _SplitsCache().get(tcfg)
    run = Run(tcfg.task, splits, model_cfg, train_cfg, checkpoint_dir=None)
    pretrain_path, probe_path = final_checkpoint_paths(cfg, final)
    run.load_pretrained(pretrain_path)
    if run.needs_probe:
        state = load_checkpoint(probe_path)
        if state is None:
            raise FileNotFoundError(f"no probe checkpoint at {probe_path}")
        run.nets.classifier.load_state_dict(state["modules"]["classifier"])
    for module in run.nets.modules().values():
        module.eval()
    return run


# ---- tables ----------------------------------------------------------------------------


def _reason(t: FrozenTrial, trials: list[FrozenTrial]) -> str:
    if t.state == TrialState.FAIL:
        return failure_reason(t, trials)
    if t.state == TrialState.PRUNED:
        return str(t.user_attrs.get("prune_reason", "pruned"))
    return ""


def trials_frame(studies: dict[str, optuna.Study]) -> pd.DataFrame:
    """One row per trial of every stage."""
    rows = []
    for stage, study in studies.items():
        trials = study.get_trials(deepcopy=False)
        for t in trials:
            a = t.user_attrs
            row: dict[str, Any] = {
                "stage": stage,
                "number": t.number,
                "state": t.state.name,
                "value": t.value,
                "epochs_run": a.get("epochs_run"),
                "wall_time_s": a.get("wall_time_s"),
                "images_per_second": a.get("images_per_second"),
                "seed": a.get("seed"),
                "device": a.get("device"),
                "reason": _reason(t, trials),
                "source_trial": a.get("source_trial"),
                "baseline": a.get("baseline", ""),
                "datetime_start": t.datetime_start,
                "datetime_complete": t.datetime_complete,
            }
            for key in ("train_accuracy", "val_accuracy", "test_accuracy"):
                if stage == "final":
                    row[key] = a.get(key)
            for split in SPLITS:
                if f"{split}_mae" in a:
                    row[f"{split}_mae"] = a[f"{split}_mae"]
            row["artifacts"] = sum(k.startswith("artifacts:") for k in t.system_attrs)
            for name, value in t.params.items():
                row[f"params_{name}"] = value
            rows.append(row)
    columns = ["stage", "number", "state", "value"]
    frame = pd.DataFrame(rows)
    if frame.empty:
        return pd.DataFrame(columns=columns)
    for column in ("epochs_run", "seed", "source_trial"):
        frame[column] = frame[column].astype("Int64")
    params = sorted(c for c in frame.columns if c.startswith("params_"))
    rest = [c for c in frame.columns if c not in columns and c not in params]
    return frame[columns + params + rest]


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def results_table(cfg: DictConfig, final: FrozenTrial | None) -> list[str]:
    """Markdown lines: the found configuration's numbers beside the report's."""
    if final is None:
        return ["No final trial completed, so there are no train / validation / test numbers yet."]
    a = final.user_attrs
    has_mae = "test_mae" in a
    head = ["", "accuracy train (%)", "val (%)", "test (%)"]
    if has_mae:
        head += ["MAE train", "MAE val", "MAE test"]
    found = [f"this search (final #{final.number})"] + [
        _pct(a.get(f"{s}_accuracy")) for s in SPLITS
    ]
    if has_mae:
        found += [f"{a[f'{s}_mae']:.4f}" for s in SPLITS]
    lines = [
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
        "| " + " | ".join(found) + " |",
    ]
    published = PUBLISHED.get((str(cfg.task), str(cfg.data.name)))
    if published is None:
        lines.append("")
        lines.append(
            f"The report did not run {cfg.task} on {cfg.data.name} (it used MNIST and CIFAR-10), "
            "so there are no published numbers to compare with."
        )
        return lines
    pub = [f"report ({TASK_LABELS[cfg.task].split(' ')[0]} {cfg.data.name})"] + [
        f"{published[f'{s}_accuracy']:.2f}" for s in SPLITS
    ]
    diff = ["difference"] + [
        "-"
        if a.get(f"{s}_accuracy") is None
        else f"{100 * a[f'{s}_accuracy'] - published[f'{s}_accuracy']:+.2f} pp"
        for s in SPLITS
    ]
    if has_mae:
        pub += [f"{published[f'{s}_mae']:.4f}" for s in SPLITS]
        diff += [f"{a[f'{s}_mae'] - published[f'{s}_mae']:+.4f}" for s in SPLITS]
    lines += ["| " + " | ".join(pub) + " |", "| " + " | ".join(diff) + " |"]
    lines.append("")
    note = "Differences are this search minus the report (accuracy in percentage points"
    note += "; for MAE lower is better" if has_mae else ""
    units = "pixels in [0, 1]" if cfg.data.name == "mnist" else "normalized pixels"
    note += f", MAE in {units})." if has_mae else ")."
    lines.append(note)
    return lines


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def best_params_lines(cfg: DictConfig, studies: dict[str, optuna.Study]) -> list[str]:
    metric = metric_of(cfg)
    lines = ["| stage | best trial | value | params |", "|---|---|---|---|"]
    for stage, study in studies.items():
        best = top_trials(study, 1)
        if not best:
            lines.append(f"| {stage} | - | - | no completed trial |")
            continue
        t = best[0]
        name = metric if stage != "final" else "val_accuracy"
        params = ", ".join(f"`{k}={_format_value(v)}`" for k, v in sorted(t.params.items()))
        lines.append(f"| {stage} | #{t.number} | {name} {t.value:.4f} | {params or '-'} |")
    return lines


def pruning_lines(cfg: DictConfig, screen: optuna.Study) -> list[str]:
    """What pruning saved in the screen stage: epochs run vs the same trials unpruned."""
    epochs = int(cfg.stages.screen.epochs)
    trials = [
        t
        for t in screen.get_trials(deepcopy=False)
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
    ]
    if not trials:
        return ["No screen trial completed or was pruned, so pruning saved nothing yet."]
    ran = sum(int(t.user_attrs.get("epochs_run", 0)) for t in trials)
    planned = len(trials) * epochs
    pruned = sum(t.state == TrialState.PRUNED for t in trials)
    saved = planned - ran
    per_epoch = [
        c["seconds"] + c.get("eval_seconds", 0.0)
        for t in trials
        for c in t.user_attrs.get("curve", [])
        if c["phase"] == "pretrain"
    ]
    lines = [
        f"The screen stage ran {len(trials)} trials ({pruned} pruned) for **{ran} epochs** in all; "
        f"unpruned, the same trials would have run {len(trials)} x {epochs} = **{planned} epochs**. "
        f"Pruning saved **{saved} epochs ({100 * saved / planned:.0f}%)**."
    ]
    if per_epoch and saved:
        mean = sum(per_epoch) / len(per_epoch)
        lines.append(
            f"At the screen's mean of {mean:.1f} s per epoch (training + validation), that is "
            f"about {saved * mean / 60:.1f} minutes of compute."
        )
    return lines


# ---- figures ----------------------------------------------------------------------------


@dataclass
class Report:
    name: str
    out_dir: Path
    lines: list[str] = field(default_factory=list)
    pngs: list[Path] = field(default_factory=list)

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    def figure(self, fig: Any, suffix: str, caption: str) -> None:
        path = figures.save_png(fig, self.out_dir / f"{self.name}-{suffix}.png")
        self.pngs.append(path)
        self.add(f"![{caption}]({path.name})", "")

    def optuna_figure(self, ax: Any, suffix: str, caption: str) -> None:
        import matplotlib.pyplot as plt

        fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
        fig.set_size_inches(7.5, 4.5)
        fig.set_layout_engine("constrained")
        self.figure(fig, suffix, caption)
        plt.close(fig)


def _varying_complete(study: optuna.Study) -> tuple[int, bool]:
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    distinct = {json.dumps(t.params, sort_keys=True, default=str) for t in done}
    return len(done), len(distinct) >= 2


def search_plots(report: Report, cfg: DictConfig, screen: optuna.Study) -> None:
    """Optimization history, intermediate values and parameter importances (Optuna's plots)."""
    import matplotlib

    # Optuna's matplotlib plots switch pyplot to the ggplot style: keep that to these figures.
    with matplotlib.rc_context(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _search_plots(report, cfg, screen)


def _search_plots(report: Report, cfg: DictConfig, screen: optuna.Study) -> None:
    from optuna.visualization import matplotlib as ovm

    metric = metric_of(cfg)
    report.add("## Optimization history", "")
    complete, varying = _varying_complete(screen)
    if complete == 0:
        report.add("No screen trial completed, so there is no optimization history to plot.", "")
    else:
        ax = ovm.plot_optimization_history(screen, target_name=metric)
        ax.set_title(f"{screen.study_name}: optimization history ({metric})", loc="left")
        report.optuna_figure(ax, "optimization-history", "optimization history")
        report.add(
            "Only completed trials have a final value; pruned trials appear in the next plot.",
            "",
        )
    if any(t.intermediate_values for t in screen.get_trials(deepcopy=False)):
        ax = ovm.plot_intermediate_values(screen)
        ax.set_title(
            f"{screen.study_name}: {metric} per epoch (pruned trials stop early)", loc="left"
        )
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        legend = ax.get_legend()
        if legend is not None and len(legend.get_texts()) > 12:
            legend.remove()
        report.optuna_figure(ax, "intermediate-values", "intermediate values per epoch")
    else:
        report.add("No screen trial reported a value per epoch yet.", "")
    report.add("## Parameter importances", "")
    if complete < 2 or not varying:
        report.add(
            f"Parameter importances need at least 2 completed screen trials with different "
            f"parameters; this study has {complete} completed"
            f"{'' if varying or complete < 2 else ', all with the same parameters'}.",
            "",
        )
        return
    try:
        ax = ovm.plot_param_importances(screen, target_name=metric)
    except Exception as error:  # e.g. no parameter shared by all completed trials
        report.add(f"Parameter importances could not be computed: {error}.", "")
        return
    ax.set_title(f"hyperparameter importances for {metric}", loc="left")
    legend = ax.get_legend()
    if legend is not None:
        legend.remove()
    report.optuna_figure(ax, "param-importances", "parameter importances")
    if complete < 10:
        report.add(
            f"Computed from only {complete} completed screen trials (Optuna's default "
            "evaluator): read them as a hint, not a measurement.",
            "",
        )


def _tsne_sources(
    storage: optuna.storages.BaseStorage, cfg: DictConfig, overrides: Sequence[str], url: str
) -> dict[str, tuple[DictConfig, FrozenTrial]]:
    """task -> (config, final trial) of a study on the same dataset with a completed final.

    The study itself wins for its own task; otherwise the best final validation accuracy.
    """
    found: dict[str, tuple[DictConfig, FrozenTrial]] = {}
    for name in study_names(storage):
        try:
            other = (
                cfg
                if name == cfg.name
                else stored_config(storage, name, location_overrides(overrides), url)
            )
            final = optuna.load_study(study_name=f"{name}.final", storage=storage)
        except (UsageError, ConfigError, KeyError):
            continue
        if other.data.name != cfg.data.name:
            continue
        best = top_trials(final, 1)
        if not best:
            continue
        task = str(other.task)
        held = found.get(task)
        if name == cfg.name or (
            held is None or (held[0].name != cfg.name and best[0].value > held[1].value)
        ):
            found[task] = (other, best[0])
    return found


def model_figures(
    report: Report,
    cfg: DictConfig,
    final: FrozenTrial | None,
    storage: optuna.storages.BaseStorage,
    overrides: Sequence[str],
    url: str,
    tsne_points: int,
    device: str,
) -> None:
    cache = _SplitsCache()
    report.add("## The report's figures", "")
    run = None
    if final is None:
        report.add(
            "No final trial completed, so there are no trained networks to draw test "
            "reconstructions, interpolations or a latent t-SNE from.",
            "",
        )
    else:
        try:
            run = rebuild_final_run(cfg, final, device, cache.get(apply(cfg, final.params)))
        except (FileNotFoundError, KeyError) as error:
            report.add(f"The final trial's networks could not be rebuilt: {error}.", "")
    if run is not None:
        curve = [
            c
            for t in _source_trials(storage, final)
            for c in t.user_attrs.get("curve", [])
            if c["phase"] == "pretrain"
        ] + [c for c in final.user_attrs.get("curve", []) if c["phase"] == "probe"]
        if curve:
            report.add("### Learning curves of the configuration found", "")
            report.figure(
                figures.learning_curves(
                    curve, f"{cfg.name}: promoted encoder's pretraining, then the final probe"
                ),
                "learning-curves",
                "learning curves",
            )
    report.add("### Reconstructions and interpolation", "")
    if run is not None and run.task == "autoencoder":
        from reporting.artifacts import final_figures

        made = final_figures(run, f"{cfg.name} final #{final.number}", tsne_max_points=0)
        if "test_reconstructions.png" in made:
            report.figure(made["test_reconstructions.png"], "reconstructions", "reconstructions")
            report.figure(made["interpolation.png"], "interpolation", "interpolation")
        else:
            report.add("The test set has fewer than 2 images: no reconstructions to show.", "")
    elif cfg.task != "autoencoder":
        report.add(
            f"This study trains the {cfg.task} task, which has no decoder: the report's "
            "reconstruction and interpolation figures exist for the autoencoder (1.2.1) only.",
            "",
        )
    report.add("### t-SNE of the test set", "")
    tsne_figure(report, cfg, storage, overrides, url, tsne_points, device, cache, run)


def _source_trials(storage: optuna.storages.BaseStorage, final: FrozenTrial) -> list[FrozenTrial]:
    source, number = final.user_attrs.get("source_study"), final.user_attrs.get("source_trial")
    if source is None or number is None:
        return []
    try:
        study = optuna.load_study(study_name=str(source), storage=storage)
    except KeyError:
        return []
    return [t for t in study.get_trials(deepcopy=False) if t.number == int(number)]


def tsne_figure(
    report: Report,
    cfg: DictConfig,
    storage: optuna.storages.BaseStorage,
    overrides: Sequence[str],
    url: str,
    tsne_points: int,
    device: str,
    cache: _SplitsCache,
    own_run: Any,
) -> None:
    try:
        splits = cache.get(cfg)
    except Exception as error:  # data not reachable from here
        report.add(f"The test set could not be loaded for t-SNE: {error}.", "")
        return
    n = len(splits.test_y)
    if n < 5:
        report.add(f"The test set has {n} images; t-SNE needs at least 5.", "")
        return
    idx = figures.sample_indices(n, tsne_points)
    labels = splits.test_y[idx].cpu().numpy()
    raw = splits.test_x[idx].float().cpu().numpy().reshape(len(idx), -1) / 255.0
    panels = [(f"raw image space ({cfg.data.name}, {len(idx)} test images)", raw, labels)]
    notes = []
    sources = _tsne_sources(storage, cfg, overrides, url)
    for task in TASK_ORDER:
        if task not in sources:
            notes.append(task)
            continue
        other_cfg, other_final = sources[task]
        if other_cfg.name == cfg.name and own_run is None:
            continue  # the study's own networks could not be rebuilt: said above
        try:
            if own_run is not None and other_cfg.name == cfg.name:
                run = own_run
            else:
                other_splits = cache.get(apply(other_cfg, other_final.params))
                run = rebuild_final_run(other_cfg, other_final, device, other_splits)
        except (FileNotFoundError, KeyError) as error:
            report.add(f"The {task} study {other_cfg.name!r} could not be rebuilt: {error}.", "")
            continue
        test_n = len(run.splits.test_y)
        sub = figures.sample_indices(test_n, tsne_points)
        latent = run.embed(run.splits.test_x[sub.to(run.splits.test_x.device)]).cpu().numpy()
        acc = other_final.user_attrs.get("test_accuracy")
        acc_text = f", test acc {100 * acc:.1f}%" if acc is not None else ""
        panels.append(
            (
                f"{task} latent space ({other_cfg.name}{acc_text})",
                latent,
                run.splits.test_y[sub.to(run.splits.test_y.device)].cpu().numpy(),
            )
        )
    shown = [(title, figures.tsne_embedding(x), y) for title, x, y in panels]
    report.figure(figures.tsne_panels(shown, splits.classes), "tsne", "t-SNE of the test set")
    if notes:
        report.add(
            f"No study in this storage has a completed final stage for "
            f"{' or '.join(notes)} on {cfg.data.name}, so "
            f"{'that latent space is' if len(notes) == 1 else 'those latent spaces are'} not "
            f"shown; run {'that task' if len(notes) == 1 else 'those tasks'} on {cfg.data.name} "
            "into the same storage to add "
            f"{'it' if len(notes) == 1 else 'them'}.",
            "",
        )


# ---- the report --------------------------------------------------------------------------


def write_report(
    name: str,
    storage: optuna.storages.BaseStorage,
    url: str,
    overrides: Sequence[str],
    out_dir: Path | None = None,
    tsne_points: int = TSNE_MAX_POINTS,
    device: str = "auto",
) -> Report:
    """Write the report of study ``name``; returns what was written."""
    cfg = stored_config(storage, name, overrides, url)
    out_dir = Path(out_dir) if out_dir else resolved_paths(cfg)["runs"] / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    studies = {
        stage: optuna.load_study(study_name=f"{name}.{stage}", storage=storage)
        for stage in STAGE_NAMES
    }
    report = Report(name, out_dir)
    metric = metric_of(cfg)
    finals = top_trials(studies["final"], 1)
    final = finals[0] if finals else None

    frame = trials_frame(studies)
    csv_path = out_dir / f"{name}-trials.csv"
    frame.to_csv(csv_path, index=False)

    report.add(
        f"# {name}: {TASK_LABELS[cfg.task]} on {cfg.data.name}",
        "",
        f"{cfg.description}".strip() or "",
        "",
        f"Storage `{redact(url)}`, metric `{metric}`; screen {cfg.stages.screen.trials} trials x "
        f"{cfg.stages.screen.epochs} epochs, promote top {cfg.stages.promote.top_k} for "
        f"{int(cfg.stages.promote.epochs or cfg.train.epochs)} epochs. "
        f"Generated {time.strftime('%Y-%m-%d %H:%M')}.",
        "",
        "## Results of the configuration found",
        "",
        *results_table(cfg, final),
        "",
    )
    if final is not None:
        a = final.user_attrs
        report.add(
            f"Final trial #{final.number} trains on the encoder of {a.get('source_study')} "
            f"trial #{a.get('source_trial')} (seed {a.get('seed')}).",
            "",
        )
    report.add("## Best parameters per stage", "", *best_params_lines(cfg, studies), "")
    report.add("## Trials", "")
    counts = (
        frame.groupby(["stage", "state"]).size().unstack(fill_value=0)
        if not frame.empty
        else pd.DataFrame()
    )
    if counts.empty:
        report.add("The study has no trials yet.", "")
    else:
        states = list(counts.columns)
        report.add("| stage | " + " | ".join(s.lower() for s in states) + " |")
        report.add("|---|" + "---|" * len(states))
        for stage in STAGE_NAMES:
            if stage in counts.index:
                row = counts.loc[stage]
                report.add(f"| {stage} | " + " | ".join(str(int(row[s])) for s in states) + " |")
        report.add("")
    report.add(
        f"Every trial, with its parameters, epochs, wall time, throughput, seed, device and "
        f"why it was pruned or failed: [{csv_path.name}]({csv_path.name}).",
        "",
    )
    report.add("## What pruning saved", "", *pruning_lines(cfg, studies["screen"]), "")
    search_plots(report, cfg, studies["screen"])
    model_figures(report, cfg, final, storage, overrides, url, tsne_points, device)
    report.add(
        "## Per-trial figures",
        "",
        "Every trial's learning curves (and, for autoencoders, validation reconstructions) are "
        "in Optuna's artifact store; browse them with",
        "",
        f"    optuna-dashboard {redact(url)} --artifact-dir {resolved_paths(cfg)['artifacts']}",
        "",
    )
    md_path = out_dir / f"{name}.md"
    md_path.write_text("\n".join(report.lines).replace("\n\n\n", "\n\n") + "\n")
    report.pngs.insert(0, csv_path)
    report.pngs.insert(0, md_path)
    return report
