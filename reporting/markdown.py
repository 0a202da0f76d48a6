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
    TASK_LABELS,
    PruningSavings,
    best_params_frame,
    results_frame,
)
from search import STAGES, long_budget, metric_of, redact


def table(head: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table."""
    return [
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def heading(name: str, cfg: DictConfig, url: str) -> list[str]:
    """Title, description, and the storage, metric and stage budgets the study ran with."""
    return [
        f"# {name}: {TASK_LABELS[cfg.task]} on {cfg.data.name}",
        "",
        f"{cfg.description}".strip() or "",
        "",
        f"Storage `{redact(url)}`, metric `{metric_of(cfg)}`; screen {cfg.stages.screen.trials} "
        f"trials x {cfg.stages.screen.epochs} epochs, promote top {cfg.stages.promote.top_k} for "
        f"{long_budget(cfg)} epochs. Generated {time.strftime('%Y-%m-%d %H:%M')}.",
    ]


def _missing(value: float) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def results_table(cfg: DictConfig, final: FrozenTrial | None) -> list[str]:
    """The found configuration's numbers beside the report's (see :func:`results_frame`)."""
    if final is None:
        return ["No final trial completed, so there are no train / validation / test numbers yet."]
    frame = results_frame(cfg, final)
    has_mae = len(frame.columns) > len(ACCURACY_COLUMNS)

    def cells(row: str, accuracy: str, mae: str, suffix: str = "") -> list[str]:
        return [
            "-"
            if _missing(v)
            else (f"{v:{accuracy}}{suffix}" if c in ACCURACY_COLUMNS else f"{v:{mae}}")
            for c, v in frame.loc[row].items()
        ]

    head = ["", "accuracy train (%)", "val (%)", "test (%)"]
    if has_mae:
        head += ["MAE train", "MAE val", "MAE test"]
    rows = [[f"this search (final #{final.number})", *cells("found", ".2f", ".4f")]]
    if "published" not in frame.index:
        return [
            *table(head, rows),
            "",
            f"The report did not run {cfg.task} on {cfg.data.name} (it used MNIST and CIFAR-10), "
            "so there are no published numbers to compare with.",
        ]
    label = f"report ({TASK_LABELS[cfg.task].split(' ')[0]} {cfg.data.name})"
    rows.append([label, *cells("published", ".2f", ".4f")])
    rows.append(["difference", *cells("difference", "+.2f", "+.4f", " pp")])
    note = "Differences are this search minus the report (accuracy in percentage points"
    note += "; for MAE lower is better" if has_mae else ""
    units = "pixels in [0, 1]" if cfg.data.name == "mnist" else "normalized pixels"
    note += f", MAE in {units})." if has_mae else ")."
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
        rows.append([r.stage, f"#{r.number}", f"{r.metric} {r.value:.4f}", params or "-"])
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
    """Where every trial's own figures are, and the command that shows them."""
    return [
        "Every trial's learning curves (and, for autoencoders, validation reconstructions) are "
        "in Optuna's artifact store; browse them (read-only, on this machine) with",
        "",
        f"    python -m search.dashboard study={name} storage={redact(url)} "
        f"artifacts_dir={artifacts_dir}",
    ]
