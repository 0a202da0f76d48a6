"""Study files: a typed schema (OmegaConf structured configs), YAML loading, ``key=value``
overrides by dotted path, and validation that turns every mistake into one line naming the key.

A study file fills in :class:`StudyConfig`; unknown keys and wrong types are rejected by
OmegaConf, ranges and allowed names by :func:`validate`: ``task``, ``data.*``, ``model.*`` and
``train.*`` by the training code's own rules (:func:`models.config.check_run`, the device
included), the search space and the search service's settings here. Interpolations
(``${...}``) are resolved once, at load, and the resolved values are what is validated; every
value a search space can produce passes the same rules. Nothing here touches storage, so a bad
study or override fails before anything is written. A study file that is not a mapping of
settings is refused without quoting it (``study=`` takes any path).

Example::

    cfg = load_config("quickstart", ["stages.screen.trials=4", "model.channels=8"])
    print(cfg.train.optim.lr)
"""

from __future__ import annotations

import difflib
import io
import json
import math
import re
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from models.config import (
    MAX_EPOCHS,
    TASKS,
    DataConfig,
    ModelConfig,
    TrainConfig,
    check_run,
)
from models.errors import UsageError
from search.database import StorageError, check_url, folder_problem, mask_secrets, redact
from search.naming import (
    NOT_IDENTITY,
    STAGES,
    checkpoint_cache_dir,
    long_budget,
    long_budget_key,
    uses_rungs,
)
from search.space import check_dependencies
from storage.checkpoint_store import (
    CheckpointLocationError,
    CheckpointStore,
    check_location,
    is_url,
    probe_location,
    redact_location,
)

STUDIES_DIR = Path(__file__).resolve().parent.parent / "studies"
SAMPLERS = ("tpe", "random")
PRUNERS = ("asha", "hyperband", "successive_halving", "median", "none")
RUN_STAGES = ("all", *STAGES)  # what stage= may name
FINAL_CHECKPOINTS = ("best", "last")
# The metric each task is ranked and pruned on, and which ones it may choose instead.
TASK_METRICS = {
    "autoencoder": ("knn_accuracy", "val_mae"),
    "guided": ("val_accuracy",),
    "contrastive": ("knn_accuracy",),
}
MINIMIZED_METRICS = {"val_mae"}
# A study's name becomes part of Optuna study names, folder names and file names.
MAX_NAME_LENGTH = 100
_NAME = re.compile(r"[A-Za-z0-9_-](?:[A-Za-z0-9._-]*[A-Za-z0-9_-])?")
# Upper bounds of the search service's own numeric settings (the training settings' bounds are
# in models.config); each message states its range.
MAX_WORKERS = 256
MAX_TRIALS = 100_000
MAX_SECONDS = 86_400  # heartbeat_interval, grace_period: one day
MAX_RETRIES = 100
MAX_CUDA_INDEX = 1023
# Integer ranges of a search space with at most this many values have every value checked;
# larger ones have their two ends and the values one step inside them checked.
_ENUMERATED_VALUES = 32


class ConfigError(UsageError):
    """A study file or override is unusable; the message is one line that names the key."""


@dataclass
class ParamSpec:
    """One searched parameter. Its Optuna name is its key under ``search.space``.

    Either ``choices`` (categorical) or ``low``/``high`` (``type`` float or int, optionally
    ``log`` or ``step``); ``choices`` win over a range, so ``search.space.NAME.choices=[v]``
    pins a parameter of the study file to one value (``--dry-run`` prints what is searched). ``when`` makes it conditional: ``{optimizer: [sgd, lars]}`` samples
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
    # tpe: random configurations before the model takes over; None: TPE's 10, raised under
    # rungs to eta^(rungs - 1) (search.sampling.startup_trials says why)
    n_startup_trials: int | None = None


@dataclass
class PrunerConfig:
    # asha: rungs over the whole budget, trials continued from their checkpoints (the
    # default); the others prune the screen and retrain the top-k (the previous pipeline).
    name: str = "asha"  # asha | hyperband | successive_halving | median | none
    min_resource: int = 1  # asha: the first rung; else epochs before a trial can be pruned
    reduction_factor: int = 3  # asha: eta, the ratio of consecutive rungs
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
    # Which encoder of the best promoted trial the final classifier is trained on: the epoch
    # that scored best on validation (as the report picked checkpoints), or the last one.
    checkpoint: str = "best"  # best | last


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
    # "" = <runs_dir>/checkpoints; shared by all workers: a folder or mount, or an fsspec URL
    # (s3://bucket/prefix) that each worker mirrors in <runs_dir>/checkpoint-cache/
    checkpoints_dir: str = ""
    workers: int = 1  # worker processes started by search.run
    devices: str = "auto"  # auto | cpu | comma-separated CUDA indices, e.g. 0,1,3
    heartbeat_interval: int = 10  # seconds between a running trial's heartbeats
    # Seconds without heartbeat before a trial counts as dead: above the storage retry bound
    # (storage.retry.RETRY_SECONDS, 60) plus heartbeat_interval, so that a storage outage the
    # workers ride out does not also fail their trials as dead when it ends.
    grace_period: int = 90
    max_retries: int = 3  # times a dead worker's trial is retried
    # A trial that runs out of CUDA memory is trained again once at half its batch size (a
    # different configuration: recorded as oom_batch_size); false: it fails with the reason.
    oom_half_batch: bool = False


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


def printable(text: str) -> str:
    """``text`` with control and other invisible characters escaped (``\\x1b``, ``\\n``)."""
    return "".join(repr(c)[1:-1] if _is_control(c) else c for c in text)


def _is_control(char: str) -> bool:
    return unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn")


def _has_control(text: str) -> bool:
    return any(_is_control(c) for c in text)


def _one_line(error: Exception, key: str | None = None) -> str:
    key = getattr(error, "full_key", None) or key or "config"
    lines = str(error).splitlines()
    message = lines[0] if lines and lines[0].strip() else type(error).__name__
    for node, kind in (("DictConfig", "mapping"), ("ListConfig", "list")):
        if message.startswith(f"Cannot convert '{node}' to"):  # OmegaConf's words for it
            message = f"expected a single value, got a {kind}" + _section_like(key)
    # OmegaConf's words for a value of the wrong type, and for a value given to a section
    converted = _NOT_CONVERTED.match(message)
    if converted:
        value, wanted = converted.groups()
        message = f"must be {_WANTED.get(wanted, wanted)}, got {value!r}"
    elif _NO_VALUE.match(message):  # ``name=`` or ``channels:`` with nothing after it
        wanted = _NO_VALUE.match(message).group(1)
        message = (
            f"needs a value{f' ({_TYPE_WORDS.get(wanted, wanted)})' if wanted else ''}, got nothing"
        )
    elif _NOT_A_BOOL.match(message):
        message = f"must be true or false, got {_NOT_A_BOOL.match(message).group(1)!r}"
    elif _NOT_A_LIST.match(message):
        message = f"must be a list, e.g. {key}=[1,2]"
    elif _NOT_A_SECTION.match(message) or _NOT_A_MAPPING.match(message):
        message = f"a section, not a single value: set its settings ({_settings_of(key)})"
    elif _NOT_A_KEY.match(message):  # a setting of another section wins over OmegaConf's guess
        elsewhere = _setting_elsewhere(key, exact="Did you mean" in message)
        if elsewhere:
            message = message.split(". Did you mean")[0] + elsewhere
    return printable(f"{key}: {message}")


_NOT_CONVERTED = re.compile(r"Value '(.*)' of type '\w+' could not be converted to (\w+)$")
_WANTED = {"Integer": "an integer", "Float": "a number", "Boolean": "true or false"}
_NOT_A_SECTION = re.compile(r"Merge error: \w+ is not a subclass of \w+\. value: ")
_NOT_A_MAPPING = re.compile(r"Cannot assign \w+ to Dict\[")
_NOT_A_BOOL = re.compile(r"Value '(.*)' is not a valid bool")
_NO_VALUE = re.compile(
    r"(?:Incompatible value 'None' for field of type '(\w+)'|field '[^']*' is not Optional)"
)
_TYPE_WORDS = {"str": "a text", "int": "an integer", "float": "a number", "bool": "true or false"}
_NOT_A_LIST = re.compile(r"Invalid value assigned: \w+ is not a ListConfig")
_NOT_A_KEY = re.compile(r"Key '[^']*' not in '\w+'")


def _setting_elsewhere(key: str, exact: bool = False) -> str:
    """'. Did you mean train.epochs or ...?' for ``epochs``: the settings of the schema with
    ``key``'s last name (unless ``exact``, or one close to it) in another section; else ''."""
    leaf = key.rpartition(".")[2]
    tree = OmegaConf.to_container(OmegaConf.structured(StudyConfig), throw_on_missing=False)
    paths = [p for p in _flat(tree) if p and p != key]
    names = {p.rpartition(".")[2] for p in paths}
    close = (
        [leaf] if leaf in names else [] if exact else difflib.get_close_matches(leaf, names, n=1)
    )
    found = [p for p in paths if close and p.rpartition(".")[2] == close[0]][:3]
    return f". Did you mean {' or '.join(found)}?" if found else ""


