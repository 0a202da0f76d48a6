"""Study files: a typed schema (OmegaConf structured configs), YAML loading, ``key=value``
overrides by dotted path, and validation that turns every mistake into one line naming the key.

A study file fills in :class:`StudyConfig`; unknown keys and wrong types are rejected by
OmegaConf, ranges and allowed names by :func:`validate`: ``task``, ``data.*``, ``model.*`` and
``train.*`` by the training code's own rules (:func:`models.config.check_run`, the device
included), the search space and the search service's settings here. Nothing here touches
storage, so a bad study or override fails before anything is written.

Example::

    cfg = load_config("quickstart", ["stages.screen.trials=4", "model.channels=8"])
    print(cfg.train.optim.lr)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from models.config import TASKS, DataConfig, ModelConfig, TrainConfig, check_run
from models.errors import UsageError
from search.database import StorageError, check_url
from search.naming import STAGES
from search.space import check_dependencies

STUDIES_DIR = Path(__file__).resolve().parent.parent / "studies"
SAMPLERS = ("tpe", "random")
PRUNERS = ("hyperband", "successive_halving", "median", "none")
RUN_STAGES = ("all", *STAGES)  # what stage= may name
# The metric each task is ranked and pruned on, and which ones it may choose instead.
TASK_METRICS = {
    "autoencoder": ("knn_accuracy", "val_mae"),
    "guided": ("val_accuracy",),
    "contrastive": ("knn_accuracy",),
}
MINIMIZED_METRICS = {"val_mae"}


class ConfigError(UsageError):
    """A study file or override is unusable; the message is one line that names the key."""


@dataclass
class ParamSpec:
    """One searched parameter. Its Optuna name is its key under ``search.space``.

    Either ``choices`` (categorical) or ``low``/``high`` (``type`` float or int, optionally
    ``log`` or ``step``). ``when`` makes it conditional: ``{optimizer: [sgd, lars]}`` samples
    it only when the parameter named ``optimizer`` took one of those values.
    """

    target: str = MISSING  # dotted config path the sampled value is written to
    type: str = "float"  # float | int | categorical (implied by choices)
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Any] | None = None
    when: dict[str, Any] = field(default_factory=dict)


@dataclass
class SamplerConfig:
    name: str = "tpe"  # tpe | random
    n_startup_trials: int = 10  # tpe: random trials before the model takes over


@dataclass
class PrunerConfig:
    name: str = "hyperband"  # hyperband | successive_halving | median | none
    min_resource: int = 1  # epochs before a trial can first be pruned
    reduction_factor: int = 3
    n_startup_trials: int = 5  # median: trials that finish before it prunes


@dataclass
class ScreenStage:
    trials: int = 20
    epochs: int = 5  # the report's short runs: 5-10 epochs


@dataclass
class PromoteStage:
    top_k: int = 3
    epochs: int = 0  # 0 = train.epochs, the report's full budget


@dataclass
class FinalStage:
    enabled: bool = True


@dataclass
class StagesConfig:
    screen: ScreenStage = field(default_factory=ScreenStage)
    promote: PromoteStage = field(default_factory=PromoteStage)
    final: FinalStage = field(default_factory=FinalStage)


@dataclass
class SearchConfig:
    metric: str = ""  # "" = the task's default (see TASK_METRICS)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    pruner: PrunerConfig = field(default_factory=PrunerConfig)
    space: dict[str, ParamSpec] = field(default_factory=dict)


@dataclass
class StudyConfig:
    name: str = MISSING  # the study's name in storage; defaults to the file's stem
    description: str = ""
    task: str = MISSING  # autoencoder | guided | contrastive
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    stages: StagesConfig = field(default_factory=StagesConfig)
    stage: str = "all"  # all | screen | promote | final
    storage: str = ""  # SQLAlchemy URL; "" = sqlite:///<runs_dir>/ssl-search.db
    runs_dir: str = "runs"
    artifacts_dir: str = ""  # "" = <runs_dir>/artifacts
    checkpoints_dir: str = ""  # "" = <runs_dir>/checkpoints; shared by all workers
    workers: int = 1  # worker processes started by search.run
    devices: str = "auto"  # auto | cpu | comma-separated CUDA indices, e.g. 0,1,3
    heartbeat_interval: int = 10  # seconds between a running trial's heartbeats
    grace_period: int = 60  # seconds without heartbeat before a trial counts as dead
    max_retries: int = 3  # times a dead worker's trial is retried


def available_studies() -> list[str]:
    return sorted(p.stem for p in STUDIES_DIR.glob("*.yaml"))


def study_path(study: str) -> Path:
    """``study=`` takes a name under ``studies/`` or the path of a YAML file."""
    candidate = Path(study).expanduser()
    if candidate.suffix in (".yaml", ".yml") or candidate.is_file():
        if not candidate.is_file():
            raise ConfigError(f"study: no such study file {str(candidate)!r}")
        return candidate
    path = STUDIES_DIR / f"{study}.yaml"
    if not path.is_file():
        raise ConfigError(
            f"study: unknown study {study!r}; allowed: {', '.join(available_studies())} "
            "or the path of a .yaml file"
        )
    return path


def _one_line(error: OmegaConfBaseException) -> str:
    key = getattr(error, "full_key", None) or "config"
    message = str(error).splitlines()[0] if str(error) else type(error).__name__
    return f"{key}: {message}"


def load_config(study: str, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Schema <- study file <- overrides, then :func:`validate`. Raises :class:`ConfigError`."""
    path = study_path(study)
    schema = OmegaConf.structured(StudyConfig)
    try:
        loaded = OmegaConf.load(path)
    except Exception as error:  # YAML syntax errors come from the yaml package
        raise ConfigError(f"study: cannot read {path}: {str(error).splitlines()[0]}") from error
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"study: {path} must hold a mapping of settings")
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"{item}: overrides take the form key=value")
    try:
        cfg = OmegaConf.merge(schema, loaded)
        if OmegaConf.is_missing(cfg, "name"):
            cfg.name = path.stem
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as error:
        raise ConfigError(_one_line(error)) from error
    validate(cfg)
    return cfg


