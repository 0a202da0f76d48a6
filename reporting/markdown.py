"""The text of ``python -m search.report``: markdown lines rendered from :mod:`reporting.tables`.

Every function returns a list of lines (no trailing newlines); a table that has no data yet
becomes a sentence saying so.
"""

from __future__ import annotations

import math
import time
from typing import Any

import pandas as pd
from omegaconf import DictConfig
from optuna.trial import FrozenTrial

from reporting.tables import (
    ACCURACY_COLUMNS,
    DATASET_LABELS,
    REPORT_DATASETS,
    TASK_LABELS,
    TASK_ORDER,
    PruningSavings,
    RungSavings,
    best_params_frame,
    published_budget,
    results_frame,
    search_budget,
)
from search import (
    DATA_SOURCE_ATTR,
    STAGES,
    STORAGE_ENV,
    format_metric,
    has_secret,
    long_budget,
    metric_of,
    redact,
    rung_ladder,
    uses_rungs,
)

# What the epochs column of a results table counts.
EPOCHS_HEAD = "epochs (encoder + classifier)"
EPOCHS_NOTE = (
    "Epochs are encoder training + training of the classifier on the frozen encoder; the "
    "classification-guided task (1.2.2) trains encoder and classifier together, one number. "
    "Numbers trained for different epochs are not a like-for-like comparison."
)


