"""The model's tool arguments, checked against the tool's own JSON schema.

The schema given to the model (app.mainserver.tools) is also the rule that
checks what it sends back: one source, so the two cannot drift. Only the
few keywords the registry uses are understood (``type`` integer or string,
``enum``, ``minimum``/``maximum``, ``minLength``/``maxLength``, ``default``,
``additionalProperties: false``). Anything else the model sends (bad JSON,
not an object, an unknown argument such as ``telegram_id``, a wrong type,
a value out of range) raises ``BadArguments`` with a short Russian reason,
which goes back to the model as the tool's error; nothing unchecked ever
reaches the main server.
"""

from __future__ import annotations

import json
from typing import Any

# Names the model made up are echoed back shortened.
MAX_ECHOED_CHARS = 40


class BadArguments(ValueError):
    """The arguments do not satisfy the schema; the text is for the model."""


def check_arguments(schema: dict, raw: str | None) -> dict:
    """The arguments of ``raw`` (the model's JSON text) with defaults applied.

    An empty text counts as ``{}``: some models send it for a tool without
    arguments.

    Raises:
        BadArguments: anything the schema does not allow.
    """
    if raw is None or not raw.strip():
        raw = "{}"
    try:
        given = json.loads(raw)
    except ValueError:
        raise BadArguments("аргументы не являются корректным JSON") from None
    if not isinstance(given, dict):
        raise BadArguments("аргументы должны быть JSON-объектом")
    properties: dict = schema.get("properties", {})
    unknown = [name for name in given if name not in properties]
    if unknown:
        allowed = ", ".join(properties) or "нет аргументов"
        raise BadArguments(
            f"неизвестный аргумент «{echo(unknown[0])}» (допустимые: {allowed})"
        )
    checked = {}
    for name, rule in properties.items():
        if name in given:
            checked[name] = _check_value(name, rule, given[name])
        elif "default" in rule:
            checked[name] = rule["default"]
    return checked


def echo(text: Any) -> str:
    text = str(text)
    return text if len(text) <= MAX_ECHOED_CHARS else text[:MAX_ECHOED_CHARS] + "…"


def _check_value(name: str, rule: dict, value: Any) -> Any:
    kind = rule.get("type")
    if kind == "integer":
        # JSON Schema counts 10.0 as an integer; a boolean never is one.
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        valid = isinstance(value, int) and not isinstance(value, bool)
        if valid and "minimum" in rule:
            valid = value >= rule["minimum"]
        if valid and "maximum" in rule:
            valid = value <= rule["maximum"]
    elif kind == "string":
        valid = isinstance(value, str)
        if valid and "minLength" in rule:
            valid = len(value) >= rule["minLength"]
        if valid and "maxLength" in rule:
            valid = len(value) <= rule["maxLength"]
    else:
        raise ValueError(f"schema type {kind!r} is not supported")  # a registry bug
    if valid and "enum" in rule:
        valid = value in rule["enum"]
    if not valid:
        raise BadArguments(f"недопустимое значение аргумента «{name}»: ожидается {_expected(rule)}")
    return value


def _expected(rule: dict) -> str:
    if "enum" in rule:
        return "одно из значений " + ", ".join(str(choice) for choice in rule["enum"])
    if rule.get("type") == "integer":
        low, high = rule.get("minimum"), rule.get("maximum")
        if low is not None and high is not None:
            return f"целое число от {low} до {high}"
        if low is not None:
            return f"целое число не меньше {low}"
        return "целое число"
    low, high = rule.get("minLength", 0), rule.get("maxLength")
    if high is not None:
        return f"строка длиной от {low} до {high} символов"
    return "строка"
