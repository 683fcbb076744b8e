"""Request and response schemas of the chat API, split by direction.

Strict about types and bounds (no booleans or floats for ids, no blank or NUL
text), lenient about unknown fields, which the contract ignores.
"""

from __future__ import annotations

import re

import marshmallow as ma
from marshmallow import fields, validate

from app.render import FORMATS

MAX_BIGINT = 2**63 - 1
MAX_INTEGER = 2**31 - 1
MAX_MESSAGE_CHARS = 4000
MAX_USER_CONTEXT_CHARS = 8000
REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# The rules of the validators below, as JSON Schema patterns for the OpenAPI
# document (ECMA regex; JSON Schema patterns are unanchored).
REQUEST_ID_DOC = f"^{REQUEST_ID_PATTERN.pattern}$"
NO_NUL_DOC = r"^[^\u0000]*$"
NOT_BLANK_NO_NUL_DOC = r"^[^\u0000]*[^\s\u0000][^\u0000]*$"
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


def format_field() -> fields.String:
    return fields.String(
        load_default=None,
        validate=validate.OneOf(FORMATS),
        metadata={"description": "How answers are rendered; default RESPONSE_FORMAT",
                  "example": "telegram_html"},
    )


def model_field(**kwargs) -> fields.String:
    return fields.String(
        validate=validate.Length(1, 200),
        metadata={"description": "One of the configured models (GET …/settings lists them)",
                  "example": "gpt-4o-mini"},
        **kwargs,
    )


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
        validate=[validate.Length(1, MAX_MESSAGE_CHARS), not_blank, storable_text],
        metadata={
            "example": "Как поднять карточку товара в поиске Wildberries?",
            "pattern": NOT_BLANK_NO_NUL_DOC,
        },
    )
    user_context = fields.String(
        allow_none=True,
        load_default=None,
        validate=[validate.Length(max=MAX_USER_CONTEXT_CHARS), storable_text],
        metadata={
            "description": "Seller data for personalisation; \"\" = none, null = fetch",
            "pattern": NO_NUL_DOC,
        },
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
        metadata={
            "description": "Idempotency key; when the Idempotency-Key header is given too, "
                           "the two must be equal (else 422 validation_error)",
            "example": "upd-12345:1",
            "pattern": REQUEST_ID_DOC,
        },
    )
    format = format_field()
    model = model_field(load_default=None)


class HistoryRequest(Schema):
    telegram_id = telegram_id_field(required=True)
    limit = fields.Integer(strict=True, load_default=10, validate=validate.Range(1, 100))
    offset = fields.Integer(strict=True, load_default=0, validate=validate.Range(0, MAX_INTEGER))
    format = format_field()


class ResetLimitRequest(Schema):
    telegram_id = telegram_id_field(required=True)


class StatsQuery(Schema):
    days = fields.Integer(load_default=7, validate=validate.Range(1, 365))


USAGE_GROUPS = ("day", "model", "user")
USAGE_MAX_DAYS = 366


class UsageQuery(Schema):
    """The spend report's range (quota days, both included) and grouping."""

    first = fields.Date(data_key="from", required=True, metadata={"example": "2026-12-01"})
    last = fields.Date(data_key="to", required=True, metadata={"example": "2026-12-01"})
    group_by = fields.String(load_default="day", validate=validate.OneOf(USAGE_GROUPS))
    limit = fields.Integer(load_default=100, validate=validate.Range(1, 1000))
    offset = fields.Integer(load_default=0, validate=validate.Range(0, MAX_INTEGER))

    @ma.validates_schema
    def _range(self, data, **_kwargs):
        if "first" in data and "last" in data:
            days = (data["last"] - data["first"]).days + 1
            if not 1 <= days <= USAGE_MAX_DAYS:
                raise ma.ValidationError(
                    f"from must not be after to, and the range at most {USAGE_MAX_DAYS} days.",
                    "to",
                )


