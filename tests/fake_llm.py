"""Fake OpenAI-compatible chat-completions server for tests and benchmarks.

The service under test talks to an upstream LLM through the official ``openai``
client.  Pointing ``OPENAI_BASE_URL`` at this server gives tests a deterministic,
scriptable upstream: every chat-completions call is recorded, and its behaviour
(success, HTTP error, slow answer, dropped connection, non-JSON body, a stream
that stalls or breaks) can be queued per request, per model, or drawn at random
in "chaos" mode.  Each ``FakeLLM`` is one provider on its own port; start as many
as a test needs, they share nothing.

Typical use::

    from tests.fake_llm import FakeLLM, ok, status, drop, stream_break

    with FakeLLM() as fake:
        fake.script(status(429), ok("hi", tokens=10))
        ...  # run the app with OPENAI_BASE_URL=fake.url
        assert fake.outcomes == ["status:429", "ok"]

        fake.script_for("gpt-small", stream_break(after=2))
        ...  # a streamed call to "gpt-small" gets the role chunk, 2 pieces, then EOF

Which step serves a request: the model's own queue (``script_for``), else the
global queue (``script``), else chaos, else the default answer after
``latency`` seconds (outcome ``"ok"``, streamed or not).  Chaos: with
probability ``failure_rate`` an unscripted request gets, uniformly, 500, 503,
429, 400, ``drop`` or a ``chaos_timeout`` delay; streaming requests may also
get a ``stream_break`` after 0-3 pieces.

Steps (each returns a plain dict to pass to ``script``/``script_for``):

- ``ok(text=None, tokens=None, delay=0.0)``: success after ``delay``.
- ``status(code, delay=0.0)``: HTTP error with an OpenAI-style body.
- ``delay(seconds)``: succeed after ``seconds`` (meant to outlast a client timeout).
- ``drop()``: close the TCP connection without answering.
- ``garbage()``: 200 with a body that is not JSON.
- ``hang()``: never answer; wait until the client goes away.
- ``stream_ok(text=None, *, chunks=None, pieces=None, first_token_delay=0.0,
  chunk_delay=None, usage=True, tokens=None)``: a complete stream.
- ``stream_break(after=1, text=None, ...)``: ``after`` content chunks, then the
  connection is dropped without the final chunk or ``[DONE]``.
- ``stream_hang(after=1, text=None, ...)``: ``after`` content chunks, then silence
  until the client goes away.
- ``stream_error(after=1, text=None, *, message=None, ...)``: ``after`` content
  chunks, then an ``{"error": ...}`` event (the openai SDK raises ``APIError``)
  and a cleanly ended body.
- ``tool_calls(*calls, delay=0.0, tokens=None)``: the model asks for tools; each
  call is ``(name, arguments)``, arguments a dict (sent as its JSON text) or a
  raw string (for malformed-JSON tests).  Answered as
  ``message: {"role": "assistant", "content": null, "tool_calls": [{"id":
  "call_…", "type": "function", "function": {"name", "arguments"}}]}`` with
  ``finish_reason: "tool_calls"`` and usage; streamed (after ``delay``) as the
  standard deltas: per call, ``delta.tool_calls[0]`` with ``index``, ``id``,
  ``type`` and ``function.name`` (empty ``arguments``), then its arguments
  split over up to three deltas; then ``finish_reason: "tool_calls"``, the
  usage chunk when asked, ``[DONE]``.  Outcome label ``"tool_calls"``.

Tools: ``fake.tools_forever = [("get_dashboard", {})]`` (reset by ``reset()``)
answers every request that offers ``tools`` (and found no scripted step) with
those calls, however many rounds the client runs; a request without
``tools`` gets the default answer.  A request whose messages hold ``tool``
messages gets, by default, ``"Ответ по данным: "`` + their contents joined by
``" | "``, cut to 1500 characters (``answer_chars`` when set), so a test can
find a figure the main server returned in the seller's answer.  Requests are
recorded as they came (``requests[i]["body"]`` has ``tools`` and every
message, ``tool`` messages included), and prompt tokens count the
characters of every message's content, tool results included.

Streaming (request body ``"stream": true``) follows the chat-completions SSE
protocol: a ``200 text/event-stream`` chunked response whose head and first
event (``delta: {"role": "assistant", "content": ""}``) go out at once; then,
``first_token_delay`` seconds later, one ``chat.completion.chunk`` per piece
(``delta.content``), ``chunk_delay`` seconds apart; then a chunk with an empty
delta and ``finish_reason: "stop"``; then, only if the request had
``stream_options: {"include_usage": true}`` (and the step's ``usage`` is true),
a chunk with ``"choices": []`` and ``usage``; then ``data: [DONE]``.  The
connection stays open for the next request (keep-alive).  Unscripted streams
use ``latency`` as the first-token delay, ``chunk_delay`` between pieces and
``stream_pieces`` pieces (``None``: one piece per word; more pieces than
characters gives some empty pieces).  The sync openai SDK stops reading at
``[DONE]``, before the end of the chunked body, so it closes the connection
after every stream; the async SDK and clients that read the body to its end
reuse it.

Non-stream steps served to a streaming request: ``ok``/``delay`` stream their
answer (their delay becomes the first-token delay), ``status``/``drop``/
``hang`` happen before any stream starts, ``garbage`` sends one event whose
data is not JSON.  Stream steps served to a non-streaming request:
``stream_ok`` answers the joined text after ``first_token_delay``,
``stream_break`` drops, ``stream_hang`` hangs, ``stream_error`` answers 500.

Client-gone accounting: while waiting (any delay, between chunks, hanging)
the fake polls the connection, so a client that closes its socket is noticed
within milliseconds.  ``streams_started`` / ``streams_completed`` (the fake
wrote its whole scripted response) / ``streams_broken`` (``stream_break``) /
``streams_abandoned`` (the client went away first) / ``streams_in_flight`` count
streams; ``requests_abandoned`` counts requests whose client went away before
any answer was written.  To assert that the service closed its upstream
stream: ``assert fake.wait_for(lambda: fake.streams_abandoned == 1, timeout=1)``.
A client that closes while the fake is busy writing (no delay to wait in) may
go unnoticed: the kernel accepts those writes.

Records: ``requests`` (dicts with ``path``, ``headers``, ``body``, ``model``,
``stream``), ``outcomes`` (step labels such as ``"ok"``, ``"status:429"``,
``"stream_break"``), ``models``, ``streamed``, ``authorizations``, ``calls``
and ``connections`` (TCP connections accepted, to check keep-alive reuse).

Standalone (for benchmarks), run from the project root::

    python -m tests.fake_llm --port 8089 --latency 0.5 [--failure-rate 0.0]
        [--chunk-delay 0.0225] [--stream-pieces 200] [--answer-chars 800]
        [--tools-forever get_sales,get_dashboard]

``--tools-forever`` sets ``tools_forever`` to those tools, each called with no
arguments (the tools' defaults).

Default answer (without tool results) is ``"Ответ: " + <last user message>``
cut to 200 characters (with ``answer_chars``: repeated or cut to exactly that
many characters);
usage is ``prompt_tokens = <chars of all message contents> // 4 + 1`` and
``completion_tokens = len(answer) // 4 + 1`` so tests can predict token counts.
"""

