"""The invariants checked after a fault-injection run (tests/fault_run.py),
one function each, every one returning its violations as sentences that name
the user and the request (goal: none).

What a client was given decides: an answer is *delivered* when a client got
it (send's 200, a stream's ``done``), once per question (the attempts of one
key are one question; a replayed answer is the same answer). Whatever the
faults, for every user:

- the quota counter equals the answers delivered, and neither exceeds the
  daily limit;
- every delivered answer is among the user's stored exchanges (as a
  multiset), except an answer the service logged as "delivered without its
  history row" (its save failed after retries, which the contract allows);
  and nothing is stored that nobody was given;
- every request got an HTTP answer, and one the contract allows for it
  (never a 500 or ``internal_error``); every stream of an ordinary client
  ended with ``done`` or ``error``, its deltas joined to its answer.

And for the service: no idempotency key left claimed, no session of it left
inside a transaction, no traceback or unexpected error in its log.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterable
from contextlib import closing
from dataclasses import dataclass
from datetime import date

import psycopg2

from tests.fault_clients import Record

# What the contract lets each request end with under these faults: (kind,
# status, code). A refusal before the model is JSON for both kinds.
REFUSALS = {
    (429, "daily_limit_exceeded"),
    (502, "llm_unavailable"),
    (503, "database_unavailable"),
    (503, "service_unavailable"),
    (504, "llm_timeout"),
}
ALLOWED = {
    ("send", 200, None),
    ("stream", 200, "done"),
    ("stream", 200, "llm_unavailable"),
    ("stream", 200, "llm_timeout"),
    *(("send", status, code) for status, code in REFUSALS),
    *(("stream", status, code) for status, code in REFUSALS),
}
# Lines of the service's log that mean a unit, a key or an answer was lost.
LOSSES = (
    "not refunded",
    "left claimed until it expires",
    "claim taken over while answering",
)
ROWLESS = "answer delivered without its history row"


@dataclass(frozen=True)
class Stored:
    """What the service's database holds after the run."""

    counters: dict[int, tuple[int, date]]  # telegram_id -> (request_count, last_reset_date)
    responses: dict[int, list[str]]  # telegram_id -> stored answers
    claimed_keys: list[tuple[int, str]]
    open_transactions: list[tuple[int, str]]  # (pid, state) of the service's sessions


def read_database(dsn: str) -> Stored:
    with closing(psycopg2.connect(dsn, connect_timeout=5)) as connection:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT telegram_id, request_count, last_reset_date FROM ai_chat_daily_limits"
            )
            counters = {user: (count, day) for user, count, day in cursor.fetchall()}
            cursor.execute("SELECT telegram_id, response FROM ai_chat_requests")
            responses: dict[int, list[str]] = defaultdict(list)
            for user, response in cursor.fetchall():
                responses[user].append(response)
            cursor.execute(
                "SELECT telegram_id, request_id FROM ai_chat_idempotency_keys "
                "WHERE chat_request_id IS NULL ORDER BY telegram_id, request_id"
            )
            claimed = cursor.fetchall()
            cursor.execute(
                "SELECT pid, state FROM pg_stat_activity WHERE datname = current_database() "
                "AND application_name = 'ai_chat' AND state LIKE 'idle in transaction%%'"
            )
            open_transactions = cursor.fetchall()
    return Stored(counters, dict(responses), claimed, open_transactions)


def delivered_answers(records: Iterable[Record]) -> dict[int, list[Record]]:
    """Per user, the record that delivered each answered question (one per question)."""
    first: dict[tuple[int, str], Record] = {}
    for record in records:
        if record.delivered is not None:
            first.setdefault((record.user, record.question), record)
    answers: dict[int, list[Record]] = defaultdict(list)
    for (user, _), record in first.items():
        answers[user].append(record)
    return answers


def log_records(log: str) -> list[dict]:
    """The service's JSON log lines (gunicorn's own lines are not JSON)."""
    found = []
    for raw in log.splitlines():
        try:
            line = json.loads(raw)
        except ValueError:
            continue
        if isinstance(line, dict):
            found.append(line)
    return found


