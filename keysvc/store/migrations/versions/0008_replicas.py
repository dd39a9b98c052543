"""Live replicas (registration and heartbeat) and the log of key changes they follow.

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "replicas",
        sa.Column("replica_id", sa.String(128), primary_key=True),
        sa.Column("address", sa.String(256), nullable=False, server_default=""),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("seen_change", sa.BigInteger, nullable=False, server_default="0"),
    )
    op.create_table(
        "key_changes",
        sa.Column("seq", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("key_id", sa.String(140), nullable=False),
        sa.Column("revision", sa.Integer, nullable=False),
        sa.Column("changed_at", sa.DateTime(timezone=True), nullable=False),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_key_changes_key_id", "key_changes", ["key_id", "seq"])
    op.add_column("keys", sa.Column("pending_primary", sa.Integer, nullable=True))
    op.create_index("ix_keys_pending_primary", "keys", ["key_id"],
                    sqlite_where=sa.text("pending_primary IS NOT NULL"),
                    postgresql_where=sa.text("pending_primary IS NOT NULL"))


def downgrade() -> None:
    op.drop_index("ix_keys_pending_primary", "keys")
    with op.batch_alter_table("keys") as batch:  # SQLite drops a column by copying the table
        batch.drop_column("pending_primary")
    op.drop_index("ix_key_changes_key_id", "key_changes")
    op.drop_table("key_changes")
    op.drop_table("replicas")
