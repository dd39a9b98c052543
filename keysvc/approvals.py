"""Dual control (PCI DSS 3.6.1.2, 3.7.6): operations that need two distinct key-admins.

The first admin's call does not run: it becomes a pending operation with an id and an
expiry. A second, different admin approves it (then it runs) or rejects it. Nobody
approves their own request; an expired operation can no longer be approved. The
request is kept as the caller sent it (its serialised message), so what runs is
exactly what was asked for, and it is claimed in one conditional update, so it runs
at most once even when two admins approve at the same time.

Each pending operation carries a tag made by the HSM's binding key over its id, method,
request digest, target, requester and times: whoever can write the database cannot
point a pending request elsewhere (another enrollment's transport key, another policy,
another imported secret) and let one unwitting approval run it. An operation whose tag
fails, or whose target is not the one its request describes, is never listed as
approvable nor run: approving it is refused (PENDING_OPERATION_TAMPERED) and recorded
in the audit trail.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import logging
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Callable

import sqlalchemy as sa

import hsm
from keysvc.audit import AuditTrail
from keysvc.authz import DUAL_CONTROL_METHODS
from keysvc.errors import FailedPrecondition, KeysvcError, NotFound, PermissionDenied
from keysvc.keyring import hsm_errors
from keysvc.logs import current_request_id
from keysvc.store import _as_utc, _database_errors
from keysvc.store.schema import pending_operations

log = logging.getLogger("keysvc.approvals")

DEFAULT_TTL = timedelta(hours=1)
PENDING, APPROVED, REJECTED = "PENDING", "APPROVED", "REJECTED"
TAMPERED = "PENDING_OPERATION_TAMPERED"
_BINDING_PREFIX = b"keysvc-pending-operation-v1"
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


class PendingOperationTampered(FailedPrecondition):
    """A pending operation changed outside keysvc: it is refused, never run."""

    reason = TAMPERED


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
    tag: bytes = field(default=b"", repr=False)

    def expired(self, now: datetime) -> bool:
        return self.state == PENDING and now >= self.expires_at


# The approved operation running now in this call (set by the approval servicer), so
# that what it does can name who asked for it as well as who approved it.
current_approval: contextvars.ContextVar[PendingOperation | None] = contextvars.ContextVar(
    "keysvc_current_approval", default=None)


# The target a pending operation's request describes (as the proposal computed it), or
# None when this server cannot read that kind of request.
TargetOf = Callable[[PendingOperation], "str | None"]


def _from_row(row) -> PendingOperation:
    return PendingOperation(row.operation_id, row.method, row.request, row.target, row.requested_by,
                            _as_utc(row.created_at), _as_utc(row.expires_at), row.state, row.decided_by,
                            row.tag or b"")


def _microseconds(moment: datetime) -> bytes:
    return str((moment - _EPOCH) // timedelta(microseconds=1)).encode()


def _binding_message(operation: PendingOperation) -> bytes:
    parts = [operation.operation_id.encode(), operation.method.encode(), hashlib.sha256(operation.request).digest(),
             operation.target.encode("utf-8", "surrogatepass"), operation.requested_by.encode("utf-8", "surrogatepass"),
             _microseconds(operation.created_at), _microseconds(operation.expires_at)]
    return _BINDING_PREFIX + b"".join(len(part).to_bytes(4, "big") + part for part in parts)


class Approvals:
    """Pending operations in the database, each tagged with `token`'s binding key; a
    refused (tampered) one is recorded in `audit` when given. Thread-safe; shared by
    workers and replicas."""

    def __init__(self, engine: sa.Engine, token: hsm.Hsm, *, ttl: timedelta = DEFAULT_TTL,
                 audit: AuditTrail | None = None, methods: frozenset[str] = DUAL_CONTROL_METHODS) -> None:
        self._engine = engine
        self._hsm = token
        self._audit = audit
        self.ttl = ttl
        # The gRPC methods that wait for a second key-admin (keysvc.authz.dual_control_methods).
        self.methods = methods

    def requires(self, method: str) -> bool:
        """Whether `method` (a full gRPC method name) needs a second key-admin's approval."""
        return method in self.methods

    def propose(self, method: str, request: bytes, target: str, requested_by: str) -> PendingOperation:
        """Keeps `request` as a new pending operation, tagged. Raises Unavailable."""
        now = datetime.now(timezone.utc)
        operation = PendingOperation(secrets.token_hex(8), method, request, target, requested_by, now,
                                     now + self.ttl, PENDING)
        with hsm_errors():
            tag = self._hsm.bind(_binding_message(operation))
        with _database_errors(), self._engine.begin() as connection:
            connection.execute(sa.insert(pending_operations).values(
                operation_id=operation.operation_id, method=method, request=request, target=target,
                requested_by=requested_by, created_at=now, expires_at=operation.expires_at, state=PENDING,
                tag=tag))
        return PendingOperation(**{**operation.__dict__, "tag": tag})

    def problem_of(self, operation: PendingOperation, target_of: TargetOf | None = None) -> str:
        """Why `operation` is not the one keysvc stored ("" when it is): a tag that does
        not match its fields, or a target that is not the one its request describes."""
        with hsm_errors():
            expected = self._hsm.bind(_binding_message(operation))
        if not hmac.compare_digest(expected, operation.tag):
            return "its integrity check failed (changed outside keysvc)"
        described = target_of(operation) if target_of is not None else None
        if described is not None and described != operation.target:
            return "its target is not the one its request describes"
        return ""

    def _refuse_tampered(self, operation: PendingOperation, decided_by: str, problem: str) -> None:
        log.error("pending operation %s (%s) refused: %s", operation.operation_id, operation.method, problem)
        if self._audit is not None:
            try:
                self._audit.record(identity=decided_by, operation=operation.method,
                                   target=f"{operation.target} op={operation.operation_id}"[:512], outcome=TAMPERED,
                                   request_id=current_request_id.get() or "")
            except KeysvcError:
                log.error("the refusal of pending operation %s could not be recorded in the audit trail",
                          operation.operation_id)
        raise PendingOperationTampered(
            f"pending operation {operation.operation_id!r} is refused and was not run: {problem}; ask again",
            metadata={"operation_id": operation.operation_id})

    def get(self, operation_id: str) -> PendingOperation:
        with _database_errors(), self._engine.connect() as connection:
            row = connection.execute(sa.select(pending_operations)
                                     .where(pending_operations.c.operation_id == operation_id)).first()
        if row is None:
            raise NotFound(f"no pending operation {operation_id!r}")
        return _from_row(row)

    def pending(self, target_of: TargetOf | None = None) -> list[PendingOperation]:
        """The operations still approvable; one that fails its checks (problem_of) is
        left out and logged."""
        now = datetime.now(timezone.utc)
        with _database_errors(), self._engine.connect() as connection:
            rows = connection.execute(sa.select(pending_operations)
                                      .where(pending_operations.c.state == PENDING)
                                      .order_by(pending_operations.c.created_at)).all()
        approvable = []
        for operation in map(_from_row, rows):
            if operation.expired(now):
                continue
            problem = self.problem_of(operation, target_of)
            if problem:
                log.error("pending operation %s (%s) not listed: %s", operation.operation_id, operation.method,
                          problem)
                continue
            approvable.append(operation)
        return approvable

    def decide(self, operation_id: str, decided_by: str, approve: bool,
               target_of: TargetOf | None = None) -> PendingOperation:
        """Claims a pending operation for `decided_by` (approving or rejecting it) and
        returns it as it was checked: the request to run is the one its tag covers.
        Raises NotFound, PermissionDenied (their own request), FailedPrecondition
        (expired, or already decided), PendingOperationTampered (approving one that
        fails problem_of: recorded in the audit trail, and left pending)."""
        operation = self.get(operation_id)
        if approve:  # before anything else read from the row is believed
            problem = self.problem_of(operation, target_of)
            if problem:
                self._refuse_tampered(operation, decided_by, problem)
        if operation.requested_by == decided_by:
            raise PermissionDenied("dual control: a second key-admin must decide, not the one who asked")
        now = datetime.now(timezone.utc)
        if operation.expired(now):
            raise FailedPrecondition(f"pending operation {operation_id!r} expired at "
                                     f"{operation.expires_at.isoformat(timespec='seconds')}; ask again")
        state = APPROVED if approve else REJECTED
        with _database_errors(), self._engine.begin() as connection:
            # The tag goes with the decision: a decided row set back to PENDING in the
            # database is never approvable again (unless its tag was copied beforehand).
            claimed = connection.execute(
                sa.update(pending_operations)
                .where(pending_operations.c.operation_id == operation_id, pending_operations.c.state == PENDING,
                       pending_operations.c.expires_at > now)
                .values(state=state, decided_by=decided_by, tag=None)
            ).rowcount
        if claimed != 1:
            raise FailedPrecondition(f"pending operation {operation_id!r} was already decided")
        return PendingOperation(**{**operation.__dict__, "state": state, "decided_by": decided_by})
