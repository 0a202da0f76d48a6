"""GPU-side batch augmentations: the report's recipes, scaled by one strength knob.

:func:`build_augmentation` returns a module that takes a float batch ``(B, C, H, W)`` in ``[0, 1]``
on any device and returns a batch of the same shape, dtype and device, still in ``[0, 1]``. The ops are
``kornia.augmentation`` ops with ``same_on_batch=False``, so every sample of a batch gets its own
random crop, flip, jitter, grayscale and blur (torchvision's v2 transforms would draw one parameter set
per batch). Randomness comes from the global torch RNG (``torch.manual_seed`` makes it repeatable).
Normalization (CIFAR) is not part of these modules: apply ``ImageSplits.normalize`` after them.

The recipes at strength 1 (p = probability of applying):

=============  =========================================  =========================================
recipe         mnist (1x28x28)                            cifar (3x32x32)
=============  =========================================  =========================================
encoder        RandomResizedCrop scale (0.7,1) [*]        RandomResizedCrop scale (0.7,1) ·
(1.2.1/1.2.2)                                             HorizontalFlip 0.5 ·
                                                          ColorJitter(0.8,0.8,0.8,0.2) p 0.2
probe          RandomResizedCrop scale (0.7,1) [*]        RandomResizedCrop scale (0.7,1) ·
(classifier)                                              HorizontalFlip 0.5
contrastive    RandomResizedCrop scale (0.6,1) ·          RandomResizedCrop scale (0.08,1) ·
(SimCLR)       GaussianBlur k3 p 0.5                      HorizontalFlip 0.5 ·
                                                          ColorJitter(0.4,0.4,0.4,0.1) p 0.5 ·
                                                          Grayscale p 0.2 · GaussianBlur k3 p 0.5
=============  =========================================  =========================================

Each is the report's recipe except [*]: on MNIST the report trained 1.2.1/1.2.2 encoders and
every classifier without augmentation ("there was no importance for applying augmentations in
tasks 1.2.1 and 1.2.2"), so its choice there is strength 0 (:data:`REPORT_STRENGTH`; what a
strength of ``None`` means). The MNIST recipe a search may switch on is the crop the report
chose for CIFAR-10's 1.2.1/1.2.2 encoders and classifiers, without the flip (a mirrored digit is
another glyph) and the colour jitter (grey images); it is close to MNIST's own contrastive crop
(0.6, 1).

RandomResizedCrop always uses torchvision's aspect-ratio range (3/4, 4/3) and GaussianBlur its sigma
range (0.1, 2.0); ColorJitter is ``kornia.augmentation.ColorJitter``, which uses torchvision's
formulas (not ``ColorJiggle``).

Every op works on the whole batch at once, so one call issues the same number of ops (GPU
kernels) at any batch size (``tests/test_augment.py`` checks it with ``torch.profiler``).
RandomResizedCrop runs in kornia's ``cropping_mode="resample"``: each sample's crop and its resize
to the output size are one batched bilinear warp (``align_corners=True``: the crop's corner pixel
centres land on the output's corner pixels); kornia's default "slice" mode would crop and resize
image by image (two kernels per image). kornia draws each op's parameters for the whole batch in
a few batched calls on the CPU, with the global torch RNG, and copies them to the batch's device
without a blocking copy; an op with p < 1 is computed on the whole batch and blended with the
input per sample (``torch.where``), so no step depends on how many samples were picked.

Strength ``s`` (``train.aug_strength``, within [0, 2]) scales every op of a recipe linearly:

=======================  ==============================  =============================================
op parameter             value at s = 1                  value at strength s
=======================  ==============================  =============================================
crop scale lower bound   lo                              1 - s*(1 - lo), clamped to >= 0.05
crop aspect ratio        (3/4, 4/3)                      (exp(s*ln 3/4), exp(s*ln 4/3))
any probability          p                               min(1, s*p); a flip's at most 0.5
jitter b / c / sat       b                               s*b
jitter hue               h                               min(0.5, s*h)
blur sigma range         (0.1, 2.0)                      (0.1, 0.1 + s*1.9)
=======================  ==============================  =============================================

``s = 1`` is the table's recipe exactly, ``s = 0`` returns ``nn.Identity`` (bit-exact identity),
values above 1 extrapolate with the same formulas (at ``s = 2`` the contrastive crop's scale floor
is 0.05), except the horizontal flip, which stays at p = 0.5: flipping every image would be a fixed
transform, less random than flipping half of them. An op whose magnitude or probability becomes 0 is left out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import kornia.augmentation as K
import torch
from torch import nn

from models.config import FAMILIES, check_aug_strength, check_choice, check_family

RECIPES = ("encoder", "probe", "contrastive")
# The strength of the report's own choice per (family, recipe): what ``strength=None`` means.
# MNIST's encoder (1.2.1/1.2.2) and classifier training used no augmentation.
REPORT_STRENGTH: dict[tuple[str, str], float] = {
    (family, recipe): 0.0 if family == "mnist" and recipe != "contrastive" else 1.0
    for family in FAMILIES
    for recipe in RECIPES
}

_IMAGE_SIZE = {"mnist": (28, 28), "cifar": (32, 32)}
_RATIO = (3 / 4, 4 / 3)
_SIGMA = (0.1, 2.0)
_CROP_SCALE_FLOOR = 0.05

# The report's recipes at strength 1: (op kind, its parameters).
_RECIPES: dict[tuple[str, str], list[tuple[str, dict[str, Any]]]] = {
    # Not the report's (it used none: REPORT_STRENGTH 0); its CIFAR-10 crop, for a search.
    ("mnist", "encoder"): [("crop", {"lo": 0.7})],
    ("mnist", "probe"): [("crop", {"lo": 0.7})],
    ("mnist", "contrastive"): [
        ("crop", {"lo": 0.6}),
        ("blur", {"p": 0.5}),
    ],
    ("cifar", "encoder"): [
        ("crop", {"lo": 0.7}),
        ("hflip", {"p": 0.5}),
        ("jitter", {"b": 0.8, "c": 0.8, "s": 0.8, "h": 0.2, "p": 0.2}),
    ],
    ("cifar", "probe"): [
        ("crop", {"lo": 0.7}),
        ("hflip", {"p": 0.5}),
    ],
    ("cifar", "contrastive"): [
        ("crop", {"lo": 0.08}),
        ("hflip", {"p": 0.5}),
        ("jitter", {"b": 0.4, "c": 0.4, "s": 0.4, "h": 0.1, "p": 0.5}),
        ("gray", {"p": 0.2}),
        ("blur", {"p": 0.5}),
    ],
}


def pretrain_recipe(task: str) -> str:
    """The recipe a task pre-trains its encoder with: SimCLR's views, else the encoder's."""
    return "contrastive" if task == "contrastive" else "encoder"


@dataclass(frozen=True)
class _Op:
    """One op of a recipe after strength scaling: what :func:`build_augmentation` builds."""

    kind: str  # crop | hflip | jitter | gray | blur
    params: dict[str, Any] = field(default_factory=dict)


class _Clamp01(nn.Module):
    """Keeps the output in [0, 1] (interpolation and blur rounding can step a hair outside)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(0.0, 1.0)


