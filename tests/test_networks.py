"""Shapes and structure of the report's networks (spec: "Networks"), and build_networks."""

from __future__ import annotations

import pytest
import torch
from conftest import trace_shapes
from torch import nn

from models.config import ModelConfig, check_model
from models.data import FAMILY_SHAPES
from models.errors import SettingError
from models.networks import (
    CifarClassifier,
    CifarDecoder,
    CifarEncoder,
    MnistClassifier,
    MnistDecoder,
    MnistEncoder,
    Networks,
    ProjectionHead,
    build_networks,
)

BATCH = 2
NARROW = 8  # channel width for tests that do not check the report's defaults

# Layers whose output shape the spec's tables state.
SHAPED = (
    nn.Conv2d,
    nn.ConvTranspose2d,
    nn.Linear,
    nn.MaxPool2d,
    nn.Upsample,
    nn.Flatten,
    nn.Unflatten,
)


def trace(net: nn.Module, x: torch.Tensor) -> list[tuple[str, tuple[int, ...]]]:
    """(layer type, per-sample output shape) for every SHAPED layer, in execution order."""
    return trace_shapes(net, x, SHAPED)


def leaf_types(net: nn.Module) -> list[str]:
    return [type(m).__name__ for m in net.modules() if not list(m.children())]


def conv_geometry(net: nn.Module) -> list[tuple[str, int, int, int, int]]:
    """(type, kernel, padding, stride, output_padding) of each conv, in order."""
    rows = []
    for m in net.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
            op = m.output_padding[0] if isinstance(m, nn.ConvTranspose2d) else 0
            rows.append((type(m).__name__, m.kernel_size[0], m.padding[0], m.stride[0], op))
    return rows


def mnist_images(n: int = BATCH) -> torch.Tensor:
    return torch.rand(n, *FAMILY_SHAPES["mnist"])


def cifar_images(n: int = BATCH) -> torch.Tensor:
    return torch.randn(n, *FAMILY_SHAPES["cifar"])


# --------------------------------------------------------------------------------------------
# Default widths: per-layer shapes written out from the spec


def test_mnist_encoder_default_shapes() -> None:
    net = MnistEncoder()
    assert trace(net, mnist_images()) == [
        ("Conv2d", (256, 28, 28)),
        ("Conv2d", (256, 28, 28)),
        ("MaxPool2d", (256, 14, 14)),
        ("Conv2d", (1, 14, 14)),
        ("Flatten", (196,)),
        ("Linear", (128,)),
    ]
    assert leaf_types(net) == [
        "Conv2d", "BatchNorm2d", "ReLU",
        "Conv2d", "BatchNorm2d", "ReLU",
        "MaxPool2d",
        "Conv2d", "BatchNorm2d", "ReLU",
        "Flatten", "Linear", "BatchNorm1d", "ReLU",
    ]  # fmt: skip
    assert conv_geometry(net) == [
        ("Conv2d", 7, 3, 1, 0),
        ("Conv2d", 7, 3, 1, 0),
        ("Conv2d", 5, 2, 1, 0),
    ]


def test_mnist_decoder_default_shapes() -> None:
    net = MnistDecoder()
    assert trace(net, torch.randn(BATCH, 128)) == [
        ("Linear", (196,)),
        ("Unflatten", (1, 14, 14)),
        ("ConvTranspose2d", (256, 28, 28)),
        ("ConvTranspose2d", (256, 28, 28)),
        ("ConvTranspose2d", (1, 28, 28)),
    ]
    assert leaf_types(net) == [
        "Linear", "BatchNorm1d", "ReLU",
        "Unflatten",
        "ConvTranspose2d", "BatchNorm2d", "ReLU",
        "ConvTranspose2d", "BatchNorm2d", "ReLU",
        "ConvTranspose2d",
        "Sigmoid",
    ]  # fmt: skip
    assert conv_geometry(net) == [
        ("ConvTranspose2d", 7, 3, 2, 1),
        ("ConvTranspose2d", 7, 3, 1, 0),
        ("ConvTranspose2d", 5, 2, 1, 0),
    ]


