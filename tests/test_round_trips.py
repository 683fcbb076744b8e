"""Database work per POST /v1/chat/send, counted, not timed.

Every statement the app sends to PostgreSQL is a network round trip, and a
send's own time is mostly round trips. The budget: 2 statements for an
answered send (the reservation with the user's settings and the context in
one, then the save) and 1 for a 429; the failed and idempotent paths are
pinned at their current cost so that a regression shows.

Counted at the driver: every ``cursor.execute`` on the app's pooled psycopg2
connections, whether it comes from the ORM or from the hot path's raw
connection (app/sql.py). The engine runs in autocommit mode, so a statement
outside an explicit transaction is exactly one round trip; a transaction's
BEGIN and COMMIT are statements here too. The pool is warmed by an earlier
request, as it is in production.
"""

from __future__ import annotations

import re

import psycopg2.extensions
import pytest
from sqlalchemy import event

from app.extensions import db
from tests.conftest import Api
from tests.fake_llm import ok, status

_WRITE = re.compile(r"\b(INSERT INTO|(?<!FOR )UPDATE|DELETE FROM)\s+(\w+)")
_READ = re.compile(r"\b(?:FROM|JOIN)\s+(\w+)")
_TIMEOUTS = re.compile(r"^(?:SET LOCAL \w+ = \d+; )+")


class SqlCounter:
    """What the app sent to the database since the last ``reset``."""

    def __init__(self):
        self.statements: list[str] = []
        self.parameters: list = []  # each statement's bound values

    def reset(self) -> None:
        self.statements = []
        self.parameters = []

    def cursor_factory(self):
        counter = self

        class CountingCursor(psycopg2.extensions.cursor):
            def execute(self, query, vars=None):
                text = query.decode() if isinstance(query, bytes) else query
                counter.statements.append(" ".join(text.split()))
                counter.parameters.append(vars)
                return super().execute(query, vars)

        return CountingCursor

    def tables_touched(self) -> list[str]:
        """Each statement as its first write and table, e.g. "INSERT ai_chat_requests"
        (whatever a CTE reads first), or "SELECT" and every table it reads."""
        touched = []
        for statement in self.statements:
            statement = _TIMEOUTS.sub("", statement)
            write = _WRITE.search(statement)
            if write:
                touched.append(f"{write[1].split()[0]} {write[2]}")
            else:
                touched.append("SELECT " + ",".join(sorted(set(_READ.findall(statement)))))
        return touched


@pytest.fixture
def counted(make_app):
    """An app whose connections report to a ``SqlCounter``: ``counted()`` → (api, counter)."""

    def build(**overrides):
        app = make_app(**overrides)
        counter = SqlCounter()
        factory = counter.cursor_factory()
        with app.app_context():

            @event.listens_for(db.engine, "connect")
            def _count(dbapi_connection, _record):
                dbapi_connection.cursor_factory = factory

        return Api(app.test_client()), counter

    return build


def warm_up(api, telegram_id: int = 999) -> None:
    """One answered send of another user: the pool holds a live connection."""
    assert api.send(telegram_id=telegram_id).status_code == 200


def test_every_statement_carries_the_timeouts(counted):
    api, counter = counted()
    warm_up(api)
    api.history(telegram_id=999)

    assert counter.statements
    assert all(
        statement.startswith("SET LOCAL statement_timeout = 5000; SET LOCAL lock_timeout = 3000;")
        for statement in counter.statements
    ), counter.statements


# --- answered sends -------------------------------------------------------------


@pytest.mark.parametrize("past_sends", [0, 3], ids=["new_user", "existing_user"])
def test_answered_send_takes_two_statements(counted, fake_llm, sql, past_sends):
    api, counter = counted()
    warm_up(api)
    for number in range(past_sends):
        assert api.send(telegram_id=7, message=f"Вопрос {number}").status_code == 200
    counter.reset()

    response = api.send(telegram_id=7, message="Новый вопрос")

    assert response.status_code == 200
    assert counter.tables_touched() == ["INSERT ai_chat_daily_limits", "INSERT ai_chat_requests"]
    # The context read really happened: the past exchanges reached the model.
    assert len(fake_llm.requests[-1]["body"]["messages"]) == 2 + 2 * past_sends
    assert sql("SELECT count(*) FROM ai_chat_requests WHERE telegram_id = 7") == [
        (past_sends + 1,)
    ]


# --- refused and failed sends --------------------------------------------------------


def test_send_over_the_daily_limit_takes_one_statement(counted, sql):
    api, counter = counted(DAILY_LIMIT="1")
    assert api.send(telegram_id=7).status_code == 200
    counter.reset()

    response = api.send(telegram_id=7)

    assert response.status_code == 429
    assert counter.tables_touched() == ["INSERT ai_chat_daily_limits"]
    assert sql("SELECT request_count FROM ai_chat_daily_limits WHERE telegram_id = 7") == [(1,)]


def test_failed_send_takes_two_statements_reserve_and_refund(counted, fake_llm, sql):
    api, counter = counted(OPENAI_MAX_RETRIES="0")
    warm_up(api)
    fake_llm.script(status(500))
    counter.reset()

    response = api.send(telegram_id=7)

    assert response.status_code == 502
    assert counter.tables_touched() == [
        "INSERT ai_chat_daily_limits",
        "UPDATE ai_chat_daily_limits",
    ]
    assert sql("SELECT request_count FROM ai_chat_daily_limits WHERE telegram_id = 7") == [(0,)]


def test_failed_send_costs_no_extra_statement_per_llm_retry(counted, fake_llm):
    api, counter = counted(OPENAI_MAX_RETRIES="2", OPENAI_RETRY_BASE_DELAY="0")
    warm_up(api)
    fake_llm.script(status(500), status(503), status(500))
    counter.reset()

    response = api.send(telegram_id=7)

    assert response.status_code == 502
    assert fake_llm.outcomes[-3:] == ["status:500", "status:503", "status:500"]
    assert len(counter.statements) == 2


# --- idempotent sends (request_id) --------------------------------------------------


def test_answered_send_with_request_id_takes_three_statements(counted):
    api, counter = counted()
    warm_up(api)
    counter.reset()

    response = api.send(telegram_id=7, request_id="r-1")

    assert response.status_code == 200
    # Claim the key; reserve (+ context); save and point the key at the row.
    assert counter.tables_touched() == [
        "INSERT ai_chat_idempotency_keys",
        "INSERT ai_chat_daily_limits",
        "INSERT ai_chat_requests",
    ]


def test_replayed_send_takes_two_statements_and_no_llm_call(counted, fake_llm):
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
    # The claim attempt, then the stored answer with today's usage.
    assert counter.tables_touched() == [
        "INSERT ai_chat_idempotency_keys",
        "SELECT ai_chat_daily_limits,ai_chat_idempotency_keys,ai_chat_requests,"
        "ai_chat_user_settings",
    ]