class SettingsUpdate(Schema):
    """Only the fields given change; null puts one back to the default."""

    preferred_model = model_field(allow_none=True)
    daily_limit = fields.Integer(
        strict=True,
        allow_none=True,
        validate=validate.Range(0, MAX_INTEGER),
        metadata={"description": "Answers a day for this user; 0 = unlimited, null = "
                                 "DAILY_LIMIT. Needs ADMIN_API_KEY when that is set."},
    )
    daily_spend_limit = fields.Decimal(
        allow_none=True,
        places=8,
        allow_nan=False,
        validate=validate.Range(0, 10**9),
        # The bounds as numbers: apispec serialises a Decimal field's Range
        # through the field, and the JSON of a Decimal is a string, which no
        # OpenAPI ``maximum`` may be (these metadata override it).
        metadata={"description": "Money a day for this user in PRICE_CURRENCY (its answers, "
                                 "tool rounds and summaries); null = DAILY_SPEND_LIMIT. Needs "
                                 "ADMIN_API_KEY when that is set.", "example": 0.5,
                  "minimum": 0, "maximum": 10**9},
    )


class IdempotencyHeader(Schema):
    idempotency_key = fields.String(
        data_key="Idempotency-Key",
        load_default=None,
        validate=valid_request_id,
        metadata={
            "description": "Idempotency key; same rules as request_id, and equal to it when "
                           "both are given (else 422 validation_error)",
            "pattern": REQUEST_ID_DOC,
        },
    )


# --- responses --------------------------------------------------------------


def ex(value, description=None) -> dict:
    """Field metadata for the OpenAPI document."""
    return {"example": value, **({"description": description} if description else {})}


class SendResponse(Schema):
    response = fields.String(
        required=True,
        metadata=ex("<b>Чтобы поднять карточку</b> в поиске, …", "The answer in the format"),
    )
    parts = fields.List(
        fields.String(),
        required=True,
        metadata=ex(["<b>Чтобы поднять карточку</b> в поиске, …"],
                    "The answer cut into messages of at most 4096 visible characters, "
                    "each valid on its own"),
    )
    remaining_requests = fields.Integer(
        required=True, allow_none=True, metadata=ex(29, "After this answer; null if unlimited")
    )
    tokens_used = fields.Integer(required=True, metadata=ex(412, "0 when the model reported none"))
    daily_limit = fields.Integer(required=True, metadata=ex(30, "0 = unlimited"))
    model = fields.String(
        required=True, allow_none=True, metadata=ex("gpt-4o-mini", "The model that answered")
    )
    tools = fields.List(
        fields.String(), required=True,
        metadata=ex(["get_sales"], "The seller-data tools that ran for this answer "
                                   "(empty when none did)"),
    )
    cached = fields.Boolean(
        required=True,
        metadata=ex(False, "Answered from the common-answer cache (no model call, "
                           "tokens_used 0; a unit is spent as for any answer)"),
    )


class HistoryItem(Schema):
    id = fields.Integer(required=True, metadata=ex(1017))
    message = fields.String(required=True, metadata=ex("Как снизить процент возвратов?"))
    response = fields.String(required=True, metadata=ex("Проверьте размерную сетку …"))
    tokens_used = fields.Integer(required=True, metadata=ex(412))
    model = fields.String(
        required=True, allow_none=True, metadata=ex("gpt-4o-mini", "null on old rows")
    )
    tools = fields.List(
        fields.String(), required=True, metadata=ex(["get_sales"], "The tools the answer used")
    )
    created_at = fields.AwareDateTime(required=True, metadata=ex("2026-11-25T12:40:13+00:00"))


class HistoryResponse(Schema):
    items = fields.List(fields.Nested(HistoryItem), required=True)
    total = fields.Integer(required=True, metadata=ex(42))
    limit = fields.Integer(required=True, metadata=ex(10))
    offset = fields.Integer(required=True, metadata=ex(0))


class DeleteHistoryResponse(Schema):
    telegram_id = fields.Integer(required=True, metadata=ex(123456789))
    deleted = fields.Integer(required=True, metadata=ex(42))


class LimitsResponse(Schema):
    telegram_id = fields.Integer(required=True, metadata=ex(123456789))
    requests_today = fields.Integer(required=True, metadata=ex(3))
    requests_remaining = fields.Integer(required=True, allow_none=True, metadata=ex(27))
    daily_limit = fields.Integer(required=True, metadata=ex(30))
    reset_date = fields.Date(required=True, metadata=ex("2026-11-25", "Today, service time zone"))


class ResetLimitResponse(Schema):
    success = fields.Boolean(required=True, metadata=ex(True))
    message = fields.String(
        required=True, metadata=ex("Лимит пользователя 123456789 успешно сброшен")
    )


