"""Database work per POST /v1/chat/send, counted, not timed.

Every statement the app sends to PostgreSQL is a network round trip, and a
send's own time is mostly round trips. The issue's budget: at most 3
statements for an answered send (reserve, read context, save) and 1 for a
429. The failed path (refund) and the idempotent paths are pinned at their
current cost so that a regression shows.

Counted with SQLAlchemy events on the app's own engine: ``before_cursor_execute``
for statements and ``begin`` for transactions. psycopg2 adds a BEGIN and a
COMMIT/ROLLBACK round trip per transaction that are not statements here, so
the network round trips of a send are statements + 2 x transactions.
The pool is warmed by an earlier request, as it is in production.
"""

from __future__ import annotations

import re

import pytest
from sqlalchemy import event

from app.extensions import db
from tests.conftest import Api
from tests.fake_llm import ok, status

_TABLE = re.compile(r"\b(?:INTO|FROM|UPDATE)\s+(\w+)", re.IGNORECASE)


class SqlCounter:
    """What the app sent to the database since the last ``reset``."""

    def __init__(self):
        self.statements: list[str] = []
        self.transactions = 0

    def reset(self) -> None:
        self.statements = []
        self.transactions = 0

    def on_statement(self, conn, cursor, statement, parameters, context, executemany):
        self.statements.append(" ".join(statement.split()))

    def on_begin(self, conn):
        self.transactions += 1

    def tables_touched(self) -> list[str]:
        """The first verb and the table of each statement, e.g. "INSERT ai_chat_requests"."""
        touched = []
        for statement in self.statements:
            table = _TABLE.search(statement)
            touched.append(f"{statement.split()[0].upper()} {table[1] if table else '?'}")
        return touched


@pytest.fixture
def counted(make_app):
    """Builds an app whose engine reports to a ``SqlCounter``: ``counted()`` → (api, counter)."""
    apps = {}

    def build(**overrides):
        app = make_app(**overrides)
        with app.app_context():
            engine = db.engine
        counter = SqlCounter()
        event.listen(engine, "before_cursor_execute", counter.on_statement)
        event.listen(engine, "begin", counter.on_begin)
        apps[engine] = counter
        return Api(app.test_client()), counter

    yield build
    for engine, counter in apps.items():
        event.remove(engine, "before_cursor_execute", counter.on_statement)
        event.remove(engine, "begin", counter.on_begin)


def warm_up(api, telegram_id: int = 999) -> None:
    """One answered send of another user: the pool holds a live connection."""
    assert api.send(telegram_id=telegram_id).status_code == 200


# --- answered sends -------------------------------------------------------------


@pytest.mark.parametrize("past_sends", [0, 3], ids=["new_user", "existing_user"])
def test_answered_send_takes_at_most_three_statements(counted, fake_llm, sql, past_sends):
    api, counter = counted()
    warm_up(api)
    for number in range(past_sends):
        assert api.send(telegram_id=7, message=f"Вопрос {number}").status_code == 200
    counter.reset()

    response = api.send(telegram_id=7, message="Новый вопрос")

    assert response.status_code == 200
    assert len(counter.statements) <= 3, counter.tables_touched()
    # The context read really happened: the past exchanges reached the model.
    assert len(fake_llm.requests[-1]["body"]["messages"]) == 2 + 2 * past_sends
    assert sql("SELECT count(*) FROM ai_chat_requests WHERE telegram_id = 7") == [
        (past_sends + 1,)
    ]


def test_answered_send_takes_at_most_two_transactions(counted):
    api, counter = counted()
    warm_up(api)
    counter.reset()

    response = api.send(telegram_id=7)

    assert response.status_code == 200
    # One before the LLM call (reserve + context), one after it (save).
    assert counter.transactions <= 2


def test_answered_send_statements_are_reserve_context_and_save(counted):
    api, counter = counted()
    warm_up(api)
    counter.reset()

    assert api.send(telegram_id=7).status_code == 200

    touched = counter.tables_touched()
    assert touched[0] == "INSERT ai_chat_daily_limits"
    assert touched[-1] == "INSERT ai_chat_requests"


# --- refused and failed sends --------------------------------------------------------


def test_send_over_the_daily_limit_takes_one_statement(counted, sql):
    api, counter = counted(DAILY_LIMIT="1")
    assert api.send(telegram_id=7).status_code == 200
    counter.reset()

    response = api.send(telegram_id=7)

    assert response.status_code == 429
    assert counter.tables_touched() == ["INSERT ai_chat_daily_limits"]
    assert counter.transactions == 1
    assert sql("SELECT request_count FROM ai_chat_daily_limits WHERE telegram_id = 7") == [(1,)]


def test_failed_send_takes_three_statements_reserve_context_refund(counted, fake_llm, sql):
    api, counter = counted(OPENAI_MAX_RETRIES="0")
    warm_up(api)
    fake_llm.script(status(500))
    counter.reset()

    response = api.send(telegram_id=7)

    assert response.status_code == 502
    assert counter.tables_touched() == [
        "INSERT ai_chat_daily_limits",
        "SELECT ai_chat_requests",
        "UPDATE ai_chat_daily_limits",
    ]
    # The reservation commits before the LLM call; the refund is its own transaction.
    assert counter.transactions == 2
    assert sql("SELECT request_count FROM ai_chat_daily_limits WHERE telegram_id = 7") == [(0,)]


def test_failed_send_costs_no_extra_statement_per_llm_retry(counted, fake_llm):
    api, counter = counted(OPENAI_MAX_RETRIES="2", OPENAI_RETRY_BASE_DELAY="0")
    warm_up(api)
    fake_llm.script(status(500), status(503), status(500))
    counter.reset()

    response = api.send(telegram_id=7)

    assert response.status_code == 502
    assert fake_llm.outcomes[-3:] == ["status:500", "status:503", "status:500"]
    assert len(counter.statements) == 3


# --- idempotent sends (request_id) --------------------------------------------------


def test_answered_send_with_request_id_takes_at_most_five_statements(counted):
    api, counter = counted()
    warm_up(api)
    counter.reset()

    response = api.send(telegram_id=7, request_id="r-1")

    assert response.status_code == 200
    # Claim the key, reserve, context, save, point the key at the saved row.
    assert len(counter.statements) <= 5, counter.tables_touched()


def test_replayed_send_takes_at_most_three_statements_and_no_llm_call(counted, fake_llm):
    api, counter = counted()
    fake_llm.script(ok("Сохранённый ответ"))
    first = api.send(telegram_id=7, request_id="r-1")
    assert first.status_code == 200
    calls = fake_llm.calls
    counter.reset()

    replay = api.send(telegram_id=7, request_id="r-1")

    assert replay.status_code == 200
    assert replay.get_json()["response"] == "Сохранённый ответ"
    assert fake_llm.calls == calls
    # Claim attempt, lookup of the stored answer, today's usage.
    assert len(counter.statements) <= 3, counter.tables_touched()
