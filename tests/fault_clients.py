"""The clients of the fault-injection run (tests/fault_run.py), and what each
request they made came back with.

- **Ordinary clients** ask, think, ask again, as sellers through the bot do:
  sends and streams of the default model, half of them with a ``request_id``
  retried (same key, same message) after a failure, as the bot retries. They
  read every answer to its end, so whatever they were given is recorded.
- **A client that leaves** opens a stream, reads its first ``delta`` and
  closes the connection.
- **A client that stops reading** sends a stream request on a raw socket with
  a tiny receive buffer, reads nothing, and closes it after ``hold`` seconds.

- **The operator** (``operate``) deletes a user's history, resets their
  counter or sets their daily limit (the admin key), asking again until the
  service answers 200 (each action is idempotent, so a retry is exact).
- **A readiness probe** (``poll_readiness``) asks ``/health/ready`` all
  along: Redis's check in it, and whether it stayed 200 while the database
  answered.

Ordinary questions and operations meet at a ``UserGate``: the questions of
one user run side by side, an operation on that user waits for them to end
and holds new ones back until it is done. So every question falls wholly
between two operations of its user (its ``epoch``), and what the counter
and history must hold after each operation stays exact. Some ordinary
questions are one of ``COMMON_QUESTIONS`` (a seller's general first question:
the common-answer cache's), the others carry their question id between
``#`` (``QUESTION_TAG``), so the prompts the model got can be traced back to
their question, user and epoch.

The last two fault clients ask for ``SLOW_MODEL`` with a user of their own: the fake LLM
streams that model's answers far longer than those clients stay, so no such
stream can ever have reached ``done``, and their users must end the run with
nothing counted and nothing stored. Every request asks for ``format:
markdown``, in which the answer a client gets is the model's raw text, the
text history stores.
"""

from __future__ import annotations

import itertools
import json
import random
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import requests

from tests.servers import API_KEY

# A model of its own provider (a second provider on the same fake LLM): its
# answers are the long, slow streams of the clients that leave or stop reading,
# and its breaker is not the default model's.
SLOW_MODEL = "wb-slow-stream"
# Whatever fails this way is worth asking again with the same key, as the bot does.
RETRIED_STATUSES = frozenset({409, 502, 503, 504})
ATTEMPTS = 3
RETRY_PAUSE = 0.3
CONNECT_TIMEOUT = 5.0
# General first questions many sellers ask word for word: without context, a
# summary or seller data in the prompt, the second asker on gets the common
# answer from Redis (``cached: true``).
COMMON_QUESTIONS = (
    "Как работает FBS на Wildberries?",
    "Как снизить процент возвратов на Wildberries?",
    "Какая комиссия Wildberries для категории одежда?",
)
# The id of an ordinary question inside its text (and so in its answer, the
# model's echo): "#c12-q3#". The closing mark keeps a clipped id (a summary
# cuts long texts) from reading as another question's.
QUESTION_TAG = re.compile(r"#(c\d+-q\d+)#")
# The operator's actions (``operate``).
OPERATIONS = ("delete_history", "reset_limit", "set_limit")


@dataclass
class Record:
    """One HTTP request of the run and what its client got."""

    request_id: str  # sent as X-Request-ID: the service's log line carries it
    role: str  # "ordinary", "leaver", "stuck" or "probe"
    kind: str  # "send" or "stream"
    user: int
    question_id: str  # one question: its attempts (and their key) share it
    question: str  # its text (a common question's is shared by many)
    key: str | None
    attempt: int
    started: float
    finished: float = 0.0
    status: int | None = None  # None: no HTTP answer at all
    code: str | None = None  # a JSON error's or an error event's code; "done"; "left"
    delivered: str | None = None  # the answer's text, when the client got one (200 or done)
    deltas: str | None = None  # a stream's deltas joined
    failure: str | None = None  # on the client's side: an exception's name, or "cut"
    limit: int | None = None  # the daily_limit of a 200 (send's body, done) or a 429
    cached: bool = False  # delivered from the common-answer cache
    epoch: int = 0  # the operations on the user done before the question began

    @property
    def outcome(self) -> str:
        """``"send 200"``, ``"stream 200 llm_timeout"``, ``"leaver stream 200 left"``…"""
        parts = [] if self.role == "ordinary" else [self.role]
        parts.append(self.kind)
        if self.status is None:
            parts.append(f"no answer ({self.failure})" if self.failure else str(self.code))
        else:
            parts.append(str(self.status))
            if self.code and not (self.kind == "send" and self.status == 200):
                parts.append(self.code)
        return " ".join(parts)

    @property
    def seconds(self) -> float:
        return self.finished - self.started


