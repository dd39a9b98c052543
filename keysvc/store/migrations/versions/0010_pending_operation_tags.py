"""Pending operations carry a tag made by the HSM's binding key, so a row rewritten in
the database is refused instead of approved.

Revision ID: 0010
Revises: 0009
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable: a row from before this revision has no tag, and is never approved.
    with op.batch_alter_table("pending_operations") as table:
        table.add_column(sa.Column("tag", sa.LargeBinary, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("pending_operations") as table:
        table.drop_column("tag")
