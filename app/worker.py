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
  503 before reserving while answers in flight finish, and wakes the streams
  that wait on a silent model, so each ends (and gives its unit back) before
  the worker is killed.
- **A client that stopped reading.** A stream sets a write timeout on its
  socket (app/chat/stream.py); a write that times out is a client gone, and
  its connection is closed as quietly as one the client reset.

gunicorn.conf.py selects it (``worker_class``). It relies on two methods of
gthread's ``ThreadWorker`` (``enqueue_req``, ``handle_request``) of the pinned
gunicorn version; tests/test_shutdown.py runs it under real gunicorn.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from gunicorn.workers.gthread import ThreadWorker


class ServerState:
    """Per worker process: monotonic time of SIGTERM (None while serving), and
    who wants to know when it comes."""

    def __init__(self):
        self.stopping_since: float | None = None
        self._lock = threading.Lock()
        self._listeners: set[Callable[[], None]] = set()

    def on_stop(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call ``listener`` when the worker starts stopping (at once if it
        already has); returns the function that unsubscribes it."""
        with self._lock:
            self._listeners.add(listener)
        if self.stopping_since is not None:
            listener()
        return lambda: self._forget(listener)

    def _forget(self, listener) -> None:
        with self._lock:
            self._listeners.discard(listener)

    def stop(self) -> None:
        """Runs in the main thread's signal handler, which never holds a
        listener's lock: they are request threads' locks."""
        if self.stopping_since is None:
            self.stopping_since = time.monotonic()
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            listener()


class Worker(ThreadWorker):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.state = ServerState()
        self._current = threading.local()

    def handle_exit(self, sig, frame):
        self.state.stop()
        super().handle_exit(sig, frame)

    def enqueue_req(self, conn):
        conn.ai_chat_queued_at = time.monotonic()
        super().enqueue_req(conn)

    def handle_request(self, req, conn):
        self._current.queued_at = getattr(conn, "ai_chat_queued_at", None)
        try:
            return super().handle_request(req, conn)
        except TimeoutError:
            # A write past the stream's write timeout: the client stopped
            # reading. The app already ended its stream (gthread closed the
            # response iterator); close the connection without a traceback,
            # as for a client that reset it.
            raise StopIteration("client stopped reading") from None

    def load_wsgi(self):
        super().load_wsgi()
        app = self.wsgi

        def wsgi(environ, start_response):
            environ["ai_chat.queued_at"] = self._current.queued_at
            environ["ai_chat.server"] = self.state
            return app(environ, start_response)

        self.wsgi = wsgi
