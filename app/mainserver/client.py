"""The main server's bot API: the one place that knows how to call it.

``MainServer`` is built once per process from the configuration
(``MAIN_SERVER_URL``, ``MAIN_SERVER_API_KEY``). Without a URL it is not
``configured`` and never calls anything. With one, ``get`` sends
``GET {MAIN_SERVER_URL}/api/v1/bot{path}?…&telegram_id=…`` with the key in
``X-API-SECRET-KEY`` and returns the payload of the answer, unwrapped from
either envelope the server uses (``{"status": "success", …}``, and
``{"success": true, "data": …}`` on ``/orders/statistics``).

Failures leave as one small exception family whose ``message`` is a short
Russian sentence for the model and whose ``outcome`` is the metric label;
the server's own text is only logged (shared/MAIN_SERVER_API.md lists what
it answers):
- no WB cabinet: 404 with detail "Кабинет WB не найден", and the same detail
  with a 500 from ``/orders/recent`` and ``/orders/statistics`` → NoCabinet;
- 403 (our key is wrong) and other 4xx (our request is wrong):
  Misconfigured, logged as an error at most every few minutes;
- other 5xx, bad JSON, refused or dropped connections → MainServerUnavailable;
  no answer within the budget → MainServerTimeout.

A circuit breaker (app.llm.breaker) stops calling a server that keeps
failing: 5xx, bad answers, timeouts and connection errors count as failures;
any answer that says the server is up (a no-cabinet reply included) closes
it. While it is open, calls fail at once with BreakerOpen. It is
``MainServer.breaker``: built by ``from_config`` with app.llm.breaker's
``make_breaker``, so shared by every instance through Redis when Redis is
configured (``SharedBreaker``), else this process's own.
"""

from __future__ import annotations

import http.client
import json
import logging
import time
from dataclasses import dataclass
from urllib.parse import urlencode

from app import metrics
from app.bounded_get import bounded_get
from app.cache import Cache
from app.llm.breaker import Breaker, make_breaker
from app.mainserver.cache import MemoryCache, RedisResults, ResultCache

log = logging.getLogger("app.mainserver")

BASE_PATH = "/api/v1/bot"
NO_CABINET_DETAIL = "Кабинет WB не найден"
# The largest page the tools ask for (50 products with their warehouses) is
# far below this; anything bigger is not an answer we can use.
MAX_RESPONSE_BYTES = 2 * 1024 * 1024
# A wrong key fails every call; one error line per worker every few minutes
# says so without burying the log.
MISCONFIGURED_LOG_SECONDS = 300.0


class MainServerError(Exception):
    """A call that brought no data. ``message`` is for the model (Russian,
    plain words); the exception's own text is for the log only."""

    outcome = "unavailable"
    message = "данные продавца сейчас недоступны"


class NoCabinet(MainServerError):
    outcome = "no_cabinet"
    message = "кабинет WB не подключён: продавец ещё не подключил кабинет Wildberries в боте"


class MainServerUnavailable(MainServerError):
    """5xx, an answer that is not the API's, or no connection."""


class Misconfigured(MainServerUnavailable):
    """The server refused our key (403) or our request (other 4xx)."""


class NotConfigured(MainServerUnavailable):
    """``MAIN_SERVER_URL`` is not set."""


class BreakerOpen(MainServerUnavailable):
    outcome = "breaker_open"


class MainServerTimeout(MainServerError):
    outcome = "timeout"
    message = "данные продавца не пришли вовремя"


@dataclass(frozen=True)
class ToolSettings:
    """How tool calls over this server are run (app.mainserver.run)."""

    timeout: float = 5.0  # TOOL_TIMEOUT: each call, at most
    max_chars: int = 6000  # TOOL_RESULT_MAX_CHARS: each result's content
    cache_seconds: float = 60.0  # TOOL_CACHE_SECONDS: 0 = no cache

    @classmethod
    def from_config(cls, config) -> ToolSettings:
        return cls(
            timeout=config["TOOL_TIMEOUT"],
            max_chars=config["TOOL_RESULT_MAX_CHARS"],
            cache_seconds=config["TOOL_CACHE_SECONDS"],
        )