class StatsResponse(Schema):
    telegram_id = fields.Integer(required=True, metadata=ex(123456789))
    days = fields.Integer(required=True, metadata=ex(7))
    total_requests = fields.Integer(required=True, metadata=ex(12))
    total_tokens = fields.Integer(required=True, metadata=ex(4800))
    avg_requests_per_day = fields.Float(required=True, metadata=ex(1.71))
    avg_tokens_per_request = fields.Float(required=True, metadata=ex(400.0))
    total_cost = fields.Float(
        required=True,
        metadata=ex(0.0123, "What the user's requests cost in `currency`, summaries of the "
                            "conversation included (models without a price count 0)"),
    )
    currency = fields.String(required=True, metadata=ex("USD", "PRICE_CURRENCY"))
    by_model = fields.List(
        fields.Nested(lambda: ModelStats()),
        required=True,
        metadata={"description": "The same totals per model, most used first"},
    )
    by_tool = fields.Dict(
        keys=fields.String(), values=fields.Integer(), required=True,
        metadata=ex({"get_sales": 3}, "Answers that used each seller-data tool"),
    )


class ModelStats(Schema):
    model = fields.String(
        required=True, allow_none=True, metadata=ex("gpt-4o-mini", "null: rows of the old service")
    )
    requests = fields.Integer(required=True, metadata=ex(12))
    tokens = fields.Integer(required=True, metadata=ex(4800))
    cost = fields.Float(
        required=True, allow_none=True,
        metadata=ex(0.0108, "Its answers' cost (tool rounds included); null: no price"),
    )


class SettingsResponse(Schema):
    telegram_id = fields.Integer(required=True, metadata=ex(123456789))
    preferred_model = fields.String(
        required=True, allow_none=True, metadata=ex(None, "null: the default model answers")
    )
    daily_limit = fields.Integer(
        required=True, allow_none=True, metadata=ex(None, "null: DAILY_LIMIT applies")
    )
    daily_spend_limit = fields.Float(
        required=True, allow_none=True,
        metadata=ex(None, "null: DAILY_SPEND_LIMIT applies (PRICE_CURRENCY)"),
    )
    models = fields.List(
        fields.String(), required=True, metadata=ex(["gpt-4o-mini", "qwen2.5-7b"])
    )


class MemoryResponse(Schema):
    telegram_id = fields.Integer(required=True, metadata=ex(123456789))
    summary = fields.String(
        required=True, allow_none=True,
        metadata=ex("- Продаёт женские кроссовки на WB, склад Коледино…",
                    "The summary of the exchanges older than the context; null before the "
                    "first one"),
    )
    covers_until = fields.Integer(
        required=True, allow_none=True,
        metadata=ex(1017, "The id (history's) of the newest exchange it covers"),
    )
    updated_at = fields.AwareDateTime(
        required=True, allow_none=True, metadata=ex("2026-12-02T10:15:00+00:00")
    )


class UsageFigures(Schema):
    answers = fields.Integer(required=True, metadata=ex(120, "Answers given (cached included)"))
    prompt_tokens = fields.Integer(required=True, metadata=ex(96000))
    completion_tokens = fields.Integer(required=True, metadata=ex(36000))
    tokens = fields.Integer(required=True, metadata=ex(132000))
    cost = fields.Float(
        required=True, allow_none=True,
        metadata=ex(0.0360, "In `currency`; null when no call had a price"),
    )


class UsageRow(UsageFigures):
    key = fields.Raw(
        required=True, allow_none=True,
        metadata=ex("gpt-4o-mini", "The day (YYYY-MM-DD), the model (null: unrecorded) or "
                                   "the user's telegram_id"),
    )


class UsageResponse(Schema):
    first = fields.Date(data_key="from", required=True, metadata=ex("2026-12-01"))
    last = fields.Date(data_key="to", required=True, metadata=ex("2026-12-01"))
    group_by = fields.String(required=True, metadata=ex("model"))
    currency = fields.String(required=True, metadata=ex("USD"))
    rows = fields.List(fields.Nested(UsageRow), required=True,
                       metadata={"description": "Every model call of the range: answers, tool "
                                                "rounds, summaries; most expensive first (by "
                                                "day: in date order)"})
    total = fields.Nested(UsageFigures, required=True)
    groups = fields.Integer(required=True, metadata=ex(3, "Groups in all (for paging)"))
    limit = fields.Integer(required=True, metadata=ex(100))
    offset = fields.Integer(required=True, metadata=ex(0))
