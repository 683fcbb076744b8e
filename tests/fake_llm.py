"""Fake OpenAI-compatible chat-completions server for tests and benchmarks.

The service under test talks to an upstream LLM through the official ``openai``
client.  Pointing ``OPENAI_BASE_URL`` at this server gives tests a deterministic,
scriptable upstream: every chat-completions call is recorded, and its behaviour
(success, HTTP error, slow answer, dropped connection, non-JSON body) can be
queued per request or drawn at random in "chaos" mode.

Typical use::

    from tests.fake_llm import FakeLLM, ok, status, drop

    with FakeLLM() as fake:
        fake.script(status(429), ok("hi", tokens=10))
        ...  # run the app with OPENAI_BASE_URL=fake.url
        assert fake.outcomes == ["status:429", "ok"]

Standalone (for benchmarks), run from the project root::

    python -m tests.fake_llm --port 8089 --latency 0.5 [--failure-rate 0.0]

Default answer is ``"Ответ: " + <last user message>`` cut to 200 characters;
usage is ``prompt_tokens = <chars of all message contents> // 4 + 1`` and
``completion_tokens = len(answer) // 4 + 1`` so tests can predict token counts.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import socket
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = [
    "FakeLLM",
    "ok",
    "status",
    "delay",
    "drop",
    "garbage",
    "CHAT_PATHS",
    "MODELS_PATHS",
]

CHAT_PATHS = frozenset({"/v1/chat/completions", "/chat/completions"})
MODELS_PATHS = frozenset({"/v1/models", "/models"})

ANSWER_PREFIX = "Ответ: "
MAX_ANSWER_CHARS = 200

_STEP_KINDS = frozenset({"ok", "status", "delay", "drop", "garbage"})

# Chaos mode picks uniformly from these; ints are HTTP statuses.
_CHAOS_CHOICES: tuple[Any, ...] = (500, 503, 429, 400, "drop", "delay")

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
    ``create()`` return the raw text without raising at all.
    """
    return {"kind": "garbage"}


def _outcome_label(step: dict) -> str:
    kind = step["kind"]
    if kind == "status":
        return f"status:{step['code']}"
    return kind


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


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


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
        # Keep-alive handler threads block on reading the next request; stop()
        # shuts these sockets down so the threads exit instead of lingering.
        self.open_connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients disconnecting mid-request is routine here (timeouts, drops);
        # tracebacks on stderr would only bury real test output.
        pass


