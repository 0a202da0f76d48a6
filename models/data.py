"""Whole datasets as uint8 tensors, split into train / validation / test.

:func:`load_splits` turns a :class:`~models.config.DataConfig` into an :class:`ImageSplits`: every
split is one contiguous ``uint8`` tensor ``(N, C, H, W)`` plus ``int64`` labels, small enough (MNIST
47 MB, CIFAR-10 184 MB) to move to the training device once and batch by indexing, so no per-image
Python runs per batch. Float conversion (:meth:`ImageSplits.to_float`), augmentation
(:mod:`models.augment`) and, for the CIFAR family, normalization (:meth:`ImageSplits.normalize`)
happen on whole batches on the device.

Sources (``data.name``):

- ``mnist``: ``torchvision.datasets.MNIST`` under ``data.root`` (IDX files in ``<root>/MNIST/raw``).
- ``cifar10``: torchvision's CIFAR-10 pickles under ``<root>/cifar-10-batches-py`` when present
  (or downloaded with ``data.download``), else the JPEG copy ``<root>/cifar10-jpeg/{train,test}``.
- ``digits``: scikit-learn's bundled 8x8 digits, upsampled to 28x28 (MNIST family). It has no test
  split, so a stratified 20% is held out with a fixed seed (0): the test set never moves.
- ``imagefolder``: ``data.path`` holding ``train/`` and ``test/`` class folders (ImageFolder layout,
  classes in sorted folder order) of 28x28 grey or 32x32 RGB images.

Image folders are decoded once and cached in ``data.cache_dir`` as one ``.pt`` per split folder.

Splits: the validation split is a ``data.val_fraction`` of the train set drawn with
``data.split_seed``; ``data.train_subset`` / ``data.val_subset`` then take seeded subsets of the
two (also from ``data.split_seed``), and ``data.test_subset`` a subset of the test set drawn with a
fixed seed (0), so a test subset is the same for every split seed. ``mean``/``std`` are computed on
the final train split.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import os
import re
import warnings
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from models.checkpoints import save_checkpoint
from models.config import DataConfig, check_data
from models.errors import DataError

FAMILY_SHAPES: dict[str, tuple[int, int, int]] = {"mnist": (1, 28, 28), "cifar": (3, 32, 32)}
CIFAR_JPEG_DIR = "cifar10-jpeg"
CIFAR_PICKLE_DIR = "cifar-10-batches-py"
_CACHE_VERSION = 1
_TEST_SUBSET_SEED = 0
_DIGITS_TEST_SEED = 0
_DIGITS_TEST_FRACTION = 0.2


@dataclass
class ImageSplits:
    """Train / validation / test images of one dataset as whole tensors.

    ``*_x`` are contiguous ``uint8`` tensors ``(N, C, H, W)``, ``*_y`` ``int64`` labels. ``mean`` and
    ``std`` are the per-channel statistics of ``train_x`` in [0, 1] units (float32, shape ``(C,)``).
    ``normalized`` is True for the CIFAR family, whose model inputs are normalized with them (after
    augmentation); MNIST-family inputs stay in [0, 1]. ``train_idx`` / ``val_idx`` index the source's
    full train set (for digits: the part left after the fixed test hold-out) and ``test_idx`` its
    test set, so the rows of ``train_x`` are ``source_train[train_idx]``.
    """

    family: str
    train_x: Tensor
    train_y: Tensor
    val_x: Tensor
    val_y: Tensor
    test_x: Tensor
    test_y: Tensor
    mean: Tensor
    std: Tensor
    classes: list[str]
    normalized: bool
    train_idx: Tensor | None = None
    val_idx: Tensor | None = None
    test_idx: Tensor | None = None

    def to(self, device: torch.device | str) -> ImageSplits:
        """A copy with every tensor on ``device`` (tensors already there are shared)."""
        kw = {}
        for f in fields(self):
            v = getattr(self, f.name)
            kw[f.name] = v.to(device) if isinstance(v, Tensor) else v
        kw["classes"] = list(self.classes)
        return ImageSplits(**kw)

    def to_float(self, x: Tensor) -> Tensor:
        """uint8 images -> float32 in [0, 1], on ``x``'s device."""
        if x.dtype != torch.uint8:
            raise TypeError(f"to_float expects uint8 images, got {x.dtype}")
        return x.to(torch.float32).div_(255.0)

    def normalize(self, x: Tensor) -> Tensor:
        """Float images in [0, 1] -> model input: (x - mean) / std per channel for the CIFAR
        family; the identity (the same tensor) when ``normalized`` is False."""
        if not self.normalized:
            return x
        mean = self.mean.to(device=x.device, dtype=x.dtype).view(-1, 1, 1)
        std = self.std.to(device=x.device, dtype=x.dtype).view(-1, 1, 1)
        return (x - mean) / std

    def denormalize(self, x: Tensor) -> Tensor:
        """Inverse of :meth:`normalize` (back to [0, 1] units, e.g. for figures)."""
        if not self.normalized:
            return x
        mean = self.mean.to(device=x.device, dtype=x.dtype).view(-1, 1, 1)
        std = self.std.to(device=x.device, dtype=x.dtype).view(-1, 1, 1)
        return x * std + mean

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# --------------------------------------------------------------------------- entry point


