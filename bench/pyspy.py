"""Where the workers' CPU goes: py-spy on the gunicorn master and its workers
under load, summarised from py-spy's raw (collapsed stacks) output.

Only samples of a thread holding the GIL are kept (``--gil``): in a CPU-bound
run that is the Python work that limits throughput; threads waiting on the
network or the GIL are left out. py-spy is optional: without it the report says
how to get it and skips the profile.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

# Leaf frames are grouped by the package their file belongs to.
_CATEGORIES = (
    ("app/", "app (our code)"),
    ("flask_smorest/", "flask-smorest / webargs / marshmallow"),
    ("webargs/", "flask-smorest / webargs / marshmallow"),
    ("marshmallow/", "flask-smorest / webargs / marshmallow"),
    ("apispec/", "flask-smorest / webargs / marshmallow"),
    ("flask/", "flask / werkzeug"),
    ("werkzeug/", "flask / werkzeug"),
    ("sqlalchemy/", "sqlalchemy"),
    ("flask_sqlalchemy/", "sqlalchemy"),
    ("psycopg2/", "sqlalchemy"),
    ("openai/", "openai SDK / httpx / pydantic"),
    ("httpx", "openai SDK / httpx / pydantic"),
    ("httpcore/", "openai SDK / httpx / pydantic"),
    ("pydantic", "openai SDK / httpx / pydantic"),
    ("anyio/", "openai SDK / httpx / pydantic"),
    ("h11/", "openai SDK / httpx / pydantic"),
    ("distro/", "openai SDK / httpx / pydantic"),
    ("prometheus_client/", "prometheus_client"),
    ("pythonjsonlogger/", "logging"),
    ("logging/", "logging"),
    ("gunicorn/", "gunicorn"),
    ("backoff/", "backoff"),
    ("json/", "json (stdlib)"),
    ("concurrent/", "threads / selectors / ssl (stdlib)"),
    ("threading.py", "threads / selectors / ssl (stdlib)"),
    ("selectors.py", "threads / selectors / ssl (stdlib)"),
    ("socket.py", "threads / selectors / ssl (stdlib)"),
    ("ssl.py", "threads / selectors / ssl (stdlib)"),
)
# Functions whose inclusive time answers "what does one send cost, step by step".
WATCHED = (
    ("Flask.wsgi_app", "the whole request in Flask"),
    ("JsonObjectParser.load_json", "body JSON parse"),
    ("Parser.parse", "webargs parse + schema load (body and headers)"),
    ("require_api_key", "API-key check"),
    ("send_message", "send.send_message"),
    ("Exchange.open", "before the model: reservation, context, prompt"),
    ("reserve", "quota reservation + context read (one statement)"),
    ("Exchange.finish", "after the model: save"),
    ("Connection._execute", "all SQL statements (app/sql.py, raw DBAPI)"),
    ("QueuePool._do_get", "taking a connection from the SQLAlchemy pool"),
    ("build_messages", "prompt assembly"),
    ("LLM.complete", "LLM call (client + wait)"),
    ("SyncAPIClient.post", "openai client post (build, send, read)"),
    ("BaseClient._build_request", "openai/httpx request building"),
    ("ConnectionPool._assign_requests_to_connections",
     "httpx connection pool: matching requests to its connections"),
    (
        "ResponseMixin.response.<locals>.decorator.<locals>.wrapper",
        "flask-smorest decorators (they wrap the view)",
    ),
    ("_log_request", "per-request log line"),
    ("_record", "Prometheus HTTP metrics"),
    ("Histogram.observe", "Prometheus observe()"),
    ("Counter.inc", "Prometheus inc()"),
    ("annotate", "logs.annotate"),
    ("Flask.make_response", "Flask make_response"),
    ("Flask.do_teardown_appcontext", "app-context teardown"),
    ("ThreadWorker.handle_request", "gunicorn request handling"),
)
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


@dataclass
class Profile:
    samples: int = 0
    by_category: Counter = field(default_factory=Counter)
    self_time: Counter = field(default_factory=Counter)
    inclusive: Counter = field(default_factory=Counter)
    watched: dict[str, tuple[str, int]] = field(default_factory=dict)


def available() -> str | None:
    """The py-spy executable next to this interpreter or on PATH, if any."""
    local = Path(sys.executable).parent / "py-spy"
    if local.exists():
        return str(local)
    return shutil.which("py-spy")


def start(executable: str, pid: int, seconds: float, output: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [executable, "record", "--pid", str(pid), "--subprocesses", "--gil", "--rate", "200",
         "--duration", str(int(seconds)), "--format", "raw", "--output", str(output)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )


def _category(path: str) -> str:
    for marker, name in _CATEGORIES:
        if marker in path:
            return name
    return "other (stdlib / C)"


def parse(raw: str) -> Profile:
    profile = Profile()
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = []
        for frame in stack.split(";"):
            if frame.startswith("process ") or frame.startswith("thread "):
                continue
            match = _FRAME.match(frame)
            if match:
                frames.append((match["func"], match["file"]))
        if not frames:
            continue
        profile.samples += count
        func, path = frames[-1]
        profile.by_category[_category(path)] += count
        profile.self_time[f"{func} ({path})"] += count
        for name in {f"{f} ({p})" for f, p in frames}:
            profile.inclusive[name] += count
    for func, label in WATCHED:
        total = sum(n for name, n in profile.inclusive.items() if name.startswith(func + " ("))
        if total:
            profile.watched[label] = (func, total)
    return profile
