"""The token vault in SQL: token domains, their wrapped data keys, and token rows.

It holds what may be stored: tokens, masked PANs, keyed fingerprints, PANs
encrypted under data keys that are themselves wrapped under the HSM master key,
and metadata. Never a PAN in the clear, never an unwrapped key.

Tokenizations of one PAN running at once (threads, workers, replicas) meet at the
unique index on (domain, fingerprint, format, BIN option): each batch inserts with
ON CONFLICT DO NOTHING and reads back which rows are its own.

The tokenize path's two per-item statements (the fingerprint lookup and the insert)
are written in the driver's own SQL, one statement per batch, with values converted
by the schema's own column types: SQLAlchemy's per-parameter work cost more than
SQLite's (make bench, Tokenize x100). Everything else goes through SQLAlchemy Core.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from dataclasses import dataclass, field
from datetime import datetime
from typing import Iterator

import sqlalchemy as sa
from sqlalchemy import exc
from sqlalchemy.dialects import postgresql, sqlite

from keysvc.errors import FailedPrecondition, Unavailable
from keysvc.store import _as_utc, _database_errors
from keysvc.store.schema import token_data_keys, token_domains, tokens

# Rows read or written per statement in the background jobs (purge, rewrap).
JOB_BATCH = 500
_DEADLOCK_DETECTED = "40P01"
_DEADLOCK_ATTEMPTS = 5
# How long a token write waits for this process's other token writes on SQLite: the
# database's own busy timeout (keysvc.store.create_engine).
_SQLITE_WRITER_WAIT = 10.0
# One lock per SQLite engine, shared by every TokenStore over it (see _writer_turn).
_SQLITE_WRITERS: "weakref.WeakKeyDictionary[sa.Engine, threading.Lock]" = weakref.WeakKeyDictionary()
_SQLITE_WRITERS_GUARD = threading.Lock()


@dataclass(frozen=True)
class DataKeyRecord:
    """One version of a domain's AES-256 data key, as stored."""

    version: int
    wrapped_key: bytes | None = field(repr=False)
    binding_tag: bytes = field(repr=False)
    created_at: datetime
    destroyed_at: datetime | None = None


@dataclass(frozen=True)
class TokenDomainRecord:
    """A token domain with its fingerprint key and data key versions, as stored."""

    domain: str
    fingerprint_key: bytes | None = field(repr=False)
    fingerprint_binding_tag: bytes = field(repr=False)
    primary_version: int
    revision: int
    created_at: datetime
    shredded_at: datetime | None = None
    data_keys: tuple[DataKeyRecord, ...] = ()

    def data_key(self, version: int) -> DataKeyRecord | None:
        return next((key for key in self.data_keys if key.version == version), None)


@dataclass(frozen=True)
class TokenRecord:
    """One token row. The PAN is only in `ciphertext`, under data key `key_version`."""

    domain: str
    token: str
    fingerprint: bytes = field(repr=False)
    deterministic: bool
    token_format: str
    keep_bin: bool
    masked_pan: str
    brand: str
    key_version: int
    nonce: bytes = field(repr=False)
    ciphertext: bytes = field(repr=False)
    created_at: datetime
    expires_at: datetime | None = None


# Every column of `tokens`, in table order: the order of the hot path's values.
_TOKEN_COLUMNS = tuple(column.name for column in tokens.columns)


def _token_from_row(row) -> TokenRecord:
    return TokenRecord(
        domain=row.domain, token=row.token, fingerprint=row.fingerprint, deterministic=bool(row.deterministic),
        token_format=row.token_format, keep_bin=bool(row.keep_bin), masked_pan=row.masked_pan, brand=row.brand,
        key_version=row.key_version, nonce=row.nonce, ciphertext=row.ciphertext,
        created_at=_as_utc(row.created_at), expires_at=_as_utc(row.expires_at),
    )


