"""Gunicorn configuration of the AI Chat Service (flat, in the style of gunicorn's
examples/example_config.py).

Every value can be changed from the environment (or `.env`); the defaults are what
one 2-core box needs. Command-line flags (`gunicorn -b ...`) still win over this file.
"""

import gc
import glob
import math
import os
import shutil
import sys
import tempfile
from contextlib import suppress

from dotenv import load_dotenv

# gunicorn reads this file before it applies --chdir; the app package lives next to it.
ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)

from app.config import env_file, env_text, server_settings  # noqa: E402

# `.env` first, so AI_CHAT_PORT, WEB_CONCURRENCY, LLM_DEADLINE ... set there apply to
# the server itself and not only to the app. The path is the app's own (next to this
# file, or AI_CHAT_ENV_FILE), so a `.env` in some parent directory is never picked up
# by accident. Values already in the real environment win (override=False), as in
# the app.
load_dotenv(env_file())

# Numbers are parsed by the app's own rules (app/config.py): same defaults, and a
# malformed value stops the master with one line naming the variable. Read before
# the metrics directory below is made, so such an exit leaves nothing behind.
_server = server_settings(os.environ)


#
# Prometheus multiprocess mode
#
#   Several worker processes each count their own requests; prometheus_client merges
#   them only when PROMETHEUS_MULTIPROC_DIR is set before it is first imported. This
#   file is executed by the master before the app is loaded (preload_app), so this is
#   the place.
#
#   Unset: a fresh private directory per server, so two servers on one machine (tests,
#   benchmarks) never mix their counters; it is removed again in on_exit below.
#   Set: the directory is created if needed and emptied of *.db files left by an
#   earlier run, so a restart does not resurrect old counters.
#
#   A SIGHUP reload executes this file again in the same master while workers are
#   still alive: the pid marker skips the cleanup then, so live counters survive.
#

_metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "").strip()
if not _metrics_dir:
    _metrics_dir = tempfile.mkdtemp(prefix="ai-chat-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = _metrics_dir
    os.environ["AI_CHAT_METRICS_TMPDIR"] = _metrics_dir
elif os.environ.get("AI_CHAT_METRICS_MASTER_PID") != str(os.getpid()):
    os.makedirs(_metrics_dir, exist_ok=True)
    for _stale in glob.glob(os.path.join(_metrics_dir, "*.db")):
        with suppress(FileNotFoundError):
            os.remove(_stale)
os.environ["AI_CHAT_METRICS_MASTER_PID"] = str(os.getpid())

#
# Server socket
#
#   bind - GUNICORN_BIND ("host:port", "unix:/path") wins; otherwise GUNICORN_HOST
#       (all interfaces by default: in a container the port is only reachable
#       through Docker's network anyway) and AI_CHAT_PORT, the variable the
#       existing service and the bot already use.
#

_host = env_text(os.environ, "GUNICORN_HOST", "0.0.0.0")
bind = env_text(os.environ, "GUNICORN_BIND", f"{_host}:{_server['port']}")

#
# Worker processes
#
#   worker_class - app.worker.Worker: gunicorn's gthread, which also tells the app
#       when a request was queued (a send that waited too long for a thread is
#       refused before it spends anything) and when the worker is stopping (new
#       sends get 503 while answers in flight finish). A request spends almost all
#       its time waiting for the LLM (seconds), and a waiting thread holds no CPU,
#       so threads are the cheap way to overlap many slow calls in a synchronous
#       Flask app.
#   workers - WEB_CONCURRENCY, default 2: one per core of the target 2-core box;
#       more processes would not add throughput, only memory.
#   threads - GUNICORN_THREADS, default 600: a chat holds its thread while the model
#       answers, so threads come from concurrent chats, not from answers/s: 1000
#       concurrent chats on a 2-core box is 500 per worker, and connections split
#       unevenly between the workers (keep-alive connections stay with the worker
#       that accepted them), hence the headroom. A thread needs a database
#       connection only for its short statements (the pool is sized apart, see
#       README "Sizing"). A stream holds its thread for its whole length.
#   worker_connections - above threads, so kept-alive idle connections never take
#       the place of a request.
#   timeout - REQUEST_DEADLINE + 15 s. gthread heartbeats from its main loop, not
#       from the request thread, but a worker must never be killed while a
#       legitimate request is still inside its deadline, whatever the worker type.
#   graceful_timeout - REQUEST_DEADLINE + 5 s: on SIGTERM/redeploy, answers already
#       being generated are finished (the user's quota is already reserved for
#       them) before the worker is forced down; a stream still running by then
#       ends itself with an error event and gives its unit back first (it ends
#       STREAM_WRITE_TIMEOUT earlier, so that even a last write to a client that
#       stopped reading gives up before the kill).
#   keepalive - 5 s: nginx keeps upstream connections open (keepalive 64), so idle
#       keep-alive connections are worth holding a little longer than the default.
#   backlog - connections the kernel queues while both workers are busy accepting:
#       a burst of 1000 new chats must not find the queue full.
#

_request_deadline = math.ceil(_server["request_deadline"])

worker_class = "app.worker.Worker"
workers = _server["workers"]
threads = _server["threads"]
worker_connections = max(1000, threads * 2)
timeout = _request_deadline + 15
graceful_timeout = _request_deadline + 5
keepalive = 5
backlog = 2048

#
# Server mechanics
#
#   preload_app - the app is built once in the master: a configuration error
#       (e.g. no API_SECRET_KEY) stops the master with create_app's one-line
#       message instead of every worker crashing in a loop, and workers share the
#       loaded code copy-on-write. create_app opens no connections, so nothing
#       is shared across the fork.
#   worker_tmp_dir - the heartbeat file lives in RAM when /dev/shm exists; on a
#       disk-backed /tmp (Docker's overlayfs) the heartbeat fchmod can stall.
#   control_socket_disable - gunicorn >= 25 opens a control socket at one fixed
#       path per user ($HOME/.gunicorn/gunicorn.ctl), so a second server on the
#       same machine (tests, benchmarks, two instances) would collide with the
#       first. We do not use gunicornc.
#   forwarded_allow_ips - addresses whose X-Forwarded-Proto gunicorn trusts for
#       wsgi.url_scheme (FORWARDED_ALLOW_IPS, default 127.0.0.1). Client addresses
#       behind nginx are handled by the app's ProxyFix (PROXY_FIX_COUNT).
#

preload_app = True
if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
    worker_tmp_dir = "/dev/shm"
control_socket_disable = True
forwarded_allow_ips = env_text(os.environ, "FORWARDED_ALLOW_IPS", "127.0.0.1")

#
# Logging
#
#   accesslog - off: the app writes one structured line per request itself (with
#       its request id and timings); a second access log would only duplicate it.
#   errorlog - stderr, collected by Docker / systemd with the app's own logs.
#   loglevel - LOG_LEVEL, the same variable the app uses.
#

accesslog = None
errorlog = "-"
loglevel = env_text(os.environ, "LOG_LEVEL", "info").lower()

#
# Process naming
#

proc_name = "ai-chat"

#
# Server hooks
#
#   pre_fork - everything the master built (the app, the SDKs, the imported
#       modules: most of a worker's objects) goes into the garbage collector's
#       permanent generation before a worker is forked. A worker's full
#       collections then walk only its own objects: at 1000 chats they paused
#       a worker for up to 190 ms (the quota and save p99), and walking the
#       inherited objects also copied their pages into every worker
#       (bench/RESULTS.md).
#   child_exit - a dead worker's live gauges must stop counting; its counters
#       stay merged into the totals (prometheus_client's multiprocess contract).
#   on_exit - remove the private metrics directory this file created, so test and
#       benchmark runs do not fill /tmp. A directory given by the operator stays.
#       (Not meant for USR2 binary upgrades: the old master would remove the
#       directory the new one inherited. Containers restart instead.)
#


def pre_fork(server, worker):
    gc.freeze()


def child_exit(server, worker):
    # Imported here, never at the top: prometheus_client must first see
    # PROMETHEUS_MULTIPROC_DIR, which is set above.
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    owned = os.environ.get("AI_CHAT_METRICS_TMPDIR")
    if owned and owned == os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        shutil.rmtree(owned, ignore_errors=True)
