"""Typed settings of one training run.

These dataclasses are the contract between a study file and the training code: the search
service composes them into its study schema (``search.config``), and everything under
``models/`` reads only these. Defaults are the report's choices for MNIST; dataset-dependent
defaults (kernel lists, temperature, recipes) are ``None`` here and resolved by the code that
knows the dataset family (see :func:`models.networks.build_networks`).
"""

from __future__ import annotations

from dataclasses import dataclass, field


class DataError(ValueError):
    """Unusable data or data settings; the one-line message names the config field."""


TASKS = ("autoencoder", "guided", "contrastive")
DATASETS = ("mnist", "cifar10", "digits", "imagefolder")
OPTIMIZERS = ("adam", "sgd", "lars")
SCHEDULES = ("none", "cosine")
UPSAMPLE_MODES = ("convtranspose", "nearest", "bilinear")


@dataclass
class DataConfig:
    """Where images come from and how the splits are carved."""

    name: str = "mnist"  # mnist | cifar10 | digits | imagefolder
    # torchvision root (env SSL_SEARCH_DATA, else ./data); cifar10 also finds <root>/cifar10-jpeg/
    root: str = "${oc.env:SSL_SEARCH_DATA,data}"
    path: str = ""  # imagefolder only: a folder holding train/ and test/ class folders
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

    channels: int = 256  # width of every encoder/decoder conv
    encoder_kernels: list[int] | None = None  # mnist [7,7,5]; cifar [7,7,5]
    decoder_kernels: list[int] | None = None  # mnist [7,7,5]; cifar [5,7,7,7]
    latent_dim: int = 128  # mnist only; cifar's latent is (2,8,8) = 128
    decoder_upsample: str = "convtranspose"  # convtranspose | nearest | bilinear
    classifier_dropout: float = 0.1
    encoder_dropout: float = 0.0  # the report tried it and dropped it; searchable
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


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 32
    optim: OptimConfig = field(default_factory=OptimConfig)
    temperature: float | None = None  # NT-Xent; None = 0.5 on mnist, 0.15 on cifar
    aug_strength: float = 1.0  # 0 = no augmentation, 1 = the report's recipe
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    knn_k: int = 20
    knn_max_train: int = 10000  # train embeddings used as the kNN memory bank
    max_batches: int = 0  # 0 = full epochs; tests and smoke runs cap batches per epoch
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "auto"  # auto (bf16 on CUDA) | off | bf16
    channels_last: str = "auto"  # auto (on CUDA) | off | on
    progress: bool = True
