"""Closed-loop load generator: C clients, one keep-alive HTTP/1.1 connection each.

Stdlib asyncio streams and hand-built requests, so one Python process drives a
few hundred requests per second, or a thousand open streams, for a fraction
of a core: the generator shares the two cores with the server it measures and
must not become the bottleneck. Every client sends its next request as soon as
the previous answer is in (or ``think`` seconds after it: a seller reading the
answer), with a fresh ``telegram_id`` each time (new user per request), or,
with ``users``, the next of a fixed pool of returning users in turn (ids
``first_id`` … ``first_id + users - 1``, round robin over every client's
requests, so each user's share of the requests is the same whatever the
answers' speed). ``questions`` mixes the message: a repeated general question
of a small set, or one asked once only (the common-answer cache's load).
With ``ramp`` the clients start one after another over that many seconds, as
an evening's users arrive, instead of a thousand SYNs at once.

Two modes: POST /v1/chat/send (one JSON answer, its Server-Timing kept), and
POST /v1/chat/stream (``stream=True``): the Server-Sent Events are read as
they arrive until the first ``delta`` (its time is the sample's TTFT), then in
bulk every STREAM_POLL_S; a sample records the time to that first delta and to
the end of the stream, and a stream counts as answered only when it ended with
``done``. An ``error`` event, or a body that ends without either, is an error
of its own kind.

A 429 is an error unless the scenario expects refusals (``refusals=True``:
returning users at their daily limit); then it is counted in ``refused``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field

MESSAGE = "Как поднять карточку товара в поиске Wildberries?"
SEND_PATH = "/v1/chat/send"
STREAM_PATH = "/v1/chat/stream"
# One read takes whatever the socket has: a stream's events arrive a few at a time.
_READ_SIZE = 65536
# After a stream's first delta only its end matters: reading every piece as it
# arrives (a wake-up per piece, 40 000 a second at 1000 streams) would cost the
# generator cores. It stops reading the socket for this long between reads
# instead, and the pieces wait in the kernel's buffer (a few KiB; the server
# never blocks on them). The time to the end of a stream is as late as that.
STREAM_POLL_S = 0.2


@dataclass
class Sample:
    started: float
    latency: float  # seconds to the whole answer (a stream: to its last byte)
    status: int
    server_timing: bytes | None = None
    first_delta: float | None = None  # streams: seconds to the first delta event
    done: bool = True  # streams: the stream ended with its done event

    @property
    def answered(self) -> bool:
        return self.status == 200 and self.done


@dataclass
class LoadResult:
    samples: list[Sample] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    sent: int = 0
    refused: int = 0  # 429s, when the scenario expects them (not errors then)

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


def raise_open_files(needed: int) -> tuple[int, int]:
    """Raise this process's soft limit of open files towards ``needed`` (at most
    the hard limit); children started afterwards inherit it. Returns (before, now).

    A thousand clients are a thousand sockets here, and as many again in the
    gunicorn workers and the fake LLM: a soft limit of 1024 would fail the run
    with EMFILE, not measure the service.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return soft, resource.getrlimit(resource.RLIMIT_NOFILE)[0]


@dataclass(frozen=True)
class Questions:
    """The messages of a common-answer cache load: each request asks one of
    ``common`` (chosen at random, seeded), except a share ``unique`` of them
    that ask a question nobody asked before (never a hit)."""

    common: tuple[str, ...]
    unique: float = 0.0
    seed: int = 1


class _Request:
    """The bytes of one POST, built with as little work as possible."""

    def __init__(self, host: str, port: int, api_key: str, first_id: int, path: str,
                 users: int | None = None, questions: Questions | None = None):
        self.head = (
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"X-API-KEY: {api_key}\r\nContent-Type: application/json\r\n"
            "Content-Length: "
        ).encode()
        self.first_id = first_id
        self.users = users
        self.ids = itertools.count(first_id)
        self.tail = b', "message": ' + json.dumps(MESSAGE).encode() + b"}"
        self.questions = questions
        if questions is not None:
            self.random = random.Random(questions.seed)
            self.tails = [b', "message": ' + json.dumps(q, ensure_ascii=False).encode() + b"}"
                          for q in questions.common]

    def _tail(self, number: int) -> bytes:
        questions = self.questions
        if questions is None:
            return self.tail
        if self.random.random() < questions.unique:
            # A question of its own: the same words, a number nobody else asks about.
            unique = f"{questions.common[0]} Артикул {number}?"
            return b', "message": ' + json.dumps(unique, ensure_ascii=False).encode() + b"}"
        return self.random.choice(self.tails)

    def next(self) -> bytes:
        number = next(self.ids)
        telegram_id = number if self.users is None else (
            self.first_id + (number - self.first_id) % self.users)
        body = b'{"telegram_id": ' + str(telegram_id).encode() + self._tail(number)
        return self.head + str(len(body)).encode() + b"\r\n\r\n" + body