def test_mnist_classifier_default_shapes() -> None:
    net = MnistClassifier()
    assert trace(net, torch.randn(BATCH, 128)) == [
        ("Linear", (512,)),
        ("Linear", (256,)),
        ("Linear", (128,)),
        ("Linear", (10,)),
    ]
    assert leaf_types(net) == [
        *["Linear", "BatchNorm1d", "ReLU", "Dropout"] * 3,
        "Linear",
    ]
    assert all(m.p == 0.1 for m in net.modules() if isinstance(m, nn.Dropout))


def test_cifar_encoder_default_shapes() -> None:
    net = CifarEncoder()
    assert trace(net, cifar_images()) == [
        ("Conv2d", (256, 32, 32)),
        ("MaxPool2d", (256, 16, 16)),
        ("Conv2d", (256, 16, 16)),
        ("MaxPool2d", (256, 8, 8)),
        ("Conv2d", (2, 8, 8)),
        ("Flatten", (128,)),
    ]
    assert leaf_types(net) == [
        "Conv2d", "BatchNorm2d", "ReLU",
        "MaxPool2d",
        "Conv2d", "BatchNorm2d", "ReLU",
        "MaxPool2d",
        "Conv2d", "BatchNorm2d", "ReLU",
        "Flatten",
    ]  # fmt: skip
    assert conv_geometry(net) == [
        ("Conv2d", 7, 3, 1, 0),
        ("Conv2d", 7, 3, 1, 0),
        ("Conv2d", 5, 2, 1, 0),
    ]
    assert net.latent_dim == 128


def test_cifar_decoder_default_shapes() -> None:
    net = CifarDecoder()
    assert trace(net, torch.randn(BATCH, 128)) == [
        ("Unflatten", (2, 8, 8)),
        ("ConvTranspose2d", (256, 8, 8)),
        ("ConvTranspose2d", (256, 16, 16)),
        ("ConvTranspose2d", (256, 32, 32)),
        ("Conv2d", (3, 32, 32)),
    ]
    assert leaf_types(net) == [
        "Unflatten",
        "ConvTranspose2d", "BatchNorm2d", "ReLU",
        "ConvTranspose2d", "BatchNorm2d", "ReLU",
        "ConvTranspose2d", "BatchNorm2d", "ReLU",
        "Conv2d",
        "Tanh",
    ]  # fmt: skip
    assert conv_geometry(net) == [
        ("ConvTranspose2d", 5, 2, 1, 0),
        ("ConvTranspose2d", 7, 3, 2, 1),
        ("ConvTranspose2d", 7, 3, 2, 1),
        ("Conv2d", 7, 3, 1, 0),
    ]


def test_cifar_classifier_default_shapes() -> None:
    net = CifarClassifier()
    assert trace(net, torch.randn(BATCH, 128)) == [
        ("Unflatten", (2, 8, 8)),
        ("Conv2d", (256, 8, 8)),
        ("MaxPool2d", (256, 4, 4)),
        ("Conv2d", (512, 4, 4)),
        ("MaxPool2d", (512, 2, 2)),
        ("Flatten", (2048,)),
        ("Linear", (512,)),
        ("Linear", (256,)),
        ("Linear", (128,)),
        ("Linear", (10,)),
    ]
    assert leaf_types(net) == [
        "Unflatten",
        *["Conv2d", "BatchNorm2d", "ReLU", "Dropout2d", "MaxPool2d"] * 2,
        "Flatten",
        *["Linear", "BatchNorm1d", "ReLU", "Dropout"] * 3,
        "Linear",
    ]
    assert conv_geometry(net) == [("Conv2d", 3, 1, 1, 0), ("Conv2d", 3, 1, 1, 0)]
    drops = [m.p for m in net.modules() if isinstance(m, nn.Dropout | nn.Dropout2d)]
    assert drops == [0.1] * 5


