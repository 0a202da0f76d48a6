"""Finding a study in storage, its stored config, and the networks its final trial trained.

Everything :mod:`reporting.report` reads from storage or from the checkpoint folders goes
through here; names and paths come from :mod:`search.naming`, the database from the search
layer's public API.

Example::

    name, cfg = locate("quickstart", ["runs_dir=runs"])
    storage = open_existing_storage(storage_url(cfg))
    cfg = stored_config(storage, name, [], storage_url(cfg))
    studies = stage_studies(storage, name)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
from omegaconf import DictConfig, OmegaConf
from optuna.trial import FrozenTrial

from models.checkpoints import load_checkpoint
from models.data import load_splits
from models.errors import UsageError
from models.training import Run, load_modules
from reporting.tables import dataset_of, full_scale
from search import (
    BEST_PRETRAIN_FILE,
    PRETRAIN_FILE,
    PROBE_FILE,
    STAGES,
    ConfigError,
    apply,
    checkpoint_store,
    configuration_pretrain_curve,
    found_final,
    load_locations,
    merge_overrides,
    open_storage,
    redact,
    split_study_name,
    stage_study_name,
    study_path,
    to_dataclasses,
)

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


def locate(study: str, overrides: Sequence[str]) -> tuple[str | None, DictConfig]:
    """(study name or None for ``all``, a config giving the storage URL and folders)."""
    if study == "all":
        return None, merge_overrides({}, overrides)
    try:
        study_path(study)
    except ConfigError:  # not a study file: a name of a study in storage
        return study, merge_overrides({}, overrides)
    cfg = load_locations(study, list(overrides))  # read only: not checked for training here
    return str(cfg.name), cfg


def open_existing_storage(url: str) -> optuna.storages.BaseStorage:
    """Open existing storage; a missing SQLite file, or a database without Optuna's tables, is
    a :class:`~search.StorageError` naming it, not a new database (nothing is written to it)."""
    return open_storage(url, create=False)


def unsafe_name_reason(name: str) -> str | None:
    """Why study ``name`` cannot name report files (``NAME.md`` ...), or None when it can.

    A name found in storage is not checked by the config's name rule: optuna-dashboard (with
    ``--allow-edits``) or any Optuna client can rename a study to ``../../outside``. A usable
    name is a single file name: no path separator, no NUL or other control character, not
    ``.`` or ``..``.
    """
    if not name:
        return "it is empty"
    if any(sep in name for sep in ("/", "\\")):
        return "it holds a path separator, so its files would leave the report folder"
    if name in (".", ".."):
        return "it names a folder, not a file"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "it holds a control character"
    return None


_log = logging.getLogger(__name__)
_warned: set[str] = set()


def study_names(storage: optuna.storages.BaseStorage) -> list[str]:
    """Names of the studies (``<name>`` of ``<name>.screen`` etc.) held in ``storage``.

    Names that cannot name report files (:func:`unsafe_name_reason`) are left out, each with a
    one-line warning on stderr (once per process).
    """
    parts = (split_study_name(s.study_name) for s in storage.get_all_studies())
    names = sorted({p[0] for p in parts if p is not None})
    for name in names:
        reason = unsafe_name_reason(name)
        if reason is not None and name not in _warned:
            _warned.add(name)
            # No handler is configured below the CLI: logging's last resort prints the message
            # alone, one line on stderr.
            _log.warning("warning: study: skipping %r in storage: %s", name, reason)
    return [name for name in names if unsafe_name_reason(name) is None]


def has_stored_config(storage: optuna.storages.BaseStorage, name: str) -> bool:
    """Whether study ``name``'s screen study holds the config the search stores; a run stopped
    between creating the study and storing it leaves one without (running it again finishes
    it)."""
    try:
        study_id = storage.get_study_id_from_name(stage_study_name(name, "screen"))
    except KeyError:
        return False
    return "config" in storage.get_study_user_attrs(study_id)


def require_study(storage: optuna.storages.BaseStorage, name: str, url: str, hint: str = "") -> int:
    """The storage id of study ``name``'s screen study; a :class:`UsageError` naming the
    studies ``url`` does hold (and ``hint``, what to do instead) when it is not there."""
    try:
        return storage.get_study_id_from_name(stage_study_name(name, "screen"))
    except KeyError as error:
        raise UsageError(
            f"study: no study {name!r} in {redact(url)}; found: "
            f"{', '.join(study_names(storage)) or 'none'}{hint}"
        ) from error


def stored_config(
    storage: optuna.storages.BaseStorage, name: str, overrides: Sequence[str], url: str
) -> DictConfig:
    """The resolved config the study ran with (stored by the search), then ``overrides``."""
    study_id = require_study(storage, name, url)
    stored = storage.get_study_user_attrs(study_id).get("config")
    if stored is None:
        raise UsageError(f"study: {name!r} in {redact(url)} has no stored config")
    stored = dict(stored)
    stored.pop("storage", None)  # stored redacted; the URL in use is the right one
    cfg = merge_overrides(stored, overrides)
    cfg.storage = url
    return cfg


def stage_studies(storage: optuna.storages.BaseStorage, name: str) -> dict[str, optuna.Study]:
    """stage -> the Optuna study of that stage of study ``name``, in :data:`STAGES` order."""
    return {
        stage: optuna.load_study(study_name=stage_study_name(name, stage), storage=storage)
        for stage in STAGES
    }


def source_trial(storage: optuna.storages.BaseStorage, final: FrozenTrial) -> FrozenTrial | None:
    """The promoted trial whose encoder a final trial continues (None when it is gone)."""
    source, number = final.user_attrs.get("source_study"), final.user_attrs.get("source_trial")
    if source is None or number is None:
        return None
    try:
        study = optuna.load_study(study_name=str(source), storage=storage)
    except KeyError:
        return None
    return next((t for t in study.get_trials(deepcopy=False) if t.number == int(number)), None)


def pretrain_curve(
    storage: optuna.storages.BaseStorage, cfg: DictConfig, source: FrozenTrial
) -> list[dict[str, Any]]:
    """The pretraining rows (by epoch) of the configuration behind promoted trial ``source``:
    under rungs, of every completed leg it was trained in; otherwise ``source``'s own
    (:func:`search.configuration_pretrain_curve`)."""
    legs: list[FrozenTrial] = []
    for stage in ("screen", "promote"):
        try:
            study = optuna.load_study(study_name=stage_study_name(cfg.name, stage), storage=storage)
        except KeyError:
            continue
        legs.extend(study.get_trials(deepcopy=False))
    return configuration_pretrain_curve(source, legs)


def same_dataset_finals(
    storage: optuna.storages.BaseStorage, cfg: DictConfig, overrides: Sequence[str], url: str
) -> dict[str, tuple[DictConfig, FrozenTrial]]:
    """task -> (config, final trial: :func:`search.found_final`) of a study on ``cfg``'s
    dataset in ``storage``.

    The study ``cfg`` itself wins for its own task; otherwise a study on all its data
    (:func:`reporting.tables.full_scale`) before one on subsets, then the best final validation
    accuracy.
    """
    found: dict[str, tuple[DictConfig, FrozenTrial]] = {}
    dataset = _stored_dataset(storage, cfg.name, url, cfg)
    for name in study_names(storage):
        try:
            other = (
                cfg
                if name == cfg.name
                else stored_config(storage, name, location_overrides(overrides), url)
            )
            stages = stage_studies(storage, name)
        except (UsageError, ConfigError, KeyError):
            continue
        if _stored_dataset(storage, name, url, other) != dataset:
            continue
        final = found_final(stages, other)
        if final is None:
            continue
        task = str(other.task)
        held = found.get(task)
        if name == cfg.name or (
            held is None or (held[0].name != cfg.name and _outranks(other, final, held))
        ):
            found[task] = (other, final)
    return found


def _stored_dataset(
    storage: optuna.storages.BaseStorage, name: str, url: str, cfg: DictConfig
) -> str:
    """The dataset study ``name`` ran on (:func:`reporting.tables.dataset_of`), from its config
    as stored: a ``data.path`` override given to the report (a moved folder) applies to every
    study and so cannot tell their folders apart. ``cfg``: its config, if none is stored."""
    try:
        return dataset_of(stored_config(storage, name, [], url))
    except (UsageError, ConfigError, KeyError):
        return dataset_of(cfg)


def _outranks(cfg: DictConfig, final: FrozenTrial, held: tuple[DictConfig, FrozenTrial]) -> bool:
    """Whether study ``cfg``'s best final trial should stand for its task and dataset instead of
    ``held``'s: a study on all its data before one on subsets, then the higher final value."""
    return (full_scale(cfg), final.value) > (full_scale(held[0]), held[1].value)