def _settings_of(key: str) -> str:
    """``stages.screen.trials=..., stages.screen.epochs=...``: the settings of section ``key``."""
    node: Any = OmegaConf.to_container(OmegaConf.structured(StudyConfig), throw_on_missing=False)
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    if key == "search.space":
        return "search.space.NAME.target=..., search.space.NAME.low=..., ..."
    if key.startswith("search.space.") and key.count(".") == 2:
        node = OmegaConf.to_container(OmegaConf.structured(ParamSpec), throw_on_missing=False)
    if not isinstance(node, dict):
        return f"{key}.<setting>=..."
    leaves = [f"{key}.{name}=..." for name in _flat(node) if name]
    return ", ".join(leaves[:6]) + (", ..." if len(leaves) > 6 else "")


def _first_found(walk: Callable[[Any, Any, str], Any], want: dict, given: dict, key: str) -> Any:
    """The first ``walk(want[name], given[name], "key.name")`` that finds something, over the
    settings of ``given`` that the schema section ``want`` has; None if none does."""
    for name, value in given.items():
        if name in want:
            found = walk(want[name], value, f"{key}.{name}" if key else str(name))
            if found:
                return found
    return None


def _shape_mismatch(loaded: Any) -> tuple[str, str, str] | None:
    """The first key of ``loaded`` (a study file or override, as plain containers) whose kind
    is not the schema's: (key, the kind wanted, the kind given); None if every kind fits."""
    schema: Any = OmegaConf.to_container(OmegaConf.structured(StudyConfig), throw_on_missing=False)

    def kind(value: Any) -> str:
        if isinstance(value, dict):
            return "a mapping"
        if value is None:
            return "nothing"
        return "a list" if isinstance(value, list) else f"the single value {value!r}"

    def walk(want: Any, given: Any, key: str) -> tuple[str, str, str] | None:
        if key == "search.space" and isinstance(given, dict):  # NAME -> one parameter each
            for name, spec in given.items():
                if not isinstance(spec, dict):
                    return f"{key}.{name}", "a mapping of target, low, high, ...", kind(spec)
                if "when" in spec and not isinstance(spec["when"], dict | None):
                    return (
                        f"{key}.{name}.when",
                        "a mapping such as {optimizer: [sgd]}",
                        kind(spec["when"]),
                    )
                if isinstance(spec.get("choices"), dict):
                    return f"{key}.{name}.choices", "a list", "a mapping"
            return None
        if isinstance(want, dict):
            if not isinstance(given, dict):
                return key, f"a section ({_settings_of(key)})", kind(given)
            return _first_found(walk, want, given, key)
        if isinstance(want, list) and isinstance(given, dict):
            return key, "a list", "a mapping"
        return None

    return walk(schema, loaded, "")


# What OmegaConf reads as a boolean, besides true/false themselves (a quoted "yes", say).
_BOOL_WORDS = {"true", "false", "yes", "no", "on", "off", "y", "n"}


