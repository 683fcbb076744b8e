"""The seller's own data: the main server's bot API and the tools over it.

- ``client``: ``MainServer``, the one place that calls the main server
  (URL, key, deadline, envelopes, error mapping, circuit breaker);
- ``tools``: the registry of the seven tools, as data;
- ``arguments`` / ``reduction``: checking the model's arguments, shaping the
  answers for it;
- ``run``: running one round of calls at the same time, and the dashboard
  for models without tools;
- ``cache``: where results are kept for ``TOOL_CACHE_SECONDS``.

The send flow needs only what is exported here.
"""

from app.mainserver.cache import MemoryCache, RedisResults, ResultCache
from app.mainserver.client import (
    BreakerOpen,
    MainServer,
    MainServerError,
    MainServerTimeout,
    MainServerUnavailable,
    Misconfigured,
    NoCabinet,
    NotConfigured,
    ToolSettings,
)
from app.mainserver.run import (
    ToolCall,
    ToolResult,
    assistant_message,
    dashboard_text,
    run_calls,
    status_text,
)
from app.mainserver.tools import TOOL_SPECS, TOOLS, Tool, tool_specs

__all__ = [
    "TOOLS",
    "TOOL_SPECS",
    "BreakerOpen",
    "MainServer",
    "MainServerError",
    "MainServerTimeout",
    "MainServerUnavailable",
    "MemoryCache",
    "Misconfigured",
    "NoCabinet",
    "NotConfigured",
    "RedisResults",
    "ResultCache",
    "Tool",
    "ToolCall",
    "ToolResult",
    "ToolSettings",
    "assistant_message",
    "dashboard_text",
    "run_calls",
    "status_text",
    "tool_specs",
]
