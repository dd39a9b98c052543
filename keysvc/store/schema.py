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
    Text,
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
    # A rotation's new version, waiting for every live replica to load it before it
    # becomes primary (safe rotation across replicas); NULL when none waits.
    Column("pending_primary", Integer, nullable=True),
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
    # HMAC (the HSM's binding key) over the operation's id, method, request digest, target,
    # requester and times (keysvc.approvals); a row without a valid one is never approved.
    Column("tag", LargeBinary, nullable=True),
)

# Keys every replica shares (binding key, import key pair), wrapped under the master
# key; and the master key's check value, so a replica with another master is refused.
shared_keys = Table(
    "shared_keys",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("wrapped_key", LargeBinary, nullable=False),
    Column("public_key", LargeBinary, nullable=False, server_default=text("''")),
    Column("check_value", String(64), nullable=False, server_default=""),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

# A new replica asking for the master key: its HSM's transport public key, and once two
# key-admins approved, the master key wrapped to it (RSA-OAEP, inside the HSM).
enrollments = Table(
    "enrollments",
    metadata,
    Column("enrollment_id", String(32), primary_key=True),
    Column("replica_name", String(256), nullable=False),
    Column("transport_public_key", LargeBinary, nullable=False),
    Column("state", String(16), nullable=False),
    Column("requested_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Column("wrapped_master_key", LargeBinary, nullable=True),
    Column("master_check_value", String(64), nullable=False, server_default=""),
    Column("delivered_by", String(512), nullable=False, server_default=""),
)

# Every serving process registers and heartbeats; `seen_change` is the last entry of
# `key_changes` whose effect it has loaded (safe rotation waits on it).
replicas = Table(
    "replicas",
    metadata,
    Column("replica_id", String(128), primary_key=True),
    Column("address", String(256), nullable=False, server_default=""),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("heartbeat_at", DateTime(timezone=True), nullable=False),
    Column("seen_change", BigInteger, nullable=False, server_default="0"),
)

# Every change to a key, in commit order (see keysvc.store._log_change); pruned after
# an hour. AUTOINCREMENT on SQLite: a number is never handed out twice, even once the
# newest rows are pruned.
key_changes = Table(
    "key_changes",
    metadata,
    Column("seq", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("key_id", String(140), nullable=False),
    Column("revision", Integer, nullable=False),
    Column("changed_at", DateTime(timezone=True), nullable=False),
    sqlite_autoincrement=True,
)
Index("ix_key_changes_key_id", key_changes.c.key_id, key_changes.c.seq)
# The few keys whose rotation waits for promotion, found without scanning every key.
Index("ix_keys_pending_primary", keys.c.key_id,
      sqlite_where=text("pending_primary IS NOT NULL"), postgresql_where=text("pending_primary IS NOT NULL"))

# Role policies two key-admins approved (keysvc.policies), newest revision in force.
# `tag` binds each row to its revision, text and approvers with the HSM's binding key,
# so a row written straight into the database is refused.
policies = Table(
    "policies",
    metadata,
    Column("revision", Integer, primary_key=True, autoincrement=False),
    Column("document", Text, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("proposed_by", String(512), nullable=False),
    Column("approved_by", String(512), nullable=False),
    Column("approved_at", DateTime(timezone=True), nullable=False),
    Column("tag", LargeBinary, nullable=False),
)
