"""The invariants checked after a fault-injection run (tests/fault_run.py),
one function each, every one returning its violations as sentences that name
the user and the request (goal: none).

What a client was given decides: an answer is *delivered* when a client got
it (send's 200, a stream's ``done``; a common answer from Redis, ``cached:
true``, is one like any other), once per question (the attempts of one key
are one question; a replayed answer is the same answer).

The operator's actions during the run (tests/fault_clients.py ``operate``)
split each user's questions into epochs (``Record.epoch``: the operations on
the user done before the question began; ``UserGate`` makes every question
fall wholly inside one). A reset zeroes the counter, so it counts only the
answers delivered in the epochs from the last reset on; a deleted history
removes its rows, so history holds only the answers delivered from the last
deletion on; a limit set holds from its epoch on (until the next). Whatever
the faults, for every user:

- the quota counter equals the answers delivered since the user's last
  reset, and no epoch took the counter past the limit then in force (nor
  further past it, when a lowered limit was already exceeded);
- every answer delivered since the user's last deletion is among the user's
  stored exchanges (as a multiset), except an answer the service logged as
  "delivered without its history row" (its save failed after retries, which
  the contract allows); and nothing is stored that nobody was given;
- every 429 had a cause: the user's limit then in force (as its body says,
  never a limit set before), reached by answers and requests in flight of
  the same reset epoch — never a stale refusal (after a reset, a refund or
  a raised limit) served by Redis;
- every prompt the model got for a question holds exchanges of that user
  only, none deleted before it, and the latest answer delivered before the
  question began (unless enough later ones pushed it out of the window):
  never a context left stale in Redis;
- ``GET /v1/chat/limits/{id}`` after the run (twice: the second read is
  Redis's copy of the first) says what PostgreSQL holds: today's counter and
  the user's own limit;
- every request got an HTTP answer, and one the contract allows for it
  (never a 500 or ``internal_error``); every stream of an ordinary client
  ended with ``done`` or ``error``, its deltas joined to its answer; every
  operation ended with a 200 (after 503s while the database was away).

And for the service: no idempotency key left claimed, no session of it left
inside a transaction, no traceback or unexpected error in its log, and
``/health/ready`` 200 whenever the database answered (Redis down only makes
it say ``"redis": "degraded"``).
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from contextlib import closing
from dataclasses import dataclass
from datetime import date

import psycopg2

from tests.fault_clients import QUESTION_TAG, Operation, Readiness, Record

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
# What an operation may answer before its 200 (it is asked again then).
OPERATION_RETRIES = {"503 database_unavailable", "503 service_unavailable"}
# The last message of a prompt for an ordinary question: the question itself.
_ASKED = re.compile(r"^Вопрос #(c\d+-q\d+)# продавца")


@dataclass(frozen=True)
class Stored:
    """What the service's database holds after the run."""

    counters: dict[int, tuple[int, date]]  # telegram_id -> (request_count, last_reset_date)
    responses: dict[int, list[str]]  # telegram_id -> stored answers
    claimed_keys: list[tuple[int, str]]
    open_transactions: list[tuple[int, str]]  # (pid, state) of the service's sessions
    limits: dict[int, int | None]  # telegram_id -> its own daily_limit (None: DAILY_LIMIT)

    def used_today(self, user: int, today: date) -> int:
        """What PostgreSQL says the user used today (a counter of an earlier day: 0)."""
        count, day = self.counters.get(user, (0, today))
        return count if day >= today else 0


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
            cursor.execute("SELECT telegram_id, daily_limit FROM ai_chat_user_settings")
            limits = dict(cursor.fetchall())
    return Stored(counters, dict(responses), claimed, open_transactions, limits)


