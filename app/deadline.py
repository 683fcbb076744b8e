"""One deadline per request, counted from when the server took it in.

The bot gives up after 60 s, so everything a send does fits in
``REQUEST_DEADLINE`` from the request's arrival: the wait in gunicorn's queue,
the personalisation fetch, the model with its retries and fallbacks, and the
writes after the answer. Each step asks the deadline for its budget instead
of having a timeout of its own that could add up past it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from flask import request

from app.errors import ServiceUnavailable

# Left for the writes after an answer (save, or refund) when the model's
# budget is cut from what remains: a few retries over a database blip.
WRITE_RESERVE_SECONDS = 3.0


@dataclass(frozen=True)
class Deadline:
    arrived: float  # time.monotonic() when the server queued the request
    at: float

    @classmethod
    def after(cls, seconds: float, arrived: float | None = None) -> Deadline:
        arrived = time.monotonic() if arrived is None else arrived
        return cls(arrived=arrived, at=arrived + seconds)

    def remaining(self) -> float:
        return self.at - time.monotonic()

    def admitted_until(self, min_answer_seconds: float) -> float:
        """The ``time.monotonic()`` after which ``admit`` refuses: what is left
        then, less the writes after the answer, is under ``min_answer_seconds``."""
        return self.at - WRITE_RESERVE_SECONDS - min_answer_seconds

    def budget(self, cap: float, reserve: float = 0.0) -> float:
        """Seconds a step may take: at most ``cap``, and never past the
        deadline less ``reserve`` for what must still follow it."""
        return max(0.0, min(cap, self.remaining() - reserve))


def request_deadline(seconds: float) -> Deadline:
    """The current request's deadline, from the time gunicorn queued it
    (app.worker) or, outside gunicorn, from now."""
    return Deadline.after(seconds, request.environ.get("ai_chat.queued_at"))


def admit(
    deadline: Deadline, min_answer_seconds: float, queue_timeout: float, retry_after: int
) -> None:
    """Refuse a send before anything is reserved when it can no longer be
    answered in time; otherwise the model gets whatever is left.

    Admission goes by the time left, not by a fixed wait: on a saturated box
    a request that queued 20 s still has 30 s, and an answer takes about 5.
    Shedding still protects the box: when the queue only grows, its waits grow
    until requests are refused at the head of it, each for a few microseconds.

    Raises:
        ServiceUnavailable: the worker is stopping (SIGTERM); or what is left of
            the deadline, less the writes after the answer, is under
            ``min_answer_seconds``; or the request waited in the queue longer
            than ``queue_timeout`` (0 = no such cap).
    """
    refused = ServiceUnavailable(headers={"Retry-After": str(retry_after)})
    server = request.environ.get("ai_chat.server")
    if server is not None and server.stopping_since is not None:
        raise refused
    if time.monotonic() > deadline.admitted_until(min_answer_seconds):
        raise refused
    if queue_timeout and time.monotonic() - deadline.arrived > queue_timeout:
        raise refused
