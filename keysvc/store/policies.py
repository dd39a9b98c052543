"""Approved role policies in SQL: one row per revision, the newest in force."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Callable

import sqlalchemy as sa
from sqlalchemy import exc

from keysvc.errors import FailedPrecondition
from keysvc.store import _as_utc, _database_errors
from keysvc.store.schema import policies


@dataclass(frozen=True)
class PolicyRow:
    revision: int
    document: str
    sha256: str
    proposed_by: str
    approved_by: str
    approved_at: datetime
    tag: bytes


class PolicyStore:
    def __init__(self, engine: sa.Engine) -> None:
        self._engine = engine

    def latest_revision(self) -> int:
        """The newest revision, 0 when none: one cheap query, for every process's poll."""
        with _database_errors(), self._engine.connect() as connection:
            return connection.execute(sa.select(sa.func.max(policies.c.revision))).scalar_one() or 0

    def load(self, revision: int) -> PolicyRow | None:
        with _database_errors(), self._engine.connect() as connection:
            row = connection.execute(sa.select(policies).where(policies.c.revision == revision)).first()
        if row is None:
            return None
        return PolicyRow(row.revision, row.document, row.sha256, row.proposed_by, row.approved_by,
                         _as_utc(row.approved_at), row.tag)

    def add(self, build: Callable[[int], PolicyRow]) -> PolicyRow:
        """Stores build(next revision) as the newest policy. Raises FailedPrecondition when another
        policy took that revision meanwhile, Unavailable when the database is away."""
        try:
            with _database_errors(), self._engine.begin() as connection:
                latest = connection.execute(sa.select(sa.func.max(policies.c.revision))).scalar_one() or 0
                row = build(latest + 1)
                connection.execute(sa.insert(policies).values(**row.__dict__))
        except exc.IntegrityError:
            raise FailedPrecondition("another policy was approved at the same time: propose again") from None
        return row
