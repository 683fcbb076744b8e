"""Prometheus metrics, summed over every gunicorn worker.

gunicorn.conf.py sets ``PROMETHEUS_MULTIPROC_DIR`` before this module is
imported, which switches prometheus-client to one mmap file per process;
``/metrics`` then aggregates the files of all workers. Without it (tests,
``flask run``) the in-process registry is served.
"""

from __future__ import annotations

import os
import time

from flask import Flask, Response, g, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from app.errors import database_outage
from app.extensions import api

# Latency buckets in seconds: sub-millisecond service phases up to a slow LLM.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 8, 10, 20, 45, 60)

HTTP_REQUESTS = Counter(
    "ai_chat_http_requests_total", "HTTP requests answered", ["endpoint", "method", "status"]
)
HTTP_DURATION = Histogram(
    "ai_chat_http_request_duration_seconds",
    "Time to answer an HTTP request",
    ["endpoint", "method"],
    buckets=BUCKETS,
)
PHASE_DURATION = Histogram(
    "ai_chat_send_phase_duration_seconds",
    "Time spent per phase of /v1/chat/send (quota, context, llm, save, total)",
    ["phase"],
    buckets=BUCKETS,
)
# Model and provider labels come from the configuration only (LLM_MODELS).
LLM_REQUESTS = Counter(
    "ai_chat_llm_requests_total",
    "Calls of a model (retries included) by outcome (ok, timeout, unavailable, rejected)",
    ["model", "provider", "outcome"],
)
LLM_DURATION = Histogram(
    "ai_chat_llm_request_duration_seconds",
    "Time of one model's call, retries included (to the first piece when streamed)",
    ["model", "provider"],
    buckets=BUCKETS,
)
LLM_TOKENS = Counter(
    "ai_chat_llm_tokens_total",
    "Tokens used by model calls that answered (answers, tool rounds, summaries)",
    ["model", "provider"],
)
LLM_COST = Counter(
    "ai_chat_llm_cost_total",
    "Cost of model calls in PRICE_CURRENCY (models with a price in LLM_PRICES)",
    ["model"],
)
# ALERT_SPEND_PER_HOUR, for the spend alert of deploy/alerts.yml to compare
# with: the threshold lives in one place. Labelled (by currency) so that no
# series exists while it is unset: an unlabelled multiprocess gauge would be
# written as 0 by every process, and a threshold of 0 would always fire.
ALERT_SPEND_PER_HOUR = Gauge(
    "ai_chat_alert_spend_per_hour",
    "ALERT_SPEND_PER_HOUR: spend per hour in PRICE_CURRENCY above which an alert fires",
    ["currency"],
    multiprocess_mode="max",
)
LLM_FALLBACKS = Counter(
    "ai_chat_llm_fallbacks_total",
    "Requests that moved on from a failed model to the next",
    ["from_model", "to_model"],
)
LLM_SKIPPED = Counter(
    "ai_chat_llm_skipped_total", "Models passed over because their circuit was open", ["provider"]
)
LLM_BREAKER_OPENED = Counter(
    "ai_chat_llm_breaker_opened_total", "Times a provider's circuit opened", ["provider"]
)
STREAM_FIRST_TOKEN = Histogram(
    "ai_chat_stream_first_token_seconds",
    "Time from a stream's arrival to its first delta sent",
    buckets=BUCKETS,
)
STREAMS_IN_FLIGHT = Gauge(
    "ai_chat_streams_in_flight", "Streams being answered", multiprocess_mode="livesum"
)
STREAMS_ENDED = Counter(
    "ai_chat_streams_total", "Streams by how they ended (done, error, client_gone)", ["outcome"]
)
QUOTA_RESERVATIONS = Counter("ai_chat_quota_reservations_total", "Quota units reserved")
QUOTA_REJECTIONS = Counter(
    "ai_chat_quota_rejections_total",
    "Sends refused with 429, by the limit that refused (daily: answers, spend: money)",
    ["limit"],
)
QUOTA_REFUNDS = Counter("ai_chat_quota_refunds_total", "Reserved units given back")
IDEMPOTENT_REPLAYS = Counter("ai_chat_idempotent_replays_total", "Stored answers replayed")
USER_CONTEXT_FETCHES = Counter(
    "ai_chat_user_context_fetches_total",
    "Personalisation fetches from the main server by outcome",
    ["outcome"],
)
DATABASE_ERRORS = Counter("ai_chat_database_errors_total", "Database outages seen by requests")
SUMMARY_FOLDS = Counter(
    "ai_chat_summary_folds_total",
    "Background folds of older exchanges into a summary, by outcome "
    "(ok, failed, busy, not_due, dropped, error)",
    ["outcome"],
)
SUMMARY_DURATION = Histogram(
    "ai_chat_summary_duration_seconds", "Time of the summary model's call", buckets=BUCKETS
)


