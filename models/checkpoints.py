"""Per-epoch training checkpoints: written atomically, read back with ``weights_only=True``.

A checkpoint holds plain tensors and containers only (module/optimizer/scheduler state dicts,
RNG states as uint8 tensors, numbers), so the safe loader reads it and a half-written file can
never replace a good one: the bytes go to a temporary file in the same folder first, then
``os.replace`` swaps it in.

Each checkpoint may carry an ``identity`` (the search layer stores a fingerprint of the trial's
parameters and resolved config there): :func:`check_identity` refuses a file written for other
settings, and :func:`set_aside` keeps a refused or unreadable file under a new name instead of
deleting it.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# The checkpoint file of each training phase inside a run's checkpoint folder.
PHASE_FILES = {"pretrain": "pretrain.pt", "probe": "probe.pt"}
BEST_FILE = "pretrain-best.pt"  # the pretrain epoch that scored best on validation


def phase_checkpoint(folder: str | os.PathLike[str], phase: str) -> Path:
    """The checkpoint file of ``phase`` (pretrain or probe) in ``folder``."""
    return Path(folder) / PHASE_FILES[phase]


def best_checkpoint(folder: str | os.PathLike[str]) -> Path:
    """The best-on-validation pretrain checkpoint in ``folder`` (modules only)."""
    return Path(folder) / BEST_FILE


class CheckpointWriteError(OSError):
    """A checkpoint could not be written here (a full disk, a folder that cannot be written):
    the machine's fault, not the configuration's. The message names the file and the free
    space left on its disk."""


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically and durably, creating parent folders: the file
    is synced before it replaces the old one, and the folder after, so that a power loss
    cannot roll the checkpoint back behind a rung result already stored in the database.
    A failed write leaves the old file as it was and raises :class:`CheckpointWriteError`."""
    path = Path(path)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as handle:
            torch.save(state, handle)  # a full disk: RuntimeError "unexpected pos", no errno
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as error:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise CheckpointWriteError(_write_failure(path, error)) from error
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise
    _sync_folder(path.parent)


# Write errors that may mean a full disk (or quota, or file-size limit): the message then
# gives the free space. torch.save reports a full disk as a RuntimeError with no errno.
_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _write_failure(path: Path, error: BaseException) -> str:
    """One line on why ``path`` could not be written, with the free space left on its disk
    when the disk may be full (not for a folder that refuses writes: '0.0 MiB free' on /sys
    would send its reader to clean a disk that is not full)."""
    reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
    free = ""
    folder = next((p for p in (path.parent, *path.parents) if p.exists()), None)
    space = not isinstance(error, OSError) or error.errno in (None, *_SPACE_ERRNOS)
    if folder is not None and space:
        try:
            free = f" ({shutil.disk_usage(folder).free / 2**20:,.1f} MiB free on its disk)"
        except OSError:
            free = ""
    return f"cannot write checkpoint {path}{free}: {type(error).__name__}: {reason}".rstrip(": ")


def _sync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # Windows, or a filesystem that does not allow it
        return
    try:
        os.fsync(fd)
    except OSError:  # some network filesystems refuse fsync on a folder
        pass
    finally:
        os.close(fd)