def load_splits(cfg: DataConfig) -> ImageSplits:
    """Load ``cfg.name`` and carve the train / validation / test splits (tensors on CPU)."""
    check_data(cfg)
    frac = cfg.val_fraction

    loader = {
        "mnist": _load_mnist,
        "cifar10": _load_cifar10,
        "digits": _load_digits,
        "imagefolder": _load_imagefolder,
    }[cfg.name]
    family, pool_x, pool_y, test_x, test_y, classes = loader(cfg)

    n = pool_x.shape[0]
    n_val = round(frac * n)
    if n_val < 1 or n_val > n - 1:
        raise DataError(
            f"data.val_fraction: {frac} of {n} train images leaves an empty train or validation split"
        )
    gen = torch.Generator().manual_seed(int(cfg.split_seed))
    perm = torch.randperm(n, generator=gen)
    val_idx = perm[:n_val].sort().values
    train_idx = perm[n_val:].sort().values
    train_idx = _subset(train_idx, cfg.train_subset, gen)
    val_idx = _subset(val_idx, cfg.val_subset, gen)
    test_idx = torch.arange(test_x.shape[0])
    test_idx = _subset(test_idx, cfg.test_subset, torch.Generator().manual_seed(_TEST_SUBSET_SEED))

    train_x = pool_x[train_idx].contiguous()
    mean, std = _channel_stats(train_x)
    return ImageSplits(
        family=family,
        train_x=train_x,
        train_y=pool_y[train_idx].contiguous(),
        val_x=pool_x[val_idx].contiguous(),
        val_y=pool_y[val_idx].contiguous(),
        test_x=test_x[test_idx].contiguous(),
        test_y=test_y[test_idx].contiguous(),
        mean=mean,
        std=std,
        classes=list(classes),
        normalized=family == "cifar",
        train_idx=train_idx,
        val_idx=val_idx,
        test_idx=test_idx,
    )


def _subset(idx: Tensor, k: int, gen: torch.Generator) -> Tensor:
    """A seeded subset of ``k`` entries of ``idx`` (kept in order); all of them when k = 0 or
    k >= len. The generator is advanced either way, so later draws do not depend on ``k``."""
    pick = torch.randperm(idx.numel(), generator=gen)
    if k == 0 or k >= idx.numel():
        return idx
    return idx[pick[:k].sort().values]


