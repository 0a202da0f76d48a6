"""models.checkpoints: what is accepted as a training checkpoint, what is refused, what is kept.

Checkpoints load with ``weights_only`` (plain tensors and containers only), carry their epoch and
the identity of the settings they were trained with, and a damaged one is set aside, never
overwritten; a background write's error reaches the phase that waits for it.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
import torch

from models.checkpoints import (
    CheckpointError,
    CheckpointWriter,
    check_identity,
    load_checkpoint,
    save_checkpoint,
    set_aside,
)


def test_a_checkpoint_holding_pickled_objects_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "pretrain.pt"
    torch.save({"epoch": 1, "when": datetime.date(2020, 1, 1)}, path)  # not plain tensors
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(path)


def test_a_tensor_file_without_an_epoch_is_not_a_training_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "pretrain.pt"
    save_checkpoint(path, {"model": {"w": torch.zeros(2)}})
    with pytest.raises(CheckpointError, match="not a training checkpoint"):
        load_checkpoint(path)


@pytest.mark.parametrize("damage", [b"not a checkpoint at all", b"\x80\x02garbled"])
def test_garbled_bytes_are_a_checkpoint_error(tmp_path: Path, damage: bytes) -> None:
    path = tmp_path / "pretrain.pt"
    path.write_bytes(damage)
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(path)


def test_a_checkpoint_without_identity_is_refused_when_one_is_expected() -> None:
    with pytest.raises(CheckpointError, match="identity none"):
        check_identity("p.pt", {"epoch": 1}, "abc123")
    check_identity("p.pt", {"epoch": 1}, None)  # nothing expected: accepted


def test_set_aside_never_overwrites_an_earlier_one(tmp_path: Path) -> None:
    path = tmp_path / "pretrain.pt"
    for n in range(3):
        path.write_text(str(n))
        set_aside(path, "corrupt")
    kept = {p.name: p.read_text() for p in tmp_path.iterdir()}
    assert kept == {
        "pretrain.pt.corrupt": "0",
        "pretrain.pt.corrupt.1": "1",
        "pretrain.pt.corrupt.2": "2",
    }


def test_flush_raises_the_error_of_the_last_write(tmp_path: Path) -> None:
    def store_down(path: Path) -> None:
        raise OSError("store down")

    writer = CheckpointWriter(on_written=store_down)
    writer.submit(tmp_path / "pretrain.pt", {"epoch": 1})
    with pytest.raises(OSError, match="store down"):
        writer.flush()  # the phase must not be reported finished
    writer.flush()  # reported once


def test_a_checkpoint_is_synced_and_so_is_its_folder_after_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Durable, not only atomic: the file is synced before it replaces the old one and the
    folder after, else a power loss could undo the rename while the database keeps the rung
    result that came after it. (The calls are recorded; the real fsync still runs.)"""
    import os
    import stat

    synced: list[tuple[str, bool]] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        is_folder = stat.S_ISDIR(os.fstat(fd).st_mode)
        synced.append(
            ("folder" if is_folder else "file", (tmp_path / "run" / "pretrain.pt").exists())
        )
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    save_checkpoint(tmp_path / "run" / "pretrain.pt", {"epoch": 1})
    assert synced == [("file", False), ("folder", True)]


def test_a_write_the_disk_refuses_is_a_write_error_and_keeps_the_old_checkpoint(
    tmp_path: Path,
) -> None:
    """A full disk (here the file-size limit of this process, which fails the write as a full
    disk does: torch.save raises RuntimeError "unexpected pos", with no errno) is a
    :class:`CheckpointWriteError` naming the file and the space left; the previous checkpoint
    stays whole and no temporary file is left behind."""
    import resource
    import signal

    from models.checkpoints import CheckpointWriteError

    path = tmp_path / "pretrain.pt"
    save_checkpoint(path, {"epoch": 1, "w": torch.zeros(4)})
    before = path.read_bytes()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write, not the process
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
        with pytest.raises(CheckpointWriteError) as caught:
            save_checkpoint(path, {"epoch": 2, "w": torch.zeros(1 << 16)})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    message = str(caught.value)
    assert (
        message.startswith(f"cannot write checkpoint {path} (")
        and "MiB free on its disk" in message
    )
    assert "\n" not in message and isinstance(caught.value, OSError)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pretrain.pt"]
    # A folder that cannot be made (a file stands in its way) is one too.
    with pytest.raises(CheckpointWriteError, match="cannot write checkpoint"):
        save_checkpoint(path / "inside.pt", {"epoch": 1})


SYS = Path("/sys")


@pytest.mark.skipif(not SYS.is_dir(), reason="needs Linux's /sys, which refuses new files")
def test_a_folder_that_refuses_writes_is_not_reported_as_a_full_disk():
    """/sys refuses new entries even to root, and its disk shows 0 bytes free: the message
    names the refusal, not a free space that would send its reader to clean a disk."""
    from models.checkpoints import CheckpointWriteError

    path = SYS / "ssl-search-checkpoints" / "pretrain.pt"
    with pytest.raises(CheckpointWriteError) as caught:
        save_checkpoint(path, {"epoch": 1})
    message = str(caught.value)
    assert message.startswith(f"cannot write checkpoint {path}: "), message
    assert "MiB free" not in message and "\n" not in message, message
    assert not path.parent.exists()
