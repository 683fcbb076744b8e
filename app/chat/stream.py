"""``POST /v1/chat/stream``: the send use case, delivered as Server-Sent Events.

Everything decided before the model is called (403 … 429, 503) is answered
by ``Exchange.open()`` in JSON, exactly as send answers it. Then the status
is 200 and the answer arrives as events:

    delta     {"text"}: the next piece of the model's raw text
    snapshot  {"text", "parts"}: the answer so far in the request's format,
              at most once per STREAM_SNAPSHOT_INTERVAL (a Telegram bot edits
              its message from it)
    done      send's 200 body, only after the exchange is saved
    error     {"error", "message"}: the model failed after the stream began
              (the unit is given back, nothing is saved)

and a ``: keep-alive`` comment while nothing else is sent.

The model's stream is read by a thread of its own (``Pump``) while the
response thread waits on it with a timeout: that is how the response thread
can write keep-alives while the model is silent, enforce the first-token
deadline exactly, and abort the upstream call. A client that went away is
learnt from a failed write (gunicorn then closes this generator): the
upstream call is shut at once, so no tokens are paid for an answer nobody
reads, and the unit is given back. A client that stops reading is one that
went away once a write has waited ``STREAM_WRITE_TIMEOUT`` (a timeout on the
socket, under gunicorn). When the worker starts stopping, the response thread
is woken and ends the stream before gunicorn's graceful timeout kills the
worker.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import replace

import httpx2
from flask import Response, current_app, request, stream_with_context

from app import metrics
from app.chat.send import Answer, Exchange, SendCommand, rate_limit_headers, storable
from app.deadline import WRITE_RESERVE_SECONDS, Deadline
from app.errors import ApiError, LLMTimeout, LLMUnavailable, ServiceUnavailable
from app.llm import Completion
from app.render import render

log = logging.getLogger(__name__)

KEEPALIVE = b": keep-alive\n\n"
DELTA_GATHER_SECONDS = 0.1


class ClientGone(ApiError):
    """The client closed the connection before ``done``."""

    status, code, message = 499, "client_gone", "The client went away."


# Line separators to every reader that splits like ``str.splitlines`` (httpx's
# and aiohttp's line iterators among them): raw in a data line they would cut
# the JSON in two. Escaped, they are the same JSON string.
_LINE_BREAKERS = str.maketrans({"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"})


def event(name: str, data: dict) -> bytes:
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"event: {name}\ndata: {payload.translate(_LINE_BREAKERS)}\n\n".encode()


def snapshot(text: str, fmt: str) -> bytes:
    rendered = render(text, fmt)
    return event("snapshot", {"text": rendered.text, "parts": rendered.parts})


def stream_command(command: SendCommand) -> SendCommand:
    """A stream lives up to STREAM_MAX_SECONDS: its writes at the end get
    their retries then (the model's first token stays bound by LLM_DEADLINE)."""
    arrived = command.deadline.arrived
    seconds = current_app.config["STREAM_MAX_SECONDS"] + WRITE_RESERVE_SECONDS
    return replace(command, deadline=Deadline(arrived, arrived + seconds))


def stream_response(exchange: Exchange, replay: Answer | None) -> Response:
    """The 200 event stream of an opened exchange (or of an answer it already
    has: a replayed key's, a cached common answer), with the RateLimit headers
    of the unit it holds (the answer's, on replay)."""
    if replay is not None:
        events, usage = replayed(replay), replay.usage
    else:
        events, usage = answered(exchange), exchange.reservation.usage
    client = request.environ.get("gunicorn.socket")
    if client is not None:
        # gthread writes with a blocking sendall: without a timeout a client
        # that stops reading would hold this thread (and the unit) for ever.
        client.settimeout(current_app.config["STREAM_WRITE_TIMEOUT"])
    return Response(
        stream_with_context(events),
        mimetype="text/event-stream",
        headers={
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
            **rate_limit_headers(usage, exchange.day),
        },
    )


def replayed(answer: Answer) -> Iterator[bytes]:
    """An answer already there (stored, or cached): one delta, one snapshot,
    done; no model call."""
    yield event("delta", {"text": answer.text})
    yield event("snapshot", {"text": answer.rendered.text, "parts": answer.rendered.parts})
    yield event("done", answer.to_dict())


class Pump:
    """Reads the model's stream into a buffer, in a thread of its own."""

    def __init__(self, exchange: Exchange):
        self._exchange = exchange
        self._pending: list[str] = []
        self._statuses: list[dict] = []  # of the tool calls, before the first piece
        self._ready = threading.Condition()
        self._eager = False
        self._woken = False
        self._cancel = threading.Event()
        self.finished = False
        self.error: ApiError | None = None
        self.upstream = None
        self._thread = threading.Thread(target=self._run, name="ai-chat-stream", daemon=True)
        self._thread.start()

    def take(self, until: float, gather_until: float) -> tuple[list[dict], str, bool]:
        """The tool statuses and the text that arrived since the last call,
        and whether the stream has ended (nothing more will come).

        Returns at the end of the stream, at ``until`` (monotonic), when
        ``wake`` is called, at once for a status, or once there is text and
        ``gather_until`` has passed: pieces arriving before that gather
        without waking this thread, so several go out in one write (and one
        wake-up).
        """
        with self._ready:
            while not self.finished and not self._woken and not self._statuses:
                now = time.monotonic()
                if now >= until or (self._pending and now >= gather_until):
                    break
                # Woken by a piece only while there is none to send yet.
                self._eager = not self._pending
                wake_at = until if self._eager else min(until, gather_until)
                self._ready.wait(wake_at - now)
            self._eager = self._woken = False
            statuses, self._statuses = self._statuses, []
            text = "".join(self._pending)
            self._pending.clear()
            return statuses, text, self.finished

    def wake(self) -> None:
        """Make the waiting ``take`` return now (from any thread)."""
        with self._ready:
            self._woken = True
            self._ready.notify()

    def abort(self) -> None:
        """Stop reading: the upstream connection is shut (from this thread).
        The failure the pump's thread then sees is ours, not the provider's:
        it is neither retried nor counted against the provider."""
        with self._ready:
            self._cancel.set()
            upstream = self.upstream
        if upstream is not None:
            upstream.abort()

    def _put(self, text: str) -> None:
        with self._ready:
            self._pending.append(text)
            if self._eager:
                self._ready.notify()

    def _status(self, status: dict) -> None:
        with self._ready:
            self._statuses.append(status)
            self._ready.notify()

    def _attach(self, upstream) -> None:
        """The provider answered: from now on ``abort`` can cut its stream."""
        with self._ready:
            self.upstream = upstream
            aborted = self._cancel.is_set()
        if aborted:
            upstream.abort()

    def _ask(self, tools: list[dict] | None):
        """One round of the exchange's model rounds, streamed: the open
        upstream and its first piece, or, when the model asked for tools
        instead, the Completion of that round."""
        exchange = self._exchange
        upstream, first = exchange.llm.stream(
            exchange.messages, exchange.chain, exchange.llm_budget(), self._attach,
            self._cancel, tools,
        )
        if first is None:
            return Completion("", upstream.tokens, upstream.model.name, upstream.tool_calls)
        return upstream, first

    def _run(self) -> None:
        try:
            upstream, first = self._exchange.model_rounds(self._ask, self._status)
            self._attach(upstream)
            try:
                self._put(first)
                for piece in upstream.pieces:
                    self._put(piece)
            finally:
                upstream.close()
        except ApiError as error:
            self.error = error
        except httpx2.TimeoutException:
            log.warning("llm stream went silent for longer than OPENAI_TIMEOUT")
            self.error = LLMTimeout()
        except Exception as error:  # a broken stream, whatever its shape
            if not self._cancel.is_set():
                log.warning("llm stream broke: %s", type(error).__name__)
            self.error = LLMUnavailable()
        finally:
            with self._ready:
                self.finished = True
                self._ready.notify()


def answered(exchange: Exchange) -> Iterator[bytes]:
    """Deltas and snapshots while the model writes, then done (or error)."""
    config = current_app.config
    fmt = exchange.command.format
    interval = config["STREAM_SNAPSHOT_INTERVAL"]
    keepalive = config["STREAM_KEEPALIVE_SECONDS"]
    arrived = exchange.command.deadline.arrived
    first_token_by = time.monotonic() + exchange.llm_budget()
    stream_ends_by = arrived + config["STREAM_MAX_SECONDS"]
    server = request.environ.get("ai_chat.server")
    pump = Pump(exchange)
    forget_server = server.on_stop(pump.wake) if server is not None else lambda: None
    metrics.STREAMS_IN_FLIGHT.inc()
    outcome = "error"
    text: list[str] = []
    try:
        last_write = time.monotonic()
        last_delta = float("-inf")
        last_snapshot = None
        changed = False
        while True:
            due = [last_write + keepalive, stream_ends_by]
            stop_by = None
            if server is not None and server.stopping_since is not None:
                # Ended, its unit given back, before gunicorn's graceful timeout
                # (REQUEST_DEADLINE + 5 s) kills the worker, even if its last
                # write waits the whole write timeout.
                stop_by = (server.stopping_since + config["REQUEST_DEADLINE"]
                           - config["STREAM_WRITE_TIMEOUT"])
                due.append(stop_by)
            if changed:
                due.append(last_snapshot + interval)
            if not text:
                due.append(first_token_by)
            # The first piece goes out at once; after it, what arrives within
            # DELTA_GATHER_SECONDS of the last delta goes out as one: a model
            # writes a token every ~20 ms, and one write per token was most of
            # a stream's CPU (bench/RESULTS.md).
            statuses, piece, finished = pump.take(min(due), last_delta + DELTA_GATHER_SECONDS)
            now = time.monotonic()
            for status in statuses:
                last_write = now
                yield event("status", status)
            if piece:
                if not text:
                    metrics.STREAM_FIRST_TOKEN.observe(now - arrived)
                # Cleaned as it arrives: deltas, snapshots and done show the same.
                piece = storable(piece)
                text.append(piece)
                changed = True
                last_write = last_delta = now
                yield event("delta", {"text": piece})
            if changed and (last_snapshot is None or now - last_snapshot >= interval):
                changed, last_snapshot = False, now
                yield snapshot("".join(text), fmt)
            if finished:
                break
            if now >= stream_ends_by or (not text and now >= first_token_by):
                raise LLMTimeout()
            if stop_by is not None and now >= stop_by:
                raise ServiceUnavailable()
            if now - last_write >= keepalive:
                last_write = now
                yield KEEPALIVE
        if pump.error is not None:
            raise pump.error
        if not "".join(text).strip():
            log.warning("llm streamed an empty answer")
            raise LLMUnavailable()  # as send refuses it
        exchange.watch.lap("llm")
        answer = exchange.finish("".join(text), pump.upstream.tokens, pump.upstream.model.name)
        outcome = "done"
        yield event("done", answer.to_dict())
    except GeneratorExit:
        outcome = "client_gone"
        pump.abort()
        exchange.abandon(ClientGone())
        raise
    except Exception as error:
        pump.abort()
        exchange.abandon(error)
        if not isinstance(error, ApiError):
            log.exception("stream failed")
            error = ApiError()
        yield event("error", {"error": error.code, "message": error.message})
    finally:
        forget_server()
        metrics.STREAMS_IN_FLIGHT.dec()
        metrics.STREAMS_ENDED.labels(outcome).inc()
