"""Typed settings of one training run.

These dataclasses are the contract between a study file and the training code: the search
service composes them into its study schema (``search.config``), and everything under
``models/`` reads only these. Defaults are the report's choices for MNIST; dataset-dependent
defaults (kernel lists, temperature, recipes) are ``None`` here and resolved by the code that
knows the dataset family (see :func:`models.networks.build_networks`).

Each rule on these settings lives here, once: ``check_data``, ``check_model``,
``check_optim``, ``check_train`` (and :func:`check_run` for all of them) raise a
:class:`~models.errors.SettingError` or :class:`~models.errors.DataError` whose one-line message
starts with the setting's dotted key. The training code calls them on what it is given, and
``search.config.validate`` calls them when a study file is loaded. Every number has a stated
range (``MAX_*`` below, named in the message), so a typo is refused before a study is stored.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.errors import DataError, SettingError, UsageError

TASKS = ("autoencoder", "guided", "contrastive")
DATASETS = ("mnist", "cifar10", "digits", "imagefolder")
OPTIMIZERS = ("adam", "sgd", "lars")
SCHEDULES = ("none", "cosine")
UPSAMPLE_MODES = ("convtranspose", "nearest", "bilinear")
AMP_MODES = ("auto", "off", "bf16")
CHANNELS_LAST_MODES = ("auto", "off", "on")
FAMILIES = ("mnist", "cifar")
# data.family: the network family an image folder is decoded for; "auto" decides from the train
# images (all grey: mnist, else cifar).
DATA_FAMILIES = ("auto", *FAMILIES)
# The family (network shapes, augmentation recipes) of each dataset; imagefolder's is
# data.family, or known only once its images are read when that is "auto".
DATASET_FAMILY: dict[str, str | None] = {
    "mnist": "mnist",
    "digits": "mnist",
    "cifar10": "cifar",
    "imagefolder": None,
}
# The report's kernel lists per family, used when ModelConfig leaves them None.
DEFAULT_ENCODER_KERNELS: dict[str, tuple[int, ...]] = {"mnist": (7, 7, 5), "cifar": (7, 7, 5)}
DEFAULT_DECODER_KERNELS: dict[str, tuple[int, ...]] = {"mnist": (7, 7, 5), "cifar": (5, 7, 7, 7)}
# How many wide convs (width model.channels unless listed per layer) each family's encoder and
# decoder have: the convs before the latent map, and the decoder's up to its output conv.
ENCODER_WIDE_CONVS: dict[str, int] = {"mnist": 2, "cifar": 2}
DECODER_WIDE_CONVS: dict[str, int] = {"mnist": 2, "cifar": 3}
# Channels of the encoder's last conv, the latent map: mnist (1,14,14) before its linear layer,
# cifar (2,8,8) flattened as the 128-d latent.
DEFAULT_LATENT_CHANNELS: dict[str, int] = {"mnist": 1, "cifar": 2}
# The classifier's convs on the latent map: cifar's two, mnist's classifier is an MLP only.
DEFAULT_CLASSIFIER_CHANNELS: dict[str, tuple[int, ...]] = {"mnist": (), "cifar": (256, 512)}
CLASSIFIER_CONV_KERNEL = 3  # the report's kernel of each cifar classifier conv
MAX_CLASSIFIER_CONVS = 3  # each halves cifar's 8x8 latent map
MAX_HIDDEN_LAYERS = 8  # model.classifier_hidden
MIN_AUG_STRENGTH, MAX_AUG_STRENGTH = 0.0, 2.0
# Upper bounds of the numeric settings: far above any useful value, low enough that a typo
# (an extra zero, a stray exponent) is refused when the study is loaded instead of failing
# every trial (or exhausting memory) once it is stored.
MAX_WIDTH = 4096  # model.channels, latent_dim, projection_dim
MAX_KERNEL_SIZE = 31  # the images are 28x28 or 32x32
MAX_EPOCHS = 10_000  # train.epochs, train.probe.epochs, warm-up epochs
MAX_BATCH_SIZE = 65_536
MAX_LR = 100.0
MAX_WEIGHT_DECAY = 1.0
MAX_TEMPERATURE = 100.0
SEED_LIMIT = 2**32  # seeds lie in [0, 2**32), what NumPy and torch accept everywhere
MAX_SAMPLES = 10**9  # data.*_subset, train.knn_max_train, train.max_batches
MAX_KNN_K = 10_000


@dataclass
class DataConfig:
    """Where images come from and how the splits are carved."""

    name: str = "mnist"  # mnist | cifar10 | digits | imagefolder
    # torchvision root (env SSL_SEARCH_DATA, else ./data); cifar10 also finds <root>/cifar10-jpeg/
    root: str = field(default_factory=lambda: os.environ.get("SSL_SEARCH_DATA", "data"))
    path: str = ""  # imagefolder only: a folder holding train/ and test/ class folders
    # imagefolder: auto | mnist (28x28 grey) | cifar (32x32 RGB); images of any size and mode
    # are converted and resized to it once, when decoded. Other datasets: auto or their own.
    family: str = "auto"
    download: bool = False  # let torchvision fetch MNIST/CIFAR-10 when online
    val_fraction: float = 0.1  # validation split carved from train, seeded
    train_subset: int = 0  # 0 = all; otherwise a seeded subset of the train split
    val_subset: int = 0
    test_subset: int = 0
    split_seed: int = 0
    cache_dir: str = "~/.cache/ssl-search"  # decoded JPEG folders are cached here


@dataclass
class ModelConfig:
    """Network shapes. ``None`` means the report's value for the dataset family."""

    channels: int = 256  # width of every wide encoder/decoder conv not listed per layer
    encoder_channels: list[int] | None = None  # per wide conv (2); None = [channels] * 2
    decoder_channels: list[int] | None = None  # per wide conv (mnist 2, cifar 3); None = channels
    encoder_kernels: list[int] | None = None  # mnist [7,7,5]; cifar [7,7,5]
    decoder_kernels: list[int] | None = None  # mnist [7,7,5]; cifar [5,7,7,7]
    latent_channels: int | None = None  # the latent map's channels: mnist 1 (1,14,14); cifar 2
    latent_dim: int = 128  # mnist only; cifar's latent is (latent_channels,8,8) = 128
    decoder_upsample: str = "convtranspose"  # convtranspose | nearest | bilinear
    # The cifar classifier's convs on the latent map (1 to 3; mnist's classifier has none):
    classifier_channels: list[int] | None = None  # cifar [256, 512]
    classifier_kernels: list[int] | None = None  # cifar [3, 3]: 3 for each conv
    classifier_hidden: list[int] = field(default_factory=lambda: [512, 256, 128])  # both
    classifier_dropout: float = 0.1
    encoder_dropout: float = 0.0  # the report tried it and dropped it; searchable
    projection_hidden: int | None = None  # None = the latent size (SimCLR), 128
    projection_dim: int = 128


