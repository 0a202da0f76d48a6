"""Checkpoint folders every worker can reach: a plain folder, or an fsspec URL with a local cache.

``checkpoints_dir`` is either a path (a local folder, or a network mount at the same path on
every machine), used as it is, or a URL that fsspec opens (``s3://bucket/prefix``,
``gs://bucket/prefix``, ``file:///shared/ckpt``, ``memory://...`` in tests), its backend an
optional extra (``pip install 'ssl-search[s3]'``). For a URL each worker trains in a local cache
folder that mirrors ``<url>/<relative folder>/``: :meth:`CheckpointStore.pull` downloads a
folder's files that changed remotely since this cache last saw them (before a trial resumes or
continues), :meth:`CheckpointStore.push` uploads one file once it is written (under a temporary
name, then moved into place where the store is not an object store whose uploads appear whole,
so a reader never sees half a file). Which remote version a cached file is, is kept beside it
(``.<name>.ukey``: fsspec's ``ukey`` and the local file's size and time); a cached file is trusted
only while it is that version. One written here that did not reach the store (its upload failed,
or the worker died first) is replaced by the store's copy, or set aside (``<name>.unshared``) if
the store has none: a leg never resumes, or completes, from a checkpoint the other workers cannot
read.

Example::

    check_location("s3://bucket/ckpt")          # raises CheckpointLocationError, one line
    probe_location("s3://bucket/ckpt")          # the same, when it cannot be reached from here
    store = CheckpointStore("memory://ckpt", cache=Path("runs/checkpoint-cache/memory-1"))
    store.pull("study.screen-uid/trial-00003")
    folder = store.local("study.screen-uid/trial-00003")   # train here
    store.push(folder / "pretrain.pt")                      # after each checkpoint is written
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar
from urllib.parse import urlsplit

from storage.retry import RETRY_SECONDS, retry_call
from storage.urls import StorageUnavailableError, mask_secrets, password_spans

T = TypeVar("T")

# ``protocol://...``; anything else is a path (``C:\\...`` included).
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# The optional extra of pyproject.toml that installs each protocol's backend.
EXTRAS = {
    "s3": "s3",
    "s3a": "s3",
    "gs": "gcs",
    "gcs": "gcs",
    "az": "azure",
    "abfs": "azure",
    "abfss": "azure",
}
# Stores whose uploads appear whole (objects): no temporary name needed.
OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"}
# Protocols fsspec reads but cannot write a checkpoint to.
READ_ONLY = {"http", "https", "github", "gist", "git", "zip", "tar", "libarchive", "data"}
# Protocols that wrap another filesystem rather than name a location.
WRAPPERS = {"simplecache", "filecache", "blockcache", "cached", "reference", "dir", "generic"}


class CheckpointLocationError(ValueError):
    """``checkpoints_dir`` cannot be used; the message is one line and hides a password."""


class CheckpointTransferError(OSError):
    """A checkpoint could not be copied to or from the shared store (its URL in the message)."""


def is_url(location: str) -> bool:
    """Whether ``checkpoints_dir`` is a URL (``protocol://...``) rather than a path."""
    return _URL.match(str(location)) is not None


def protocol_of(location: str) -> str | None:
    match = _URL.match(str(location))
    return match.group(1).lower() if match else None


def redact_location(location: str) -> str:
    """The URL with the password of ``user:password@`` and every secret query value (the
    storage URLs' rule, :func:`storage.urls.is_secret_query_key`) replaced by ``***``; a path as
    it is. Each link of a chained URL (``simplecache::s3://...``) is redacted the same way. A
    password holding an unencoded ``/`` or ``@`` is masked whole
    (:func:`storage.urls.password_spans`), where urllib would end it at the ``/``."""
    if "::" in str(location):
        return "::".join(redact_location(link) for link in str(location).split("::"))
    if not is_url(location):
        return str(location)
    try:
        urlsplit(str(location))  # one urllib cannot split is shown as nothing of it
    except ValueError:
        return "<unparsable checkpoints URL>"
    return mask_secrets(str(location))  # the storage URLs' rule (storage.urls)


def check_location(location: str) -> None:
    """Raise :class:`CheckpointLocationError` unless ``location`` is a path or a URL whose
    fsspec backend is installed and can be written to. Nothing is contacted or written."""
    protocol = protocol_of(location)
    if protocol is None:
        if "::" in str(location) and re.match(r"^[A-Za-z][A-Za-z0-9+.-]*::", str(location)):
            raise CheckpointLocationError(
                f"chained fsspec URLs are not supported, got {redact_location(location)!r}; "
                "give one URL such as s3://bucket/prefix"
            )
        return
    shown = redact_location(location)
    try:
        query = urlsplit(str(location)).query
    except ValueError as error:  # a stray "[" or "]": urllib takes it for an IPv6 host
        raise CheckpointLocationError(f"cannot parse {shown!r} as a URL: {error}") from None
    if any(
        c in str(location)[a:b] for a, b in password_spans(str(location), url=True) for c in "/@#"
    ):
        raise CheckpointLocationError(
            f"the password in {shown!r} holds an unencoded '/', '@' or '#', which ends it early; "
            "percent-encode it (%2F, %40, %23) or give credentials through the backend's usual "
            "environment variables or config files"
        )
    rest = str(location).split("://", 1)[1]
    if "::" in rest or protocol in WRAPPERS:
        raise CheckpointLocationError(
            f"chained or caching fsspec URLs are not supported, got {shown!r}; "
            "give one URL such as s3://bucket/prefix (each worker keeps its own cache)"
        )
    if protocol in READ_ONLY:
        raise CheckpointLocationError(
            f"{protocol}:// cannot be written to, got {shown!r}; use a shared folder or a "
            "writable URL such as s3://bucket/prefix"
        )
    if not rest.strip("/"):
        raise CheckpointLocationError(f"{shown!r} names no bucket or folder")
    if query:
        # Backends would take it for part of the path (folders named ``ck?token=...``).
        raise CheckpointLocationError(
            f"a query (?...) is not supported, got {shown!r}; give credentials through the "
            "backend's usual environment variables or config files"
        )
    import fsspec  # only for URLs: a plain path never imports it

    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError as error:
        extra = EXTRAS.get(protocol)
        how = f"pip install 'ssl-search[{extra}]'" if extra else "install its fsspec backend"
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointLocationError(
            f"{protocol}:// needs a backend that is not installed: {how} ({reason})"
        ) from None
    except ValueError:
        raise CheckpointLocationError(
            f"unknown URL protocol {protocol!r} in {shown!r}; give a folder or an fsspec URL "
            "such as s3://bucket/prefix or gs://bucket/prefix"
        ) from None


def _backend_reason(location: str, error: BaseException) -> str:
    """The first line of a backend's error, or a note that it is withheld when ``location``
    holds a password: the backend's message may quote the raw URL or its root."""
    if redact_location(location) != location:
        return "(details withheld: the URL holds a password)"
    return str(error).splitlines()[0] if str(error) else ""


def probe_location(location: str) -> None:
    """Raise :class:`CheckpointLocationError` when ``location`` is a URL that cannot be reached
    from here: its filesystem does not open, or cannot tell whether the folder exists (an
    unknown host, a refused port, missing credentials), or a file stands where a folder above
    it would be (``file:///etc/hostname/ck``). Reads only; a path is not looked at
    (:func:`check_location` has checked it)."""
    if protocol_of(location) is None:
        return
    shown = redact_location(location)
    try:
        from fsspec.core import url_to_fs

        fs, root = url_to_fs(str(location))
        exists = fs.exists(root)  # reaches the store: fails here when it cannot be reached
        blocked = None
        # Not on object stores, where an object and a prefix may share a name.
        if protocol_of(location) not in OBJECT_STORES:
            if exists and not fs.isdir(root):
                blocked = str(root)
            elif not exists:
                blocked = _file_above(fs, str(root))
    except Exception as error:  # whatever the backend raises: the location is not usable
        reason = _backend_reason(str(location), error)
        raise CheckpointLocationError(
            f"cannot reach {shown}: {type(error).__name__}: {reason}".rstrip(": ")
        ) from None
    if blocked is not None:
        raise CheckpointLocationError(
            f"cannot make {shown}: {blocked} is a file, not a folder; give a folder"
        )


def _file_above(fs: Any, root: str) -> str | None:
    """The nearest existing ancestor of folder ``root`` that is a file (it could never hold
    the folder), or None: a location not made yet is fine where it can be made."""
    for ancestor in PurePosixPath(root).parents:
        if str(ancestor) in ("", ".", "/"):
            return None
        try:
            if fs.isfile(str(ancestor)):
                return str(ancestor)
            if fs.exists(str(ancestor)):
                return None
        except Exception:  # noqa: BLE001 - a store that lets one write a prefix, not read above it
            return None
    return None


def _relative(relative: str | os.PathLike[str]) -> PurePosixPath:
    """``relative`` as a folder inside the store; refuses absolute paths and ``..``."""
    path = PurePosixPath(Path(relative).as_posix())
    if path.is_absolute() or ".." in path.parts or str(path) in ("", "."):
        raise ValueError(f"checkpoint folder {str(relative)!r} is not inside checkpoints_dir")
    return path


# Failures of a copy that a retry cannot mend: the location is forbidden or is not a folder.
# Anything else a backend raises (a refused or dropped connection, a timeout, an S3 503, an I/O
# error or a vanished folder of a network mount) is retried for a while.
_PERMANENT = (PermissionError, NotADirectoryError, IsADirectoryError, FileExistsError)


def _transient(error: BaseException) -> bool:
    """Whether a failed copy may work if tried again (see :data:`_PERMANENT`)."""
    return isinstance(error, (OSError, RuntimeError)) and not isinstance(
        error, (*_PERMANENT, CheckpointTransferError)
    )


class CheckpointStore:
    """``checkpoints_dir``: where each trial's checkpoint folder is read and written.

    For a path, :meth:`local` is that folder and :meth:`pull` / :meth:`push` do nothing. For a
    URL, :meth:`local` is a folder under ``cache`` (default: a new temporary folder) mirroring
    the remote one (see the module docstring). The filesystem is opened on first use, never by
    the constructor.
    """

    def __init__(
        self,
        location: str,
        cache: str | os.PathLike[str] | None = None,
        retry_seconds: float = RETRY_SECONDS,
    ) -> None:
        self.location = str(location)
        self.remote = is_url(self.location)
        # How long a failing copy is retried (with backoff, as a storage call is): a store
        # briefly out of reach (an S3 503, a network blip) costs a pause, not a trial.
        self.retry_seconds = retry_seconds
        if not self.remote:
            self.root = Path(self.location).expanduser()
        elif cache is not None:
            self.root = Path(cache)
        else:
            self.root = Path(tempfile.mkdtemp(prefix="ssl-search-checkpoints-"))
        self._fs: Any = None
        self._fs_root = ""

    def __repr__(self) -> str:
        return f"CheckpointStore({self.where()!r})"

    @property
    def fs(self) -> Any:
        """The fsspec filesystem of the URL, opened on first use."""
        return self._open()[0]

    def _open(self) -> tuple[Any, str]:
        if self._fs is None:
            from fsspec.core import url_to_fs

            self._fs, root = url_to_fs(self.location)
            self._fs_root = str(root).rstrip("/")
        return self._fs, self._fs_root

    def _remote_path(self, relative: PurePosixPath, name: str | None = None) -> str:
        path = f"{self._open()[1]}/{relative.as_posix()}"
        return f"{path}/{name}" if name else path

    def where(self, relative: str | os.PathLike[str] | None = None, name: str | None = None) -> str:
        """The folder (or its file ``name``) as a user would find it: URL (password masked) or path."""
        if not self.remote:
            path = self.root if relative is None else self.root / _relative(relative)
            return str(path / name) if name else str(path)
        text = redact_location(self.location).rstrip("/")
        if relative is not None:
            text += f"/{_relative(relative).as_posix()}"
        return f"{text}/{name}" if name else text

    def local(self, relative: str | os.PathLike[str]) -> Path:
        """The local folder a trial trains in: the folder itself, or its cached mirror."""
        return self.root / _relative(relative)

    # ---- copies (URLs only) ---------------------------------------------------------------

    def pull(self, relative: str | os.PathLike[str]) -> list[Path]:
        """Download the folder's files that are new or changed remotely; the files fetched.

        A folder the store does not have yet is no error (nothing is fetched, nothing made).
        """
        if not self.remote:
            return []
        rel = _relative(relative)
        return self._retrying("cannot download", rel, None, lambda: self._pull_once(rel))

    def _pull_once(self, rel: PurePosixPath) -> list[Path]:
        """One attempt of pull(): each step may be repeated."""
        remote_dir = self._remote_path(rel)  # opens the filesystem: may connect, and fail
        self.fs.invalidate_cache(remote_dir)
        try:
            entries = self.fs.ls(remote_dir, detail=True)
        except FileNotFoundError:
            entries = []
        files = [PurePosixPath(str(e["name"])).name for e in entries if e.get("type") == "file"]
        # not a temporary upload in progress (nor a sub-folder)
        remote_names = {name for name in files if not name.startswith(".")}
        self._drop_unshared(self.local(rel), remote_names)
        fetched = []
        for name in sorted(remote_names):
            remote = f"{remote_dir}/{name}"
            key = str(self.fs.ukey(remote))
            target = self.local(rel) / name
            if target.is_file() and self._known(target) == key:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{name}.", suffix=".part")
            os.close(fd)
            try:
                self.fs.get_file(remote, tmp)
                os.replace(tmp, target)
            finally:
                Path(tmp).unlink(missing_ok=True)
            self._remember(target, key)
            fetched.append(target)
        return fetched

    def push(self, path: str | os.PathLike[str]) -> None:
        """Upload one file of the cache (after it is written) to its place under the URL."""
        if not self.remote:
            return
        path = Path(path)
        try:
            rel = _relative(path.parent.relative_to(self.root))
        except ValueError as error:
            raise ValueError(f"{path} is not inside the checkpoint cache {self.root}") from error
        self._marker(path).unlink(missing_ok=True)  # not the store's version until uploaded
        self._retrying("cannot upload", rel, path.name, lambda: self._push_once(rel, path))

    def _push_once(self, rel: PurePosixPath, path: Path) -> None:
        """One attempt of push(): a repeated upload replaces the same file."""
        final = self._remote_path(rel, path.name)  # opens the filesystem: may connect
        fs = self.fs
        if protocol_of(self.location) in OBJECT_STORES:
            fs.put_file(str(path), final)
        else:
            fs.makedirs(self._remote_path(rel), exist_ok=True)
            tmp = self._remote_path(rel, f".{path.name}.{uuid.uuid4().hex[:12]}.upload")
            try:
                fs.put_file(str(path), tmp)
                fs.mv(tmp, final)
            except BaseException:
                with contextlib.suppress(Exception):
                    fs.rm(tmp)
                raise
        fs.invalidate_cache(final)
        self._remember(path, str(fs.ukey(final)))

    def clear(self, relative: str | os.PathLike[str]) -> None:
        """Delete the folder: the local one, and for a URL the remote one as well."""
        rel = _relative(relative)
        if self.local(rel).exists():
            shutil.rmtree(self.local(rel))
        if not self.remote:
            return

        def remove() -> None:
            remote_dir = self._remote_path(rel)
            if self.fs.exists(remote_dir):
                self.fs.rm(remote_dir, recursive=True)

        self._retrying("cannot delete", rel, None, remove)

    def _retrying(
        self, what: str, rel: PurePosixPath, name: str | None, attempt: Callable[[], T]
    ) -> T:
        """``attempt()``, retried with backoff for ``retry_seconds`` while it fails for a reason
        a retry may mend (:func:`_transient`); then, or at once for any other reason, a
        :class:`CheckpointTransferError` naming the URL and the last error."""
        try:
            return retry_call(
                attempt,
                target=self.where(rel, name),
                what=what.removeprefix("cannot "),
                seconds=self.retry_seconds,
                transient=_transient,
            )
        except StorageUnavailableError as failing:  # still failing past the bound
            last = failing.__cause__ or failing
            raise self._transfer_error(what, rel, name, last, failing.seconds) from last
        except (OSError, ValueError, RuntimeError) as error:
            if isinstance(error, CheckpointTransferError):
                raise
            raise self._transfer_error(what, rel, name, error) from error

    # ---- which remote version a cached file is --------------------------------------------

    @staticmethod
    def _marker(path: Path) -> Path:
        return path.with_name(f".{path.name}.ukey")

    @staticmethod
    def _stamp(path: Path) -> str:
        stat = path.stat()
        return f"{stat.st_size}:{stat.st_mtime_ns}"

    def _known(self, path: Path) -> str | None:
        """The remote version cached file ``path`` is; None if unknown or changed here since."""
        try:
            key, _, stamp = self._marker(path).read_text(encoding="utf-8").rpartition("\n")
            return key if key and stamp == self._stamp(path) else None
        except OSError:
            return None

    def _remember(self, path: Path, key: str) -> None:
        marker = self._marker(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{marker.name}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(f"{key}\n{self._stamp(path)}")
        os.replace(tmp, marker)

    def _drop_unshared(self, folder: Path, remote_names: set[str]) -> None:
        """Set aside (as ``<name>.unshared``) the checkpoints of ``folder`` that the store does
        not have: written here and never uploaded, so no other worker could continue from
        them; kept, not deleted, in case the store lost them and this is the only copy."""
        if not folder.is_dir():
            return
        for path in folder.glob("*.pt"):
            if path.name not in remote_names:
                os.replace(path, path.with_name(f"{path.name}.unshared"))
                self._marker(path).unlink(missing_ok=True)

    def _transfer_error(
        self,
        what: str,
        rel: PurePosixPath,
        name: str | None,
        error: BaseException,
        seconds: float | None = None,
    ) -> CheckpointTransferError:
        reason = _backend_reason(self.location, error)
        retried = "" if seconds is None else f" (still failing after {seconds:.0f} s of retries)"
        return CheckpointTransferError(
            f"checkpoints_dir: {what} {self.where(rel, name)}{retried}: "
            f"{type(error).__name__}: {reason}"
        )
