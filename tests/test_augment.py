"""Batch augmentations: per-sample randomness, the strength mapping, the report's values."""

from __future__ import annotations

import math

import kornia.augmentation as K
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

from models.augment import FAMILIES, RECIPES, REPORT_STRENGTH, build_augmentation
from models.errors import SettingError

SHAPES = {"mnist": (1, 28, 28), "cifar": (3, 32, 32)}
ALL = [(f, r) for f in FAMILIES for r in RECIPES]
NONTRIVIAL = [
    ("mnist", "encoder"),
    ("mnist", "probe"),
    ("mnist", "contrastive"),
    ("cifar", "encoder"),
    ("cifar", "probe"),
    ("cifar", "contrastive"),
]


def smooth_batch(family: str, n: int, seed: int = 123) -> torch.Tensor:
    """Images with structure at several scales (so crops, flips and blur all change them)."""
    c, h, w = SHAPES[family]
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, c, 7, 7, generator=g)
    return F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False).clamp(0, 1)


def ops_of(module: nn.Module) -> dict[type, nn.Module]:
    return {type(m): m for m in module.modules() if isinstance(m, K.AugmentationBase2D)}


@pytest.mark.parametrize("family", FAMILIES)
def test_identical_images_get_different_augmentations(family: str) -> None:
    x = smooth_batch(family, 1).expand(32, -1, -1, -1).contiguous()
    aug = build_augmentation(family, "contrastive", 1.0)
    torch.manual_seed(0)
    y = aug(x)
    distinct = {tuple(row.flatten().mul(1e4).round().tolist()) for row in y}
    assert len(distinct) >= 24, f"only {len(distinct)} distinct outputs for 32 identical inputs"


@pytest.mark.parametrize(("family", "recipe"), ALL)
def test_strength_zero_is_exact_identity(family: str, recipe: str) -> None:
    aug = build_augmentation(family, recipe, 0.0)
    assert isinstance(aug, nn.Identity)
    x = smooth_batch(family, 8)
    assert torch.equal(aug(x), x)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("recipe", ["encoder", "probe"])
def test_reports_choice_is_none_for_mnist_encoder_and_probe(family: str, recipe: str) -> None:
    """strength None is the report's choice: no augmentation on MNIST outside SimCLR."""
    aug = build_augmentation(family, recipe, None)
    assert isinstance(aug, nn.Identity) == (family == "mnist")
    assert REPORT_STRENGTH[(family, recipe)] == (0.0 if family == "mnist" else 1.0)
    # At strength 1 the MNIST recipe is the report's CIFAR-10 encoder crop, nothing else.
    ops = ops_of(build_augmentation(family, recipe, 1.0))
    assert ops[K.RandomResizedCrop]._param_generator.scale == pytest.approx((0.7, 1.0))
    if family == "mnist":
        assert set(ops) == {K.RandomResizedCrop}


def test_none_is_strength_one_where_the_report_augmented() -> None:
    for family, recipe in ALL:
        if REPORT_STRENGTH[(family, recipe)] == 1.0:
            default = ops_of(build_augmentation(family, recipe, None))
            one = ops_of(build_augmentation(family, recipe, 1.0))
            assert {t: repr(m) for t, m in default.items()} == {t: repr(m) for t, m in one.items()}