def finished_finals(
    storage: optuna.storages.BaseStorage, overrides: Sequence[str], url: str
) -> dict[tuple[str, str], tuple[DictConfig, FrozenTrial]]:
    """(task, dataset) -> (config, final trial: :func:`search.found_final`) over every study in
    ``storage`` with a completed final stage; where several studies ran the same task and dataset, one on all its
    data (:func:`reporting.tables.full_scale`) before one on subsets, then the best final
    validation accuracy (the study name breaks ties)."""
    found: dict[tuple[str, str], tuple[DictConfig, FrozenTrial]] = {}
    for name in study_names(storage):
        try:
            cfg = stored_config(storage, name, location_overrides(overrides), url)
            stages = stage_studies(storage, name)
        except (UsageError, ConfigError, KeyError):
            continue
        final = found_final(stages, cfg)
        if final is None:
            continue
        key = (str(cfg.task), _stored_dataset(storage, name, url, cfg))
        held = found.get(key)
        if held is None or _outranks(cfg, final, held):
            found[key] = (cfg, final)
    return found


# ---- rebuilding the final trial's networks ---------------------------------------------


class SplitsCache:
    """Loaded data splits, keyed by the data settings (studies on one dataset share them)."""

    def __init__(self) -> None:
        self._cache: dict[str, Any] = {}

    def get(self, tcfg: DictConfig) -> Any:
        data_cfg, _, _ = to_dataclasses(tcfg)
        key = json.dumps(OmegaConf.to_container(tcfg.data, resolve=True), sort_keys=True)
        if key not in self._cache:
            self._cache[key] = load_splits(data_cfg)
        return self._cache[key]


