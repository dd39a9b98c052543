"""Replicas in SQL: every serving process's registration and heartbeat, the log of key
changes they follow (`key_changes`, appended by KeyStore), and the announcements of
those changes (PostgreSQL NOTIFY, heard by a ChangeListener).

Liveness is judged by the database's clock (PostgreSQL's now()), never a replica's:
replicas on other hosts may disagree about the time, the database does not. SQLite
serves one machine, whose clock is the database's.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Callable

import sqlalchemy as sa

from keysvc.store import KEY_CHANGES_CHANNEL, _as_utc, _database_errors
from keysvc.store.schema import key_changes, keys, replicas

log = logging.getLogger("keysvc.store.replicas")

# The application_name of listening connections (pg_stat_activity shows them by it).
LISTENER_APPLICATION_NAME = "keysvc-replica-listener"
# A lost listening connection is reopened after this, doubled at each failure up to the maximum.
LISTEN_FIRST_BACKOFF = 0.1
LISTEN_MAX_BACKOFF = 5.0


@dataclass(frozen=True)
class ReplicaRecord:
    """One registered serving process, and whether its heartbeat is recent enough."""

    replica_id: str
    address: str
    started_at: datetime
    heartbeat_at: datetime
    seen_change: int
    live: bool


@dataclass(frozen=True)
class KeyChange:
    """One entry of the key change log."""

    seq: int
    key_id: str
    revision: int


@dataclass(frozen=True)
class PendingPromotion:
    """A key whose rotation waits: its pending version and the newest change of the key."""

    key_id: str
    pending_primary: int
    last_change: int


class ReplicaStore:
    """The replicas table and the key change log, over the KeyStore's engine. Thread-safe."""

    def __init__(self, engine: sa.Engine) -> None:
        self._engine = engine
        self._postgresql = engine.dialect.name == "postgresql"

    def _now(self):
        """The database's time, as an SQL expression (Python's, given as a value, on SQLite)."""
        return sa.func.now() if self._postgresql else datetime.now(timezone.utc)

    def _live_after(self, timeout: float):
        """SQL for the oldest heartbeat that still counts as live."""
        if self._postgresql:
            return sa.func.now() - sa.literal(timedelta(seconds=timeout), sa.Interval())
        return datetime.now(timezone.utc) - timedelta(seconds=timeout)

    # -- registration ---------------------------------------------------------------------

    def register(self, replica_id: str, address: str, seen_change: int) -> None:
        """Adds (or renews, after a restart under the same id) this process's row."""
        with _database_errors(), self._engine.begin() as connection:
            connection.execute(sa.delete(replicas).where(replicas.c.replica_id == replica_id))
            connection.execute(sa.insert(replicas).values(
                replica_id=replica_id, address=address, started_at=self._now(), heartbeat_at=self._now(),
                seen_change=seen_change))

    def heartbeat(self, replica_id: str, seen_change: int) -> bool:
        """Says this process is alive and has applied every change up to `seen_change`.
        False when its row is gone (pruned while this process was cut off): register again."""
        with _database_errors(), self._engine.begin() as connection:
            updated = connection.execute(
                sa.update(replicas).where(replicas.c.replica_id == replica_id)
                .values(heartbeat_at=self._now(), seen_change=seen_change))
        return updated.rowcount == 1

    def deregister(self, replica_id: str) -> None:
        with _database_errors(), self._engine.begin() as connection:
            connection.execute(sa.delete(replicas).where(replicas.c.replica_id == replica_id))

    def list_replicas(self, timeout: float) -> list[ReplicaRecord]:
        """Every registered process, live or not, by id."""
        live = (replicas.c.heartbeat_at > self._live_after(timeout)).label("live")
        with _database_errors(), self._engine.connect() as connection:
            rows = connection.execute(sa.select(replicas, live).order_by(replicas.c.replica_id)).all()
        return [ReplicaRecord(row.replica_id, row.address, _as_utc(row.started_at), _as_utc(row.heartbeat_at),
                              row.seen_change, bool(row.live)) for row in rows]

    def count_live(self, timeout: float) -> int:
        """How many processes heartbeat within the last `timeout` seconds."""
        with _database_errors(), self._engine.connect() as connection:
            return connection.execute(
                sa.select(sa.func.count()).select_from(replicas)
                .where(replicas.c.heartbeat_at > self._live_after(timeout))).scalar_one()

    def prune_replicas(self, dead_for: float) -> int:
        """Deletes the rows of processes silent for `dead_for` seconds (killed, not stopped)."""
        with _database_errors(), self._engine.begin() as connection:
            return connection.execute(
                sa.delete(replicas).where(replicas.c.heartbeat_at <= self._live_after(dead_for))).rowcount

    # -- the change log -----------------------------------------------------------------------

    def latest_change(self) -> int:
        """The newest change's number (0 when the log is empty)."""
        with _database_errors(), self._engine.connect() as connection:
            return connection.execute(sa.select(sa.func.coalesce(sa.func.max(key_changes.c.seq), 0))).scalar_one()

    def changes_after(self, seq: int, limit: int = 1000) -> list[KeyChange]:
        """Up to `limit` changes numbered after `seq`, in order."""
        with _database_errors(), self._engine.connect() as connection:
            rows = connection.execute(
                sa.select(key_changes.c.seq, key_changes.c.key_id, key_changes.c.revision)
                .where(key_changes.c.seq > seq).order_by(key_changes.c.seq).limit(limit)).all()
        return [KeyChange(row.seq, row.key_id, row.revision) for row in rows]

    def prune_changes(self, older_than: float) -> int:
        """Deletes changes older than `older_than` seconds, but never the newest one."""
        cutoff = datetime.now(timezone.utc) - timedelta(seconds=older_than)
        with _database_errors(), self._engine.begin() as connection:
            newest = connection.execute(sa.select(sa.func.max(key_changes.c.seq))).scalar_one_or_none()
            if newest is None:
                return 0
            return connection.execute(sa.delete(key_changes).where(
                key_changes.c.changed_at < cutoff, key_changes.c.seq < newest)).rowcount

    # -- safe rotation --------------------------------------------------------------------------

    def _last_change_of(self, key_id_column):
        return (sa.select(sa.func.coalesce(sa.func.max(key_changes.c.seq), 0))
                .where(key_changes.c.key_id == key_id_column).scalar_subquery())

    def pending_promotions(self, key_id: str | None = None) -> list[PendingPromotion]:
        """Keys whose rotation waits (only `key_id` when given), with their newest change."""
        query = (sa.select(keys.c.key_id, keys.c.pending_primary, self._last_change_of(keys.c.key_id).label("last"))
                 .where(keys.c.pending_primary.is_not(None)))
        if key_id is not None:
            query = query.where(keys.c.key_id == key_id)
        with _database_errors(), self._engine.connect() as connection:
            rows = connection.execute(query).all()
        return [PendingPromotion(row.key_id, row.pending_primary, row.last) for row in rows]

    def least_seen_change(self, timeout: float, excluding: str = "") -> int | None:
        """The smallest `seen_change` among live processes other than `excluding`; None
        when there is none (a process alone waits for nobody)."""
        with _database_errors(), self._engine.connect() as connection:
            return connection.execute(
                sa.select(sa.func.min(replicas.c.seen_change))
                .where(replicas.c.heartbeat_at > self._live_after(timeout), replicas.c.replica_id != excluding)
            ).scalar_one_or_none()


