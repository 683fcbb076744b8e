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

The last two ask for ``SLOW_MODEL`` with a user of their own: the fake LLM
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
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

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


@dataclass
class Record:
    """One HTTP request of the run and what its client got."""

    request_id: str  # sent as X-Request-ID: the service's log line carries it
    role: str  # "ordinary", "leaver", "stuck" or "probe"
    kind: str  # "send" or "stream"
    user: int
    question: str  # one question: the attempts of one key share it
    key: str | None
    attempt: int
    started: float
    finished: float = 0.0
    status: int | None = None  # None: no HTTP answer at all
    code: str | None = None  # a JSON error's or an error event's code; "done"; "left"
    delivered: str | None = None  # the answer's text, when the client got one (200 or done)
    deltas: str | None = None  # a stream's deltas joined
    failure: str | None = None  # on the client's side: an exception's name, or "cut"

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


def _error_code(response: requests.Response) -> str | None:
    try:
        body = response.json()
    except ValueError:
        return "not json"
    return body.get("error") if isinstance(body, dict) else "not an object"


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
            record.delivered = response.json()["response"]
        else:
            record.code = _error_code(response)
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
                record.code = _error_code(response)
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
                record.code, record.delivered = "done", data["response"]
            elif name == "error":
                record.code = data["error"]
    finally:
        record.deltas = "".join(deltas)
    if record.code is None:
        record.failure = "cut"


def ask(session: requests.Session, url: str, recorder: Recorder, question_id: str, *,
        kind: str, user: int, question: str, keyed: bool, timeout: float,
        rng: random.Random) -> list[Record]:
    """One question of an ordinary client: asked again (same key, same message)
    after a failure worth retrying when it has a key, as the bot does."""
    records = []
    for attempt in range(1, ATTEMPTS + 1):
        record = recorder.add(Record(
            request_id=f"{question_id}-{attempt}", role="ordinary", kind=kind, user=user,
            question=question, key=question_id if keyed else None, attempt=attempt,
            started=time.monotonic(),
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
    picked by ``cum_weights``), how (streams, keys) and how often."""

    users: Sequence[int]
    cum_weights: Sequence[float]
    stream_share: float
    keyed_share: float
    think: tuple[float, float]  # seconds between a client's questions


def ordinary_client(url: str, recorder: Recorder, habits: Habits, index: int, seed: int,
                    until: float, timeout: float) -> None:
    """Ask questions until ``until`` (monotonic); each one is recorded."""
    rng = random.Random(f"{seed}:client:{index}")
    with requests.Session() as session:
        for number in itertools.count():
            if time.monotonic() >= until:
                return
            user = rng.choices(habits.users, cum_weights=habits.cum_weights)[0]
            question_id = f"c{index}-q{number}"
            ask(session, url, recorder, question_id,
                kind="stream" if rng.random() < habits.stream_share else "send",
                user=user, question=f"Вопрос {question_id} продавца {user}: как поднять продажи?",
                keyed=rng.random() < habits.keyed_share, timeout=timeout, rng=rng)
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
