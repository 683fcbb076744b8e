"""Running the model's tool calls of one round, and the dashboard for models
without tools.

``run_calls`` takes the calls the model asked for in one round and returns
one ``ToolResult`` per call, in call order, never raising: an unknown tool or
bad arguments are refused back to the model, a failed call is a short
Russian error; either way the request goes on. The calls of a round run at
the same time on a small process-wide thread pool, each bounded by
``min(TOOL_TIMEOUT, budget)``; the caller waits no longer than that even if
a worker is stuck (e.g. in a DNS lookup, which no socket timeout bounds),
and such a call is answered as timed out.

Each result's ``content`` is compact JSON marked as data:
``{"tool": …, "data": …, "note": …}`` or ``{"tool": …, "error": …}``, at most
``TOOL_RESULT_MAX_CHARS`` characters. Successful results are cached per
seller for ``TOOL_CACHE_SECONDS`` (``MainServer.cache``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

from app import metrics
from app.cache import Cache
from app.llm import ToolCall
from app.mainserver.arguments import BadArguments, check_arguments, echo
from app.mainserver.client import MainServer, MainServerError, MainServerTimeout
from app.mainserver.reduction import dumps, fit
from app.mainserver.tools import GENERIC_STATUS, TOOLS, Tool, metric_label

log = logging.getLogger("app.mainserver")

# A model asking for more calls than this in one round gets the rest refused:
# seven tools, each worth asking once.
MAX_CALLS_PER_ROUND = 8
# Threads shared by every request of a worker process. A call holds one for
# at most TOOL_TIMEOUT; calls beyond this wait in the pool's queue, within
# their own deadline.
POOL_THREADS = 64
CACHE_KEY_VERSION = "v1"

TOO_LARGE = "результат слишком большой"
TOO_MANY = f"слишком много вызовов за один раз (не больше {MAX_CALLS_PER_ROUND})"


@dataclass(frozen=True)
class ToolResult:
    """What goes back to the model for one call, and how it went.

    ``outcome``: ok, cached, no_cabinet, unavailable, timeout, breaker_open,
    refused (unknown tool, bad arguments) or too_large.
    """

    call_id: str
    name: str
    content: str
    outcome: str

    @property
    def ok(self) -> bool:
        return self.outcome in ("ok", "cached")

    def message(self) -> dict:
        """The ``tool`` message of the next round's prompt."""
        return {"role": "tool", "tool_call_id": self.call_id, "content": self.content}


def assistant_message(calls: list[ToolCall], content: str | None = None) -> dict:
    """The assistant message that asked for ``calls``, as the next round's
    prompt must repeat it before their ``tool`` messages."""
    return {
        "role": "assistant",
        "content": content,
        "tool_calls": [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": call.arguments},
            }
            for call in calls
        ],
    }


def status_text(call: ToolCall) -> str:
    """The short Russian text a stream shows the seller while ``call`` runs."""
    tool = TOOLS.get(call.name)
    if tool is None:
        return GENERIC_STATUS
    try:
        return tool.status(check_arguments(tool.parameters, call.arguments))
    except BadArguments:
        return GENERIC_STATUS


def cache_key(telegram_id: int, name: str, arguments: dict) -> str:
    """The seller's own key for a call: the same tool and the same (checked,
    defaulted) arguments give the same key, whatever their order. The
    arguments (a search text or a list of warehouses: up to 200 characters)
    go in as a digest; the namespace (``REDIS_PREFIX``, ``tool:``) is the
    cache's (app.cache)."""
    return f"{CACHE_KEY_VERSION}:{telegram_id}:{name}:{Cache.digest(dumps(_sorted(arguments)))}"


def run_calls(
    mainserver: MainServer,
    calls: list[ToolCall],
    telegram_id: int,
    budget: float,
) -> list[ToolResult]:
    """Run one round's calls at the same time; one result per call, in order.

    ``telegram_id`` is the requester's: whatever the arguments say, it is the
    only seller whose data is asked for. The server's ``settings`` bound it
    (``TOOL_TIMEOUT``, ``TOOL_RESULT_MAX_CHARS``, ``TOOL_CACHE_SECONDS``).
    Never raises for a failed call.
    """
    settings = mainserver.settings
    started = time.monotonic()
    deadline = started + max(0.0, min(settings.timeout, budget))
    results: list[ToolResult | None] = [None] * len(calls)
    pending: dict[Future, tuple[int, ToolCall, str | None]] = {}
    for index, call in enumerate(calls):
        if index >= MAX_CALLS_PER_ROUND:
            results[index] = _refused(call, TOO_MANY)
            continue
        tool = TOOLS.get(call.name)
        if tool is None:
            results[index] = _refused(call, f"неизвестный инструмент «{echo(call.name)}»")
            continue
        try:
            arguments = check_arguments(tool.parameters, call.arguments)
        except BadArguments as error:
            results[index] = _refused(call, str(error))
            continue
        key = cache_key(telegram_id, tool.name, arguments) if settings.cache_seconds else None
        cached = _cached(mainserver, key)
        if cached is not None:
            results[index] = ToolResult(call.id, call.name, cached, "cached")
            continue
        future = _executor().submit(
            _call, mainserver, tool, arguments, telegram_id, deadline, settings.max_chars
        )
        pending[future] = (index, call, key)
    if pending:
        wait(pending, timeout=max(0.0, deadline - time.monotonic()))
    for future, (index, call, key) in pending.items():
        if future.done():
            content, outcome, finished = future.result()
        else:
            # The worker may still finish; its answer is simply not waited for.
            future.cancel()
            content, outcome = _error(call.name, MainServerTimeout.message), "timeout"
            finished = time.monotonic()
        if outcome == "ok" and key is not None:
            _store(mainserver, key, content, settings.cache_seconds)
        metrics.TOOL_DURATION.labels(call.name).observe(finished - started)
        results[index] = ToolResult(call.id, call.name, content, outcome)
    for result in results:
        metrics.TOOL_CALLS.labels(metric_label(result.name), result.outcome).inc()
    return results


