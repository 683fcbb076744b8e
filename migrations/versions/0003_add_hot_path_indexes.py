"""Index ai_chat_requests for the hot path: a user's newest rows, by date.

The context read and history take a user's last rows (telegram_id, id), and
stats a user's date range (telegram_id, request_date); the old service's
single-column indexes would fetch and sort all of a user's rows. Built
concurrently: the table is adopted and may be busy.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""

from alembic import op

from app.migration_ops import create_index

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade():
    create_index("ix_ai_chat_requests_telegram_id_id", "ai_chat_requests", ["telegram_id", "id"])
    create_index(
        "ix_ai_chat_requests_telegram_id_request_date",
        "ai_chat_requests",
        ["telegram_id", "request_date"],
    )


def downgrade():
    op.drop_index("ix_ai_chat_requests_telegram_id_request_date", "ai_chat_requests")
    op.drop_index("ix_ai_chat_requests_telegram_id_id", "ai_chat_requests")