def _loose_bool(given: Any) -> tuple[str, Any] | None:
    """The first setting of ``given`` (a study file or override, as plain containers) that the
    schema types as true/false but is given as a number or a numeric text: (key, value).

    OmegaConf reads any integer as a boolean (``log: 7`` is true, ``enabled: 0`` false), which
    hides a value meant for another setting; refused instead. None if there is none."""
    schema: Any = OmegaConf.to_container(OmegaConf.structured(StudyConfig), throw_on_missing=False)
    param: Any = OmegaConf.to_container(OmegaConf.structured(ParamSpec), throw_on_missing=False)

    def loose(value: Any) -> bool:
        if isinstance(value, bool) or value is None:
            return False
        if isinstance(value, str):  # an interpolation is not (OmegaConf converts its result)
            return "${" not in value and value.strip().lower() not in _BOOL_WORDS
        return isinstance(value, int | float)

    def walk(want: Any, value: Any, key: str) -> tuple[str, Any] | None:
        if key == "search.space" and isinstance(value, dict):
            wants = dict.fromkeys(value, param)
        elif isinstance(want, dict) and isinstance(value, dict):
            wants = want
        else:
            return (key, value) if isinstance(want, bool) and loose(value) else None
        return _first_found(walk, wants, value, key)

    return walk(schema, given, "")


def _refuse_loose_bool(given: Any) -> None:
    found = _loose_bool(given)
    if found is not None:
        key, value = found
        raise ConfigError(printable(f"{key}: must be true or false, got {value!r}"))


def _section_like(key: str) -> str:
    """'; did you mean stages?' when ``key`` looks like a section of the schema (a typo that
    put a whole section under a plain setting's name), else ''."""
    parent, _, leaf = key.rpartition(".")
    node: Any = OmegaConf.to_container(OmegaConf.structured(StudyConfig), throw_on_missing=False)
    for part in parent.split(".") if parent else ():
        node = node.get(part) if isinstance(node, dict) else None
    if not isinstance(node, dict):
        return ""
    sections = [k for k, v in node.items() if isinstance(v, dict)]
    close = difflib.get_close_matches(leaf, sections, n=1)
    return f"; did you mean {parent + '.' if parent else ''}{close[0]}?" if close else ""


_YAML_PROBLEMS = {
    "ScannerError": "syntax error",
    "ParserError": "syntax error",
    "ComposerError": "an undefined alias or several documents",
    "ConstructorError": "a value that cannot be built",
}
# The ConstructorError problems that are told apart, by the start of the parser's text (the
# rest of which may quote the file).
_CONSTRUCTOR_PROBLEMS = {
    "found duplicate key": "a duplicate key",
    "could not determine a constructor": "an unsupported !tag",
    "YAML recursive aliases": "a recursive alias",
    "YAML node expansion exceeds": "aliases that expand too far",
}


def _yaml_error(path: Path, error: yaml.YAMLError) -> ConfigError:
    """A one-line error for a YAML file that cannot be parsed. It names where, not what: the
    file's lines are never echoed (``study=`` may point at any readable file)."""
    where = printable(str(path))
    if isinstance(error, yaml.reader.ReaderError):
        return ConfigError(
            f"study: {where} is not valid YAML: a control character or invalid byte at "
            f"position {error.position}"
        )
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = _YAML_PROBLEMS.get(type(error).__name__, "cannot be parsed")
    text = str(getattr(error, "problem", None) or "")
    for start, what in _CONSTRUCTOR_PROBLEMS.items():
        if text.startswith(start):
            problem = what
    return ConfigError(f"study: {where} is not valid YAML: {problem}{at}")


def _yaml_kind(node: yaml.Node) -> str:
    """What a YAML node is, in words (never its content)."""
    if isinstance(node, yaml.SequenceNode):
        return "list"
    kinds = {"str": "string", "int": "number", "float": "number", "bool": "boolean"}
    tag = str(node.tag).rsplit(":", 1)[-1]
    return "null" if tag == "null" else kinds.get(tag, "single value")


_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


def _check_keys(node: yaml.Node, where: str) -> None:
    """Every key of the study file is a name. A key that is not (a line of some other file:
    ``study=`` takes any path) is reported by its line, never quoted."""
    seen: set[int] = set()
    pending = [node]
    while pending:
        current = pending.pop()
        if id(current) in seen:  # an alias: already walked
            continue
        seen.add(id(current))
        if isinstance(current, yaml.MappingNode):
            for key, value in current.value:
                if not (isinstance(key, yaml.ScalarNode) and _KEY.fullmatch(str(key.value))):
                    raise ConfigError(
                        f"study: {where}: line {key.start_mark.line + 1}: keys must be names "
                        "(letters, digits, '_' and '-'; not first a digit or '-'), found another key"
                    )
                pending.append(value)
        elif isinstance(current, yaml.SequenceNode):
            pending.extend(current.value)


def _read_study(path: Path) -> DictConfig:
    """The study file's settings. Any failure is one line that never quotes the file."""
    where = printable(str(path))
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"study: {where} is not UTF-8 text") from None
    except OSError as error:
        raise ConfigError(f"study: cannot read {where}: {error.strerror or 'error'}") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)  # the document's shape, no values
        if node is not None and not isinstance(node, yaml.MappingNode):
            kind = _yaml_kind(node)
            if kind != "null":  # ``~`` alone: an empty study, as an empty file
                raise ConfigError(f"study: {where} must hold a mapping of settings, found a {kind}")
        if node is not None:
            _check_keys(node, where)
        loaded = OmegaConf.load(io.StringIO(text))
    except yaml.YAMLError as error:
        raise _yaml_error(path, error) from None
    except OmegaConfBaseException as error:
        raise ConfigError(_one_line(error, "study")) from None
    except RecursionError:
        raise ConfigError(f"study: {where} nests too deeply to be a study file") from None
    if not isinstance(loaded, DictConfig):  # pragma: no cover - the node was a mapping
        raise ConfigError(f"study: {where} must hold a mapping of settings")
    return loaded


def _split_override(item: str) -> tuple[str, str]:
    """``key=value`` -> (key, value); refuses control characters and a missing ``=``."""
    key, eq, value = item.partition("=")
    if _has_control(item):
        raise ConfigError(
            f"{printable(key) if eq and key else 'override'}: control characters are not "
            f"allowed in overrides, got {mask_secrets(repr(item))}"
        )
    if not eq or not key.strip():
        raise ConfigError(f"{mask_secrets(item)}: overrides take the form key=value")
    return key, value