class Recorder:
    """Every request of the run, and the users of the fault clients (fresh ones)."""

    def __init__(self, first_fault_user: int):
        self._lock = threading.Lock()
        self._records: list[Record] = []
        self._users = itertools.count(first_fault_user)

    def add(self, record: Record) -> Record:
        with self._lock:
            self._records.append(record)
        return record

    def records(self) -> list[Record]:
        with self._lock:
            return list(self._records)

    def new_user(self) -> int:
        with self._lock:
            return next(self._users)


def request_body(record: Record, model: str | None = None) -> dict:
    body = {"telegram_id": record.user, "message": record.question, "format": "markdown"}
    if record.key is not None:
        body["request_id"] = record.key
    if model is not None:
        body["model"] = model
    return body


def headers(record: Record) -> dict:
    return {"X-API-KEY": API_KEY, "X-Request-ID": record.request_id}


def sse_events(response: requests.Response) -> Iterator[tuple[str, object]]:
    """(name, data) of each event as it arrives; comments are left out. Lines
    are split at LF only, as the contract's readers must."""
    buffer = b""
    name, data = None, []
    for chunk in response.iter_content(chunk_size=None):
        buffer += chunk
        while b"\n" in buffer:
            raw, buffer = buffer.split(b"\n", 1)
            line = raw.decode()
            if line.startswith("event:"):
                name = line.removeprefix("event:").strip()
            elif line.startswith("data:"):
                data.append(line.removeprefix("data:").removeprefix(" "))
            elif not line and name is not None:
                yield name, json.loads("\n".join(data))
                name, data = None, []


def _error(response: requests.Response) -> tuple[str | None, dict]:
    """A JSON error's code and body."""
    try:
        body = response.json()
    except ValueError:
        return "not json", {}
    if not isinstance(body, dict):
        return "not an object", {}
    return body.get("error"), body


def _error_code(response: requests.Response) -> str | None:
    return _error(response)[0]


def _answered(record: Record, body: dict) -> None:
    """What a 200 (send's body, a stream's done) says."""
    record.delivered = body["response"]
    record.limit = body.get("daily_limit")
    record.cached = body.get("cached") is True


def _refused(record: Record, response: requests.Response) -> None:
    record.code, body = _error(response)
    if record.code == "daily_limit_exceeded":
        record.limit = body.get("daily_limit")


def send_once(session: requests.Session, url: str, record: Record, timeout: float) -> Record:
    """POST /v1/chat/send; the answer's text when it is a 200."""
    try:
        response = session.post(f"{url}/v1/chat/send", json=request_body(record),
                                headers=headers(record), timeout=(CONNECT_TIMEOUT, timeout))
    except requests.RequestException as error:
        record.failure = type(error).__name__
    else:
        record.status = response.status_code
        if response.status_code == 200:
            _answered(record, response.json())
        else:
            _refused(record, response)
    record.finished = time.monotonic()
    return record


def stream_once(session: requests.Session, url: str, record: Record, timeout: float) -> Record:
    """POST /v1/chat/stream, read to its end: ``done`` delivers the answer,
    ``error`` gives its code; a stream that ends with neither is "cut"."""
    try:
        with session.post(f"{url}/v1/chat/stream", json=request_body(record),
                          headers=headers(record), stream=True,
                          timeout=(CONNECT_TIMEOUT, timeout)) as response:
            record.status = response.status_code
            if not response.headers.get("content-type", "").startswith("text/event-stream"):
                _refused(record, response)
            else:
                _read_events(response, record)
    except requests.RequestException as error:
        record.failure = type(error).__name__
    record.finished = time.monotonic()
    return record


def _read_events(response: requests.Response, record: Record) -> None:
    deltas = []
    try:
        for name, data in sse_events(response):
            if name == "delta":
                deltas.append(data["text"])
            elif name == "done":
                record.code = "done"
                _answered(record, data)
            elif name == "error":
                record.code = data["error"]
    finally:
        record.deltas = "".join(deltas)
    if record.code is None:
        record.failure = "cut"


def ask(session: requests.Session, url: str, recorder: Recorder, question_id: str, *,
        kind: str, user: int, question: str, keyed: bool, timeout: float,
        rng: random.Random, epoch: int = 0) -> list[Record]:
    """One question of an ordinary client: asked again (same key, same message)
    after a failure worth retrying when it has a key, as the bot does."""
    records = []
    for attempt in range(1, ATTEMPTS + 1):
        record = recorder.add(Record(
            request_id=f"{question_id}-{attempt}", role="ordinary", kind=kind, user=user,
            question_id=question_id, question=question, key=question_id if keyed else None,
            attempt=attempt, started=time.monotonic(), epoch=epoch,
        ))
        once = stream_once if kind == "stream" else send_once
        records.append(once(session, url, record, timeout))
        if record.delivered is not None or not keyed or not _worth_retrying(record):
            break
        time.sleep(RETRY_PAUSE * attempt * rng.uniform(0.5, 1.5))
    return records


