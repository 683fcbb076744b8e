"""Seller data from the main server, for personalised answers.

Optional and best effort: when ``USER_CONTEXT_URL`` is unset nothing is
fetched, and any failure (timeout, HTTP error, bad JSON) only means the answer
is not personalised. The caller gets text or None, never an exception.

The fetch has a *total* budget, not a per-read timeout: every receive waits
at most until the fetch's deadline, so a server that drips one byte every
half second cannot hold the request's thread past it. Redirects are followed
(a few, e.g. FastAPI's trailing-slash 307), but the ``X-API-KEY`` only ever
goes to the configured origin.
"""

from __future__ import annotations

import http.client
import json
import logging
import socket
import ssl
import time
from urllib.parse import urljoin, urlsplit

log = logging.getLogger(__name__)

SECTIONS = (
    ("sales", "Продажи"),
    ("stocks", "Остатки"),
    ("orders", "Заказы"),
    ("reviews", "Отзывы"),
)
MAX_SECTION_CHARS = 1500
MAX_RESPONSE_BYTES = 256 * 1024
MAX_REDIRECTS = 3
REDIRECTS = frozenset({301, 302, 303, 307, 308})


class _FetchFailed(Exception):
    def __init__(self, outcome: str, detail: str):
        super().__init__(detail)
        self.outcome = outcome


def render_user_context(data: dict) -> str | None:
    """A compact, size-bounded Russian block of the seller's data."""
    lines = []
    for key, title in SECTIONS:
        value = data.get(key)
        if value in (None, "", [], {}):
            continue
        text = value if isinstance(value, str) else json.dumps(
            value, ensure_ascii=False, separators=(",", ":"), default=str
        )
        if len(text) > MAX_SECTION_CHARS:
            text = text[:MAX_SECTION_CHARS] + "…"
        lines.append(f"{title}: {text}")
    return "\n".join(lines) or None


def fetch_user_context(url_template: str, telegram_id: int, api_key: str, budget: float):
    """Fetch and render the seller's data within ``budget`` seconds in all.

    Returns (text or None, outcome); ``outcome`` is one of ok, empty,
    timeout, http_error, bad_response, error.
    """
    url = url_template.replace("{telegram_id}", str(telegram_id))
    try:
        body = _get(url, api_key, time.monotonic() + budget)
        data = json.loads(body)
        if not isinstance(data, dict):
            raise ValueError("user context is not an object")
        # The main server may wrap the payload: {"success": true, "data": {...}}.
        if isinstance(data.get("data"), dict):
            data = data["data"]
    except _FetchFailed as failure:
        log.warning("user context: %s", failure)
        return None, failure.outcome
    except TimeoutError:
        log.warning("user context: no answer within %.1fs", budget)
        return None, "timeout"
    except (ValueError, UnicodeDecodeError):
        log.warning("user context: unusable response")
        return None, "bad_response"
    except (OSError, http.client.HTTPException) as error:
        log.warning("user context: %s", type(error).__name__)
        return None, "error"
    text = render_user_context(data)
    return text, "ok" if text else "empty"


def _origin(url: str) -> tuple:
    parts = urlsplit(url)
    return parts.scheme, parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)


def _get(url: str, api_key: str, deadline: float) -> bytes:
    """GET ``url`` following redirects; the key goes to the first URL's origin only."""
    keyed_origin = _origin(url)
    for _ in range(MAX_REDIRECTS + 1):
        scheme, host, port = _origin(url)
        if scheme not in ("http", "https") or not host:
            raise _FetchFailed("error", f"unsupported URL scheme {scheme!r}")
        headers = {"Accept": "application/json"}
        if (scheme, host, port) == keyed_origin:
            headers["X-API-KEY"] = api_key
        connection = _connection(scheme, host, port, deadline)
        try:
            parts = urlsplit(url)
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            connection.request("GET", path, headers=headers)
            response = connection.getresponse()
            location = response.getheader("Location")
            if response.status in REDIRECTS and location:
                url = urljoin(url, location)
                continue
            if response.status != 200:
                raise _FetchFailed("http_error", f"HTTP {response.status}")
            body = response.read(MAX_RESPONSE_BYTES + 1)
            if len(body) > MAX_RESPONSE_BYTES:
                raise ValueError("user context too large")
            return body
        finally:
            connection.close()
    raise _FetchFailed("http_error", f"more than {MAX_REDIRECTS} redirects")


class _DeadlineSocket(socket.socket):
    """A socket whose every receive waits only until the fetch's deadline."""

    deadline = 0.0

    def recv_into(self, buffer, nbytes=0, flags=0):
        self.settimeout(_remaining(self.deadline))
        return super().recv_into(buffer, nbytes, flags)


class _DeadlineSSLSocket(ssl.SSLSocket):
    deadline = 0.0

    def recv_into(self, buffer, nbytes=None, flags=0):
        self.settimeout(_remaining(self.deadline))
        return super().recv_into(buffer, nbytes, flags)


def _remaining(deadline: float) -> float:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError("user context deadline passed")
    return remaining


def _connection(scheme: str, host: str, port: int, deadline: float):
    """A connected HTTP(S) connection whose socket honours ``deadline``."""
    timeout = _remaining(deadline)
    if scheme == "https":
        context = ssl.create_default_context()
        context.sslsocket_class = _DeadlineSSLSocket
        connection = http.client.HTTPSConnection(host, port, timeout=timeout, context=context)
        connection.connect()
        connection.sock.deadline = deadline
        return connection
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    connection.connect()
    plain = connection.sock
    connection.sock = _DeadlineSocket(fileno=plain.detach())
    connection.sock.deadline = deadline
    return connection
