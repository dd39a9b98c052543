"""Dual control (PCI DSS 3.6.1.2, 3.7.6): operations that need two distinct key-admins.

The first admin's call does not run: it becomes a pending operation with an id and an
expiry. A second, different admin approves it (then it runs) or rejects it. Nobody
approves their own request; an expired operation can no longer be approved. The
request is kept as the caller sent it (its serialised message), so what runs is
exactly what was asked for, and it is claimed in one conditional update, so it runs
at most once even when two admins approve at the same time.
"""

from __future__ import annotations

import contextvars
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import sqlalchemy as sa

from keysvc.errors import FailedPrecondition, NotFound, PermissionDenied
from keysvc.store import _as_utc, _database_errors
from keysvc.store.schema import pending_operations

DEFAULT_TTL = timedelta(hours=1)
PENDING, APPROVED, REJECTED = "PENDING", "APPROVED", "REJECTED"


@dataclass(frozen=True)
class PendingOperation:
    operation_id: str
    method: str
    request: bytes = field(repr=False)
    target: str
    requested_by: str
    created_at: datetime
    expires_at: datetime
    state: str
    decided_by: str = ""

    def expired(self, now: datetime) -> bool:
        return self.state == PENDING and now >= self.expires_at


# The approved operation running now in this call (set by the approval servicer), so
# that what it does can name who asked for it as well as who approved it.
current_approval: contextvars.ContextVar[PendingOperation | None] = contextvars.ContextVar(
    "keysvc_current_approval", default=None)


def _from_row(row) -> PendingOperation:
    return PendingOperation(row.operation_id, row.method, row.request, row.target, row.requested_by,
                            _as_utc(row.created_at), _as_utc(row.expires_at), row.state, row.decided_by)


class Approvals:
    """Pending operations in the database. Thread-safe; shared by workers and replicas."""

    def __init__(self, engine: sa.Engine, *, ttl: timedelta = DEFAULT_TTL) -> None:
        self._engine = engine
        self.ttl = ttl

    def propose(self, method: str, request: bytes, target: str, requested_by: str) -> PendingOperation:
        now = datetime.now(timezone.utc)
        operation = PendingOperation(secrets.token_hex(8), method, request, target, requested_by, now,
                                     now + self.ttl, PENDING)
        with _database_errors(), self._engine.begin() as connection:
            connection.execute(sa.insert(pending_operations).values(
                operation_id=operation.operation_id, method=method, request=request, target=target,
                requested_by=requested_by, created_at=now, expires_at=operation.expires_at, state=PENDING))
        return operation

    def get(self, operation_id: str) -> PendingOperation:
        with _database_errors(), self._engine.connect() as connection:
            row = connection.execute(sa.select(pending_operations)
                                     .where(pending_operations.c.operation_id == operation_id)).first()
        if row is None:
            raise NotFound(f"no pending operation {operation_id!r}")
        return _from_row(row)

    def pending(self) -> list[PendingOperation]:
        now = datetime.now(timezone.utc)
        with _database_errors(), self._engine.connect() as connection:
            rows = connection.execute(sa.select(pending_operations)
                                      .where(pending_operations.c.state == PENDING)
                                      .order_by(pending_operations.c.created_at)).all()
        return [operation for operation in map(_from_row, rows) if not operation.expired(now)]

    def decide(self, operation_id: str, decided_by: str, approve: bool) -> PendingOperation:
        """Claims a pending operation for `decided_by` (approving or rejecting it) and
        returns it. Raises NotFound, PermissionDenied (their own request),
        FailedPrecondition (expired, or already decided)."""
        operation = self.get(operation_id)
        if operation.requested_by == decided_by:
            raise PermissionDenied("dual control: a second key-admin must decide, not the one who asked")
        now = datetime.now(timezone.utc)
        if operation.expired(now):
            raise FailedPrecondition(f"pending operation {operation_id!r} expired at "
                                     f"{operation.expires_at.isoformat(timespec='seconds')}; ask again")
        state = APPROVED if approve else REJECTED
        with _database_errors(), self._engine.begin() as connection:
            claimed = connection.execute(
                sa.update(pending_operations)
                .where(pending_operations.c.operation_id == operation_id, pending_operations.c.state == PENDING,
                       pending_operations.c.expires_at > now)
                .values(state=state, decided_by=decided_by)
            ).rowcount
        if claimed != 1:
            raise FailedPrecondition(f"pending operation {operation_id!r} was already decided")
        return PendingOperation(**{**operation.__dict__, "state": state, "decided_by": decided_by})