def test_projection_head_default_shapes() -> None:
    net = ProjectionHead()
    assert trace(net, torch.randn(BATCH, 128)) == [("Linear", (128,)), ("Linear", (128,))]
    assert leaf_types(net) == ["Linear", "ReLU", "Linear"]


# --------------------------------------------------------------------------------------------
# Output ranges


def _scale_last_conv(net: nn.Module, factor: float) -> None:
    """Blow up the final conv so its pre-activation range is far outside [-1, 1]."""
    last = [m for m in net.modules() if isinstance(m, nn.Conv2d | nn.ConvTranspose2d)][-1]
    with torch.no_grad():
        last.weight.mul_(factor)


def test_mnist_decoder_output_in_unit_interval() -> None:
    torch.manual_seed(0)
    net = MnistDecoder(channels=NARROW)
    _scale_last_conv(net, 100.0)
    with torch.no_grad():
        out = net(torch.randn(4, 128))
    assert out.shape == (4, 1, 28, 28)
    assert out.min() >= 0.0 and out.max() <= 1.0
    # The pre-activation was wide, so the bounds above come from the sigmoid.
    assert out.min() < 0.05 and out.max() > 0.95


def test_cifar_decoder_output_in_tanh_range() -> None:
    torch.manual_seed(0)
    net = CifarDecoder(channels=NARROW)
    _scale_last_conv(net, 100.0)
    with torch.no_grad():
        out = net(torch.randn(4, 128))
    assert out.shape == (4, 3, 32, 32)
    assert out.min() >= -1.0 and out.max() <= 1.0
    assert out.min() < -0.9 and out.max() > 0.9


# --------------------------------------------------------------------------------------------
# Upsampling modes


@pytest.mark.parametrize("mode", ["convtranspose", "nearest", "bilinear"])
def test_decoder_upsample_modes_keep_output_shape(mode: str) -> None:
    mnist = MnistDecoder(channels=NARROW, upsample=mode)
    cifar = CifarDecoder(channels=NARROW, upsample=mode)
    with torch.no_grad():
        assert mnist(torch.randn(BATCH, 128)).shape == (BATCH, 1, 28, 28)
        assert cifar(torch.randn(BATCH, 128)).shape == (BATCH, 3, 32, 32)
    for net, n_up in ((mnist, 1), (cifar, 2)):
        ups = [m for m in net.modules() if isinstance(m, nn.Upsample)]
        strided = [
            m for m in net.modules() if isinstance(m, nn.ConvTranspose2d) and m.stride[0] == 2
        ]
        if mode == "convtranspose":
            assert (len(ups), len(strided)) == (0, n_up)
        else:
            assert (len(ups), len(strided)) == (n_up, 0)
            assert all(u.mode == mode and u.scale_factor == 2 for u in ups)


def test_mnist_decoder_interpolation_block_shapes() -> None:
    net = MnistDecoder(channels=NARROW, upsample="nearest")
    assert trace(net, torch.randn(BATCH, 128)) == [
        ("Linear", (196,)),
        ("Unflatten", (1, 14, 14)),
        ("Upsample", (1, 28, 28)),
        ("Conv2d", (NARROW, 28, 28)),
        ("ConvTranspose2d", (NARROW, 28, 28)),
        ("ConvTranspose2d", (1, 28, 28)),
    ]
    assert conv_geometry(net)[0] == ("Conv2d", 7, 3, 1, 0)


def test_cifar_decoder_interpolation_block_shapes() -> None:
    net = CifarDecoder(channels=NARROW, upsample="bilinear")
    assert trace(net, torch.randn(BATCH, 128)) == [
        ("Unflatten", (2, 8, 8)),
        ("ConvTranspose2d", (NARROW, 8, 8)),
        ("Upsample", (NARROW, 16, 16)),
        ("Conv2d", (NARROW, 16, 16)),
        ("Upsample", (NARROW, 32, 32)),
        ("Conv2d", (NARROW, 32, 32)),
        ("Conv2d", (3, 32, 32)),
    ]
    # Each up-block is followed by BN ReLU.
    types = leaf_types(net)
    for i, t in enumerate(types):
        if t == "Upsample":
            assert types[i + 1 : i + 4] == ["Conv2d", "BatchNorm2d", "ReLU"]


