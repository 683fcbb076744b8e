"""Money: what a model call costs, from ``LLM_PRICES`` (parsed once, as
Decimal, in app/config.py), in ``PRICE_CURRENCY``, and the most an answer can
cost, which its reservation holds against the spend cap.

A price is per million tokens, input and output apart. A provider that
reports only a total is charged at the dearer of the two rates: an estimate
never below the truth. A model without a price costs None (unknown), never 0.

The spend cap (``DAILY_SPEND_LIMIT``, a user's ``daily_spend_limit``) is
checked by the reservation statement itself: a unit is granted only while the
day's spend plus the estimates held by the answers in flight is under the
cap. The estimate is an upper bound, so however many sends race, the answers
granted while the cap was not yet reached can take the spend past it by at
most one answer. The bound is deliberately generous (every character of the
largest prompt the service can build as two tokens, every completion
OPENAI_MAX_TOKENS, every tool round taken, at the dearest priced model): it
limits how many answers of one seller may be in flight near the cap, never
how many a seller gets one after the other.
"""

from __future__ import annotations

import json
from decimal import Decimal

from app import metrics
from app.chat.prompts import SYSTEM_PROMPT
from app.chat.records import Call
from app.chat.schemas import MAX_MESSAGE_CHARS, MAX_USER_CONTEXT_CHARS
from app.llm import Tokens
from app.mainserver import TOOL_SPECS
from app.mainserver.run import MAX_CALLS_PER_ROUND

MILLION = Decimal(1_000_000)
# A token is at least one byte of UTF-8: a Cyrillic letter is two.
TOKENS_PER_CHAR = 2
TOOL_SPECS_CHARS = len(json.dumps(TOOL_SPECS, ensure_ascii=False))
# NUMERIC(18, 8) in the tables.
PRECISION = Decimal("0.00000001")


def call_cost(prices: dict, model: str | None, tokens: Tokens) -> Decimal | None:
    """What ``tokens`` of ``model`` cost, or None when it has no price."""
    rates = prices.get(model)
    if rates is None:
        return None
    given, taken = rates
    if tokens.prompt or tokens.completion:
        amount = tokens.prompt * given + tokens.completion * taken
    else:
        amount = tokens.total * max(given, taken)
    return (amount / MILLION).quantize(PRECISION)


def priced_call(prices: dict, purpose: str, model: str | None, tokens: Tokens) -> Call:
    """One call of ``model`` with its tokens and cost at ``prices`` (LLM_PRICES)."""
    cost = call_cost(prices, model, tokens)
    prompt, completion = tokens.prompt, tokens.completion
    if not (prompt or completion):
        completion = tokens.total  # only a total: counted where it is charged
    return Call(purpose, model, prompt, completion, cost)


def total_cost(calls: list[Call]) -> Decimal | None:
    """The calls' cost together; None when none of them had a price."""
    costs = [call.cost for call in calls if call.cost is not None]
    return sum(costs, Decimal(0)) if costs else None


def count_call(llm, call: Call) -> None:
    """Prometheus: the tokens and cost of a call, by model (floats only here)."""
    if call.model is None:
        return
    llm.count_tokens(call.model, call.prompt_tokens + call.completion_tokens)
    if call.cost is not None:
        metrics.LLM_COST.labels(call.model).inc(float(call.cost))


def answer_bound(config) -> Decimal:
    """The most one answer can cost (0 when no model has a price)."""
    prices = config["LLM_PRICES"]
    if not prices:
        return Decimal(0)
    given = max(rate for rate, _ in prices.values())
    taken = max(rate for _, rate in prices.values())
    # Everything a prompt can hold: the system prompt, the summary, the past
    # exchanges, the question, the seller's data (or the tools' descriptions).
    prompt_chars = (
        len(SYSTEM_PROMPT) + config["SUMMARY_MAX_CHARS"] + config["CONTEXT_MAX_CHARS"]
        + MAX_MESSAGE_CHARS + max(MAX_USER_CONTEXT_CHARS, config["TOOL_RESULT_MAX_CHARS"])
        + TOOL_SPECS_CHARS
    )
    tools = config["MAIN_SERVER_URL"] and config["TOOLS_ENABLED"]
    rounds = config["TOOLS_MAX_ROUNDS"] if tools else 0
    # Each round adds the calls' results to every later prompt.
    growth = MAX_CALLS_PER_ROUND * (config["TOOL_RESULT_MAX_CHARS"] + 200)
    calls = rounds + 1
    prompt_tokens = TOKENS_PER_CHAR * sum(prompt_chars + i * growth for i in range(calls))
    completion_tokens = calls * config["OPENAI_MAX_TOKENS"]
    return ((prompt_tokens * given + completion_tokens * taken) / MILLION).quantize(PRECISION)
