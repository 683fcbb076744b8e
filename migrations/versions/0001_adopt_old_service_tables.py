"""Create ai_chat_requests and ai_chat_daily_limits exactly as the old service did.

The old service made these two tables with SQLAlchemy's ``create_all`` and
no Alembic, and in production they are full of rows. On such a database this
revision changes nothing: the tables are adopted as they are. On an empty one
it creates them the way ``create_all`` did (SERIAL ids, its index names, a
nullable ``tokens_used`` and ``updated_at``, no server defaults), so that the
main server and an operator's SQL that write rows the old way keep working
wherever the service runs.

Revision ID: 0001
Revises:
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

from app.migration_ops import table_exists

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# (name, columns, unique) of the old models' index=True / unique=True columns.
REQUEST_INDEXES = (
    ("ix_ai_chat_requests_id", ["id"], False),
    ("ix_ai_chat_requests_telegram_id", ["telegram_id"], False),
    ("ix_ai_chat_requests_user_id", ["user_id"], False),
    ("ix_ai_chat_requests_request_date", ["request_date"], False),
    ("ix_ai_chat_requests_created_at", ["created_at"], False),
)
LIMIT_INDEXES = (
    ("ix_ai_chat_daily_limits_id", ["id"], False),
    # The conflict target of the atomic quota reservation (app/chat/quota.py).
    ("ix_ai_chat_daily_limits_telegram_id", ["telegram_id"], True),
    ("ix_ai_chat_daily_limits_last_reset_date", ["last_reset_date"], False),
)


def upgrade():
    if not table_exists("ai_chat_requests"):
        op.create_table(
            "ai_chat_requests",
            sa.Column("id", sa.Integer(), nullable=False),
            sa.Column("telegram_id", sa.BigInteger(), nullable=False),
            sa.Column("user_id", sa.Integer(), nullable=True),
            sa.Column("message", sa.Text(), nullable=False),
            sa.Column("response", sa.Text(), nullable=False),
            sa.Column("tokens_used", sa.Integer(), nullable=True),
            sa.Column("request_date", sa.Date(), nullable=False),
            sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
            sa.PrimaryKeyConstraint("id"),
        )
        for name, columns, unique in REQUEST_INDEXES:
            op.create_index(name, "ai_chat_requests", columns, unique=unique)
    if not table_exists("ai_chat_daily_limits"):
        op.create_table(
            "ai_chat_daily_limits",
            sa.Column("id", sa.Integer(), nullable=False),
            sa.Column("telegram_id", sa.BigInteger(), nullable=False),
            sa.Column("request_count", sa.Integer(), nullable=False),
            sa.Column("last_reset_date", sa.Date(), nullable=False),
            sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
            sa.Column("updated_at", sa.DateTime(timezone=True), nullable=True),
            sa.PrimaryKeyConstraint("id"),
        )
        for name, columns, unique in LIMIT_INDEXES:
            op.create_index(name, "ai_chat_daily_limits", columns, unique=unique)


def downgrade():
    op.drop_table("ai_chat_daily_limits")
    op.drop_table("ai_chat_requests")