def rowless_request_ids(log: str) -> set[str]:
    """Requests whose answer was delivered although its save failed after retries."""
    return {line.get("request_id") for line in log_records(log)
            if line.get("message") == ROWLESS}


# --- the invariants ------------------------------------------------------------


def counters_equal_answers(records: list[Record], stored: Stored, daily_limit: int,
                           today: date) -> list[str]:
    answers = delivered_answers(records)
    users = {record.user for record in records} | set(stored.counters)
    violations = []
    for user in sorted(users):
        count, day = stored.counters.get(user, (0, today))
        given = len(answers.get(user, []))
        if day != today and count:
            violations.append(f"user {user}: counter of {day}, not of today ({today})")
        if count != given:
            violations.append(f"user {user}: counter {count}, answers delivered {given} "
                              f"({_roles(records, user)})")
        if daily_limit and max(count, given) > daily_limit:
            violations.append(f"user {user}: {max(count, given)} answers, over the daily "
                              f"limit {daily_limit}")
    return violations


def answers_are_in_history(records: list[Record], stored: Stored,
                           rowless: set[str]) -> list[str]:
    violations = []
    answers = delivered_answers(records)
    for user in sorted(set(answers) | set(stored.responses)):
        kept = Counter(stored.responses.get(user, []))
        for record in answers.get(user, []):
            if kept[record.delivered] > 0:
                kept[record.delivered] -= 1
            elif record.request_id not in rowless:
                violations.append(f"user {user}: the answer of {record.request_id} "
                                  f"({record.outcome}) was delivered but is not in history")
        for text, left in kept.items():
            if left > 0:
                violations.append(f"user {user}: {left} stored answer(s) nobody was given: "
                                  f"{text[:70]!r}")
    return violations


def outcomes_are_allowed(records: list[Record]) -> list[str]:
    violations = []
    for record in records:
        if record.status == 500 or record.code == "internal_error":
            violations.append(f"{record.request_id}: {record.outcome}")
        elif record.role == "ordinary":
            violations += _ordinary_outcome(record)
        elif record.role == "leaver" and record.status == 200 and record.code != "left":
            violations.append(f"{record.request_id}: a leaver's stream ended before its "
                              f"first delta ({record.outcome})")
    return violations


def _ordinary_outcome(record: Record) -> list[str]:
    if record.status is None:
        return [f"{record.request_id}: no HTTP answer ({record.failure})"]
    if record.failure == "cut":
        return [f"{record.request_id}: the stream ended with neither done nor error"]
    code = None if record.kind == "send" and record.status == 200 else record.code
    if (record.kind, record.status, code) not in ALLOWED:
        return [f"{record.request_id}: unexpected outcome {record.outcome}"]
    if record.code == "done" and record.deltas != record.delivered:
        return [f"{record.request_id}: the deltas do not join to done's answer"]
    return []


def no_key_left_claimed(stored: Stored) -> list[str]:
    return [f"user {user}: idempotency key {key!r} left claimed"
            for user, key in stored.claimed_keys]


def no_session_left_in_a_transaction(stored: Stored) -> list[str]:
    return [f"PostgreSQL session {pid} of the service left {state!r}"
            for pid, state in stored.open_transactions]


def log_is_clean(log: str) -> list[str]:
    violations = []
    for raw in log.splitlines():
        if "Traceback" in raw or "unexpected error" in raw:
            violations.append(f"service log: {raw[:300]}")
    for line in log_records(log):
        message = str(line.get("message", ""))
        if any(loss in message for loss in LOSSES):
            violations.append(f"service log, request {line.get('request_id')}: {message}")
    return violations


def normal_send_answers_in_time(record: Record, within: float) -> list[str]:
    if record.status == 200 and record.seconds <= within:
        return []
    return [f"a normal send after the run: {record.outcome} in {record.seconds:.2f} s "
            f"(wanted 200 within {within:g} s)"]


def _roles(records: list[Record], user: int) -> str:
    outcomes = Counter(record.outcome for record in records if record.user == user)
    return ", ".join(f"{outcome} x{count}" for outcome, count in sorted(outcomes.items()))
