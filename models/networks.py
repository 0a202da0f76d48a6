"""The report's encoders, decoders, classifiers and projection head (spec: "Networks").

Every kernel size, channel width, latent size, dropout rate and decoder upsampling mode is a
constructor parameter whose default is the report's value, so a search can vary any of them.
Convolutions use "same" padding (``k // 2``), which only preserves the spatial size for odd
kernels; constructors therefore reject even kernels instead of silently changing shapes.

:func:`build_networks` turns a :class:`models.config.ModelConfig` into the parts one task needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor, nn

from models.config import (
    FAMILIES,
    ModelConfig,
    check_channels,
    check_dropout,
    check_family,
    check_kernels,
    check_model,
    check_size,
    check_task,
    check_upsample,
    model_kernels,
)
from models.errors import SettingError

# Spatial size of the CIFAR latent map (32 / 2 / 2): the latent is (latent_channels, 8, 8).
_CIFAR_LATENT_SIDE = 8


# --------------------------------------------------------------------------------------------
# Building blocks


def _conv_bn_relu(cin: int, cout: int, k: int, transpose: bool = False) -> list[nn.Module]:
    """Stride-1 same-padding (transposed) conv + BN + ReLU; keeps the spatial size."""
    conv_cls = nn.ConvTranspose2d if transpose else nn.Conv2d
    return [conv_cls(cin, cout, k, padding=k // 2), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def _up_block(cin: int, cout: int, k: int, mode: str) -> list[nn.Module]:
    """Double the spatial size, then BN + ReLU.

    ``convtranspose``: ConvT(k, padding k//2, stride 2, output_padding 1), which maps H to 2H
    for odd k. ``nearest``/``bilinear``: fixed interpolation followed by a same-padding conv
    (the report's alternative, which avoids checkerboard artefacts).
    """
    if mode == "convtranspose":
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(cin, cout, k, stride=2, padding=k // 2, output_padding=1)
        ]
    else:
        # align_corners only applies to bilinear; None keeps nearest warning-free.
        align = False if mode == "bilinear" else None
        layers = [
            nn.Upsample(scale_factor=2, mode=mode, align_corners=align),
            nn.Conv2d(cin, cout, k, padding=k // 2),
        ]
    return [*layers, nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def _dropout2d(p: float) -> list[nn.Module]:
    # p == 0 adds no module, so the default network is exactly the report's.
    return [nn.Dropout2d(p)] if p > 0 else []


def _mlp_hidden(in_dim: int, hidden: Sequence[int], dropout: float) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_dim, width), nn.BatchNorm1d(width), nn.ReLU(inplace=True)]
        layers.append(nn.Dropout(dropout))
        in_dim = width
    return layers


class _SequentialNet(nn.Module):
    """A module whose forward is ``self.layers``; keeps state-dict keys under ``layers.``."""

    layers: nn.Sequential

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


# --------------------------------------------------------------------------------------------
# MNIST


class MnistEncoder(_SequentialNet):
    """(N,1,28,28) -> (N,latent_dim): two wide convs, pool, 1-channel conv, linear."""

    def __init__(
        self,
        channels: int = 256,
        kernels: Sequence[int] = (7, 7, 5),
        latent_dim: int = 128,
        in_channels: int = 1,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        c = check_channels(channels, "MnistEncoder.channels")
        k0, k1, k2 = check_kernels(kernels, 3, "MnistEncoder.kernels", "mnist")
        self.latent_dim = check_size(latent_dim, "MnistEncoder.latent_dim")
        check_channels(in_channels, "MnistEncoder.in_channels")
        p = check_dropout(dropout, "MnistEncoder.dropout")
        self.kernels = (k0, k1, k2)
        # Dropout2d only follows the wide blocks: on the 1-channel bottleneck map it would
        # zero a sample's whole latent input at once.
        self.layers = nn.Sequential(
            *_conv_bn_relu(in_channels, c, k0),
            *_dropout2d(p),
            *_conv_bn_relu(c, c, k1),
            *_dropout2d(p),
            nn.MaxPool2d(2),  # -> (C,14,14)
            *_conv_bn_relu(c, 1, k2),  # -> (1,14,14)
            nn.Flatten(),  # -> 196
            nn.Linear(14 * 14, latent_dim),
            nn.BatchNorm1d(latent_dim),
            nn.ReLU(inplace=True),
        )


class MnistDecoder(_SequentialNet):
    """(N,latent_dim) -> (N,1,28,28) in [0,1]; mirrors :class:`MnistEncoder`."""

    def __init__(
        self,
        channels: int = 256,
        kernels: Sequence[int] = (7, 7, 5),
        latent_dim: int = 128,
        upsample: str = "convtranspose",
        out_channels: int = 1,
    ) -> None:
        super().__init__()
        c = check_channels(channels, "MnistDecoder.channels")
        k0, k1, k2 = check_kernels(kernels, 3, "MnistDecoder.kernels", "mnist")
        check_size(latent_dim, "MnistDecoder.latent_dim")
        self.upsample = check_upsample(upsample, "MnistDecoder.upsample")
        check_channels(out_channels, "MnistDecoder.out_channels")
        self.kernels = (k0, k1, k2)
        self.layers = nn.Sequential(
            nn.Linear(latent_dim, 14 * 14),
            nn.BatchNorm1d(14 * 14),
            nn.ReLU(inplace=True),
            nn.Unflatten(1, (1, 14, 14)),
            *_up_block(1, c, k0, upsample),  # -> (C,28,28)
            *_conv_bn_relu(c, c, k1, transpose=True),
            nn.ConvTranspose2d(c, out_channels, k2, padding=k2 // 2),
            nn.Sigmoid(),  # MNIST pixels are in [0,1]
        )


class MnistClassifier(_SequentialNet):
    """MLP on the latent: hidden Linear-BN1d-ReLU-Dropout blocks, then Linear to classes."""

    def __init__(
        self,
        latent_dim: int = 128,
        hidden: Sequence[int] = (512, 256, 128),
        # The report does not state MNIST's dropout rate; 0.1 is its CIFAR-10 value.
        dropout: float = 0.1,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        check_size(latent_dim, "MnistClassifier.latent_dim")
        for i, h in enumerate(hidden):
            check_size(h, f"MnistClassifier.hidden[{i}]")
        p = check_dropout(dropout, "MnistClassifier.dropout")
        check_size(num_classes, "MnistClassifier.num_classes")
        last = hidden[-1] if len(hidden) else latent_dim
        self.layers = nn.Sequential(
            *_mlp_hidden(latent_dim, hidden, p), nn.Linear(last, num_classes)
        )


# --------------------------------------------------------------------------------------------
# CIFAR-10


class CifarEncoder(_SequentialNet):
    """(N,3,32,32) -> flat (N, latent_channels*64): convs with two pools to a (2,8,8) map."""

    def __init__(
        self,
        channels: int = 256,
        kernels: Sequence[int] = (7, 7, 5),
        latent_channels: int = 2,
        in_channels: int = 3,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        c = check_channels(channels, "CifarEncoder.channels")
        k0, k1, k2 = check_kernels(kernels, 3, "CifarEncoder.kernels", "cifar")
        check_channels(latent_channels, "CifarEncoder.latent_channels")
        check_channels(in_channels, "CifarEncoder.in_channels")
        p = check_dropout(dropout, "CifarEncoder.dropout")
        self.kernels = (k0, k1, k2)
        self.latent_dim = latent_channels * _CIFAR_LATENT_SIDE**2
        # As on MNIST, Dropout2d stays off the narrow latent map.
        self.layers = nn.Sequential(
            *_conv_bn_relu(in_channels, c, k0),
            *_dropout2d(p),
            nn.MaxPool2d(2),  # -> (C,16,16)
            # The report's "k2 s2" middle conv contradicts its unchanged 16x16 output; the spec
            # settles it as a same-padding conv.
            *_conv_bn_relu(c, c, k1),
            *_dropout2d(p),
            nn.MaxPool2d(2),  # -> (C,8,8)
            *_conv_bn_relu(c, latent_channels, k2),  # -> (2,8,8)
            nn.Flatten(),  # -> 128, no linear layer
        )


class CifarDecoder(_SequentialNet):
    """Flat (N, latent_channels*64) -> (N,3,32,32) in [-1,1]."""

    def __init__(
        self,
        channels: int = 256,
        kernels: Sequence[int] = (5, 7, 7, 7),
        latent_channels: int = 2,
        upsample: str = "convtranspose",
        out_channels: int = 3,
    ) -> None:
        super().__init__()
        c = check_channels(channels, "CifarDecoder.channels")
        k0, k1, k2, k3 = check_kernels(kernels, 4, "CifarDecoder.kernels", "cifar")
        check_channels(latent_channels, "CifarDecoder.latent_channels")
        self.upsample = check_upsample(upsample, "CifarDecoder.upsample")
        check_channels(out_channels, "CifarDecoder.out_channels")
        self.kernels = (k0, k1, k2, k3)
        side = _CIFAR_LATENT_SIDE
        self.layers = nn.Sequential(
            nn.Unflatten(1, (latent_channels, side, side)),
            *_conv_bn_relu(latent_channels, c, k0, transpose=True),  # -> (C,8,8)
            *_up_block(c, c, k1, upsample),  # -> (C,16,16)
            *_up_block(c, c, k2, upsample),  # -> (C,32,32)
            nn.Conv2d(c, out_channels, k3, padding=k3 // 2),
            nn.Tanh(),  # bounded output; images are normalized elsewhere
        )


class CifarClassifier(_SequentialNet):
    """Flat (N, latent_channels*64) latent -> class logits via a small CNN and an MLP."""

    def __init__(
        self,
        latent_channels: int = 2,
        channels: Sequence[int] = (256, 512),
        kernels: Sequence[int] = (3, 3),
        hidden: Sequence[int] = (512, 256, 128),
        dropout: float = 0.1,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        check_channels(latent_channels, "CifarClassifier.latent_channels")
        if len(channels) < 1:
            raise SettingError("CifarClassifier.channels: needs at least one conv width")
        for i, ch in enumerate(channels):
            check_channels(ch, f"CifarClassifier.channels[{i}]")
        ks = check_kernels(kernels, len(channels), "CifarClassifier.kernels", "cifar")
        for i, h in enumerate(hidden):
            check_size(h, f"CifarClassifier.hidden[{i}]")
        p = check_dropout(dropout, "CifarClassifier.dropout")
        check_size(num_classes, "CifarClassifier.num_classes")
        side = _CIFAR_LATENT_SIDE
        if side >> len(channels) < 1:
            raise SettingError(
                f"CifarClassifier.channels: each conv halves the 8x8 map; at most 3 convs fit, "
                f"got {len(channels)}"
            )
        layers: list[nn.Module] = [nn.Unflatten(1, (latent_channels, side, side))]
        cin = latent_channels
        for cout, k in zip(channels, ks, strict=True):
            layers += [*_conv_bn_relu(cin, cout, k), nn.Dropout2d(p), nn.MaxPool2d(2)]
            cin = cout
        side >>= len(channels)
        flat = cin * side * side  # 512 * 2 * 2 = 2048 by default
        last = hidden[-1] if len(hidden) else flat
        layers += [nn.Flatten(), *_mlp_hidden(flat, hidden, p), nn.Linear(last, num_classes)]
        self.layers = nn.Sequential(*layers)


# --------------------------------------------------------------------------------------------
# Contrastive head


class ProjectionHead(_SequentialNet):
    """SimCLR projection g(h): Linear ReLU Linear; the loss sees its output, probes do not."""

    def __init__(self, in_dim: int = 128, hidden_dim: int = 128, out_dim: int = 128) -> None:
        super().__init__()
        check_size(in_dim, "ProjectionHead.in_dim")
        check_size(hidden_dim, "ProjectionHead.hidden_dim")
        check_size(out_dim, "ProjectionHead.out_dim")
        self.layers = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim)
        )


# --------------------------------------------------------------------------------------------
# Assembly


@dataclass
class Networks:
    """The parts one task trains; ``decoder``/``projection`` are None where unused."""

    encoder: nn.Module
    decoder: nn.Module | None
    classifier: nn.Module
    projection: nn.Module | None
    latent_dim: int  # size of the flat latent the encoder emits

    def modules(self) -> dict[str, nn.Module]:
        """The non-None parts by name (for optimizers, device moves, checkpoints)."""
        parts = {
            "encoder": self.encoder,
            "decoder": self.decoder,
            "classifier": self.classifier,
            "projection": self.projection,
        }
        return {name: m for name, m in parts.items() if m is not None}


def build_networks(family: str, task: str, model: ModelConfig) -> Networks:
    """Build the networks ``task`` needs for a dataset ``family`` ("mnist" or "cifar").

    autoencoder: encoder + decoder + classifier; guided: encoder + classifier;
    contrastive: encoder + projection + classifier. ``model.latent_dim`` applies to MNIST only;
    CIFAR's latent is the flattened (2,8,8) map, i.e. 128.
    """
    check_family(family)
    check_task(task)
    check_model(model, family)
    enc_k, dec_k = model_kernels(model, family)

    encoder: nn.Module
    decoder: nn.Module | None = None
    classifier: nn.Module
    if family == "mnist":
        latent_dim = model.latent_dim
        encoder = MnistEncoder(model.channels, enc_k, latent_dim, dropout=model.encoder_dropout)
        if task == "autoencoder":
            decoder = MnistDecoder(model.channels, dec_k, latent_dim, model.decoder_upsample)
        classifier = MnistClassifier(latent_dim, dropout=model.classifier_dropout)
    else:
        cifar_encoder = CifarEncoder(model.channels, enc_k, dropout=model.encoder_dropout)
        latent_dim = cifar_encoder.latent_dim
        encoder = cifar_encoder
        if task == "autoencoder":
            decoder = CifarDecoder(model.channels, dec_k, upsample=model.decoder_upsample)
        classifier = CifarClassifier(dropout=model.classifier_dropout)

    projection = None
    if task == "contrastive":
        # SimCLR keeps the hidden width equal to the representation size.
        projection = ProjectionHead(latent_dim, latent_dim, model.projection_dim)
    return Networks(encoder, decoder, classifier, projection, latent_dim)


__all__ = [
    "FAMILIES",
    "CifarClassifier",
    "CifarDecoder",
    "CifarEncoder",
    "MnistClassifier",
    "MnistDecoder",
    "MnistEncoder",
    "Networks",
    "ProjectionHead",
    "build_networks",
]