# --------------------------------------------------------------------------------------------
# Non-default kernels and widths


@pytest.mark.parametrize("ks", [(3, 3, 3), (5, 3, 5), (3, 5, 7)])
def test_mnist_nondefault_kernels_keep_shapes(ks: tuple[int, int, int]) -> None:
    enc = MnistEncoder(channels=NARROW, kernels=ks, latent_dim=32)
    dec = MnistDecoder(channels=NARROW, kernels=ks, latent_dim=32)
    assert [row[1] for row in conv_geometry(enc)] == list(ks)
    assert [row[1] for row in conv_geometry(dec)] == list(ks)
    with torch.no_grad():
        z = enc(mnist_images())
        assert z.shape == (BATCH, 32)
        assert dec(z).shape == (BATCH, 1, 28, 28)


@pytest.mark.parametrize(
    ("enc_ks", "dec_ks"), [((3, 3, 3), (3, 3, 3, 3)), ((5, 3, 5), (3, 5, 5, 3))]
)
def test_cifar_nondefault_kernels_keep_shapes(
    enc_ks: tuple[int, ...], dec_ks: tuple[int, ...]
) -> None:
    enc = CifarEncoder(channels=NARROW, kernels=enc_ks)
    dec = CifarDecoder(channels=NARROW, kernels=dec_ks)
    clf = CifarClassifier(channels=(NARROW, 2 * NARROW), kernels=(5, 3), hidden=(16,))
    assert [row[1] for row in conv_geometry(enc)] == list(enc_ks)
    assert [row[1] for row in conv_geometry(dec)] == list(dec_ks)
    with torch.no_grad():
        z = enc(cifar_images())
        assert z.shape == (BATCH, 128)
        assert dec(z).shape == (BATCH, 3, 32, 32)
        assert clf(z).shape == (BATCH, 10)


def test_encoder_dropout_is_absent_by_default_and_added_when_set() -> None:
    for cls in (MnistEncoder, CifarEncoder):
        assert not any(isinstance(m, nn.Dropout2d) for m in cls(channels=NARROW).modules())
        drops = [m for m in cls(channels=NARROW, dropout=0.2).modules()]
        drops = [m for m in drops if isinstance(m, nn.Dropout2d)]
        assert len(drops) == 2 and all(m.p == 0.2 for m in drops)


def test_cifar_latent_channels_change_latent_size() -> None:
    enc = CifarEncoder(channels=NARROW, latent_channels=4)
    dec = CifarDecoder(channels=NARROW, latent_channels=4)
    clf = CifarClassifier(latent_channels=4, channels=(8, 8))
    assert enc.latent_dim == 256
    with torch.no_grad():
        z = enc(cifar_images())
        assert z.shape == (BATCH, 256)
        assert dec(z).shape == (BATCH, 3, 32, 32)
        assert clf(z).shape == (BATCH, 10)


# --------------------------------------------------------------------------------------------
# build_networks

EXPECTED_PARTS = {
    "autoencoder": {"encoder", "decoder", "classifier"},
    "guided": {"encoder", "classifier"},
    "contrastive": {"encoder", "projection", "classifier"},
}
FAMILY_TYPES = {
    "mnist": (MnistEncoder, MnistDecoder, MnistClassifier),
    "cifar": (CifarEncoder, CifarDecoder, CifarClassifier),
}