class MainServer:
    """The main server's bot API, built once per process; share across threads."""

    def __init__(
        self,
        url: str | None,
        api_key: str | None = None,
        *,
        breaker: Breaker | None = None,
        settings: ToolSettings | None = None,
        cache: ResultCache | None = None,
    ):
        url = url.rstrip("/") if url else None
        # Tolerate a URL given with the base path already on it.
        if url and not url.endswith(BASE_PATH):
            url += BASE_PATH
        self.base_url = url
        self.api_key = api_key
        self.breaker = breaker if breaker is not None else Breaker(5, 30.0)
        self.settings = settings if settings is not None else ToolSettings()
        self.cache: ResultCache = cache if cache is not None else MemoryCache()
        self._misconfigured_logged_at: float | None = None

    @classmethod
    def from_config(cls, config, cache: Cache) -> MainServer:
        """With Redis (``cache`` configured), the breaker and the tool results
        are shared by every instance; without it, they are this process's."""
        return cls(
            config["MAIN_SERVER_URL"],
            config["MAIN_SERVER_API_KEY"],
            breaker=make_breaker(
                "mainserver", config["MAIN_SERVER_BREAKER_FAILURES"],
                config["MAIN_SERVER_BREAKER_OPEN_SECONDS"], cache,
            ),
            settings=ToolSettings.from_config(config),
            cache=RedisResults(cache) if cache.configured else None,
        )

    @property
    def configured(self) -> bool:
        return self.base_url is not None

    def get(self, path: str, params: dict, telegram_id: int, budget: float) -> dict:
        """The payload of ``GET {base}{path}`` for the seller ``telegram_id``,
        within ``budget`` seconds in all.

        ``telegram_id`` is always the one given here: a ``telegram_id`` in
        ``params`` is ignored, so no argument can ask for another seller.

        Raises:
            NoCabinet: the seller has no WB cabinet connected.
            MainServerTimeout: no whole answer within ``budget``.
            BreakerOpen: the server failed repeatedly; not called.
            MainServerUnavailable: not configured, 5xx, not the API's answer,
                no connection (Misconfigured: 403 or another 4xx).
        """
        if self.base_url is None:
            raise NotConfigured("MAIN_SERVER_URL is not set")
        if budget <= 0:
            raise MainServerTimeout("no time left for the call")
        if not self.breaker.allow():
            raise BreakerOpen(f"circuit open, {path} not called")
        query = {
            name: value
            for name, value in params.items()
            if value is not None and name != "telegram_id"
        }
        query["telegram_id"] = telegram_id
        url = f"{self.base_url}{path}?{urlencode(query)}"
        secret = {"X-API-SECRET-KEY": self.api_key} if self.api_key else {}
        try:
            answer = bounded_get(
                url,
                time.monotonic() + budget,
                secret_headers=secret,
                max_bytes=MAX_RESPONSE_BYTES,
            )
        except TimeoutError:
            self._failed(path, f"no answer within {budget:.1f}s")
            raise MainServerTimeout(f"{path}: no answer within {budget:.1f}s") from None
        except (OSError, ValueError, http.client.HTTPException) as error:
            self._failed(path, type(error).__name__)
            raise MainServerUnavailable(f"{path}: {type(error).__name__}") from None
        return self._payload(path, answer.status, answer.body)

    def _payload(self, path: str, status: int, body: bytes) -> dict:
        try:
            data = json.loads(body)
        except ValueError:
            data = None
        detail = data.get("detail") if isinstance(data, dict) else None
        if detail == NO_CABINET_DETAIL and status in (404, 500):
            # The server is up; the seller simply has no cabinet.
            self.breaker.record_success()
            raise NoCabinet(f"{path}: HTTP {status} {detail}")
        if status >= 500:
            self._failed(path, f"HTTP {status}")
            raise MainServerUnavailable(f"{path}: HTTP {status}")
        if status != 200:
            self.breaker.record_success()
            self._misconfigured(path, status, detail)
            raise Misconfigured(f"{path}: HTTP {status}")
        payload = None
        if isinstance(data, dict) and data.get("status") == "success":
            payload = {
                key: value
                for key, value in data.items()
                if key not in ("status", "message", "telegram_text")
            }
        elif isinstance(data, dict) and data.get("success") is True:
            payload = data.get("data")
        if isinstance(payload, dict):
            self.breaker.record_success()
            return payload
        self._failed(path, "an answer that is not the API's envelope")
        raise MainServerUnavailable(f"{path}: unexpected answer")

    def _failed(self, path: str, reason: str) -> None:
        log.warning("main server %s failed: %s", path, reason)
        if self.breaker.record_failure():
            metrics.MAINSERVER_BREAKER_OPENED.inc()
            log.warning(
                "main server: circuit opened for %gs after %d failures",
                self.breaker.open_seconds,
                self.breaker.failures,
            )

    def _misconfigured(self, path: str, status: int, detail) -> None:
        now = time.monotonic()
        last = self._misconfigured_logged_at
        if last is not None and now - last < MISCONFIGURED_LOG_SECONDS:
            return
        self._misconfigured_logged_at = now
        if status in (401, 403):
            hint = "check MAIN_SERVER_API_KEY (the main server's API_SECRET_KEY)"
        else:
            hint = "check MAIN_SERVER_URL and the main server's version"
        log.error(
            "main server refused %s with HTTP %s (%s): %s",
            path,
            status,
            detail if isinstance(detail, str) else "no detail",
            hint,
        )
