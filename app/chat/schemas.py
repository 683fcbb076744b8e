"""Request and response schemas of the chat API, split by direction.

Strict about types and bounds (no booleans or floats for ids, no blank or NUL
text), lenient about unknown fields, which the contract ignores.
"""

from __future__ import annotations

import re

import marshmallow as ma
from marshmallow import fields, validate

MAX_BIGINT = 2**63 - 1
MAX_INTEGER = 2**31 - 1
REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# Lone UTF-16 surrogates survive json.loads but cannot be stored as UTF-8.
_UNSTORABLE = re.compile(r"[\x00\ud800-\udfff]")


class Schema(ma.Schema):
    """Shared policy: unknown fields are dropped, not rejected."""

    class Meta:
        unknown = ma.EXCLUDE


def storable_text(value: str) -> None:
    if _UNSTORABLE.search(value):
        raise ma.ValidationError("Must not contain NUL or unpaired surrogate characters.")


def not_blank(value: str) -> None:
    if not value.strip():
        raise ma.ValidationError("Must not be blank.")


def valid_request_id(value: str) -> None:
    if not REQUEST_ID_PATTERN.fullmatch(value):
        raise ma.ValidationError("Must be 1-128 characters of A-Z a-z 0-9 . _ : -")


def telegram_id_field(**kwargs) -> fields.Integer:
    return fields.Integer(
        strict=True,
        validate=validate.Range(1, MAX_BIGINT),
        metadata={"description": "Telegram user id", "example": 123456789},
        **kwargs,
    )


# --- requests ---------------------------------------------------------------


class SendRequest(Schema):
    telegram_id = telegram_id_field(required=True)
    message = fields.String(
        required=True,
        validate=[validate.Length(1, 4000), not_blank, storable_text],
        metadata={"example": "Как поднять карточку товара в поиске Wildberries?"},
    )
    user_context = fields.String(
        allow_none=True,
        load_default=None,
        validate=[validate.Length(max=8000), storable_text],
        metadata={"description": "Seller data for personalisation; \"\" = none, null = fetch"},
    )
    user_id = fields.Integer(
        strict=True,
        allow_none=True,
        load_default=None,
        validate=validate.Range(1, MAX_INTEGER),
        metadata={"description": "Id in the main server's users table"},
    )
    request_id = fields.String(
        load_default=None,
        validate=valid_request_id,
        metadata={"description": "Idempotency key", "example": "upd-12345:1"},
    )


class HistoryRequest(Schema):
    telegram_id = telegram_id_field(required=True)
    limit = fields.Integer(strict=True, load_default=10, validate=validate.Range(1, 100))
    offset = fields.Integer(strict=True, load_default=0, validate=validate.Range(0, MAX_INTEGER))


class ResetLimitRequest(Schema):
    telegram_id = telegram_id_field(required=True)


class StatsQuery(Schema):
    days = fields.Integer(load_default=7, validate=validate.Range(1, 365))


class IdempotencyHeader(Schema):
    idempotency_key = fields.String(
        data_key="Idempotency-Key",
        load_default=None,
        validate=valid_request_id,
        metadata={"description": "Idempotency key; same rules as request_id"},
    )


# --- responses --------------------------------------------------------------


class SendResponse(Schema):
    response = fields.String(required=True)
    remaining_requests = fields.Integer(required=True, allow_none=True)
    tokens_used = fields.Integer(required=True)
    daily_limit = fields.Integer(required=True)


class HistoryItem(Schema):
    id = fields.Integer(required=True)
    message = fields.String(required=True)
    response = fields.String(required=True)
    tokens_used = fields.Integer(required=True)
    created_at = fields.AwareDateTime(required=True)


class HistoryResponse(Schema):
    items = fields.List(fields.Nested(HistoryItem), required=True)
    total = fields.Integer(required=True)
    limit = fields.Integer(required=True)
    offset = fields.Integer(required=True)


class DeleteHistoryResponse(Schema):
    telegram_id = fields.Integer(required=True)
    deleted = fields.Integer(required=True)


class LimitsResponse(Schema):
    telegram_id = fields.Integer(required=True)
    requests_today = fields.Integer(required=True)
    requests_remaining = fields.Integer(required=True, allow_none=True)
    daily_limit = fields.Integer(required=True)
    reset_date = fields.Date(required=True)


class ResetLimitResponse(Schema):
    success = fields.Boolean(required=True)
    message = fields.String(required=True)


class StatsResponse(Schema):
    telegram_id = fields.Integer(required=True)
    days = fields.Integer(required=True)
    total_requests = fields.Integer(required=True)
    total_tokens = fields.Integer(required=True)
    avg_requests_per_day = fields.Float(required=True)
    avg_tokens_per_request = fields.Float(required=True)
