"""Add ai_chat_idempotency_keys: one answer per (telegram_id, request_id).

The unique constraint is what makes a retried request_id safe across
workers and instances; ``claim_token`` names the request that owns a claim,
so a late request can neither complete nor release a claim another one took
over; the foreign key lets a deleted exchange take its key with it, and its
index keeps that cascade (history deletion, retention) from scanning the keys.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

from app.migration_ops import add_column, create_index, table_exists, with_brief_locks

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade():
    if not table_exists("ai_chat_idempotency_keys"):
        # The foreign key locks ai_chat_requests (briefly) against writes.
        with_brief_locks(
            lambda: op.create_table(
                "ai_chat_idempotency_keys",
                sa.Column("id", sa.Integer(), nullable=False),
                sa.Column("telegram_id", sa.BigInteger(), nullable=False),
                sa.Column("request_id", sa.String(length=128), nullable=False),
                sa.Column("message_sha256", sa.String(length=64), nullable=False),
                sa.Column("claim_token", sa.String(length=32), nullable=True),
                sa.Column("chat_request_id", sa.Integer(), nullable=True),
                sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=False),
                sa.ForeignKeyConstraint(
                    ["chat_request_id"], ["ai_chat_requests.id"], ondelete="CASCADE"
                ),
                sa.PrimaryKeyConstraint("id"),
                sa.UniqueConstraint(
                    "telegram_id", "request_id", name="uq_ai_chat_idempotency_keys_key"
                ),
            )
        )
    # A table made by v1 (before claims had owners).
    add_column("ai_chat_idempotency_keys", sa.Column("claim_token", sa.String(32), nullable=True))
    create_index(
        "ix_ai_chat_idempotency_keys_chat_request_id",
        "ai_chat_idempotency_keys",
        ["chat_request_id"],
    )


def downgrade():
    op.drop_table("ai_chat_idempotency_keys")