def _through_a_list(cfg: DictConfig, key: str) -> bool:
    """Whether dotted ``key`` reaches into a list of ``cfg`` (an item, or below one)."""
    parts = key.split(".")
    return any(
        isinstance(
            OmegaConf.select(
                cfg, ".".join(parts[:i]), default=None, throw_on_resolution_failure=False
            ),
            ListConfig,
        )
        for i in range(1, len(parts))
    )


def _merge_override(cfg: DictConfig, item: str) -> DictConfig:
    key, value = _split_override(item)
    try:
        if _through_a_list(cfg, key):
            # ``model.encoder_kernels.0=5``: a dotlist would make that a mapping {"0": 5},
            # which does not merge into a list; set the one item instead.
            updated = cfg.copy()
            parsed = OmegaConf.to_container(OmegaConf.from_dotlist([f"value={value}"]))
            try:
                OmegaConf.update(updated, key, parsed["value"], merge=False)
            except OmegaConfBaseException:
                raise  # a value the item's type refuses: said below, naming the item
            except (TypeError, ValueError) as error:  # ``.x`` into a list, an item of a null
                raise ConfigError(
                    printable(f"{key}: not an item of a list here (give its index): {error}")
                ) from None
            return updated
        given = OmegaConf.from_dotlist([item])
        _refuse_loose_bool(OmegaConf.to_container(given, resolve=False))
        return OmegaConf.merge(cfg, given)
    except TypeError as error:  # e.g. an item of a list that is null: nothing to index
        given = OmegaConf.to_container(OmegaConf.from_dotlist([item]), resolve=False)
        found = _shape_mismatch(given)
        if found is not None:
            where, wanted, kind = found
            raise ConfigError(printable(f"{where}: must be {wanted}, got {kind}")) from None
        parent = key.rsplit(".", 1)[0]
        raise ConfigError(
            printable(f"{key}: cannot be set ({error}); give the whole {parent}=[...] instead")
        ) from None
    except OmegaConfBaseException as error:
        message = _one_line(error, key)
        if "got a mapping" in message and (value.rstrip().endswith(":") or ": " in value):
            # sqlite:///:memory: reads as {"sqlite:///:memory": null}: say why, not a section
            message = (
                f"{printable(key)}: expected a single value, got a mapping (YAML reads a ':' at "
                f"the end or before a blank as one); quote the value: {key}='\"...\"'"
            )
        raise ConfigError(message) from None
    except yaml.YAMLError as error:  # an unparsable value, e.g. an unclosed [
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ConfigError(printable(f"{key}: cannot parse {item!r}: {first}")) from None


def load_config(study: str, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Schema <- study file <- overrides, interpolations resolved, then :func:`validate`.

    Raises :class:`ConfigError`. The config returned holds no interpolation: each was
    resolved once, here, and the result is what was validated (and what gets stored).
    """
    cfg = _from_study_file(study, overrides)
    validate(cfg)
    return cfg


def load_locations(study: str, overrides: Sequence[str] = ()) -> DictConfig:
    """Study file ``study`` with ``overrides``, checked as far as commands that only read a
    study in storage need (``search.report``, ``search.dashboard``, ``search.give_up``,
    ``search.run --status``): the name, the storage URL and the folders. Unlike
    :func:`load_config`, nothing about training is checked: a study made for a GPU, or for an
    image folder on another machine, is read on a laptop without either.

    Raises :class:`ConfigError`.
    """
    cfg = _from_study_file(study, overrides)
    _validate_name(cfg.name)
    try:
        check_url(storage_url(cfg))
    except StorageError as error:
        raise ConfigError(str(error)) from error
    return cfg


def merge_overrides(stored: Mapping[str, Any], overrides: Sequence[str]) -> DictConfig:
    """The schema's defaults, then ``stored`` (a config as the search stored it), then
    ``overrides`` parsed and checked as :func:`load_config` does, interpolations resolved; not
    validated (a stored study may not be runnable here: the report and dashboard only read it).

    Raises :class:`ConfigError` naming the key, never OmegaConf's or YAML's own errors.
    """
    for item in overrides:
        _split_override(item)
    return _with_overrides(_schema_with(dict(stored)), overrides)


def _from_study_file(study: str, overrides: Sequence[str]) -> DictConfig:
    """Schema <- study file <- overrides, interpolations resolved; not validated. The name
    defaults to the file's before resolving (``runs_dir: runs/${name}`` may use it)."""
    path = study_path(study)
    loaded = _read_study(path)
    for item in overrides:
        _split_override(item)
    _refuse_loose_bool(OmegaConf.to_container(loaded, resolve=False))
    cfg = _schema_with(loaded)
    if OmegaConf.is_missing(cfg, "name"):
        cfg.name = path.stem
    return _with_overrides(cfg, overrides)


def _schema_with(loaded: Any) -> DictConfig:
    """The schema's defaults, then ``loaded`` (a study file's settings, or a stored config)."""
    try:
        return OmegaConf.merge(OmegaConf.structured(StudyConfig), loaded)
    except (OmegaConfBaseException, TypeError) as error:
        given = (
            OmegaConf.to_container(loaded, resolve=False) if OmegaConf.is_config(loaded) else loaded
        )
        found = _shape_mismatch(given)
        if found is not None:  # OmegaConf's message names no key for these
            key, wanted, kind = found
            raise ConfigError(printable(f"{key}: must be {wanted}, got {kind}")) from None
        raise ConfigError(_one_line(error)) from None


def _with_overrides(cfg: DictConfig, overrides: Sequence[str]) -> DictConfig:
    """``cfg`` with each of ``overrides`` merged (already split: :func:`_split_override`),
    then every interpolation resolved and every text checked."""
    for item in overrides:
        cfg = _merge_override(cfg, item)
    _resolve(cfg)
    _check_text(OmegaConf.to_container(cfg, resolve=False))
    return cfg


_RESOLVE_PREFIX = re.compile(r"^\w+ raised while resolving interpolation: ")


def _resolve(cfg: DictConfig) -> None:
    """Resolve every ``${...}`` in place; a failure is a ConfigError naming the key."""
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None) or "config"
        lines = str(error).splitlines()
        reason = _RESOLVE_PREFIX.sub("", lines[0]) if lines else type(error).__name__
        raise ConfigError(printable(f"{key}: cannot resolve its interpolation: {reason}")) from None
    except Exception as error:  # a resolver's own failure that OmegaConf did not wrap
        raise ConfigError(_one_line(error)) from None