def _check(family: str, recipe: str, strength: float | None, key: str) -> float:
    check_family(family)
    check_choice(recipe, RECIPES, "recipe")
    if strength is None:
        return REPORT_STRENGTH[(family, recipe)]
    return check_aug_strength(strength, key)


def _prob(p: float, s: float) -> float:
    return min(1.0, s * p)


def _scaled_ops(
    family: str, recipe: str, strength: float | None, key: str = "train.aug_strength"
) -> list[_Op]:
    """The recipe's ops with the strength mapping of the module docstring applied."""
    s = _check(family, recipe, strength, key)
    if s == 0.0:
        return []
    ops: list[_Op] = []
    for kind, base in _RECIPES[(family, recipe)]:
        if kind == "crop":
            lo = base["lo"]
            # lo + (1 - s)(1 - lo) == 1 - s(1 - lo), written so that s = 1 gives lo exactly.
            scale_lo = max(_CROP_SCALE_FLOOR, lo + (1.0 - s) * (1.0 - lo))
            ratio = (_RATIO[0] ** s, _RATIO[1] ** s)  # == exp(s * ln r)
            if scale_lo >= 1.0 and ratio[0] == ratio[1]:
                continue
            ops.append(
                _Op(
                    "crop",
                    {
                        "size": _IMAGE_SIZE[family],
                        "scale": (min(scale_lo, 1.0), 1.0),
                        "ratio": ratio,
                    },
                )
            )
        elif kind in ("hflip", "gray"):
            p = _prob(base["p"], s)
            if kind == "hflip":
                p = min(p, 0.5)  # past 0.5 a flip grows predictable, not stronger
            if p > 0.0:
                ops.append(_Op(kind, {"p": p}))
        elif kind == "jitter":
            p = _prob(base["p"], s)
            mags = {
                "brightness": s * base["b"],
                "contrast": s * base["c"],
                "saturation": s * base["s"],
                "hue": min(0.5, s * base["h"]),
            }
            if p > 0.0 and any(v > 0.0 for v in mags.values()):
                ops.append(_Op("jitter", {**mags, "p": p}))
        elif kind == "blur":
            p = _prob(base["p"], s)
            sigma = (_SIGMA[0], _SIGMA[0] + s * (_SIGMA[1] - _SIGMA[0]))
            if p > 0.0:
                ops.append(_Op("blur", {"kernel_size": 3, "sigma": sigma, "p": p}))
        else:  # pragma: no cover - the table above is the only source of kinds
            raise AssertionError(kind)
    return ops