from __future__ import annotations

import argparse
import functools
import heapq
import itertools
import json
import random
import re
import select
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.servers import poll_until, serve_until_signalled

__all__ = [
    "FakeLLM",
    "ok",
    "status",
    "delay",
    "drop",
    "garbage",
    "hang",
    "stream_ok",
    "stream_break",
    "stream_hang",
    "stream_error",
    "tool_calls",
    "CHAT_PATHS",
    "MODELS_PATHS",
]

CHAT_PATHS = frozenset({"/v1/chat/completions", "/chat/completions"})
MODELS_PATHS = frozenset({"/v1/models", "/models"})

ANSWER_PREFIX = "Ответ: "
MAX_ANSWER_CHARS = 200
# The default answer to a prompt holding tool results quotes them, long enough
# for a test to find a figure of the first result in it.
TOOL_ANSWER_PREFIX = "Ответ по данным: "
MAX_TOOL_ANSWER_CHARS = 1500

_STREAM_KINDS = frozenset({"stream_ok", "stream_break", "stream_hang", "stream_error"})
_STEP_KINDS = (
    frozenset({"ok", "status", "delay", "drop", "garbage", "hang", "tool_calls"}) | _STREAM_KINDS
)

# Chaos mode picks uniformly from these; ints are HTTP statuses.
_CHAOS_CHOICES: tuple[Any, ...] = (500, 503, 429, 400, "drop", "delay")
# Streaming requests can also fail mid-stream.  A separate tuple keeps the
# seeded sequence of non-streaming runs exactly what it always was.
_STREAM_CHAOS_CHOICES: tuple[Any, ...] = (*_CHAOS_CHOICES, "stream_break")

# Mirrors what the real API puts in error.type, so client code that inspects it
# sees realistic values.
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}

_GARBAGE_BODY = b"<html><body><h1>502 Bad Gateway</h1>upstream hiccup</body></html>"

_MODELS_BODY = json.dumps(
    {
        "object": "list",
        "data": [{"id": "fake-model", "object": "model", "created": 0, "owned_by": "fake"}],
    },
    separators=(",", ":"),
).encode()

_STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: text/event-stream; charset=utf-8\r\n"
    b"Cache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n"
)
_LAST_CHUNK = b"0\r\n\r\n"
_DONE_EVENT = b"data: [DONE]\n\n"
_WORD_PIECES = re.compile(r"\s*\S+\s*")

_COUNTERS = (
    "connections",
    "requests_abandoned",
    "streams_started",
    "streams_completed",
    "streams_broken",
    "streams_abandoned",
)


# --------------------------------------------------------------------------- steps


def ok(text: str | None = None, tokens: int | None = None, delay: float = 0.0) -> dict:
    """Successful answer; ``text``/``tokens`` override the answer and total usage."""
    return {"kind": "ok", "text": text, "tokens": tokens, "delay": float(delay)}


def status(code: int, delay: float = 0.0) -> dict:
    """HTTP error ``code`` with an OpenAI-style error body, after ``delay`` seconds."""
    return {"kind": "status", "code": int(code), "delay": float(delay)}


def delay(seconds: float) -> dict:
    """Sleep ``seconds`` then succeed; meant to push the client past its timeout."""
    return {"kind": "delay", "seconds": float(seconds)}


def drop() -> dict:
    """Read the request, then close the TCP connection without answering."""
    return {"kind": "drop"}


def garbage() -> dict:
    """Answer 200 with a body that is not JSON (labelled application/json).

    With the openai client this surfaces as a plain ``json.JSONDecodeError``, not
    an ``openai.APIError``; a non-JSON content type would instead make
    ``create()`` return the raw text without raising at all.  A streaming
    request gets one SSE event with the same non-JSON data, which the client
    also fails to decode.
    """
    return {"kind": "garbage"}


def hang() -> dict:
    """Never answer: wait until the client goes away (counted in ``requests_abandoned``)."""
    return {"kind": "hang"}


def stream_ok(
    text: str | None = None,
    *,
    chunks: list[str] | None = None,
    pieces: int | None = None,
    first_token_delay: float = 0.0,
    chunk_delay: float | None = None,
    usage: bool | dict = True,
    tokens: int | None = None,
) -> dict:
    """A complete stream.

    ``chunks`` gives the content pieces verbatim (their join is the answer);
    otherwise ``text`` (default answer if ``None``) is cut into ``pieces`` equal
    pieces, or one per word when ``pieces`` and the fake's ``stream_pieces`` are
    ``None``.  ``chunk_delay=None`` uses the fake's ``chunk_delay``.  ``usage=False``
    leaves out the usage chunk even when the client asked for it; a dict is sent
    as the usage verbatim (a provider's malformed usage).
    """
    return _stream_step(
        "stream_ok", None, text, chunks, pieces, first_token_delay, chunk_delay, usage, tokens
    )


def stream_break(
    after: int = 1,
    text: str | None = None,
    *,
    chunks: list[str] | None = None,
    pieces: int | None = None,
    first_token_delay: float = 0.0,
    chunk_delay: float | None = None,
) -> dict:
    """Send ``after`` content chunks, then drop the connection mid-stream."""
    return _stream_step(
        "stream_break", after, text, chunks, pieces, first_token_delay, chunk_delay, True, None
    )


