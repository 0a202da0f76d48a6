"""Write one study's report files: what ``python -m search.report`` does for each study.

:func:`write_report` writes ``<runs_dir>/report/NAME.md``, ``NAME-trials.csv`` (every trial of
the three stages) and PNG figures beside them: the report's results table for the configuration
the search found next to the published numbers (with the epochs behind each), the raw-pixel and
untrained-encoder baselines beside the search's best, the best parameters of each stage, what
pruning saved (or the rungs), optimization history, intermediate values and parameter importances, and the
report's three figure kinds (test reconstructions, latent interpolation, t-SNE of the test set
in raw image space and in the latent space of every task run on the same dataset in this
storage).
Where a study has too little data for a figure, the document says so instead.

:func:`write_combined` writes ``all-studies.md`` for ``study=all``: the report's results table
(tasks x datasets, test accuracy and MAE) from every finished study in storage, with budgets.

The data comes from :mod:`reporting.store` and :mod:`reporting.tables`, the text from
:mod:`reporting.markdown`, the figures from :mod:`reporting.figures`; this module places them.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from omegaconf import DictConfig
from optuna.trial import FrozenTrial, TrialState

from models.checkpoints import CheckpointError
from models.errors import UsageError
from reporting import figures, markdown
from reporting.artifacts import final_figures
from reporting.store import (
    SplitsCache,
    finished_finals,
    pretrain_curve,
    rebuild_final_run,
    same_dataset_finals,
    source_trial,
    stage_studies,
    stored_config,
    study_names,
    unsafe_name_reason,
)
from reporting.tables import (
    TASK_ORDER,
    baselines_frame,
    combined_frame,
    pruning_savings,
    rung_savings,
    state_counts,
    trials_frame,
)
from search import (
    apply,
    first_legs,
    found_final,
    learning_curve,
    metric_of,
    redact,
    resolved_paths,
    rung_ladder,
    uses_rungs,
)

_log = logging.getLogger(__name__)
# Test images per t-SNE panel of the written report, at most (``--tsne-points``).
REPORT_TSNE_POINTS = 2000


def output_path(out_dir: Path, name: str, suffix: str) -> Path:
    """``out_dir/NAME+suffix``; a UsageError naming ``study`` when it would leave ``out_dir``.

    Study names come from storage, where anyone with access can rename a study (to
    ``../../outside``, say): every report file name is checked here before it is written.
    """
    reason = unsafe_name_reason(name)
    path = out_dir / f"{name}{suffix}"
    if reason is None and path.resolve().parent != out_dir.resolve():
        reason = f"{path.name} would be written outside {out_dir}"
    if reason is not None:
        raise UsageError(f"study: {name!r} cannot name report files: {reason}")
    return path


@dataclass
class MarkdownDocument:
    """The markdown lines of one study's report and every file written for it."""

    name: str
    out_dir: Path
    lines: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    def figure(self, fig: Any, suffix: str, caption: str) -> None:
        """Save ``fig`` as ``NAME-suffix.png`` beside the document and link it."""
        path = figures.save_png(fig, output_path(self.out_dir, self.name, f"-{suffix}.png"))
        self.files.append(path)
        self.add(f"![{caption}]({path.name})", "")

    def optuna_figure(self, ax: Any, suffix: str, caption: str) -> None:
        """Like :meth:`figure`, for the pyplot axes Optuna's matplotlib plots return."""
        import matplotlib.pyplot as plt

        fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
        fig.set_size_inches(7.5, 4.5)
        fig.set_layout_engine("constrained")
        self.figure(fig, suffix, caption)
        plt.close(fig)

    def text(self) -> str:
        return "\n".join(self.lines).replace("\n\n\n", "\n\n") + "\n"


# ---- Optuna's plots of the screen stage ------------------------------------------------


def _varying_complete(study: optuna.Study) -> tuple[int, bool]:
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    distinct = {json.dumps(t.params, sort_keys=True, default=str) for t in done}
    return len(done), len(distinct) >= 2


