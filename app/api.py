"""Local flask-smorest policy: the contract's error shape, JSON bodies parsed
whatever their Content-Type, and the API-key checks."""

from __future__ import annotations

import hmac
import json
from functools import wraps

import flask_smorest
from flask import current_app, request
from webargs.flaskparser import FlaskParser
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.routing import IntegerConverter

from app import errors


class Api(flask_smorest.Api):
    """Documents and renders errors as ``{"error", "message", ...}``."""

    ERROR_SCHEMA = errors.ErrorSchema

    def init_app(self, app, *args, **kwargs):
        app.url_map.converters["telegram_id"] = TelegramIdConverter
        super().init_app(app, *args, **kwargs)
        self.register_converter(TelegramIdConverter, TelegramIdConverter.openapi_schema)

    def handle_http_exception(self, error):
        return errors.http_error_response(error)


def document_models(spec, models: list[str]) -> None:
    """Name the configured models in the OpenAPI document (built at start-up):
    a ``model`` outside them is a 422, so the schema says which are valid."""
    schemas = spec.components.schemas
    for schema, field in (("SendRequest", "model"), ("SettingsUpdate", "preferred_model")):
        schemas[schema]["properties"][field]["enum"] = [*models, None]


class TelegramIdConverter(IntegerConverter):
    """``<telegram_id:...>``: any integer in the path; the range (1 … 2^63−1) is
    checked by the view, so that out-of-range ids get 422 like in bodies."""

    def __init__(self, url_map):
        super().__init__(url_map, signed=True)

    @staticmethod
    def openapi_schema(_converter) -> dict:
        return {"type": "integer", "format": "int64", "minimum": 1, "maximum": 2**63 - 1}


class JsonObjectParser(FlaskParser):
    """Reads the body as JSON regardless of Content-Type.

    The bot and curl users do not always send ``application/json``; the
    contract answers 400 for a body that is not a JSON object, whatever its
    type, instead of webargs' "missing field" 422.
    """

    def load_json(self, req, schema):
        body = req.get_data(cache=True)
        # A chunked body has no Content-Length: werkzeug stops reading at the
        # limit without complaint, so look for one byte more ourselves.
        limit = current_app.config["MAX_CONTENT_LENGTH"]
        if req.content_length is None and len(body) >= limit and req.stream.read(1):
            raise RequestEntityTooLarge()
        try:
            data = json.loads(body, parse_constant=_reject_constant)
        except (ValueError, RecursionError):
            raise errors.BadRequest("The request body is not valid JSON.") from None
        if not isinstance(data, dict):
            raise errors.BadRequest("The request body must be a JSON object.")
        return data


def _reject_constant(name: str):
    """NaN and Infinity are Python's extension, not JSON."""
    raise ValueError(f"{name} is not valid JSON")


class Blueprint(flask_smorest.Blueprint):
    ARGUMENTS_PARSER = JsonObjectParser()


def _matches(given: str | None, keys) -> bool:
    """Constant-time comparison against every accepted key (rotation)."""
    if not given:
        return False
    given_bytes = given.encode("utf-8", "surrogateescape")
    found = False
    for key in keys:
        # No early exit: the time taken does not tell which key matched.
        found |= hmac.compare_digest(given_bytes, key.encode("utf-8"))
    return found


def require_api_key() -> None:
    """``before_request`` hook: any configured API key opens the chat API."""
    keys = current_app.config["API_KEYS"]
    if current_app.config["ADMIN_API_KEY"]:
        keys = (*keys, current_app.config["ADMIN_API_KEY"])
    if not _matches(request.headers.get("X-API-KEY"), keys):
        raise errors.Forbidden()


def require_admin_key() -> None:
    """Admin actions take ADMIN_API_KEY when set, else the ordinary key."""
    admin_key = current_app.config["ADMIN_API_KEY"]
    keys = (admin_key,) if admin_key else current_app.config["API_KEYS"]
    if not _matches(request.headers.get("X-API-KEY"), keys):
        raise errors.Forbidden()


def admin_required(view):
    """Admin endpoints: see ``require_admin_key``."""

    @wraps(view)
    def wrapper(*args, **kwargs):
        require_admin_key()
        return view(*args, **kwargs)

    return wrapper