def _processors(dialect, kind: str) -> list:
    """Per column of `tokens`: the dialect's bind or result conversion, or None.
    LargeBinary's bind conversion (the driver's Binary wrapper) is left out: both
    drivers take bytes as they are."""
    found = []
    for column in tokens.columns:
        implementation = column.type.dialect_impl(dialect)
        if kind == "bind":
            found.append(None if isinstance(column.type, sa.LargeBinary) else implementation.bind_processor(dialect))
        else:
            found.append(implementation.result_processor(dialect, None))
    return found


class _TokenStatements:
    """The tokenize path's statements in the driver's SQL, for one dialect."""

    def __init__(self, dialect) -> None:
        quote = dialect.identifier_preparer.quote
        self.placeholder = "?" if dialect.paramstyle == "qmark" else "%s"
        self.max_parameters = min(dialect.insertmanyvalues_max_parameters, 32_000)
        self.bind = _processors(dialect, "bind")
        self.result = _processors(dialect, "result")
        names = ", ".join(quote(name) for name in _TOKEN_COLUMNS)
        self.row = "(" + ", ".join([self.placeholder] * len(_TOKEN_COLUMNS)) + ")"
        self.insert = f"INSERT INTO tokens ({names}) VALUES "
        # SQLite: no RETURNING. The sqlite3 module hands the GIL over around every row
        # it steps through, and the thread that gets it may keep it for the whole switch
        # interval (5 ms) while this transaction holds the database's write lock. The
        # count of rows inserted tells whether every row went in (nearly always); if
        # not, one query finds which.
        self.returning = dialect.name != "sqlite"
        self.insert_end = " ON CONFLICT DO NOTHING" + (f" RETURNING {quote('token')}" if self.returning else "")
        self.stored_nonces = (f"SELECT {quote('token')}, nonce FROM tokens WHERE {quote('domain')} = "
                              f"{self.placeholder} AND {quote('token')} IN ")
        self.shredded = (f"SELECT shredded_at FROM token_domains WHERE {quote('domain')} = {self.placeholder}"
                         + ("" if dialect.name == "sqlite" else " FOR SHARE"))
        # SQLite, a batch without expired rows to delete: one statement, run on its own
        # (autocommit), that inserts nothing once the domain is shredded. Its write
        # lock is then held inside one call into SQLite, with the GIL released,
        # instead of across four statements and a commit, each ending in a wait for
        # the GIL (which a thread in a PKCS#11 loop may keep for the switch interval).
        self.insert_alone = dialect.name == "sqlite"
        self.insert_unless_shredded = (
            f"INSERT INTO tokens ({names}) SELECT * FROM (VALUES ", ") WHERE NOT EXISTS (SELECT 1 FROM token_domains "
            f"WHERE {quote('domain')} = {self.placeholder} AND shredded_at IS NOT NULL) ON CONFLICT DO NOTHING")
        self.rows_per_statement = self.max_parameters // len(_TOKEN_COLUMNS) - 1
        # The WHERE term `deterministic` as the partial unique index writes it, so that
        # SQLite uses that index.
        self.find = (f"SELECT {names} FROM tokens WHERE {quote('domain')} = {self.placeholder} AND deterministic "
                     f"AND token_format = {self.placeholder} AND keep_bin = {self.placeholder} "
                     f"AND fingerprint IN ")
        self.column = {name: position for position, name in enumerate(_TOKEN_COLUMNS)}

    def bound(self, name: str, value):
        process = self.bind[self.column[name]]
        return value if process is None or value is None else process(value)

    def record(self, values) -> TokenRecord:
        converted = [value if process is None else process(value) for process, value in zip(self.result, values)]
        row = dict(zip(_TOKEN_COLUMNS, converted))
        return TokenRecord(
            domain=row["domain"], token=row["token"], fingerprint=bytes(row["fingerprint"]),
            deterministic=bool(row["deterministic"]), token_format=row["token_format"],
            keep_bin=bool(row["keep_bin"]), masked_pan=row["masked_pan"], brand=row["brand"],
            key_version=row["key_version"], nonce=bytes(row["nonce"]), ciphertext=bytes(row["ciphertext"]),
            created_at=_as_utc(row["created_at"]), expires_at=_as_utc(row["expires_at"]),
        )

    def parameters(self, records: list[TokenRecord]) -> tuple:
        """The records' values, converted, row after row in column order. The values a
        batch shares (flags, times) are converted once per distinct combination."""
        bind = self.bind
        shared: dict[tuple, tuple] = {}
        values: list = []
        for record in records:
            key = (record.deterministic, record.keep_bin, record.created_at, record.expires_at)
            converted = shared.get(key)
            if converted is None:
                converted = shared[key] = tuple(
                    value if process is None or value is None else process(value)
                    for process, value in zip((bind[3], bind[5], bind[11], bind[12]), key))
            deterministic, keep_bin, created_at, expires_at = converted
            values += (record.domain, record.token, record.fingerprint, deterministic, record.token_format,
                       keep_bin, record.masked_pan, record.brand, record.key_version, record.nonce,
                       record.ciphertext, created_at, expires_at)
        return tuple(values)


