"""The gunicorn worker of the service: gthread, plus what the app must know
about a request's life inside the server.

- **When the request was queued.** gthread's main loop accepts connections
  and hands each readable one to a thread pool; when every thread is busy the
  request waits in that pool's queue, unseen by the app. The time it was
  queued goes into the WSGI environ (``ai_chat.queued_at``, monotonic), so a
  send that waited too long to be answered within the bot's timeout is
  refused before it spends anything (app.deadline).
- **Whether the worker is stopping.** After SIGTERM gthread still serves the
  requests already queued and a request arriving on a kept-alive connection.
  ``ai_chat.server`` tells the app since when it is stopping, so new sends get
  503 before reserving while answers in flight finish.

gunicorn.conf.py selects it (``worker_class``). It relies on two methods of
gthread's ``ThreadWorker`` (``enqueue_req``, ``handle_request``) of the pinned
gunicorn version; tests/test_shutdown.py runs it under real gunicorn.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from gunicorn.workers.gthread import ThreadWorker


@dataclass
class ServerState:
    """Per worker process: monotonic time of SIGTERM, or None while serving."""

    stopping_since: float | None = None


class Worker(ThreadWorker):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.state = ServerState()
        self._current = threading.local()

    def handle_exit(self, sig, frame):
        if self.state.stopping_since is None:
            self.state.stopping_since = time.monotonic()
        super().handle_exit(sig, frame)

    def enqueue_req(self, conn):
        conn.ai_chat_queued_at = time.monotonic()
        super().enqueue_req(conn)

    def handle_request(self, req, conn):
        self._current.queued_at = getattr(conn, "ai_chat_queued_at", None)
        return super().handle_request(req, conn)

    def load_wsgi(self):
        super().load_wsgi()
        app = self.wsgi

        def wsgi(environ, start_response):
            environ["ai_chat.queued_at"] = self._current.queued_at
            environ["ai_chat.server"] = self.state
            return app(environ, start_response)

        self.wsgi = wsgi
