"""One HTTP GET bounded by a *total* deadline, for the main server's APIs.

A per-read timeout is not enough: a server that drips one byte every half
second satisfies every read and can still hold the calling thread for
minutes. Here every receive waits only until the call's deadline, so the
whole GET (connect, send, every read, every redirect) ends by it.

Redirects are followed (a few, e.g. FastAPI's trailing-slash 307), but the
secret headers only ever go to the first URL's origin. The stdlib is enough
for this and keeps the deadline logic in sight; both the personalisation
fetch (app.user_context) and the main server's client (app.mainserver) use it.
"""

from __future__ import annotations

import functools
import http.client
import socket
import ssl
import time
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

MAX_REDIRECTS = 3
REDIRECTS = frozenset({301, 302, 303, 307, 308})


@dataclass(frozen=True)
class Answer:
    """What the server answered (after redirects): status and body bytes."""

    status: int
    body: bytes


class UnsupportedURL(ValueError):
    """Not an http(s) URL with a host."""


class TooManyRedirects(http.client.HTTPException):
    """More than ``MAX_REDIRECTS`` redirects."""


class ResponseTooLarge(ValueError):
    """The body is longer than the caller accepts. ``status`` is the answer's
    HTTP status: a caller may count a non-200 as an HTTP error whatever its
    body's size."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def bounded_get(
    url: str,
    deadline: float,
    *,
    max_bytes: int,
    secret_headers: dict | None = None,
) -> Answer:
    """GET ``url``, following redirects, all of it before ``deadline``
    (a ``time.monotonic()`` value). Any status is returned with its body.

    Raises:
        TimeoutError: the deadline passed (connecting, sending or reading).
        UnsupportedURL: the URL (or a redirect's) is not http(s).
        TooManyRedirects: the server kept redirecting.
        ResponseTooLarge: the body is longer than ``max_bytes`` (whatever
            the status, which it carries).
        OSError, http.client.HTTPException: the connection failed or the
            server answered something that is not HTTP.
    """
    keyed_origin = _origin(url)
    for _ in range(MAX_REDIRECTS + 1):
        scheme, host, port = _origin(url)
        if scheme not in ("http", "https") or not host:
            raise UnsupportedURL(f"unsupported URL scheme {scheme!r}")
        sent = {"Accept": "application/json"}
        if (scheme, host, port) == keyed_origin:
            sent.update(secret_headers or {})
        connection = _connection(scheme, host, port, deadline)
        try:
            parts = urlsplit(url)
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            connection.request("GET", path, headers=sent)
            response = connection.getresponse()
            location = response.getheader("Location")
            if response.status in REDIRECTS and location:
                url = urljoin(url, location)
                continue
            body = response.read(max_bytes + 1)
            if len(body) > max_bytes:
                raise ResponseTooLarge(
                    f"HTTP {response.status} with more than {max_bytes} bytes", response.status
                )
            return Answer(response.status, body)
        finally:
            connection.close()
    raise TooManyRedirects(f"more than {MAX_REDIRECTS} redirects")


def _origin(url: str) -> tuple:
    parts = urlsplit(url)
    return parts.scheme, parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)


class _DeadlineSocket(socket.socket):
    """A socket whose every receive waits only until the call's deadline."""

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
        raise TimeoutError("deadline passed")
    return remaining


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """One TLS context per process for every HTTPS GET here: building one
    (loading the CA bundle) costs 23-29 ms of CPU. Not the one app.llm.providers
    shares with httpx: this one's ``sslsocket_class`` is ``_DeadlineSSLSocket``,
    which must not reach httpx's sockets."""
    context = ssl.create_default_context()
    context.sslsocket_class = _DeadlineSSLSocket
    return context


def _connection(scheme: str, host: str, port: int, deadline: float):
    """A connected HTTP(S) connection whose socket honours ``deadline``."""
    timeout = _remaining(deadline)
    if scheme == "https":
        connection = http.client.HTTPSConnection(
            host, port, timeout=timeout, context=_tls_context()
        )
        connection.connect()
        connection.sock.deadline = deadline
        return connection
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    connection.connect()
    plain = connection.sock
    connection.sock = _DeadlineSocket(fileno=plain.detach())
    # Sends too: a server that stops reading must not block the request's write.
    connection.sock.settimeout(timeout)
    connection.sock.deadline = deadline
    return connection
