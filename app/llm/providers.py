"""Providers and models, and one model's call with its retries.

One ``OpenAI`` client per provider, built once per process, with an explicit
per-attempt timeout and the SDK's own retries off, so ``backoff`` is the only
retry layer. Only transient failures (connection errors, timeouts, 429, 5xx)
are retried, and every attempt and sleep stays inside the budget the caller
gives (the request's deadline, app.deadline).
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass

import backoff
import httpx2
import openai

from app.llm.breaker import Breaker

log = logging.getLogger("app.llm")

# APITimeoutError is a subclass of APIConnectionError.
TRANSIENT = (openai.APIConnectionError, openai.RateLimitError, openai.InternalServerError)


class Unusable(Exception):
    """The provider answered 200 with something that is not an answer."""


@dataclass(frozen=True)
class CallSettings:
    temperature: float
    max_tokens: int
    timeout: float  # one attempt (and, when streaming, one silence)
    max_retries: int
    retry_base_delay: float

    @classmethod
    def from_config(cls, config) -> CallSettings:
        return cls(
            temperature=config["OPENAI_TEMPERATURE"],
            max_tokens=config["OPENAI_MAX_TOKENS"],
            timeout=config["OPENAI_TIMEOUT"],
            max_retries=config["OPENAI_MAX_RETRIES"],
            retry_base_delay=config["OPENAI_RETRY_BASE_DELAY"],
        )


# Connection pools per provider and process. httpx's pool scans every one of its
# connections (and probes the idle ones' sockets) whenever a request starts or
# ends: with one pool for 600 threads that was 29% of a worker's CPU at 1000
# concurrent chats (bench/RESULTS.md). Threads are spread over the shards, so a
# pool serves about threads / SHARDS of them.
SHARDS = 32


@functools.cache
def _tls_context():
    """One TLS context for every client of the process: building one per client
    costs ~50 ms of CPU (the CA bundle)."""
    return httpx2.create_ssl_context()


class Provider:
    """An OpenAI-compatible endpoint: its clients and its circuit breaker."""

    def __init__(self, name: str, settings: dict, timeout: float, breaker: Breaker):
        self.name = name
        self.base_url = settings["base_url"] or "https://api.openai.com/v1"
        self.configured = settings["configured"]
        self.breaker = breaker
        self._settings = settings
        self._timeout = timeout
        self._shards: list[openai.OpenAI | None] = [None] * SHARDS
        self._next_shard = itertools.count()
        self._thread = threading.local()
        self._lock = threading.Lock()

    @property
    def client(self) -> openai.OpenAI:
        """The calling thread's client (built on first use, with SDK retries off)."""
        shard = getattr(self._thread, "shard", None)
        if shard is None:
            shard = self._thread.shard = next(self._next_shard) % SHARDS
        client = self._shards[shard]
        if client is None:
            with self._lock:
                client = self._shards[shard]
                if client is None:
                    client = self._shards[shard] = openai.OpenAI(
                        # Local servers (vLLM, Ollama, llama.cpp) take any key.
                        api_key=self._settings["api_key"] or "not-needed",
                        base_url=self._settings["base_url"],
                        timeout=self._timeout,
                        max_retries=0,
                        http_client=openai.DefaultHttpxClient(
                            verify=_tls_context(), timeout=self._timeout
                        ),
                    )
        return client

    def close(self) -> None:
        for client in self._shards:
            if client is not None:
                client.close()


@dataclass(frozen=True)
class Model:
    name: str
    provider: Provider


@dataclass(frozen=True)
class Tokens:
    """What a provider reported it used (0 when it reported nothing: never a guess)."""

    prompt: int = 0
    completion: int = 0
    total: int = 0

    def __add__(self, other: Tokens) -> Tokens:
        return Tokens(self.prompt + other.prompt, self.completion + other.completion,
                      self.total + other.total)


@dataclass(frozen=True)
class ToolCall:
    """One call of a tool the model asked for: its id, the tool's name and the
    arguments as the model wrote them (JSON text, checked by whoever runs it)."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class Completion:
    """A model's answer: its text, or (a tool round) the tools it asks for."""

    text: str
    tokens: Tokens
    model: str
    tool_calls: tuple[ToolCall, ...] = ()


def _body(
    model: Model, messages: list[dict], settings: CallSettings, tools: list[dict] | None,
    **extra,
) -> dict:
    """The chat-completions request body (with the tools offered, if any)."""
    body = {
        "model": model.name,
        "messages": messages,
        "temperature": settings.temperature,
        "max_tokens": settings.max_tokens,
        **extra,
    }
    if tools:
        body["tools"] = tools
    return body


def tool_calls_of(raw) -> tuple[ToolCall, ...]:
    """The well-formed function calls of ``message.tool_calls`` (others are
    skipped: a call without an id cannot be answered)."""
    calls = []
    for item in raw if isinstance(raw, list) else ():
        function = item.get("function") if isinstance(item, dict) else None
        if not isinstance(function, dict) or not isinstance(item.get("id"), str):
            continue
        name, arguments = function.get("name"), function.get("arguments")
        if isinstance(name, str):
            arguments = arguments if isinstance(arguments, str) else ""
            calls.append(ToolCall(item["id"], name, arguments))
    return tuple(calls)