@pytest.mark.parametrize(("family", "recipe"), ALL)
@pytest.mark.parametrize("strength", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_output_range_shape_dtype_device(
    family: str, recipe: str, strength: float, dtype: torch.dtype
) -> None:
    torch.manual_seed(1)
    x = smooth_batch(family, 8).to(dtype)
    y = build_augmentation(family, recipe, strength)(x)
    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_runs_on_cuda() -> None:
    x = smooth_batch("cifar", 16).cuda()
    y = build_augmentation("cifar", "contrastive", 1.0)(x)
    assert y.device == x.device and y.shape == x.shape


def test_strength_one_is_the_reports_cifar_contrastive_recipe() -> None:
    aug = build_augmentation("cifar", "contrastive", 1.0)
    ops = ops_of(aug)
    assert list(ops) == [
        K.RandomResizedCrop,
        K.RandomHorizontalFlip,
        K.ColorJitter,
        K.RandomGrayscale,
        K.RandomGaussianBlur,
    ]
    crop = ops[K.RandomResizedCrop]
    assert crop._param_generator.scale == (0.08, 1.0)
    assert crop._param_generator.ratio == (3 / 4, 4 / 3)
    assert crop.flags["size"] == (32, 32) and crop.p == 1.0
    assert ops[K.RandomHorizontalFlip].p == 0.5
    jitter = ops[K.ColorJitter]
    gen = jitter._param_generator
    assert (gen.brightness, gen.contrast, gen.saturation, gen.hue) == (0.4, 0.4, 0.4, 0.1)
    assert jitter.p == 0.5
    assert ops[K.RandomGrayscale].p == 0.2
    blur = ops[K.RandomGaussianBlur]
    assert blur.p == 0.5 and blur._param_generator.sigma == (0.1, 2.0)
    assert tuple(blur.flags["kernel_size"]) == (3, 3)
    for op in ops.values():
        assert op.same_on_batch is False


def test_strength_one_is_the_reports_other_recipes() -> None:
    enc = ops_of(build_augmentation("cifar", "encoder", 1.0))
    assert list(enc) == [K.RandomResizedCrop, K.RandomHorizontalFlip, K.ColorJitter]
    assert enc[K.RandomResizedCrop]._param_generator.scale == (0.7, 1.0)
    g = enc[K.ColorJitter]._param_generator
    assert (g.brightness, g.contrast, g.saturation, g.hue) == (0.8, 0.8, 0.8, 0.2)
    assert enc[K.ColorJitter].p == 0.2

    probe = ops_of(build_augmentation("cifar", "probe", 1.0))
    assert list(probe) == [K.RandomResizedCrop, K.RandomHorizontalFlip]
    assert probe[K.RandomResizedCrop]._param_generator.scale == (0.7, 1.0)
    assert probe[K.RandomHorizontalFlip].p == 0.5

    mn = ops_of(build_augmentation("mnist", "contrastive", 1.0))
    assert list(mn) == [K.RandomResizedCrop, K.RandomGaussianBlur]
    assert mn[K.RandomResizedCrop]._param_generator.scale == (0.6, 1.0)
    assert mn[K.RandomResizedCrop].flags["size"] == (28, 28)
    assert mn[K.RandomGaussianBlur].p == 0.5


def test_strength_scaling_formulas() -> None:
    s = 0.5
    ops = ops_of(build_augmentation("cifar", "contrastive", s))
    crop = ops[K.RandomResizedCrop]._param_generator
    assert crop.scale[0] == pytest.approx(1 - s * (1 - 0.08))
    assert crop.ratio == pytest.approx(
        (math.exp(s * math.log(3 / 4)), math.exp(s * math.log(4 / 3)))
    )
    assert ops[K.RandomHorizontalFlip].p == pytest.approx(0.25)
    g = ops[K.ColorJitter]._param_generator
    assert (g.brightness, g.contrast, g.saturation, g.hue) == pytest.approx((0.2, 0.2, 0.2, 0.05))
    assert ops[K.ColorJitter].p == pytest.approx(0.25)
    assert ops[K.RandomGrayscale].p == pytest.approx(0.1)
    assert ops[K.RandomGaussianBlur]._param_generator.sigma == pytest.approx((0.1, 1.05))

    # Extrapolation above 1: probabilities cap at 1, the crop floor at 0.05, hue at 0.5.
    ops2 = ops_of(build_augmentation("cifar", "contrastive", 2.0))
    assert ops2[K.RandomResizedCrop]._param_generator.scale[0] == pytest.approx(0.05)
    assert ops2[K.RandomHorizontalFlip].p == 0.5  # capped: a flip of every image is no randomness
    assert ops2[K.ColorJitter].p == 1.0
    assert ops2[K.ColorJitter]._param_generator.hue == pytest.approx(0.2)
    assert ops2[K.RandomGaussianBlur]._param_generator.sigma == pytest.approx((0.1, 3.9))
    enc2 = ops_of(build_augmentation("cifar", "encoder", 2.0))
    assert enc2[K.RandomResizedCrop]._param_generator.scale[0] == pytest.approx(0.4)
    assert enc2[K.ColorJitter]._param_generator.brightness == pytest.approx(1.6)


@pytest.mark.parametrize(("family", "recipe"), NONTRIVIAL)
def test_change_grows_with_strength(family: str, recipe: str) -> None:
    x = smooth_batch(family, 64)
    changes = []
    for s in (0.0, 0.5, 1.0, 1.5, 2.0):
        aug = build_augmentation(family, recipe, s)
        torch.manual_seed(0)
        changes.append(float((aug(x) - x).abs().mean()))
    assert changes[0] == 0.0
    assert all(a < b for a, b in zip(changes, changes[1:], strict=False)), changes


def aten_op_count(aug: nn.Module, x: torch.Tensor) -> int:
    """The aten ops (profiler events, nested ones included) of one forward of ``aug`` on ``x``."""
    torch.manual_seed(0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        aug(x)
    return sum(1 for e in prof.events() if e.name.startswith("aten::"))


@pytest.mark.parametrize(("family", "recipe"), NONTRIVIAL)
def test_op_count_does_not_grow_with_the_batch(family: str, recipe: str) -> None:
    """No op loops over the samples (kornia's RandomResizedCrop in its default "slice" mode
    issues two ops per image): a GPU step then launches the same kernels at any batch size."""
    aug = build_augmentation(family, recipe, 1.0)
    aug(smooth_batch(family, 8))  # warm-up: first-call work is not per batch
    counts = {n: aten_op_count(aug, smooth_batch(family, n)) for n in (64, 512)}
    assert counts[64] == counts[512], counts
    crop = ops_of(aug)[K.RandomResizedCrop]
    assert crop.flags["cropping_mode"] == "resample"


@pytest.mark.parametrize("bad", [-0.1, 2.01, float("nan"), float("inf")])
def test_bad_strength_raises(bad: float) -> None:
    with pytest.raises(SettingError, match=r"^train\.aug_strength: must be within \[0, 2\]"):
        build_augmentation("cifar", "probe", bad)
    key = "train.probe.aug_strength"
    with pytest.raises(SettingError, match=r"^train\.probe\.aug_strength: must be within"):
        build_augmentation("cifar", "probe", bad, key=key)


def test_bad_family_or_recipe_raises() -> None:
    with pytest.raises(SettingError, match="^family: .*allowed: mnist, cifar"):
        build_augmentation("imagenet", "probe")
    with pytest.raises(SettingError, match="^recipe: .*allowed: encoder, probe, contrastive"):
        build_augmentation("cifar", "finetune")
