"""Request-scoped logging: a request id on every request and one line per
request on stdout (JSON in production, plain text in development).

The line carries ids, sizes and timings only: never message text, answers or
keys. Code that knows more about the request adds fields with ``annotate``.
"""

from __future__ import annotations

import logging
import re
import sys
import time
import uuid

from flask import Flask, Response, g, has_request_context, request
from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

log = logging.getLogger("ai_chat.request")

# A client's X-Request-ID is echoed into logs and headers: keep it tame.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def annotate(**fields) -> None:
    """Add fields to this request's log line (no-op outside a request)."""
    if has_request_context():
        g.setdefault("log_fields", {}).update(fields)


def _assign_request_id() -> None:
    given = request.headers.get("X-Request-ID", "")
    g.request_id = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
    g.request_started = time.perf_counter()


def _log_request(response: Response) -> Response:
    response.headers["X-Request-ID"] = g.request_id
    if log.isEnabledFor(logging.INFO):
        fields = {
            "request_id": g.request_id,
            "method": request.method,
            "path": request.path,
            "status": response.status_code,
        }
        # The same dict object the request (or its stream) keeps annotating.
        annotations = g.setdefault("log_fields", {})
        started = g.request_started
        if response.is_streamed:
            # A stream's line is written when it ends, with its outcome.
            response.call_on_close(lambda: _write_line(fields, annotations, started))
        else:
            _write_line(fields, annotations, started)
    return response


def _write_line(fields: dict, annotations: dict, started: float) -> None:
    fields["duration_ms"] = round((time.perf_counter() - started) * 1000, 2)
    fields.update(annotations)
    if "outcome" not in fields:
        fields["outcome"] = "ok" if fields["status"] < 400 else "error"
    log.info("request", extra=fields)


class _RequestIdFilter(logging.Filter):
    """Stamps the request id on every record logged inside a request."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id") and has_request_context():
            record.request_id = g.get("request_id")
        return True


class _TextFormatter(logging.Formatter):
    """Human lines for development: the message, then the request's fields."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        # The fields passed with ``extra=`` (what the JSON formatter adds too).
        fields = " ".join(
            f"{name}={value}"
            for name, value in record.__dict__.items()
            if name not in RESERVED_ATTRS and value is not None
        )
        return f"{line} {fields}" if fields else line


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is now (test runners swap it)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _value):
        pass


def configure_logging(level: str, fmt: str) -> None:
    """One stdout handler on the root logger; JSON unless ``fmt`` is "text"."""
    handler = _StdoutHandler()
    if fmt == "text":
        handler.setFormatter(_TextFormatter(_TEXT_FORMAT))
    else:
        handler.setFormatter(
            JsonFormatter(
                "%(levelname)s %(name)s %(message)s",
                timestamp="time",
                rename_fields={"levelname": "level", "name": "logger"},
                json_ensure_ascii=False,
            )
        )
    handler.addFilter(_RequestIdFilter())
    root = logging.getLogger()
    # Replace only our own handler: a test runner's capture handler stays.
    for old in [h for h in root.handlers if isinstance(h, _StdoutHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # One line per upstream HTTP call at INFO would drown the request log.
    logging.getLogger("httpx2").setLevel(logging.WARNING)


def init_app(app: Flask) -> None:
    configure_logging(app.config["LOG_LEVEL"], app.config["LOG_FORMAT"])
    app.before_request(_assign_request_id)
    app.after_request(_log_request)
