"""Key metadata and wrapped key material in SQL: SQLite by default, PostgreSQL for replicas.

The store holds only what may be stored: metadata, check values and keys wrapped
under the HSM master key. Every change to a key goes through `update_key`, an
optimistic transaction on the key's revision, so concurrent writers (threads,
worker processes, replicas) never lose an update or leave half of one.

Every change also appends a row to `key_changes` in its transaction (and, on
PostgreSQL, sends NOTIFY keysvc_key_changes): every serving process follows that log
to drop what it cached (keysvc.replicas). The appends are serialised, so the log's
sequence numbers become visible in order and a follower that read up to N has seen
every change up to N.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

import sqlalchemy as sa
from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.script import ScriptDirectory
from sqlalchemy import event, exc

from keysvc.errors import AlreadyExists, NotFound, Unavailable
from keysvc.model import (
    Charset,
    Key,
    KeyAlgorithm,
    KeyOrigin,
    KeyPlatform,
    KeyPurpose,
    KeyVersion,
    KeyVersionState,
)
from keysvc.store.schema import key_changes, key_versions, keys

_MIGRATIONS = Path(__file__).parent / "migrations"
# Any constant: serialises migrations of replicas that start together on PostgreSQL.
_MIGRATION_LOCK_ID = 0x6B657973
# Another constant: serialises appends to key_changes on PostgreSQL (see _log_change).
_KEY_CHANGES_LOCK_ID = 0x6B657974
# The channel every key change is announced on (payload: the key id).
KEY_CHANGES_CHANNEL = "keysvc_key_changes"
_MAX_UPDATE_ATTEMPTS = 20


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


@contextlib.contextmanager
def _database_errors() -> Iterator[None]:
    """Turns driver trouble into Unavailable with a message that names no data."""
    try:
        yield
    except (exc.OperationalError, exc.InterfaceError, exc.TimeoutError) as error:
        raise Unavailable(
            f"the database is unavailable ({type(error.orig or error).__name__})"
        ) from None


def create_engine(database_url: str) -> sa.Engine:
    """An engine for SQLite (WAL, waits on locks) or PostgreSQL (psycopg 3)."""
    if database_url.startswith("postgresql://"):
        database_url = "postgresql+psycopg://" + database_url[len("postgresql://"):]
    if database_url.startswith("sqlite"):
        engine = sa.create_engine(database_url, connect_args={"timeout": 10})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record):
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA busy_timeout=10000")
            cursor.execute("PRAGMA foreign_keys=ON")
            # A checkpoint runs inside the commit that finds the WAL past this many pages.
            # A Tokenize batch of 100 writes about 260 pages (random index pages), so at
            # SQLite's default of 1,000 every fourth commit took 5x as long; at 10,000
            # (about 40 MB of WAL) Tokenize x100 moved 5 % more items (make bench).
            cursor.execute("PRAGMA wal_autocheckpoint=10000")
            _use_wal(cursor)
            cursor.close()

        return engine
    return sa.create_engine(database_url, pool_pre_ping=True, pool_size=10)


def _use_wal(cursor) -> None:
    """Puts the database in WAL mode (it stays so). Switching needs a lock that SQLite
    does not wait for, so a process racing another one to switch a fresh file retries."""
    deadline = time.monotonic() + 10
    while cursor.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
        except sqlite3.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _alembic_config() -> AlembicConfig:
    config = AlembicConfig()
    config.set_main_option("script_location", str(_MIGRATIONS))
    return config


def schema_head() -> str:
    """The newest schema revision, the one `migrate` brings a database to."""
    return ScriptDirectory.from_config(_alembic_config()).get_current_head()


def migrate(engine: sa.Engine) -> None:
    """Brings the schema to the newest revision; safe when several processes start at once."""
    config = _alembic_config()
    with _database_errors(), engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            connection.execute(sa.text("SELECT pg_advisory_xact_lock(:id)"), {"id": _MIGRATION_LOCK_ID})
        elif engine.dialect.name == "sqlite":
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


def _as_utc(moment: datetime | None) -> datetime | None:
    # SQLite returns naive datetimes; everything keysvc stores is UTC.
    if moment is not None and moment.tzinfo is None:
        return moment.replace(tzinfo=timezone.utc)
    return moment


def _version_from_row(row) -> KeyVersion:
    return KeyVersion(
        version=row.version,
        state=KeyVersionState(row.state),
        origin=KeyOrigin(row.origin),
        check_value=row.check_value,
        created_at=_as_utc(row.created_at),
        wrapped_key=row.wrapped_key,
        wrapping_key_label=row.wrapping_key_label,
        binding_tag=row.binding_tag,
        destroyed_at=_as_utc(row.destroyed_at),
        public_key=row.public_key,
    )


def _version_values(key_id: str, version: KeyVersion) -> dict:
    return {
        "key_id": key_id,
        "version": version.version,
        "state": version.state.value,
        "origin": version.origin.value,
        "check_value": version.check_value,
        "wrapped_key": version.wrapped_key,
        "wrapping_key_label": version.wrapping_key_label,
        "binding_tag": version.binding_tag,
        "public_key": version.public_key,
        "created_at": version.created_at,
        "destroyed_at": version.destroyed_at,
    }


class KeyStore:
    """Keys and their versions in one SQL database. Thread-safe; share one per process."""

    def __init__(self, engine: sa.Engine) -> None:
        self._engine = engine

    @classmethod
    def open(cls, database_url: str, *, run_migrations: bool = True) -> "KeyStore":
        engine = create_engine(database_url)
        if run_migrations:
            migrate(engine)
        return cls(engine)

    @property
    def engine(self) -> sa.Engine:
        return self._engine

    def close(self) -> None:
        self._engine.dispose()

    # -- reads ------------------------------------------------------------------------

    def _load_keys(self, connection, key_rows) -> list[Key]:
        if not key_rows:
            return []
        ids = [row.key_id for row in key_rows]
        version_rows = connection.execute(
            sa.select(key_versions)
            .where(key_versions.c.key_id.in_(ids))
            .order_by(key_versions.c.key_id, key_versions.c.version.desc())
        ).all()
        versions: dict[str, list[KeyVersion]] = {key_id: [] for key_id in ids}
        for row in version_rows:
            versions[row.key_id].append(_version_from_row(row))
        return [
            Key(
                key_id=row.key_id,
                merchant_id=row.merchant_id,
                name=row.name,
                purpose=KeyPurpose(row.purpose),
                algorithm=KeyAlgorithm(row.algorithm),
                primary_version=row.primary_version,
                created_at=_as_utc(row.created_at),
                updated_at=_as_utc(row.updated_at),
                versions=tuple(versions[row.key_id]),
                revision=row.revision,
                platform=KeyPlatform(row.platform),
                charset=Charset(row.charset),
                pending_primary=row.pending_primary,
            )
            for row in key_rows
        ]

    def load_key(self, key_id: str) -> Key | None:
        """The key with all its versions, or None."""
        with _database_errors(), self._engine.connect() as connection:
            rows = connection.execute(sa.select(keys).where(keys.c.key_id == key_id)).all()
            found = self._load_keys(connection, rows)
        return found[0] if found else None

    def load_revision(self, key_id: str) -> int | None:
        """The key's current revision (one indexed read), or None when it does not exist."""
        with _database_errors(), self._engine.connect() as connection:
            return connection.execute(
                sa.select(keys.c.revision).where(keys.c.key_id == key_id)
            ).scalar_one_or_none()

    def list_keys(self, *, merchant_id: str | None, after_key_id: str, limit: int) -> list[Key]:
        """Keys in key id order, after `after_key_id`, at most `limit`."""
        query = sa.select(keys).where(keys.c.key_id > after_key_id)
        if merchant_id:
            query = query.where(keys.c.merchant_id == merchant_id)
        query = query.order_by(keys.c.key_id).limit(limit)
        with _database_errors(), self._engine.connect() as connection:
            return self._load_keys(connection, connection.execute(query).all())

    # -- writes -----------------------------------------------------------------------

    def insert_key(self, key: Key) -> Key:
        """Stores a new key with its versions in one transaction.

        Raises AlreadyExists when the key id is taken.
        """
        try:
            with _database_errors(), self._engine.begin() as connection:
                connection.execute(
                    sa.insert(keys).values(
                        key_id=key.key_id,
                        merchant_id=key.merchant_id,
                        name=key.name,
                        purpose=key.purpose.value,
                        algorithm=key.algorithm.value,
                        platform=key.platform.value,
                        charset=key.charset.value,
                        primary_version=key.primary_version,
                        pending_primary=key.pending_primary,
                        revision=1,
                        created_at=key.created_at,
                        updated_at=key.updated_at,
                    )
                )
                for version in key.versions:
                    connection.execute(sa.insert(key_versions).values(**_version_values(key.key_id, version)))
                _log_change(connection, key.key_id, 1, key.created_at)
        except exc.IntegrityError:
            raise AlreadyExists(f"key {key.key_id!r} already exists") from None
        return replace(key, revision=1)

    def update_key(self, key_id: str, change: Callable[[Key], Key]) -> Key:
        """Applies `change` to the stored key atomically and returns the stored result.

        `change` receives the current key and returns the wanted one (or the same
        object for no change); it may raise to refuse. It is called again when
        another writer changed the key in between, so it must have no side effects
        beyond its return value. Raises NotFound when the key does not exist.
        """
        for _attempt in range(_MAX_UPDATE_ATTEMPTS):
            current = self.load_key(key_id)
            if current is None:
                raise NotFound(f"key {key_id!r} not found")
            wanted = change(current)
            if wanted is current:
                return current
            stored = self._write_if_unchanged(current, wanted)
            if stored is not None:
                return stored
        raise Unavailable(f"key {key_id!r} is changing too often; try again")

    def _write_if_unchanged(self, current: Key, wanted: Key) -> Key | None:
        now = utcnow()
        try:
            with _database_errors(), self._engine.begin() as connection:
                claimed = connection.execute(
                    sa.update(keys)
                    .where(keys.c.key_id == current.key_id, keys.c.revision == current.revision)
                    .values(
                        primary_version=wanted.primary_version,
                        pending_primary=wanted.pending_primary,
                        revision=current.revision + 1,
                        updated_at=now,
                    )
                )
                if claimed.rowcount != 1:
                    return None  # another writer got there first: reload and retry
                for version in wanted.versions:
                    before = current.find_version(version.version)
                    values = _version_values(current.key_id, version)
                    if before is None:
                        connection.execute(sa.insert(key_versions).values(**values))
                    elif before != version:
                        connection.execute(
                            sa.update(key_versions)
                            .where(
                                key_versions.c.key_id == current.key_id,
                                key_versions.c.version == version.version,
                            )
                            .values(**values)
                        )
                _log_change(connection, current.key_id, current.revision + 1, now)
        except exc.IntegrityError:
            return None  # a version number taken concurrently: retry with fresh state
        return replace(wanted, revision=current.revision + 1, updated_at=now)


def _log_change(connection, key_id: str, revision: int, now: datetime) -> None:
    """Appends the change to key_changes and announces it, in the caller's transaction.

    On PostgreSQL a sequence hands out numbers in the order transactions ask, not in
    the order they commit: a follower could read N+1 before N commits, and skip N. So
    appends take a transaction lock, held until commit, as the last step of the
    transaction: numbers become visible in order. Key changes are admin operations, so
    serialising them costs nothing that matters. (SQLite has one writer at a time.)
    """
    if connection.dialect.name == "postgresql":
        connection.execute(sa.text("SELECT pg_advisory_xact_lock(:id)"), {"id": _KEY_CHANGES_LOCK_ID})
    connection.execute(sa.insert(key_changes).values(key_id=key_id, revision=revision, changed_at=now))
    if connection.dialect.name == "postgresql":
        # Delivered at commit, and only if the transaction commits.
        connection.execute(sa.text("SELECT pg_notify(:channel, :key_id)"),
                           {"channel": KEY_CHANGES_CHANNEL, "key_id": key_id})