def _registry():
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return registry
    return REGISTRY


def metrics_view() -> Response:
    """Prometheus text exposition of every metric above."""
    # content_type, not mimetype: Flask would add a second "; charset=utf-8".
    return Response(generate_latest(_registry()), content_type=CONTENT_TYPE_LATEST)


# Label values come from a fixed set only: a client can send any method and
# any path, and each new label value would be a new series forever.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def _start_timer() -> None:
    g.started_at = time.perf_counter()


def _record(response: Response) -> Response:
    started = g.get("started_at")
    # The route pattern, not the path: ids in paths would explode the labels.
    endpoint = request.url_rule.rule if request.url_rule else "unmatched"
    method = request.method if request.method in METHODS else "other"
    HTTP_REQUESTS.labels(endpoint, method, str(response.status_code)).inc()
    if started is not None:
        def observe():
            HTTP_DURATION.labels(endpoint, method).observe(time.perf_counter() - started)

        # A stream is timed to its end, not to its first byte.
        if response.is_streamed:
            response.call_on_close(observe)
        else:
            observe()
    return response


def _count_database_outage(_error, **_kwargs) -> None:
    DATABASE_ERRORS.inc()


def init_app(app: Flask) -> None:
    """Time every request and serve ``/metrics`` (documented in the OpenAPI spec)."""
    database_outage.connect(_count_database_outage)
    if app.config["ALERT_SPEND_PER_HOUR"] is not None:
        ALERT_SPEND_PER_HOUR.labels(app.config["PRICE_CURRENCY"]).set(
            float(app.config["ALERT_SPEND_PER_HOUR"])
        )
    app.before_request(_start_timer)
    app.after_request(_record)
    app.add_url_rule("/metrics", "metrics", metrics_view)
    api.spec.path(
        rule=next(app.url_map.iter_rules("metrics")),
        operations={
            "get": {
                "tags": ["health"],
                "summary": "Prometheus metrics of every worker (text exposition format)",
                "responses": {
                    "200": {
                        "description": "OK",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
    )


# --- the seller's own data: tools over the main server (v1.2) -----------------------
# The tool label comes from the tool registry only (app.mainserver.tools); a
# name the model made up counts as "unknown".
TOOL_CALLS = Counter(
    "ai_chat_tool_calls_total",
    "Tool calls by outcome (ok, cached, no_cabinet, unavailable, timeout, breaker_open, "
    "refused, too_large)",
    ["tool", "outcome"],
)
TOOL_DURATION = Histogram(
    "ai_chat_tool_call_duration_seconds",
    "Time of one tool call sent to the main server, as its caller waited for it",
    ["tool"],
    buckets=BUCKETS,
)
MAINSERVER_BREAKER_OPENED = Counter(
    "ai_chat_mainserver_breaker_opened_total", "Times the main server's circuit opened"
)


# --- Redis (v1.2; app/cache.py) -------------------------------------------------------
# ``use`` comes from the fixed set app.cache.USES, ``outcome`` is hit, miss or
# fallback (Redis could not be asked, or failed: PostgreSQL answered).
REDIS_REQUESTS = Counter(
    "ai_chat_redis_requests_total",
    "Redis lookups by use (answer, limits, context, tool, breaker) and outcome "
    "(hit, miss, fallback)",
    ["use", "outcome"],
)
# Labelled by the server (host:port or socket path, never the password) so
# that no series exists where Redis is not configured, and none in a process
# that never used Redis: an unlabelled gauge would be written as 0 by every
# worker's first metric and by the gunicorn master, and "livemin" would then
# report Redis down for ever. livemin: one worker that sees Redis down shows 0.
REDIS_UP = Gauge(
    "ai_chat_redis_up",
    "1 while this process reaches Redis, 0 while it falls back to PostgreSQL",
    ["server"],
    multiprocess_mode="livemin",
)
