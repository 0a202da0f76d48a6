"""The numbers behind ``python -m search.report``, as pandas DataFrames (no text here).

- :func:`trials_frame`: one row per trial of every stage (Optuna's ``Study.trials_dataframe``
  with the user attrs worth a column, and why a trial was pruned or failed): the trials CSV;
- :func:`state_counts`: trials per stage and state;
- :func:`results_frame`: the configuration found next to the published numbers, and the
  epochs behind each (:func:`search_budget`, :data:`PUBLISHED_EPOCHS`);
- :func:`combined_frame`: every finished study's test numbers beside the report's, shaped like
  the report's table (``search.report study=all``);
- :func:`baselines_frame`: the study's raw-pixel and untrained-encoder baselines beside the
  search's best;
- :func:`best_params_frame`: the best trial of each stage;
- :func:`pruning_savings`: what pruning saved in the screen stage; :func:`rung_savings`: what
  the rungs saved against training every configuration to the long budget.

:mod:`reporting.markdown` turns them into text.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import optuna
import pandas as pd
from omegaconf import DictConfig
from optuna.trial import FrozenTrial, TrialState

from reporting.artifacts import ARTIFACT_ATTR_PREFIX
from search import (
    BASELINES_ATTR,
    DATA_SOURCE_ATTR,
    RUNG_FROM_ATTR,
    RUNG_TO_ATTR,
    SKIPPED,
    STAGES,
    apply,
    config_number,
    encoder_epoch,
    failure_reason,
    found_final,
    learning_curve,
    long_budget,
    metric_of,
    stage_metric,
    top_trials,
    trained_nothing,
    uses_rungs,
)

TASK_ORDER = ("autoencoder", "guided", "contrastive")
TASK_LABELS = {
    "autoencoder": "1.2.1 self-supervised autoencoder (frozen encoder)",
    "guided": "1.2.2 classification-guided encoder",
    "contrastive": "1.2.3 contrastive / SimCLR (frozen encoder)",
}
SPLITS = ("train", "val", "test")
# The report's table (spec/report.md): accuracy in %, train / val / test; MAE train / val / test.
_PUBLISHED_COLUMNS = (
    "train_accuracy",
    "val_accuracy",
    "test_accuracy",
    "train_mae",
    "val_mae",
    "test_mae",
)
_PUBLISHED_ROWS: dict[tuple[str, str], tuple[float, ...]] = {
    ("autoencoder", "mnist"): (99.34, 98.81, 98.47, 0.0159, 0.0162, 0.0160),
    ("guided", "mnist"): (99.17, 99.03, 99.14),
    ("contrastive", "mnist"): (99.08, 98.90, 98.88),
    ("autoencoder", "cifar10"): (70.21, 63.15, 63.30, 0.296, 0.297, 0.295),
    ("guided", "cifar10"): (81.54, 81.44, 80.42),
    ("contrastive", "cifar10"): (72.38, 68.96, 69.64),
}  # fmt: skip
PUBLISHED: dict[tuple[str, str], dict[str, float]] = {
    key: dict(zip(_PUBLISHED_COLUMNS, values, strict=False))
    for key, values in _PUBLISHED_ROWS.items()
}


@dataclass(frozen=True)
class Budget:
    """Epochs behind a number: encoder training, then the frozen-encoder classifier (probe).

    ``probe`` is None for the classification-guided task (1.2.2), which trains encoder and
    classifier jointly in ``encoder`` epochs; ``max_batches`` > 0 when epochs were capped.
    """

    encoder: int
    probe: int | None
    max_batches: int = 0
    best_epoch: int | None = None  # the encoder epoch used, when an earlier one than the last
    subsets: str = ""  # the data subsets the numbers rest on (:func:`data_subsets`)

    def _epochs(self) -> str:
        encoder = str(self.encoder)
        if self.best_epoch is not None and self.best_epoch != self.encoder:
            encoder += f" (best: epoch {self.best_epoch})"
        return encoder if self.probe is None else f"{encoder} + {self.probe}"

    def __str__(self) -> str:
        """``"100 + 30"`` (``"50"`` for guided; ``"9 (best: epoch 7) + 15"`` when the final
        stage took an earlier epoch's encoder), noting a cap on batches per epoch."""
        text = self._epochs()
        if self.max_batches:
            text += f" (at most {self.max_batches} batches per epoch)"
        if self.subsets:
            text += f" (on subsets: {self.subsets})"
        return text

    @property
    def phrase(self) -> str:
        """``"100 + 30 epochs"``, ``"50 epochs"``, ``"1 + 1 epochs of at most 2 batches"``."""
        text = self._epochs()
        single = self.probe is None and self.encoder == 1
        text += " epoch" if single else " epochs"
        text += f" of at most {self.max_batches} batches" if self.max_batches else ""
        return text + (f", on subsets: {self.subsets}" if self.subsets else "")


def data_subsets(cfg: DictConfig) -> str:
    """The data subsets a study's numbers rest on, as its settings say them; "" when it used
    every image: ``"train_subset=1000, test_subset=500"``."""
    keys = ("train_subset", "val_subset", "test_subset")
    return ", ".join(f"{key}={int(cfg.data[key])}" for key in keys if int(cfg.data[key]))


def full_scale(cfg: DictConfig) -> bool:
    """Whether a study trained and was tested on all of its data in whole epochs: only such a
    study's numbers stand beside the report's when one exists (a smoke run on subsets, however
    high its validation accuracy on its few images, never outranks it)."""
    return not data_subsets(cfg) and not int(cfg.train.max_batches)


# The report's epochs for each published number: spec/report.md, "Training recipes the report
# settled on" (seed-report.txt, "Number of epochs" under MNIST and under CIFAR10): encoder
# training (1.2.1 reconstruct, 1.2.2 joint, 1.2.3 contrastive), then classification on the
# frozen encoder (none for 1.2.2, whose classifier trains with the encoder).
PUBLISHED_EPOCHS: dict[tuple[str, str], Budget] = {
    ("autoencoder", "mnist"): Budget(15, 20),
    ("guided", "mnist"): Budget(10, None),
    ("contrastive", "mnist"): Budget(100, 20),
    ("autoencoder", "cifar10"): Budget(20, 20),
    ("guided", "cifar10"): Budget(50, None),
    ("contrastive", "cifar10"): Budget(200, 30),
}
DATASET_LABELS = {"mnist": "MNIST", "cifar10": "CIFAR-10"}
REPORT_DATASETS = ("mnist", "cifar10")


def dataset_of(cfg: DictConfig) -> str:
    """The dataset study ``cfg`` ran on, as reports group studies: its ``data.name``; for an
    image folder also the folder and the family it was decoded for (two folders are two
    datasets, and one folder read grey or in colour gives other images).

    >>> from omegaconf import OmegaConf
    >>> dataset_of(OmegaConf.create({"data": {"name": "mnist", "path": ""}}))
    'mnist'
    >>> folder = {"name": "imagefolder", "path": "/d/x/../x/", "family": "auto"}
    >>> dataset_of(OmegaConf.create({"data": folder}))
    'imagefolder /d/x'
    """
    name = str(cfg.data.name)
    if name != "imagefolder":
        return name
    family = str(cfg.data.get("family", "auto"))
    folder = os.path.abspath(os.path.expanduser(str(cfg.data.path)))
    return f"{name} {folder}" if family == "auto" else f"{name} {folder} ({family})"


def search_budget(cfg: DictConfig, final: FrozenTrial) -> Budget:
    """The epochs behind a final trial's numbers: its encoder trained as a promoted trial
    (:func:`search.long_budget`), then ``train.probe.epochs`` of its frozen-encoder classifier
    (none for guided, which the final stage only evaluates)."""
    tcfg = apply(cfg, final.params)
    probe = None if str(cfg.task) == "guided" else int(tcfg.train.probe.epochs)
    return Budget(
        long_budget(cfg),
        probe,
        int(tcfg.train.max_batches),
        encoder_epoch(final.user_attrs),
        data_subsets(cfg),
    )


def published_budget(cfg: DictConfig) -> Budget | None:
    """The report's epochs for ``cfg``'s task and dataset (None where it did not run them)."""
    return PUBLISHED_EPOCHS.get((str(cfg.task), str(cfg.data.name)))


ACCURACY_COLUMNS = tuple(f"{s}_accuracy" for s in SPLITS)
MAE_COLUMNS = tuple(f"{s}_mae" for s in SPLITS)

# ---- trials ----------------------------------------------------------------------------

# Columns of the trials frame, in order: KEY_COLUMNS, RUNG_COLUMNS, params_*, ATTR_COLUMNS,
# LINK_COLUMNS, artifacts (uploads per trial), then the accuracy and MAE columns where some
# trial has them (final trials; autoencoders).
KEY_COLUMNS = ("stage", "number", "state", "value")
# Rung-scheduled studies: the configuration a leg belongs to (its first screen trial), the
# rung it continued from (empty: started from scratch), the rung it trained to, epochs added.
RUNG_COLUMNS = ("config", RUNG_FROM_ATTR, RUNG_TO_ATTR, "epochs_added")
# oom_batch_size: the batch size a configuration trained with after running out of memory
# (its params keep the sampled one). worker: host:pid/namespace; resumed_from_epoch: the
# checkpoint a retry resumed from; checkpoint_discarded: why one was not resumed from.
ATTR_COLUMNS = (
    "epochs_run", "wall_time_s", "images_per_second", "seed", "device", "oom_batch_size",
    "worker", "checkpoint_dir", "resumed_from_epoch", "checkpoint_discarded",
)  # fmt: skip
# source_study, source_trial: the promoted trial a final (or a retrained promote trial) starts
# from; a rung leg's configuration is its ``config``.
LINK_COLUMNS = (
    "reason", "source_study", "source_trial", "baseline", "datetime_start", "datetime_complete",
)  # fmt: skip
INT_COLUMNS = (
    "epochs_run", "seed", "source_trial", "oom_batch_size", "resumed_from_epoch", *RUNG_COLUMNS,
)  # fmt: skip
_DATAFRAME_ATTRS = (
    "number", "value", "datetime_start", "datetime_complete", "params", "user_attrs", "state",
)  # fmt: skip


def trial_reason(trial: FrozenTrial, trials: list[FrozenTrial]) -> str:
    """Why a trial did not complete: its failure or pruning reason ("" when it completed)."""
    if trial.state == TrialState.FAIL:
        return failure_reason(trial, trials)
    if trial.state == TrialState.PRUNED:
        return str(trial.user_attrs.get("prune_reason", "pruned"))
    return ""


def _stage_frame(stage: str, study: optuna.Study) -> pd.DataFrame:
    frame = study.trials_dataframe(attrs=_DATAFRAME_ATTRS)
    if frame.empty:
        return frame
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    every = list(trials.values())

    def attr(name: str, default: object = None) -> pd.Series | object:
        column = f"user_attrs_{name}"
        return frame[column] if column in frame.columns else default

    # With metric names set, Optuna calls the value column value_<metric>.
    value = next(c for c in frame.columns if c == "value" or c.startswith("value_"))
    # A trial skipped before training (a duplicate, nothing left to run) is not a pruned one.
    skipped = [trained_nothing(trials[n].user_attrs) for n in frame["number"]]
    state = frame["state"].where(~pd.Series(skipped, index=frame.index), SKIPPED)
    out = pd.DataFrame({"stage": stage, "number": frame["number"], "state": state})
    out["value"] = frame[value]
    for column in sorted(c for c in frame.columns if c.startswith("params_")):
        out[column] = frame[column]
    for name in (*RUNG_COLUMNS, *ATTR_COLUMNS):
        out[name] = attr(name)
    out["reason"] = [trial_reason(trials[n], every) for n in frame["number"]]
    out["source_study"] = attr("source_study")
    out["source_trial"] = attr("source_trial")
    baseline = attr("baseline", "")
    out["baseline"] = baseline.fillna("") if isinstance(baseline, pd.Series) else baseline
    out["datetime_start"] = frame["datetime_start"]
    out["datetime_complete"] = frame["datetime_complete"]
    if stage == "final":
        for name in ACCURACY_COLUMNS:
            out[name] = attr(name)
    for name in MAE_COLUMNS:
        if f"user_attrs_{name}" in frame.columns:
            out[name] = attr(name)
    out["artifacts"] = [
        sum(k.startswith(ARTIFACT_ATTR_PREFIX) for k in trials[n].system_attrs)
        for n in frame["number"]
    ]
    return out


def trials_frame(studies: Mapping[str, optuna.Study]) -> pd.DataFrame:
    """One row per trial of every stage (the trials CSV); see the module docstring."""
    frames = [f for f in (_stage_frame(s, study) for s, study in studies.items()) if not f.empty]
    if not frames:
        return pd.DataFrame(columns=list(KEY_COLUMNS))
    frame = pd.concat(frames, ignore_index=True)
    for column in INT_COLUMNS:
        frame[column] = frame[column].astype("Int64")
    params = sorted(c for c in frame.columns if c.startswith("params_"))
    results = [c for c in (*ACCURACY_COLUMNS, *MAE_COLUMNS) if c in frame.columns]
    order = [
        *KEY_COLUMNS, *RUNG_COLUMNS, *params, *ATTR_COLUMNS, *LINK_COLUMNS, "artifacts", *results,
    ]  # fmt: skip
    return frame[order]


def state_counts(frame: pd.DataFrame) -> pd.DataFrame:
    """Trials per stage (rows, in :data:`STAGES` order) and state (columns)."""
    if frame.empty:
        return pd.DataFrame()
    counts = frame.groupby(["stage", "state"]).size().unstack(fill_value=0)
    return counts.reindex([s for s in STAGES if s in counts.index])


# ---- the configuration found -----------------------------------------------------------


def results_frame(cfg: DictConfig, final: FrozenTrial) -> pd.DataFrame:
    """Rows ``found`` and, where the report ran this task and dataset, ``published`` and
    ``difference`` (found minus published); columns train/val/test accuracy in % (NaN where
    missing), then train/val/test MAE for autoencoders."""
    attrs = final.user_attrs
    columns = [*ACCURACY_COLUMNS, *(MAE_COLUMNS if "test_mae" in attrs else ())]

    def found(column: str) -> float:
        value = attrs.get(column)
        if value is None:
            return float("nan")
        return 100 * value if column in ACCURACY_COLUMNS else value

    rows = {"found": [found(c) for c in columns]}
    published = PUBLISHED.get((str(cfg.task), str(cfg.data.name)))
    if published is not None:
        rows["published"] = [published[c] for c in columns]
        rows["difference"] = [f - p for f, p in zip(rows["found"], rows["published"], strict=True)]
    return pd.DataFrame.from_dict(rows, orient="index", columns=columns)


def best_params_frame(cfg: DictConfig, studies: Mapping[str, optuna.Study]) -> pd.DataFrame:
    """One row per stage: its best trial's number, metric, value and params (None if none);
    for the final stage, the final of the configuration found (:func:`search.found_final`)."""
    rows = []
    for stage, study in studies.items():
        if stage == "final":
            t = found_final(studies, cfg)
        else:
            best = top_trials(study, 1)
            t = best[0] if best else None
        rows.append(
            {
                "stage": stage,
                "number": t.number if t else None,
                "metric": stage_metric(cfg, stage),
                "value": t.value if t else None,
                "params": dict(t.params) if t else None,
            }
        )
    frame = pd.DataFrame(rows, columns=["stage", "number", "metric", "value", "params"])
    frame["number"] = frame["number"].astype("Int64")
    return frame


@dataclass(frozen=True)
class PruningSavings:
    """Epochs the screen stage's finished trials ran, against the same trials unpruned."""

    trials: int  # completed or pruned screen trials
    pruned: int
    epochs_per_trial: int  # stages.screen.epochs
    epochs_run: int
    mean_epoch_seconds: float | None  # training + validation, over every epoch run

    @property
    def planned(self) -> int:
        return self.trials * self.epochs_per_trial

    @property
    def saved(self) -> int:
        return self.planned - self.epochs_run


def pruning_savings(cfg: DictConfig, screen: optuna.Study) -> PruningSavings | None:
    """What pruning saved in the screen stage; None before any trial completed or was pruned."""
    trials = [
        t
        for t in screen.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
        if not trained_nothing(t.user_attrs)  # a skipped duplicate trained and saved nothing
    ]
    if not trials:
        return None
    per_epoch = [
        c["seconds"] + c.get("eval_seconds", 0.0)
        for t in trials
        for c in learning_curve(t.user_attrs, "pretrain")
    ]
    return PruningSavings(
        trials=len(trials),
        pruned=sum(t.state == TrialState.PRUNED for t in trials),
        epochs_per_trial=int(cfg.stages.screen.epochs),
        epochs_run=sum(int(t.user_attrs.get("epochs_run", 0)) for t in trials),
        mean_epoch_seconds=sum(per_epoch) / len(per_epoch) if per_epoch else None,
    )


@dataclass(frozen=True)
class RungSavings:
    """Epochs the rungs trained, against every configuration trained to the long budget."""

    configurations: int  # distinct configurations with a completed leg
    legs: int  # completed legs (a new configuration's first, and each continuation)
    long_budget: int
    at_long_budget: int  # distinct configurations with a completed leg to the long budget
    epochs_run: int  # each completed leg's epochs_added: a continuation adds only its own
    failed_legs: int  # their epochs are not counted
    finished: bool  # no leg is running or queued

    @property
    def planned(self) -> int:
        return self.configurations * self.long_budget

    @property
    def saved(self) -> int:
        return self.planned - self.epochs_run


def rung_savings(cfg: DictConfig, studies: Mapping[str, optuna.Study]) -> RungSavings | None:
    """What the rungs saved (``search.pruner: asha``); None before any leg completed."""
    trials = [
        t
        for stage in ("screen", "promote")
        for t in studies[stage].get_trials(deepcopy=False)
        if "duplicate_of" not in t.user_attrs
    ]
    legs = [t for t in trials if t.state == TrialState.COMPLETE]
    if not legs:
        return None
    last = long_budget(cfg)
    return RungSavings(
        configurations=len({config_number(t) for t in legs}),
        legs=len(legs),
        long_budget=last,
        at_long_budget=len(
            {config_number(t) for t in legs if int(t.user_attrs.get(RUNG_TO_ATTR, 0)) == last}
        ),
        epochs_run=sum(int(t.user_attrs.get("epochs_added", 0)) for t in legs),
        failed_legs=sum(t.state == TrialState.FAIL for t in trials),
        finished=not any(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials),
    )


# ---- every finished study, shaped like the report's table ------------------------------

COMBINED_COLUMNS = (
    "task", "dataset", "source", "study", "final_trial", "test_accuracy", "test_mae", "epochs",
    "data_source",
)  # fmt: skip


def combined_datasets(found: Mapping[tuple[str, str], Any]) -> list[str]:
    """The report's datasets (MNIST, CIFAR-10), then any other dataset a study ran on."""
    others = sorted({dataset for _, dataset in found} - set(REPORT_DATASETS))
    return [*REPORT_DATASETS, *others]


def combined_frame(found: Mapping[tuple[str, str], tuple[DictConfig, FrozenTrial]]) -> pd.DataFrame:
    """Test accuracy (%) and test MAE of each task x dataset: one ``search`` row (the best
    finished study's final trial; NaN where no study finished) and, for the report's datasets,
    one ``report`` row; ``epochs`` is the :class:`Budget` behind the numbers, as a phrase;
    ``data_source`` where a final trial's images were not the dataset's original ones."""
    nan = float("nan")
    rows: list[dict[str, Any]] = []
    for task in TASK_ORDER:
        for dataset in combined_datasets(found):
            row: dict[str, Any] = {"task": task, "dataset": dataset, "source": "search"}
            held = found.get((task, dataset))
            if held is None:
                row.update(study=None, final_trial=None, test_accuracy=nan, test_mae=nan)
                row["epochs"] = None
            else:
                cfg, final = held
                attrs = final.user_attrs
                accuracy = attrs.get("test_accuracy")
                row.update(study=str(cfg.name), final_trial=final.number)
                row["test_accuracy"] = nan if accuracy is None else 100 * accuracy
                row["test_mae"] = attrs.get("test_mae", nan)
                row["epochs"] = search_budget(cfg, final).phrase
                row["data_source"] = attrs.get(DATA_SOURCE_ATTR)
            rows.append(row)
            if dataset in REPORT_DATASETS:
                published = PUBLISHED[(task, dataset)]
                rows.append(
                    {
                        "task": task,
                        "dataset": dataset,
                        "source": "report",
                        "study": None,
                        "final_trial": None,
                        "test_accuracy": published["test_accuracy"],
                        "test_mae": published.get("test_mae", nan),
                        "epochs": PUBLISHED_EPOCHS[(task, dataset)].phrase,
                    }
                )
    frame = pd.DataFrame(rows, columns=list(COMBINED_COLUMNS))
    frame["final_trial"] = frame["final_trial"].astype("Int64")
    return frame


# ---- baselines -------------------------------------------------------------------------

# The screen study's ``baselines`` attr: kNN accuracy on the validation split, same k and bank as
# the trials' knn_accuracy metric.
BASELINE_KEYS = {
    "raw_pixels": "raw_pixels_knn_accuracy",
    "untrained_encoder": "untrained_encoder_knn_accuracy",
}
BASELINE_COLUMNS = ("row", "stage", "number", "state", "epochs", "metric", "value")


def stored_baselines(screen: optuna.Study) -> dict[str, float] | None:
    """The baselines the search recorded on the screen study (None for an older study)."""
    stored = screen.user_attrs.get(BASELINES_ATTR)
    return dict(stored) if isinstance(stored, Mapping) else None


def _last_value(trial: FrozenTrial) -> float | None:
    if trial.value is not None:
        return float(trial.value)
    if trial.intermediate_values:
        return float(trial.intermediate_values[max(trial.intermediate_values)])
    return None


def _furthest_leg(
    cfg: DictConfig, studies: Mapping[str, optuna.Study], first: FrozenTrial
) -> tuple[str, FrozenTrial]:
    """(stage, trial): under rungs, the completed leg of ``first``'s configuration that went
    furthest (it may have been continued); else ``first`` itself."""
    if not uses_rungs(cfg):
        return "screen", first
    number = config_number(first)
    legs = [
        (int(t.user_attrs.get(RUNG_TO_ATTR, 0)), stage, t)
        for stage in ("screen", "promote")
        if stage in studies
        for t in studies[stage].get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if config_number(t) == number and "duplicate_of" not in t.user_attrs
    ]
    if not legs:
        return "screen", first
    _, stage, trial = max(legs, key=lambda leg: leg[0])
    return stage, trial


def baselines_frame(cfg: DictConfig, studies: Mapping[str, optuna.Study]) -> pd.DataFrame:
    """What the search must beat, beside what it got, one row each (``row`` column):

    - ``raw_pixels``, ``untrained_encoder``: the recorded kNN baselines (NaN when not recorded);
    - ``report_configuration``: the report's own configuration (the screen trial with user attr
      ``baseline == "report"``; under rungs its furthest completed leg), its value or, when
      pruned, its last reported value;
    - ``best_screen``, ``best_promote``: the best completed trial of each stage.

    Values are fractions in [0, 1] in ``metric``; missing trials are left out.
    """
    metric = metric_of(cfg)
    stored = stored_baselines(studies["screen"]) or {}
    nan = float("nan")
    rows: list[dict[str, Any]] = [
        {"row": row, "metric": "knn_accuracy", "value": stored.get(key, nan)}
        for row, key in BASELINE_KEYS.items()
    ]
    screen = studies["screen"].get_trials(deepcopy=False)
    # The original and its retries all carry the marker (a retry copies the user attrs): the
    # attempt that finished (completed or pruned) stands for it, else the last one.
    report = [t for t in screen if t.user_attrs.get("baseline") == "report"]
    finished = [t for t in report if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    candidates: list[tuple[str, str, FrozenTrial | None]] = [
        ("report_configuration", *_furthest_leg(cfg, studies, (finished or report)[-1]))
        if report
        else ("report_configuration", "screen", None),
    ]
    for stage in ("screen", "promote"):
        if stage in studies:
            best = top_trials(studies[stage], 1)
            candidates.append((f"best_{stage}", stage, best[0] if best else None))
    for row, stage, trial in candidates:
        value = None if trial is None else _last_value(trial)
        if trial is None or value is None:
            continue
        rows.append(
            {
                "row": row,
                "stage": stage,
                "number": trial.number,
                "state": trial.state.name,
                "epochs": trial.user_attrs.get("epochs_run"),
                "metric": metric,
                "value": value,
            }
        )
    frame = pd.DataFrame(rows, columns=list(BASELINE_COLUMNS))
    for column in ("number", "epochs"):
        frame[column] = frame[column].astype("Int64")
    return frame
