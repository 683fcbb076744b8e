"""Add ai_chat_summaries: one rolling summary of a seller's older exchanges.

``summary`` covers the exchanges up to ``covers_until`` (an ai_chat_requests
id); it is written off the request's path. ``due_at`` is the durable "a fold
is due" marker (a restart loses nothing: whoever finds it due later does
it); ``lease_token`` / ``lease_until`` make one process at a time the owner
of a user's fold without holding a connection or a session lock while the
model writes (PgBouncer-safe); ``failures`` spaces out the retries of a fold
that keeps failing.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

from app.migration_ops import create_index, table_exists

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade():
    if not table_exists("ai_chat_summaries"):
        op.create_table(
            "ai_chat_summaries",
            sa.Column("telegram_id", sa.BigInteger(), autoincrement=False, nullable=False),
            sa.Column("summary", sa.Text(), nullable=True),
            sa.Column("covers_until", sa.Integer(), nullable=True),
            sa.Column("due_at", sa.DateTime(timezone=True), nullable=True),
            sa.Column("lease_token", sa.String(length=32), nullable=True),
            sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
            sa.Column("failures", sa.Integer(), nullable=False),
            sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
            sa.PrimaryKeyConstraint("telegram_id"),
        )
    # The sweeper looks for due folds only: a small partial index.
    create_index("ix_ai_chat_summaries_due_at", "ai_chat_summaries", ["due_at"],
                 where="due_at IS NOT NULL")


def downgrade():
    op.drop_table("ai_chat_summaries")