# The budget of the request being retried, read by backoff as its retries start,
# and the caller's cancellation (a stream whose client left), read by its giveup.
_BUDGET: ContextVar[float] = ContextVar("ai_chat_llm_budget")
_CANCEL: ContextVar[threading.Event | None] = ContextVar("ai_chat_llm_cancel", default=None)


def with_retries(
    settings: CallSettings, budget: float, attempt, cancel: threading.Event | None = None
):
    """``attempt(timeout)`` retried on transient errors within ``budget`` s,
    and not retried once ``cancel`` is set (the failure was our own doing)."""
    budget_token, cancel_token = _BUDGET.set(budget), _CANCEL.set(cancel)
    try:
        return _retrying(settings)(attempt, settings, time.monotonic() + budget)
    finally:
        _BUDGET.reset(budget_token)
        _CANCEL.reset(cancel_token)


def cancelled(cancel: threading.Event | None) -> bool:
    return cancel is not None and cancel.is_set()


def _given_up(_error) -> bool:
    return cancelled(_CANCEL.get())


@functools.cache
def _retrying(settings: CallSettings):
    """The backoff-decorated attempt for these settings, built once: building
    the decorator on every call was about 9% of a send's CPU (bench/RESULTS.md)."""
    return backoff.on_exception(
        backoff.expo,
        TRANSIENT,
        max_tries=settings.max_retries + 1,
        max_time=_BUDGET.get,
        jitter=backoff.full_jitter,
        factor=settings.retry_base_delay,
        max_value=4,
        giveup=_given_up,
        on_backoff=_log_retry,
        logger=None,
    )(_timed_attempt)


def _timed_attempt(attempt, settings: CallSettings, deadline_at: float):
    remaining = deadline_at - time.monotonic()
    if remaining <= 0.05:
        raise openai.APITimeoutError(request=None)
    return attempt(min(settings.timeout, remaining))


def complete(
    model: Model, messages: list[dict], settings: CallSettings, budget: float,
    tools: list[dict] | None = None,
):
    """The model's whole answer (or, when it is offered ``tools``, the calls it
    asks for), retried within ``budget``.

    Sent with the SDK's low-level ``post`` (its documented way to call an
    endpoint with a plain body) and read with ``json.loads``: the same client,
    timeouts, status errors and retries as ``chat.completions.create``, but
    without its per-call type-driven transform of the request and pydantic
    construction of the answer, which cost about 1.3 ms of CPU per answer
    (bench/RESULTS.md).

    Raises the ``openai`` errors of the last attempt, or Unusable.
    """
    body = _body(model, messages, settings, tools)

    def attempt(timeout: float) -> Completion:
        response = model.provider.client.post(
            "/chat/completions", cast_to=httpx2.Response, body=body,
            options={"timeout": timeout},
        )
        try:
            answer = json.loads(response.content)
            message = answer["choices"][0]["message"]
            text = message.get("content")
            usage = answer.get("usage")
        except (ValueError, LookupError, TypeError, AttributeError) as error:
            # A 200 whose body is not a chat completion (an HTML error page…).
            raise Unusable(type(error).__name__) from None
        calls = tool_calls_of(message.get("tool_calls")) if tools else ()
        if calls:
            return Completion(text if isinstance(text, str) else "", token_usage(usage),
                              model.name, calls)
        if not isinstance(text, str) or not text.strip():
            raise Unusable("empty answer")
        return Completion(text=text, tokens=token_usage(usage), model=model.name)

    return with_retries(settings, budget, attempt)


def token_usage(usage) -> Tokens:
    """The provider's ``usage``, each count kept only when it is one (else 0:
    never a guess, and never a value that would fail the bookkeeping after a
    save). A total missing beside its parts is their sum."""
    if not isinstance(usage, dict):
        return Tokens()
    prompt, completion, total = (
        _count(usage.get(name)) for name in ("prompt_tokens", "completion_tokens", "total_tokens")
    )
    return Tokens(prompt, completion, total or prompt + completion)


def _count(value) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**31:
        return value
    return 0


def event_stream_lines(response: httpx2.Response) -> Iterator[str]:
    """The lines of a provider's event stream, split at LF (or CRLF) only.

    httpx's ``iter_lines`` follows ``str.splitlines``, which also breaks at
    U+2028, U+2029 and U+0085: characters that JSON allows raw inside a string
    and that providers writing UTF-8 JSON send as they are, so a ``data:`` line
    would be cut in two. Bytes are split before decoding (in UTF-8 no
    multi-byte character contains the LF byte).
    """
    rest = b""
    for chunk in response.iter_bytes():
        *lines, rest = (rest + chunk).split(b"\n")
        for line in lines:
            yield line.rstrip(b"\r").decode("utf-8", "replace")
    if rest:
        yield rest.rstrip(b"\r").decode("utf-8", "replace")


