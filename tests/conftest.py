"""Shared fixtures: the read-only data copies beside the checkout, and a scratch runs folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

# Two cores: keep torch from oversubscribing them when pytest runs subprocesses too.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The ../shared/data folder (MNIST IDX files and the CIFAR-10 JPEG copy)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data copies not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def mnist_root(shared_data: Path) -> Path:
    if not (shared_data / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file():
        pytest.skip(f"MNIST IDX files not found under {shared_data / 'MNIST' / 'raw'}")
    return shared_data


@pytest.fixture(scope="session")
def cifar_root(shared_data: Path) -> Path:
    if not (shared_data / "cifar10-jpeg" / "train").is_dir():
        pytest.skip(f"CIFAR-10 JPEG copy not found under {shared_data / 'cifar10-jpeg'}")
    return shared_data


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One decoded-image cache for the whole test session (CIFAR JPEGs decode once)."""
    return tmp_path_factory.mktemp("cache")
