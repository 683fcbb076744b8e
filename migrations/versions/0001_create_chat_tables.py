"""Create ai_chat_requests and ai_chat_daily_limits with their indexes.

The existing service created these tables without Alembic, so on its
database they may already be there: only what is missing is created, and an
existing table is left as it is (its columns are the contract's).

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _existing_tables() -> set[str]:
    return set(sa.inspect(op.get_bind()).get_table_names())


def _existing_indexes(table: str) -> set[str]:
    return {index["name"] for index in sa.inspect(op.get_bind()).get_indexes(table)}


def upgrade():
    tables = _existing_tables()
    if "ai_chat_requests" not in tables:
        op.create_table(
            "ai_chat_requests",
            sa.Column("id", sa.Integer(), nullable=False),
            sa.Column("telegram_id", sa.BigInteger(), nullable=False),
            sa.Column("user_id", sa.Integer(), nullable=True),
            sa.Column("message", sa.Text(), nullable=False),
            sa.Column("response", sa.Text(), nullable=False),
            sa.Column("tokens_used", sa.Integer(), nullable=False),
            sa.Column("request_date", sa.Date(), nullable=False),
            sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
            sa.PrimaryKeyConstraint("id"),
        )
    indexes = _existing_indexes("ai_chat_requests")
    # History and context read a user's newest rows; stats a date range.
    if "ix_ai_chat_requests_telegram_id_id" not in indexes:
        op.create_index(
            "ix_ai_chat_requests_telegram_id_id", "ai_chat_requests", ["telegram_id", "id"]
        )
    if "ix_ai_chat_requests_telegram_id_request_date" not in indexes:
        op.create_index(
            "ix_ai_chat_requests_telegram_id_request_date",
            "ai_chat_requests",
            ["telegram_id", "request_date"],
        )
    if "ai_chat_daily_limits" not in tables:
        op.create_table(
            "ai_chat_daily_limits",
            sa.Column("id", sa.Integer(), nullable=False),
            sa.Column("telegram_id", sa.BigInteger(), nullable=False),
            sa.Column("request_count", sa.Integer(), nullable=False),
            sa.Column("last_reset_date", sa.Date(), nullable=False),
            sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
            sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
            sa.PrimaryKeyConstraint("id"),
            # The conflict target of the atomic quota reservation.
            sa.UniqueConstraint("telegram_id", name="uq_ai_chat_daily_limits_telegram_id"),
        )


def downgrade():
    op.drop_table("ai_chat_daily_limits")
    op.drop_table("ai_chat_requests")
