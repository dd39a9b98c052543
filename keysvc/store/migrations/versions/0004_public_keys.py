"""The public key of an RSA key version, stored beside its wrapped private key.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("key_versions") as batch:
        batch.add_column(sa.Column("public_key", sa.LargeBinary, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("key_versions") as batch:
        batch.drop_column("public_key")