def _header(lowered: bytes, raw: bytes, name: bytes) -> bytes | None:
    start = lowered.find(b"\r\n" + name + b":")
    if start < 0:
        return None
    end = lowered.index(b"\r\n", start + 2)
    return raw[start + len(name) + 3 : end].strip()


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes | None, bool]:
    """Status, the Server-Timing value (or None) and whether the server closes."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    lowered = head.lower()
    length = int(_header(lowered, head, b"content-length") or 0)
    if length:
        await reader.readexactly(length)
    closes = b"\r\nconnection: close" in lowered
    return status, _header(lowered, head, b"server-timing"), closes


class _Events:
    """Splits the SSE text of a stream into events and notes the ones that matter."""

    def __init__(self):
        self.pending = bytearray()
        self.first_delta: float | None = None
        self.ending: str | None = None  # "done" or "error"

    def feed(self, data: bytes, now: float) -> None:
        self.pending += data
        start = 0
        while True:
            end = self.pending.find(b"\n\n", start)
            if end < 0:
                break
            # Only the first line (the event's name) matters; comments
            # (": keep-alive") and snapshots are read past.
            if self.pending.startswith(b"event: delta", start):
                if self.first_delta is None:
                    self.first_delta = now
            elif self.pending.startswith(b"event: done", start):
                self.ending = "done"
            elif self.pending.startswith(b"event: error", start):
                self.ending = "error"
            start = end + 2
        del self.pending[:start]


async def _read_stream(
    reader: asyncio.StreamReader, transport: asyncio.Transport
) -> tuple[int, float | None, str, bool]:
    """Status, perf_counter time of the first delta (or None), how the stream
    ended ("done", "error", "incomplete"; "" for an answer that is no stream,
    e.g. a JSON 429) and whether the server closes."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    lowered = head.lower()
    closes = b"\r\nconnection: close" in lowered
    if b"\r\ntransfer-encoding: chunked" not in lowered:
        length = int(_header(lowered, head, b"content-length") or 0)
        if length:
            await reader.readexactly(length)
        return status, None, "", closes
    events = _Events()
    buffer = bytearray()
    while True:
        if events.first_delta is not None:
            transport.pause_reading()
            await asyncio.sleep(STREAM_POLL_S)
            transport.resume_reading()
        data = await reader.read(_READ_SIZE)
        if not data:
            raise asyncio.IncompleteReadError(bytes(buffer), None)
        now = time.perf_counter()
        buffer += data
        # Every complete HTTP chunk in the buffer, without an await per chunk.
        position = 0
        while True:
            line_end = buffer.find(b"\r\n", position)
            if line_end < 0:
                break
            size = int(bytes(buffer[position:line_end]).split(b";", 1)[0], 16)
            start = line_end + 2
            if len(buffer) < start + size + 2:
                break
            if size == 0:  # the last chunk (no trailers): the body is over
                return status, events.first_delta, events.ending or "incomplete", closes
            events.feed(bytes(buffer[start : start + size]), now)
            position = start + size + 2
        del buffer[:position]


async def _client(
    host: str,
    port: int,
    request: _Request,
    result: LoadResult,
    keep_going: Callable[[], bool],
    timeout: float,
    on_answer: Callable[[], None] | None,
    stream: bool,
    delay: float,
    think: float = 0.0,
    refusals: bool = False,
) -> None:
    await asyncio.sleep(delay)
    reader = writer = None
    first = True
    try:
        while keep_going():
            if think and not first:
                await asyncio.sleep(think)
                if not keep_going():
                    break
            first = False
            if writer is None:
                try:
                    reader, writer = await asyncio.open_connection(host, port)
                except OSError:
                    result.error("connect")
                    await asyncio.sleep(0.05)
                    continue
            data = request.next()
            started = time.perf_counter()
            result.sent += 1
            try:
                async with asyncio.timeout(timeout):
                    writer.write(data)
                    if stream:
                        status, first, ending, closes = await _read_stream(
                            reader, writer.transport)
                        timing = None
                    else:
                        status, timing, closes = await _read_response(reader)
            except TimeoutError:
                result.error("timeout")
                closes = True
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
                result.error("connection")
                closes = True
            else:
                now = time.perf_counter()
                sample = Sample(started, now - started, status, timing)
                if stream and status == 200:
                    sample.first_delta = None if first is None else first - started
                    sample.done = ending == "done"
                    if not sample.done:
                        result.error(f"stream_{ending}")
                result.samples.append(sample)
                if status == 429 and refusals:
                    result.refused += 1
                elif status != 200:
                    result.error(f"http_{status}")
                elif sample.done and on_answer is not None:
                    on_answer()
            if closes:
                writer.close()
                writer = None
    finally:
        if writer is not None:
            writer.close()


async def run_load(
    host: str,
    port: int,
    api_key: str,
    clients: int,
    *,
    first_id: int,
    duration: float | None = None,
    total: int | None = None,
    timeout: float = 30.0,
    on_answer: Callable[[], None] | None = None,
    stream: bool = False,
    ramp: float = 0.0,
    drain: float | None = None,
    users: int | None = None,
    questions: Questions | None = None,
    think: float = 0.0,
    refusals: bool = False,
) -> LoadResult:
    """Drive ``clients`` closed loops for ``duration`` seconds or ``total`` requests,
    whichever ends first; client i starts ``i * ramp / clients`` seconds in.

    In-flight requests finish after the stop (bounded by ``timeout``), or, with
    ``drain``, those still running that many seconds after it are cut (their
    connections closed; neither answers nor errors: they would end after any
    window). Only the caller decides which part of the samples is the
    measurement window.
    """
    result = LoadResult()
    request = _Request(host, port, api_key, first_id, STREAM_PATH if stream else SEND_PATH,
                       users, questions)
    stop_at = time.perf_counter() + duration if duration is not None else float("inf")
    limit = total if total is not None else float("inf")

    def keep_going() -> bool:
        return result.sent < limit and time.perf_counter() < stop_at

    tasks = [
        asyncio.create_task(
            _client(host, port, request, result, keep_going, timeout, on_answer, stream,
                    index * ramp / clients, think, refusals)
        )
        for index in range(clients)
    ]
    if drain is None or duration is None:
        await asyncio.gather(*tasks)
        return result
    _, unfinished = await asyncio.wait(tasks, timeout=duration + drain)
    for task in unfinished:
        task.cancel()
    await asyncio.gather(*unfinished, return_exceptions=True)
    return result