@pytest.mark.parametrize("family", ["mnist", "cifar"])
@pytest.mark.parametrize("task", ["autoencoder", "guided", "contrastive"])
def test_build_networks_parts(family: str, task: str) -> None:
    nets = build_networks(family, task, ModelConfig(channels=NARROW, projection_dim=64))
    assert isinstance(nets, Networks)
    assert set(nets.modules()) == EXPECTED_PARTS[task]
    assert all(isinstance(m, nn.Module) for m in nets.modules().values())
    assert (nets.decoder is None) == (task != "autoencoder")
    assert (nets.projection is None) == (task != "contrastive")
    enc_t, dec_t, clf_t = FAMILY_TYPES[family]
    assert isinstance(nets.encoder, enc_t) and isinstance(nets.classifier, clf_t)
    assert nets.latent_dim == 128
    x = mnist_images() if family == "mnist" else cifar_images()
    with torch.no_grad():
        z = nets.encoder(x)
        assert z.shape == (BATCH, nets.latent_dim)
        assert nets.classifier(z).shape == (BATCH, 10)
        if nets.decoder is not None:
            assert isinstance(nets.decoder, dec_t)
            assert nets.decoder(z).shape == x.shape
        if nets.projection is not None:
            assert isinstance(nets.projection, ProjectionHead)
            assert nets.projection(z).shape == (BATCH, 64)


@pytest.mark.parametrize(
    ("family", "enc_ks", "dec_ks"),
    [("mnist", [7, 7, 5], [7, 7, 5]), ("cifar", [7, 7, 5], [5, 7, 7, 7])],
)
def test_build_networks_default_kernels_per_family(
    family: str, enc_ks: list[int], dec_ks: list[int]
) -> None:
    nets = build_networks(family, "autoencoder", ModelConfig(channels=NARROW))
    assert [row[1] for row in conv_geometry(nets.encoder)] == enc_ks
    assert [row[1] for row in conv_geometry(nets.decoder)] == dec_ks


def test_build_networks_passes_model_config_through() -> None:
    model = ModelConfig(
        channels=NARROW,
        encoder_kernels=[3, 5, 3],
        decoder_kernels=[3, 3, 5],
        latent_dim=32,
        decoder_upsample="nearest",
        classifier_dropout=0.3,
        encoder_dropout=0.25,
        projection_dim=16,
    )
    ae = build_networks("mnist", "autoencoder", model)
    assert ae.latent_dim == 32
    assert [row[1] for row in conv_geometry(ae.encoder)] == [3, 5, 3]
    assert [row[1] for row in conv_geometry(ae.decoder)] == [3, 3, 5]
    assert ae.encoder.layers[0].out_channels == NARROW
    assert any(isinstance(m, nn.Upsample) and m.mode == "nearest" for m in ae.decoder.modules())
    enc_drops = [m.p for m in ae.encoder.modules() if isinstance(m, nn.Dropout2d)]
    clf_drops = [m.p for m in ae.classifier.modules() if isinstance(m, nn.Dropout)]
    assert enc_drops == [0.25, 0.25] and clf_drops == [0.3] * 3
    con = build_networks("mnist", "contrastive", model)
    with torch.no_grad():
        assert con.projection(con.encoder(mnist_images())).shape == (BATCH, 16)
    cifar_model = ModelConfig(channels=NARROW, classifier_dropout=0.3)
    cifar = build_networks("cifar", "guided", cifar_model)
    cifar_drops = [
        m.p for m in cifar.classifier.modules() if isinstance(m, nn.Dropout | nn.Dropout2d)
    ]
    assert cifar_drops == [0.3] * 5


# --------------------------------------------------------------------------------------------
# Bad inputs name the parameter


