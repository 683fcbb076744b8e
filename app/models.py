"""The service's tables. Names, columns and indexes match what the old service's
``create_all`` made (the main server keeps reading them, and production
databases hold them full of rows); anything added comes through a migration."""

from __future__ import annotations

from datetime import UTC

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    Date,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    Numeric,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.exc import SQLAlchemyError

from app.extensions import db

# Alembic's state of this service's schema. The main server keeps its own in
# ``alembic_version`` of the same database, which we never read or write.
MIGRATION_VERSION_TABLE = "ai_chat_alembic_version"


# Money: exact decimals in PostgreSQL. The app reads and writes it through the
# DBAPI (Decimal in psycopg2); ``asdecimal=False`` keeps SQLAlchemy from
# converting (and warning) on SQLite, which has no decimal type.
MONEY = Numeric(18, 8, asdecimal=False)


class UTCDateTime(TypeDecorator):
    """TIMESTAMPTZ that always comes back aware, SQLite included (it has no
    time zones and would hand back naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value, dialect):
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class ChatRequest(db.Model):
    """One answered exchange: the seller's message and the assistant's reply."""

    __tablename__ = "ai_chat_requests"

    id = Column(Integer, primary_key=True)
    telegram_id = Column(BigInteger, nullable=False)
    user_id = Column(Integer, nullable=True)
    message = Column(Text, nullable=False)
    response = Column(Text, nullable=False)
    # Nullable as the old service made it; this service always writes it.
    tokens_used = Column(Integer, nullable=True)
    request_date = Column(Date, nullable=False)
    created_at = Column(UTCDateTime(), nullable=False)
    # The model that answered; null on rows the old service wrote.
    model = Column(String(200), nullable=True)
    # The seller-data tools the answer ran, comma-separated ("" = none).
    tools = Column(Text, nullable=True)
    # The answer's tokens (every tool round included) and their cost in
    # PRICE_CURRENCY (null: the model has no price); null on old rows.
    prompt_tokens = Column(Integer, nullable=True)
    completion_tokens = Column(Integer, nullable=True)
    cost = Column(MONEY, nullable=True)

    __table_args__ = (
        # The old service's indexes (index=True on these columns).
        Index("ix_ai_chat_requests_id", "id"),
        Index("ix_ai_chat_requests_telegram_id", "telegram_id"),
        Index("ix_ai_chat_requests_user_id", "user_id"),
        Index("ix_ai_chat_requests_request_date", "request_date"),
        Index("ix_ai_chat_requests_created_at", "created_at"),
        # History and context read a user's newest rows; stats a date range.
        Index("ix_ai_chat_requests_telegram_id_id", "telegram_id", "id"),
        Index("ix_ai_chat_requests_telegram_id_request_date", "telegram_id", "request_date"),
    )


class DailyLimit(db.Model):
    """A user's answers on ``last_reset_date``; the row is the quota's lock."""

    __tablename__ = "ai_chat_daily_limits"

    id = Column(Integer, primary_key=True)
    telegram_id = Column(BigInteger, nullable=False)
    request_count = Column(Integer, nullable=False)
    last_reset_date = Column(Date, nullable=False)
    created_at = Column(UTCDateTime(), nullable=False)
    # Nullable as the old service made it: its writers insert rows without it.
    updated_at = Column(UTCDateTime(), nullable=True)
    # The cost of the counter day's model calls, and the estimate held by the
    # answers in flight: the spend cap is checked against both, in the
    # reservation itself (app/chat/quota.py). Null = nothing spent.
    spend = Column(MONEY, nullable=True)
    spend_reserved = Column(MONEY, nullable=True)

    __table_args__ = (
        Index("ix_ai_chat_daily_limits_id", "id"),
        # The conflict target of the atomic reservation (app/chat/quota.py).
        Index("ix_ai_chat_daily_limits_telegram_id", "telegram_id", unique=True),
        Index("ix_ai_chat_daily_limits_last_reset_date", "last_reset_date"),
    )


class IdempotencyKey(db.Model):
    """A ``request_id`` claimed by a user: in flight while ``chat_request_id`` is
    NULL, answered once it points at the stored exchange."""

    __tablename__ = "ai_chat_idempotency_keys"

    id = Column(Integer, primary_key=True)
    telegram_id = Column(BigInteger, nullable=False)
    request_id = Column(String(128), nullable=False)
    message_sha256 = Column(String(64), nullable=False)
    # Who holds the claim: only that request may complete or release it.
    claim_token = Column(String(32), nullable=True)
    chat_request_id = Column(
        Integer, ForeignKey("ai_chat_requests.id", ondelete="CASCADE"), nullable=True
    )
    claimed_at = Column(UTCDateTime(), nullable=False)

    __table_args__ = (
        # The database, not a process lock, decides who owns a key.
        UniqueConstraint("telegram_id", "request_id", name="uq_ai_chat_idempotency_keys_key"),
        # Deleting a user's history cascades here; without it, a scan per row.
        Index("ix_ai_chat_idempotency_keys_chat_request_id", "chat_request_id"),
    )


class UserSettings(db.Model):
    """A seller's own settings; null columns mean "the service default"."""

    __tablename__ = "ai_chat_user_settings"

    telegram_id = Column(BigInteger, primary_key=True, autoincrement=False)
    preferred_model = Column(String(200), nullable=True)
    # 0 = unlimited, as DAILY_LIMIT; read inside the quota reservation itself.
    daily_limit = Column(Integer, nullable=True)
    updated_at = Column(UTCDateTime(), nullable=False)
    # Money a day in PRICE_CURRENCY (null = DAILY_SPEND_LIMIT applies).
    daily_spend_limit = Column(MONEY, nullable=True)

    __table_args__ = (
        CheckConstraint("daily_limit IS NULL OR daily_limit >= 0",
                        name="ck_ai_chat_user_settings_limit"),
    )