def stream_hang(
    after: int = 1,
    text: str | None = None,
    *,
    chunks: list[str] | None = None,
    pieces: int | None = None,
    first_token_delay: float = 0.0,
    chunk_delay: float | None = None,
) -> dict:
    """Send ``after`` content chunks, then go silent until the client goes away."""
    return _stream_step(
        "stream_hang", after, text, chunks, pieces, first_token_delay, chunk_delay, True, None
    )


def stream_error(
    after: int = 1,
    text: str | None = None,
    *,
    message: str | None = None,
    chunks: list[str] | None = None,
    pieces: int | None = None,
    first_token_delay: float = 0.0,
    chunk_delay: float | None = None,
) -> dict:
    """Send ``after`` content chunks, then an error event, as the real API does when
    generation fails after the stream began."""
    step = _stream_step(
        "stream_error", after, text, chunks, pieces, first_token_delay, chunk_delay, True, None
    )
    step["message"] = message
    return step


def tool_calls(*calls: tuple[str, Any], delay: float = 0.0, tokens: int | None = None) -> dict:
    """The model asks for tools: each call is ``(name, arguments)``, arguments a
    dict (sent as its JSON text) or a raw string (e.g. malformed JSON).

    Answered as ``message.tool_calls`` with ``finish_reason: "tool_calls"``, or,
    to a streaming request, as the standard tool-call deltas.
    """
    if not calls:
        raise ValueError("tool_calls needs at least one (name, arguments) call")
    checked = []
    for call in calls:
        name, arguments = call
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments, ensure_ascii=False)
        checked.append((str(name), arguments))
    return {"kind": "tool_calls", "calls": checked, "delay": float(delay), "tokens": tokens}


def _stream_step(
    kind: str,
    after: int | None,
    text: str | None,
    chunks: list[str] | None,
    pieces: int | None,
    first_token_delay: float,
    chunk_delay: float | None,
    usage: bool,
    tokens: int | None,
) -> dict:
    if pieces is not None and pieces < 1:
        raise ValueError("pieces must be at least 1")
    if after is not None and after < 0:
        raise ValueError("after must not be negative")
    return {
        "kind": kind,
        "after": after,
        "text": text,
        "chunks": None if chunks is None else [str(chunk) for chunk in chunks],
        "pieces": pieces,
        "first_token_delay": float(first_token_delay),
        "chunk_delay": None if chunk_delay is None else float(chunk_delay),
        "usage": usage if isinstance(usage, dict) else bool(usage),
        "tokens": tokens,
    }


def _outcome_label(step: dict) -> str:
    kind = step["kind"]
    if kind == "status":
        return f"status:{step['code']}"
    return kind


def _validate(steps: tuple[dict, ...]) -> list[dict]:
    for step in steps:
        if not isinstance(step, dict) or step.get("kind") not in _STEP_KINDS:
            raise ValueError(f"Invalid fake LLM step: {step!r}")
        if step["kind"] == "status" and "code" not in step:
            raise ValueError(f"Status step needs a code: {step!r}")
        if step["kind"] == "delay" and "seconds" not in step:
            raise ValueError(f"Delay step needs seconds: {step!r}")
        if step["kind"] == "tool_calls" and not step.get("calls"):
            raise ValueError(f"Tool-calls step needs calls: {step!r}")
    return [dict(step) for step in steps]


# --------------------------------------------------------------------------- answers


def _content_text(content: Any) -> str:
    # Content may be a plain string or a list of typed parts (vision-style
    # messages); only text parts count toward the answer and token estimate.
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def _prompt(body: dict) -> tuple[int, str, list[str]]:
    """Characters of all message contents (tool results included), the last
    user message, and the contents of the ``tool`` messages."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        messages = []
    prompt_chars = 0
    last_user = ""
    tool_results = []
    for message in messages:
        if not isinstance(message, dict):
            continue
        content = _content_text(message.get("content"))
        prompt_chars += len(content)
        if message.get("role") == "user":
            last_user = content
        elif message.get("role") == "tool":
            tool_results.append(content)
    return prompt_chars, last_user, tool_results


def _default_answer(
    last_user: str, answer_chars: int | None, tool_results: list[str] | None = None
) -> str:
    if tool_results:
        answer = TOOL_ANSWER_PREFIX + " | ".join(tool_results)
        return answer[: answer_chars or MAX_TOOL_ANSWER_CHARS]
    answer = ANSWER_PREFIX + last_user
    if answer_chars is None:
        return answer[:MAX_ANSWER_CHARS]
    if len(answer) < answer_chars:
        # Benchmarks ask for long answers to short prompts: repeat the answer.
        answer = " ".join([answer] * (answer_chars // (len(answer) + 1) + 1))
    return answer[:answer_chars]


def _usage(prompt_chars: int, text: str, tokens: int | None) -> dict:
    prompt_tokens = prompt_chars // 4 + 1
    completion_tokens = len(text) // 4 + 1
    if tokens is not None:
        # Only the total is scripted; split it so both parts stay valid.
        prompt_tokens = min(prompt_tokens, tokens)
        completion_tokens = tokens - prompt_tokens
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


@functools.lru_cache(maxsize=256)
def _split(text: str, pieces: int | None) -> tuple[str, ...]:
    # Cached with _content_events below: a benchmark streams the same answer
    # thousands of times, and encoding its pieces was most of a stream's setup.
    return tuple(_split_uncached(text, pieces))


def _split_uncached(text: str, pieces: int | None) -> list[str]:
    if pieces is None:
        # Whitespace stays attached to a word so that the pieces join back
        # into exactly the text.
        return _WORD_PIECES.findall(text) or ([text] if text else [])
    length = len(text)
    return [text[i * length // pieces : (i + 1) * length // pieces] for i in range(pieces)]


_CHOICE_END = b',"finish_reason":null}]}\n\n'


@functools.lru_cache(maxsize=256)
def _content_events(pieces: tuple[str, ...]) -> tuple[bytes, ...]:
    """Each piece's chunk after the per-stream prefix (id, created, model)."""
    return tuple(
        b'{"index":0,"delta":{"content":' + _dumps(piece) + b"}" + _CHOICE_END for piece in pieces
    )