@dataclass
class OptimConfig:
    name: str = "adam"  # adam | sgd | lars
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd and lars
    schedule: str = "none"  # none | cosine (per epoch, over the run's epochs)
    warmup_epochs: int = 0  # LinearLR warm-up before the schedule


@dataclass
class ProbeConfig:
    """The frozen-encoder classifier trained after autoencoder/contrastive pre-training."""

    epochs: int = 20
    batch_size: int = 64
    optim: OptimConfig = field(default_factory=OptimConfig)
    # Strength of the classifier's own augmentation ("probe" recipe); None = the report's fixed
    # recipe (cifar: crop + flip, mnist: none), whatever train.aug_strength a trial chose.
    aug_strength: float | None = None


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 32
    optim: OptimConfig = field(default_factory=OptimConfig)
    temperature: float | None = None  # NT-Xent; None = 0.5 on mnist, 0.15 on cifar
    # Pre-training augmentation: 0 = none, 1 = the recipe at full strength (the report's, except
    # mnist 1.2.1/1.2.2, where the report used none); None = the report's choice for the run.
    aug_strength: float | None = None
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    knn_k: int = 20
    knn_max_train: int = 10000  # train embeddings used as the kNN memory bank
    max_batches: int = 0  # 0 = full epochs; tests and smoke runs cap batches per epoch
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "auto"  # auto (bf16 on CUDA) | off | bf16
    channels_last: str = "auto"  # auto (on CUDA) | off | on
    # Write the resume checkpoint after every k-th epoch; always after a phase's last epoch
    # and at a rung (stop_at). Written off the training thread (models.checkpoints).
    checkpoint_every: int = 1
    # Deterministic algorithms and cuDNN (bitwise resume on CUDA, slower); off: cuDNN may
    # pick its fastest kernels (cudnn.benchmark), so CUDA resumes agree to rounding only.
    deterministic: bool = False
    progress: bool = True


