"""The tables of keysvc's database. Alembic migrations create them; this is their shape."""

from sqlalchemy import (
    Column,
    DateTime,
    ForeignKey,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
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
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("destroyed_at", DateTime(timezone=True), nullable=True),
)