def _chunk_prefix(number: int, body: dict) -> bytes:
    """The start of every chunk of one stream, up to its ``choices`` list."""
    return (
        b'data: {"id":"chatcmpl-fake-%d","object":"chat.completion.chunk","created":%d,'
        b'"model":%b,"choices":['
    ) % (number, int(time.time()), _dumps(_model_name(body)))


def _call_id(number: int, index: int) -> str:
    return f"call_fake{number}x{index}"


def _calls_text(calls: list[tuple[str, str]]) -> str:
    """What a tool-call answer "wrote", for its completion tokens."""
    return "".join(name + arguments for name, arguments in calls)


def _model_name(body: dict) -> str:
    model = body.get("model")
    return model if isinstance(model, str) else "fake-model"


# One encoder for the whole module: json.dumps() with non-default options builds
# a new encoder per call, which shows in a stream's hundreds of pieces.
_ENCODE = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def _dumps(obj: Any) -> bytes:
    try:
        return _ENCODE(obj).encode()
    except UnicodeEncodeError:
        # A lone surrogate (a scripted broken answer) can only travel escaped,
        # as "\\ud800" in the JSON text, the way a real provider sends it.
        return json.dumps(obj, separators=(",", ":")).encode()


def _http_chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


# --------------------------------------------------------------------------- pacing

# Chunks due this close together go out in one wake-up of the pacer.
_PACER_SLACK = 0.001
# How soon to retry a stream whose client is not reading (socket buffer full).
_SEND_RETRY = 0.005


class _Paced:
    """The timed part of one stream: pre-encoded writes and when each is due."""

    __slots__ = (
        "sock",
        "writes",
        "index",
        "first_at",
        "interval",
        "hang",
        "pending",
        "watched",
        "result",
        "done",
    )

    def __init__(
        self,
        sock: socket.socket,
        writes: list[bytes],
        first_at: float,
        interval: float,
        hang: bool,
    ) -> None:
        self.sock = sock
        self.writes = writes
        self.index = 0
        self.first_at = first_at
        self.interval = interval
        # After the last write: keep the stream open until the client goes away.
        self.hang = hang
        # Bytes the socket did not take yet (a client that stopped reading).
        self.pending = b""
        self.watched = False
        self.result: str | None = None
        self.done = threading.Event()

    def due(self) -> float:
        return self.first_at + self.index * self.interval


