"""Seller data from the main server, for personalised answers.

Optional and best effort: when ``USER_CONTEXT_URL`` is unset nothing is
fetched, and any failure (timeout, HTTP error, bad JSON) only means the answer
is not personalised. The caller gets text or None, never an exception.

The fetch has a *total* budget, not a per-read timeout (app.bounded_get):
a server that drips one byte every half second cannot hold the request's
thread past it. Redirects are followed (a few, e.g. FastAPI's trailing-slash
307), but the ``X-API-KEY`` only ever goes to the configured origin.
"""

from __future__ import annotations

import http.client
import json
import logging
import time

from app.bounded_get import ResponseTooLarge, TooManyRedirects, UnsupportedURL, bounded_get

log = logging.getLogger(__name__)

SECTIONS = (
    ("sales", "Продажи"),
    ("stocks", "Остатки"),
    ("orders", "Заказы"),
    ("reviews", "Отзывы"),
)
MAX_SECTION_CHARS = 1500
MAX_RESPONSE_BYTES = 256 * 1024


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
        answer = bounded_get(
            url,
            time.monotonic() + budget,
            secret_headers={"X-API-KEY": api_key},
            max_bytes=MAX_RESPONSE_BYTES,
        )
        if answer.status != 200:
            raise _FetchFailed("http_error", f"HTTP {answer.status}")
        body = answer.body
        data = json.loads(body)
        if not isinstance(data, dict):
            raise ValueError("user context is not an object")
        # The main server may wrap the payload: {"success": true, "data": {...}}.
        if isinstance(data.get("data"), dict):
            data = data["data"]
    except _FetchFailed as failure:
        log.warning("user context: %s", failure)
        return None, failure.outcome
    except ResponseTooLarge as error:
        # A non-200 is an HTTP error whatever its body's size.
        log.warning("user context: %s", error)
        return None, "http_error" if error.status != 200 else "bad_response"
    except UnsupportedURL as error:
        log.warning("user context: %s", error)
        return None, "error"
    except TooManyRedirects as error:
        log.warning("user context: %s", error)
        return None, "http_error"
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