class LLMCall(db.Model):
    """One call of a model and what it cost: the answer, a tool round before
    it, or a summary of older exchanges (the spend report's rows)."""

    __tablename__ = "ai_chat_llm_calls"

    id = Column(BigInteger().with_variant(Integer(), "sqlite"), primary_key=True)
    telegram_id = Column(BigInteger, nullable=False)
    # Kept when the history is deleted (spend is the operator's record).
    chat_request_id = Column(
        Integer, ForeignKey("ai_chat_requests.id", ondelete="SET NULL"), nullable=True
    )
    purpose = Column(String(16), nullable=False)
    model = Column(String(200), nullable=True)
    prompt_tokens = Column(Integer, nullable=False)
    completion_tokens = Column(Integer, nullable=False)
    cost = Column(MONEY, nullable=True)
    usage_date = Column(Date, nullable=False)  # the quota day, service time zone
    created_at = Column(UTCDateTime(), nullable=False)

    __table_args__ = (
        CheckConstraint("purpose IN ('answer', 'tool_round', 'summary')",
                        name="ck_ai_chat_llm_calls_purpose"),
        Index("ix_ai_chat_llm_calls_usage_date", "usage_date"),
        # Covering (migration 0007): the spend report by user sums these columns
        # in this index's order without reading the table.
        Index("ix_ai_chat_llm_calls_telegram_id_usage_date_cover", "telegram_id", "usage_date",
              postgresql_include=["purpose", "prompt_tokens", "completion_tokens", "cost"]),
        Index("ix_ai_chat_llm_calls_chat_request_id", "chat_request_id"),
    )


class Summary(db.Model):
    """A seller's rolling summary of the exchanges older than the context
    window, written off the request's path (app/chat/memory.py)."""

    __tablename__ = "ai_chat_summaries"

    telegram_id = Column(BigInteger, primary_key=True, autoincrement=False)
    summary = Column(Text, nullable=True)
    # The newest ai_chat_requests.id folded into the summary.
    covers_until = Column(Integer, nullable=True)
    # A fold is due (durable: a restart loses nothing); null when none is.
    due_at = Column(UTCDateTime(), nullable=True)
    # Who folds now, until when: one process per user at a time.
    lease_token = Column(String(32), nullable=True)
    lease_until = Column(UTCDateTime(), nullable=True)
    failures = Column(Integer, nullable=False)
    updated_at = Column(UTCDateTime(), nullable=False)

    __table_args__ = (
        Index("ix_ai_chat_summaries_due_at", "due_at",
              postgresql_where=text("due_at IS NOT NULL"),
              sqlite_where=text("due_at IS NOT NULL")),
    )


def begin_transaction() -> None:
    """Make the session's next statements one transaction, ended by its
    commit or rollback. The engine runs in autocommit mode (app/config.py),
    so units of more than one statement ask for this explicitly, with the
    isolation level that turns autocommit off (SQLite knows no READ COMMITTED)."""
    postgresql = db.engine.dialect.name == "postgresql"
    level = "READ COMMITTED" if postgresql else "SERIALIZABLE"
    db.session.connection(execution_options={"isolation_level": level})


def ping_database() -> None:
    """``SELECT 1``; raises SQLAlchemyError (after a rollback) when it fails."""
    try:
        db.session.execute(text("SELECT 1"))
        db.session.commit()
    except SQLAlchemyError:
        db.session.rollback()
        raise
