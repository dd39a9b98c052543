"""Keys every replica shares, wrapped under the master key, and replica enrollments.

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "shared_keys",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("wrapped_key", sa.LargeBinary, nullable=False),
        sa.Column("public_key", sa.LargeBinary, nullable=False, server_default=sa.text("''")),
        sa.Column("check_value", sa.String(64), nullable=False, server_default=""),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "enrollments",
        sa.Column("enrollment_id", sa.String(32), primary_key=True),
        sa.Column("replica_name", sa.String(256), nullable=False),
        sa.Column("transport_public_key", sa.LargeBinary, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("requested_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("wrapped_master_key", sa.LargeBinary, nullable=True),
        sa.Column("master_check_value", sa.String(64), nullable=False, server_default=""),
        sa.Column("delivered_by", sa.String(512), nullable=False, server_default=""),
    )


def downgrade() -> None:
    op.drop_table("enrollments")
    op.drop_table("shared_keys")
