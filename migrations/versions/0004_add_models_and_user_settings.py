"""Record which model answered, and add per-user settings.

``ai_chat_requests.model`` is nullable: rows the old service wrote (and the
main server's, if it writes any) have none. ``ai_chat_user_settings`` holds a
seller's preferred model and own daily limit (null = the service defaults);
the quota reservation reads the limit inside its one atomic statement.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

from app.migration_ops import add_column, table_exists

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade():
    add_column("ai_chat_requests", sa.Column("model", sa.String(length=200), nullable=True))
    if not table_exists("ai_chat_user_settings"):
        op.create_table(
            "ai_chat_user_settings",
            sa.Column("telegram_id", sa.BigInteger(), nullable=False),
            sa.Column("preferred_model", sa.String(length=200), nullable=True),
            sa.Column("daily_limit", sa.Integer(), nullable=True),
            sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
            sa.PrimaryKeyConstraint("telegram_id"),
            sa.CheckConstraint(
                "daily_limit IS NULL OR daily_limit >= 0", name="ck_ai_chat_user_settings_limit"
            ),
        )


def downgrade():
    op.drop_table("ai_chat_user_settings")
    op.drop_column("ai_chat_requests", "model")