def _check_text(value: Any, key: str = "") -> None:
    """No control characters in any key or string of the (resolved) config, and no string
    that is still an interpolation (a value that resolved to another ``${...}``)."""
    if isinstance(value, dict):
        for name, child in value.items():
            path = f"{key}.{name}" if key else str(name)
            if isinstance(name, str) and _has_control(name):
                raise ConfigError(
                    f"{printable(path)}: control characters are not allowed in keys, got {name!r}"
                )
            _check_text(child, path)
    elif isinstance(value, list):
        for i, child in enumerate(value):
            _check_text(child, f"{key}.{i}")
    elif isinstance(value, str) and _has_control(value):
        raise ConfigError(
            f"{key}: control characters are not allowed, got {mask_secrets(repr(value))}"
        )
    elif isinstance(value, str) and "${" in value:
        raise ConfigError(
            f"{key}: resolves to another interpolation {mask_secrets(repr(value))}; give the value "
            "itself (in a URL's password, write a '$' as %24)"
        )


def _allowed(cfg: DictConfig, key: str, allowed: tuple[str, ...]) -> None:
    value = OmegaConf.select(cfg, key)
    if value not in allowed:
        raise ConfigError(f"{key}: unknown value {value!r}; allowed: {', '.join(allowed)}")


def _within(cfg: DictConfig, key: str, low: int, high: int) -> None:
    value = OmegaConf.select(cfg, key)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{key}: must be an integer within [{low}, {high}], got {value!r}")


def metric_of(cfg: DictConfig) -> str:
    return cfg.search.metric or TASK_METRICS[cfg.task][0]


def direction_of(cfg: DictConfig) -> str:
    return "minimize" if metric_of(cfg) in MINIMIZED_METRICS else "maximize"


def validate(cfg: DictConfig) -> None:
    """Check names, ranges, the search space, the storage URL and ``checkpoints_dir``; raise
    :class:`ConfigError`."""
    _validate_fields(cfg)
    _validate_space(cfg)
    try:
        check_url(storage_url(cfg))
    except StorageError as error:
        raise ConfigError(str(error)) from error
    try:
        check_location(str(cfg.checkpoints_dir))
    except CheckpointLocationError as error:
        raise ConfigError(f"checkpoints_dir: {error}") from error
    _validate_folders(cfg)


# The setting behind each folder of resolved_paths (a URL's cache lies under runs_dir).
_FOLDER_SETTINGS = {
    "runs": "runs_dir",
    "artifacts": "artifacts_dir",
    "checkpoints": "checkpoints_dir",
}


def _validate_folders(cfg: DictConfig) -> None:
    """Every folder the study writes to is a folder, or can be made: a path through a file
    (``/etc/hostname/ck``) would fail every trial of the study, each after it started."""
    for setting in ("runs_dir", "artifacts_dir"):
        if is_url(str(cfg[setting])):  # Path() would make a local folder named "s3:"
            raise ConfigError(
                printable(
                    f"{setting}: a folder (a local path or a shared mount), got the URL "
                    f"{redact_location(str(cfg[setting]))!r}; only checkpoints_dir takes URLs"
                )
            )
    for kind, folder in resolved_paths(cfg).items():
        setting = _FOLDER_SETTINGS[kind]
        if kind == "checkpoints" and is_url(str(cfg.checkpoints_dir)):
            setting = "runs_dir"
        if (problem := folder_problem(folder)) is not None:
            raise ConfigError(printable(f"{setting}: cannot make the folder {folder}: {problem}"))


def _validate_fields(cfg: DictConfig) -> None:
    if OmegaConf.is_missing(cfg, "task"):
        raise ConfigError(f"task: missing; allowed: {', '.join(TASKS)}")
    missing = OmegaConf.missing_keys(cfg)
    if missing:
        raise ConfigError(f"{sorted(missing)[0]}: missing value")
    _validate_name(cfg.name)
    # task, data.*, model.* and train.*: the rules of the training code, in models/.
    try:
        check_run(cfg.task, *to_dataclasses(cfg))
    except UsageError as error:
        raise ConfigError(str(error)) from error
    # The rest is the search service's own.
    _allowed(cfg, "stage", RUN_STAGES)
    if cfg.stage == "final" and not cfg.stages.final.enabled:
        raise ConfigError(
            "stage: final would run nothing, since stages.final.enabled is false; set "
            "stages.final.enabled=true, or run another stage"
        )
    _allowed(cfg, "stages.final.checkpoint", FINAL_CHECKPOINTS)
    _allowed(cfg, "search.sampler.name", SAMPLERS)
    _allowed(cfg, "search.pruner.name", PRUNERS)
    if cfg.search.metric:
        _allowed(cfg, "search.metric", TASK_METRICS[cfg.task])
    optional = {"search.sampler.n_startup_trials"}  # None: a default chosen from the study
    for key, low, high in (
        ("stages.screen.trials", 1, MAX_TRIALS),
        ("stages.screen.epochs", 1, MAX_EPOCHS),
        ("stages.promote.top_k", 1, MAX_TRIALS),
        ("stages.promote.epochs", 0, MAX_EPOCHS),
        ("search.sampler.n_startup_trials", 0, MAX_TRIALS),
        ("search.pruner.min_resource", 1, MAX_EPOCHS),
        ("search.pruner.reduction_factor", 2, 100),
        ("search.pruner.n_startup_trials", 0, MAX_TRIALS),
        ("workers", 1, MAX_WORKERS),
        ("heartbeat_interval", 1, MAX_SECONDS),
        ("grace_period", 1, MAX_SECONDS),
        ("max_retries", 0, MAX_RETRIES),
    ):
        if key not in optional or OmegaConf.select(cfg, key) is not None:
            _within(cfg, key, low, high)
    _validate_budgets(cfg)
    _validate_warmups(cfg)
    if cfg.grace_period <= cfg.heartbeat_interval:
        raise ConfigError(
            f"grace_period: must exceed heartbeat_interval ({cfg.heartbeat_interval}), "
            f"got {cfg.grace_period}"
        )
    _validate_devices(cfg.devices)


