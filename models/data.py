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
  classes in sorted folder order) of images of any size and mode. They are decoded for
  ``data.family``: ``mnist`` (1x28x28 grey), ``cifar`` (3x32x32 RGB) or ``auto``, which picks
  ``mnist`` when every train image is grey (grey modes, 16-bit included, or grey palettes) and
  ``cifar`` otherwise (a folder mixing grey and colour files included); test/ follows train/.
  Every image is converted to the family's mode (grey <-> RGB by ITU-R 601 luma / repetition;
  alpha dropped; palette, CMYK, YCbCr... through PIL; 16-bit values scaled to 8 bits), then
  resized, shorter side to 28 or 32 (bilinear, antialiased) and centre-cropped square; images
  already of the family's shape are kept as they are. A file that cannot be decoded (truncated,
  corrupt) is a one-line DataError naming it.

Image folders (the CIFAR JPEG copy too) are decoded once and cached in ``data.cache_dir`` as one
``.pt`` per split folder and family setting, so a changed ``data.family`` decodes again.

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
from models.config import DATA_FAMILIES, DataConfig, check_data
from models.errors import DataError

FAMILY_SHAPES: dict[str, tuple[int, int, int]] = {"mnist": (1, 28, 28), "cifar": (3, 32, 32)}
CIFAR_JPEG_DIR = "cifar10-jpeg"
CIFAR_PICKLE_DIR = "cifar-10-batches-py"
_CACHE_VERSION = 2  # 2: images of any size and mode, converted for data.family
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
    source: str = ""  # where the images came from, when not the dataset's original distribution
    # Content hash of every split (images and labels): two workers train on the same images
    # exactly when their digests agree (a JPEG copy, another split or subset all differ).
    digest: str = ""

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
    family, pool_x, pool_y, test_x, test_y, classes, source = loader(cfg)

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
    splits = ImageSplits(
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
        source=source,
    )
    splits.digest = content_digest(
        splits.train_x, splits.train_y, splits.val_x, splits.val_y, splits.test_x, splits.test_y
    )
    return splits


