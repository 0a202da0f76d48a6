"""Fidelity to the report's search space: every width and kernel of its networks is settable
from a study file and searchable; MNIST 1.2.1/1.2.2 get an augmentation behind aug_strength
(0, the report's none, by default); the classifier keeps the report's fixed recipe.

Fast, CPU only, narrow widths.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import optuna
import pytest
import torch
from conftest import trace_shapes
from torch import nn

from models.augment import build_augmentation
from models.config import ModelConfig, ProbeConfig, TrainConfig
from models.data import ImageSplits
from models.networks import build_networks
from search.config import ConfigError, load_config, to_dataclasses
from search.space import apply, baseline_params, suggest

BATCH = 2
SHAPED = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.MaxPool2d, nn.Flatten, nn.Unflatten)

# A study file per family setting every width and kernel its networks have.
EVERY_WIDTH = {
    "mnist": """
        task: autoencoder
        data: {name: mnist}
        model:
          channels: 8
          encoder_channels: [6, 10]
          decoder_channels: [12, 4]
          encoder_kernels: [3, 5, 3]
          decoder_kernels: [5, 3, 3]
          latent_channels: 2
          latent_dim: 24
          classifier_hidden: [20, 12]
          projection_hidden: 18
          projection_dim: 14
        train: {device: cpu}
    """,
    "cifar": """
        task: autoencoder
        data: {name: cifar10}
        model:
          channels: 8
          encoder_channels: [6, 10]
          decoder_channels: [12, 4, 6]
          encoder_kernels: [3, 5, 3]
          decoder_kernels: [3, 5, 3, 5]
          latent_channels: 3
          classifier_channels: [16, 8, 12]
          classifier_kernels: [5, 3, 1]
          classifier_hidden: [20]
          projection_hidden: 18
          projection_dim: 14
        train: {device: cpu}
    """,
}

# The per-layer (type, output shape) each part must then have, and its conv kernels.
EXPECTED = {
    "mnist": {
        "encoder": [
            ("Conv2d", (6, 28, 28)), ("Conv2d", (10, 28, 28)), ("MaxPool2d", (10, 14, 14)),
            ("Conv2d", (2, 14, 14)), ("Flatten", (392,)), ("Linear", (24,)),
        ],
        "decoder": [
            ("Linear", (392,)), ("Unflatten", (2, 14, 14)), ("ConvTranspose2d", (12, 28, 28)),
            ("ConvTranspose2d", (4, 28, 28)), ("ConvTranspose2d", (1, 28, 28)),
        ],
        "classifier": [("Linear", (20,)), ("Linear", (12,)), ("Linear", (10,))],
        "projection": [("Linear", (18,)), ("Linear", (14,))],
    },
    "cifar": {
        "encoder": [
            ("Conv2d", (6, 32, 32)), ("MaxPool2d", (6, 16, 16)), ("Conv2d", (10, 16, 16)),
            ("MaxPool2d", (10, 8, 8)), ("Conv2d", (3, 8, 8)), ("Flatten", (192,)),
        ],
        "decoder": [
            ("Unflatten", (3, 8, 8)), ("ConvTranspose2d", (12, 8, 8)),
            ("ConvTranspose2d", (4, 16, 16)), ("ConvTranspose2d", (6, 32, 32)),
            ("Conv2d", (3, 32, 32)),
        ],
        "classifier": [
            ("Unflatten", (3, 8, 8)), ("Conv2d", (16, 8, 8)), ("MaxPool2d", (16, 4, 4)),
            ("Conv2d", (8, 4, 4)), ("MaxPool2d", (8, 2, 2)), ("Conv2d", (12, 2, 2)),
            ("MaxPool2d", (12, 1, 1)), ("Flatten", (12,)), ("Linear", (20,)), ("Linear", (10,)),
        ],
        "projection": [("Linear", (18,)), ("Linear", (14,))],
    },
}  # fmt: skip
KERNELS = {
    "mnist": {"encoder": [3, 5, 3], "decoder": [5, 3, 3], "classifier": []},
    "cifar": {"encoder": [3, 5, 3], "decoder": [3, 5, 3, 5], "classifier": [5, 3, 1]},
}
IMAGE = {"mnist": (1, 28, 28), "cifar": (3, 32, 32)}


def write_study(tmp_path: Path, text: str, name: str = "study") -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(textwrap.dedent(text))
    return str(path)


def trace(net: nn.Module, x: torch.Tensor) -> list[tuple[str, tuple[int, ...]]]:
    return trace_shapes(net, x, SHAPED, eval_mode=True)


def kernels_of(net: nn.Module) -> list[int]:
    return [
        m.kernel_size[0] for m in net.modules() if isinstance(m, nn.Conv2d | nn.ConvTranspose2d)
    ]


def error_line(study: str, overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(study, overrides)
    message = str(info.value)
    assert "\n" not in message, message
    return message


# --------------------------------------------------------------------------------------------
# Every width and kernel from a study file


@pytest.mark.parametrize("family", ["mnist", "cifar"])
def test_study_setting_every_width_and_kernel_builds_those_layers(tmp_path, family):
    cfg = load_config(write_study(tmp_path, EVERY_WIDTH[family]), [])
    _, model, _ = to_dataclasses(cfg)
    latent = {"mnist": 24, "cifar": 3 * 8 * 8}[family]
    x = torch.rand(BATCH, *IMAGE[family])
    for task in ("autoencoder", "guided", "contrastive"):
        nets = build_networks(family, task, model)
        assert nets.latent_dim == latent
        z = torch.randn(BATCH, latent)
        assert trace(nets.encoder, x) == EXPECTED[family]["encoder"]
        assert trace(nets.classifier, z) == EXPECTED[family]["classifier"]
        assert kernels_of(nets.encoder) == KERNELS[family]["encoder"]
        assert kernels_of(nets.classifier) == KERNELS[family]["classifier"]
        if task == "autoencoder":
            assert trace(nets.decoder, z) == EXPECTED[family]["decoder"]
            assert kernels_of(nets.decoder) == KERNELS[family]["decoder"]
        if task == "contrastive":
            assert trace(nets.projection, z) == EXPECTED[family]["projection"]


@pytest.mark.parametrize("family", ["mnist", "cifar"])
def test_none_is_the_reports_network(family):
    """Unset, the new fields give the report's widths (as ModelConfig's shared channels)."""
    nets = build_networks(family, "autoencoder", ModelConfig(channels=8))
    x = torch.rand(BATCH, *IMAGE[family])
    shapes = trace(nets.encoder, x)
    if family == "mnist":
        assert shapes[3:] == [("Conv2d", (1, 14, 14)), ("Flatten", (196,)), ("Linear", (128,))]
        assert trace(nets.classifier, torch.randn(BATCH, 128)) == [
            ("Linear", (512,)),
            ("Linear", (256,)),
            ("Linear", (128,)),
            ("Linear", (10,)),
        ]
    else:
        assert shapes[-2:] == [("Conv2d", (2, 8, 8)), ("Flatten", (128,))]
        clf = trace(nets.classifier, torch.randn(BATCH, 128))
        assert [s for t, s in clf if t == "Conv2d"] == [(256, 8, 8), (512, 4, 4)]
        assert kernels_of(nets.classifier) == [3, 3]
    contrastive = build_networks(family, "contrastive", ModelConfig(channels=8))
    assert trace(contrastive.projection, torch.randn(BATCH, 128)) == [
        ("Linear", (128,)),
        ("Linear", (128,)),
    ]


SPACE = {
    "mnist": """
        search:
          space:
            channels: {target: model.channels, choices: [4, 8]}
            enc_c0: {target: model.encoder_channels.0, choices: [4, 6]}
            enc_c1: {target: model.encoder_channels.1, type: int, low: 2, high: 12}
            dec_c0: {target: model.decoder_channels.0, choices: [4, 12]}
            dec_c1: {target: model.decoder_channels.1, choices: [4, 8]}
            enc_k0: {target: model.encoder_kernels.0, choices: [3, 5]}
            dec_k2: {target: model.decoder_kernels.2, choices: [1, 3]}
            latent_channels: {target: model.latent_channels, type: int, low: 1, high: 4}
            hidden_0: {target: model.classifier_hidden.0, choices: [8, 16, 32]}
            projection_hidden: {target: model.projection_hidden, choices: [8, 18, 32]}
            projection_dim: {target: model.projection_dim, choices: [8, 16]}
            aug_strength: {target: train.aug_strength, low: 0.0, high: 1.5}
    """,
    "cifar": """
        search:
          space:
            enc_c0: {target: model.encoder_channels.0, choices: [4, 6]}
            dec_c2: {target: model.decoder_channels.2, choices: [4, 8]}
            latent_channels: {target: model.latent_channels, choices: [1, 2, 4]}
            clf_c0: {target: model.classifier_channels.0, choices: [4, 8]}
            clf_c2: {target: model.classifier_channels.2, choices: [4, 16]}
            clf_k1: {target: model.classifier_kernels.1, choices: [1, 3, 5]}
            hidden_0: {target: model.classifier_hidden.0, type: int, low: 4, high: 40}
            projection_hidden: {target: model.projection_hidden, choices: [8, 18, 32]}
    """,
}


@pytest.mark.parametrize("family", ["mnist", "cifar"])
def test_a_space_over_every_width_validates_and_each_sample_builds(tmp_path, family):
    text = textwrap.dedent(EVERY_WIDTH[family]) + textwrap.dedent(SPACE[family])
    cfg = load_config(write_study(tmp_path, text), [])
    # The study's own settings are the baseline trial.
    baseline = baseline_params(cfg)
    assert baseline["enc_c0"] == 6 and baseline["projection_hidden"] == 18
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(3):
        trial = study.ask()
        params = suggest(trial, cfg.search.space)
        _, model, _ = to_dataclasses(apply(cfg, params))
        assert model.latent_channels == params["latent_channels"]
        assert model.classifier_hidden[0] == params["hidden_0"]
        nets = build_networks(family, "contrastive", model)
        with torch.no_grad():
            nets.encoder.eval(), nets.classifier.eval(), nets.projection.eval()
            z = nets.encoder(torch.rand(BATCH, *IMAGE[family]))
            assert nets.classifier(z).shape == (BATCH, 10)
            assert nets.projection(z).shape[0] == BATCH
        study.tell(trial, 0.0)


@pytest.mark.parametrize(
    ("family", "override", "starts"),
    [
        ("mnist", "model.encoder_channels=[8]", "model.encoder_channels: needs 2 channel counts"),
        ("mnist", "model.encoder_channels=[8,0]", "model.encoder_channels[1]: channel counts"),
        ("cifar", "model.decoder_channels=[8,8]", "model.decoder_channels: needs 3 channel"),
        ("mnist", "model.decoder_channels=[8,8,8]", "model.decoder_channels: needs 2 channel"),
        ("mnist", "model.latent_channels=0", "model.latent_channels: channel counts must be"),
        ("cifar", "model.latent_channels=5000", "model.latent_channels: channel counts must be"),
        ("cifar", "model.classifier_channels=[8,8,8,8]", "model.classifier_channels: needs 1 to 3"),
        ("cifar", "model.classifier_channels=[]", "model.classifier_channels: needs 1 to 3"),
        ("cifar", "model.classifier_kernels=[3,4,3]", "model.classifier_kernels[1]: kernel sizes"),
        ("cifar", "model.classifier_kernels=[3,3]", "model.classifier_kernels: needs 3 kernel"),
        ("mnist", "model.classifier_channels=[8]", "model.classifier_channels: the mnist"),
        ("mnist", "model.classifier_kernels=[3]", "model.classifier_kernels: the mnist"),
        ("mnist", "model.classifier_hidden=[16,0]", "model.classifier_hidden[1]: must be"),
        (
            "cifar",
            "model.classifier_hidden=[4,4,4,4,4,4,4,4,4]",
            "model.classifier_hidden: at most",
        ),
        ("mnist", "model.projection_hidden=0", "model.projection_hidden: must be"),
        ("cifar", "model.encoder_channels=[8,true]", "model.encoder_channels"),
        ("mnist", "train.probe.aug_strength=2.5", "train.probe.aug_strength: must be within"),
        ("mnist", "train.aug_strength=-1", "train.aug_strength: must be within"),
    ],
)
def test_bad_widths_are_refused_in_one_line_naming_the_key(tmp_path, family, override, starts):
    study = write_study(tmp_path, EVERY_WIDTH[family])
    assert error_line(study, [override]).startswith(starts)


def test_a_space_value_that_breaks_a_width_rule_is_refused_at_load(tmp_path):
    space = "search.space.h={target: model.classifier_hidden.0, choices: [16, 0]}"
    message = error_line(write_study(tmp_path, EVERY_WIDTH["mnist"]), [space])
    assert message.startswith("search.space.h: value 0 is not usable: model.classifier_hidden[0]")


# --------------------------------------------------------------------------------------------
# The report studies


@pytest.mark.slow
def test_report_studies_search_wider_channels_and_mnist_augmentation():
    for name in (
        "mnist_autoencoder",
        "mnist_guided",
        "mnist_contrastive",
        "cifar_autoencoder",
        "cifar_guided",
        "cifar_contrastive",
    ):
        cfg = load_config(name)
        space = cfg.search.space
        assert 512 in list(space.channels.choices), name
        assert cfg.model.channels == 256 and "aug_strength" in space, name
        assert cfg.train.probe.aug_strength is None  # the report's fixed classifier recipe
        if name in ("mnist_autoencoder", "mnist_guided"):
            assert cfg.train.aug_strength == 0.0  # the report's none
            assert space.aug_strength.low == 0.0 and space.aug_strength.high > 0.0
            assert baseline_params(cfg)["aug_strength"] == 0.0
    guided = load_config("cifar_guided")
    assert list(guided.model.classifier_channels) == [256, 512]
    assert list(guided.model.classifier_kernels) == [3, 3]
    targets = {s.target for s in guided.search.space.values()}
    assert {"model.classifier_channels.0", "model.classifier_kernels.1"} <= targets
    base = baseline_params(guided)
    assert (base["classifier_channels_1"], base["classifier_channels_2"]) == (256, 512)
    mnist = load_config("mnist_guided")
    assert list(mnist.model.classifier_hidden) == [512, 256, 128]
    assert baseline_params(mnist)["classifier_hidden_1"] == 512


# --------------------------------------------------------------------------------------------
# Augmentation


def fake_splits(family: str, n: int = 8) -> ImageSplits:
    c, h, w = IMAGE[family]
    g = torch.Generator().manual_seed(0)

    def images() -> torch.Tensor:
        return torch.randint(0, 256, (n, c, h, w), dtype=torch.uint8, generator=g)

    labels = torch.arange(n) % 10
    return ImageSplits(
        family=family,
        train_x=images(),
        train_y=labels,
        val_x=images(),
        val_y=labels.clone(),
        test_x=images(),
        test_y=labels.clone(),
        mean=torch.full((c,), 0.5),
        std=torch.full((c,), 0.25),
        classes=[str(i) for i in range(10)],
        normalized=family == "cifar",
    )


def run_augs(family: str, task: str, strength: float | None, probe: float | None):
    from models.training import Run

    train = TrainConfig(
        aug_strength=strength,
        probe=ProbeConfig(aug_strength=probe),
        device="cpu",
        progress=False,
        knn_max_train=8,
    )
    run = Run(task, fake_splits(family), ModelConfig(channels=4, latent_dim=16), train)
    return repr(run.pretrain_aug), repr(run.probe_aug)


def test_classifier_augmentation_ignores_the_trials_strength_unless_the_probe_sets_one():
    low_pre, low_probe = run_augs("cifar", "contrastive", 0.25, None)
    high_pre, high_probe = run_augs("cifar", "contrastive", 1.5, None)
    assert low_pre != high_pre  # the trial's strength scales pre-training
    assert low_probe == high_probe == repr(build_augmentation("cifar", "probe", 1.0))
    _, set_low = run_augs("cifar", "contrastive", 1.0, 0.25)
    _, set_high = run_augs("cifar", "contrastive", 1.0, 1.5)
    assert set_low != set_high
    assert set_low == repr(build_augmentation("cifar", "probe", 0.25))
    assert set_high == repr(build_augmentation("cifar", "probe", 1.5))


def test_mnist_encoder_recipe_is_identity_at_zero_and_changes_images_at_one():
    x = torch.rand(8, 1, 28, 28)
    zero = build_augmentation("mnist", "encoder", 0.0)
    assert isinstance(zero, nn.Identity) and torch.equal(zero(x), x)
    one = build_augmentation("mnist", "encoder", 1.0)
    torch.manual_seed(0)
    y = one(x)
    assert y.shape == x.shape and not torch.allclose(y, x)


@pytest.mark.parametrize("task", ["autoencoder", "guided"])
def test_mnist_runs_keep_the_reports_none_unless_a_strength_is_set(task):
    pre, probe = run_augs("mnist", task, None, None)
    assert pre == probe == repr(nn.Identity())
    pre, _ = run_augs("mnist", task, 0.0, None)
    assert pre == repr(nn.Identity())
    pre, _ = run_augs("mnist", task, 1.0, None)
    assert "RandomResizedCrop" in pre