def _validate_budgets(cfg: DictConfig) -> None:
    """Under rungs the epochs must nest, first rung <= screen <= long budget, with at least two
    rungs; Hyperband's first rung must lie within the screen it prunes."""
    screen, first = int(cfg.stages.screen.epochs), int(cfg.search.pruner.min_resource)
    if uses_rungs(cfg):
        long = long_budget(cfg)
        promote = "stages.promote.epochs" + (
            "" if cfg.stages.promote.epochs else " (0: train.epochs)"
        )
        if long < 2:
            raise ConfigError(
                f"{long_budget_key(cfg)}: the long budget, {long} epoch(s), leaves no room for "
                "a first rung below it; allowed: at least 2 under search.pruner.name=asha"
            )
        if not first < long:
            raise ConfigError(
                f"search.pruner.min_resource: the first rung, {first}, must be below the long "
                f"budget, {promote} = {long}; allowed: 1 to {long - 1}"
            )
        if screen > long:
            raise ConfigError(
                f"stages.screen.epochs: {screen} exceeds the long budget, {promote} = {long}; "
                f"allowed: 1 to {long}"
            )
    if first > screen and cfg.search.pruner.name in ("asha", "hyperband", "successive_halving"):
        raise ConfigError(
            f"search.pruner.min_resource: the first rung, {first}, exceeds stages.screen.epochs "
            f"({screen}); allowed: 1 to {screen}"
        )
    if cfg.search.pruner.name == "median" and first >= screen:
        raise ConfigError(
            f"search.pruner.min_resource: the median pruner waits {first} epoch(s) "
            f"(n_warmup_steps) before pruning, so it would never prune a screen of {screen}; "
            + (f"allowed: 1 to {screen - 1}" if screen > 1 else "use search.pruner.name=none")
        )
    long = long_budget(cfg)
    if not uses_rungs(cfg) and long < screen:
        raise ConfigError(
            f"{long_budget_key(cfg)}: the long run of the promoted configurations, {long} "
            f"epoch(s), is shorter than the screen, stages.screen.epochs = {screen}; allowed: "
            f"{screen} or more"
        )


def _validate_warmups(cfg: DictConfig) -> None:
    """A warm-up written in the study must end before the shortest schedule it opens (the
    schedule would cut it to one epoch less). A searched warm-up is cut the same way, so the top
    values of a range reaching the schedule's length train alike (README "The schedule choice")."""
    lengths = [  # every schedule the encoder trains under: search.train, the legs, a screen
        (int(cfg.train.epochs), "train.epochs, as search.train trains it"),
        (long_budget(cfg), f"the long budget, {long_budget_key(cfg)}"),
    ]
    if not uses_rungs(cfg):
        lengths.append((int(cfg.stages.screen.epochs), "stages.screen.epochs"))
    for key, (epochs, what) in (
        ("train.optim.warmup_epochs", min(lengths)),
        ("train.probe.optim.warmup_epochs", (int(cfg.train.probe.epochs), "train.probe.epochs")),
    ):
        warmup = int(OmegaConf.select(cfg, key))
        if warmup >= epochs:
            raise ConfigError(
                f"{key}: a warm-up of {warmup} epoch(s) does not end before its schedule of "
                f"{epochs} ({what}); allowed: 0 to {epochs - 1}"
            )


def _validate_name(name: Any) -> None:
    """A study name: part of Optuna study, folder and file names, so a plain word."""
    text = str(name)
    if len(text) > MAX_NAME_LENGTH or not _NAME.fullmatch(text) or ".." in text:
        shown = repr(text) if len(text) <= 40 else f"{text[:40]!r}... ({len(text)} characters)"
        raise ConfigError(
            f"name: {shown} is not a usable study name; use 1-{MAX_NAME_LENGTH} letters, "
            "digits, '-', '_' or '.' (not first or last, never '..'); it defaults to the study "
            "file's name, so set name=... to choose another"
        )


def _validate_devices(devices: str) -> None:
    text = str(devices).strip()
    if text in ("auto", "cpu"):
        return
    parts = [p.strip() for p in text.split(",")]
    if (
        not parts
        or not all(p.isascii() and p.isdigit() for p in parts)
        or any(int(p) > MAX_CUDA_INDEX for p in parts)
    ):
        raise ConfigError(
            f"devices: {devices!r} is not auto, cpu or comma-separated CUDA indices "
            f"(0 to {MAX_CUDA_INDEX}) like 0,1,3"
        )


