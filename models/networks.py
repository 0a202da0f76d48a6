"""The report's encoders, decoders, classifiers and projection head (spec: "Networks").

Every kernel size, channel width (each wide conv's, the latent map's, the classifier's convs'
and hidden layers', the projection head's), latent size, dropout rate and decoder upsampling
mode is a constructor parameter whose default is the report's value, so a search can vary any of
them; :class:`models.config.ModelConfig` names each one for a study file.
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
    check_hidden,
    check_kernels,
    check_model,
    check_size,
    check_task,
    check_upsample,
    check_widths,
    model_channels,
    model_classifier_convs,
    model_kernels,
    model_latent_channels,
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


def _widths(channels: int | Sequence[int], count: int, key: str) -> tuple[int, ...]:
    """``count`` conv widths: one int for all of them, or one per conv."""
    if isinstance(channels, int) and not isinstance(channels, bool):
        return (check_channels(channels, key),) * count
    widths = check_widths(channels, key)
    if len(widths) != count:
        raise SettingError(f"{key}: needs {count} channel counts, got {len(widths)}")
    return widths


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
    """(N,1,28,28) -> (N,latent_dim): two wide convs, pool, 1-channel conv, linear.

    ``channels`` is one width for both wide convs or a pair; ``latent_channels`` is the
    bottleneck map's (the report's 1: (1,14,14), flattened to 196 before the linear layer).
    """

    def __init__(
        self,
        channels: int | Sequence[int] = 256,
        kernels: Sequence[int] = (7, 7, 5),
        latent_dim: int = 128,
        in_channels: int = 1,
        dropout: float = 0.0,
        latent_channels: int = 1,
    ) -> None:
        super().__init__()
        c0, c1 = _widths(channels, 2, "MnistEncoder.channels")
        k0, k1, k2 = check_kernels(kernels, 3, "MnistEncoder.kernels", "mnist")
        self.latent_dim = check_size(latent_dim, "MnistEncoder.latent_dim")
        lc = check_channels(latent_channels, "MnistEncoder.latent_channels")
        check_channels(in_channels, "MnistEncoder.in_channels")
        p = check_dropout(dropout, "MnistEncoder.dropout")
        self.kernels = (k0, k1, k2)
        # Dropout2d only follows the wide blocks: on the 1-channel bottleneck map it would
        # zero a sample's whole latent input at once.
        self.layers = nn.Sequential(
            *_conv_bn_relu(in_channels, c0, k0),
            *_dropout2d(p),
            *_conv_bn_relu(c0, c1, k1),
            *_dropout2d(p),
            nn.MaxPool2d(2),  # -> (C,14,14)
            *_conv_bn_relu(c1, lc, k2),  # -> (1,14,14)
            nn.Flatten(),  # -> 196
            nn.Linear(lc * 14 * 14, latent_dim),
            nn.BatchNorm1d(latent_dim),
            nn.ReLU(inplace=True),
        )


class MnistDecoder(_SequentialNet):
    """(N,latent_dim) -> (N,1,28,28) in [0,1]; mirrors :class:`MnistEncoder` (``channels``:
    one width or a pair, ``latent_channels``: the map the linear layer unflattens to)."""

    def __init__(
        self,
        channels: int | Sequence[int] = 256,
        kernels: Sequence[int] = (7, 7, 5),
        latent_dim: int = 128,
        upsample: str = "convtranspose",
        out_channels: int = 1,
        latent_channels: int = 1,
    ) -> None:
        super().__init__()
        c0, c1 = _widths(channels, 2, "MnistDecoder.channels")
        k0, k1, k2 = check_kernels(kernels, 3, "MnistDecoder.kernels", "mnist")
        check_size(latent_dim, "MnistDecoder.latent_dim")
        lc = check_channels(latent_channels, "MnistDecoder.latent_channels")
        self.upsample = check_upsample(upsample, "MnistDecoder.upsample")
        check_channels(out_channels, "MnistDecoder.out_channels")
        self.kernels = (k0, k1, k2)
        self.layers = nn.Sequential(
            nn.Linear(latent_dim, lc * 14 * 14),
            nn.BatchNorm1d(lc * 14 * 14),
            nn.ReLU(inplace=True),
            nn.Unflatten(1, (lc, 14, 14)),
            *_up_block(lc, c0, k0, upsample),  # -> (C,28,28)
            *_conv_bn_relu(c0, c1, k1, transpose=True),
            nn.ConvTranspose2d(c1, out_channels, k2, padding=k2 // 2),
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
        hidden = check_hidden(hidden, "MnistClassifier.hidden")
        p = check_dropout(dropout, "MnistClassifier.dropout")
        check_size(num_classes, "MnistClassifier.num_classes")
        last = hidden[-1] if len(hidden) else latent_dim
        self.layers = nn.Sequential(
            *_mlp_hidden(latent_dim, hidden, p), nn.Linear(last, num_classes)
        )


# --------------------------------------------------------------------------------------------
# CIFAR-10


class CifarEncoder(_SequentialNet):
    """(N,3,32,32) -> flat (N, latent_channels*64): convs with two pools to a (2,8,8) map;
    ``channels`` is one width for both wide convs or a pair."""

    def __init__(
        self,
        channels: int | Sequence[int] = 256,
        kernels: Sequence[int] = (7, 7, 5),
        latent_channels: int = 2,
        in_channels: int = 3,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        c0, c1 = _widths(channels, 2, "CifarEncoder.channels")
        k0, k1, k2 = check_kernels(kernels, 3, "CifarEncoder.kernels", "cifar")
        check_channels(latent_channels, "CifarEncoder.latent_channels")
        check_channels(in_channels, "CifarEncoder.in_channels")
        p = check_dropout(dropout, "CifarEncoder.dropout")
        self.kernels = (k0, k1, k2)
        self.latent_dim = latent_channels * _CIFAR_LATENT_SIDE**2
        # As on MNIST, Dropout2d stays off the narrow latent map.
        self.layers = nn.Sequential(
            *_conv_bn_relu(in_channels, c0, k0),
            *_dropout2d(p),
            nn.MaxPool2d(2),  # -> (C,16,16)
            # The report's "k2 s2" middle conv contradicts its unchanged 16x16 output; the spec
            # settles it as a same-padding conv.
            *_conv_bn_relu(c0, c1, k1),
            *_dropout2d(p),
            nn.MaxPool2d(2),  # -> (C,8,8)
            *_conv_bn_relu(c1, latent_channels, k2),  # -> (2,8,8)
            nn.Flatten(),  # -> 128, no linear layer
        )


class CifarDecoder(_SequentialNet):
    """Flat (N, latent_channels*64) -> (N,3,32,32) in [-1,1]; ``channels`` is one width for the
    three wide convs or one per conv."""

    def __init__(
        self,
        channels: int | Sequence[int] = 256,
        kernels: Sequence[int] = (5, 7, 7, 7),
        latent_channels: int = 2,
        upsample: str = "convtranspose",
        out_channels: int = 3,
    ) -> None:
        super().__init__()
        c0, c1, c2 = _widths(channels, 3, "CifarDecoder.channels")
        k0, k1, k2, k3 = check_kernels(kernels, 4, "CifarDecoder.kernels", "cifar")
        check_channels(latent_channels, "CifarDecoder.latent_channels")
        self.upsample = check_upsample(upsample, "CifarDecoder.upsample")
        check_channels(out_channels, "CifarDecoder.out_channels")
        self.kernels = (k0, k1, k2, k3)
        side = _CIFAR_LATENT_SIDE
        self.layers = nn.Sequential(
            nn.Unflatten(1, (latent_channels, side, side)),
            *_conv_bn_relu(latent_channels, c0, k0, transpose=True),  # -> (C,8,8)
            *_up_block(c0, c1, k1, upsample),  # -> (C,16,16)
            *_up_block(c1, c2, k2, upsample),  # -> (C,32,32)
            nn.Conv2d(c2, out_channels, k3, padding=k3 // 2),
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
        hidden = check_hidden(hidden, "CifarClassifier.hidden")
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


def build_networks(family: str, task: str, model: ModelConfig, num_classes: int = 10) -> Networks:
    """Build the networks ``task`` needs for a dataset ``family`` ("mnist" or "cifar") of
    ``num_classes`` classes (MNIST and CIFAR-10 have 10; an image folder has its own).

    autoencoder: encoder + decoder + classifier; guided: encoder + classifier;
    contrastive: encoder + projection + classifier. ``model.latent_dim`` applies to MNIST only;
    CIFAR's latent is the flattened (latent_channels,8,8) map, i.e. 128 by default. Every
    ``None`` of ``model`` takes the report's value for ``family``.
    """
    check_family(family)
    check_task(task)
    check_model(model, family)
    enc_k, dec_k = model_kernels(model, family)
    enc_c, dec_c = model_channels(model, family)
    lc = model_latent_channels(model, family)
    hidden = model.classifier_hidden

    encoder: nn.Module
    decoder: nn.Module | None = None
    classifier: nn.Module
    if family == "mnist":
        latent_dim = model.latent_dim
        encoder = MnistEncoder(
            enc_c, enc_k, latent_dim, dropout=model.encoder_dropout, latent_channels=lc
        )
        if task == "autoencoder":
            decoder = MnistDecoder(
                dec_c, dec_k, latent_dim, model.decoder_upsample, latent_channels=lc
            )
        classifier = MnistClassifier(
            latent_dim, hidden, dropout=model.classifier_dropout, num_classes=num_classes
        )
    else:
        cifar_encoder = CifarEncoder(enc_c, enc_k, lc, dropout=model.encoder_dropout)
        latent_dim = cifar_encoder.latent_dim
        encoder = cifar_encoder
        if task == "autoencoder":
            decoder = CifarDecoder(dec_c, dec_k, lc, upsample=model.decoder_upsample)
        clf_c, clf_k = model_classifier_convs(model, family)
        classifier = CifarClassifier(
            lc,
            clf_c,
            clf_k,
            hidden,
            dropout=model.classifier_dropout,
            num_classes=num_classes,
        )

    projection = None
    if task == "contrastive":
        # SimCLR keeps the hidden width equal to the representation size unless set.
        width = latent_dim if model.projection_hidden is None else model.projection_hidden
        projection = ProjectionHead(latent_dim, width, model.projection_dim)
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