def _channel_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Exact per-channel mean and (population) std of uint8 images, in [0, 1] units.

    Uses a 256-bin histogram per channel instead of a float copy of the whole split."""
    c = x.shape[1]
    values = torch.arange(256, dtype=torch.float64)
    mean = torch.empty(c, dtype=torch.float64)
    std = torch.empty(c, dtype=torch.float64)
    for ch in range(c):
        counts = torch.bincount(x[:, ch].reshape(-1), minlength=256).to(torch.float64)
        total = counts.sum()
        m = (counts * values).sum() / total
        var = (counts * (values - m) ** 2).sum() / total
        mean[ch] = m / 255.0
        std[ch] = var.sqrt() / 255.0
    return mean.float(), std.clamp_min(1e-6).float()


# --------------------------------------------------------------------------- sources

_Loaded = tuple[str, Tensor, Tensor, Tensor, Tensor, list[str]]


def _root(cfg: DataConfig) -> Path:
    return Path(os.path.expanduser(cfg.root)).absolute()


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _load_mnist(cfg: DataConfig) -> _Loaded:
    from torchvision.datasets import MNIST

    root = _root(cfg)
    raw = root / "MNIST" / "raw"
    out = []
    for train in (True, False):
        try:
            ds = MNIST(root=str(root), train=train, download=cfg.download)
        except RuntimeError as e:
            if cfg.download:
                raise DataError(
                    f"data.download: could not download MNIST into {raw}: {_first_line(e)}"
                ) from None
            raise DataError(
                f"data.root: MNIST not found under {raw}; put the official IDX files there "
                "(torchvision layout) or set data.download=true when online"
            ) from None
        except OSError as e:  # network errors on download
            raise DataError(
                f"data.download: could not download MNIST into {raw}: {_first_line(e)}"
            ) from None
        out.append(
            (ds.data.unsqueeze(1).contiguous(), ds.targets.to(torch.int64), list(ds.classes))
        )
    (tr_x, tr_y, classes), (te_x, te_y, _) = out
    return "mnist", tr_x, tr_y, te_x, te_y, classes


def _load_cifar10(cfg: DataConfig) -> _Loaded:
    root = _root(cfg)
    pickles = root / CIFAR_PICKLE_DIR
    jpeg = root / CIFAR_JPEG_DIR
    have_jpeg = (jpeg / "train").is_dir() and (jpeg / "test").is_dir()
    if pickles.is_dir():
        return _load_cifar_pickles(root, download=False)
    if cfg.download:
        try:
            return _load_cifar_pickles(root, download=True)
        except DataError as e:
            if not have_jpeg:
                raise
            warnings.warn(f"{e}; using the JPEG copy under {jpeg} instead", stacklevel=3)
    if have_jpeg:
        cache = _cache_dir(cfg)
        tr_x, tr_y, classes = _load_folder(jpeg / "train", cache, "data.root", want="cifar")
        te_x, te_y, te_classes = _load_folder(jpeg / "test", cache, "data.root", want="cifar")
        _check_same_classes(classes, te_classes, jpeg, "data.root")
        return "cifar", tr_x, tr_y, te_x, te_y, classes
    raise DataError(
        f"data.root: CIFAR-10 not found: neither torchvision's pickles in {pickles} nor the JPEG copy "
        f"in {jpeg}/{{train,test}}; put one there or set data.download=true when online"
    )


def _load_cifar_pickles(root: Path, download: bool) -> _Loaded:
    from torchvision.datasets import CIFAR10

    out = []
    for train in (True, False):
        try:
            ds = CIFAR10(root=str(root), train=train, download=download)
        except (RuntimeError, OSError) as e:
            field = "data.download" if download else "data.root"
            raise DataError(
                f"{field}: CIFAR-10 pickles under {root / CIFAR_PICKLE_DIR} missing or corrupted "
                f"({_first_line(e)})"
            ) from None
        x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        out.append((x, torch.as_tensor(ds.targets, dtype=torch.int64), list(ds.classes)))
    (tr_x, tr_y, classes), (te_x, te_y, _) = out
    return "cifar", tr_x, tr_y, te_x, te_y, classes


def _load_digits(cfg: DataConfig) -> _Loaded:
    import torch.nn.functional as F
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.as_tensor(d.images, dtype=torch.float32).unsqueeze(1) * (255.0 / 16.0)
    x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False, antialias=False)
    x = x.round().clamp(0, 255).to(torch.uint8).contiguous()
    y = torch.as_tensor(d.target, dtype=torch.int64)
    pool_i, test_i = train_test_split(
        np.arange(len(y)),
        test_size=_DIGITS_TEST_FRACTION,
        stratify=d.target,
        random_state=_DIGITS_TEST_SEED,
    )
    pool_i = torch.as_tensor(sorted(pool_i), dtype=torch.int64)
    test_i = torch.as_tensor(sorted(test_i), dtype=torch.int64)
    classes = [str(c) for c in range(10)]
    return "mnist", x[pool_i].contiguous(), y[pool_i], x[test_i].contiguous(), y[test_i], classes


def _load_imagefolder(cfg: DataConfig) -> _Loaded:
    path = Path(os.path.expanduser(cfg.path)).absolute()
    for split in ("train", "test"):
        if not (path / split).is_dir():
            raise DataError(
                f"data.path: {path / split} is not a folder; expected train/ and test/ class folders"
            )
    cache = _cache_dir(cfg)
    tr_x, tr_y, classes = _load_folder(path / "train", cache, "data.path")
    family = _family_of(tr_x)
    te_x, te_y, te_classes = _load_folder(path / "test", cache, "data.path", want=family)
    _check_same_classes(classes, te_classes, path, "data.path")
    return family, tr_x, tr_y, te_x, te_y, classes


def _family_of(x: Tensor) -> str:
    for fam, shape in FAMILY_SHAPES.items():
        if tuple(x.shape[1:]) == shape:
            return fam
    raise AssertionError(x.shape)  # _load_folder only returns the two shapes


def _check_same_classes(train: list[str], test: list[str], where: Path, field: str) -> None:
    if train != test:
        raise DataError(
            f"{field}: train/ and test/ under {where} have different class folders "
            f"({len(train)} vs {len(test)}: {sorted(set(train) ^ set(test))[:5]})"
        )


# --------------------------------------------------------------------------- image folders


def _cache_dir(cfg: DataConfig) -> Path | None:
    if not cfg.cache_dir:
        return None
    return Path(os.path.expanduser(cfg.cache_dir)).absolute()


def _list_folder(folder: Path, field: str) -> tuple[list[str], list[str], list[int]]:
    """ImageFolder's listing (torchvision's own functions): sorted class folders, files walked
    recursively in sorted order, with torchvision's image extensions."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    try:
        classes, class_to_idx = find_classes(folder)
    except FileNotFoundError:
        raise DataError(f"{field}: no class folders in {folder}") from None
    samples = make_dataset(folder, class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
    found = {label for _, label in samples}
    empty = [cls for cls in classes if class_to_idx[cls] not in found]
    if empty:
        raise DataError(f"{field}: class folder {folder / empty[0]} holds no images")
    return classes, [path for path, _ in samples], [label for _, label in samples]


def _cache_name(folder: Path, classes: list[str], files: list[str]) -> tuple[str, str]:
    """(file name, glob of the same folder's older entries) of a folder's decoded-image cache.

    The name carries a hash of the absolute folder path and one of its content stamp (file count,
    newest mtime, class names), so an edited folder gets a new entry and the stale one is removed."""
    newest = max(os.stat(f).st_mtime_ns for f in files)
    where = hashlib.sha256(str(folder).encode()).hexdigest()[:12]
    stamp = f"v{_CACHE_VERSION}|{folder}|{len(files)}|{newest}|{','.join(classes)}"
    what = hashlib.sha256(stamp.encode()).hexdigest()[:16]
    label = re.sub(r"[^A-Za-z0-9_.-]", "_", folder.name)
    prefix = f"imagefolder-{label}-{where}-"
    return f"{prefix}{what}.pt", f"{prefix}*.pt"


def _load_folder(
    folder: Path, cache_dir: Path | None, field: str, want: str | None = None
) -> tuple[Tensor, Tensor, list[str]]:
    """Decode an ImageFolder-layout folder into (uint8 (N,C,H,W), int64 labels, classes), via the cache."""
    classes, files, labels = _list_folder(folder, field)
    cache_file = None
    if cache_dir is not None:
        name, family_glob = _cache_name(folder, classes, files)
        cache_file = cache_dir / name
        if cache_file.is_file():
            try:
                blob = torch.load(cache_file, map_location="cpu", weights_only=True)
                x, y = blob["x"], blob["y"]
                if (
                    blob["classes"] == classes
                    and x.shape[0] == len(files)
                    and x.dtype == torch.uint8
                ):
                    if want is not None and tuple(x.shape[1:]) != FAMILY_SHAPES[want]:
                        raise DataError(_shape_message(field, want, tuple(x.shape[1:]), folder))
                    return x, y, classes
            except DataError:
                raise
            except Exception as e:  # a corrupt or foreign file: decode again and overwrite it
                warnings.warn(
                    f"ignoring unreadable image cache {cache_file}: {_first_line(e)}", stacklevel=3
                )

    x = _decode_files(files, field, want)
    y = torch.as_tensor(labels, dtype=torch.int64)
    if cache_file is not None and _save_atomic({"x": x, "y": y, "classes": classes}, cache_file):
        for stale in cache_file.parent.glob(family_glob):
            if stale != cache_file:
                with contextlib.suppress(OSError):
                    stale.unlink()
    return x, y, classes


def _shape_message(field: str, family: str | None, found: tuple[int, ...], where: object) -> str:
    if family is None:
        allowed = "images must be 28x28 grayscale or 32x32 RGB"
    else:
        desc = "28x28 grayscale" if family == "mnist" else "32x32 RGB"
        allowed = f"images must all be {desc} ({family} family, as the first one found)"
    return f"{field}: {allowed}, found {'x'.join(map(str, found))} in {where}"


def _decode_files(files: list[str], field: str, want: str | None) -> Tensor:
    """Decode every file once (one-off cost, not per batch) into one uint8 (N, C, H, W) tensor.

    The family is ``want`` or, when None, that of the first image (1x28x28 or 3x32x32); every image
    must have that height and width. A 28x28 image with colour channels is converted to grey and a
    32x32 grey or RGBA image to RGB, as PIL's ``convert`` would.
    """
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its image codecs (for torchcodec) and warns on every call.
        warnings.filterwarnings("ignore", message=_TV_DEPRECATION, category=DeprecationWarning)
        first = _decode(files[0], "unchanged", field)
        family = want
        if family is None:
            for fam, (_, h, w) in FAMILY_SHAPES.items():
                if tuple(first.shape[1:]) == (h, w):
                    family = fam
            if family is None:
                raise DataError(_shape_message(field, None, tuple(first.shape), files[0]))
        c, h, w = FAMILY_SHAPES[family]
        images = []
        for i, f in enumerate(files):
            img = first if i == 0 else _decode(f, "unchanged", field)
            if img.shape[1] != h or img.shape[2] != w:
                raise DataError(_shape_message(field, family, tuple(img.shape), f))
            images.append(img)
        for i, img in enumerate(images):  # rare: grey/RGBA/colour files in the other family's mode
            if img.shape[0] != c:
                images[i] = _decode(files[i], "gray" if c == 1 else "rgb", field)
    return torch.stack(images).contiguous()


_TV_DEPRECATION = ".*image decoding and encoding capabilities of TorchVision are deprecated"


@functools.cache
def _tv_decoder():
    """torchvision's ``decode_image`` and its modes, or None where this torchvision lacks them."""
    try:
        from torchvision.io import ImageReadMode, decode_image
    except ImportError:
        return None
    modes = {
        "unchanged": ImageReadMode.UNCHANGED,
        "gray": ImageReadMode.GRAY,
        "rgb": ImageReadMode.RGB,
    }
    return decode_image, modes


def _decode(path: str, mode: str, field: str) -> Tensor:
    """One image file -> uint8 (C, H, W); torchvision's decoder, PIL for formats it lacks.

    ``mode``: "unchanged" | "gray" | "rgb"."""
    with open(path, "rb") as fh:
        data = fh.read()
    tv = _tv_decoder()
    if tv is not None:
        decode_image, modes = tv
        try:
            return decode_image(
                torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=modes[mode]
            )
        except RuntimeError:
            pass  # e.g. BMP, PPM, TIFF: PIL below
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            if mode == "gray":
                im = im.convert("L")
            elif mode == "rgb" or im.mode not in ("L", "RGB", "RGBA"):
                im = im.convert("RGB")
            arr = np.array(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{field}: cannot decode image {path}: {_first_line(e)}") from None
    t = torch.from_numpy(arr)
    return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1).contiguous()


def _save_atomic(obj: dict, target: Path) -> bool:
    """Write the cache file atomically; warn (and go on without a cache) when it cannot be."""
    try:
        save_checkpoint(target, obj)
        return True
    except OSError as e:
        warnings.warn(
            f"data.cache_dir: cannot write the decoded-image cache {target} ({_first_line(e)}); "
            "continuing without a cache",
            stacklevel=4,
        )
        return False


__all__ = ["FAMILY_SHAPES", "ImageSplits", "load_splits"]
