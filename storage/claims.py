"""Exactly-once coordination through the study database itself.

A claim is a row with a unique key in a small table beside Optuna's: inserting it succeeds for
exactly one process, on SQLite and PostgreSQL alike, however many workers race. The stages use
claims to enqueue promotions once, to hand each waiting trial to one worker, and to hand out the
screen's trial slots, so no head process is needed.
"""

from __future__ import annotations

import os
import random
import socket
import time

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

_METADATA = sa.MetaData()
CLAIMS = sa.Table(
    "ssl_search_claims",
    _METADATA,
    sa.Column("key", sa.String(512), primary_key=True),
    sa.Column("owner", sa.String(256), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
)


def default_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Claims:
    """Unique keys taken at most once, stored in the study database."""

    def __init__(self, engine: sa.Engine, owner: str | None = None) -> None:
        self.engine = engine
        self.owner = owner or default_owner()
        for attempt in range(10):
            try:
                _METADATA.create_all(engine, checkfirst=True)
                break
            except (IntegrityError, OperationalError, ProgrammingError):
                # Another process created the table between our check and our CREATE.
                if attempt == 9:
                    raise
                time.sleep(0.1 + random.random() * 0.3)

    def take(self, key: str) -> bool:
        """True for the one caller that inserts ``key`` first; False for everyone after."""
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    CLAIMS.insert().values(key=key, owner=self.owner, created_at=time.time())
                )
            return True
        except IntegrityError:
            return False

    def release(self, key: str) -> None:
        """Give ``key`` back, e.g. when the work it guarded could not be done."""
        with self.engine.begin() as conn:
            conn.execute(CLAIMS.delete().where(CLAIMS.c.key == key))

    def release_all(self, prefix: str) -> int:
        """Give back every key that starts with ``prefix``; how many there were."""
        with self.engine.begin() as conn:
            return conn.execute(CLAIMS.delete().where(CLAIMS.c.key.startswith(prefix))).rowcount

    def taken(self, prefix: str) -> list[str]:
        """Keys already taken that start with ``prefix``."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(CLAIMS.c.key).where(CLAIMS.c.key.startswith(prefix)))
            return [r[0] for r in rows]
