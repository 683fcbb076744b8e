"""Forward-only WSGI app: the floor the service is measured against.

It does what no LLM front-end can avoid and nothing else: read the JSON body,
send the system prompt and the message to the upstream with the same ``openai``
client settings as the service (built once per process, SDK retries off), and
return the answer as JSON with a Server-Timing header (llm, total) like the
service's. No Flask, no validation, no database, no quota, no
logging, no metrics. Run under the same gunicorn.conf.py as the service
(``gunicorn -c gunicorn.conf.py bench.forward_app:app``), so the ratio of the two
throughputs is the cost of the service's own work.

Environment: OPENAI_BASE_URL (required), OPENAI_TIMEOUT (default 20),
OPENAI_MODEL (default gpt-4o-mini).
"""

from __future__ import annotations

import json
import os
import time

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


def app(environ, start_response):
    """/health answers ok; POST /v1/chat/send forwards; anything else is 404."""
    path = environ.get("PATH_INFO", "")
    if path == "/health":
        return _reply(start_response, "200 OK", {"status": "ok"})
    if path != "/v1/chat/send" or environ.get("REQUEST_METHOD") != "POST":
        return _reply(start_response, "404 Not Found", {"error": "not_found"})
    started = time.perf_counter()
    length = int(environ.get("CONTENT_LENGTH") or 0)
    try:
        body = json.loads(environ["wsgi.input"].read(length))
        message = body["message"]
    except (ValueError, KeyError, TypeError):
        return _reply(start_response, "400 Bad Request", {"error": "bad_request"})
    llm_started = time.perf_counter()
    try:
        completion = _client.chat.completions.create(
            model=_model,
            messages=[
                {"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": message},
            ],
            temperature=0.7,
            max_tokens=1000,
        )
    except openai.OpenAIError:
        return _reply(start_response, "502 Bad Gateway", {"error": "llm_unavailable"})
    now = time.perf_counter()
    # The same header as the service's, so the bench measures both the same way.
    timing = f"llm;dur={(now - llm_started) * 1000:.1f}, total;dur={(now - started) * 1000:.1f}"
    return _reply(
        start_response,
        "200 OK",
        {
            "response": completion.choices[0].message.content,
            "remaining_requests": None,
            "tokens_used": completion.usage.total_tokens if completion.usage else 0,
            "daily_limit": 0,
        },
        [("Server-Timing", timing)],
    )