@dataclass(frozen=True)
class Timeline:
    """The operator's actions on each user, in their order (``operations[user][i]``
    is the one of epoch ``i``): where each user's epochs begin and end."""

    operations: Mapping[int, list[Operation]]
    default_limit: int

    @classmethod
    def of(cls, operations: Iterable[Operation], default_limit: int) -> Timeline:
        by_user: dict[int, list[Operation]] = defaultdict(list)
        for operation in sorted(operations, key=lambda op: (op.user, op.epoch)):
            by_user[operation.user].append(operation)
        return cls(dict(by_user), default_limit)

    def epochs(self, user: int) -> int:
        """The user's last epoch (the one after every operation)."""
        return len(self.operations.get(user, []))

    def since(self, user: int, epoch: int, kind: str) -> int:
        """The first epoch after the last ``kind`` before ``epoch`` (0: none)."""
        for operation in reversed(self.operations.get(user, [])[:epoch]):
            if operation.kind == kind:
                return operation.epoch + 1
        return 0

    def limit(self, user: int, epoch: int) -> int:
        """The user's daily limit in force during ``epoch`` (0: unlimited)."""
        for operation in reversed(self.operations.get(user, [])[:epoch]):
            if operation.kind == "set_limit":
                return self.default_limit if operation.value is None else operation.value
        return self.default_limit

    def undecided(self, user: int) -> bool:
        """An operation that never answered 200 may or may not have happened."""
        return any(not operation.done for operation in self.operations.get(user, []))


def delivered_answers(records: Iterable[Record]) -> dict[int, list[Record]]:
    """Per user, the record that delivered each answered question (one per question)."""
    first: dict[str, Record] = {}
    for record in records:
        if record.delivered is not None:
            first.setdefault(record.question_id, record)
    answers: dict[int, list[Record]] = defaultdict(list)
    for record in first.values():
        answers[record.user].append(record)
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


def counters_equal_answers(records: list[Record], stored: Stored, timeline: Timeline,
                           today: date) -> list[str]:
    answers = delivered_answers(records)
    users = {record.user for record in records} | set(stored.counters) | set(timeline.operations)
    violations = []
    for user in sorted(users):
        if timeline.undecided(user):
            continue  # operations_answered says why
        count, day = stored.counters.get(user, (0, today))
        reset = timeline.since(user, timeline.epochs(user), "reset_limit")
        given = sum(record.epoch >= reset for record in answers.get(user, []))
        if day != today and count:
            violations.append(f"user {user}: counter of {day}, not of today ({today})")
        if count != given:
            since = f" since its reset (epoch {reset})" if reset else ""
            violations.append(f"user {user}: counter {count}, answers delivered {given}{since} "
                              f"({_roles(records, user)})")
        violations += _within_limits(user, answers.get(user, []), timeline)
    return violations


def _within_limits(user: int, answers: list[Record], timeline: Timeline) -> list[str]:
    """Epoch by epoch: a reservation is granted only under the limit in force,
    so an epoch ends at most at that limit (or where it began, when a lowered
    limit was already exceeded)."""
    by_epoch = Counter(record.epoch for record in answers)
    operations = timeline.operations.get(user, [])
    violations = []
    count = 0
    for epoch in range(len(operations) + 1):
        if epoch and operations[epoch - 1].kind == "reset_limit":
            count = 0
        limit = timeline.limit(user, epoch)
        reached = count + by_epoch[epoch]
        if limit and reached > max(count, limit):
            violations.append(f"user {user}: {reached} answers counted in epoch {epoch}, over "
                              f"its daily limit {limit}")
        count = reached
    return violations


def answers_are_in_history(records: list[Record], stored: Stored, rowless: set[str],
                           timeline: Timeline) -> list[str]:
    violations = []
    answers = delivered_answers(records)
    for user in sorted(set(answers) | set(stored.responses)):
        if timeline.undecided(user):
            continue
        deleted = timeline.since(user, timeline.epochs(user), "delete_history")
        kept = Counter(stored.responses.get(user, []))
        for record in answers.get(user, []):
            if record.epoch < deleted:
                continue  # its row went with the history
            if kept[record.delivered] > 0:
                kept[record.delivered] -= 1
            elif record.request_id not in rowless:
                violations.append(f"user {user}: the answer of {record.request_id} "
                                  f"({record.outcome}) was delivered but is not in history")
        for text, left in kept.items():
            if left > 0:
                violations.append(f"user {user}: {left} stored answer(s) nobody was given "
                                  f"since the history was last deleted: {text[:70]!r}")
    return violations


