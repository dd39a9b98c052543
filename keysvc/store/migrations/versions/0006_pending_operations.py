"""Operations waiting for a second key-admin's approval (dual control).

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "pending_operations",
        sa.Column("operation_id", sa.String(32), primary_key=True),
        sa.Column("method", sa.String(128), nullable=False),
        sa.Column("request", sa.LargeBinary, nullable=False),
        sa.Column("target", sa.String(512), nullable=False),
        sa.Column("requested_by", sa.String(512), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("decided_by", sa.String(512), nullable=False, server_default=""),
    )


def downgrade() -> None:
    op.drop_table("pending_operations")
