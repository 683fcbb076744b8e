"""Record every model call's tokens and cost, the tools an answer used, and
the spend caps.

- ``ai_chat_requests`` gains ``tools`` (the seller-data tools the answer ran,
  comma-separated), ``prompt_tokens``, ``completion_tokens`` and ``cost`` (in
  PRICE_CURRENCY; null without a price). All nullable: the rows the old
  service wrote, and its writers, know nothing of them.
- ``ai_chat_llm_calls``: one row per model call, with its purpose (the
  ``answer``, a ``tool_round`` before it, a ``summary`` of older exchanges):
  the spend report reads it. It keeps no text, and outlives a deleted history
  (its link to the exchange is set to null).
- ``ai_chat_daily_limits`` gains ``spend`` (the cost of the counter day's calls)
  and ``spend_reserved`` (the estimate held by answers in flight), read by the
  quota reservation itself; ``ai_chat_user_settings`` gains
  ``daily_spend_limit``.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

from app.migration_ops import add_column, create_index, table_exists

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

MONEY = sa.Numeric(18, 8)


def upgrade():
    add_column("ai_chat_requests", sa.Column("tools", sa.Text(), nullable=True))
    add_column("ai_chat_requests", sa.Column("prompt_tokens", sa.Integer(), nullable=True))
    add_column("ai_chat_requests", sa.Column("completion_tokens", sa.Integer(), nullable=True))
    add_column("ai_chat_requests", sa.Column("cost", MONEY, nullable=True))
    add_column("ai_chat_daily_limits", sa.Column("spend", MONEY, nullable=True))
    add_column("ai_chat_daily_limits", sa.Column("spend_reserved", MONEY, nullable=True))
    add_column("ai_chat_user_settings", sa.Column("daily_spend_limit", MONEY, nullable=True))
    if not table_exists("ai_chat_llm_calls"):
        op.create_table(
            "ai_chat_llm_calls",
            sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
            sa.Column("telegram_id", sa.BigInteger(), nullable=False),
            sa.Column("chat_request_id", sa.Integer(), nullable=True),
            sa.Column("purpose", sa.String(length=16), nullable=False),
            sa.Column("model", sa.String(length=200), nullable=True),
            sa.Column("prompt_tokens", sa.Integer(), nullable=False),
            sa.Column("completion_tokens", sa.Integer(), nullable=False),
            sa.Column("cost", MONEY, nullable=True),
            sa.Column("usage_date", sa.Date(), nullable=False),
            sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
            sa.PrimaryKeyConstraint("id"),
            sa.ForeignKeyConstraint(
                ["chat_request_id"], ["ai_chat_requests.id"], ondelete="SET NULL"
            ),
            sa.CheckConstraint(
                "purpose IN ('answer', 'tool_round', 'summary')",
                name="ck_ai_chat_llm_calls_purpose",
            ),
        )
    # The spend report by day or model reads a date range; by user, one
    # seller's range (stats, the spend of a day).
    create_index("ix_ai_chat_llm_calls_usage_date", "ai_chat_llm_calls", ["usage_date"])
    create_index(
        "ix_ai_chat_llm_calls_telegram_id_usage_date",
        "ai_chat_llm_calls",
        ["telegram_id", "usage_date"],
    )
    # Deleting a history sets the link to null: without it, a scan per row.
    create_index(
        "ix_ai_chat_llm_calls_chat_request_id", "ai_chat_llm_calls", ["chat_request_id"]
    )


def downgrade():
    op.drop_table("ai_chat_llm_calls")
    op.drop_column("ai_chat_user_settings", "daily_spend_limit")
    op.drop_column("ai_chat_daily_limits", "spend_reserved")
    op.drop_column("ai_chat_daily_limits", "spend")
    for column in ("cost", "completion_tokens", "prompt_tokens", "tools"):
        op.drop_column("ai_chat_requests", column)
