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
    Histogram,
    generate_latest,
    multiprocess,
)

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
LLM_REQUESTS = Counter(
    "ai_chat_llm_requests_total",
    "LLM calls by outcome (ok, timeout, unavailable, not_configured)",
    ["outcome"],
)
LLM_DURATION = Histogram(
    "ai_chat_llm_request_duration_seconds",
    "Time of one LLM call, retries included",
    buckets=BUCKETS,
)
LLM_TOKENS = Counter("ai_chat_llm_tokens_total", "Tokens used by answered requests")
QUOTA_RESERVATIONS = Counter("ai_chat_quota_reservations_total", "Quota units reserved")
QUOTA_REJECTIONS = Counter("ai_chat_quota_rejections_total", "Sends refused with 429")
QUOTA_REFUNDS = Counter("ai_chat_quota_refunds_total", "Reserved units given back")
IDEMPOTENT_REPLAYS = Counter("ai_chat_idempotent_replays_total", "Stored answers replayed")
USER_CONTEXT_FETCHES = Counter(
    "ai_chat_user_context_fetches_total",
    "Personalisation fetches from the main server by outcome",
    ["outcome"],
)
DATABASE_ERRORS = Counter("ai_chat_database_errors_total", "Database outages seen by requests")


def _registry():
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return registry
    return REGISTRY


def metrics_view() -> Response:
    """Prometheus text exposition of every metric above."""
    return Response(generate_latest(_registry()), mimetype=CONTENT_TYPE_LATEST)


def _start_timer() -> None:
    g.started_at = time.perf_counter()


def _record(response: Response) -> Response:
    started = g.get("started_at")
    # The route pattern, not the path: ids in paths would explode the labels.
    endpoint = request.url_rule.rule if request.url_rule else "unmatched"
    HTTP_REQUESTS.labels(endpoint, request.method, str(response.status_code)).inc()
    if started is not None:
        HTTP_DURATION.labels(endpoint, request.method).observe(time.perf_counter() - started)
    return response


def init_app(app: Flask) -> None:
    """Time every request and serve ``/metrics`` (documented in the OpenAPI spec)."""
    from app.extensions import api

    app.before_request(_start_timer)
    app.after_request(_record)
    app.add_url_rule("/metrics", "metrics", metrics_view)
    api.spec.path(
        rule=next(app.url_map.iter_rules("metrics")),
        operations={
            "get": {
                "tags": ["Probes"],
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
