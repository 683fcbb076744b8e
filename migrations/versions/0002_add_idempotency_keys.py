"""Add ai_chat_idempotency_keys: one answer per (telegram_id, request_id).

The unique constraint is what makes a retried request_id safe across
workers and instances; the foreign key lets a deleted exchange take its key
with it.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        "ai_chat_idempotency_keys",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("telegram_id", sa.BigInteger(), nullable=False),
        sa.Column("request_id", sa.String(length=128), nullable=False),
        sa.Column("message_sha256", sa.String(length=64), nullable=False),
        sa.Column("chat_request_id", sa.Integer(), nullable=True),
        sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["chat_request_id"], ["ai_chat_requests.id"], ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("telegram_id", "request_id", name="uq_ai_chat_idempotency_keys_key"),
    )


def downgrade():
    op.drop_table("ai_chat_idempotency_keys")
