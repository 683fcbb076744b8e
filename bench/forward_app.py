"""Forward-only WSGI app: the floor the service is measured against.

It does what no LLM front-end can avoid and nothing else: read the JSON body,
send the system prompt and the message to the upstream with the same ``openai``
client settings as the service (built once per process, SDK retries off), and
return the answer as JSON with a Server-Timing header (llm, total) like the
service's. ``POST /v1/chat/stream`` streams the model's pieces as the
service's events (``delta`` per piece, then ``done``, or ``error``), read by
the request's own thread. No Flask, no validation, no database, no quota, no
logging, no metrics, no snapshots.

The upstream call is the one the service makes (app/llm/providers.py): the
client's low-level ``post`` of a plain body, the answer (or each event of a
stream) read with ``json.loads``, without ``chat.completions.create``'s
request transform and pydantic models, which the service does not pay either.

Run under the same gunicorn.conf.py as the service (``gunicorn -c
gunicorn.conf.py bench.forward_app:app``), so the ratio of the two throughputs
is the cost of the service's own work.

Environment: OPENAI_BASE_URL (required), OPENAI_TIMEOUT (default 20),
OPENAI_MODEL (default gpt-4o-mini).
"""

from __future__ import annotations

import json
import os
import time

import httpx2
import openai

from app.chat.prompts import SYSTEM_PROMPT

_client = openai.OpenAI(
    api_key="not-needed",
    base_url=os.environ["OPENAI_BASE_URL"],
    timeout=float(os.environ.get("OPENAI_TIMEOUT") or 20),
    max_retries=0,
)
_model = os.environ.get("OPENAI_MODEL") or "gpt-4o-mini"


def _reply(start_response, status: str, payload: dict, extra_headers=()):
    body = json.dumps(payload, ensure_ascii=False).encode()
    start_response(
        status,
        [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
         *extra_headers],
    )
    return [body]


def _body(message: str, stream: bool) -> dict:
    body = {
        "model": _model,
        "messages": [{"role": "system", "content": SYSTEM_PROMPT},
                     {"role": "user", "content": message}],
        "temperature": 0.7,
        "max_tokens": 1000,
    }
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    return body


def _event(name: str, data: dict) -> bytes:
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"event: {name}\ndata: {payload}\n\n".encode()


def _stream(start_response, message: str):
    try:
        upstream = _client.post("/chat/completions", cast_to=httpx2.Response,
                                body=_body(message, True), stream=True)
    except (openai.OpenAIError, httpx2.HTTPError):
        return _reply(start_response, "502 Bad Gateway", {"error": "llm_unavailable"})

    def events():
        text, tokens = [], 0
        try:
            for line in upstream.iter_lines():
                if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                    continue
                chunk = json.loads(line[5:])
                tokens = (chunk.get("usage") or {}).get("total_tokens") or tokens
                for choice in chunk.get("choices") or ():
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        text.append(piece)
                        yield _event("delta", {"text": piece})
            yield _event("done", {"response": "".join(text), "tokens_used": tokens})
        except (httpx2.HTTPError, OSError, ValueError):
            yield _event("error", {"error": "llm_unavailable", "message": "The model failed."})
        finally:
            upstream.close()

    start_response("200 OK", [("Content-Type", "text/event-stream"),
                              ("Cache-Control", "no-cache")])
    return events()


def app(environ, start_response):
    """/health answers ok; POST /v1/chat/send and /v1/chat/stream forward;
    anything else is 404."""
    path = environ.get("PATH_INFO", "")
    if path == "/health":
        return _reply(start_response, "200 OK", {"status": "ok"})
    if path not in ("/v1/chat/send", "/v1/chat/stream") or (
        environ.get("REQUEST_METHOD") != "POST"
    ):
        return _reply(start_response, "404 Not Found", {"error": "not_found"})
    started = time.perf_counter()
    length = int(environ.get("CONTENT_LENGTH") or 0)
    try:
        body = json.loads(environ["wsgi.input"].read(length))
        message = body["message"]
    except (ValueError, KeyError, TypeError):
        return _reply(start_response, "400 Bad Request", {"error": "bad_request"})
    if path == "/v1/chat/stream":
        return _stream(start_response, message)
    llm_started = time.perf_counter()
    try:
        response = _client.post("/chat/completions", cast_to=httpx2.Response,
                                body=_body(message, False))
        completion = json.loads(response.content)
    except (openai.OpenAIError, httpx2.HTTPError, ValueError):
        return _reply(start_response, "502 Bad Gateway", {"error": "llm_unavailable"})
    now = time.perf_counter()
    # The same header as the service's, so the bench measures both the same way.
    timing = f"llm;dur={(now - llm_started) * 1000:.1f}, total;dur={(now - started) * 1000:.1f}"
    return _reply(
        start_response,
        "200 OK",
        {
            "response": completion["choices"][0]["message"]["content"],
            "remaining_requests": None,
            "tokens_used": (completion.get("usage") or {}).get("total_tokens", 0),
            "daily_limit": 0,
        },
        [("Server-Timing", timing)],
    )