@pytest.mark.parametrize(
    ("family", "model", "match"),
    [
        (
            "mnist",
            ModelConfig(encoder_kernels=[7, 4, 5]),
            r"model\.encoder_kernels\[1\]: kernel sizes must be odd positive integers, got 4",
        ),
        (
            "cifar",
            ModelConfig(encoder_kernels=[7, 5]),
            r"model\.encoder_kernels: needs 3 kernel sizes for cifar, got 2",
        ),
        (
            "cifar",
            ModelConfig(decoder_kernels=[7, 7, 5]),
            r"model\.decoder_kernels: needs 4 kernel sizes for cifar, got 3",
        ),
        ("mnist", ModelConfig(decoder_kernels=[7, 7, 0]), r"model\.decoder_kernels\[2\]"),
        ("mnist", ModelConfig(decoder_kernels=[-3, 7, 5]), r"model\.decoder_kernels\[0\]"),
        ("mnist", ModelConfig(channels=0), r"model\.channels"),
        ("mnist", ModelConfig(latent_dim=0), r"model\.latent_dim"),
        (
            "mnist",
            ModelConfig(decoder_upsample="bicubic"),
            r"model\.decoder_upsample: .*'bicubic'.*convtranspose, nearest, bilinear",
        ),
        ("cifar", ModelConfig(encoder_dropout=1.0), r"model\.encoder_dropout"),
        ("cifar", ModelConfig(classifier_dropout=-0.1), r"model\.classifier_dropout"),
        ("mnist", ModelConfig(projection_dim=0), r"model\.projection_dim"),
    ],
)
def test_build_networks_rejects_bad_model(family: str, model: ModelConfig, match: str) -> None:
    with pytest.raises(SettingError, match=match):
        build_networks(family, "autoencoder", model)


def test_build_networks_rejects_unknown_family_and_task() -> None:
    with pytest.raises(SettingError, match=r"family: .*'svhn'.*mnist, cifar"):
        build_networks("svhn", "guided", ModelConfig())
    with pytest.raises(SettingError, match=r"task: .*'rotation'.*autoencoder, guided, contrastive"):
        build_networks("mnist", "rotation", ModelConfig())


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: MnistEncoder(kernels=(7, 4, 5)), r"MnistEncoder\.kernels\[1\]: .*odd.*got 4"),
        (lambda: MnistEncoder(kernels=(7, 7)), r"MnistEncoder\.kernels: needs 3 .*mnist, got 2"),
        (lambda: MnistEncoder(channels=0), r"MnistEncoder\.channels"),
        (lambda: MnistDecoder(kernels=(7, 7, 6)), r"MnistDecoder\.kernels\[2\]"),
        (lambda: MnistDecoder(upsample="linear"), r"MnistDecoder\.upsample: .*'linear'"),
        (lambda: CifarEncoder(kernels=(7, True, 5)), r"CifarEncoder\.kernels\[1\]"),
        (lambda: CifarEncoder(channels=-1), r"CifarEncoder\.channels"),
        (lambda: CifarDecoder(kernels=(5, 7, 7)), r"CifarDecoder\.kernels: needs 4 .*got 3"),
        (lambda: CifarDecoder(channels=0), r"CifarDecoder\.channels"),
        (lambda: CifarDecoder(upsample="area"), r"CifarDecoder\.upsample"),
        (lambda: CifarClassifier(kernels=(3, 2)), r"CifarClassifier\.kernels\[1\]"),
        (lambda: CifarClassifier(kernels=(3,)), r"CifarClassifier\.kernels: needs 2"),
        (lambda: CifarClassifier(channels=(256, 0)), r"CifarClassifier\.channels\[1\]"),
        (lambda: MnistClassifier(dropout=1.5), r"MnistClassifier\.dropout"),
        (lambda: ProjectionHead(out_dim=0), r"ProjectionHead\.out_dim"),
    ],
)
def test_constructors_reject_bad_arguments(make, match: str) -> None:
    with pytest.raises(SettingError, match=match):
        make()


def test_check_model_before_the_family_is_known() -> None:
    """imagefolder's family is known once its images are read: either family's count passes."""
    check_model(ModelConfig(decoder_kernels=[5, 7, 7]), None)  # mnist's count
    check_model(ModelConfig(decoder_kernels=[5, 7, 7, 7]), None)  # cifar's count
    with pytest.raises(
        SettingError,
        match=r"^model\.decoder_kernels: needs 3 \(mnist\) or 4 \(cifar\) kernel sizes, got 2",
    ):
        check_model(ModelConfig(decoder_kernels=[5, 7]), None)
    with pytest.raises(SettingError, match=r"^model\.encoder_kernels\[1\]: .*odd"):
        check_model(ModelConfig(encoder_kernels=[5, 6, 7]), None)