def detached_copy(value: Any) -> Any:
    """``value`` (nested dicts, lists and tuples of tensors and numbers) with every tensor copied
    to the CPU: a snapshot that training can no longer change under a background write."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: detached_copy(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(detached_copy(v) for v in value)
    return value


class CheckpointWriter:
    """Writes checkpoints on one background thread, so training does not wait for the disk.

    :meth:`submit` takes a state already detached from training (:func:`detached_copy`) and
    returns at once; one write is in flight at a time (a second submit first waits for it, so
    at most two snapshots are in memory). A failed write is raised by the next :meth:`submit`
    or by :meth:`flush`, which waits until everything submitted is on disk; call it before
    reporting a phase finished. ``on_written(path)`` runs on the writer thread after each file
    is in place (a copy to a shared store, for example).

    Example::

        writer = CheckpointWriter()
        writer.submit(path, detached_copy(state))
        writer.flush()
    """

    def __init__(self, on_written: Callable[[Path], None] | None = None) -> None:
        self.on_written = on_written
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def _write(self, path: Path, state: dict[str, Any]) -> None:
        try:
            save_checkpoint(path, state)
            if self.on_written is not None:
                self.on_written(path)
        except BaseException as error:  # raised in the training thread by the next call
            self._error = error

    def _wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def submit(self, path: str | os.PathLike[str], state: dict[str, Any]) -> None:
        """Write ``state`` to ``path`` in the background (after the previous write)."""
        self._wait()
        self._thread = threading.Thread(
            target=self._write, args=(Path(path), state), name="checkpoint-writer", daemon=False
        )
        self._thread.start()

    def flush(self) -> None:
        """Wait until every submitted checkpoint is written; raise a write's error."""
        self._wait()


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used: unreadable (truncated, garbled) or written for other settings.

    ``path`` is shown as given: a file, or where a shared store keeps it (a URL).
    """

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"checkpoint {os.fspath(path)}: {problem}")


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """Read a checkpoint onto the CPU, or return ``None`` when there is none.

    Raises :class:`CheckpointError` when the file exists but cannot be read as a checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a damaged file
        # torch's own text advises weights_only=False, which would be unsafe here: not shown.
        raise CheckpointError(
            path, f"unreadable: truncated or not a checkpoint ({type(error).__name__})"
        ) from error
    if not isinstance(state, dict) or "epoch" not in state:
        raise CheckpointError(path, "unreadable (not a training checkpoint)")
    return state


def written_identity(path: str | os.PathLike[str]) -> str | None:
    """The identity checkpoint ``path`` was written under; None if there is none, or no file,
    or it cannot be read (what to do about that is :func:`load_checkpoint`'s caller's to say)."""
    try:
        state = load_checkpoint(path)
    except CheckpointError:
        return None
    return None if state is None else state.get("identity")


def check_identity(
    path: str | os.PathLike[str], state: dict[str, Any], identity: str | None
) -> None:
    """Raise :class:`CheckpointError` unless ``state`` was written under ``identity``."""
    if identity is None:
        return
    found = state.get("identity")
    if found != identity:
        raise CheckpointError(
            path, f"written for other settings (identity {found or 'none'}, expected {identity})"
        )


def set_aside(path: str | os.PathLike[str], reason: str) -> Path:
    """Rename ``path`` to ``<name>.<reason>`` (``.<reason>.1``, ... if taken); the new path."""
    path = Path(path)
    target = path.with_name(f"{path.name}.{reason}")
    count = 0
    while target.exists():
        count += 1
        target = path.with_name(f"{path.name}.{reason}.{count}")
    os.replace(path, target)
    return target


def _rng_device(device: torch.device | str | None) -> torch.device:
    return torch.device("cpu") if device is None else torch.device(device)


def capture_rng_state(device: torch.device | str | None = None) -> dict[str, Any]:
    """Torch's global RNG states that the training code draws from: the CPU generator, and
    the generator of the training ``device`` when that is a CUDA device (that one only).

    Saving one CUDA state, not one per visible GPU, lets a checkpoint move between GPUs,
    between processes with other ``CUDA_VISIBLE_DEVICES`` masks, and between GPU and CPU.
    """
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    dev = _rng_device(device)
    if dev.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(dev)
    return state


def restore_rng_state(state: dict[str, Any], device: torch.device | str | None = None) -> None:
    """Restore what :func:`capture_rng_state` saved onto a run training on ``device``.

    The CPU state is always restored. A CUDA state goes to ``device`` when the run is on CUDA;
    on a CPU run it is ignored (the run draws nothing from a CUDA generator). An older
    checkpoint's list of per-GPU states restores the entry of ``device``'s index, or the first
    when the writer saw fewer GPUs; a run on CUDA without a saved CUDA state keeps its own.
    """
    torch.set_rng_state(state["cpu"])
    dev = _rng_device(device)
    cuda = state.get("cuda")
    if dev.type != "cuda" or cuda is None:
        return
    if isinstance(cuda, (list, tuple)):  # legacy: one state per GPU the writer could see
        if not cuda:
            return
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        cuda = cuda[index] if index < len(cuda) else cuda[0]
    torch.cuda.set_rng_state(cuda, dev)
