"""A circuit breaker per provider: stop waiting on a provider that keeps failing.

After ``failures`` consecutive failed requests (each counted once, after its
retries) the circuit opens and the provider is skipped for ``open_seconds``;
then one request at a time is let through as a probe (half-open): its success
closes the circuit, its failure opens it again.

Written here rather than taken from pybreaker: pybreaker wraps a function
call and learns the outcome from its exceptions, while a streamed answer's
outcome is known at its first token, in the middle of the call, and a
skipped provider must be passed over (to the fallback) rather than raise.
``Breaker`` keeps the state per worker process: with N workers a dead
provider costs up to N × ``failures`` failed requests before every worker
stops calling it. ``SharedBreaker`` (v1.2) keeps it in Redis, one hash per
breaker (app/cache.py, ``breaker:{name}``), so every worker of every
instance sees one breaker; while Redis is unavailable it is a ``Breaker``.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from app.cache import BreakerState, Cache


class Breaker:
    def __init__(self, failures: int, open_seconds: float, clock=time.monotonic):
        self.failures = failures
        self.open_seconds = open_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._consecutive = 0
        self._opened_at: float | None = None
        self._probe_since: float | None = None

    @property
    def state(self) -> str:
        with self._lock:
            if self._opened_at is None:
                return "closed"
            if self._clock() - self._opened_at < self.open_seconds:
                return "open"
            return "half_open"

    def allow(self) -> bool:
        """May a request be sent now? (In half-open state: the one probe.)"""
        with self._lock:
            if self._opened_at is None:
                return True
            now = self._clock()
            if now - self._opened_at < self.open_seconds:
                return False
            # A probe whose request vanished without an outcome must not keep
            # the circuit half-open for ever.
            if self._probe_since is not None and now - self._probe_since < self.open_seconds:
                return False
            self._probe_since = now
            return True

    def record_success(self) -> None:
        with self._lock:
            self._consecutive = 0
            self._opened_at = None
            self._probe_since = None

    def record_failure(self) -> bool:
        """Count a failed request; True when this failure opened the circuit."""
        with self._lock:
            self._consecutive += 1
            probing = self._probe_since is not None
            self._probe_since = None
            if probing or (self._opened_at is None and self._consecutive >= self.failures):
                self._opened_at = self._clock()
                return True
            return False


# --- shared through Redis (v1.2) ------------------------------------------------------

# How old the shared state seen by a process may get before it asks Redis
# again: one round trip per second per process and breaker on the healthy
# path, instead of one per model call.
REFRESH_SECONDS = 1.0


@dataclass(frozen=True)
class _SharedView:
    """The shared state as last seen, with times on this process's clock."""

    failures: int
    opened_at: float | None
    probe_since: float | None
    seen_at: float

    @property
    def quiet(self) -> bool:
        """Closed with no failure counted: a success has nothing to reset."""
        return self.failures == 0 and self.opened_at is None and self.probe_since is None


class SharedBreaker(Breaker):
    """A ``Breaker`` whose state lives in Redis and is shared by every process.

    Same interface and rules as ``Breaker``. On the healthy path no model call
    waits for Redis: ``allow`` and ``state`` use the state last seen (at most
    ``refresh_seconds`` old), a success is written only when that state shows
    failures or a circuit that is not closed; every failure is written (one
    script, which also says whether it opened the circuit, exactly once across
    instances). The open period and the probe are timed by Redis's clock.

    While Redis cannot answer, the inherited per-process ``Breaker`` decides:
    it is kept up to date with every outcome, so it takes over where this
    process's own view of the provider stands.
    """

    def __init__(
        self,
        name: str,
        failures: int,
        open_seconds: float,
        cache: Cache,
        clock=time.monotonic,
        refresh_seconds: float = REFRESH_SECONDS,
    ):
        super().__init__(failures, open_seconds, clock)
        self.name = name
        self.cache = cache
        self.refresh_seconds = refresh_seconds
        # A failure count older than this is no longer "consecutive": the hash expires.
        self.ttl = max(3600.0, 4 * open_seconds)
        self._view_lock = threading.Lock()
        self._view: _SharedView | None = None
        self._refreshing = False

    @property
    def state(self) -> str:
        view = self._shared()
        if view is None:
            return super().state
        if view.opened_at is None:
            return "closed"
        if self._clock() - view.opened_at < self.open_seconds:
            return "open"
        return "half_open"

    def allow(self) -> bool:
        view = self._shared()
        if view is None:
            return super().allow()
        if view.opened_at is None:
            return True
        now = self._clock()
        if now - view.opened_at < self.open_seconds:
            return False
        if view.probe_since is not None and now - view.probe_since < self.open_seconds:
            return False
        # Half-open: which caller of which instance is the probe is Redis's call.
        answer = self.cache.breaker_probe(self.name, self.open_seconds)
        if answer is None:
            self._remember(None)
            return super().allow()
        allowed, state = answer
        self._remember(state)
        return allowed

    def record_success(self) -> None:
        super().record_success()
        view = self._view
        if view is not None and view.quiet:
            return
        if self.cache.breaker_success(self.name):
            self._remember_closed()
        else:
            self._remember(None)

    def record_failure(self) -> bool:
        opened_here = super().record_failure()
        answer = self.cache.breaker_failure(self.name, self.failures, self.ttl)
        if answer is None:
            # Redis is gone: from now on this process's own count decides,
            # not a view of the shared state that can no longer be updated.
            self._remember(None)
            return opened_here
        opened, state = answer
        self._remember(state)
        return opened

    def _shared(self) -> _SharedView | None:
        """The shared state, asked from Redis when the last view is older than
        ``refresh_seconds`` (by one thread; the others use the last view).
        None when Redis cannot tell."""
        now = self._clock()
        with self._view_lock:
            view = self._view
            fresh = view is not None and now - view.seen_at < self.refresh_seconds
            if fresh or self._refreshing:
                return view
            self._refreshing = True
        try:
            state = self.cache.breaker_state(self.name)
        finally:
            with self._view_lock:
                self._refreshing = False
        return self._remember(state)

    def _remember(self, state: BreakerState | None) -> _SharedView | None:
        now = self._clock()
        view = None
        if state is not None:
            view = _SharedView(
                state.failures,
                None if state.opened_for is None else now - state.opened_for,
                None if state.probing_for is None else now - state.probing_for,
                now,
            )
        with self._view_lock:
            self._view = view
        return view

    def _remember_closed(self) -> None:
        with self._view_lock:
            self._view = _SharedView(0, None, None, self._clock())


def make_breaker(name: str, failures: int, open_seconds: float, cache: Cache | None) -> Breaker:
    """A ``SharedBreaker`` when Redis is configured, else a per-process ``Breaker``."""
    if cache is not None and cache.configured:
        return SharedBreaker(name, failures, open_seconds, cache)
    return Breaker(failures, open_seconds)