# --------------------------------------------------------------------------------------------
# Rules: the one place each setting is checked. The training code calls these on the objects
# it is given, and ``search.config.validate`` calls them when a study file is loaded. Every
# checker takes the dotted key the setting has in a study file (``train.probe.optim`` for the
# probe's optimizer) so its one-line message names what the user wrote.


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float)


def check_choice(
    value: Any, allowed: Sequence[str], key: str, error: type[UsageError] = SettingError
) -> str:
    if value not in allowed:
        raise error(f"{key}: unknown value {value!r}; allowed: {', '.join(allowed)}")
    return value


def check_int(
    value: Any,
    key: str,
    low: int,
    error: type[UsageError] = SettingError,
    *,
    high: int | None = None,
) -> int:
    """An integer (not a bool) of at least ``low`` and, when given, at most ``high``."""
    if isinstance(value, bool) or not isinstance(value, int):
        ok = False
    else:
        ok = value >= low and (high is None or value <= high)
    if not ok:
        wanted = f">= {low}" if high is None else f"within [{low}, {high}]"
        raise error(f"{key}: must be an integer {wanted}, got {value!r}")
    return value


def check_seed(value: Any, key: str, error: type[UsageError] = SettingError) -> int:
    """A random seed: an integer in [0, 2**32)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < SEED_LIMIT:
        raise error(f"{key}: must be an integer seed in [0, 2**32), got {value!r}")
    return value


def check_positive(value: Any, key: str, high: float | None = None) -> float:
    """A finite number > 0 (a learning rate, a temperature), at most ``high`` when given."""
    if (
        not _is_number(value)
        or not math.isfinite(value)
        or value <= 0
        or (high is not None and value > high)
    ):
        wanted = "a positive finite number" if high is None else f"a number within (0, {high:g}]"
        raise SettingError(f"{key}: must be {wanted}, got {value!r}")
    return float(value)


def check_non_negative(value: Any, key: str, high: float | None = None) -> float:
    """A finite number >= 0, at most ``high`` when given."""
    if (
        not _is_number(value)
        or not math.isfinite(value)
        or value < 0
        or (high is not None and value > high)
    ):
        wanted = "a finite number >= 0" if high is None else f"a number within [0, {high:g}]"
        raise SettingError(f"{key}: must be {wanted}, got {value!r}")
    return float(value)


def check_momentum(value: Any, key: str) -> float:
    """A momentum (SGD, LARS): a number in [0, 1); 1 or more never forgets and diverges."""
    if not _is_number(value) or not 0.0 <= value < 1.0:  # also rejects NaN
        raise SettingError(f"{key}: momentum must be a number in [0, 1), got {value!r}")
    return float(value)


def check_task(task: Any, key: str = "task") -> str:
    return check_choice(task, TASKS, key)


def check_family(family: Any, key: str = "family") -> str:
    return check_choice(family, FAMILIES, key)


# ---- model ----------------------------------------------------------------------------------


def check_kernels(kernels: Any, count: int | None, key: str, family: str | None) -> tuple[int, ...]:
    """Odd positive kernel sizes ("same" padding keeps the spatial size only for odd ones) of at
    most MAX_KERNEL_SIZE; exactly ``count`` of them unless ``count`` is None."""
    if isinstance(kernels, str | bytes) or not isinstance(kernels, Sequence):
        what = "a list of kernel sizes" if count is None else f"a list of {count} kernel sizes"
        raise SettingError(f"{key}: must be {what}, got {kernels!r}")
    if count is not None and len(kernels) != count:
        raise SettingError(f"{key}: needs {count} kernel sizes for {family}, got {len(kernels)}")
    for i, k in enumerate(kernels):
        # bool is an int subclass; True as a kernel size is a typo, not a choice.
        if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k % 2 == 0:
            raise SettingError(f"{key}[{i}]: kernel sizes must be odd positive integers, got {k!r}")
        if k > MAX_KERNEL_SIZE:
            raise SettingError(
                f"{key}[{i}]: kernel sizes must be at most {MAX_KERNEL_SIZE} (the images are "
                f"28x28 or 32x32), got {k!r}"
            )
    return tuple(kernels)


def check_size(value: Any, key: str, high: int | None = None) -> int:
    """A layer size (latent, hidden or output width, class count): an integer >= 1, and at
    most ``high`` when given."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < 1
        or (high is not None and value > high)
    ):
        wanted = "a positive integer" if high is None else f"an integer within [1, {high}]"
        raise SettingError(f"{key}: must be {wanted}, got {value!r}")
    return value