def _validate_space(cfg: DictConfig) -> None:
    space = cfg.search.space
    try:
        check_dependencies(space)  # unknown or circular ``when``
    except UsageError as error:
        raise ConfigError(str(error)) from error
    base = to_dataclasses(cfg)  # the settings each value of the space is checked within
    for name, spec in space.items():
        key = f"search.space.{name}"
        if OmegaConf.select(cfg, spec.target, default=_ABSENT) is _ABSENT:
            raise ConfigError(f"{key}.target: {spec.target!r} is not a key of the study config")
        why = next((w for t, w in NOT_SEARCHABLE.items() if spec.target.startswith(t)), None)
        if why is not None or not spec.target.startswith(SEARCHABLE):
            raise ConfigError(
                f"{key}.target: {spec.target!r} cannot be searched"
                + (f" ({why})" if why else "")
                + f"; allowed: settings under {', '.join(p.rstrip('.') for p in SEARCHABLE)}, "
                f"except {', '.join(t.rstrip('.') for t in NOT_SEARCHABLE if t != 'data.')}"
            )
        if spec.choices is not None:
            if len(spec.choices) == 0:
                raise ConfigError(f"{key}.choices: empty; give at least one value")
            values = list(spec.choices)
            for value in values:  # Optuna's categorical choices are plain values
                if value is not None and not isinstance(value, bool | int | float | str):
                    raise ConfigError(
                        f"{key}.choices: each choice must be a number, string, boolean or "
                        f"null, got {OmegaConf.to_container(value)!r}"
                    )
            seen: dict[str, Any] = {}
            for value in values:  # 8 and "8" write the same setting: one would weigh double
                if str(value) in seen:
                    raise ConfigError(
                        f"{key}.choices: {value!r} is given twice (as {seen[str(value)]!r}); "
                        "each choice must be distinct"
                    )
                seen[str(value)] = value
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
            if spec.step is not None and not (
                math.isfinite(spec.step) and 0 < spec.step <= spec.high - spec.low
            ):
                raise ConfigError(
                    f"{key}.step: must be a number within (0, high - low = "
                    f"{spec.high - spec.low:g}], got {spec.step!r}"
                )
            if spec.type == "int" and spec.step is not None and not float(spec.step).is_integer():
                raise ConfigError(f"{key}.step: int parameters need a whole-number step")
            if spec.step is not None:
                steps = (spec.high - spec.low) / spec.step
                if abs(steps - round(steps)) > 1e-9 * max(1.0, abs(steps)):
                    top = spec.low + math.floor(steps) * spec.step
                    raise ConfigError(
                        f"{key}.step: {spec.step:g} does not divide high - low = "
                        f"{spec.high - spec.low:g}, so high {spec.high:g} would never be "
                        f"sampled; allowed: a step that divides it, or high {top:g}"
                    )
            values = _range_values(spec)
        for dep, wanted in spec.when.items():  # check_dependencies: dep is another parameter
            wanted_list = _listed(wanted)
            dep_spec = space[dep]
            if dep_spec.choices is None:
                raise ConfigError(
                    f"{key}.when.{dep}: {dep} is a range, so no value would ever match; a "
                    "condition names a parameter with choices"
                )
            if not wanted_list:
                raise ConfigError(f"{key}.when.{dep}: empty; give at least one of {dep}'s choices")
            for w in wanted_list:
                # A value the study's choices no longer hold (narrowed on the command line,
                # search.space.optimizer.choices=[adam]) leaves the parameter unused; one that
                # is no value of the dependency's setting at all is a typo.
                if w not in list(dep_spec.choices) and _unusable(cfg, base, dep_spec.target, w):
                    raise ConfigError(
                        f"{key}.when.{dep}: {w!r} is not one of {dep}'s choices "
                        f"({', '.join(map(str, dep_spec.choices))}) nor a value of "
                        f"{dep_spec.target}"
                    )
        # Every value the space can produce must fit the target's type and pass the training
        # code's rules (models.config.check_run), as if it were written in the study file.
        for value in values:
            problem = _unusable(cfg, base, spec.target, value)
            if problem is not None:
                raise ConfigError(printable(f"{key}: value {value!r} {problem}"))
    _check_shared_targets(space)


def _unusable(cfg: DictConfig, base: tuple[Any, ...], target: str, value: Any) -> str | None:
    """Why setting ``target`` to ``value`` (within the settings ``base``) would not fit its type
    or pass the training code's rules (models.config.check_run), in words; None if it would."""
    section, _, rest = target.partition(".")
    try:
        part = cfg[section].copy()  # only the section the target is in: fast
        OmegaConf.update(part, rest, value, merge=False)
        settings = dict(zip(("data", "model", "train"), base, strict=True))
        settings[section] = OmegaConf.to_object(part)
        check_run(cfg.task, settings["data"], settings["model"], settings["train"])
    except OmegaConfBaseException as error:
        return f"does not fit {target}: {str(error).splitlines()[0]}"
    except UsageError as error:
        return f"is not usable: {error}"
    return None


def _check_shared_targets(space: DictConfig) -> None:
    """Two parameters may write one setting only when their ``when`` conditions exclude each
    other (``adam_lr`` and ``sgd_lr`` on ``optimizer``); else the later one silently overwrites
    the earlier, which the sampler still models."""
    names = list(space.keys())
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            a, b = space[first], space[second]
            if a.target != b.target:
                continue
            exclusive = any(
                dep in b.when and not set(_listed(a.when[dep])) & set(_listed(b.when[dep]))
                for dep in a.when
            )
            if not exclusive:
                raise ConfigError(
                    f"search.space.{second}.target: {b.target!r} is also written by "
                    f"search.space.{first}; two parameters may share a target only when their "
                    "`when` conditions exclude each other (as adam_lr and sgd_lr do on optimizer)"
                )


def _listed(value: Any) -> list[Any]:
    return list(value) if OmegaConf.is_list(value) else [value]


_ABSENT = object()
# What a search space may write to: the settings of one training run, less those the service
# sets for each trial itself (a searched value would be validated, then silently replaced).
SEARCHABLE = ("model.", "train.")
NOT_SEARCHABLE = {
    "data.": "every trial trains on the study's one set of splits",
    "train.epochs": "the rungs and stages.*.epochs set each leg's epochs",
    "train.seed": "each configuration gets its own seed, train.seed + its number",
    "train.device": "each worker trains on its own device",
    "train.progress": "the worker sets it",
    "train.knn_k": "it defines the kNN metric that ranks every configuration",
    "train.knn_max_train": "it defines the kNN metric that ranks every configuration",
    "train.max_batches": "it caps every epoch, the unit the rungs and budgets count",
    "train.probe.": "the classifier trains in the final stage only, on the chosen encoder, so "
    "no result of the search ranks its settings",
    "train.checkpoint_every": "how often a worker saves, not what it trains",
    "train.amp": "each worker's device decides how it computes",
    "train.channels_last": "each worker's device decides how it computes",
    "train.deterministic": "how a worker computes, not what it trains",
}


def _range_values(spec: DictConfig) -> list[Any]:
    """The values of a low/high range that must each pass the target's rules. Every rule is
    an interval, so the two ends and (for a float range) a value between them, which must fit
    the target's type, cover it; an int range's values are all checked when there are few,
    else the ends and the values one step inside them (a rule such as odd kernel sizes)."""
    if spec.type == "float":
        low, high = float(spec.low), float(spec.high)
        if spec.step is not None:
            n = math.floor((high - low) / spec.step + 1e-8)
            return [low, low + spec.step, low + n * spec.step]
        inner = math.sqrt(low * high) if spec.log else low + (high - low) / 3
        return [low, inner, high]
    low, high, step = int(spec.low), int(spec.high), int(spec.step or 1)
    top = low + (high - low) // step * step  # the largest value on the grid
    if (top - low) // step < _ENUMERATED_VALUES:
        return list(range(low, top + 1, step))
    return [low, low + step, top - step, top]