def _allowed(cfg: DictConfig, key: str, allowed: tuple[str, ...]) -> None:
    value = OmegaConf.select(cfg, key)
    if value not in allowed:
        raise ConfigError(f"{key}: unknown value {value!r}; allowed: {', '.join(allowed)}")


def _at_least(cfg: DictConfig, key: str, low: float) -> None:
    value = OmegaConf.select(cfg, key)
    if value < low:
        raise ConfigError(f"{key}: must be >= {low}, got {value}")


def metric_of(cfg: DictConfig) -> str:
    return cfg.search.metric or TASK_METRICS[cfg.task][0]


def direction_of(cfg: DictConfig) -> str:
    return "minimize" if metric_of(cfg) in MINIMIZED_METRICS else "maximize"


def validate(cfg: DictConfig) -> None:
    """Check names, ranges, the search space and the storage URL; raise :class:`ConfigError`."""
    _validate_fields(cfg)
    _validate_space(cfg)
    try:
        check_url(storage_url(cfg))
    except StorageError as error:
        raise ConfigError(str(error)) from error


def _validate_fields(cfg: DictConfig) -> None:
    if OmegaConf.is_missing(cfg, "task"):
        raise ConfigError(f"task: missing; allowed: {', '.join(TASKS)}")
    missing = OmegaConf.missing_keys(cfg)
    if missing:
        raise ConfigError(f"{sorted(missing)[0]}: missing value")
    if not str(cfg.name).strip() or any(c in str(cfg.name) for c in "/\\:"):
        raise ConfigError(f"name: {cfg.name!r} must be non-empty without / \\ or :")
    # task, data.*, model.* and train.*: the rules of the training code, in models/.
    try:
        check_run(cfg.task, *to_dataclasses(cfg))
    except UsageError as error:
        raise ConfigError(str(error)) from error
    # The rest is the search service's own.
    _allowed(cfg, "stage", RUN_STAGES)
    _allowed(cfg, "search.sampler.name", SAMPLERS)
    _allowed(cfg, "search.pruner.name", PRUNERS)
    if cfg.search.metric:
        _allowed(cfg, "search.metric", TASK_METRICS[cfg.task])
    for key in (
        "stages.screen.trials",
        "stages.screen.epochs",
        "stages.promote.top_k",
        "workers",
        "heartbeat_interval",
        "search.pruner.min_resource",
    ):
        _at_least(cfg, key, 1)
    _at_least(cfg, "stages.promote.epochs", 0)
    _at_least(cfg, "search.pruner.reduction_factor", 2)
    _at_least(cfg, "max_retries", 0)
    if cfg.grace_period <= cfg.heartbeat_interval:
        raise ConfigError(
            f"grace_period: must exceed heartbeat_interval ({cfg.heartbeat_interval}), "
            f"got {cfg.grace_period}"
        )
    _validate_devices(cfg.devices)


