"""Dataset loading and splits: digits (bundled), the shared MNIST / CIFAR copies, errors, the cache."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import models.data as data_mod
from models.config import DataConfig
from models.data import ImageSplits, load_splits
from models.errors import DataError

REPO_ROOT = Path(__file__).resolve().parent.parent
DIGITS_TOTAL = 1797


def row_hashes(x: torch.Tensor) -> set[str]:
    return {hashlib.sha1(r.numpy().tobytes()).hexdigest() for r in x}


@pytest.fixture(scope="module")
def digits() -> ImageSplits:
    return load_splits(DataConfig(name="digits"))


# --------------------------------------------------------------------------- digits


def test_digits_shapes_and_types(digits: ImageSplits) -> None:
    s = digits
    assert s.family == "mnist" and s.normalized is False
    assert s.num_classes == 10 and s.classes == [str(i) for i in range(10)]
    for x, y in ((s.train_x, s.train_y), (s.val_x, s.val_y), (s.test_x, s.test_y)):
        assert x.dtype == torch.uint8 and x.ndim == 4 and x.shape[1:] == (1, 28, 28)
        assert x.is_contiguous()
        assert y.dtype == torch.int64 and y.shape == (x.shape[0],)
        assert int(y.min()) >= 0 and int(y.max()) <= 9
    n_pool = s.train_x.shape[0] + s.val_x.shape[0]
    assert n_pool + s.test_x.shape[0] == DIGITS_TOTAL
    assert s.val_x.shape[0] == round(0.1 * n_pool)
    assert int(s.train_x.max()) == 255  # 0..16 scaled to the full uint8 range
    assert s.mean.dtype == torch.float32 and s.mean.shape == (1,) and s.std.shape == (1,)


def test_digits_test_split_is_stratified_and_fixed(digits: ImageSplits) -> None:
    counts = torch.bincount(digits.test_y, minlength=10)
    assert counts.sum() == 360 and int(counts.min()) >= 35 and int(counts.max()) <= 37
    other = load_splits(DataConfig(name="digits", split_seed=5))
    assert torch.equal(other.test_x, digits.test_x) and torch.equal(other.test_y, digits.test_y)


def test_splits_are_disjoint(digits: ImageSplits) -> None:
    s = digits
    train, val = set(s.train_idx.tolist()), set(s.val_idx.tolist())
    assert not train & val
    assert len(train | val) == s.train_x.shape[0] + s.val_x.shape[0]
    assert len(train) == s.train_x.shape[0] and len(val) == s.val_x.shape[0]
    # the test hold-out shares no image with train or validation
    assert not row_hashes(s.test_x) & (row_hashes(s.train_x) | row_hashes(s.val_x))


def test_split_deterministic_and_seeded(digits: ImageSplits) -> None:
    again = load_splits(DataConfig(name="digits"))
    assert torch.equal(again.val_idx, digits.val_idx)
    assert torch.equal(again.train_x, digits.train_x) and torch.equal(again.val_y, digits.val_y)
    other = load_splits(DataConfig(name="digits", split_seed=1))
    assert not torch.equal(other.val_idx, digits.val_idx)
    assert other.val_idx.numel() == digits.val_idx.numel()


@pytest.mark.slow
def test_split_deterministic_across_processes(digits: ImageSplits) -> None:
    code = (
        "from models.config import DataConfig; from models.data import load_splits; "
        "s = load_splits(DataConfig(name='digits', split_seed=3, val_fraction=0.25)); "
        "print(','.join(map(str, s.val_idx.tolist())))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    here = load_splits(DataConfig(name="digits", split_seed=3, val_fraction=0.25))
    assert out == ",".join(map(str, here.val_idx.tolist()))


@pytest.mark.parametrize("fraction", [0.05, 0.2, 0.5])
def test_val_size_is_rounded_fraction(fraction: float) -> None:
    s = load_splits(DataConfig(name="digits", val_fraction=fraction))
    n = s.train_x.shape[0] + s.val_x.shape[0]
    assert s.val_x.shape[0] == round(fraction * n)


def test_subsets(digits: ImageSplits) -> None:
    s = load_splits(DataConfig(name="digits", train_subset=100, val_subset=20, test_subset=50))
    assert (s.train_x.shape[0], s.val_x.shape[0], s.test_x.shape[0]) == (100, 20, 50)
    assert (s.train_y.shape[0], s.val_y.shape[0], s.test_y.shape[0]) == (100, 20, 50)
    # subsets of the same seed's full splits, still disjoint
    assert set(s.train_idx.tolist()) <= set(digits.train_idx.tolist())
    assert set(s.val_idx.tolist()) <= set(digits.val_idx.tolist())
    assert torch.equal(s.train_x, load_splits(DataConfig(name="digits", train_subset=100)).train_x)
    # the test subset does not move with the split seed
    s2 = load_splits(DataConfig(name="digits", test_subset=50, split_seed=7))
    assert torch.equal(s2.test_idx, s.test_idx)
    # mean/std are those of the final (subset) train split
    xf = s.train_x.float() / 255
    assert s.mean.item() == pytest.approx(xf.mean().item(), abs=1e-5)
    assert s.std.item() == pytest.approx(xf.std(unbiased=False).item(), abs=1e-5)
    # larger than available: all of it
    big = load_splits(
        DataConfig(name="digits", train_subset=10**6, val_subset=10**6, test_subset=10**6)
    )
    assert big.train_x.shape == digits.train_x.shape and big.test_x.shape == digits.test_x.shape


def test_image_splits_methods(digits: ImageSplits) -> None:
    x = digits.to_float(digits.train_x[:4])
    assert x.dtype == torch.float32 and float(x.min()) >= 0 and float(x.max()) <= 1
    assert digits.normalize(x) is x  # mnist family: identity
    with pytest.raises(TypeError):
        digits.to_float(x)
    moved = digits.to("meta")
    for name, v in vars(moved).items():
        if isinstance(v, torch.Tensor):
            assert v.device.type == "meta", name
    assert digits.train_x.device.type == "cpu"  # the original is untouched
    assert moved.classes == digits.classes and moved.family == "mnist"


def test_normalize_for_cifar_family() -> None:
    x = torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8)
    mean, std = data_mod._channel_stats(x)
    s = ImageSplits("cifar", x, torch.zeros(20, dtype=torch.int64), x, x, x, x, mean, std,
                    [str(i) for i in range(10)], True)  # fmt: skip
    z = s.normalize(s.to_float(x))
    assert z.mean(dim=(0, 2, 3)).abs().max() < 1e-4
    assert (z.std(dim=(0, 2, 3), unbiased=False) - 1).abs().max() < 1e-4
    assert torch.allclose(s.denormalize(z), s.to_float(x), atol=1e-6)


# --------------------------------------------------------------------------- shared copies


def test_real_mnist(mnist_root: Path) -> None:
    s = load_splits(DataConfig(name="mnist", root=str(mnist_root), val_fraction=0.1))
    assert s.train_x.shape == (54000, 1, 28, 28) and s.val_x.shape == (6000, 1, 28, 28)
    assert s.test_x.shape == (10000, 1, 28, 28)
    assert s.train_x.dtype == torch.uint8 and s.train_y.dtype == torch.int64
    assert int(s.test_y[0]) == 7
    assert s.family == "mnist" and not s.normalized and s.num_classes == 10
    assert s.mean.item() == pytest.approx(0.1307, abs=0.002)
    assert s.std.item() == pytest.approx(0.3081, abs=0.002)


@pytest.mark.slow
def test_cifar_jpeg_copy_and_cache(cifar_root: Path, cache_dir: Path, monkeypatch) -> None:
    cfg = DataConfig(
        name="cifar10",
        root=str(cifar_root),
        cache_dir=str(cache_dir),
        train_subset=2000,
        val_subset=200,
        test_subset=500,
    )
    t0 = time.perf_counter()
    s = load_splits(cfg)
    first = time.perf_counter() - t0
    assert s.train_x.shape == (2000, 3, 32, 32) and s.val_x.shape == (200, 3, 32, 32)
    assert s.test_x.shape == (500, 3, 32, 32) and s.train_x.dtype == torch.uint8
    assert s.family == "cifar" and s.normalized is True
    assert s.source.startswith(f"the JPEG copy at {cifar_root / 'cifar10-jpeg'}, a lossy")
    assert s.to("cpu").source == s.source
    assert s.classes == [
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ]
    assert s.mean.shape == (3,) and s.std.shape == (3,)
    assert torch.allclose(s.mean, torch.tensor([0.49, 0.48, 0.45]), atol=0.03), s.mean
    assert torch.allclose(s.std, torch.tensor([0.25, 0.24, 0.26]), atol=0.03), s.std
    cached = sorted(p.name for p in cache_dir.glob("*.pt"))
    assert len(cached) == 2, cached  # one per split folder
    stamps = {p: p.stat().st_mtime_ns for p in cache_dir.glob("*.pt")}

    # the second load reads the cache: no image is decoded, nothing is rewritten
    def no_decode(*a, **k):
        raise AssertionError("decoded although the cache should have been used")

    monkeypatch.setattr(data_mod, "_decode", no_decode)
    t0 = time.perf_counter()
    s2 = load_splits(cfg)
    second = time.perf_counter() - t0
    assert torch.equal(s2.train_x, s.train_x) and torch.equal(s2.test_y, s.test_y)
    assert {p: p.stat().st_mtime_ns for p in cache_dir.glob("*.pt")} == stamps
    assert second < max(first, 5.0)
    assert not any(p.name.endswith(".tmp") for p in cache_dir.iterdir())


# --------------------------------------------------------------------------- image folders


def write_folder(root: Path, shape: tuple[int, int, int], per_class: int = 3, classes=("b", "a")):
    rng = np.random.default_rng(0)
    c, h, w = shape
    for split in ("train", "test"):
        for cls in classes:
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                arr = rng.integers(0, 256, (h, w, c) if c == 3 else (h, w), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"{i:03d}.png")
    return root


@pytest.mark.parametrize(("shape", "family"), [((1, 28, 28), "mnist"), ((3, 32, 32), "cifar")])
def test_imagefolder_loads(tmp_path: Path, shape, family: str) -> None:
    root = write_folder(tmp_path / "imgs", shape, per_class=10)
    cfg = DataConfig(
        name="imagefolder", path=str(root), cache_dir=str(tmp_path / "cache"), val_fraction=0.2
    )
    s = load_splits(cfg)
    assert s.family == family and s.train_x.shape[1:] == shape
    assert s.classes == ["a", "b"]  # sorted folder names, ImageFolder's order
    assert s.train_x.shape[0] + s.val_x.shape[0] == 20 and s.val_x.shape[0] == 4
    assert s.test_x.shape[0] == 20 and s.normalized == (family == "cifar")
    # pixels survive losslessly (PNG)
    first = np.array(Image.open(root / "test" / "a" / "000.png"))
    want = torch.from_numpy(first).reshape(shape[1], shape[2], shape[0]).permute(2, 0, 1)
    assert torch.equal(s.test_x[0], want)
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2
    # a changed file (newer mtime) makes a new cache entry, which replaces the stale one
    before = {p.name for p in (tmp_path / "cache").glob("*.pt")}
    newer = root / "train" / "a" / "000.png"
    os.utime(newer, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    load_splits(cfg)
    after = {p.name for p in (tmp_path / "cache").glob("*.pt")}
    assert len(after) == 2 and len(after & before) == 1  # test/ unchanged, train/ re-decoded


def test_imagefolder_other_sizes_are_resized(tmp_path: Path) -> None:
    """64x64 RGB (once refused) is resized to the CIFAR family's 32x32; data.family=mnist makes
    the same folder 28x28 grey (tests/test_image_sizes.py covers sizes and modes in depth)."""
    root = write_folder(tmp_path / "big", (3, 64, 64))
    cfg = DataConfig(name="imagefolder", path=str(root), cache_dir=str(tmp_path / "cache"))
    s = load_splits(cfg)
    assert s.family == "cifar" and s.test_x.shape == (6, 3, 32, 32)
    cfg.family = "mnist"
    s = load_splits(cfg)
    assert s.family == "mnist" and s.test_x.shape == (6, 1, 28, 28)


def test_imagefolder_mixed_shapes(tmp_path: Path) -> None:
    """A colour file among grey ones makes an auto folder CIFAR-family: every image RGB 32x32."""
    root = write_folder(tmp_path / "mix", (1, 28, 28))
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(root / "train" / "b" / "zzz.png")
    cfg = DataConfig(name="imagefolder", path=str(root), cache_dir="", val_fraction=0.5)
    s = load_splits(cfg)
    assert s.family == "cifar" and s.train_x.shape[1:] == (3, 32, 32)
    assert s.test_x.shape == (6, 3, 32, 32)
    # grey images become RGB by repeating the channel
    assert torch.equal(s.test_x[:, 0], s.test_x[:, 1]) and torch.equal(
        s.test_x[:, 0], s.test_x[:, 2]
    )


def test_a_file_moved_to_another_class_folder_is_relabelled_not_read_from_the_cache(
    tmp_path: Path,
) -> None:
    """Fixing a mislabelled image by moving it keeps its mtime, the file count and the newest
    mtime: the cache once served the old labels (and a digest a fresh decode did not give)."""
    root = write_folder(tmp_path / "imgs", (1, 28, 28), per_class=5)
    cache = tmp_path / "cache"
    cfg = DataConfig(name="imagefolder", path=str(root), cache_dir=str(cache), val_fraction=0.2)
    before = load_splits(cfg)
    assert torch.bincount(torch.cat([before.train_y, before.val_y])).tolist() == [5, 5]
    source, target = root / "train" / "a" / "004.png", root / "train" / "b" / "a-004.png"
    stamp = source.stat().st_mtime_ns
    os.replace(source, target)  # as `mv` does: the file keeps its mtime
    assert target.stat().st_mtime_ns == stamp
    cached = load_splits(cfg)
    fresh = load_splits(
        DataConfig(name="imagefolder", path=str(root), cache_dir="", val_fraction=0.2)
    )
    assert torch.bincount(torch.cat([cached.train_y, cached.val_y])).tolist() == [4, 6]
    assert cached.digest == fresh.digest and cached.digest != before.digest
    assert len(list(cache.glob("*.pt"))) == 2  # the stale train entry was replaced


def test_unwritable_cache_warns_and_still_loads(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "imgs", (1, 28, 28))
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache folder should be")
    cfg = DataConfig(name="imagefolder", path=str(root), cache_dir=str(blocker / "cache"))
    with pytest.warns(UserWarning, match="data.cache_dir"):
        s = load_splits(cfg)
    assert s.test_x.shape == (6, 1, 28, 28)


def test_corrupt_cache_is_replaced(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "imgs", (1, 28, 28))
    cache = tmp_path / "cache"
    cfg = DataConfig(name="imagefolder", path=str(root), cache_dir=str(cache), val_fraction=0.5)
    s = load_splits(cfg)
    for p in cache.glob("*.pt"):
        p.write_bytes(b"garbage")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s2 = load_splits(cfg)
    assert any("unreadable image cache" in str(w.message) for w in caught)
    assert torch.equal(s.train_x, s2.train_x)
    assert all(p.stat().st_size > 100 for p in cache.glob("*.pt"))


# --------------------------------------------------------------------------- errors


def test_unknown_dataset() -> None:
    with pytest.raises(
        DataError,
        match=r"data\.name: unknown value 'foo'; allowed: mnist, cifar10, digits, imagefolder",
    ):
        load_splits(DataConfig(name="foo"))


def test_mnist_missing(tmp_path: Path) -> None:
    with pytest.raises(
        DataError, match=r"data\.root: MNIST not found under .*MNIST/raw.*data\.download=true"
    ) as e:
        load_splits(DataConfig(name="mnist", root=str(tmp_path), download=False))
    assert "\n" not in str(e.value)


def test_cifar_missing(tmp_path: Path) -> None:
    with pytest.raises(
        DataError, match=r"data\.root: CIFAR-10 not found.*cifar-10-batches-py.*cifar10-jpeg"
    ):
        load_splits(DataConfig(name="cifar10", root=str(tmp_path), download=False))


def test_imagefolder_without_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data\.path"):
        load_splits(DataConfig(name="imagefolder", path=""))
    with pytest.raises(DataError, match=r"data\.path"):
        load_splits(DataConfig(name="imagefolder", path=str(tmp_path)))


@pytest.mark.parametrize("fraction", [0.0, 1.0, 1.5, -0.1, 0.0001])
def test_bad_val_fraction(fraction: float) -> None:
    with pytest.raises(DataError, match=r"data\.val_fraction"):
        load_splits(DataConfig(name="digits", val_fraction=fraction))


@pytest.mark.parametrize("field", ["train_subset", "val_subset", "test_subset"])
def test_bad_subset(field: str) -> None:
    with pytest.raises(DataError, match=rf"data\.{field}"):
        load_splits(DataConfig(name="digits", **{field: -1}))


def test_folder_listing_is_imagefolders(tmp_path: Path) -> None:
    """Sorted class folders; files walked recursively, sorted, image extensions only (any case)."""
    for rel in ("b/2.png", "b/10.PNG", "b/sub/1.jpg", "b/a_sub/z.bmp", "a/x.webp", "a/notes.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "readme.md").write_text("no images")
    with pytest.raises(DataError, match=r"^data\.path: class folder .*c holds no images"):
        data_mod._list_folder(tmp_path, "data.path")
    (tmp_path / "c" / "y.jpeg").write_bytes(b"")
    classes, files, labels = data_mod._list_folder(tmp_path, "data.path")
    assert classes == ["a", "b", "c"]
    assert [os.path.relpath(f, tmp_path) for f in files] == [
        "a/x.webp",
        "b/10.PNG",
        "b/2.png",
        "b/a_sub/z.bmp",
        "b/sub/1.jpg",
        "c/y.jpeg",
    ]
    assert labels == [0, 1, 1, 1, 1, 2]
    with pytest.raises(DataError, match=r"^data\.root: no class folders in "):
        data_mod._list_folder(tmp_path / "a", "data.root")


def test_default_root_reads_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("SSL_SEARCH_DATA", "/somewhere/data")
    assert DataConfig().root == "/somewhere/data"
    monkeypatch.delenv("SSL_SEARCH_DATA")
    assert DataConfig().root == "data"
