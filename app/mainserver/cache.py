"""Where tool results are kept for a while (``TOOL_CACHE_SECONDS``).

The tools only need ``get`` and ``set`` with a time to live, so the cache is
that tiny interface: the in-process ``MemoryCache`` without Redis, and
``RedisResults`` with it (``MainServer.cache``), without the tools knowing.
Keys carry the seller's telegram_id (app.mainserver.run.cache_key):
two sellers never share an entry.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Protocol


class ResultCache(Protocol):
    def get(self, key: str) -> str | None:
        """The value stored under ``key``, or None (absent, expired, or unreachable)."""

    def set(self, key: str, value: str, ttl: float) -> None:
        """Store ``value`` for ``ttl`` seconds (best effort)."""


class RedisResults:
    """Tool results in Redis (app.cache), shared by every instance; a Redis
    fault is a miss (and a result not kept), never an error."""

    def __init__(self, cache):
        self.cache = cache

    def get(self, key: str) -> str | None:
        return self.cache.get("tool", key)

    def set(self, key: str, value: str, ttl: float) -> None:
        if ttl > 0:
            self.cache.set("tool", key, value, ttl)


class MemoryCache:
    """A per-process TTL cache, bounded in entries (the oldest go first)."""

    # A tool result is at most TOOL_RESULT_MAX_CHARS (6000 by default), so the
    # cache holds at most about 12 MB of text per worker process.
    def __init__(self, max_entries: int = 2000, clock=time.monotonic):
        self.max_entries = max_entries
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, tuple[float, str]] = OrderedDict()

    def get(self, key: str) -> str | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            expires_at, value = entry
            if self._clock() >= expires_at:
                del self._entries[key]
                return None
            return value

    def set(self, key: str, value: str, ttl: float) -> None:
        if ttl <= 0:
            return
        with self._lock:
            self._entries[key] = (self._clock() + ttl, value)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