@dataclass(frozen=True)
class Habits:
    """How the ordinary clients ask: whom for (``users``, the busy ones first,
    picked by ``cum_weights``), how (streams, keys, common questions) and how
    often."""

    users: Sequence[int]
    cum_weights: Sequence[float]
    stream_share: float
    keyed_share: float
    think: tuple[float, float]  # seconds between a client's questions
    common_share: float = 0.0  # share of questions that are one of COMMON_QUESTIONS


class UserGate:
    """Questions of one user run side by side; an operation on the user runs
    when none does, holding new ones back until it is done. ``question``
    gives the number of operations done on the user before it: the
    question's epoch.

    An operation first waits up to ``patience`` seconds for a gap between
    the user's questions without holding anyone back (a busy user's
    questions come and go within a second); only then does it hold new
    questions back and wait for those in flight, which may take a model
    timeout: every client that picks the user meanwhile would stall."""

    def __init__(self, patience: float = 3.0):
        self.patience = patience
        self._changed = threading.Condition()
        self._asking: Counter[int] = Counter()
        self._held: set[int] = set()
        self._done: Counter[int] = Counter()

    @contextmanager
    def question(self, user: int) -> Iterator[int]:
        with self._changed:
            while user in self._held:
                self._changed.wait()
            self._asking[user] += 1
            epoch = self._done[user]
        try:
            yield epoch
        finally:
            with self._changed:
                self._asking[user] -= 1
                if not self._asking[user]:
                    del self._asking[user]
                    self._changed.notify_all()

    @contextmanager
    def operation(self, user: int) -> Iterator[int]:
        """Yields the operation's own epoch (0 for the user's first)."""
        with self._changed:
            while user in self._held:
                self._changed.wait()
            give_up_at = time.monotonic() + self.patience
            while self._asking[user] and time.monotonic() < give_up_at:
                self._changed.wait(max(0.0, give_up_at - time.monotonic()))
            while user in self._held:  # another operation took its turn first
                self._changed.wait()
            self._held.add(user)  # from now on no new question of the user starts
            while self._asking[user]:
                self._changed.wait()
            epoch = self._done[user]
        try:
            yield epoch
        finally:
            with self._changed:
                self._done[user] += 1
                self._held.discard(user)
                self._changed.notify_all()


def ordinary_client(url: str, recorder: Recorder, habits: Habits, gate: UserGate, index: int,
                    seed: int, until: float, timeout: float) -> None:
    """Ask questions until ``until`` (monotonic); each one is recorded."""
    rng = random.Random(f"{seed}:client:{index}")
    with requests.Session() as session:
        for number in itertools.count():
            if time.monotonic() >= until:
                return
            user = rng.choices(habits.users, cum_weights=habits.cum_weights)[0]
            question_id = f"c{index}-q{number}"
            if rng.random() < habits.common_share:
                question = rng.choice(COMMON_QUESTIONS)
            else:
                question = f"Вопрос #{question_id}# продавца {user}: как поднять продажи?"
            kind = "stream" if rng.random() < habits.stream_share else "send"
            keyed = rng.random() < habits.keyed_share
            with gate.question(user) as epoch:
                ask(session, url, recorder, question_id, kind=kind, user=user,
                    question=question, keyed=keyed, timeout=timeout, rng=rng, epoch=epoch)
            time.sleep(rng.uniform(*habits.think))


def _worth_retrying(record: Record) -> bool:
    if record.status is None:
        return True
    if record.status == 200:  # a stream that ended with an error event, or was cut
        return True
    return record.status in RETRIED_STATUSES


def leave_after_first_delta(url: str, record: Record, timeout: float) -> Record:
    """A stream of SLOW_MODEL read up to its first delta, then the client goes
    away (the connection is closed with the stream still running)."""
    with requests.Session() as session:
        try:
            with session.post(f"{url}/v1/chat/stream",
                              json=request_body(record, SLOW_MODEL), headers=headers(record),
                              stream=True, timeout=(CONNECT_TIMEOUT, timeout)) as response:
                record.status = response.status_code
                if not response.headers.get("content-type", "").startswith("text/event-stream"):
                    record.code = _error_code(response)
                else:
                    for name, data in sse_events(response):
                        if name == "delta":
                            record.code = "left"
                            break
                        if name in ("done", "error"):  # never: the stream outlasts us
                            record.code = name if name == "done" else data["error"]
                            break
        except requests.RequestException as error:
            record.failure = type(error).__name__
    record.finished = time.monotonic()
    return record


