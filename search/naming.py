"""The one owner of the service's names and path rules; everything else calls these.

A study ``NAME`` is stored as three Optuna studies, ``NAME.screen``, ``NAME.promote`` and
``NAME.final``. Each trial's checkpoints live in ``<checkpoints_dir>/<optuna study>/trial-NNNNN/``
as ``pretrain.pt`` (encoder training) and ``probe.pt`` (the frozen-encoder classifier), keyed by
the number of the trial that started the retry chain, so a retry resumes the original's work.

Example::

    >>> stage_study_name("quickstart", "screen")
    'quickstart.screen'
    >>> split_study_name("quickstart.screen")
    ('quickstart', 'screen')
    >>> trial_dir("runs/checkpoints", "quickstart.screen", 7).as_posix()
    'runs/checkpoints/quickstart.screen/trial-00007'
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

STAGES = ("screen", "promote", "final")
PRETRAIN_FILE = "pretrain.pt"
PROBE_FILE = "probe.pt"
# The final stage trains the frozen-encoder classifier and is ranked on its validation accuracy,
# whatever metric the screen and promote stages use.
FINAL_METRIC = "val_accuracy"


def stage_study_name(name: str, stage: str) -> str:
    """The Optuna study that holds ``stage`` of study ``name``."""
    if stage not in STAGES:
        raise ValueError(f"stage: unknown stage {stage!r}; allowed: {', '.join(STAGES)}")
    return f"{name}.{stage}"


def split_study_name(study_name: str) -> tuple[str, str] | None:
    """``(name, stage)`` of an Optuna study made by :func:`stage_study_name`, else None."""
    name, dot, stage = study_name.rpartition(".")
    if not dot or not name or stage not in STAGES:
        return None
    return name, stage


def stage_of(study_name: str) -> str:
    """The stage of an Optuna study made by :func:`stage_study_name`."""
    parts = split_study_name(study_name)
    if parts is None:
        raise ValueError(f"{study_name!r} is not a stage study (NAME.screen|promote|final)")
    return parts[1]


def trial_dir(checkpoints_root: str | Path, study_name: str, number: int) -> Path:
    """The checkpoint folder of trial ``number`` (the original of a retry chain)."""
    return Path(checkpoints_root) / study_name / f"trial-{int(number):05d}"


def standalone_run_dir(checkpoints_root: str | Path, name: str, config_digest: str) -> Path:
    """The checkpoint folder of a ``search.train`` run (outside any stage study)."""
    return Path(checkpoints_root) / "train" / f"{name}-{config_digest}"


def stage_metric(cfg: DictConfig, stage: str) -> str:
    """The metric a stage's trials are ranked on: the study's, or :data:`FINAL_METRIC`."""
    from search.config import metric_of  # config validates names with this module's STAGES

    return FINAL_METRIC if stage == "final" else metric_of(cfg)


def long_budget(cfg: DictConfig) -> int:
    """Epochs of a promoted (long) run: ``stages.promote.epochs``, or ``train.epochs`` when 0."""
    return int(cfg.stages.promote.epochs or cfg.train.epochs)
