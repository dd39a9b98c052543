"""The token vault in SQL: token domains, their wrapped data keys, and token rows.

It holds what may be stored: tokens, masked PANs, keyed fingerprints, PANs
encrypted under data keys that are themselves wrapped under the HSM master key,
and metadata. Never a PAN in the clear, never an unwrapped key.

Tokenizations of one PAN running at once (threads, workers, replicas) meet at the
unique index on (domain, fingerprint, format, BIN option): each batch inserts with
ON CONFLICT DO NOTHING and reads back which rows are its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy import exc
from sqlalchemy.dialects import postgresql, sqlite

from keysvc.errors import FailedPrecondition
from keysvc.store import _as_utc, _database_errors
from keysvc.store.schema import token_data_keys, token_domains, tokens

# Rows read or written per statement in the background jobs (purge, rewrap).
JOB_BATCH = 500
# The partial unique index's own predicate, written as in the index: SQLite uses a
# partial index only when the query repeats its WHERE term (`deterministic = 1` does not).
_DETERMINISTIC = sa.text("tokens.deterministic")
_DEADLOCK_DETECTED = "40P01"
_DEADLOCK_ATTEMPTS = 5


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


def _token_from_row(row) -> TokenRecord:
    return TokenRecord(
        domain=row.domain, token=row.token, fingerprint=row.fingerprint, deterministic=bool(row.deterministic),
        token_format=row.token_format, keep_bin=bool(row.keep_bin), masked_pan=row.masked_pan, brand=row.brand,
        key_version=row.key_version, nonce=row.nonce, ciphertext=row.ciphertext,
        created_at=_as_utc(row.created_at), expires_at=_as_utc(row.expires_at),
    )


def _token_values(record: TokenRecord) -> dict:
    return {
        "domain": record.domain, "token": record.token, "fingerprint": record.fingerprint,
        "deterministic": record.deterministic, "token_format": record.token_format,
        "keep_bin": record.keep_bin, "masked_pan": record.masked_pan, "brand": record.brand,
        "key_version": record.key_version, "nonce": record.nonce, "ciphertext": record.ciphertext,
        "created_at": record.created_at, "expires_at": record.expires_at,
    }


class TokenStore:
    """The token vault over one SQLAlchemy engine (shared with the KeyStore). Thread-safe."""

    def __init__(self, engine: sa.Engine) -> None:
        self._engine = engine

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
        with _database_errors(), self._engine.begin() as connection:
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
        with _database_errors(), self._engine.begin() as connection:
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
        with _database_errors(), self._engine.begin() as connection:
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
        query = sa.select(tokens).where(
            tokens.c.domain == domain, _DETERMINISTIC,
            tokens.c.token_format == token_format, tokens.c.keep_bin == keep_bin,
            tokens.c.fingerprint.in_(fingerprints),
        )
        with _database_errors(), self._engine.connect() as connection:
            return {row.fingerprint: _token_from_row(row) for row in connection.execute(query)}

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
        values = [_token_values(record) for record in records]
        for attempt in range(_DEADLOCK_ATTEMPTS):
            try:
                with self._engine.begin() as connection:
                    if expired:
                        connection.execute(sa.delete(tokens).where(
                            tokens.c.domain == domain, tokens.c.token.in_(list(expired)),
                            tokens.c.expires_at <= now,
                        ))
                    # RETURNING lists the rows inserted; conflicting ones are skipped.
                    inserted = set(connection.execute(self._insert(tokens).returning(tokens.c.token), values)
                                   .scalars().all())
                    # A shred committed meanwhile (seen by a worker whose cache is still
                    # fresh) must not be outlived by rows: the shred's update of the domain
                    # row waits for this share lock, or this sees its mark and writes nothing.
                    shredded = connection.execute(
                        sa.select(token_domains.c.shredded_at).where(token_domains.c.domain == domain)
                        .with_for_update(read=True)
                    ).scalar_one_or_none()
                    if shredded is not None:  # leaving the block rolls the insert back
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
        with _database_errors(), self._engine.begin() as connection:
            deleted = connection.execute(
                sa.delete(tokens).where(tokens.c.domain == domain, tokens.c.token == token))
        return deleted.rowcount == 1

    def purge_expired(self, now: datetime, limit: int = JOB_BATCH) -> int:
        """Deletes up to `limit` tokens expired at `now`; returns how many."""
        with _database_errors(), self._engine.begin() as connection:
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
        with _database_errors(), self._engine.begin() as connection:
            for record, version, nonce, ciphertext in moved:
                updated += connection.execute(
                    sa.update(tokens).where(
                        tokens.c.domain == domain, tokens.c.token == record.token,
                        tokens.c.key_version == record.key_version, tokens.c.nonce == record.nonce,
                    ).values(key_version=version, nonce=nonce, ciphertext=ciphertext)
                ).rowcount
        return updated
