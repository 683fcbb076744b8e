"""The service's tables. Names and columns match the existing service so the
main server keeps reading them; anything added comes through a migration."""

from __future__ import annotations

from datetime import UTC

from sqlalchemy import (
    BigInteger,
    Column,
    Date,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.exc import SQLAlchemyError

from app.extensions import db


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
    tokens_used = Column(Integer, nullable=False, default=0)
    request_date = Column(Date, nullable=False)
    created_at = Column(UTCDateTime(), nullable=False)

    __table_args__ = (
        # History and context read a user's newest rows; stats a date range.
        Index("ix_ai_chat_requests_telegram_id_id", "telegram_id", "id"),
        Index("ix_ai_chat_requests_telegram_id_request_date", "telegram_id", "request_date"),
    )


class DailyLimit(db.Model):
    """A user's answers on ``last_reset_date``; the row is the quota's lock."""

    __tablename__ = "ai_chat_daily_limits"

    id = Column(Integer, primary_key=True)
    telegram_id = Column(BigInteger, nullable=False)
    request_count = Column(Integer, nullable=False, default=0)
    last_reset_date = Column(Date, nullable=False)
    created_at = Column(UTCDateTime(), nullable=False)
    updated_at = Column(UTCDateTime(), nullable=False)

    __table_args__ = (
        # The conflict target of the atomic reservation (app/chat/quota.py).
        UniqueConstraint("telegram_id", name="uq_ai_chat_daily_limits_telegram_id"),
    )


class IdempotencyKey(db.Model):
    """A ``request_id`` claimed by a user: in flight while ``chat_request_id`` is
    NULL, answered once it points at the stored exchange."""

    __tablename__ = "ai_chat_idempotency_keys"

    id = Column(Integer, primary_key=True)
    telegram_id = Column(BigInteger, nullable=False)
    request_id = Column(String(128), nullable=False)
    message_sha256 = Column(String(64), nullable=False)
    chat_request_id = Column(
        Integer, ForeignKey("ai_chat_requests.id", ondelete="CASCADE"), nullable=True
    )
    claimed_at = Column(UTCDateTime(), nullable=False)

    __table_args__ = (
        # The database, not a process lock, decides who owns a key.
        UniqueConstraint("telegram_id", "request_id", name="uq_ai_chat_idempotency_keys_key"),
    )


def transaction_isolation(dialect_name: str) -> str:
    """The isolation level that turns autocommit off (SQLite knows no READ COMMITTED)."""
    return "READ COMMITTED" if dialect_name == "postgresql" else "SERIALIZABLE"


def begin_transaction() -> None:
    """Make the session's next statements one transaction, ended by its
    commit or rollback. The engine runs in autocommit mode (app/config.py),
    so units of more than one statement ask for this explicitly."""
    level = transaction_isolation(db.engine.dialect.name)
    db.session.connection(execution_options={"isolation_level": level})


def ping_database() -> None:
    """``SELECT 1``; raises SQLAlchemyError (after a rollback) when it fails."""
    try:
        db.session.execute(text("SELECT 1"))
        db.session.commit()
    except SQLAlchemyError:
        db.session.rollback()
        raise
