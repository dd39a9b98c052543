"""Key profiles: the payment platform a key serves and the charset of its messages.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Keys made before profiles existed are generic HMAC keys over UTF-8 text.
    with op.batch_alter_table("keys") as batch:
        batch.add_column(sa.Column("platform", sa.String(16), nullable=False, server_default="GENERIC"))
        batch.add_column(sa.Column("charset", sa.String(16), nullable=False, server_default="UTF-8"))


def downgrade() -> None:
    with op.batch_alter_table("keys") as batch:
        batch.drop_column("charset")
        batch.drop_column("platform")
