"""Role policies approved by two key-admins (dual control of policy changes).

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "policies",
        sa.Column("revision", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("document", sa.Text, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("proposed_by", sa.String(512), nullable=False),
        sa.Column("approved_by", sa.String(512), nullable=False),
        sa.Column("approved_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("tag", sa.LargeBinary, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("policies")