def _validate_devices(devices: str) -> None:
    text = str(devices).strip()
    if text in ("auto", "cpu"):
        return
    parts = [p.strip() for p in text.split(",")]
    if not parts or not all(p.isdigit() for p in parts):
        raise ConfigError(
            f"devices: {devices!r} is not auto, cpu or comma-separated CUDA indices like 0,1,3"
        )


def _validate_space(cfg: DictConfig) -> None:
    space = cfg.search.space
    try:
        check_dependencies(space)  # unknown or circular ``when``
    except UsageError as error:
        raise ConfigError(str(error)) from error
    for name, spec in space.items():
        key = f"search.space.{name}"
        if OmegaConf.select(cfg, spec.target, default=_ABSENT) is _ABSENT:
            raise ConfigError(f"{key}.target: {spec.target!r} is not a key of the study config")
        if spec.target.startswith(("search.", "stages.", "storage", "stage")):
            raise ConfigError(f"{key}.target: {spec.target!r} cannot be searched")
        if spec.choices is not None:
            if len(spec.choices) == 0:
                raise ConfigError(f"{key}.choices: empty; give at least one value")
            values = list(spec.choices)
        else:
            if spec.type not in ("float", "int"):
                raise ConfigError(
                    f"{key}.type: unknown type {spec.type!r}; allowed: float, int, categorical "
                    "(with choices)"
                )
            if spec.low is None or spec.high is None:
                raise ConfigError(f"{key}: needs low and high, or choices")
            if not (math.isfinite(spec.low) and math.isfinite(spec.high)):
                raise ConfigError(f"{key}: low and high must be finite numbers")
            if spec.low > spec.high:
                raise ConfigError(f"{key}: inverted range, low {spec.low} > high {spec.high}")
            if spec.low == spec.high:
                raise ConfigError(f"{key}: empty range, low == high == {spec.low}")
            if spec.log and spec.low <= 0:
                raise ConfigError(f"{key}.low: log scale needs low > 0, got {spec.low}")
            if spec.log and spec.step is not None:
                raise ConfigError(f"{key}.step: cannot combine step with log scale")
            if spec.type == "int" and not (
                float(spec.low).is_integer() and float(spec.high).is_integer()
            ):
                raise ConfigError(f"{key}: int parameters need whole-number low and high")
            if spec.type == "int":
                values = [int(spec.low), int(spec.high)]
            else:
                values = [float(spec.low), float(spec.high)]
        for dep, wanted in spec.when.items():  # check_dependencies: dep is another parameter
            wanted_list = list(wanted) if OmegaConf.is_list(wanted) else [wanted]
            dep_spec = space[dep]
            if dep_spec.choices is not None:
                unknown = [w for w in wanted_list if w not in list(dep_spec.choices)]
                if unknown:
                    raise ConfigError(
                        f"{key}.when.{dep}: {unknown[0]!r} is not one of {dep}'s choices"
                    )
        # Every value the space can produce must fit the target's type and allowed values.
        for value in values:
            trial_cfg = cfg.copy()
            try:
                OmegaConf.update(trial_cfg, spec.target, value, merge=False)
                _validate_fields(trial_cfg)
            except OmegaConfBaseException as error:
                raise ConfigError(
                    f"{key}: value {value!r} does not fit {spec.target}: "
                    f"{str(error).splitlines()[0]}"
                ) from error
            except ConfigError as error:
                raise ConfigError(f"{key}: value {value!r} is not usable: {error}") from error


_ABSENT = object()


def resolved_paths(cfg: DictConfig) -> dict[str, Path]:
    """Folders the study writes to, with defaults filled in from ``runs_dir``."""
    runs = Path(cfg.runs_dir).expanduser()
    return {
        "runs": runs,
        "artifacts": Path(cfg.artifacts_dir).expanduser()
        if cfg.artifacts_dir
        else runs / "artifacts",
        "checkpoints": Path(cfg.checkpoints_dir).expanduser()
        if cfg.checkpoints_dir
        else runs / "checkpoints",
    }


def storage_url(cfg: DictConfig) -> str:
    if cfg.storage:
        return str(cfg.storage)
    return f"sqlite:///{resolved_paths(cfg)['runs'] / 'ssl-search.db'}"


def to_dataclasses(cfg: DictConfig) -> tuple[DataConfig, ModelConfig, TrainConfig]:
    """The three plain settings objects the training code takes."""
    return (
        OmegaConf.to_object(cfg.data),
        OmegaConf.to_object(cfg.model),
        OmegaConf.to_object(cfg.train),
    )