def stop_reading(url: str, record: Record, hold: float) -> Record:
    """A stream request of SLOW_MODEL on a raw socket that never reads: the
    service's writes fill the socket buffers, and the next one waits for
    STREAM_WRITE_TIMEOUT. Closed after ``hold`` seconds."""
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps(request_body(record, SLOW_MODEL)).encode()
    head = (
        f"POST /v1/chat/stream HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"X-API-KEY: {API_KEY}\r\nX-Request-ID: {record.request_id}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    stuck = socket.socket()
    try:
        # Before connect(), so the window it announces stays tiny.
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.settimeout(CONNECT_TIMEOUT)
        stuck.connect((host, int(port)))
        stuck.sendall(head + body)
        record.code = "never read"
        time.sleep(hold)
    except OSError as error:
        record.failure = type(error).__name__
    finally:
        stuck.close()
    record.finished = time.monotonic()
    return record


# --- the operator ----------------------------------------------------------------


@dataclass
class Operation:
    """One action of the operator on a user (one of OPERATIONS), asked until
    it answers 200."""

    kind: str
    user: int
    value: int | None = None  # set_limit: the new daily_limit (None: DAILY_LIMIT, 0: unlimited)
    number: int = 0  # the run's count of operations: its X-Request-ID
    epoch: int = 0  # the operations on the user done before this one
    started: float = 0.0
    finished: float = 0.0
    attempts: list[str] = field(default_factory=list)  # each one's outcome: "200", "503 …"
    done: bool = False  # answered 200

    @property
    def outcomes(self) -> list[str]:
        """``"operator reset_limit 200"``… per attempt."""
        return [f"operator {self.kind} {attempt}" for attempt in self.attempts]


def operate(url: str, admin_key: str, operation: Operation, timeout: float,
            give_up_after: float) -> Operation:
    """The operation, asked again after a 503 or no answer (the database may
    be restarting) until it answers 200 or ``give_up_after`` seconds passed.
    The caller holds the user's gate."""
    head = {"X-API-KEY": admin_key}
    user = operation.user
    operation.started = time.monotonic()
    give_up_at = operation.started + give_up_after
    with requests.Session() as session:
        for attempt in itertools.count(1):
            head["X-Request-ID"] = f"op-{operation.number}-{operation.kind}-{attempt}"
            try:
                if operation.kind == "delete_history":
                    response = session.delete(f"{url}/v1/chat/history/{user}", headers=head,
                                              timeout=(CONNECT_TIMEOUT, timeout))
                elif operation.kind == "reset_limit":
                    response = session.post(f"{url}/v1/chat/reset-limit",
                                            json={"telegram_id": user}, headers=head,
                                            timeout=(CONNECT_TIMEOUT, timeout))
                else:
                    response = session.put(f"{url}/v1/chat/users/{user}/settings",
                                           json={"daily_limit": operation.value}, headers=head,
                                           timeout=(CONNECT_TIMEOUT, timeout))
            except requests.RequestException as error:
                operation.attempts.append(f"no answer ({type(error).__name__})")
            else:
                if response.status_code == 200:
                    operation.attempts.append("200")
                    operation.done = True
                    break
                operation.attempts.append(f"{response.status_code} {_error_code(response)}")
                if response.status_code not in RETRIED_STATUSES:
                    break
            pause = min(1.0, RETRY_PAUSE * attempt)
            if time.monotonic() + pause >= give_up_at:
                break
            time.sleep(pause)
    operation.finished = time.monotonic()
    return operation


# --- readiness -------------------------------------------------------------------


@dataclass(frozen=True)
class Readiness:
    """One ``GET /health/ready``: when (wall clock, as the service's log) and
    what it said."""

    at: float
    status: int | None
    database: str | None = None
    redis: str | None = None
    failure: str | None = None


def poll_readiness(url: str, stop: threading.Event, interval: float,
                   found: list[Readiness]) -> None:
    """Ask /health/ready every ``interval`` seconds until ``stop`` is set."""
    with requests.Session() as session:
        while not stop.is_set():
            at = time.time()
            try:
                response = session.get(f"{url}/health/ready", timeout=(CONNECT_TIMEOUT, 10))
                checks = response.json().get("checks", {})
                found.append(Readiness(at, response.status_code, checks.get("database"),
                                       checks.get("redis")))
            except (requests.RequestException, ValueError, AttributeError) as error:
                found.append(Readiness(at, None, failure=type(error).__name__))
            stop.wait(interval)