class ChangeListener:
    """Hears key changes announced on PostgreSQL (LISTEN keysvc_key_changes, on a
    connection of its own in autocommit). A dropped connection is reopened with
    exponential backoff; meanwhile a wait just waits, so a follower that reads the
    change log after each wait misses nothing, only hears of it later. One thread."""

    def __init__(self, database_url: str, *, stop: threading.Event | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """`stop`, when set, ends a wait made without a connection at once."""
        url = sa.engine.make_url(database_url).set(drivername="postgresql")
        self._conninfo = url.render_as_string(hide_password=False)
        self._stop = stop or threading.Event()
        self._clock = clock
        self._connection = None
        self._backoff = LISTEN_FIRST_BACKOFF
        self._retry_at = 0.0

    def wait(self, timeout: float) -> bool:
        """Waits up to `timeout` seconds for a key change to be announced. True when one
        was; False when the time passed, the connection failed (it is reopened by a
        later wait) or there was none to listen on. Never raises."""
        import psycopg

        if self._connection is None and self._clock() >= self._retry_at:
            self._connect()
        if self._connection is None:
            self._stop.wait(timeout)
            return False
        try:
            for _notification in self._connection.notifies(timeout=timeout, stop_after=1):
                return True
        except psycopg.Error as error:
            self.close()
            self._failed(f"the key change listener lost its connection ({type(error).__name__}); reconnecting")
        return False

    def close(self) -> None:
        """Closes the connection (a later wait opens another)."""
        connection, self._connection = self._connection, None
        if connection is not None:
            try:
                connection.close()
            except Exception:  # noqa: BLE001 - closing a broken connection
                pass

    def _connect(self) -> None:
        import psycopg

        try:
            connection = psycopg.connect(
                self._conninfo, autocommit=True, connect_timeout=3, application_name=LISTENER_APPLICATION_NAME,
                # A server that vanishes without closing the connection is noticed in ~10 s.
                keepalives=1, keepalives_idle=4, keepalives_interval=2, keepalives_count=3)
            connection.execute(f"LISTEN {KEY_CHANGES_CHANNEL}")
        except psycopg.Error as error:
            self._failed(f"cannot listen for key changes ({type(error).__name__}); polling meanwhile")
            return
        self._connection = connection
        self._backoff = LISTEN_FIRST_BACKOFF

    def _failed(self, message: str) -> None:
        # Said once per outage, not at every attempt.
        if self._backoff == LISTEN_FIRST_BACKOFF:
            log.warning("%s", message)
        self._retry_at = self._clock() + self._backoff * (0.5 + random.random())
        self._backoff = min(self._backoff * 2, LISTEN_MAX_BACKOFF)