def dashboard_text(mainserver: MainServer, telegram_id: int, budget: float) -> str | None:
    """The seller's reduced dashboard as compact text, for a model without
    tools: one call within ``budget`` (cached like a tool's result). Any
    failure gives None (logged, counted as a ``get_dashboard`` call)."""
    if not mainserver.configured:
        return None
    tool = TOOLS["get_dashboard"]
    settings = mainserver.settings
    started = time.monotonic()
    # Among the tools' results, unlike any call's key (those start with the version).
    key = f"dashboard_text:{CACHE_KEY_VERSION}:{telegram_id}"
    text = _cached(mainserver, key) if settings.cache_seconds else None
    outcome = "cached"
    if text is None:
        deadline = started + max(0.0, budget)
        future = _executor().submit(_dashboard, mainserver, tool, telegram_id, deadline)
        try:
            text, outcome = future.result(timeout=max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            future.cancel()
            text, outcome = None, "timeout"
        if text is not None and settings.cache_seconds:
            _store(mainserver, key, text, settings.cache_seconds)
    if text is None:
        log.warning("dashboard for a model without tools: %s", outcome)
    metrics.TOOL_CALLS.labels(tool.name, outcome).inc()
    metrics.TOOL_DURATION.labels(tool.name).observe(time.monotonic() - started)
    return text


# --- inside the pool's threads ------------------------------------------------


def _call(
    mainserver: MainServer,
    tool: Tool,
    arguments: dict,
    telegram_id: int,
    deadline: float,
    max_chars: int,
) -> tuple[str, str, float]:
    """(content, outcome, when it ended) of one checked call; never raises."""
    try:
        data = _data(mainserver, tool, arguments, telegram_id, deadline)
    except MainServerError as error:
        return _error(tool.name, error.message), error.outcome, time.monotonic()
    content = fit({"tool": tool.name, "note": tool.note}, data, max_chars)
    if content is None:
        return _error(tool.name, TOO_LARGE), "too_large", time.monotonic()
    return content, "ok", time.monotonic()


def _dashboard(
    mainserver: MainServer, tool: Tool, telegram_id: int, deadline: float
) -> tuple[str | None, str]:
    try:
        data = _data(mainserver, tool, {}, telegram_id, deadline)
    except MainServerError as error:
        return None, error.outcome
    text = dumps(data)
    if len(text) > mainserver.settings.max_chars:
        return None, "too_large"
    return text, "ok"


def _data(mainserver: MainServer, tool: Tool, arguments: dict, telegram_id: int, deadline):
    """The reduced data of a call.

    Raises:
        MainServerError: of any kind; anything unforeseen (a body shaped
            unlike any the main server is known to send) as unavailable.
    """
    try:
        payload = mainserver.get(tool.path, arguments, telegram_id, deadline - time.monotonic())
        return tool.reduce(payload)
    except MainServerError:
        raise
    except Exception:
        log.exception("main server %s: unusable answer", tool.path)
        raise MainServerError(f"{tool.path}: unusable answer") from None


# --- helpers ------------------------------------------------------------------


def _refused(call: ToolCall, reason: str) -> ToolResult:
    return ToolResult(call.id, call.name, _error(echo(call.name), reason), "refused")


def _error(name: str, message: str) -> str:
    return dumps({"tool": name, "error": message})


def _sorted(arguments: dict) -> dict:
    return {name: arguments[name] for name in sorted(arguments)}


def _cached(mainserver: MainServer, key: str | None) -> str | None:
    if key is None:
        return None
    try:
        return mainserver.cache.get(key)
    except Exception:
        # A cache is never worth failing a call over: a fault is a miss.
        log.warning("tool cache: get failed", exc_info=True)
        return None


def _store(mainserver: MainServer, key: str, value: str, ttl: float) -> None:
    try:
        mainserver.cache.set(key, value, ttl)
    except Exception:
        log.warning("tool cache: set failed", exc_info=True)


_pool: ThreadPoolExecutor | None = None
_pool_pid: int | None = None
_pool_lock = threading.Lock()


def _executor() -> ThreadPoolExecutor:
    """The process's pool, created on first use in this very process.

    Not at import time and never inherited: gunicorn forks its workers from
    a master that never runs tools, and a pool copied across a fork has no
    threads behind it in the child, so a pool made in another pid is ignored.
    """
    global _pool, _pool_pid
    pid = os.getpid()
    with _pool_lock:
        if _pool is None or _pool_pid != pid:
            _pool = ThreadPoolExecutor(max_workers=POOL_THREADS, thread_name_prefix="tool-call")
            _pool_pid = pid
        return _pool
