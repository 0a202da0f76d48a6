"""Image folders of any size and mode: converted to the MNIST or CIFAR family once, at decode
time (data.family), cached per family, and trainable; broken files are one-line errors."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import models.data as data_mod
from models.config import DataConfig, ModelConfig, ProbeConfig, TrainConfig, data_family
from models.data import ImageSplits, load_splits
from models.errors import DataError
from models.training import Run

CLASSES = ("a", "b", "c")
PER_CLASS = {"train": 5, "test": 2}


def rgb_array(rng: np.random.Generator, h: int, w: int, label: int) -> np.ndarray:
    """Noise around a per-class colour, so the classes differ."""
    base = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]][label], dtype=np.int16)
    noise = rng.integers(-40, 41, (h, w, 3), dtype=np.int16)
    return (base + noise).clip(0, 255).astype(np.uint8)


def write_tree(root: Path, make) -> Path:
    """train/ and test/ with CLASSES; ``make(rng, label, i, folder)`` writes image ``i``."""
    rng = np.random.default_rng(0)
    for split, n in PER_CLASS.items():
        for label, cls in enumerate(CLASSES):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                make(rng, label, i, folder)
    return root


def rgb_tree(root: Path, size: int) -> Path:
    def make(rng, label, i, folder):
        Image.fromarray(rgb_array(rng, size, size, label)).save(folder / f"{i:03d}.png")

    return write_tree(root, make)


def save_mode(rng, label: int, i: int, folder: Path) -> None:
    """One file per mode, cycling: L, RGB, RGBA, P, CMYK JPEG, 16-bit grey PNG, at odd sizes
    (non-square too)."""
    h, w = [(40, 40), (64, 48), (30, 90), (96, 96), (50, 50), (33, 20)][(i + label) % 6]
    rgb = Image.fromarray(rgb_array(rng, h, w, label))
    kind = (i + 2 * label) % 6
    if kind == 0:
        rgb.convert("L").save(folder / f"{i:03d}-L.png")
    elif kind == 1:
        rgb.save(folder / f"{i:03d}-RGB.jpg", quality=90)
    elif kind == 2:
        rgba = rgb.convert("RGBA")
        rgba.putalpha(128)
        rgba.save(folder / f"{i:03d}-RGBA.png")
    elif kind == 3:
        rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(folder / f"{i:03d}-P.png")
    elif kind == 4:
        rgb.convert("CMYK").save(folder / f"{i:03d}-CMYK.jpg", quality=90)
    else:
        grey16 = np.asarray(rgb.convert("L"), dtype=np.uint16) * 257
        Image.fromarray(grey16).save(folder / f"{i:03d}-I16.png")


def mixed_tree(root: Path) -> Path:
    return write_tree(root, save_mode)


def config(root: Path, cache: Path, **kw) -> DataConfig:
    return DataConfig(name="imagefolder", path=str(root), cache_dir=str(cache), **kw)


def check_splits(s: ImageSplits, family: str) -> None:
    shape = data_mod.FAMILY_SHAPES[family]
    assert s.family == family and s.normalized == (family == "cifar")
    assert s.classes == list(CLASSES)
    n_train = len(CLASSES) * PER_CLASS["train"]
    assert s.train_x.shape[0] + s.val_x.shape[0] == n_train
    assert s.test_x.shape == (len(CLASSES) * PER_CLASS["test"], *shape)
    for x, y in ((s.train_x, s.train_y), (s.val_x, s.val_y), (s.test_x, s.test_y)):
        assert x.dtype == torch.uint8 and x.is_contiguous() and tuple(x.shape[1:]) == shape
        assert y.dtype == torch.int64 and y.shape == (x.shape[0],)
    assert s.mean.shape == (shape[0],) and s.std.shape == (shape[0],)


def train_one_epoch(s: ImageSplits, task: str) -> dict[str, float]:
    train = TrainConfig(
        epochs=1,
        batch_size=8,
        max_batches=2,
        device="cpu",
        progress=False,
        knn_k=3,
        probe=ProbeConfig(epochs=1, batch_size=8),
    )
    torch.manual_seed(0)
    results = Run(task, s, ModelConfig(channels=8, latent_dim=16), train).fit()
    for split in ("train", "val", "test"):
        assert 0.0 <= results[f"{split}_accuracy"] <= 1.0
    assert all(math.isfinite(v) for v in results.values()), results
    return results


# --------------------------------------------------------------------------- sizes and modes


@pytest.mark.parametrize(("size", "task"), [(64, "contrastive"), (96, "autoencoder")])
def test_large_rgb_sets_load_as_cifar_and_train(tmp_path: Path, size: int, task: str) -> None:
    root = rgb_tree(tmp_path / f"rgb{size}", size)
    s = load_splits(config(root, tmp_path / "cache"))
    check_splits(s, "cifar")
    # downsampled, not cropped or clipped: each class keeps its colour
    means = s.test_x.float().mean(dim=(2, 3))
    for label in range(len(CLASSES)):
        assert int(means[s.test_y == label].mean(0).argmax()) == label
    train_one_epoch(s, task)


@pytest.mark.parametrize(("family", "task"), [("auto", "guided"), ("mnist", "contrastive")])
def test_mixed_mode_folder_loads_and_trains(tmp_path: Path, family: str, task: str) -> None:
    root = mixed_tree(tmp_path / "mixed")
    modes = set()
    for f in sorted(root.rglob("*.*")):
        with Image.open(f) as im:
            modes.add(im.mode)
    assert {"L", "RGB", "RGBA", "P", "CMYK", "I;16"} <= modes
    s = load_splits(config(root, tmp_path / "cache", family=family))
    check_splits(s, "cifar" if family == "auto" else "mnist")  # colour files: auto is cifar
    train_one_epoch(s, task)


def test_grey_folder_of_any_size_is_mnist(tmp_path: Path) -> None:
    def make(rng, label, i, folder):
        grey = Image.fromarray(rgb_array(rng, 64, 64, label)).convert("L")
        kind = i % 4
        if kind == 0:
            grey.save(folder / f"{i}.png")
        elif kind == 1:  # 16-bit
            Image.fromarray(np.asarray(grey, dtype=np.uint16) * 257).save(folder / f"{i}.png")
        elif kind == 2:  # a palette of greys only
            grey.convert("P").save(folder / f"{i}.png")
        else:
            grey.save(folder / f"{i}.jpg")

    root = write_tree(tmp_path / "grey", make)
    s = load_splits(config(root, tmp_path / "cache"))
    check_splits(s, "mnist")
    train_one_epoch(s, "guided")


def test_16bit_values_scale_to_8bit(tmp_path: Path) -> None:
    values = [0, 257, 257 * 100, 40000, 65000, 65535]
    want = [0, 1, 100, 156, 253, 255]  # round(v * 255 / 65535), not clipped at 255
    arr = np.full((28, 28), 257 * 50, dtype=np.uint16)
    arr[0, : len(values)] = values

    def make(rng, label, i, folder):
        Image.fromarray(arr).save(folder / f"{i}.png")  # I;16 PNG, 28x28: no resizing

    root = write_tree(tmp_path / "deep", make)
    with Image.open(next(root.rglob("*.png"))) as im:
        assert im.mode == "I;16"
    s = load_splits(config(root, tmp_path / "cache"))
    assert s.family == "mnist"
    assert s.test_x[0, 0, 0, : len(values)].tolist() == want
    assert int(s.test_x[0, 0, 5, 5]) == 50
    # a 32-bit integer TIFF is read on the same 16-bit scale; a float one in [0, 1] times 255
    Image.fromarray(arr.astype(np.int32)).save(tmp_path / "wide.tif")
    assert data_mod._decode(str(tmp_path / "wide.tif"), "data.path")[0, 0, :6].tolist() == want
    Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32)).save(tmp_path / "float.tif")
    assert int(data_mod._decode(str(tmp_path / "float.tif"), "data.path").max()) == 128


def test_conversions_keep_colours(tmp_path: Path) -> None:
    colour = (200, 50, 30)
    solid = Image.new("RGB", (48, 48), colour)
    solid.convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    got = data_mod._decode(str(tmp_path / "cmyk.jpg"), "data.path")
    assert got.shape == (3, 48, 48)
    assert (got.float().mean(dim=(1, 2)) - torch.tensor(colour)).abs().max() < 6
    # a palette image with a transparent index: RGB, no warning
    pal = solid.convert("P")
    pal.save(tmp_path / "pal.png", transparency=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = data_mod._decode(str(tmp_path / "pal.png"), "data.path")
    assert got.shape == (3, 48, 48)
    # RGB -> grey is PIL's own luma
    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8))
    rgb.save(tmp_path / "rgb.png")
    grey = data_mod._fit(data_mod._decode(str(tmp_path / "rgb.png"), "data.path"), 1, 28)
    assert torch.equal(grey[0], torch.from_numpy(np.asarray(rgb.convert("L")).copy()))


def test_resize_is_antialiased_and_centre_cropped() -> None:
    # a solid colour stays exact
    solid = torch.tensor([10, 120, 250], dtype=torch.uint8).view(3, 1, 1).expand(3, 96, 96)
    out = data_mod._fit(solid.contiguous(), 3, 32)
    assert out.shape == (3, 32, 32) and torch.equal(out, solid[:, :32, :32])
    # a fine checkerboard averages to grey (antialiased), not to aliasing stripes
    board = ((torch.arange(64).view(-1, 1) + torch.arange(64)) % 2 * 255).to(torch.uint8)
    small = data_mod._fit(board.unsqueeze(0), 1, 32)
    assert int(small.min()) >= 120 and int(small.max()) <= 135
    # non-square: shorter side to the size, the centre kept (the outer bands are cropped)
    wide = torch.zeros(1, 40, 120, dtype=torch.uint8)
    wide[:, :, 50:70] = 255  # a white band in the middle; after resizing 35..49 of 84 columns
    out = data_mod._fit(wide, 1, 28)
    assert out.shape == (1, 28, 28)
    assert torch.all(out[0, :, 14] == 255)
    assert torch.all(out[0, :, 0] < 128) and torch.all(out[0, :, -1] < 128)
    # upsampling a small image works too (8x8 -> 32x32, grey -> RGB)
    tiny = torch.full((1, 8, 8), 77, dtype=torch.uint8)
    assert torch.equal(data_mod._fit(tiny, 3, 32), torch.full((3, 32, 32), 77, dtype=torch.uint8))


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("family", ["auto", "cifar"])
def test_truncated_jpeg_is_a_one_line_error_naming_the_file(tmp_path: Path, family: str) -> None:
    root = rgb_tree(tmp_path / "imgs", 64)
    good = Image.fromarray(rgb_array(np.random.default_rng(2), 64, 64, 0))
    bad = root / "train" / "b" / "zz-broken.jpg"
    good.save(bad, quality=90)
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    with pytest.raises(DataError) as e:
        load_splits(config(root, tmp_path / "cache", family=family))
    msg = str(e.value)
    assert msg.startswith("data.path: cannot decode image ") and "\n" not in msg
    assert str(bad) in msg and "truncated" in msg


def test_not_an_image_is_a_one_line_error(tmp_path: Path) -> None:
    root = rgb_tree(tmp_path / "imgs", 32)
    junk = root / "test" / "c" / "junk.png"
    junk.write_bytes(b"this is not a PNG at all")
    with pytest.raises(DataError, match=r"^data\.path: cannot decode image .*junk\.png: ") as e:
        load_splits(config(root, tmp_path / "cache"))
    assert "\n" not in str(e.value)


def test_family_setting_is_checked() -> None:
    with pytest.raises(DataError, match=r"^data\.family: unknown value 'rgb'; allowed: auto"):
        load_splits(DataConfig(name="digits", family="rgb"))
    with pytest.raises(DataError, match=r"^data\.family: digits is a mnist-family dataset"):
        load_splits(DataConfig(name="digits", family="cifar"))
    assert load_splits(DataConfig(name="digits", family="mnist")).family == "mnist"
    assert data_family(DataConfig(name="imagefolder", family="cifar")) == "cifar"
    assert data_family(DataConfig(name="imagefolder")) is None
    assert data_family(DataConfig(name="cifar10")) == "cifar"


# --------------------------------------------------------------------------- the cache


def test_cache_is_per_family_and_decodes_again_when_it_changes(tmp_path, monkeypatch) -> None:
    root = rgb_tree(tmp_path / "imgs", 64)
    cache = tmp_path / "cache"
    decoded = []
    real = data_mod._decode

    def counting(path, field):
        decoded.append(path)
        return real(path, field)

    monkeypatch.setattr(data_mod, "_decode", counting)
    n_files = sum(PER_CLASS.values()) * len(CLASSES)
    n_files_train = PER_CLASS["train"] * len(CLASSES)

    first = load_splits(config(root, cache))  # auto -> cifar
    assert first.family == "cifar" and len(decoded) == n_files
    # train/ is cached under the setting (auto), test/ under the family it resolved to
    assert sorted(p.name.split("-")[3] for p in cache.glob("*.pt")) == ["auto", "cifar"]
    decoded.clear()
    again = load_splits(config(root, cache))
    assert decoded == [] and torch.equal(again.train_x, first.train_x)

    grey = load_splits(config(root, cache, family="mnist"))  # a changed setting: decoded again
    assert grey.family == "mnist" and grey.train_x.shape[1:] == (1, 28, 28)
    assert len(decoded) == n_files
    assert len(list(cache.glob("*.pt"))) == 4  # one entry per split folder and setting
    decoded.clear()
    for family, shape in (("mnist", (1, 28, 28)), ("auto", (3, 32, 32)), ("cifar", (3, 32, 32))):
        s = load_splits(config(root, cache, family=family))
        assert s.train_x.shape[1:] == shape
    # mnist and auto came from the cache; cifar decoded train/ once more into an entry of its own
    assert len(decoded) == n_files_train
    assert len(list(cache.glob("*.pt"))) == 5
    assert torch.equal(s.train_x, first.train_x)


def test_older_cache_layout_is_replaced(tmp_path: Path) -> None:
    root = rgb_tree(tmp_path / "imgs", 32)
    cache = tmp_path / "cache"
    load_splits(config(root, cache))
    # entries named as version 1 named them (no family in the name) go on the next write
    old = []
    for p in cache.glob("*.pt"):
        old.append(cache / (p.name.rsplit("-", 2)[0] + "-0123456789abcdef.pt"))
        old[-1].write_bytes(b"old")
        p.unlink()
    assert len(old) == 2
    load_splits(config(root, cache))
    assert not any(p.exists() for p in old)
    assert len(list(cache.glob("*.pt"))) == 2
