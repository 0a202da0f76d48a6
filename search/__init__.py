"""The search layer: study config, search space, stages, trial objectives and worker processes.

Public API (imported lazily, so ``python -m search.run --dry-run`` stays light)::

    from search import load_config, open_studies, run_stages, storage_url, summarize, TrialRunner

    cfg = load_config("quickstart", ["stages.screen.trials=4"])
    studies = open_studies(cfg, storage_url(cfg))
    run_stages(studies, TrialRunner(cfg, progress=False), cfg)
    print(summarize(studies, cfg))

The command-line modules beside this file (``search.run``, ``search.worker``, ``search.train``,
``search.report``, ``search.dashboard``, ``search.give_up``, ``search.cli``) sit on top of
every other layer and are not part of this API.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    # config: study files, validation, derived settings
    "ConfigError": "search.config",
    "StudyConfig": "search.config",
    "available_studies": "search.config",
    "check_checkpoints_reachable": "search.config",
    "checkpoint_store": "search.config",
    "direction_of": "search.config",
    "load_config": "search.config",
    "load_locations": "search.config",
    "merge_overrides": "search.config",
    "metric_of": "search.config",
    "resolved_paths": "search.config",
    "storage_url": "search.config",
    "study_path": "search.config",
    "to_dataclasses": "search.config",
    # names and paths
    "BEST_PRETRAIN_FILE": "search.naming",
    "FINAL_METRIC": "search.naming",
    "PRETRAIN_FILE": "search.naming",
    "PROBE_FILE": "search.naming",
    "DATA_SOURCE_ATTR": "search.naming",
    "RUNG_FROM_ATTR": "search.naming",
    "format_metric": "search.naming",
    "RUNG_TO_ATTR": "search.naming",
    "SKIPPED": "search.naming",
    "NOTHING_QUEUED": "search.naming",
    "trained_nothing": "search.naming",
    "STAGES": "search.naming",
    "long_budget": "search.naming",
    "rung_ladder": "search.naming",
    "first_legs": "search.sampling",
    "uses_rungs": "search.naming",
    "learning_curve": "search.naming",
    "curve_attr": "search.naming",
    "is_curve_attr": "search.naming",
    "split_study_name": "search.naming",
    "stage_metric": "search.naming",
    "stage_of": "search.naming",
    "stage_study_name": "search.naming",
    "trial_dir": "search.naming",
    # search space
    "apply": "search.space",
    "baseline_params": "search.space",
    "distribution": "search.space",
    "ordered": "search.space",
    # stages and trials
    "BASELINES_ATTR": "search.stages",
    "StageError": "search.stages",
    "Studies": "search.stages",
    "delete_stage_studies": "search.stages",
    "failure_reason": "search.stages",
    "found_final": "search.stages",
    "give_up": "search.stages",
    "given_up_configurations": "search.stages",
    "open_studies": "search.stages",
    "load_studies": "search.stages",
    "progress": "search.stages",
    "run_stages": "search.stages",
    "summarize": "search.stages",
    "top_trials": "search.stages",
    "TrialHook": "search.objective",
    "TrialRunner": "search.objective",
    "original_number": "search.objective",
    "config_number": "search.objective",
    "configuration_pretrain_curve": "search.objective",
    "encoder_epoch": "search.objective",
    # worker processes
    "check_devices": "search.pool",
    "device_plan": "search.pool",
    "install_sigterm_as_interrupt": "search.pool",
    "interrupted_exit_code": "search.pool",
    "load_data": "search.pool",
    "run_workers": "search.pool",
    "worker_loop": "search.pool",
    "WorkersFailed": "search.pool",
    # storage, as the layers above see it
    "StorageError": "search.database",
    "StorageUnavailableError": "search.database",
    "open_storage": "search.database",
    "redact": "search.database",
    "has_secret": "search.database",
    "sqlite_file": "search.database",
    "STORAGE_ENV": "search.database",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'search' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