def _build_op(op: _Op) -> nn.Module:
    q = op.params
    if op.kind == "crop":
        # p=1: kornia's RandomResizedCrop gates the whole batch with p; crops are still per sample.
        # "resample": one batched warp for every crop; the default "slice" loops over the images.
        return K.RandomResizedCrop(
            size=q["size"],
            scale=q["scale"],
            ratio=q["ratio"],
            same_on_batch=False,
            p=1.0,
            cropping_mode="resample",
        )
    if op.kind == "hflip":
        return K.RandomHorizontalFlip(p=q["p"], same_on_batch=False)
    if op.kind == "jitter":
        # ColorJitter (not ColorJiggle) uses torchvision's ColorJitter formulas.
        return K.ColorJitter(
            brightness=q["brightness"],
            contrast=q["contrast"],
            saturation=q["saturation"],
            hue=q["hue"],
            p=q["p"],
            same_on_batch=False,
        )
    if op.kind == "gray":
        return K.RandomGrayscale(p=q["p"], same_on_batch=False)
    if op.kind == "blur":
        k = q["kernel_size"]
        return K.RandomGaussianBlur((k, k), q["sigma"], p=q["p"], same_on_batch=False)
    raise AssertionError(op.kind)  # pragma: no cover


def build_augmentation(
    family: str,
    recipe: str,
    strength: float | None = None,
    *,
    key: str = "train.aug_strength",
) -> nn.Module:
    """The batch augmentation for ``family`` ("mnist" | "cifar") and ``recipe``.

    ``recipe`` is "encoder" (1.2.1/1.2.2 encoder training), "probe" (classifier training, all tasks)
    or "contrastive" (one SimCLR view; call it twice for two views). ``strength`` scales the recipe
    (see the module docstring); None is the report's choice (:data:`REPORT_STRENGTH`). ``key``
    names the setting in the error a bad strength raises. Returns ``nn.Identity`` when no op is
    left (strength 0), else an ``nn.Sequential`` of kornia ops followed by a clamp to [0, 1].
    """
    ops = _scaled_ops(family, recipe, strength, key)
    if not ops:
        return nn.Identity()
    return nn.Sequential(*[_build_op(op) for op in ops], _Clamp01())


__all__ = ["FAMILIES", "RECIPES", "REPORT_STRENGTH", "build_augmentation", "pretrain_recipe"]