def content_digest(*tensors: Tensor) -> str:
    """A short hash of the tensors' shapes, types and bytes (CPU tensors; nothing is copied)."""
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(f"{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(memoryview(tensor.contiguous().numpy()).cast("B"))
    return digest.hexdigest()[:16]


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

# family, train images, labels, test images, labels, class names, and a note on the source when
# it is not the dataset's original distribution (ImageSplits.source)
_Loaded = tuple[str, Tensor, Tensor, Tensor, Tensor, list[str], str]


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
    return "mnist", tr_x, tr_y, te_x, te_y, classes, ""


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
        tr_x, tr_y, classes, _ = _load_folder(jpeg / "train", cache, "data.root", "cifar")
        te_x, te_y, te_classes, _ = _load_folder(jpeg / "test", cache, "data.root", "cifar")
        _check_same_classes(classes, te_classes, jpeg, "data.root")
        note = (
            f"the JPEG copy at {jpeg}, a lossy re-encoding: accuracies can differ slightly from "
            "the original CIFAR-10's"
        )
        return "cifar", tr_x, tr_y, te_x, te_y, classes, note
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
    return "cifar", tr_x, tr_y, te_x, te_y, classes, ""


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
    pool_x, pool_y = x[pool_i].contiguous(), y[pool_i]
    return "mnist", pool_x, pool_y, x[test_i].contiguous(), y[test_i], classes, ""


def _load_imagefolder(cfg: DataConfig) -> _Loaded:
    path = Path(os.path.expanduser(cfg.path)).absolute()
    for split in ("train", "test"):
        if not (path / split).is_dir():
            raise DataError(
                f"data.path: {path / split} is not a folder; expected train/ and test/ class folders"
            )
    cache = _cache_dir(cfg)
    # data.family "auto" is decided on train/; test/ is then decoded for the same family.
    tr_x, tr_y, classes, family = _load_folder(path / "train", cache, "data.path", cfg.family)
    te_x, te_y, te_classes, _ = _load_folder(path / "test", cache, "data.path", family)
    _check_same_classes(classes, te_classes, path, "data.path")
    return family, tr_x, tr_y, te_x, te_y, classes, ""


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


def _cache_name(folder: Path, classes: list[str], files: list[str], family: str) -> tuple[str, str]:
    """(file name, prefix of the same folder's entries for the same ``family`` setting).

    The name carries a hash of the absolute folder path, the family the images are decoded for
    ("auto", "mnist" or "cifar": a changed data.family decodes again, into an entry of its own)
    and a hash of the folder's content stamp (class names, and every file's path under the
    folder, size and mtime) and the decoder's version, so an edited folder gets a new entry and
    the stale one is removed. Every path counts: a file moved to another class folder keeps its
    mtime, and so left the file count and the newest mtime as they were."""
    where = hashlib.sha256(str(folder).encode()).hexdigest()[:12]
    c, h, w = FAMILY_SHAPES.get(family, (0, 0, 0))
    content = hashlib.sha256()
    content.update(f"v{_CACHE_VERSION}|{folder}|{family}|{c}x{h}x{w}|".encode())
    content.update("\0".join(classes).encode())
    for f in files:
        st = os.stat(f)
        content.update(f"\0{os.path.relpath(f, folder)}|{st.st_size}|{st.st_mtime_ns}".encode())
    what = content.hexdigest()[:16]
    label = re.sub(r"[^A-Za-z0-9_.-]", "_", folder.name)
    prefix = f"imagefolder-{label}-{where}-"
    return f"{prefix}{family}-{what}.pt", prefix


def _remove_stale(cache_file: Path, prefix: str, family: str) -> None:
    """Delete the folder's older entries for the same family setting (and any of an older cache
    layout); the entries kept for the other settings stay."""
    others = tuple(f"{prefix}{f}-" for f in DATA_FAMILIES if f != family)
    for stale in cache_file.parent.glob(f"{prefix}*.pt"):
        if stale != cache_file and not stale.name.startswith(others):
            with contextlib.suppress(OSError):
                stale.unlink()


def _load_folder(
    folder: Path, cache_dir: Path | None, field: str, family: str
) -> tuple[Tensor, Tensor, list[str], str]:
    """Decode an ImageFolder-layout folder for ``family`` ("auto", "mnist" or "cifar") into
    (uint8 (N, C, H, W), int64 labels, classes, the family decoded for), via the cache."""
    classes, files, labels = _list_folder(folder, field)
    cache_file = prefix = None
    if cache_dir is not None:
        name, prefix = _cache_name(folder, classes, files, family)
        cache_file = cache_dir / name
        if cache_file.is_file():
            try:
                blob = torch.load(cache_file, map_location="cpu", weights_only=True)
                x, y, got = blob["x"], blob["y"], blob["family"]
                if (
                    blob["classes"] == classes
                    and torch.equal(blob["y"], torch.as_tensor(labels, dtype=torch.int64))
                    and got in FAMILY_SHAPES
                    and family in ("auto", got)
                    and x.dtype == torch.uint8
                    and tuple(x.shape) == (len(files), *FAMILY_SHAPES[got])
                    and tuple(y.shape) == (len(files),)
                ):
                    return x, y, classes, got
            except Exception as e:  # a corrupt or foreign file: decode again and overwrite it
                warnings.warn(
                    f"ignoring unreadable image cache {cache_file}: {_first_line(e)}", stacklevel=3
                )

    resolved = _infer_family(files, field) if family == "auto" else family
    x = _decode_files(files, field, resolved)
    y = torch.as_tensor(labels, dtype=torch.int64)
    blob = {"x": x, "y": y, "classes": classes, "family": resolved}
    if cache_file is not None and _save_atomic(blob, cache_file):
        _remove_stale(cache_file, prefix, family)
    return x, y, classes, resolved


# PIL modes of one grey channel: bilevel, 8-bit, 8-bit with alpha, 16-bit, 32-bit int and float.
_GREY_MODES = frozenset(("1", "L", "LA", "La", "I", "F", "I;16", "I;16L", "I;16B", "I;16N"))


def _is_grey(im) -> bool:
    """Whether a PIL image (opened, not necessarily loaded) holds grey values only: a grey mode,
    or a palette whose every colour is grey."""
    if im.mode in _GREY_MODES:
        return True
    if im.mode in ("P", "PA") and im.palette is not None and im.palette.mode == "RGB":
        pal = np.frombuffer(bytes(im.palette.palette), dtype=np.uint8)
        pal = pal[: pal.size // 3 * 3].reshape(-1, 3)
        return bool((pal == pal[:, :1]).all())
    return False


def _infer_family(files: list[str], field: str) -> str:
    """data.family=auto: "mnist" when every file is grey (read from the file headers only),
    else "cifar" (any colour image, mixed folders included)."""
    from PIL import Image

    for f in files:
        try:
            with Image.open(f) as im:
                grey = _is_grey(im)
        except Exception as e:
            raise DataError(f"{field}: cannot decode image {f}: {_first_line(e)}") from None
        if not grey:
            return "cifar"
    return "mnist"


def _decode_files(files: list[str], field: str, family: str) -> Tensor:
    """Decode every file once (a one-off cost, not per batch) into one uint8 (N, C, H, W) tensor
    of ``family``'s shape: converted to its colour mode (grey <-> RGB) and resized to its size."""
    c, h, _ = FAMILY_SHAPES[family]
    out = torch.empty((len(files), *FAMILY_SHAPES[family]), dtype=torch.uint8)
    for i, f in enumerate(files):
        out[i] = _fit(_decode(f, field), c, h)
    return out


def _fit(img: Tensor, channels: int, size: int) -> Tensor:
    """A uint8 (1|3, H, W) image -> (channels, size, size): grey <-> RGB, then the shorter side
    resized to ``size`` (bilinear, antialiased) and the centre cropped square. An image already
    of that shape is returned unchanged."""
    if img.shape[0] == 3 and channels == 1:
        img = _luma(img)
    if tuple(img.shape[1:]) != (size, size):
        img = _resize_crop(img, size)
    if img.shape[0] == 1 and channels == 3:
        img = img.expand(3, -1, -1)
    return img


def _luma(rgb: Tensor) -> Tensor:
    """uint8 RGB (3, H, W) -> grey (1, H, W) with ITU-R 601 weights, PIL's own fixed-point
    formula, so the result equals ``Image.convert("L")``."""
    r, g, b = rgb.to(torch.int32)
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).to(torch.uint8).unsqueeze(0)


def _resize_crop(img: Tensor, size: int) -> Tensor:
    import torch.nn.functional as F

    h, w = img.shape[1:]
    if h <= w:
        nh, nw = size, max(size, int(size * w / h))
    else:
        nh, nw = max(size, int(size * h / w)), size
    x = F.interpolate(
        img.unsqueeze(0).to(torch.float32),
        size=(nh, nw),
        mode="bilinear",
        align_corners=False,
        antialias=True,
    )
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[0, :, top : top + size, left : left + size]
    return x.round_().clamp_(0, 255).to(torch.uint8)


_TV_DEPRECATION = ".*image decoding and encoding capabilities of TorchVision are deprecated"
_JPEG_MAGIC = b"\xff\xd8"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@functools.cache
def _tv_decoder():
    """torchvision's ``decode_image`` and its UNCHANGED mode, or None where this torchvision
    lacks them."""
    try:
        from torchvision.io import ImageReadMode, decode_image
    except ImportError:
        return None
    return decode_image, ImageReadMode.UNCHANGED


def _fast_path(data: bytes) -> bool:
    """Files torchvision's decoder reads exactly as PIL would: JPEG (its 1 or 3 channel
    results are checked after decoding) and 8-bit grey or RGB PNG (the IHDR's bit depth and
    colour type; palette, alpha and 16-bit PNGs go through PIL)."""
    if data.startswith(_JPEG_MAGIC):
        return True
    return data.startswith(_PNG_MAGIC) and len(data) > 25 and data[24] == 8 and data[25] in (0, 2)


def _decode(path: str, field: str) -> Tensor:
    """One image file -> uint8 (1, H, W) grey or (3, H, W) RGB, whatever its mode.

    torchvision's decoder for 8-bit grey/RGB JPEG and PNG (the bulk, and the faster one); PIL
    for everything else (see :func:`_pil_array`). A file neither can read (truncated, corrupt,
    not an image) is a one-line DataError naming it."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as e:
        raise DataError(f"{field}: cannot read image {path}: {_first_line(e)}") from None
    tv = _tv_decoder()
    if tv is not None and _fast_path(data):
        decode_image, unchanged = tv
        try:
            with warnings.catch_warnings():
                # torchvision 0.29 deprecates its codecs (for torchcodec), warning on every call.
                warnings.filterwarnings("ignore", _TV_DEPRECATION, DeprecationWarning)
                raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
                img = decode_image(raw, mode=unchanged)
            if img.dtype == torch.uint8 and img.ndim == 3 and img.shape[0] in (1, 3):
                return img
        except RuntimeError:
            pass  # truncated or odd (CMYK JPEG...): PIL below says which, or reads it
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            arr = _pil_array(im)
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError... for broken files
        raise DataError(f"{field}: cannot decode image {path}: {_first_line(e)}") from None
    t = torch.from_numpy(np.array(arr, dtype=np.uint8))  # a writable, contiguous copy
    return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1).contiguous()


def _pil_array(im) -> np.ndarray:
    """A loaded PIL image -> uint8 (H, W) grey or (H, W, 3) RGB.

    16-bit grey (``I;16*``) and 32-bit integer (``I``, read as 16-bit, what 16-bit PNGs and TIFFs
    give) values are scaled from 0..65535 to 0..255 (``round(v * 255 / 65535)``, so ``257 * k``
    is ``k``); float (``F``) images whose values lie in [0, 1] are scaled by 255, others clipped
    to 0..255. Alpha is dropped (as ImageFolder's ``convert("RGB")`` does); palette images
    become grey when every palette colour is grey, else RGB; CMYK, YCbCr, HSV and the rest are
    converted to RGB by PIL."""
    mode = im.mode
    if mode in ("1", "L", "LA", "La"):
        return np.asarray(im.convert("L") if mode == "1" else im.getchannel(0), dtype=np.uint8)
    if mode.startswith("I;16") or mode == "I":
        wide = np.asarray(im).astype(np.int64).clip(0, 65535)
        return ((wide * 255 + 32767) // 65535).astype(np.uint8)
    if mode == "F":
        f = np.nan_to_num(np.asarray(im, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        if f.size and f.min() >= 0.0 and f.max() <= 1.0:
            f = f * 255.0
        return np.rint(f.clip(0.0, 255.0)).astype(np.uint8)
    if mode in ("P", "PA"):
        if _is_grey(im):
            return np.asarray(im.convert("L"), dtype=np.uint8)
        return np.asarray(im.convert("RGBA").convert("RGB"), dtype=np.uint8)
    if mode != "RGB":
        im = im.convert("RGB")
    return np.asarray(im, dtype=np.uint8)


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
