"""The tables of keysvc's database. Alembic migrations create them; this is their shape."""

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    text,
)

metadata = MetaData()

keys = Table(
    "keys",
    metadata,
    Column("key_id", String(140), primary_key=True),
    Column("merchant_id", String(64), nullable=False, index=True),
    Column("name", String(64), nullable=False),
    Column("purpose", String(32), nullable=False),
    Column("algorithm", String(32), nullable=False),
    # The key's profile: the payment platform it serves and its messages' charset.
    Column("platform", String(16), nullable=False),
    Column("charset", String(16), nullable=False),
    Column("primary_version", Integer, nullable=False),
    # Bumped by every change to the key or its versions (optimistic concurrency and
    # cache coherence between workers and replicas).
    Column("revision", Integer, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

key_versions = Table(
    "key_versions",
    metadata,
    Column("key_id", String(140), ForeignKey("keys.key_id"), primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("state", String(16), nullable=False),
    Column("origin", String(16), nullable=False),
    Column("check_value", String(16), nullable=False),
    # Wrapped under the HSM master key; NULL once destroyed.
    Column("wrapped_key", LargeBinary, nullable=True),
    Column("wrapping_key_label", String(64), nullable=False),
    Column("binding_tag", LargeBinary, nullable=False),
    # RSA versions: the public key, DER SubjectPublicKeyInfo (covered by the binding tag).
    Column("public_key", LargeBinary, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("destroyed_at", DateTime(timezone=True), nullable=True),
)


# -- the token vault (card tokenization) ---------------------------------------------------

token_domains = Table(
    "token_domains",
    metadata,
    Column("domain", String(64), primary_key=True),
    # The domain's HMAC-SHA256 fingerprint key, wrapped under the HSM master key;
    # NULL once the domain is shredded.
    Column("fingerprint_key", LargeBinary, nullable=True),
    Column("fingerprint_binding_tag", LargeBinary, nullable=False),
    # The data key version new tokens are encrypted with.
    Column("primary_version", Integer, nullable=False),
    # Bumped by every change to the domain or its data keys (cache coherence).
    Column("revision", Integer, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("shredded_at", DateTime(timezone=True), nullable=True),
)

token_data_keys = Table(
    "token_data_keys",
    metadata,
    Column("domain", String(64), ForeignKey("token_domains.domain"), primary_key=True),
    Column("version", Integer, primary_key=True),
    # AES-256 wrapped under the HSM master key; NULL once destroyed (crypto-shredding).
    Column("wrapped_key", LargeBinary, nullable=True),
    Column("binding_tag", LargeBinary, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("destroyed_at", DateTime(timezone=True), nullable=True),
)

tokens = Table(
    "tokens",
    metadata,
    Column("domain", String(64), ForeignKey("token_domains.domain"), primary_key=True),
    Column("token", String(32), primary_key=True),
    # HMAC-SHA256 of the PAN under the domain's fingerprint key (never a plain hash).
    Column("fingerprint", LargeBinary, nullable=False),
    # Deterministic tokens are unique per PAN, format and BIN option in a domain.
    Column("deterministic", Boolean, nullable=False),
    Column("token_format", String(24), nullable=False),
    Column("keep_bin", Boolean, nullable=False),
    Column("masked_pan", String(19), nullable=False),
    Column("brand", String(16), nullable=False),
    # The PAN under AES-256-GCM with this data key version; the associated data binds
    # the domain, the token and the version.
    Column("key_version", Integer, nullable=False),
    Column("nonce", LargeBinary, nullable=False),
    Column("ciphertext", LargeBinary, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=True),
)
Index(
    "ux_tokens_pan", tokens.c.domain, tokens.c.fingerprint, tokens.c.token_format, tokens.c.keep_bin,
    unique=True, sqlite_where=text("deterministic"), postgresql_where=text("deterministic"),
)
# Tokens without a TTL (most of them) stay out of the purge's index.
Index(
    "ix_tokens_expires_at", tokens.c.expires_at,
    sqlite_where=text("expires_at IS NOT NULL"), postgresql_where=text("expires_at IS NOT NULL"),
)
Index("ix_tokens_key_version", tokens.c.domain, tokens.c.key_version)


# The audit trail. Each record holds the hash of the one before; checkpoints sign a
# record's hash with the audit Ed25519 key, whose seed comes from a key wrapped under
# the HSM master key (audit_signing_keys).
audit_records = Table(
    "audit_records",
    metadata,
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("recorded_at", String(40), nullable=False),
    Column("identity", String(512), nullable=False),
    Column("operation", String(128), nullable=False),
    Column("target", String(512), nullable=False),
    Column("outcome", String(64), nullable=False),
    Column("request_id", String(64), nullable=False),
    Column("prev_hash", LargeBinary, nullable=False),
    Column("record_hash", LargeBinary, nullable=False),
)

audit_checkpoints = Table(
    "audit_checkpoints",
    metadata,
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("record_hash", LargeBinary, nullable=False),
    Column("signature", LargeBinary, nullable=False),
)

audit_signing_keys = Table(
    "audit_signing_keys",
    metadata,
    Column("key_id", Integer, primary_key=True, autoincrement=False),
    Column("wrapped_seed_key", LargeBinary, nullable=False),
    Column("binding_tag", LargeBinary, nullable=False),
)

# Dual control: a request that needs a second key-admin, kept (serialised) until one
# approves or rejects it, or it expires.
pending_operations = Table(
    "pending_operations",
    metadata,
    Column("operation_id", String(32), primary_key=True),
    Column("method", String(128), nullable=False),
    Column("request", LargeBinary, nullable=False),
    Column("target", String(512), nullable=False),
    Column("requested_by", String(512), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Column("state", String(16), nullable=False),
    Column("decided_by", String(512), nullable=False, server_default=""),
)