def search_plots(doc: MarkdownDocument, cfg: DictConfig, screen: optuna.Study) -> None:
    """Optimization history, intermediate values and parameter importances (Optuna's plots)."""
    import matplotlib

    # Optuna's matplotlib plots switch pyplot to the ggplot style (and warn that they are
    # experimental): keep both to these figures.
    with matplotlib.rc_context(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _search_plots(doc, cfg, screen)


def one_title(ax: Any, text: str) -> Any:
    """Give ``ax`` the single title ``text``, on the left; returns ``ax``.

    Optuna's matplotlib plots set a centred title of their own ("Intermediate Values Plot",
    "Optimization History Plot"; the importances plot a left one): setting ours with
    ``loc="left"`` alone would print both, one over the other.
    """
    for loc in ("center", "right"):
        ax.set_title("", loc=loc)
    ax.set_title(text, loc="left")
    return ax


def history_plot(screen: optuna.Study, metric: str) -> Any:
    """Optuna's optimization history of the screen stage, titled once."""
    from optuna.visualization import matplotlib as ovm

    ax = ovm.plot_optimization_history(screen, target_name=metric)
    return one_title(ax, f"{screen.study_name}: optimization history ({metric})")


def intermediate_plot(screen: optuna.Study, metric: str) -> Any:
    """Optuna's intermediate values (the metric per epoch) of the screen stage, titled once."""
    from optuna.visualization import matplotlib as ovm

    ax = ovm.plot_intermediate_values(screen)
    one_title(ax, f"{screen.study_name}: {metric} per epoch")
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    legend = ax.get_legend()
    if legend is not None and len(legend.get_texts()) > 12:
        legend.remove()
    return ax


def importance_plot(screen: optuna.Study, metric: str) -> Any:
    """Optuna's parameter importances of the screen stage, titled once (may raise)."""
    from optuna.visualization import matplotlib as ovm

    ax = ovm.plot_param_importances(screen, target_name=metric)
    one_title(ax, f"hyperparameter importances for {metric}")
    legend = ax.get_legend()
    if legend is not None:
        legend.remove()
    return ax


def first_rung_study(screen: optuna.Study) -> optuna.Study:
    """An in-memory copy of ``screen`` holding each configuration's first leg only: under
    rungs the one result every configuration has at the same budget (its continuations are
    the same parameters at other budgets, which do not compare). Named like ``screen``."""
    copy = optuna.create_study(study_name=screen.study_name, direction=screen.direction)
    copy.add_trials(first_legs(screen.get_trials(deepcopy=False)))
    return copy


def _search_plots(doc: MarkdownDocument, cfg: DictConfig, screen: optuna.Study) -> None:
    metric = metric_of(cfg)
    doc.add("## Optimization history", "")
    rungs = uses_rungs(cfg)
    first = rung_ladder(cfg)[0] if rungs else None
    legs = screen
    if rungs:  # plots and importances over configurations at one budget
        screen = first_rung_study(screen)
    complete, varying = _varying_complete(screen)
    if complete == 0:
        doc.add("No screen trial completed, so there is no optimization history to plot.", "")
    else:
        ax = history_plot(screen, metric)
        if rungs:
            ax.set_xlabel("configuration, in the order started")
        doc.optuna_figure(ax, "optimization-history", "optimization history")
        doc.add(
            f"One point per configuration, its value at the first rung ({first} "
            f"epoch{'s' if first != 1 else ''}), where every configuration has one; the "
            "best-trial tables rank by the deepest rung reached, so their best may differ."
            if rungs
            else "Only completed trials have a final value; pruned trials appear in the next plot.",
            "",
        )
    if any(t.intermediate_values for t in legs.get_trials(deepcopy=False)):
        doc.optuna_figure(
            intermediate_plot(legs, metric),
            "intermediate-values",
            "intermediate values per epoch",
        )
        doc.add(
            "One line per screen leg, over the epochs it trained (a continuation starts at the "
            "rung it resumed from)."
            if uses_rungs(cfg)
            else "One line per screen trial; pruned trials stop early.",
            "",
        )
    else:
        doc.add("No screen trial reported a value per epoch yet.", "")
    doc.add("## Parameter importances", "")
    if complete < 2 or not varying:
        doc.add(
            f"Parameter importances need at least 2 completed screen trials with different "
            f"parameters; this study has {complete} completed"
            f"{'' if varying or complete < 2 else ', all with the same parameters'}.",
            "",
        )
        return
    try:
        ax = importance_plot(screen, metric)
    except Exception as error:  # e.g. no parameter shared by all completed trials
        doc.add(f"Parameter importances could not be computed: {error}.", "")
        return
    doc.optuna_figure(ax, "param-importances", "parameter importances")
    if rungs:
        doc.add(f"Fitted on the {complete} configurations' values at the first rung.", "")
    if complete < 10:
        doc.add(
            f"Computed from only {complete} completed screen "
            f"{'configurations' if rungs else 'trials'} (Optuna's default evaluator): read "
            "them as a hint, not a measurement.",
            "",
        )


# ---- the report's figures, from the final trial's networks -----------------------------


# Why a finished study's networks cannot be rebuilt here, said in the report instead of ending
# it: a checkpoint missing or damaged, data not reachable from this machine, a record missing.
REBUILD_ERRORS = (FileNotFoundError, KeyError, UsageError, CheckpointError)


@dataclass
class FigureSources:
    """Where the networks and data behind the report's figures come from."""

    storage: optuna.storages.BaseStorage
    url: str
    overrides: Sequence[str]
    tsne_points: int
    device: str
    splits: SplitsCache = field(default_factory=SplitsCache)


def model_figures(
    doc: MarkdownDocument, cfg: DictConfig, final: FrozenTrial | None, src: FigureSources
) -> None:
    """Learning curves, reconstructions, interpolation and t-SNE of the configuration found."""
    doc.add("## The report's figures", "")
    run = None
    if final is None:
        doc.add(
            "No final trial completed, so this study has no trained networks to draw test "
            "reconstructions, interpolations or its own latent t-SNE from (a t-SNE panel below "
            "from another finished study on the same data names that study).",
            "",
        )
    else:
        try:
            splits = src.splits.get(apply(cfg, final.params))
            run = rebuild_final_run(cfg, final, src.device, splits)
        except REBUILD_ERRORS as error:
            doc.add(f"The final trial's networks could not be rebuilt: {error}.", "")
    if run is not None:
        source = source_trial(src.storage, final)
        encoder = pretrain_curve(src.storage, cfg, source) if source else []
        curve = encoder + learning_curve(final.user_attrs, "probe")
        if curve:
            doc.add("### Learning curves of the configuration found", "")
            doc.figure(
                figures.learning_curves(
                    curve, f"{cfg.name}: promoted encoder's pretraining, then the final probe"
                ),
                "learning-curves",
                "learning curves",
            )
    doc.add("### Reconstructions and interpolation", "")
    if run is not None and run.task == "autoencoder":
        made = final_figures(run, f"{cfg.name} final #{final.number}", tsne_points=0)
        if "test_reconstructions.png" in made:
            doc.figure(made["test_reconstructions.png"], "reconstructions", "reconstructions")
            doc.figure(made["interpolation.png"], "interpolation", "interpolation")
        else:
            doc.add("The test set has fewer than 2 images: no reconstructions to show.", "")
    elif cfg.task != "autoencoder":
        doc.add(
            f"This study trains the {cfg.task} task, which has no decoder: the report's "
            "reconstruction and interpolation figures exist for the autoencoder (1.2.1) only.",
            "",
        )
    doc.add("### t-SNE of the test set", "")
    tsne_figure(doc, cfg, src, run)


def tsne_figure(doc: MarkdownDocument, cfg: DictConfig, src: FigureSources, own_run: Any) -> None:
    """t-SNE of the test set in raw image space and in each task's latent space."""
    try:
        splits = src.splits.get(cfg)
    except Exception as error:  # data not reachable from here
        doc.add(f"The test set could not be loaded for t-SNE: {error}.", "")
        return
    n = len(splits.test_y)
    if n < 5:
        doc.add(f"The test set has {n} images; t-SNE needs at least 5.", "")
        return
    idx = figures.sample_indices(n, src.tsne_points)
    labels = splits.test_y[idx].cpu().numpy()
    raw = splits.test_x[idx].float().cpu().numpy().reshape(len(idx), -1) / 255.0
    panels = [(f"raw image space ({cfg.data.name}, {len(idx)} test images)", raw, labels)]
    missing = []
    finals = same_dataset_finals(src.storage, cfg, src.overrides, src.url)
    for task in TASK_ORDER:
        if task not in finals:
            missing.append(task)
            continue
        other_cfg, other_final = finals[task]
        if other_cfg.name == cfg.name and own_run is None:
            continue  # the study's own networks could not be rebuilt: said above
        try:
            if own_run is not None and other_cfg.name == cfg.name:
                run = own_run
            else:
                other_splits = src.splits.get(apply(other_cfg, other_final.params))
                run = rebuild_final_run(other_cfg, other_final, src.device, other_splits)
        except REBUILD_ERRORS as error:
            doc.add(f"The {task} study {other_cfg.name!r} could not be rebuilt: {error}.", "")
            continue
        sub = figures.sample_indices(len(run.splits.test_y), src.tsne_points)
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
    doc.figure(figures.tsne_panels(shown, splits.classes), "tsne", "t-SNE of the test set")
    if missing:
        one = len(missing) == 1
        others = [task for task in missing if task != cfg.task]
        todo = []
        if cfg.task in missing:
            todo.append("this study's own final stage has not completed yet (run it again)")
        if others:
            todo.append(
                f"run {' and '.join(others)} on {cfg.data.name} into the same storage to add "
                f"{'it' if len(others) == 1 else 'them'}"
            )
        doc.add(
            f"No study in this storage has a completed final stage for "
            f"{' or '.join(missing)} on {cfg.data.name}, so "
            f"{'that latent space is' if one else 'those latent spaces are'} not "
            f"shown; {'; '.join(todo)}.",
            "",
        )


# ---- one study's report ----------------------------------------------------------------


def write_report(
    name: str,
    storage: optuna.storages.BaseStorage,
    url: str,
    overrides: Sequence[str],
    out_dir: Path | None = None,
    tsne_points: int = REPORT_TSNE_POINTS,
    device: str = "auto",
) -> MarkdownDocument:
    """Write the report of study ``name``; returns the document, with every file written.

    Raises UsageError (``study: ...``) before writing anything when ``name`` cannot name files
    inside ``out_dir`` (see :func:`output_path`).
    """
    reason = unsafe_name_reason(name)  # before reading storage; output_path checks the paths
    if reason is not None:
        raise UsageError(f"study: {name!r} cannot name report files: {reason}")
    cfg = stored_config(storage, name, overrides, url)
    out_dir = Path(out_dir) if out_dir else resolved_paths(cfg)["runs"] / "report"
    csv_path, md_path = output_path(out_dir, name, "-trials.csv"), output_path(out_dir, name, ".md")
    out_dir.mkdir(parents=True, exist_ok=True)
    studies = stage_studies(storage, name)
    doc = MarkdownDocument(name, out_dir)
    final = found_final(studies, cfg)

    frame = trials_frame(studies)
    frame.to_csv(csv_path, index=False)

    savings = rung_savings(cfg, studies) if uses_rungs(cfg) else None
    doc.add(*markdown.heading(name, cfg, url, savings), "")
    doc.add("## Results of the configuration found", "")
    doc.add(*markdown.results_table(cfg, final), "")
    if final is not None:
        doc.add(*markdown.provenance(final), "")
    doc.add("## Baselines: what the search has to beat", "")
    doc.add(*markdown.baselines_section(cfg, baselines_frame(cfg, studies)), "")
    doc.add("## Best parameters per stage", "", *markdown.best_params_table(cfg, studies), "")
    doc.add("## Trials", "", *markdown.state_counts_table(state_counts(frame)), "")
    doc.add(*markdown.csv_pointer(csv_path.name), "")
    if uses_rungs(cfg):
        said = markdown.rung_sentences(savings)
    else:
        said = markdown.pruning_sentences(pruning_savings(cfg, studies["screen"]))
    doc.add(markdown.savings_heading(cfg), "", *said, "")
    search_plots(doc, cfg, studies["screen"])
    sources = FigureSources(storage, url, overrides, tsne_points, device)
    model_figures(doc, cfg, final, sources)
    doc.add("## Per-trial figures", "")
    doc.add(*markdown.dashboard_pointer(name, url, resolved_paths(cfg)["artifacts"]), "")
    md_path.write_text(doc.text())
    doc.files[:0] = [md_path, csv_path]
    return doc


# ---- every study in storage ------------------------------------------------------------

COMBINED_NAME = "all-studies"  # <out_dir>/all-studies.md: what ``study=all`` adds


def write_combined(
    storage: optuna.storages.BaseStorage, url: str, overrides: Sequence[str], out_dir: Path
) -> Path | None:
    """Write ``out_dir/all-studies.md``: the report's results table (3 tasks x MNIST and
    CIFAR-10, plus any other dataset found) from every study in storage whose final stage
    finished, beside the report's numbers, with the epochs behind each; returns its path.

    Writes nothing and returns None (with a one-line warning) when a study in storage is itself
    named ``all-studies``: the table would overwrite that study's report.
    """
    path = output_path(Path(out_dir), COMBINED_NAME, ".md")
    if COMBINED_NAME in study_names(storage):
        _log.warning(
            "warning: study: not writing the combined table: it would overwrite the report of "
            "the study named %r (%s)",
            COMBINED_NAME,
            path,
        )
        return None
    frame = combined_frame(finished_finals(storage, overrides, url))
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        *markdown.combined_table(frame),
        "",
        f"Storage `{redact(url)}`. Generated {time.strftime('%Y-%m-%d %H:%M')}.",
    ]
    path.write_text("\n".join(lines) + "\n")
    return path
