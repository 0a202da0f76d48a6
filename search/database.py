"""The storage the search layer uses, as the layers above may see it.

``storage/`` is used by the search layer only; the CLI and the reports reach a database
through these names, so a password never leaves :func:`redact` unmasked.
"""

from __future__ import annotations

from storage.checkpoint_store import CheckpointTransferError
from storage.urls import (
    MASK,
    StorageError,
    StorageUnavailableError,
    check_url,
    folder_problem,
    has_secret,
    is_secret_query_key,
    mask_secrets,
    open_storage,
    redact,
    sqlite_file,
)

# How a launcher hands its workers the storage URL: never on a command line, where any user
# of the machine can read it (/proc/PID/cmdline), nor in a file.
WORKER_STORAGE_ENV = "SSL_SEARCH_WORKER_STORAGE"

# Where a user puts a storage URL that holds a password, instead of on a command line:
# ``python -m search.dashboard`` reads it when no ``storage=`` is given, and every command
# takes ``storage='${oc.env:SSL_SEARCH_STORAGE}'`` (resolved inside the process).
STORAGE_ENV = "SSL_SEARCH_STORAGE"

__all__ = [
    "CheckpointTransferError",
    "MASK",
    "STORAGE_ENV",
    "WORKER_STORAGE_ENV",
    "StorageError",
    "StorageUnavailableError",
    "check_url",
    "folder_problem",
    "has_secret",
    "is_secret_query_key",
    "mask_secrets",
    "open_storage",
    "redact",
    "sqlite_file",
]