def check_channels(value: Any, key: str) -> int:
    """A conv layer's channel count: an integer within [1, MAX_WIDTH]."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_WIDTH:
        raise SettingError(
            f"{key}: channel counts must be integers within [1, {MAX_WIDTH}], got {value!r}"
        )
    return value


def check_dropout(value: Any, key: str) -> float:
    if not _is_number(value) or not 0.0 <= value < 1.0:
        raise SettingError(f"{key}: dropout must be a probability in [0, 1), got {value!r}")
    return float(value)


def check_upsample(mode: Any, key: str) -> str:
    if mode not in UPSAMPLE_MODES:
        raise SettingError(
            f"{key}: unknown upsampling mode {mode!r}; allowed: {', '.join(UPSAMPLE_MODES)}"
        )
    return mode


def check_widths(widths: Any, key: str, low: int = 1, high: int | None = None) -> tuple[int, ...]:
    """A list of channel counts (each within [1, MAX_WIDTH]) of ``low`` to ``high`` entries."""
    if isinstance(widths, str | bytes) or not isinstance(widths, Sequence):
        raise SettingError(f"{key}: must be a list of channel counts, got {widths!r}")
    if len(widths) < low or (high is not None and len(widths) > high):
        wanted = f"at least {low}" if high is None else f"{low} to {high}"
        raise SettingError(f"{key}: needs {wanted} channel counts, got {len(widths)}")
    return tuple(check_channels(w, f"{key}[{i}]") for i, w in enumerate(widths))


def check_hidden(widths: Any, key: str) -> tuple[int, ...]:
    """The classifier's hidden layer widths: 0 to MAX_HIDDEN_LAYERS sizes within [1, MAX_WIDTH]."""
    if isinstance(widths, str | bytes) or not isinstance(widths, Sequence):
        raise SettingError(f"{key}: must be a list of layer widths, got {widths!r}")
    if len(widths) > MAX_HIDDEN_LAYERS:
        raise SettingError(f"{key}: at most {MAX_HIDDEN_LAYERS} hidden layers, got {len(widths)}")
    return tuple(check_size(w, f"{key}[{i}]", MAX_WIDTH) for i, w in enumerate(widths))


def _family_count(
    length: int, per_family: dict[str, int], family: str | None, key: str, what: str
) -> None:
    """``length`` is the family's count of ``what``, or either family's when not yet known."""
    if family is not None:
        if length != per_family[family]:
            raise SettingError(
                f"{key}: needs {per_family[family]} {what} for {family}, got {length}"
            )
    elif length not in per_family.values():
        wanted = " or ".join(f"{n} ({f})" for f, n in per_family.items())
        raise SettingError(f"{key}: needs {wanted} {what}, got {length}")


