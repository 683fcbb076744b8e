"""Closed-loop load generator: C clients, one keep-alive HTTP/1.1 connection each.

Stdlib asyncio streams and hand-built requests, so one Python process drives a
few hundred requests per second for a fraction of a core: the generator shares
the two cores with the server it measures and must not become the bottleneck.
Every client sends its next request as soon as the previous answer is in, with
a fresh ``telegram_id`` each time (new user per request).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

MESSAGE = "Как поднять карточку товара в поиске Wildberries?"


@dataclass
class Sample:
    started: float
    latency: float
    status: int
    server_timing: bytes | None


@dataclass
class LoadResult:
    samples: list[Sample] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    sent: int = 0

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


class _Request:
    """The bytes of one POST /v1/chat/send, built with as little work as possible."""

    def __init__(self, host: str, port: int, api_key: str, first_id: int):
        self.head = (
            f"POST /v1/chat/send HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"X-API-KEY: {api_key}\r\nContent-Type: application/json\r\n"
            "Content-Length: "
        ).encode()
        self.ids = itertools.count(first_id)
        self.tail = b', "message": ' + json.dumps(MESSAGE).encode() + b"}"

    def next(self) -> bytes:
        body = b'{"telegram_id": ' + str(next(self.ids)).encode() + self.tail
        return self.head + str(len(body)).encode() + b"\r\n\r\n" + body


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """Status, the Server-Timing value (or None) and whether the server closes."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    lowered = head.lower()
    start = lowered.find(b"\r\ncontent-length:")
    length = 0
    if start >= 0:
        end = lowered.index(b"\r\n", start + 2)
        length = int(lowered[start + 17 : end])
    if length:
        await reader.readexactly(length)
    timing = None
    start = lowered.find(b"\r\nserver-timing:")
    if start >= 0:
        end = lowered.index(b"\r\n", start + 2)
        timing = head[start + 16 : end]
    closes = b"\r\nconnection: close" in lowered
    return status, timing, closes


async def _client(
    host: str,
    port: int,
    request: _Request,
    result: LoadResult,
    keep_going: Callable[[], bool],
    timeout: float,
    on_answer: Callable[[], None] | None,
) -> None:
    reader = writer = None
    try:
        while keep_going():
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
                    status, timing, closes = await _read_response(reader)
            except TimeoutError:
                result.error("timeout")
                closes = True
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
                result.error("connection")
                closes = True
            else:
                result.samples.append(
                    Sample(started, time.perf_counter() - started, status, timing)
                )
                if status != 200:
                    result.error(f"http_{status}")
                elif on_answer is not None:
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
) -> LoadResult:
    """Drive ``clients`` closed loops for ``duration`` seconds or ``total`` requests,
    whichever ends first.

    In-flight requests finish after the stop (bounded by ``timeout``); only the
    caller decides which part of the samples is the measurement window.
    """
    result = LoadResult()
    request = _Request(host, port, api_key, first_id)
    stop_at = time.perf_counter() + duration if duration is not None else float("inf")
    limit = total if total is not None else float("inf")

    def keep_going() -> bool:
        return result.sent < limit and time.perf_counter() < stop_at

    tasks = [
        asyncio.create_task(
            _client(host, port, request, result, keep_going, timeout, on_answer)
        )
        for _ in range(clients)
    ]
    await asyncio.gather(*tasks)
    return result