assert _TOKEN_COLUMNS == ("domain", "token", "fingerprint", "deterministic", "token_format", "keep_bin",
                          "masked_pan", "brand", "key_version", "nonce", "ciphertext", "created_at", "expires_at")


class TokenStore:
    """The token vault over one SQLAlchemy engine (shared with the KeyStore). Thread-safe."""

    def __init__(self, engine: sa.Engine) -> None:
        self._engine = engine
        self._sql = _TokenStatements(engine.dialect)
        self._writers: threading.Lock | None = None
        if engine.dialect.name == "sqlite":
            with _SQLITE_WRITERS_GUARD:
                self._writers = _SQLITE_WRITERS.setdefault(engine, threading.Lock())

    @contextlib.contextmanager
    def _writer_turn(self) -> Iterator[None]:
        """On SQLite, token writes of this process take turns on a lock before they
        ask the database for its write lock. SQLite has one writer at a time, and a
        writer that finds the database locked polls it, sleeping 1, 2, 5, 10 ms and
        more between tries: behind a commit of a few ms, a second writer of this
        process woke well after the lock was free (make bench, Tokenize x100 with 2
        calls in flight). Waiting on a lock wakes it at once. Writers of other
        processes still meet at the database's busy timeout."""
        if self._writers is None:
            yield
            return
        if not self._writers.acquire(timeout=_SQLITE_WRITER_WAIT):
            raise Unavailable("the database is unavailable (busy with other token writes)")
        try:
            yield
        finally:
            self._writers.release()

    def _insert(self, table):
        """INSERT that skips rows conflicting with any unique constraint or index."""
        dialect = postgresql if self._engine.dialect.name == "postgresql" else sqlite
        return dialect.insert(table).on_conflict_do_nothing()

    # -- domains ------------------------------------------------------------------------

    def load_domain(self, domain: str) -> TokenDomainRecord | None:
        """The domain with every data key version, or None."""
        with _database_errors(), self._engine.connect() as connection:
            row = connection.execute(sa.select(token_domains).where(token_domains.c.domain == domain)).first()
            if row is None:
                return None
            key_rows = connection.execute(
                sa.select(token_data_keys).where(token_data_keys.c.domain == domain)
                .order_by(token_data_keys.c.version.desc())
            ).all()
        return TokenDomainRecord(
            domain=row.domain, fingerprint_key=row.fingerprint_key,
            fingerprint_binding_tag=row.fingerprint_binding_tag, primary_version=row.primary_version,
            revision=row.revision, created_at=_as_utc(row.created_at), shredded_at=_as_utc(row.shredded_at),
            data_keys=tuple(
                DataKeyRecord(version=k.version, wrapped_key=k.wrapped_key, binding_tag=k.binding_tag,
                              created_at=_as_utc(k.created_at), destroyed_at=_as_utc(k.destroyed_at))
                for k in key_rows
            ),
        )

    def load_domain_revision(self, domain: str) -> int | None:
        with _database_errors(), self._engine.connect() as connection:
            return connection.execute(
                sa.select(token_domains.c.revision).where(token_domains.c.domain == domain)
            ).scalar_one_or_none()

    def insert_domain(self, record: TokenDomainRecord) -> bool:
        """Stores a new domain with its data keys; False (and nothing written) when
        the domain exists already (another process created it first)."""
        with _database_errors(), self._writer_turn(), self._engine.begin() as connection:
            created = connection.execute(self._insert(token_domains).values(
                domain=record.domain, fingerprint_key=record.fingerprint_key,
                fingerprint_binding_tag=record.fingerprint_binding_tag,
                primary_version=record.primary_version, revision=1, created_at=record.created_at,
            ).returning(token_domains.c.domain)).first()
            if created is None:
                return False
            for key in record.data_keys:
                connection.execute(sa.insert(token_data_keys).values(
                    domain=record.domain, version=key.version, wrapped_key=key.wrapped_key,
                    binding_tag=key.binding_tag, created_at=key.created_at))
        return True

    def add_data_key(self, domain: str, expected_revision: int, key: DataKeyRecord) -> bool:
        """Adds a data key version and makes it primary, if the domain is still at
        `expected_revision` and not shredded; False when it moved meanwhile."""
        with _database_errors(), self._writer_turn(), self._engine.begin() as connection:
            claimed = connection.execute(
                sa.update(token_domains)
                .where(token_domains.c.domain == domain, token_domains.c.revision == expected_revision,
                       token_domains.c.shredded_at.is_(None))
                .values(primary_version=key.version, revision=expected_revision + 1)
            )
            if claimed.rowcount != 1:
                return False
            connection.execute(sa.insert(token_data_keys).values(
                domain=domain, version=key.version, wrapped_key=key.wrapped_key,
                binding_tag=key.binding_tag, created_at=key.created_at))
        return True

    def shred_domain(self, domain: str, now: datetime) -> int | None:
        """Erases the domain's fingerprint key and every data key and deletes its
        token rows, in one transaction. Returns how many tokens went, or None when
        the domain does not exist."""
        with _database_errors(), self._writer_turn(), self._engine.begin() as connection:
            marked = connection.execute(
                sa.update(token_domains).where(token_domains.c.domain == domain)
                .values(fingerprint_key=None, shredded_at=sa.func.coalesce(token_domains.c.shredded_at, now),
                        revision=token_domains.c.revision + 1)
            )
            if marked.rowcount != 1:
                return None
            connection.execute(
                sa.update(token_data_keys).where(token_data_keys.c.domain == domain)
                .values(wrapped_key=None,
                        destroyed_at=sa.func.coalesce(token_data_keys.c.destroyed_at, now))
            )
            return connection.execute(sa.delete(tokens).where(tokens.c.domain == domain)).rowcount

    # -- tokens ---------------------------------------------------------------------------

    def find_deterministic(
        self, domain: str, fingerprints: list[bytes], token_format: str, keep_bin: bool
    ) -> dict[bytes, TokenRecord]:
        """The deterministic tokens of these fingerprints, expired ones included."""
        if not fingerprints:
            return {}
        sql = self._sql
        fixed = (domain, sql.bound("token_format", token_format), sql.bound("keep_bin", keep_bin))
        chunk = sql.max_parameters - len(fixed)
        found: dict[bytes, TokenRecord] = {}
        with _database_errors(), self._engine.connect() as connection:
            for start in range(0, len(fingerprints), chunk):
                part = fingerprints[start:start + chunk]
                statement = sql.find + "(" + ", ".join([sql.placeholder] * len(part)) + ")"
                for values in connection.exec_driver_sql(statement, (*fixed, *part)):
                    record = sql.record(values)
                    found[record.fingerprint] = record
        return found

    def insert_tokens(self, records: list[TokenRecord], now: datetime, expired: list[str] = ()) -> set[str]:
        """Inserts the rows that conflict with no existing token or deterministic PAN,
        in one transaction, and returns the tokens of the rows inserted. The `expired`
        tokens, if still expired at `now`, are deleted first, so that their PANs' new
        deterministic tokens can take their place."""
        if not records:
            return set()
        domain = records[0].domain
        assert all(record.domain == domain for record in records)
        # One order for every writer, so that batches sharing PANs take the unique
        # index's locks in the same order (PostgreSQL otherwise finds deadlocks).
        records = sorted(records, key=lambda record: (record.fingerprint, record.token))
        if len({record.token for record in records}) != len(records):
            raise ValueError("insert_tokens takes distinct tokens")
        sql = self._sql
        if sql.insert_alone and not expired and len(records) <= sql.rows_per_statement:
            return self._insert_alone(domain, records)
        statements = []
        for start in range(0, len(records), sql.rows_per_statement):
            part = records[start:start + sql.rows_per_statement]
            statements.append((sql.insert + ", ".join([sql.row] * len(part)) + sql.insert_end,
                               sql.parameters(part)))
        for attempt in range(_DEADLOCK_ATTEMPTS):
            try:
                with self._writer_turn(), self._engine.begin() as connection:
                    if expired:
                        connection.execute(sa.delete(tokens).where(
                            tokens.c.domain == domain, tokens.c.token.in_(list(expired)),
                            tokens.c.expires_at <= now,
                        ))
                    inserted = self._insert_rows(connection, domain, records, statements)
                    # A shred committed meanwhile (seen by a worker whose cache is still
                    # fresh) must not be outlived by rows: the shred's update of the domain
                    # row waits for this share lock, or this sees its mark and writes nothing.
                    # (SQLite: this transaction holds the only write lock.)
                    shredded = connection.exec_driver_sql(sql.shredded, (domain,)).first()
                    if shredded is not None and shredded[0] is not None:  # leaving the block rolls back
                        raise FailedPrecondition(
                            f"token domain {domain!r} was shredded: its tokens are gone for good",
                            reason="TOKEN_DOMAIN_SHREDDED")
                    return inserted
            except (exc.OperationalError, exc.InterfaceError, exc.TimeoutError) as error:
                # A deadlock the database broke by rolling this transaction back: nothing
                # was written, so doing it again is safe.
                deadlock = getattr(error.orig, "sqlstate", None) == _DEADLOCK_DETECTED
                if not deadlock or attempt + 1 == _DEADLOCK_ATTEMPTS:
                    with _database_errors():
                        raise
        raise AssertionError("unreachable")

    def _insert_alone(self, domain: str, records: list[TokenRecord]) -> set[str]:
        """insert_tokens on SQLite in one autocommitted statement (see _TokenStatements)."""
        sql = self._sql
        statement = sql.insert_unless_shredded[0] + ", ".join([sql.row] * len(records)) + sql.insert_unless_shredded[1]
        parameters = (*sql.parameters(records), domain)
        with _database_errors(), self._writer_turn(), self._engine.connect() as connection:
            connection = connection.execution_options(isolation_level="AUTOCOMMIT")
            if connection.exec_driver_sql(statement, parameters).rowcount == len(records):
                return {record.token for record in records}
            shredded = connection.exec_driver_sql(sql.shredded, (domain,)).first()
            if shredded is not None and shredded[0] is not None:  # then the statement inserted nothing
                raise FailedPrecondition(
                    f"token domain {domain!r} was shredded: its tokens are gone for good",
                    reason="TOKEN_DOMAIN_SHREDDED")
            return self._stored_of(connection, domain, records)

    def _insert_rows(self, connection, domain: str, records: list[TokenRecord], statements) -> set[str]:
        """Runs the INSERT statements; returns the tokens of the rows inserted (the
        others conflicted with a row already there and were skipped)."""
        sql = self._sql
        if sql.returning:
            inserted = set()
            for statement, parameters in statements:
                inserted.update(token for (token,) in connection.exec_driver_sql(statement, parameters))
            return inserted
        count = sum(connection.exec_driver_sql(statement, parameters).rowcount
                    for statement, parameters in statements)
        if count == len(records):
            return {record.token for record in records}
        return self._stored_of(connection, domain, records)

    def _stored_of(self, connection, domain: str, records: list[TokenRecord]) -> set[str]:
        """The tokens of `records` stored as these rows (not rows of other writers that
        hold the same tokens): those whose stored nonce (random, 96 bits) is the one
        this batch drew for them."""
        sql = self._sql
        nonce_of = {record.token: record.nonce for record in records}
        tokens_wanted = list(nonce_of)
        inserted = set()
        chunk = sql.max_parameters - 1
        for start in range(0, len(tokens_wanted), chunk):
            part = tokens_wanted[start:start + chunk]
            statement = sql.stored_nonces + "(" + ", ".join([sql.placeholder] * len(part)) + ")"
            for token, nonce in connection.exec_driver_sql(statement, (domain, *part)):
                if bytes(nonce) == nonce_of[token]:
                    inserted.add(token)
        return inserted

    def load_tokens(self, domain: str, token_values: list[str]) -> dict[str, TokenRecord]:
        if not token_values:
            return {}
        with _database_errors(), self._engine.connect() as connection:
            rows = connection.execute(
                sa.select(tokens).where(tokens.c.domain == domain, tokens.c.token.in_(token_values))
            ).all()
        return {row.token: _token_from_row(row) for row in rows}

    def delete_token(self, domain: str, token: str) -> bool:
        """Deletes the row (and with it the only copy of its encrypted PAN)."""
        with _database_errors(), self._writer_turn(), self._engine.begin() as connection:
            deleted = connection.execute(
                sa.delete(tokens).where(tokens.c.domain == domain, tokens.c.token == token))
        return deleted.rowcount == 1

    def purge_expired(self, now: datetime, limit: int = JOB_BATCH) -> int:
        """Deletes up to `limit` tokens expired at `now`; returns how many."""
        with _database_errors(), self._writer_turn(), self._engine.begin() as connection:
            doomed = connection.execute(
                sa.select(tokens.c.domain, tokens.c.token).where(tokens.c.expires_at <= now).limit(limit)
            ).all()
            deleted = 0
            for domain, token in doomed:
                deleted += connection.execute(sa.delete(tokens).where(
                    tokens.c.domain == domain, tokens.c.token == token, tokens.c.expires_at <= now)).rowcount
        return deleted

    def count_live(self, now: datetime) -> int:
        """How many tokens of every domain have not expired at `now` (for metrics)."""
        with _database_errors(), self._engine.connect() as connection:
            return connection.execute(
                sa.select(sa.func.count()).select_from(tokens)
                .where(sa.or_(tokens.c.expires_at.is_(None), tokens.c.expires_at > now))
            ).scalar_one()

    def tokens_below_version(self, domain: str, version: int, limit: int = JOB_BATCH) -> list[TokenRecord]:
        """Up to `limit` tokens of the domain encrypted under a data key older than `version`."""
        with _database_errors(), self._engine.connect() as connection:
            rows = connection.execute(
                sa.select(tokens).where(tokens.c.domain == domain, tokens.c.key_version < version)
                .order_by(tokens.c.token).limit(limit)
            ).all()
        return [_token_from_row(row) for row in rows]

    def count_below_version(self, domain: str, version: int) -> int:
        with _database_errors(), self._engine.connect() as connection:
            return connection.execute(
                sa.select(sa.func.count()).select_from(tokens)
                .where(tokens.c.domain == domain, tokens.c.key_version < version)
            ).scalar_one()

    def store_rewrapped(self, domain: str, moved: list[tuple[TokenRecord, int, bytes, bytes]]) -> int:
        """Writes each (row as read, new version, new nonce, new ciphertext), only where
        the row is still as read (not deleted or rewrapped meanwhile). Returns how many."""
        updated = 0
        with _database_errors(), self._writer_turn(), self._engine.begin() as connection:
            for record, version, nonce, ciphertext in moved:
                updated += connection.execute(
                    sa.update(tokens).where(
                        tokens.c.domain == domain, tokens.c.token == record.token,
                        tokens.c.key_version == record.key_version, tokens.c.nonce == record.nonce,
                    ).values(key_version=version, nonce=nonce, ciphertext=ciphertext)
                ).rowcount
        return updated