def model_kernels(model: ModelConfig, family: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(encoder, decoder) kernel lists of ``model`` for ``family``, defaults filled in."""
    enc, dec = model.encoder_kernels, model.decoder_kernels
    return (
        tuple(DEFAULT_ENCODER_KERNELS[family] if enc is None else enc),
        tuple(DEFAULT_DECODER_KERNELS[family] if dec is None else dec),
    )


def model_channels(model: ModelConfig, family: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(encoder, decoder) widths of the wide convs, ``model.channels`` where not listed."""
    enc, dec = model.encoder_channels, model.decoder_channels
    return (
        tuple([model.channels] * ENCODER_WIDE_CONVS[family] if enc is None else enc),
        tuple([model.channels] * DECODER_WIDE_CONVS[family] if dec is None else dec),
    )


def model_latent_channels(model: ModelConfig, family: str) -> int:
    """Channels of the latent map: ``model.latent_channels`` or the family's (mnist 1, cifar 2)."""
    lc = model.latent_channels
    return DEFAULT_LATENT_CHANNELS[family] if lc is None else lc


def model_classifier_convs(
    model: ModelConfig, family: str
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(widths, kernels) of the classifier's convs; both empty for mnist (an MLP)."""
    ch = model.classifier_channels
    widths = tuple(DEFAULT_CLASSIFIER_CHANNELS[family] if ch is None else ch)
    ks = model.classifier_kernels
    kernels = tuple([CLASSIFIER_CONV_KERNEL] * len(widths) if ks is None else ks)
    return widths, kernels


def check_model(model: ModelConfig, family: str | None, key: str = "model") -> None:
    """Check ``model`` for a dataset ``family`` ("mnist", "cifar", or None when not yet known:
    then a list may have the length of either family's)."""
    if family is not None:
        check_family(family)
    check_channels(model.channels, f"{key}.channels")
    for name, counts in (
        ("encoder_channels", ENCODER_WIDE_CONVS),
        ("decoder_channels", DECODER_WIDE_CONVS),
    ):
        widths = getattr(model, name)
        if widths is not None:  # None: model.channels for each
            check_widths(widths, f"{key}.{name}")
            _family_count(len(widths), counts, family, f"{key}.{name}", "channel counts")
    for name, defaults in (
        ("encoder_kernels", DEFAULT_ENCODER_KERNELS),
        ("decoder_kernels", DEFAULT_DECODER_KERNELS),
    ):
        kernels = getattr(model, name)
        if kernels is None:  # the family's default
            continue
        if family is not None:
            check_kernels(kernels, len(defaults[family]), f"{key}.{name}", family)
            continue
        check_kernels(kernels, None, f"{key}.{name}", None)
        counts = {f: len(defaults[f]) for f in FAMILIES}
        _family_count(len(kernels), counts, None, f"{key}.{name}", "kernel sizes")
    if model.latent_channels is not None:
        check_channels(model.latent_channels, f"{key}.latent_channels")
    check_size(model.latent_dim, f"{key}.latent_dim", MAX_WIDTH)
    check_upsample(model.decoder_upsample, f"{key}.decoder_upsample")
    _check_classifier_convs(model, family, key)
    check_hidden(model.classifier_hidden, f"{key}.classifier_hidden")
    check_dropout(model.classifier_dropout, f"{key}.classifier_dropout")
    check_dropout(model.encoder_dropout, f"{key}.encoder_dropout")
    if model.projection_hidden is not None:
        check_size(model.projection_hidden, f"{key}.projection_hidden", MAX_WIDTH)
    check_size(model.projection_dim, f"{key}.projection_dim", MAX_WIDTH)


def _check_classifier_convs(model: ModelConfig, family: str | None, key: str) -> None:
    widths, kernels = model.classifier_channels, model.classifier_kernels
    if family == "mnist":
        for name, value in (("classifier_channels", widths), ("classifier_kernels", kernels)):
            if value is not None:
                raise SettingError(
                    f"{key}.{name}: the mnist classifier is an MLP on the latent vector, without "
                    f"convolutions; leave it unset (model.classifier_hidden sets its widths)"
                )
        return
    if widths is not None:
        check_widths(widths, f"{key}.classifier_channels", 1, MAX_CLASSIFIER_CONVS)
    if kernels is not None:
        count = len(DEFAULT_CLASSIFIER_CHANNELS["cifar"] if widths is None else widths)
        check_kernels(kernels, None, f"{key}.classifier_kernels", None)
        if len(kernels) != count:
            sizes = "kernel size" if count == 1 else "kernel sizes"
            raise SettingError(
                f"{key}.classifier_kernels: needs {count} {sizes}, one per classifier conv "
                f"({key}.classifier_channels), got {len(kernels)}"
            )


# ---- data -----------------------------------------------------------------------------------


def check_data(data: DataConfig, key: str = "data") -> None:
    """The data settings that can be checked without reading any data (raises DataError):
    ranges, and for ``imagefolder`` that ``data.path`` holds ``train/`` and ``test/`` folders."""
    check_choice(data.name, DATASETS, f"{key}.name", DataError)
    frac = data.val_fraction
    if not _is_number(frac) or not 0.0 < frac < 1.0:
        raise DataError(f"{key}.val_fraction: must be strictly between 0 and 1, got {frac!r}")
    for name in ("train_subset", "val_subset", "test_subset"):
        value = getattr(data, name)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SAMPLES:
            raise DataError(
                f"{key}.{name}: must be an integer within [0, {MAX_SAMPLES}] (0 = all), "
                f"got {value!r}"
            )
    check_seed(data.split_seed, f"{key}.split_seed", DataError)
    check_choice(data.family, DATA_FAMILIES, f"{key}.family", DataError)
    own = DATASET_FAMILY[data.name]
    if own is not None and data.family not in ("auto", own):
        raise DataError(
            f"{key}.family: {data.name} is a {own}-family dataset; use auto or {own}, "
            f"got {data.family!r} (only imagefolder sets are converted to a family)"
        )
    if data.name == "imagefolder":
        check_image_folder(data.path, f"{key}.path", f"{key}.name")


def data_family(data: DataConfig) -> str | None:
    """The network family of ``data`` as far as known without reading images: the dataset's
    own, else ``data.family`` (None for an ``auto`` image folder, decided from its images)."""
    own = DATASET_FAMILY.get(data.name)
    if own is not None:
        return own
    return data.family if data.family in FAMILIES else None


def check_image_folder(path: Any, key: str = "data.path", name_key: str = "data.name") -> Path:
    """An ImageFolder root: an existing folder with ``train/`` and ``test/`` inside. Only the
    folders are looked at; the images are read (and checked) by :mod:`models.data`."""
    if not isinstance(path, str) or not path:
        raise DataError(
            f"{key}: required for {name_key}=imagefolder (a folder with train/ and test/)"
        )
    root = Path(os.path.expanduser(path)).absolute()
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise DataError(
                f"{key}: {root / split} is not a folder; expected train/ and test/ class folders"
            )
    return root


# ---- training -------------------------------------------------------------------------------


def check_optim(optim: OptimConfig, key: str = "optim") -> None:
    check_choice(optim.name, OPTIMIZERS, f"{key}.name")
    check_positive(optim.lr, f"{key}.lr", MAX_LR)
    check_non_negative(optim.weight_decay, f"{key}.weight_decay", MAX_WEIGHT_DECAY)
    check_momentum(optim.momentum, f"{key}.momentum")
    check_choice(optim.schedule, SCHEDULES, f"{key}.schedule")
    check_int(optim.warmup_epochs, f"{key}.warmup_epochs", 0, high=MAX_EPOCHS)


def check_temperature(value: Any, key: str = "temperature") -> float:
    """NT-Xent's temperature: a number within (0, MAX_TEMPERATURE]."""
    return check_positive(value, key, MAX_TEMPERATURE)


def check_aug_strength(value: Any, key: str = "train.aug_strength") -> float:
    """The augmentation strength, within [MIN_AUG_STRENGTH, MAX_AUG_STRENGTH]."""
    try:
        strength = float(value)
    except (TypeError, ValueError):
        raise SettingError(f"{key}: must be a number, got {value!r}") from None
    if not MIN_AUG_STRENGTH <= strength <= MAX_AUG_STRENGTH:  # also rejects NaN
        raise SettingError(
            f"{key}: must be within [{MIN_AUG_STRENGTH:g}, {MAX_AUG_STRENGTH:g}], got {value!r}"
        )
    return strength


_CUDA_DEVICE = re.compile(r"cuda(?::(\d+))?")


def check_device(name: Any, key: str = "train.device") -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``, where CUDA (and device N) must be visible."""
    if name in ("auto", "cpu"):
        return name
    match = _CUDA_DEVICE.fullmatch(name) if isinstance(name, str) else None
    if match is None:
        raise SettingError(f"{key}: unknown device {name!r}; allowed: auto, cpu, cuda, cuda:N")
    import torch  # only here: loading a study on the CPU path stays free of torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise SettingError(
            f"{key}: {name!r} asks for CUDA but no CUDA device is visible; use auto or cpu"
        )
    if match.group(1) is not None and int(match.group(1)) >= count:
        visible = ", ".join(f"cuda:{i}" for i in range(count))
        raise SettingError(
            f"{key}: {name!r} is not a visible CUDA device; allowed: auto, cpu, cuda, {visible}"
        )
    return name


def check_train(train: TrainConfig, key: str = "train") -> None:
    """Every training setting, the device included (it must exist on this machine)."""
    check_int(train.epochs, f"{key}.epochs", 1, high=MAX_EPOCHS)
    # BatchNorm needs two samples a batch.
    check_int(train.batch_size, f"{key}.batch_size", 2, high=MAX_BATCH_SIZE)
    check_optim(train.optim, f"{key}.optim")
    if train.temperature is not None:  # None: the family's default
        check_temperature(train.temperature, f"{key}.temperature")
    if train.aug_strength is not None:  # None: the report's choice
        check_aug_strength(train.aug_strength, f"{key}.aug_strength")
    check_int(train.probe.epochs, f"{key}.probe.epochs", 1, high=MAX_EPOCHS)
    check_int(train.probe.batch_size, f"{key}.probe.batch_size", 2, high=MAX_BATCH_SIZE)
    check_optim(train.probe.optim, f"{key}.probe.optim")
    if train.probe.aug_strength is not None:  # None: the report's fixed classifier recipe
        check_aug_strength(train.probe.aug_strength, f"{key}.probe.aug_strength")
    check_int(train.knn_k, f"{key}.knn_k", 1, high=MAX_KNN_K)
    check_int(train.knn_max_train, f"{key}.knn_max_train", 1, high=MAX_SAMPLES)
    check_int(train.max_batches, f"{key}.max_batches", 0, high=MAX_SAMPLES)
    check_seed(train.seed, f"{key}.seed")
    check_device(train.device, f"{key}.device")
    check_choice(train.amp, AMP_MODES, f"{key}.amp")
    check_choice(train.channels_last, CHANNELS_LAST_MODES, f"{key}.channels_last")
    check_int(train.checkpoint_every, f"{key}.checkpoint_every", 1, high=MAX_EPOCHS)
    if not isinstance(train.deterministic, bool):
        raise SettingError(
            f"{key}.deterministic: must be true or false, got {train.deterministic!r}"
        )


def check_run(task: str, data: DataConfig, model: ModelConfig, train: TrainConfig) -> None:
    """All settings of one training run, under the keys a study file gives them."""
    check_task(task)
    check_data(data)
    check_model(model, data_family(data))
    check_train(train)
    # The kNN metric would quietly use fewer neighbours than asked (its whole memory bank).
    if train.knn_max_train < train.knn_k:
        raise SettingError(
            f"train.knn_max_train: a memory bank of {train.knn_max_train} images is smaller "
            f"than the train.knn_k={train.knn_k} neighbours the kNN metric takes"
        )
    if 0 < data.train_subset < train.knn_k:
        raise DataError(
            f"data.train_subset: {data.train_subset} training images are fewer than the "
            f"train.knn_k={train.knn_k} neighbours the kNN metric takes; give at least "
            f"{train.knn_k} (0 = all)"
        )
