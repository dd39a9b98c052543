"""The token vault: token domains, their data keys, and tokens.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "token_domains",
        sa.Column("domain", sa.String(64), primary_key=True),
        sa.Column("fingerprint_key", sa.LargeBinary, nullable=True),
        sa.Column("fingerprint_binding_tag", sa.LargeBinary, nullable=False),
        sa.Column("primary_version", sa.Integer, nullable=False),
        sa.Column("revision", sa.Integer, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("shredded_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_table(
        "token_data_keys",
        sa.Column("domain", sa.String(64), sa.ForeignKey("token_domains.domain"), primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True),
        sa.Column("wrapped_key", sa.LargeBinary, nullable=True),
        sa.Column("binding_tag", sa.LargeBinary, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("destroyed_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_table(
        "tokens",
        sa.Column("domain", sa.String(64), sa.ForeignKey("token_domains.domain"), primary_key=True),
        sa.Column("token", sa.String(32), primary_key=True),
        sa.Column("fingerprint", sa.LargeBinary, nullable=False),
        sa.Column("deterministic", sa.Boolean, nullable=False),
        sa.Column("token_format", sa.String(24), nullable=False),
        sa.Column("keep_bin", sa.Boolean, nullable=False),
        sa.Column("masked_pan", sa.String(19), nullable=False),
        sa.Column("brand", sa.String(16), nullable=False),
        sa.Column("key_version", sa.Integer, nullable=False),
        sa.Column("nonce", sa.LargeBinary, nullable=False),
        sa.Column("ciphertext", sa.LargeBinary, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
    )
    # One deterministic token per PAN, format and BIN option in a domain: concurrent
    # tokenizations of one PAN meet here and all but one insert nothing.
    op.create_index(
        "ux_tokens_pan", "tokens", ["domain", "fingerprint", "token_format", "keep_bin"], unique=True,
        sqlite_where=sa.text("deterministic"), postgresql_where=sa.text("deterministic"),
    )
    # Tokens without a TTL (most of them) stay out of the purge's index.
    op.create_index(
        "ix_tokens_expires_at", "tokens", ["expires_at"],
        sqlite_where=sa.text("expires_at IS NOT NULL"), postgresql_where=sa.text("expires_at IS NOT NULL"),
    )
    op.create_index("ix_tokens_key_version", "tokens", ["domain", "key_version"])


def downgrade() -> None:
    op.drop_index("ix_tokens_key_version", table_name="tokens")
    op.drop_index("ix_tokens_expires_at", table_name="tokens")
    op.drop_index("ux_tokens_pan", table_name="tokens")
    op.drop_table("tokens")
    op.drop_table("token_data_keys")
    op.drop_table("token_domains")