def table(head: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table."""
    return [
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def heading(name: str, cfg: DictConfig, url: str, savings: RungSavings | None = None) -> list[str]:
    """Title, description, the storage, metric and stage budgets of the study's last run, and
    (under rungs, ``savings``) what the study holds: a rerun may have changed the budgets."""
    held = ""
    if savings is not None:
        held = (
            f" It holds {_count(savings.configurations, 'configuration')}, "
            f"{savings.at_long_budget} of them trained to {savings.long_budget} epochs."
        )
    return [
        f"# {name}: {TASK_LABELS[cfg.task]} on {cfg.data.name}",
        "",
        f"{cfg.description}".strip() or "",
        "",
        f"Storage `{redact(url)}`, metric `{metric_of(cfg)}`; {_budgets(cfg)} (the settings of "
        f"its last run).{held} Generated {time.strftime('%Y-%m-%d %H:%M')}.",
    ]


def _budgets(cfg: DictConfig) -> str:
    """How the study spends its epochs, in the words of its method."""
    top_k, long = cfg.stages.promote.top_k, long_budget(cfg)
    if uses_rungs(cfg):
        ladder = ", ".join(str(r) for r in rung_ladder(cfg))
        return (
            f"up to {cfg.stages.screen.trials} configurations on rungs of {ladder} epochs "
            f"(eta {cfg.search.pruner.reduction_factor}), at most {top_k} continued to {long}"
        )
    return (
        f"screen {cfg.stages.screen.trials} trials x {cfg.stages.screen.epochs} epochs, "
        f"promote top {top_k} for {long} epochs"
    )


def _missing(value: float) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def results_table(cfg: DictConfig, final: FrozenTrial | None) -> list[str]:
    """The found configuration's numbers beside the report's (see :func:`results_frame`), each
    with the epochs behind it (:func:`reporting.tables.search_budget`, ``PUBLISHED_EPOCHS``)."""
    if final is None:
        return ["No final trial completed, so there are no train / validation / test numbers yet."]
    frame = results_frame(cfg, final)
    has_mae = len(frame.columns) > len(ACCURACY_COLUMNS)
    ours = search_budget(cfg, final)

    def cells(row: str, accuracy: str, mae: str, suffix: str = "") -> list[str]:
        return [
            "-"
            if _missing(v)
            else (f"{v:{accuracy}}{suffix}" if c in ACCURACY_COLUMNS else f"{v:{mae}}")
            for c, v in frame.loc[row].items()
        ]

    head = ["", EPOCHS_HEAD, "accuracy train (%)", "val (%)", "test (%)"]
    if has_mae:
        head += ["MAE train", "MAE val", "MAE test"]
    rows = [[f"this search (final #{final.number})", str(ours), *cells("found", ".2f", ".4f")]]
    if "published" not in frame.index:
        return [
            *table(head, rows),
            "",
            f"The report did not run {cfg.task} on {cfg.data.name} (it used MNIST and CIFAR-10), "
            f"so there are no published numbers to compare with. {EPOCHS_NOTE}",
        ]
    theirs = published_budget(cfg)
    label = f"report ({TASK_LABELS[cfg.task].split(' ')[0]} {cfg.data.name})"
    rows.append([label, str(theirs), *cells("published", ".2f", ".4f")])
    same = theirs is not None and (ours.encoder, ours.probe) == (theirs.encoder, theirs.probe)
    rows.append(
        [
            "difference",
            # Both picked their encoder epoch on validation, within the same training budget.
            ("same budget" if ours.best_epoch not in (None, ours.encoder) else "same")
            if same
            else "differ",
            *cells("difference", "+.2f", "+.4f", " pp"),
        ]
    )
    note = "Differences are this search minus the report (accuracy in percentage points"
    note += "; for MAE lower is better" if has_mae else ""
    units = "pixels in [0, 1]" if cfg.data.name == "mnist" else "normalized pixels"
    note += f", MAE in {units})." if has_mae else ")."
    note += f" {EPOCHS_NOTE}"
    if not same and theirs is not None:
        note += (
            f" Here they differ: this search's numbers come from {ours} epochs, the report's "
            f"from {theirs}."
        )
    source = final.user_attrs.get(DATA_SOURCE_ATTR)
    if source:
        note += f" This search's images came from {source}."
    return [*table(head, rows), "", note]


def provenance(final: FrozenTrial) -> list[str]:
    """Which promoted trial's encoder the final trial trained on."""
    a = final.user_attrs
    return [
        f"Final trial #{final.number} trains on the encoder of {a.get('source_study')} "
        f"trial #{a.get('source_trial')} (seed {a.get('seed')})."
    ]


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def best_params_table(cfg: DictConfig, studies: dict[str, Any]) -> list[str]:
    """The best trial of each stage with its value and parameters."""
    rows = []
    for r in best_params_frame(cfg, studies).itertuples(index=False):
        if r.params is None:
            rows.append([r.stage, "-", "-", "no completed trial"])
            continue
        params = ", ".join(f"`{k}={_format_value(v)}`" for k, v in sorted(r.params.items()))
        rows.append(
            [
                r.stage,
                f"#{r.number}",
                f"{r.metric} {format_metric(r.metric, r.value)}",
                params or "-",
            ]
        )
    return table(["stage", "best trial", "value", "params"], rows)


def state_counts_table(counts: pd.DataFrame) -> list[str]:
    """Trials per stage and state (the frame of :func:`reporting.tables.state_counts`)."""
    if counts.empty:
        return ["The study has no trials yet."]
    states = list(counts.columns)
    rows = [
        [stage, *(str(int(counts.loc[stage, s])) for s in states)]
        for stage in STAGES
        if stage in counts.index
    ]
    return table(["stage", *(s.lower() for s in states)], rows)


def savings_heading(cfg: DictConfig) -> str:
    return "## What the rungs saved" if uses_rungs(cfg) else "## What pruning saved"


def rung_sentences(savings: RungSavings | None) -> list[str]:
    """What the rungs saved against every configuration trained to the long budget."""
    if savings is None:
        return ["No leg has completed yet, so the rungs have saved nothing yet."]
    s = savings
    failed = f"; {_count(s.failed_legs, 'failed leg')} not counted" if s.failed_legs else ""
    return [
        ("The" if s.finished else "So far (the study is not finished), the")
        + f" rungs trained {_count(s.configurations, 'configuration')} in "
        f"{_count(s.legs, 'completed leg')} for **{_count(s.epochs_run, 'epoch')}** (a continued "
        f"leg counts the epochs it added{failed}); each trained to the long budget, the same "
        f"configurations would have run {s.configurations} x {s.long_budget} = "
        f"**{s.planned} epochs**. The rungs saved **{s.saved} epochs "
        f"({100 * s.saved / s.planned:.0f}%)**."
    ]


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def pruning_sentences(savings: PruningSavings | None) -> list[str]:
    """What pruning saved in the screen stage, in epochs and (roughly) minutes."""
    if savings is None:
        return ["No screen trial completed or was pruned, so pruning saved nothing yet."]
    s = savings
    lines = [
        f"The screen stage ran {s.trials} trials ({s.pruned} pruned) for **{s.epochs_run} epochs** "
        f"in all; unpruned, the same trials would have run {s.trials} x {s.epochs_per_trial} = "
        f"**{s.planned} epochs**. Pruning saved **{s.saved} epochs "
        f"({100 * s.saved / s.planned:.0f}%)**."
    ]
    if s.mean_epoch_seconds is not None and s.saved:
        lines.append(
            f"At the screen's mean of {s.mean_epoch_seconds:.1f} s per epoch (training + "
            f"validation), that is about {s.saved * s.mean_epoch_seconds / 60:.1f} minutes of "
            "compute."
        )
    return lines


def csv_pointer(csv_name: str) -> list[str]:
    """The sentence linking the trials CSV."""
    return [
        f"Every trial, with its parameters, epochs, wall time, throughput, seed, device and "
        f"why it was pruned or failed: [{csv_name}]({csv_name})."
    ]


def dashboard_pointer(name: str, url: str, artifacts_dir: Any) -> list[str]:
    """Where every trial's own figures are, and the command that shows them (a URL with a
    password is left to the environment: printed masked, it could not be run)."""
    storage = "" if has_secret(url) else f"storage={url} "
    lines = [
        "Every trial's learning curves (and, for autoencoders, validation reconstructions) are "
        "in Optuna's artifact store; browse them (read-only, on this machine) with",
        "",
        f"    python -m search.dashboard study={name} {storage}artifacts_dir={artifacts_dir}",
    ]
    if has_secret(url):
        lines += ["", f"with the storage URL ({redact(url)}) in `{STORAGE_ENV}`."]
    return lines


# ---- baselines -------------------------------------------------------------------------

# What a study's metric other than kNN accuracy measures, for the baselines' caveat.
METRIC_MEANINGS = {
    "val_accuracy": "the accuracy of the classifier trained with the encoder",
    "val_mae": "the reconstruction error, lower is better",
}

BASELINE_LABELS = {
    "raw_pixels": "raw pixels (no network), kNN",
    "untrained_encoder": "the study's encoder, untrained (random weights), kNN",
    "report_configuration": "the study's own settings, trained",
    "best_screen": "best screen trial",
    "best_promote": "best promoted trial",
}


def baselines_section(cfg: DictConfig, frame: pd.DataFrame) -> list[str]:
    """The raw-pixel and untrained-encoder baselines beside the search's best (the frame of
    :func:`reporting.tables.baselines_frame`), and what they mean."""
    rows = []
    recorded = True
    for r in frame.itertuples(index=False):
        label = BASELINE_LABELS[r.row]
        if r.row in ("raw_pixels", "untrained_encoder"):
            if _missing(r.value):
                recorded = False
                rows.append([label, "-", r.metric, "not recorded"])
            else:
                rows.append([label, "-", r.metric, f"{100 * r.value:.2f}%"])
            continue
        state = "" if r.state == "COMPLETE" else f", {r.state.lower()}"
        epochs = "?" if pd.isna(r.epochs) else str(int(r.epochs))
        trial = f"{r.stage} #{r.number} ({epochs} epoch{'' if epochs == '1' else 's'}{state})"
        rows.append([label, trial, r.metric, format_metric(r.metric, r.value)])
    lines = [*table(["", "trial", "metric (validation)", "value"], rows), ""]
    if not recorded:
        lines.append(
            "The raw-pixel and untrained-encoder baselines were not recorded for this study "
            "(yet: the first run of the study scores them before its first trial; a study made "
            "by an older version of the search has none)."
        )
    else:
        lines.append(
            "Both baselines are kNN accuracy on the validation split with the trials' own k "
            f"({cfg.train.knn_k}) and bank of training images: *raw pixels* votes with the "
            "(normalized) images themselves, no network at all; *untrained encoder* votes with "
            "the latents of the study's own encoder before any training. A learned latent space "
            "is worth its training only by as much as it beats both."
        )
        lines.extend(_below_baselines(frame))
    if "report_configuration" in set(frame["row"]):
        lines.append(
            "*The study's own settings* are its study file's values with any overrides (for the "
            "report's studies, the report's configuration), queued as the first configuration; a "
            "value outside the search space is left to the sampler."
        )
    if metric_of(cfg) != "knn_accuracy":
        lines.append(
            f"This study ranks trials by `{metric_of(cfg)}` "
            f"({METRIC_MEANINGS.get(metric_of(cfg), 'another measurement')}), not kNN accuracy: "
            "its rows and the two baselines are not the same measurement."
        )
    return lines


def _below_baselines(frame: pd.DataFrame) -> list[str]:
    """A sentence when the search's best kNN accuracy does not beat a baseline (else none)."""
    values = {r.row: r.value for r in frame.itertuples(index=False)}
    found = [
        r.value
        for r in frame.itertuples(index=False)
        if r.row not in ("raw_pixels", "untrained_encoder")
        and r.metric == "knn_accuracy"
        and not _missing(r.value)
    ]
    if not found:
        return []
    best = max(found)
    beaten = [
        f"the {name} baseline ({format_metric('knn_accuracy', values[row])})"
        for row, name in (("raw_pixels", "raw-pixel"), ("untrained_encoder", "untrained-encoder"))
        if row in values and not _missing(values[row]) and best <= values[row]
    ]
    if not beaten:
        return []
    return [
        f"**The search's best ({format_metric('knn_accuracy', best)}) does not beat "
        f"{' or '.join(beaten)}**: on "
        "this problem, at these budgets, the learned latent space is no better for kNN than "
        "that baseline."
    ]


# ---- every finished study --------------------------------------------------------------


def combined_table(frame: pd.DataFrame) -> list[str]:
    """The report's table for every finished study (the frame of :func:`combined_frame`):
    test accuracy of each task and the autoencoder's test MAE, this search beside the report,
    with the epochs behind each number; '-' where no study finished."""
    datasets = list(dict.fromkeys(frame["dataset"]))  # the report's first, in frame order
    head = ["task"]
    for dataset in datasets:
        shown = DATASET_LABELS.get(dataset, dataset).replace("|", "\\|")  # a folder's name
        head.append(f"{shown}: this search")
        if dataset in REPORT_DATASETS:
            head.append(f"{shown}: report")

    def cell(task: str, dataset: str, source: str, column: str, fmt: str) -> str:
        found = frame[
            (frame["task"] == task) & (frame["dataset"] == dataset) & (frame["source"] == source)
        ]
        if found.empty or _missing(found.iloc[0][column]):
            return "-"
        r = found.iloc[0]
        text = f"{r[column]:{fmt}} ({r['epochs']})"
        return text if source == "report" else f"{text}, `{r['study']}` final #{r['final_trial']}"

    rows = []
    for label, column, fmt, tasks in (
        ("test accuracy (%)", "test_accuracy", ".2f", TASK_ORDER),
        ("reconstruction MAE, test", "test_mae", ".4f", ("autoencoder",)),
    ):
        for task in tasks:
            row = [f"{TASK_LABELS[task]}: {label}"]
            for dataset in datasets:
                row.append(cell(task, dataset, "search", column, fmt))
                if dataset in REPORT_DATASETS:
                    row.append(cell(task, dataset, "report", column, fmt))
            rows.append(row)
    shown = frame[frame["data_source"].notna()].drop_duplicates("study")
    sources = [
        f"`{r['study']}` read its images from {r['data_source']}." for _, r in shown.iterrows()
    ]
    sources = ["", " ".join(sources)] if sources else []
    return [
        "# All studies: test numbers beside the report's",
        "",
        *table(head, rows),
        "",
        "Each cell of this search is the final trial of the configuration found (the best run "
        "at the long budget) of one of the studies in this storage that ran that task on that "
        "dataset: one on all its data before one on subsets, then the higher validation "
        "accuracy; '-' where none finished. "
        f"{EPOCHS_NOTE} MAE is in pixels in [0, 1] for MNIST and normalized pixels for CIFAR-10.",
        *sources,
    ]
