"""Money: what a model call costs, from ``LLM_PRICES`` (parsed once, as
Decimal, in app/config.py), in ``PRICE_CURRENCY``.

A price is per million tokens, input and output apart. A provider that
reports only a total is charged at the dearer of the two rates: an estimate
never below the truth. A model without a price costs None (unknown), never 0.
"""

from __future__ import annotations

from decimal import Decimal

from app import metrics
from app.chat.records import Call
from app.llm import Tokens

MILLION = Decimal(1_000_000)
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
