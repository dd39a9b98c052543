"""The audit trail in SQL: records appended one at a time in sequence, checkpoints,
and the wrapped key the checkpoint signing key is derived from.

Appends are serialised across threads, worker processes and replicas (SQLite's write
lock, a PostgreSQL advisory lock), so each record's sequence number and the hash of
the record before it are read and written in one transaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import sqlalchemy as sa
from sqlalchemy import exc

from keysvc.errors import Unavailable
from keysvc.store import _database_errors
from keysvc.store.schema import audit_checkpoints, audit_records, audit_signing_keys

# Any constant, other than the migration lock's: serialises appends on PostgreSQL.
_APPEND_LOCK_ID = 0x61756474


@dataclass(frozen=True)
class AuditRow:
    seq: int
    recorded_at: str
    identity: str
    operation: str
    target: str
    outcome: str
    request_id: str
    prev_hash: bytes
    record_hash: bytes


@dataclass(frozen=True)
class CheckpointRow:
    seq: int
    record_hash: bytes
    signature: bytes


def _row(row) -> AuditRow:
    return AuditRow(row.seq, row.recorded_at, row.identity, row.operation, row.target, row.outcome,
                    row.request_id, row.prev_hash, row.record_hash)


class AuditStore:
    def __init__(self, engine: sa.Engine) -> None:
        self._engine = engine

    def append(self, build: Callable[[int, bytes], AuditRow], sign: Callable[[AuditRow], bytes | None]) -> AuditRow:
        """Appends build(next seq, hash of the last record) and, when sign(record) gives a
        signature, its checkpoint, in one transaction. Raises Unavailable, whatever the
        database's trouble: an operation whose record cannot be written must not run."""
        try:
            return self._append(build, sign)
        except exc.SQLAlchemyError as error:
            raise Unavailable(f"the database refused the audit record ({type(error).__name__})") from None

    def _append(self, build, sign) -> AuditRow:
        with _database_errors(), self._engine.begin() as connection:
            if self._engine.dialect.name == "postgresql":
                connection.execute(sa.text("SELECT pg_advisory_xact_lock(:id)"), {"id": _APPEND_LOCK_ID})
            else:
                connection.exec_driver_sql("BEGIN IMMEDIATE")
            last = connection.execute(
                sa.select(audit_records.c.seq, audit_records.c.record_hash)
                .order_by(audit_records.c.seq.desc()).limit(1)
            ).first()
            record = build((last.seq + 1) if last else 1, last.record_hash if last else b"")
            connection.execute(sa.insert(audit_records).values(**record.__dict__))
            signature = sign(record)
            if signature is not None:
                connection.execute(sa.insert(audit_checkpoints).values(
                    seq=record.seq, record_hash=record.record_hash, signature=signature))
        return record

    def records(self, *, after_seq: int = 0, limit: int | None = None, identity: str = "",
                operation: str = "") -> list[AuditRow]:
        query = sa.select(audit_records).where(audit_records.c.seq > after_seq)
        if identity:
            query = query.where(audit_records.c.identity == identity)
        if operation:
            query = query.where(audit_records.c.operation == operation)
        query = query.order_by(audit_records.c.seq)
        if limit is not None:
            query = query.limit(limit)
        with _database_errors(), self._engine.connect() as connection:
            return [_row(row) for row in connection.execute(query)]

    def iter_records(self, page: int = 1000) -> Iterator[AuditRow]:
        """Every record in sequence order, read page by page."""
        after = 0
        while True:
            rows = self.records(after_seq=after, limit=page)
            yield from rows
            if len(rows) < page:
                return
            after = rows[-1].seq

    def checkpoints(self) -> list[CheckpointRow]:
        with _database_errors(), self._engine.connect() as connection:
            return [CheckpointRow(row.seq, row.record_hash, row.signature)
                    for row in connection.execute(sa.select(audit_checkpoints).order_by(audit_checkpoints.c.seq))]

    def signing_key(self) -> tuple[bytes, bytes] | None:
        """(wrapped seed key, binding tag) of the checkpoint signing key, or None."""
        with _database_errors(), self._engine.connect() as connection:
            row = connection.execute(sa.select(audit_signing_keys).where(audit_signing_keys.c.key_id == 1)).first()
        return (row.wrapped_seed_key, row.binding_tag) if row else None

    def insert_signing_key(self, wrapped_seed_key: bytes, binding_tag: bytes) -> None:
        """Stores the signing key unless another process stored one first (then keeps that)."""
        try:
            with _database_errors(), self._engine.begin() as connection:
                connection.execute(sa.insert(audit_signing_keys).values(
                    key_id=1, wrapped_seed_key=wrapped_seed_key, binding_tag=binding_tag))
        except exc.IntegrityError:
            pass