class _Handler(BaseHTTPRequestHandler):
    # The openai client (httpx) pools keep-alive connections, so answers must
    # be HTTP/1.1 with an explicit Content-Length.
    protocol_version = "HTTP/1.1"
    # Response goes out in one write; Nagle would only add latency.
    disable_nagle_algorithm = True
    server: _Server

    def setup(self) -> None:
        super().setup()
        with self.server.connections_lock:
            self.server.open_connections.add(self.connection)

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
        step, number = fake._next_step(path, headers, body)
        self._serve_step(step, number, body)

    # ---------------------------------------------------------------- behaviour

    def _serve_step(self, step: dict, number: int, body: dict) -> None:
        kind = step["kind"]
        if kind == "ok":
            _sleep(step.get("delay", 0.0))
            self._send_completion(number, body, step.get("text"), step.get("tokens"))
        elif kind == "status":
            _sleep(step.get("delay", 0.0))
            self._send_error(step["code"])
        elif kind == "delay":
            _sleep(step["seconds"])
            self._send_completion(number, body, None, None)
        elif kind == "drop":
            self._drop()
        elif kind == "garbage":
            self._send(200, _GARBAGE_BODY)
        else:  # pragma: no cover - script() validates kinds
            self._send_error(500, f"Unknown fake step kind {kind!r}")

    def _send_completion(
        self, number: int, body: dict, text: str | None, tokens: int | None
    ) -> None:
        messages = body.get("messages")
        if not isinstance(messages, list):
            messages = []
        prompt_chars = 0
        last_user = ""
        for message in messages:
            if not isinstance(message, dict):
                continue
            content = _content_text(message.get("content"))
            prompt_chars += len(content)
            if message.get("role") == "user":
                last_user = content
        if text is None:
            text = (ANSWER_PREFIX + last_user)[:MAX_ANSWER_CHARS]
        prompt_tokens = prompt_chars // 4 + 1
        completion_tokens = len(text) // 4 + 1
        if tokens is not None:
            # Only the total is scripted; split it so both parts stay valid.
            prompt_tokens = min(prompt_tokens, tokens)
            completion_tokens = tokens - prompt_tokens
        model = body.get("model")
        payload = {
            "id": f"chatcmpl-fake-{number}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model if isinstance(model, str) else "fake-model",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
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

    # ----------------------------------------------------------------- plumbing

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
        try:
            self.wfile.write(data)
        except OSError:
            # The client already gave up (e.g. timed out during a delay step).
            self.close_connection = True


def _sleep(seconds: float) -> None:
    if seconds and seconds > 0:
        time.sleep(seconds)


# --------------------------------------------------------------------------- public


class FakeLLM:
    """In-process fake of the OpenAI chat-completions API.

    Attributes that may be changed at runtime: ``latency`` (seconds added to
    every default successful answer), ``failure_rate`` (probability that a
    non-scripted request fails, see module docs) and ``chaos_timeout`` (sleep
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
        record: bool = True,
    ) -> None:
        self.host = host
        self.port = port
        self.latency = float(latency)
        self.failure_rate = float(failure_rate)
        self.chaos_timeout = float(chaos_timeout)
        # Long benchmark runs would otherwise keep every request body in memory.
        self.record = record
        self._initial = (self.latency, self.failure_rate, self.chaos_timeout)
        self._seed = seed
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._steps: deque[dict] = deque()
        self._requests: list[dict] = []
        self._outcomes: list[str] = []
        self._calls = 0
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

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
        for step in steps:
            if not isinstance(step, dict) or step.get("kind") not in _STEP_KINDS:
                raise ValueError(f"Invalid fake LLM step: {step!r}")
            if step["kind"] == "status" and "code" not in step:
                raise ValueError(f"Status step needs a code: {step!r}")
            if step["kind"] == "delay" and "seconds" not in step:
                raise ValueError(f"Delay step needs seconds: {step!r}")
        with self._lock:
            self._steps.extend(dict(step) for step in steps)
        return self

    def reset(self) -> None:
        """Forget records and queued steps; restore constructor settings."""
        with self._lock:
            self._steps.clear()
            self._requests.clear()
            self._outcomes.clear()
            self._calls = 0
            self.latency, self.failure_rate, self.chaos_timeout = self._initial
            self._rng = random.Random(self._seed)

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
    def calls(self) -> int:
        with self._lock:
            return self._calls

    # ------------------------------------------------------------- internals

    def _record(self, path: str, headers: dict, body: Any, outcome: str) -> int:
        with self._lock:
            return self._record_locked(path, headers, body, outcome)

    def _record_locked(self, path: str, headers: dict, body: Any, outcome: str) -> int:
        self._calls += 1
        if self.record:
            self._requests.append({"path": path, "headers": headers, "body": body})
            self._outcomes.append(outcome)
        return self._calls

    def _next_step(self, path: str, headers: dict, body: dict) -> tuple[dict, int]:
        # Choosing the step and recording happen under one lock so that
        # requests[i] and outcomes[i] always describe the same call.
        with self._lock:
            if self._steps:
                step = self._steps.popleft()
            elif self.failure_rate > 0 and self._rng.random() < self.failure_rate:
                choice = self._rng.choice(_CHAOS_CHOICES)
                if choice == "drop":
                    step = drop()
                elif choice == "delay":
                    step = delay(self.chaos_timeout)
                else:
                    step = status(choice)
            else:
                step = {"kind": "ok", "text": None, "tokens": None, "delay": self.latency}
            number = self._record_locked(path, headers, body, _outcome_label(step))
        return step, number


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8089)
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--failure-rate", type=float, default=0.0)
    parser.add_argument("--chaos-timeout", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)

    # Nobody can read the records of a standalone process; keep memory flat.
    fake = FakeLLM(
        args.host,
        args.port,
        args.latency,
        seed=args.seed,
        failure_rate=args.failure_rate,
        chaos_timeout=args.chaos_timeout,
        record=False,
    )
    # A plain flag rather than threading.Event: Event.set() inside a signal
    # handler can deadlock if the signal lands while wait() holds its lock.
    stop_requested: list[int] = []

    def _on_signal(signum: int, frame: Any) -> None:
        stop_requested.append(signum)

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)

    fake.start()
    print(f"Fake LLM listening on {fake.url}", flush=True)
    try:
        while not stop_requested:
            time.sleep(0.2)
    finally:
        fake.stop()


if __name__ == "__main__":
    main()