def resolved_paths(cfg: DictConfig) -> dict[str, Path]:
    """Local folders the study writes to, with defaults filled in from ``runs_dir``.

    ``checkpoints`` is where this machine writes checkpoints: ``checkpoints_dir`` itself, or,
    when that is a URL, the local cache that mirrors it (see :func:`checkpoint_store`).
    """
    runs = Path(cfg.runs_dir).expanduser()
    if is_url(str(cfg.checkpoints_dir)):
        checkpoints = checkpoint_cache_dir(runs, str(cfg.checkpoints_dir))
    elif cfg.checkpoints_dir:
        checkpoints = Path(cfg.checkpoints_dir).expanduser()
    else:
        checkpoints = runs / "checkpoints"
    return {
        "runs": runs,
        "artifacts": Path(cfg.artifacts_dir).expanduser()
        if cfg.artifacts_dir
        else runs / "artifacts",
        "checkpoints": checkpoints,
    }


def checkpoint_store(cfg: DictConfig) -> CheckpointStore:
    """Where the study's checkpoint folders are read and written, shared by every worker: the
    ``checkpoints_dir`` folder, or its URL through a local cache (``pull`` before reading a
    folder, ``push`` each file written)."""
    folder = resolved_paths(cfg)["checkpoints"]
    if is_url(str(cfg.checkpoints_dir)):
        return CheckpointStore(str(cfg.checkpoints_dir), cache=folder)
    return CheckpointStore(str(folder))


def check_checkpoints_reachable(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` (one line, ``checkpoints_dir``) when its URL cannot be
    reached from this machine. Not part of :func:`validate`, which contacts nothing: a command
    calls it before it writes anything, so a typo in a host fails once, not every trial in turn."""
    try:
        probe_location(str(cfg.checkpoints_dir))
    except CheckpointLocationError as error:
        raise ConfigError(printable(f"checkpoints_dir: {error}")) from None


def public_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config with every secret masked (the storage URL's, the checkpoints URL's):
    what is stored with a study and what ``--dry-run`` prints."""
    shown = OmegaConf.to_container(cfg, resolve=True)
    if shown["storage"]:
        shown["storage"] = redact(str(shown["storage"]))
    shown["checkpoints_dir"] = redact_location(str(shown["checkpoints_dir"]))
    return shown


# Settings a later run of a study may change: where and how it runs, and how much more it
# spends. Every other setting decides what the study's trials compute, and stays as the run
# that created the study set it (see :func:`changed_settings`).
RUN_SETTINGS = (
    "name",
    "description",
    "stage",
    "storage",
    "runs_dir",
    "artifacts_dir",
    "checkpoints_dir",
    "workers",
    "devices",
    "heartbeat_interval",
    "grace_period",
    "max_retries",
    "oom_half_batch",
    "search.sampler",  # which configurations come next, not what a configuration computes
    "stages.screen.trials",
    "stages.promote.top_k",
    "stages.final.enabled",
    *(f"{section}.{key}" for section, keys in NOT_IDENTITY.items() for key in keys),
)


# The run settings the stored config takes from each later run: what the study may spend.
LATEST_SETTINGS = (
    ("stages", "screen", "trials"),
    ("stages", "promote", "top_k"),
    ("stages", "final", "enabled"),
    ("search", "sampler"),
)


def with_latest_budgets(stored: dict[str, Any], latest: dict[str, Any]) -> dict[str, Any]:
    """``stored`` (a study's config) with :data:`LATEST_SETTINGS` taken from ``latest``."""
    updated = json.loads(json.dumps(stored))
    for path in LATEST_SETTINGS:
        source, target = latest, updated
        for part in path[:-1]:
            source = source.get(part, {}) if isinstance(source, dict) else {}
            target = target.setdefault(part, {}) if isinstance(target, dict) else {}
        if isinstance(source, dict) and path[-1] in source and isinstance(target, dict):
            target[path[-1]] = source[path[-1]]
    return updated


class _Unset:
    """A setting one side does not have."""

    def __repr__(self) -> str:
        return "unset"


_UNSET = _Unset()


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay whole values."""
    if not isinstance(tree, dict) or not tree:
        return {prefix[:-1]: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(_flat(value, f"{prefix}{key}."))
    return flat


def _flat_space(old: Any, new: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Both search spaces flattened field by field, unset fields at their defaults; a parameter
    only one side searches is one key, ``searched`` on that side and unset on the other."""
    default = OmegaConf.to_container(OmegaConf.structured(ParamSpec))
    old, new = (space if isinstance(space, dict) else {} for space in (old, new))
    flat_old: dict[str, Any] = {}
    flat_new: dict[str, Any] = {}
    for name in old.keys() | new.keys():
        if name in old and name in new:
            flat_old.update(_flat({**default, **old[name]}, f"search.space.{name}."))
            flat_new.update(_flat({**default, **new[name]}, f"search.space.{name}."))
        else:
            (flat_old if name in old else flat_new)[f"search.space.{name}"] = "searched"
    return flat_old, flat_new


def changed_settings(stored: dict[str, Any], cfg: DictConfig) -> list[tuple[str, Any, Any]]:
    """(key, stored value, this run's value) for each setting that decides what a study's
    trials compute and that this run sets differently from the config stored with the study.

    A setting one side lacks (a study made by an older version) counts as its default.
    """
    defaults = _flat(OmegaConf.to_container(OmegaConf.structured(StudyConfig)))
    plain = [json.loads(json.dumps(c, default=str)) for c in (stored, public_config(cfg))]
    spaces = _flat_space(*(c.get("search", {}).pop("space", None) for c in plain))
    old, new = ({**_flat(c), **space} for c, space in zip(plain, spaces, strict=True))
    # train.epochs is the long budget only when stages.promote.epochs is 0 (each trial's
    # epochs are set by its stage): otherwise it changes nothing a trial computes.
    promote = "stages.promote.epochs"
    if old.get(promote, defaults.get(promote)) and new.get(promote, defaults.get(promote)):
        old.pop("train.epochs", None)
        new.pop("train.epochs", None)
    changes = []
    for key in sorted(old.keys() | new.keys()):
        if any(key == run or key.startswith(f"{run}.") for run in RUN_SETTINGS):
            continue
        before, after = (side.get(key, defaults.get(key, _UNSET)) for side in (old, new))
        if before != after:
            changes.append((key, before, after))
    return changes


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