class _Pacer:
    """Writes the timed part of every stream of one server from a single thread.

    A thread per stream that wakes for every chunk pays a GIL hand-off per
    chunk; with a thousand concurrent streams (tens of thousands of chunks a
    second) that alone saturated a core and made every stream late.  Handler
    threads therefore hand their pre-encoded writes over and block until the
    stream is over, while this thread sends whatever is due and watches every
    stream socket for EOF in one selector, so a client going away is noticed
    at once, between chunks or during a hang.

    ``run`` returns ``"finished"`` (every write sent), ``"gone"`` (the client
    closed or reset the connection) or ``"stopped"`` (``close`` was called).
    """

    def __init__(self, name: str) -> None:
        self._lock = threading.Lock()
        self._incoming: list[_Paced] = []
        self._closed = False
        # Only the pacer thread touches these.
        self._heap: list[tuple[float, int, _Paced]] = []
        self._order = itertools.count()
        self._active: set[_Paced] = set()
        self._selector = selectors.DefaultSelector()
        # Handler threads wake the pacer through this pair when they add work.
        self._wake_in, self._wake_out = socket.socketpair()
        self._wake_in.setblocking(False)
        self._wake_out.setblocking(False)
        self._selector.register(self._wake_in, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def run(self, paced: _Paced) -> str:
        with self._lock:
            if self._closed:
                return "stopped"
            self._incoming.append(paced)
        self._wake()
        paced.done.wait()
        return paced.result or "stopped"

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._wake()
        self._thread.join(timeout=5)
        self._wake_in.close()
        self._wake_out.close()

    def _wake(self) -> None:
        try:
            self._wake_out.send(b"\0")
        except OSError:
            pass  # Buffer full: a wake-up is already pending.

    def _loop(self) -> None:
        try:
            while True:
                with self._lock:
                    if self._closed:
                        return
                    incoming, self._incoming = self._incoming, []
                for paced in incoming:
                    self._start(paced)
                timeout = None
                if self._heap:
                    timeout = max(0.0, self._heap[0][0] - time.monotonic())
                for key, _ in self._selector.select(timeout):
                    if key.data is None:
                        self._drain_wake()
                    else:
                        self._check_client(key.data)
                horizon = time.monotonic() + _PACER_SLACK
                while self._heap and self._heap[0][0] <= horizon:
                    paced = heapq.heappop(self._heap)[2]
                    if paced.result is None:
                        self._send_due(paced, horizon)
        finally:
            for paced in list(self._active):
                self._finish(paced, "stopped")
            self._selector.close()

    def _start(self, paced: _Paced) -> None:
        self._active.add(paced)
        try:
            self._selector.register(paced.sock, selectors.EVENT_READ, paced)
            paced.watched = True
        except (OSError, ValueError):
            self._finish(paced, "gone")
            return
        self._schedule(paced, paced.due())

    def _schedule(self, paced: _Paced, when: float) -> None:
        heapq.heappush(self._heap, (when, next(self._order), paced))

    def _send_due(self, paced: _Paced, horizon: float) -> None:
        data = paced.pending
        # A late pacer catches up in one write instead of one per missed chunk.
        while paced.index < len(paced.writes) and paced.due() <= horizon:
            data += paced.writes[paced.index]
            paced.index += 1
        try:
            sent = paced.sock.send(data, socket.MSG_DONTWAIT) if data else 0
        except BlockingIOError:
            sent = 0
        except OSError:
            self._finish(paced, "gone")
            return
        paced.pending = data[sent:]
        if paced.pending:
            self._schedule(paced, time.monotonic() + _SEND_RETRY)
        elif paced.index < len(paced.writes):
            self._schedule(paced, paced.due())
        elif not paced.hang:
            self._finish(paced, "finished")

    def _check_client(self, paced: _Paced) -> None:
        try:
            peeked = paced.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError:
            self._finish(paced, "gone")
            return
        if not peeked:
            self._finish(paced, "gone")
        else:
            # A pipelined request: readability no longer means EOF, and a
            # level-triggered selector would spin on it.
            self._unwatch(paced)

    def _unwatch(self, paced: _Paced) -> None:
        if paced.watched:
            paced.watched = False
            try:
                self._selector.unregister(paced.sock)
            except (KeyError, ValueError, OSError):
                pass

    def _finish(self, paced: _Paced, result: str) -> None:
        # Unregister before waking the handler: it may close the socket, and
        # its descriptor number may be reused by the next connection.
        self._unwatch(paced)
        self._active.discard(paced)
        paced.result = result
        paced.done.set()

    def _drain_wake(self) -> None:
        try:
            while self._wake_in.recv(4096):
                pass
        except OSError:
            pass


# --------------------------------------------------------------------------- HTTP


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # Benchmarks open hundreds of connections at once; the stdlib default of 5
    # would make the kernel refuse or delay SYNs.
    request_queue_size = 1024
    allow_reuse_address = True
    # A handler may be sleeping in a long scripted delay; stop() must not wait
    # for it.
    block_on_close = False

    fake: FakeLLM

    def __init__(self, address: tuple[str, int], fake: FakeLLM) -> None:
        self.fake = fake
        # Set by stop(), so that waits woken by its socket shutdowns are not
        # counted as clients going away.
        self.stopping = False
        # Keep-alive handler threads block on reading the next request; stop()
        # shuts these sockets down so the threads exit instead of lingering.
        self.open_connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        # server_close() also runs when the bind fails, before there is a pacer.
        self.pacer: _Pacer | None = None
        super().__init__(address, _Handler)
        # Created after the bind succeeded, so a failed start leaks no thread.
        self.pacer = _Pacer(f"fake-llm-pacer-{self.server_address[1]}")

    def server_close(self) -> None:
        super().server_close()
        if self.pacer is not None:
            self.pacer.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients disconnecting mid-request is routine here (timeouts, drops);
        # tracebacks on stderr would only bury real test output.
        pass


class _Handler(BaseHTTPRequestHandler):
    # The openai client (httpx) pools keep-alive connections, so answers must
    # be HTTP/1.1 with an explicit Content-Length (or chunked, for streams).
    protocol_version = "HTTP/1.1"
    # Every write is a whole response or a whole stream chunk; Nagle would only
    # add latency.
    disable_nagle_algorithm = True
    server: _Server

    def setup(self) -> None:
        super().setup()
        # One poll object per connection: waits use it to notice the client's
        # EOF instead of sleeping blindly (and poll, unlike select, copes with
        # descriptors above 1024 when a benchmark holds a thousand streams).
        self._poller = select.poll()
        self._poller.register(self.connection, select.POLLIN)
        # Once the client has sent bytes we have not read (a pipelined request),
        # readability no longer means EOF; waits then fall back to sleeping.
        self._peer_sent_data = False
        with self.server.connections_lock:
            self.server.open_connections.add(self.connection)
        self.server.fake._count("connections")

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            with self.server.connections_lock:
                self.server.open_connections.discard(self.connection)

    def handle(self) -> None:
        try:
            super().handle()
        except OSError:
            # Peer reset or socket shut down by stop(): nothing left to answer.
            pass

    def log_message(self, format: str, *args: Any) -> None:
        pass

    # ----------------------------------------------------------------- routing

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path in MODELS_PATHS:
            self._send(200, _MODELS_BODY)
        else:
            self._send_error(404, f"Unknown path {path}")

    def do_POST(self) -> None:
        raw = self._read_body()
        path = self.path.split("?", 1)[0]
        if path not in CHAT_PATHS:
            self._send_error(404, f"Unknown path {path}")
            return
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        headers = {name.lower(): value for name, value in self.headers.items()}
        fake = self.server.fake
        if not isinstance(body, dict):
            # Malformed input is a client bug, not an upstream behaviour, so it
            # does not consume a scripted step.
            fake._record(path, headers, raw.decode("utf-8", "replace"), "status:400")
            self._send_error(400, "Request body must be a JSON object")
            return
        step, number, generation = fake._next_step(path, headers, body)
        if body.get("stream") is True:
            self._serve_stream_step(step, number, generation, body)
        else:
            self._serve_step(step, number, generation, body)

    # ---------------------------------------------------------------- behaviour

    def _serve_step(self, step: dict, number: int, generation: int, body: dict) -> None:
        kind = step["kind"]
        if kind in ("drop", "stream_break"):
            self._drop()
            return
        if kind == "garbage":
            self._send(200, _GARBAGE_BODY)
            return
        if kind in ("hang", "stream_hang"):
            wait: float | None = None
        elif kind == "delay":
            wait = step["seconds"]
        elif kind in ("stream_ok", "stream_error"):
            wait = step["first_token_delay"]
        else:
            wait = step.get("delay", 0.0)
        if not self._wait(wait):
            self._client_gone("requests_abandoned", generation)
            return
        if kind == "status":
            self._send_error(step["code"])
        elif kind == "stream_error":
            self._send_error(500, step.get("message"))
        elif kind == "tool_calls":
            self._send_tool_calls(number, body, step)
        elif kind == "stream_ok":
            text = step["text"] if step["chunks"] is None else "".join(step["chunks"])
            self._send_completion(number, body, text, step["tokens"])
        elif kind == "ok":
            self._send_completion(number, body, step.get("text"), step.get("tokens"))
        else:  # delay
            self._send_completion(number, body, None, None)

    def _serve_stream_step(self, step: dict, number: int, generation: int, body: dict) -> None:
        kind = step["kind"]
        if kind in ("drop", "hang", "status"):
            self._serve_step(step, number, generation, body)
        elif kind == "garbage":
            self._stream_garbage(generation)
        elif kind == "ok":
            self._stream(
                number,
                generation,
                body,
                stream_ok(
                    step.get("text"),
                    tokens=step.get("tokens"),
                    first_token_delay=step.get("delay", 0.0),
                ),
            )
        elif kind == "delay":
            self._stream(number, generation, body, stream_ok(first_token_delay=step["seconds"]))
        elif kind == "tool_calls":
            self._stream_tool_calls(number, generation, body, step)
        else:
            self._stream(number, generation, body, step)

    def _send_completion(
        self, number: int, body: dict, text: str | None, tokens: int | None
    ) -> None:
        prompt_chars, last_user, tool_results = _prompt(body)
        if text is None:
            text = _default_answer(last_user, self.server.fake.answer_chars, tool_results)
        payload = {
            "id": f"chatcmpl-fake-{number}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": _model_name(body),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
            "usage": _usage(prompt_chars, text, tokens),
        }
        self._send(200, _dumps(payload))

    def _send_tool_calls(self, number: int, body: dict, step: dict) -> None:
        message = {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": _call_id(number, index),
                    "type": "function",
                    "function": {"name": name, "arguments": arguments},
                }
                for index, (name, arguments) in enumerate(step["calls"])
            ],
        }
        payload = {
            "id": f"chatcmpl-fake-{number}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": _model_name(body),
            "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls"}],
            "usage": _usage(_prompt(body)[0], _calls_text(step["calls"]), step["tokens"]),
        }
        self._send(200, _dumps(payload))

    def _send_error(self, code: int, message: str | None = None) -> None:
        if message is None:
            message = f"Fake upstream error {code}"
        error_type = _ERROR_TYPES.get(code, "server_error" if code >= 500 else "api_error")
        payload = {"error": {"message": message, "type": error_type, "code": None}}
        # Retry-After: 0 alone does not help the openai client: it ignores
        # non-positive values and falls back to exponential backoff (~0.5-1 s).
        # retry-after-ms takes precedence there, so 1 ms makes retries immediate.
        extra = (("Retry-After", "0"), ("retry-after-ms", "1")) if code == 429 else ()
        self._send(code, _dumps(payload), extra)

    def _drop(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.connection.close()

    # ---------------------------------------------------------------- streaming

    def _stream(self, number: int, generation: int, body: dict, step: dict) -> None:
        fake = self.server.fake
        kind = step["kind"]
        prompt_chars, last_user, tool_results = _prompt(body)
        if step["chunks"] is not None:
            pieces = tuple(step["chunks"])
            text = "".join(pieces)
        else:
            text = step["text"]
            if text is None:
                text = _default_answer(last_user, fake.answer_chars, tool_results)
            count = step["pieces"] if step["pieces"] is not None else fake.stream_pieces
            pieces = _split(text, count)
        chunk_delay = step["chunk_delay"]
        if chunk_delay is None:
            chunk_delay = fake.chunk_delay

        # Everything is encoded before the first write, so that the pacer's
        # work per chunk is one send of ready bytes.
        prefix = _chunk_prefix(number, body)
        size = len(prefix)
        events = [
            b"%x\r\n%b%b\r\n" % (size + len(event), prefix, event)
            for event in _content_events(pieces)
        ]
        if kind == "stream_ok":
            final = prefix + b'{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
            options = body.get("stream_options")
            if step["usage"] and isinstance(options, dict) and options.get("include_usage"):
                usage = step["usage"]
                if not isinstance(usage, dict):
                    usage = _usage(prompt_chars, text, step["tokens"])
                final += prefix + b'],"usage":' + _dumps(usage) + b"}\n\n"
            tail: bytes | None = _http_chunk(final + _DONE_EVENT) + _LAST_CHUNK
        else:
            events = events[: step["after"]]
            tail = None
            if kind == "stream_error":
                message = step.get("message") or "Fake upstream error during streaming"
                error = {"error": {"message": message, "type": "server_error", "code": None}}
                tail = _http_chunk(b"data: " + _dumps(error) + b"\n\n") + _LAST_CHUNK
        if tail is not None:
            # The end of the stream rides on the last content chunk's write.
            if events:
                events[-1] += tail
            else:
                events.append(tail)
        self._pace(generation, prefix, events, step["first_token_delay"], chunk_delay, kind)

    def _stream_tool_calls(self, number: int, generation: int, body: dict, step: dict) -> None:
        """The standard tool-call deltas: per call, one delta with its index, id,
        type and name (empty arguments), then its arguments in a few pieces;
        then ``finish_reason: "tool_calls"``, the usage chunk when asked, [DONE]."""
        prefix = _chunk_prefix(number, body)
        choices = []
        for index, (name, arguments) in enumerate(step["calls"]):
            call_id = _call_id(number, index)
            choices.append({"tool_calls": [{
                "index": index, "id": call_id, "type": "function",
                "function": {"name": name, "arguments": ""},
            }]})
            for piece in _split(arguments, min(3, len(arguments)) or None):
                choices.append({"tool_calls": [{"index": index, "function": {"arguments": piece}}]})
        events = [
            _http_chunk(prefix + b'{"index":0,"delta":' + _dumps(delta) + _CHOICE_END)
            for delta in choices
        ]
        final = prefix + b'{"index":0,"delta":{},"finish_reason":"tool_calls"}]}\n\n'
        options = body.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage"):
            usage = _usage(_prompt(body)[0], _calls_text(step["calls"]), step["tokens"])
            final += prefix + b'],"usage":' + _dumps(usage) + b"}\n\n"
        events[-1] += _http_chunk(final + _DONE_EVENT) + _LAST_CHUNK
        self._pace(
            generation, prefix, events, step["delay"], self.server.fake.chunk_delay, "tool_calls"
        )

    def _pace(
        self,
        generation: int,
        prefix: bytes,
        events: list[bytes],
        first_token_delay: float,
        chunk_delay: float,
        kind: str,
    ) -> None:
        """Send the head and the role chunk now, then ``events`` through the pacer."""
        fake = self.server.fake
        head = _STREAM_HEAD
        if self.close_connection:
            head += b"Connection: close\r\n"
        role = prefix + b'{"index":0,"delta":{"role":"assistant","content":""}' + _CHOICE_END
        fake._count("streams_started", generation)
        if not self._write(head + b"\r\n" + _http_chunk(role)):
            self._client_gone("streams_abandoned", generation)
            return
        first_at = time.monotonic() + first_token_delay
        paced = _Paced(self.connection, events, first_at, chunk_delay, kind == "stream_hang")
        pacer = self.server.pacer
        result = pacer.run(paced) if pacer is not None else "stopped"
        if result == "gone":
            self._client_gone("streams_abandoned", generation)
        elif result == "stopped":
            self.close_connection = True
        elif kind == "stream_break":
            fake._count("streams_broken", generation)
            self._drop()
        else:
            fake._count("streams_completed", generation)

    def _stream_garbage(self, generation: int) -> None:
        fake = self.server.fake
        fake._count("streams_started", generation)
        event = _http_chunk(b"data: " + _GARBAGE_BODY + b"\n\n") + _LAST_CHUNK
        if self._write(_STREAM_HEAD + b"\r\n" + event):
            fake._count("streams_completed", generation)
        else:
            self._client_gone("streams_abandoned", generation)

    # ----------------------------------------------------------------- plumbing

    def _wait(self, seconds: float | None) -> bool:
        if seconds is None:
            return self._wait_until(None)
        if seconds <= 0:
            return True
        return self._wait_until(time.monotonic() + seconds)

    def _wait_until(self, deadline: float | None) -> bool:
        """Wait until ``deadline`` (``None``: forever); False once the client is gone.

        poll() wakes as soon as the socket turns readable, which for a client
        that sends nothing more means EOF or reset: detection is immediate and
        costs no periodic wake-ups while hundreds of requests wait.
        """
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return True
            if self.server.stopping:
                return False
            if self._peer_sent_data:
                time.sleep(0.02 if remaining is None else min(0.02, remaining))
                continue
            if not self._poller.poll(None if remaining is None else remaining * 1000):
                continue
            try:
                peeked = self.connection.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue
            except OSError:
                return False
            if not peeked:
                return False
            self._peer_sent_data = True

    def _client_gone(self, counter: str, generation: int) -> None:
        self.close_connection = True
        if not self.server.stopping:
            self.server.fake._count(counter, generation)

    def _write(self, data: bytes) -> bool:
        try:
            self.connection.sendall(data)
        except OSError:
            self.close_connection = True
            return False
        return True

    def _read_body(self) -> bytes:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = 0
        return self.rfile.read(length) if length > 0 else b""

    def _send(
        self,
        code: int,
        body: bytes,
        extra_headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        # Hand-built head instead of send_response()/send_header(): one write,
        # no per-request date formatting or logging, which matters at 400 req/s.
        reason = self.responses.get(code, ("",))[0]
        head = [
            f"HTTP/1.1 {code} {reason}",
            "Content-Type: application/json",
            f"Content-Length: {len(body)}",
        ]
        head.extend(f"{name}: {value}" for name, value in extra_headers)
        if self.close_connection:
            head.append("Connection: close")
        data = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
        # A failed write means the client already gave up (e.g. timed out
        # during a delay step); _write marks the connection for closing.
        self._write(data)


# --------------------------------------------------------------------------- public


class FakeLLM:
    """In-process fake of the OpenAI chat-completions API.

    Attributes that may be changed at runtime (``reset()`` restores the
    constructor's values): ``latency`` (seconds before every default answer,
    the first-token delay of default streams), ``chunk_delay`` (seconds between
    the pieces of default streams), ``stream_pieces`` (pieces per default
    stream; ``None``: one per word), ``answer_chars`` (length of the default
    answer; ``None``: up to 200 characters), ``failure_rate`` (probability that
    a non-scripted request fails, see module docs) and ``chaos_timeout`` (sleep
    used by the chaos "delay" outcome).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        latency: float = 0.0,
        *,
        seed: int | None = None,
        failure_rate: float = 0.0,
        chaos_timeout: float = 5.0,
        chunk_delay: float = 0.0,
        stream_pieces: int | None = None,
        answer_chars: int | None = None,
        record: bool = True,
    ) -> None:
        if stream_pieces is not None and stream_pieces < 1:
            raise ValueError("stream_pieces must be at least 1")
        self.host = host
        self.port = port
        self.latency = float(latency)
        self.failure_rate = float(failure_rate)
        self.chaos_timeout = float(chaos_timeout)
        self.chunk_delay = float(chunk_delay)
        self.stream_pieces = stream_pieces
        self.answer_chars = answer_chars
        # Calls asked of every request that offers tools (see module docs).
        self.tools_forever: list[tuple[str, Any]] | None = None
        # Long benchmark runs would otherwise keep every request body in memory.
        self.record = record
        self._initial = self._settings()
        self._seed = seed
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._steps: deque[dict] = deque()
        self._model_steps: dict[str, deque[dict]] = {}
        self._requests: list[dict] = []
        self._outcomes: list[str] = []
        self._calls = 0
        self._counters = dict.fromkeys(_COUNTERS, 0)
        # Bumped by reset(): a stream still running from before the reset must
        # not count toward the next test's numbers.
        self._generation = 0
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def _settings(self) -> tuple:
        return (
            self.latency,
            self.failure_rate,
            self.chaos_timeout,
            self.chunk_delay,
            self.stream_pieces,
            self.answer_chars,
        )

    # ------------------------------------------------------------- lifecycle

    def start(self) -> FakeLLM:
        if self._server is not None:
            raise RuntimeError("FakeLLM already started")
        server = _Server((self.host, self.port), self)
        self.port = server.server_address[1]
        self._server = server
        # Short poll interval so stop() returns promptly between tests.
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"fake-llm-{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.stopping = True
        server.shutdown()
        server.server_close()
        with server.connections_lock:
            connections = list(server.open_connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FakeLLM:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        host = self.host
        if host in ("", "0.0.0.0", "::"):
            host = "127.0.0.1"
        elif ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}/v1"

    # ------------------------------------------------------------- scripting

    def script(self, *steps: dict) -> FakeLLM:
        """Queue steps; each chat-completions request consumes one, FIFO."""
        checked = _validate(steps)
        with self._lock:
            self._steps.extend(checked)
        return self

    def script_for(self, model: str, *steps: dict) -> FakeLLM:
        """Queue steps consumed only by requests for ``model``, before the global queue."""
        checked = _validate(steps)
        with self._lock:
            self._model_steps.setdefault(model, deque()).extend(checked)
        return self

    def reset(self) -> None:
        """Forget records, counters and queued steps; restore constructor settings."""
        with self._lock:
            self._steps.clear()
            self._model_steps.clear()
            self._requests.clear()
            self._outcomes.clear()
            self._calls = 0
            self._counters = dict.fromkeys(_COUNTERS, 0)
            self._generation += 1
            self.tools_forever = None
            (
                self.latency,
                self.failure_rate,
                self.chaos_timeout,
                self.chunk_delay,
                self.stream_pieces,
                self.answer_chars,
            ) = self._initial
            self._rng = random.Random(self._seed)

    def wait_for(
        self, predicate: Callable[[], object], timeout: float = 5.0, interval: float = 0.01
    ) -> bool:
        """Poll ``predicate`` until it is true or ``timeout`` passes; its last verdict."""
        return poll_until(predicate, timeout, interval)

    # ------------------------------------------------------------- recording

    @property
    def requests(self) -> list[dict]:
        with self._lock:
            return list(self._requests)

    @property
    def outcomes(self) -> list[str]:
        with self._lock:
            return list(self._outcomes)

    @property
    def models(self) -> list[str | None]:
        """The ``model`` of every recorded request, in call order."""
        with self._lock:
            return [request["model"] for request in self._requests]

    @property
    def streamed(self) -> list[bool]:
        """Whether each recorded request asked for a stream, in call order."""
        with self._lock:
            return [request["stream"] for request in self._requests]

    @property
    def authorizations(self) -> list[str | None]:
        """The ``Authorization`` header of every recorded request, in call order."""
        with self._lock:
            return [request["headers"].get("authorization") for request in self._requests]

    @property
    def calls(self) -> int:
        with self._lock:
            return self._calls

    @property
    def connections(self) -> int:
        """TCP connections accepted (all paths); fewer than calls means keep-alive reuse."""
        return self._counter("connections")

    @property
    def requests_abandoned(self) -> int:
        """Requests whose client went away before any answer was written."""
        return self._counter("requests_abandoned")

    @property
    def streams_started(self) -> int:
        return self._counter("streams_started")

    @property
    def streams_completed(self) -> int:
        """Streams the fake wrote to the end (``[DONE]``, or the error event)."""
        return self._counter("streams_completed")

    @property
    def streams_broken(self) -> int:
        """Streams the fake cut on purpose (``stream_break`` or chaos)."""
        return self._counter("streams_broken")

    @property
    def streams_abandoned(self) -> int:
        """Streams whose client went away before the fake finished them."""
        return self._counter("streams_abandoned")

    @property
    def streams_in_flight(self) -> int:
        with self._lock:
            counters = self._counters
            return counters["streams_started"] - (
                counters["streams_completed"]
                + counters["streams_broken"]
                + counters["streams_abandoned"]
            )

    # ------------------------------------------------------------- internals

    def _counter(self, name: str) -> int:
        with self._lock:
            return self._counters[name]

    def _count(self, name: str, generation: int | None = None) -> None:
        with self._lock:
            if generation is None or generation == self._generation:
                self._counters[name] += 1

    def _record(self, path: str, headers: dict, body: Any, outcome: str) -> int:
        with self._lock:
            return self._record_locked(path, headers, body, outcome)

    def _record_locked(self, path: str, headers: dict, body: Any, outcome: str) -> int:
        self._calls += 1
        if self.record:
            is_dict = isinstance(body, dict)
            model = body.get("model") if is_dict else None
            self._requests.append(
                {
                    "path": path,
                    "headers": headers,
                    "body": body,
                    "model": model if isinstance(model, str) else None,
                    "stream": is_dict and body.get("stream") is True,
                }
            )
            self._outcomes.append(outcome)
        return self._calls

    def _next_step(self, path: str, headers: dict, body: dict) -> tuple[dict, int, int]:
        # Choosing the step and recording happen under one lock so that
        # requests[i] and outcomes[i] always describe the same call.
        with self._lock:
            model = body.get("model")
            model_steps = self._model_steps.get(model) if isinstance(model, str) else None
            if model_steps:
                step = model_steps.popleft()
            elif self._steps:
                step = self._steps.popleft()
            elif self.tools_forever and body.get("tools"):
                step = tool_calls(*self.tools_forever)
            elif self.failure_rate > 0 and self._rng.random() < self.failure_rate:
                step = self._chaos_step(body.get("stream") is True)
            else:
                step = {"kind": "ok", "text": None, "tokens": None, "delay": self.latency}
            number = self._record_locked(path, headers, body, _outcome_label(step))
            return step, number, self._generation

    def _chaos_step(self, streaming: bool) -> dict:
        choice = self._rng.choice(_STREAM_CHAOS_CHOICES if streaming else _CHAOS_CHOICES)
        if choice == "drop":
            return drop()
        if choice == "delay":
            return delay(self.chaos_timeout)
        if choice == "stream_break":
            return stream_break(after=self._rng.randint(0, 3), first_token_delay=self.latency)
        return status(choice)


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8089)
    parser.add_argument(
        "--latency",
        type=float,
        default=0.0,
        help="seconds before an answer (first-token delay of streams)",
    )
    parser.add_argument("--failure-rate", type=float, default=0.0)
    parser.add_argument("--chaos-timeout", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--chunk-delay",
        type=float,
        default=0.0,
        help="seconds between the pieces of a streamed answer",
    )
    parser.add_argument(
        "--stream-pieces",
        type=int,
        default=None,
        help="pieces per streamed answer (default: one per word)",
    )
    parser.add_argument(
        "--answer-chars",
        type=int,
        default=None,
        help="length of the default answer (default: up to 200)",
    )
    parser.add_argument(
        "--tools-forever",
        default=None,
        metavar="NAMES",
        help="comma-separated tools every request that offers tools is asked to call",
    )
    args = parser.parse_args(argv)

    # Nobody can read the records of a standalone process; keep memory flat.
    fake = FakeLLM(
        args.host,
        args.port,
        args.latency,
        seed=args.seed,
        failure_rate=args.failure_rate,
        chaos_timeout=args.chaos_timeout,
        chunk_delay=args.chunk_delay,
        stream_pieces=args.stream_pieces,
        answer_chars=args.answer_chars,
        record=False,
    )
    if args.tools_forever:
        fake.tools_forever = [(name.strip(), {}) for name in args.tools_forever.split(",")
                              if name.strip()]
        # reset() forgets tools_forever; the standalone fake is never reset.
    serve_until_signalled(fake, f"Fake LLM listening on {fake.url}")


if __name__ == "__main__":
    main()
