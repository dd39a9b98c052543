"""What the replicas of a deployment share besides the database's keys: the shared keys
(wrapped under the master key), the master key's check value, and enrollments of new
replicas' HSMs.

Rows are created once per database: each is inserted, and a racing insert of the same
name loses (the loser reads the winner's row back), so replicas starting together
agree on one set.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy import exc

from keysvc.store import _as_utc, _database_errors, utcnow
from keysvc.store.schema import enrollments, shared_keys

# Names of the rows of shared_keys.
MASTER = "master"    # no key: the master key's long check value (32 hex digits) only
BINDING = "binding"  # the binding key, wrapped
IMPORT = "import"    # the import private key, wrapped; its public key beside it


@dataclass(frozen=True)
class SharedKeyRow:
    name: str
    wrapped_key: bytes = field(repr=False)
    public_key: bytes = field(repr=False)
    check_value: str
    created_at: datetime


class EnrollmentState(enum.Enum):
    REQUESTED = "REQUESTED"    # the new replica's transport key waits for the master key
    DELIVERED = "DELIVERED"    # the master key is in the row, wrapped to the transport key
    COMPLETED = "COMPLETED"    # the new replica's HSM holds the master key


@dataclass(frozen=True)
class Enrollment:
    enrollment_id: str
    replica_name: str
    # DER SubjectPublicKeyInfo of the new HSM's RSA transport key.
    transport_public_key: bytes = field(repr=False)
    state: EnrollmentState
    requested_at: datetime
    expires_at: datetime
    # The master key under RSA-OAEP to the transport key, once delivered, and the long
    # check value of the key the delivering replica wrapped (a claim: the new replica
    # proves the key against a value its operator brings).
    wrapped_master_key: bytes | None = field(repr=False, default=None)
    master_check_value: str = ""
    delivered_by: str = ""

    def expired(self, now: datetime) -> bool:
        return self.state is not EnrollmentState.COMPLETED and now >= self.expires_at


def _enrollment(row) -> Enrollment:
    return Enrollment(row.enrollment_id, row.replica_name, row.transport_public_key, EnrollmentState(row.state),
                      _as_utc(row.requested_at), _as_utc(row.expires_at), row.wrapped_master_key,
                      row.master_check_value, row.delivered_by)


class SharedKeyStore:
    """The shared_keys and enrollments tables. Thread-safe."""

    def __init__(self, engine: sa.Engine) -> None:
        self._engine = engine

    # -- shared keys ------------------------------------------------------------------

    def get(self, name: str) -> SharedKeyRow | None:
        with _database_errors(), self._engine.connect() as connection:
            row = connection.execute(sa.select(shared_keys).where(shared_keys.c.name == name)).first()
        if row is None:
            return None
        return SharedKeyRow(row.name, row.wrapped_key, row.public_key, row.check_value, _as_utc(row.created_at))

    def insert_or_get(self, name: str, *, wrapped_key: bytes = b"", public_key: bytes = b"",
                      check_value: str = "") -> SharedKeyRow:
        """Inserts the row unless one of that name exists; returns the row that is
        stored (ours, or the one a racing replica inserted first)."""
        try:
            with _database_errors(), self._engine.begin() as connection:
                connection.execute(sa.insert(shared_keys).values(
                    name=name, wrapped_key=wrapped_key, public_key=public_key, check_value=check_value,
                    created_at=utcnow()))
        except exc.IntegrityError:
            pass  # another replica was first: its row stands
        stored = self.get(name)
        assert stored is not None  # rows are never deleted
        return stored

    # -- enrollments ------------------------------------------------------------------

    def insert_enrollment(self, enrollment: Enrollment) -> None:
        with _database_errors(), self._engine.begin() as connection:
            connection.execute(sa.insert(enrollments).values(
                enrollment_id=enrollment.enrollment_id, replica_name=enrollment.replica_name,
                transport_public_key=enrollment.transport_public_key, state=enrollment.state.value,
                requested_at=enrollment.requested_at, expires_at=enrollment.expires_at))

    def enrollment(self, enrollment_id: str) -> Enrollment | None:
        with _database_errors(), self._engine.connect() as connection:
            row = connection.execute(
                sa.select(enrollments).where(enrollments.c.enrollment_id == enrollment_id)).first()
        return None if row is None else _enrollment(row)

    def enrollments(self) -> list[Enrollment]:
        with _database_errors(), self._engine.connect() as connection:
            rows = connection.execute(sa.select(enrollments).order_by(enrollments.c.requested_at)).all()
        return [_enrollment(row) for row in rows]

    def mark_delivered(self, enrollment_id: str, wrapped_master_key: bytes, master_check_value: str,
                       delivered_by: str, now: datetime) -> bool:
        """Stores the delivered master key if the enrollment is still REQUESTED and not
        expired (one conditional update: delivered at most once); returns whether it was."""
        with _database_errors(), self._engine.begin() as connection:
            return connection.execute(
                sa.update(enrollments)
                .where(enrollments.c.enrollment_id == enrollment_id,
                       enrollments.c.state == EnrollmentState.REQUESTED.value, enrollments.c.expires_at > now)
                .values(state=EnrollmentState.DELIVERED.value, wrapped_master_key=wrapped_master_key,
                        master_check_value=master_check_value, delivered_by=delivered_by)
            ).rowcount == 1

    def mark_completed(self, enrollment_id: str) -> bool:
        """DELIVERED → COMPLETED; the wrapped master key is erased from the row (the
        transport key that opens it is destroyed anyway). Returns whether it changed."""
        with _database_errors(), self._engine.begin() as connection:
            return connection.execute(
                sa.update(enrollments)
                .where(enrollments.c.enrollment_id == enrollment_id,
                       enrollments.c.state == EnrollmentState.DELIVERED.value)
                .values(state=EnrollmentState.COMPLETED.value, wrapped_master_key=None)
            ).rowcount == 1
