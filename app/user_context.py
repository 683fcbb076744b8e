"""Seller data from the main server, for personalised answers.

Optional and best effort: when ``USER_CONTEXT_URL`` is unset nothing is
fetched, and any failure (timeout, HTTP error, bad JSON) only means the answer
is not personalised. The caller gets text or None, never an exception.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request

log = logging.getLogger(__name__)

SECTIONS = (
    ("sales", "Продажи"),
    ("stocks", "Остатки"),
    ("orders", "Заказы"),
    ("reviews", "Отзывы"),
)
MAX_SECTION_CHARS = 1500
MAX_RESPONSE_BYTES = 256 * 1024


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


def fetch_user_context(url_template: str, telegram_id: int, api_key: str, timeout: float):
    """Fetch and render the seller's data; returns (text or None, outcome).

    ``outcome`` is one of ok, empty, timeout, http_error, bad_response, error.
    """
    url = url_template.replace("{telegram_id}", str(telegram_id))
    request = urllib.request.Request(
        url, headers={"X-API-KEY": api_key, "Accept": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read(MAX_RESPONSE_BYTES + 1)
        if len(body) > MAX_RESPONSE_BYTES:
            raise ValueError("user context too large")
        data = json.loads(body)
        if not isinstance(data, dict):
            raise ValueError("user context is not an object")
        # The main server may wrap the payload: {"success": true, "data": {...}}.
        if isinstance(data.get("data"), dict):
            data = data["data"]
    except urllib.error.HTTPError as error:
        outcome = "http_error"
        log.warning("user context: HTTP %s", error.code)
        return None, outcome
    except TimeoutError:
        log.warning("user context: timed out after %.1fs", timeout)
        return None, "timeout"
    except (ValueError, UnicodeDecodeError):
        log.warning("user context: unusable response")
        return None, "bad_response"
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        outcome = "timeout" if isinstance(reason, TimeoutError) else "error"
        log.warning("user context: %s", type(reason).__name__)
        return None, outcome
    text = render_user_context(data)
    return text, "ok" if text else "empty"