class Upstream:
    """One streamed chat completion, read as text pieces.

    ``pieces`` yields the content deltas (one iterator for the whole stream);
    ``tokens`` holds the usage the provider reported (zeros when it sent none:
    never a guess). ``abort()`` may be called from any thread: it shuts the
    connection down, so a read blocked on a silent provider returns at once.
    """

    def __init__(self, model: Model, response: httpx2.Response):
        self.model = model
        self._response = response
        self.tokens = Tokens()
        self.aborted = False
        self._lock = threading.Lock()
        # A tool round: the calls' pieces by index, put together as they come.
        self._calls: dict[int, dict] = {}
        self.pieces = self._read(event_stream_lines(response))

    @property
    def tool_calls(self) -> tuple[ToolCall, ...]:
        """The tools the model asked for (read once the stream has ended)."""
        return tool_calls_of([
            {"id": call.get("id"), "function": {"name": call["name"],
                                                 "arguments": "".join(call["arguments"])}}
            for _, call in sorted(self._calls.items())
        ])

    def _read(self, lines) -> Iterator[str]:
        """The content pieces; Unusable when the provider reports an error in the
        stream, or the stream ends before it said it was finished."""
        finished = False
        for line in lines:
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                return
            chunk = json.loads(data)
            if chunk.get("error"):
                raise Unusable("error event in the stream")
            if chunk.get("usage"):
                self.tokens = token_usage(chunk["usage"])
            for choice in chunk.get("choices") or ():
                finished = finished or bool(choice.get("finish_reason"))
                delta = choice.get("delta") or {}
                self._gather(delta.get("tool_calls"))
                text = delta.get("content")
                if text:
                    yield text
        if not finished:
            raise Unusable("stream ended before the answer did")

    def _gather(self, pieces) -> None:
        """Add a delta's pieces of tool calls (the id and name come first, the
        arguments in fragments) to the calls being put together."""
        for piece in pieces if isinstance(pieces, list) else ():
            if not isinstance(piece, dict) or not isinstance(piece.get("index"), int):
                continue
            call = self._calls.setdefault(piece["index"], {"id": None, "name": "",
                                                           "arguments": []})
            call["id"] = piece.get("id") or call["id"]
            function = piece.get("function") or {}
            call["name"] += function.get("name") or ""
            fragment = function.get("arguments")
            if isinstance(fragment, str):
                call["arguments"].append(fragment)

    def abort(self) -> None:
        with self._lock:
            if self.aborted:
                return
            self.aborted = True
        stream = self._response.extensions.get("network_stream")
        sock = stream.get_extra_info("socket") if stream is not None else None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self._response.close()


def open_stream(
    model: Model, messages: list[dict], settings: CallSettings, budget: float, on_open,
    cancel: threading.Event | None = None, tools: list[dict] | None = None,
):
    """Start a streamed answer and wait for its first piece, retried within
    ``budget`` (nothing has reached the client before the first piece, so a
    retry is invisible). Sent with the SDK's low-level ``post``, as
    ``complete``. ``on_open(upstream)`` is called as soon as the provider
    answers, so the caller can abort the wait for the first piece.
    Returns (Upstream, first piece), or (Upstream, None) when the model,
    offered ``tools``, asks for calls instead (``Upstream.tool_calls``; the
    stream is read to its end then).

    Raises the ``openai`` errors of the last attempt, or Unusable.
    """
    body = _body(model, messages, settings, tools, stream=True,
                 stream_options={"include_usage": True})

    def attempt(timeout: float):
        # ``timeout`` (OPENAI_TIMEOUT, or less when less is left of the budget)
        # bounds the connect and the wait for the provider's answer (until then
        # nothing can abort the call).
        response = model.provider.client.post(
            "/chat/completions", cast_to=httpx2.Response, body=body, stream=True,
            options={"timeout": timeout},
        )
        # The body's read timeout is taken when its first byte is read, and then
        # bounds every silence of the stream: OPENAI_TIMEOUT, whatever a late
        # retry had left of its budget for the head (the wait for the first
        # piece stays bound by the caller's first-token deadline).
        extensions = response.request.extensions
        extensions["timeout"] = {**extensions.get("timeout", {}), "read": settings.timeout}
        upstream = Upstream(model, response)
        on_open(upstream)
        try:
            first = next(upstream.pieces, None)
        except httpx2.TimeoutException:
            upstream.close()
            raise openai.APITimeoutError(request=response.request) from None
        except (httpx2.HTTPError, OSError) as error:
            upstream.close()
            raise openai.APIConnectionError(request=response.request) from error
        except (ValueError, TypeError, AttributeError):
            upstream.close()
            raise Unusable("not an event stream") from None
        if first is None:
            upstream.close()
            if upstream.tool_calls:
                return upstream, None
            raise Unusable("stream without content")
        return upstream, first

    return with_retries(settings, budget, attempt, cancel)


def _log_retry(details) -> None:
    log.info(
        "llm attempt %d failed (%s), retrying in %.2fs",
        details["tries"],
        type(details.get("exception")).__name__,
        details["wait"],
    )