def limits_in_answers_are_current(records: list[Record], timeline: Timeline) -> list[str]:
    """A 200's and a 429's ``daily_limit`` is the limit in force: never one
    set before (a stale Redis entry)."""
    violations = []
    for record in records:
        if record.role != "ordinary" or record.limit is None:
            continue
        limit = timeline.limit(record.user, record.epoch)
        if record.limit != limit:
            violations.append(f"{record.request_id} (user {record.user}, {record.outcome}): "
                              f"daily_limit {record.limit}, but the user's limit is {limit}")
    return violations


def refusals_had_a_cause(records: list[Record], timeline: Timeline,
                         tally: Counter[str] | None = None) -> list[str]:
    """Every 429 came when the user's units could have reached the limit in
    force. An upper bound of the units taken at any moment of the refused
    request: the questions of the same reset epoch answered in the end whose
    first attempt began before it ended (each holds at most one unit from
    then on), and the attempts of the others that overlapped it (a failed
    attempt's unit is given back before its client hears of the failure; one
    without an HTTP answer may hold it until its server-side deadline, so it
    counts whenever it began before). Below the limit, the refusal was
    stale: a counter Redis kept after a reset, a refund or a raised limit.
    ``tally`` counts the refusals checked."""
    tally = Counter() if tally is None else tally
    ordinary = [record for record in records if record.role == "ordinary"]
    answered = {record.question_id for record in ordinary if record.delivered is not None}
    by_user: dict[int, list[Record]] = defaultdict(list)
    for record in ordinary:
        by_user[record.user].append(record)
    violations = []
    for user, mine in sorted(by_user.items()):
        if timeline.undecided(user):
            continue
        first_started: dict[str, float] = {}
        for record in mine:
            first_started[record.question_id] = min(
                record.started, first_started.get(record.question_id, record.started))
        for refused in mine:
            if refused.code != "daily_limit_exceeded":
                continue
            tally["refusals"] += 1
            limit = timeline.limit(user, refused.epoch)
            reset = timeline.since(user, refused.epoch, "reset_limit")
            if not limit:
                violations.append(f"{refused.request_id}: user {user} refused although "
                                  f"unlimited in epoch {refused.epoch}")
                continue
            in_epoch = [r for r in mine if reset <= r.epoch <= refused.epoch]
            units = sum(first_started[question] < refused.finished
                        for question in {r.question_id for r in in_epoch} & answered)
            units += sum(
                r.started < refused.finished and (r.status is None or r.finished > refused.started)
                for r in in_epoch if r.question_id not in answered and r is not refused
            )
            if units < limit:
                violations.append(
                    f"{refused.request_id}: user {user} refused (429) with at most {units} "
                    f"unit(s) taken of the limit {limit} (epoch {refused.epoch}, reset epoch "
                    f"{reset})")
    return violations


