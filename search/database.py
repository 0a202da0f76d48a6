"""The storage the search layer uses, as the layers above may see it.

``storage/`` is used by the search layer only; the CLI and the reports reach a database
through these names, so a password never leaves :func:`redact` unmasked.
"""

from __future__ import annotations

from storage.urls import StorageError, StorageUnavailableError, check_url, open_storage, redact

# How a launcher hands its workers the storage URL: never on a command line, where any user
# of the machine can read it (/proc/PID/cmdline), nor in a file.
WORKER_STORAGE_ENV = "SSL_SEARCH_WORKER_STORAGE"

__all__ = [
    "WORKER_STORAGE_ENV",
    "StorageError",
    "StorageUnavailableError",
    "check_url",
    "open_storage",
    "redact",
]
