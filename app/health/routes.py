"""``/health`` answers without I/O (liveness); ``/health/ready`` checks the
database, so a load balancer stops sending traffic to an instance that
cannot reach it, and reports Redis (``ok`` or ``degraded``) without failing
for it: the service works without Redis, only slower."""

from __future__ import annotations

import logging

import marshmallow as ma
from flask import current_app
from flask.views import MethodView
from sqlalchemy.exc import SQLAlchemyError

from app.api import Blueprint
from app.models import ping_database

log = logging.getLogger(__name__)

blp = Blueprint("health", __name__, url_prefix="/health", description="Probes")


class LivenessResponse(ma.Schema):
    status = ma.fields.String(required=True, metadata={"example": "ok"})
    service = ma.fields.String(required=True, metadata={"example": "ai_chat"})
    version = ma.fields.String(required=True, metadata={"example": "1.2.0"})


class ReadinessResponse(ma.Schema):
    status = ma.fields.String(required=True, metadata={"example": "ok"})
    checks = ma.fields.Dict(
        keys=ma.fields.String(), values=ma.fields.String(), required=True,
        metadata={"example": {"database": "ok", "llm": "configured", "redis": "ok"}},
    )


@blp.route("")
class Liveness(MethodView):
    @blp.response(200, LivenessResponse)
    def get(self):
        """Liveness: the process answers (no database touch)"""
        return {"status": "ok", "service": "ai_chat", "version": current_app.config["VERSION"]}


@blp.route("/ready")
class Readiness(MethodView):
    @blp.response(200, ReadinessResponse)
    @blp.alt_response(503, schema=ReadinessResponse, description="The database is unreachable")
    def get(self):
        """Readiness: the database answers"""
        checks = {
            "database": _database_check(),
            "llm": "configured" if current_app.extensions["llm"].configured else "not_configured",
        }
        cache = current_app.extensions["cache"]
        if cache.configured:
            # Degraded is not unready: without Redis, PostgreSQL answers everything.
            checks["redis"] = cache.ping()
        if checks["database"] == "ok":
            return {"status": "ok", "checks": checks}
        return {"status": "unavailable", "checks": checks}, 503


def _database_check() -> str:
    try:
        ping_database()
        return "ok"
    except SQLAlchemyError as error:
        log.warning("readiness: database check failed (%s)", type(error).__name__)
        return "unavailable"
