"""The one owner of the service's names and path rules; everything else calls these.

A study ``NAME`` is stored as three Optuna studies, ``NAME.screen``, ``NAME.promote`` and
``NAME.final``. Each gets a random identity (``study_uid``) when it is created, and each trial's
checkpoints live in ``<checkpoints_dir>/<optuna study>-<study_uid>/trial-NNNNN/`` as
``pretrain.pt`` (encoder training) and ``probe.pt`` (the frozen-encoder classifier), keyed by the
number of the trial that started the retry chain, so a retry resumes the original's work, and
another study of the same name (a new database, another storage) never finds them. A
checkpoint also records :func:`run_fingerprint` of the settings it was trained with. When
``checkpoints_dir`` is a URL, each machine trains in :func:`checkpoint_cache_dir`, which mirrors it.

Example::

    >>> stage_study_name("quickstart", "screen")
    'quickstart.screen'
    >>> split_study_name("quickstart.screen")
    ('quickstart', 'screen')
    >>> trial_dir("runs/checkpoints", "quickstart.screen", "3f9c0a1b2c4d", 7).as_posix()
    'runs/checkpoints/quickstart.screen-3f9c0a1b2c4d/trial-00007'
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from models.checkpoints import BEST_FILE, PHASE_FILES
from search.scheduler import rungs

STAGES = ("screen", "promote", "final")
PRETRAIN_FILE = PHASE_FILES["pretrain"]  # the file names belong to the training code
PROBE_FILE = PHASE_FILES["probe"]
BEST_PRETRAIN_FILE = BEST_FILE
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


STUDY_UID_ATTR = "study_uid"  # the study user attr holding its identity
# The trial user attr of a leg that continues a configuration from a rung's checkpoint (the
# rung it starts from); absent on a configuration's first leg.
RUNG_FROM_ATTR = "rung_from"
RUNG_TO_ATTR = "rung_to"  # the trial user attr of every leg under rungs: the rung it ends at
# The machine that wrote the checkpoint a leg needs (trial user attr; see search.stages._free_retry).
WRITTEN_BY_ATTR = "checkpoint_written_on"
# The trial user attr of the train.checkpoint_every a trial ran with (a retry's original's may
# differ from its own: it is a per-run setting).
CHECKPOINT_EVERY_ATTR = "checkpoint_every"
# The trial user attr saying where its images came from, when not the dataset's original
# distribution (models.data.ImageSplits.source: a lossy JPEG copy of CIFAR-10, say).
DATA_SOURCE_ATTR = "data_source"
# Study user attr of NAME.screen: models.data.ImageSplits.digest of the images the study trains on.
DATA_DIGEST_ATTR = "data_digest"


def format_metric(name: str, value: float) -> str:
    """A metric's value as the reports show it: accuracies in percent, errors (MAE) as they are.

    >>> format_metric("val_accuracy", 0.9312), format_metric("val_mae", 0.0734)
    ('93.12%', '0.0734')
    """
    return f"{100 * value:.2f}%" if name.endswith("accuracy") else f"{value:.4f}"


NOTHING_QUEUED = "nothing queued"  # the prune reason of a trial that trained nothing
SKIPPED = "SKIPPED"  # how summaries and reports count such a trial (Optuna stores it PRUNED)
GIVEN_UP = "given up"  # how the fail reason of a leg of a configuration the user gave up starts
# How the fail reason of a trial whose training diverged starts: the name of the error the
# trainer raises, models.training.NonFiniteLossError (tests/test_naming.py checks they agree).
DIVERGED = "NonFiniteLossError"


def diverged(user_attrs: Mapping[str, Any]) -> bool:
    """Whether a failed trial with these user attrs failed because its training diverged: a
    result for a search (the configuration is worse than any that trained), not a fault."""
    return str(user_attrs.get("fail_reason") or "").startswith(DIVERGED)


_GIVEN_UP_ATTR = "given_up:"


def given_up_attr(number: int) -> str:
    """The screen study's user attr saying configuration ``number`` was given up (``python -m
    search.give_up``); its value is the user's reason.

    >>> given_up_attr(7), given_up_number(given_up_attr(7)), given_up_number("study_uid")
    ('given_up:7', 7, None)
    """
    return f"{_GIVEN_UP_ATTR}{number}"


def given_up_number(attr: str) -> int | None:
    """The configuration a screen study user attr named ``attr`` gives up (None: another attr)."""
    return int(attr[len(_GIVEN_UP_ATTR) :]) if attr.startswith(_GIVEN_UP_ATTR) else None


# User attr of a leg to the long budget skipped when popped because top_k configurations held
# its places before it (search.stages._beyond_the_long_budget): not a twin of a later copy.
BEYOND_PLACES_ATTR = "beyond_long_budget_places"


def failed_as_given_up(user_attrs: Mapping[str, Any]) -> bool:
    """Whether a trial with these user attrs is a leg of a configuration the user gave up,
    failed at once without training (its fail reason starts with :data:`GIVEN_UP`)."""
    return str(user_attrs.get("fail_reason") or "").startswith(GIVEN_UP)


def trained_nothing(user_attrs: Mapping[str, Any]) -> bool:
    """Whether a trial with these user attrs was skipped before training: a configuration the
    study already had (``duplicate_of``), a leg to a long budget whose places were held
    (:data:`BEYOND_PLACES_ATTR`), or one sampled when the queue emptied under a worker that
    could not start it (prune reason :data:`NOTHING_QUEUED`)."""
    return (
        "duplicate_of" in user_attrs
        or BEYOND_PLACES_ATTR in user_attrs
        or str(user_attrs.get("prune_reason", "")).startswith(NOTHING_QUEUED)
    )


def is_continuation(user_attrs: Mapping[str, Any]) -> bool:
    """Whether a trial with these user attrs continues a configuration (not its first leg)."""
    return RUNG_FROM_ATTR in user_attrs


# Settings that say where or how fast a run goes, not what it computes.
NOT_IDENTITY = {
    "data": ("root", "cache_dir", "download"),
    # checkpoint_every: when files are written; deterministic: which kernels (on CUDA, results
    # agree to rounding either way). Neither may make a run's own checkpoint a stranger's.
    "train": ("device", "amp", "channels_last", "progress", "checkpoint_every", "deterministic"),
}


def new_study_uid() -> str:
    """A fresh study identity (12 hex digits)."""
    return uuid.uuid4().hex[:12]


def trial_dir(checkpoints_root: str | Path, study_name: str, study_uid: str, number: int) -> Path:
    """The checkpoint folder of trial ``number`` (the original of a retry chain)."""
    return Path(checkpoints_root) / trial_dir_relative(study_name, study_uid, number)


def trial_dir_relative(study_name: str, study_uid: str, number: int) -> Path:
    """:func:`trial_dir` relative to the checkpoints folder (what trials record)."""
    return Path(f"{study_name}-{study_uid}") / f"trial-{int(number):05d}"


# A trial's learning curve: one user attr per epoch, appended as the epoch ends (never the
# whole curve rewritten), named so that they sort pretrain before probe, then by epoch.
CURVE_ATTR_PREFIX = "curve:"
_LEGACY_CURVE_ATTR = "curve"  # the whole curve in one attr, as trials stored it before


def curve_attr(phase: str, epoch: int) -> str:
    """The user attr holding epoch ``epoch`` of ``phase``: ``curve:pretrain:0003``."""
    return f"{CURVE_ATTR_PREFIX}{phase}:{epoch:04d}"


def is_curve_attr(key: str) -> bool:
    return key == _LEGACY_CURVE_ATTR or key.startswith(CURVE_ATTR_PREFIX)


def learning_curve(user_attrs: Mapping[str, Any], phase: str | None = None) -> list[dict[str, Any]]:
    """A trial's per-epoch rows (``EpochReport`` fields), pretrain then probe, by epoch;
    only ``phase``'s when given.

    >>> learning_curve({curve_attr("probe", 1): {"phase": "probe", "epoch": 1},
    ...                 curve_attr("pretrain", 2): {"phase": "pretrain", "epoch": 2}})
    [{'phase': 'pretrain', 'epoch': 2}, {'phase': 'probe', 'epoch': 1}]
    """
    # A retry of a trial stored before rows were appended inherits the whole-curve attr and
    # appends rows for the epochs it trains again: the appended row of an epoch wins.
    by_epoch = {(r["phase"], r["epoch"]): r for r in user_attrs.get(_LEGACY_CURVE_ATTR) or []}
    for key in (k for k in user_attrs if k.startswith(CURVE_ATTR_PREFIX)):
        row = user_attrs[key]
        by_epoch[(row["phase"], row["epoch"])] = row
    order = {"pretrain": 0, "probe": 1}
    rows = sorted(by_epoch.values(), key=lambda r: (order.get(r["phase"], 2), r["epoch"]))
    return [r for r in rows if phase is None or r["phase"] == phase]


def run_fingerprint(cfg: DictConfig, data_digest: str = "") -> str:
    """Hash of everything that changes the trained weights (task, data, model, train, and
    ``data_digest``: the images themselves, :attr:`models.data.ImageSplits.digest`), not of
    where the data lives or which device runs it. A checkpoint is resumed only under the same."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    keep = {k: plain[k] for k in ("task", "data", "model", "train")}
    if data_digest:  # a worker whose data.root holds other images (say, a JPEG copy)
        keep["images"] = data_digest
    for section, keys in NOT_IDENTITY.items():
        for key in keys:
            keep[section].pop(key, None)
    text = json.dumps(keep, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def checkpoint_identity(
    cfg: DictConfig, data_digest: str, written: str | None, num_classes: int = 10
) -> str:
    """The fingerprint a run resumes and writes its checkpoints under: :func:`run_fingerprint`
    with the images' digest; but for a folder whose checkpoint (identity ``written``) was made
    before the digest was part of it, the fingerprint without, so the run resumes it. (That
    the images are the study's is checked when a worker joins: search.stages.check_same_images.)

    Data of other than 10 classes (an image folder) adds its class count: its checkpoints
    written before the classifier had one output per class (always 10) do not fit the networks
    built now, and so are another run's, not one to resume. One written before the digest
    too, where it holds that classifier: the guided task pre-trains it with the encoder, so
    under such data its legacy identity is not taken and the file is set aside as written for
    other settings rather than failing to load; the other tasks' pre-training checkpoints hold
    no classifier and still resume.
    """
    legacy = run_fingerprint(cfg)
    if written == legacy and (num_classes == 10 or cfg.task != "guided"):
        return legacy
    return run_fingerprint(
        cfg, data_digest if num_classes == 10 else f"{data_digest}/{num_classes}-classes"
    )


def standalone_run_relative(cfg: DictConfig) -> Path:
    """The checkpoint folder of a ``search.train`` run (outside any stage study), relative to
    the checkpoints folder."""
    return Path("train") / f"{cfg.name}-{run_fingerprint(cfg)[:12]}"


def checkpoint_cache_dir(runs_dir: str | Path, location: str) -> Path:
    """The local folder that mirrors a ``checkpoints_dir`` URL on this machine:
    ``<runs_dir>/checkpoint-cache/<protocol>-<hash of the URL>`` (one per URL)."""
    protocol = location.split("://", 1)[0].lower()
    digest = hashlib.sha256(location.encode()).hexdigest()[:12]
    return Path(runs_dir) / "checkpoint-cache" / f"{protocol}-{digest}"


def stage_metric(cfg: DictConfig, stage: str) -> str:
    """The metric a stage's trials are ranked on: the study's, or :data:`FINAL_METRIC`."""
    from search.config import metric_of  # config validates names with this module's STAGES

    return FINAL_METRIC if stage == "final" else metric_of(cfg)


def long_budget(cfg: DictConfig) -> int:
    """Epochs of a promoted (long) run: ``stages.promote.epochs``, or ``train.epochs`` when 0."""
    return int(cfg.stages.promote.epochs or cfg.train.epochs)


def long_budget_key(cfg: DictConfig) -> str:
    """The setting that gives :func:`long_budget` its value, for messages."""
    return "stages.promote.epochs" if cfg.stages.promote.epochs else "train.epochs"


def uses_rungs(cfg: DictConfig) -> bool:
    """Whether the study is scheduled by rungs over the whole budget (``search.pruner: asha``)
    rather than by the previous screen -> barrier -> retrain pipeline."""
    return str(cfg.search.pruner.name) == "asha"


def rung_ladder(cfg: DictConfig) -> list[int]:
    """The study's rungs: geometric from ``search.pruner.min_resource`` to the long budget with
    ratio ``search.pruner.reduction_factor`` (see :func:`search.scheduler.rungs`)."""
    first = min(int(cfg.search.pruner.min_resource), long_budget(cfg))
    return rungs(first, long_budget(cfg), int(cfg.search.pruner.reduction_factor))
