"""A circuit breaker per provider: stop waiting on a provider that keeps failing.

After ``failures`` consecutive failed requests (each counted once, after its
retries) the circuit opens and the provider is skipped for ``open_seconds``;
then one request at a time is let through as a probe (half-open): its success
closes the circuit, its failure opens it again.

Written here rather than taken from pybreaker: pybreaker wraps a function
call and learns the outcome from its exceptions, while a streamed answer's
outcome is known at its first token, in the middle of the call, and a
skipped provider must be passed over (to the fallback) rather than raise.
The state is per worker process: with N workers a dead provider costs up to
N × ``failures`` failed requests before every worker stops calling it.
"""

from __future__ import annotations

import threading
import time


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
