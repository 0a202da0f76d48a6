"""The storage the search layer uses, as the layers above may see it.

``storage/`` is used by the search layer only; the CLI and the reports reach a database
through these names, so a password never leaves :func:`redact` unmasked.
"""

from __future__ import annotations

from storage.urls import StorageError, check_url, open_storage, redact

__all__ = ["StorageError", "check_url", "open_storage", "redact"]
