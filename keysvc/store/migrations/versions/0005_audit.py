"""The audit trail: hash-chained records, signed checkpoints, and the signing key.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_records",
        sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("recorded_at", sa.String(40), nullable=False),
        sa.Column("identity", sa.String(512), nullable=False),
        sa.Column("operation", sa.String(128), nullable=False),
        sa.Column("target", sa.String(512), nullable=False),
        sa.Column("outcome", sa.String(64), nullable=False),
        sa.Column("request_id", sa.String(64), nullable=False),
        sa.Column("prev_hash", sa.LargeBinary, nullable=False),
        sa.Column("record_hash", sa.LargeBinary, nullable=False),
    )
    op.create_table(
        "audit_checkpoints",
        sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("record_hash", sa.LargeBinary, nullable=False),
        sa.Column("signature", sa.LargeBinary, nullable=False),
    )
    op.create_table(
        "audit_signing_keys",
        sa.Column("key_id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("wrapped_seed_key", sa.LargeBinary, nullable=False),
        sa.Column("binding_tag", sa.LargeBinary, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("audit_signing_keys")
    op.drop_table("audit_checkpoints")
    op.drop_table("audit_records")
