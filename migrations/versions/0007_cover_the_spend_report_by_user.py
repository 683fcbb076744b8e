"""Cover the spend report by user: the (telegram_id, usage_date) index of
ai_chat_llm_calls carries the columns the report sums.

``GET /v1/chat/usage?group_by=user`` over a long range aggregates every call
of the range per user in telegram_id order. The planner walks the
(telegram_id, usage_date) index for that order, and fetched each call's row
from the table for its purpose, tokens and cost: a million random heap reads
for a million calls (bench/RESULTS.md, "Spend report over a million model
calls": 0.6-1.4 s). With those four columns in the index (INCLUDE, not part
of the key) the same walk is an index-only scan (0.25-0.3 s). It replaces the
index it extends, whose lookups (a seller's range: stats, the spend of a
day) it serves as well. Built, then the old one dropped, concurrently: the
table takes a row per model call.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02
"""

from app.migration_ops import create_index, drop_index

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

TABLE = "ai_chat_llm_calls"
OLD = "ix_ai_chat_llm_calls_telegram_id_usage_date"
NEW = "ix_ai_chat_llm_calls_telegram_id_usage_date_cover"
COVERED = ["purpose", "prompt_tokens", "completion_tokens", "cost"]


def upgrade():
    create_index(NEW, TABLE, ["telegram_id", "usage_date"], include=COVERED)
    drop_index(OLD, TABLE)


def downgrade():
    create_index(OLD, TABLE, ["telegram_id", "usage_date"])
    drop_index(NEW, TABLE)