def prompts_hold_the_users_own_context(prompts: list[list[dict]], records: list[Record],
                                       timeline: Timeline, rowless: set[str],
                                       window: int,
                                       tally: Counter[str] | None = None) -> list[str]:
    """Each prompt of an ordinary question (its last message): the ids of the
    exchanges in it (``#c1-q2#`` in questions and answers, the summary's
    included) are of the same user, from the last deletion of its history
    on; and the latest answer delivered before the question began is among
    them, unless ``window`` or more other answers of the user may have been
    saved after it (then it can have left the context window). ``tally``
    counts the prompts traced to their question, those after a deletion of
    the user's history, and those that had to hold an earlier answer."""
    tally = Counter() if tally is None else tally
    ordinary = [record for record in records if record.role == "ordinary"]
    owner: dict[str, tuple[int, int]] = {}  # question id -> (user, epoch)
    first_started: dict[str, float] = {}
    for record in ordinary:
        owner[record.question_id] = (record.user, record.epoch)
        first_started[record.question_id] = min(
            record.started, first_started.get(record.question_id, record.started))
    answers = {user: [r for r in delivered if r.request_id not in rowless]
               for user, delivered in delivered_answers(ordinary).items()}
    violations = []
    for messages in prompts:
        texts = [str(message.get("content") or "") for message in messages]
        if not texts:
            continue
        asked = _ASKED.match(texts[-1])
        found = set(QUESTION_TAG.findall("\n".join(texts[:-1])))
        if asked is None:
            users = {owner[tag][0] for tag in found if tag in owner}
            if len(users) > 1:
                violations.append(f"a prompt holds the exchanges of users {sorted(users)}")
            continue
        question = asked.group(1)
        if question not in owner:
            continue
        user, epoch = owner[question]
        if timeline.undecided(user):
            continue
        deleted = timeline.since(user, epoch, "delete_history")
        tally["prompts traced to their question"] += 1
        tally["of them after a deleted history"] += deleted > 0
        for tag in sorted(found):
            other, other_epoch = owner.get(tag, (None, None))
            if other != user:
                violations.append(f"the prompt of {question} (user {user}) holds {tag} of "
                                  f"user {other}")
            elif other_epoch < deleted:
                violations.append(f"the prompt of {question} (user {user}, epoch {epoch}) holds "
                                  f"{tag} of epoch {other_epoch}, deleted in epoch {deleted - 1}")
        before = [r for r in answers.get(user, [])
                  if r.question_id != question and r.epoch >= deleted
                  and r.finished < first_started[question]]
        if not before:
            continue
        latest = max(before, key=lambda r: r.finished)
        # Its row was saved after its question's first attempt began (a
        # replay delivers a row an earlier attempt saved); a row saved after
        # it was delivered after that moment.
        saved_after = first_started[latest.question_id]
        later = sum(r.finished > saved_after for r in answers[user]
                    if r.question_id not in (question, latest.question_id)
                    and r.epoch >= deleted)
        tally["of them bound to hold the latest earlier answer"] += later < window
        if later < window and latest.delivered not in texts[:-1]:
            violations.append(
                f"the prompt of {question} (user {user}) lacks the answer of "
                f"{latest.request_id}, delivered before it began ({later} other answer(s) "
                "saved since could have pushed it out)")
    return violations


def limits_read_back(readings: Mapping[int, list[tuple[int, dict]]], stored: Stored,
                     default_limit: int, today: date) -> list[str]:
    """``GET /v1/chat/limits/{id}`` (each reading: status, body) says what
    PostgreSQL holds."""
    violations = []
    for user, answers in sorted(readings.items()):
        used = stored.used_today(user, today)
        own = stored.limits.get(user)
        limit = default_limit if own is None else own
        for number, (status, body) in enumerate(answers, 1):
            said = (body.get("requests_today"), body.get("daily_limit"))
            if status != 200 or said != (used, limit):
                violations.append(
                    f"user {user}: GET /limits (read {number}) said {status} requests_today "
                    f"{said[0]}, daily_limit {said[1]}; PostgreSQL holds {used} of {limit}")
    return violations


def operations_answered(operations: list[Operation]) -> list[str]:
    violations = []
    for operation in operations:
        unexpected = [a for a in operation.attempts if a != "200" and a not in OPERATION_RETRIES]
        if unexpected or not operation.done:
            violations.append(
                f"op-{operation.number} {operation.kind} of user {operation.user}: "
                f"{', '.join(operation.attempts)}" + ("" if operation.done else " (never 200)"))
    return violations


def readiness_stayed_up(polls: list[Readiness]) -> list[str]:
    """200 whenever the database answered, whatever Redis did; 503 only for
    the database."""
    violations = []
    for poll in polls:
        fine = ((poll.status == 200 and poll.database == "ok")
                or (poll.status == 503 and poll.database == "unavailable"))
        if not fine:
            violations.append(f"/health/ready at {poll.at:.1f}: {poll.status} "
                              f"database={poll.database} redis={poll.redis} "
                              f"{poll.failure or ''}".rstrip())
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