def final_checkpoint_paths(cfg: DictConfig, final: FrozenTrial) -> tuple[Path, Path]:
    """(pretrain file of the promoted trial it continues, probe file of the final trial).

    Both folders are the ones the trials recorded (``source_checkpoint_dir``, ``checkpoint_dir``,
    relative to the checkpoints folder); when ``checkpoints_dir`` is a URL their files are
    fetched into this machine's cache first. Raises FileNotFoundError when one is not recorded.
    """
    store = checkpoint_store(cfg)
    checkpoints = store.root
    attrs = final.user_attrs
    missing = [k for k in ("source_checkpoint_dir", "checkpoint_dir") if not attrs.get(k)]
    if missing:
        raise FileNotFoundError(
            f"final trial #{final.number} records no {' or '.join(missing)} "
            "(run by an older version of the search?)"
        )
    # The encoder the final trial trained on: its recorded choice (best epoch or last).
    chosen = str(attrs.get("encoder_checkpoint", ""))
    encoder = BEST_PRETRAIN_FILE if chosen.startswith("best") else PRETRAIN_FILE
    source = checkpoints / str(attrs["source_checkpoint_dir"]) / encoder
    probe = checkpoints / str(attrs["checkpoint_dir"]) / PROBE_FILE
    for path in (source, probe):
        if not path.resolve().is_relative_to(checkpoints.resolve()):
            raise FileNotFoundError(
                f"final trial #{final.number} records a checkpoint folder outside "
                f"{store.where()}: {path.parent}"
            )
    for path in (source, probe):
        try:
            store.pull(path.parent.relative_to(checkpoints))
        except OSError as error:
            raise FileNotFoundError(str(error)) from error
    if store.remote and not source.is_file():
        relative = source.parent.relative_to(checkpoints)
        raise FileNotFoundError(f"no checkpoint at {store.where(relative, source.name)}")
    return source, probe


def rebuild_final_run(
    cfg: DictConfig, final: FrozenTrial, device: str = "auto", splits: Any = None
) -> Run:
    """The final trial's trained networks as a :class:`models.training.Run` (eval only).

    Built like the search's own trials (stored config + trial params via
    :func:`search.space.apply`), the encoder (and decoder / classifier / projection) loaded
    from the promoted trial's pretrain checkpoint, and the probe's classifier from the final
    trial's probe checkpoint. Raises FileNotFoundError when a checkpoint is missing.
    """
    tcfg = apply(cfg, final.params)
    _, model_cfg, train_cfg = to_dataclasses(tcfg)
    train_cfg.device = device
    train_cfg.progress = False
    if splits is None:
        splits = SplitsCache().get(tcfg)
    run = Run(tcfg.task, splits, model_cfg, train_cfg, checkpoint_dir=None)
    pretrain_path, probe_path = final_checkpoint_paths(cfg, final)
    run.load_pretrained(pretrain_path)
    if run.needs_probe:
        state = load_checkpoint(probe_path)
        if state is None:
            raise FileNotFoundError(f"no probe checkpoint at {probe_path}")
        load_modules(probe_path, state, {"classifier": run.nets.classifier})
    for module in run.nets.modules().values():
        module.eval()
    return run
