"""The seller's own data in a send: the tools over the main server's bot API
that the model may call, in rounds, or, for a model without tool support, the
dashboard fetched once and given as the seller's data.

Which it is, is decided once per send, from the model that will answer:
- tools are offered when ``MAIN_SERVER_URL`` is set, ``TOOLS_ENABLED`` is on and
  the chosen model is not in ``LLM_MODELS_WITHOUT_TOOLS``; the fallbacks of
  such a send are the models that support tools too (a later round's prompt
  holds tool messages, which a model without tools may refuse);
- otherwise, without a ``user_context`` of the request's own or a
  ``USER_CONTEXT_URL`` fetch, the dashboard is fetched once (one call,
  ``USER_CONTEXT_TIMEOUT``) and becomes the ``<seller_data>`` block.

A round: the model's calls, each with a status the stream shows the seller,
run at the same time by app.mainserver (the requester's ``telegram_id`` added
there, never the model's), their results appended to the prompt as ``tool``
messages (data, marked as such), and the tools that ran recorded for the
answer, its history row and its stats.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from app.llm import Model, ToolCall
from app.mainserver import (
    TOOL_SPECS,
    MainServer,
    ToolResult,
    assistant_message,
    dashboard_text,
    run_calls,
    status_text,
)


class SellerData:
    """The tools (or the dashboard) of one send, and the tools it used."""

    def __init__(self, config, mainserver: MainServer, telegram_id: int, chain: list[Model]):
        self.mainserver = mainserver
        self.telegram_id = telegram_id
        self.max_rounds = config["TOOLS_MAX_ROUNDS"]
        without = set(config["LLM_MODELS_WITHOUT_TOOLS"])
        offered = mainserver.configured and config["TOOLS_ENABLED"] and chain[0].name not in without
        # The registry's specs, shared by every send: never mutated.
        self.specs: list[dict] | None = TOOL_SPECS if offered else None
        self.chain = [model for model in chain if model.name not in without] if offered else chain
        self.used: list[str] = []

    @property
    def rounds(self) -> int:
        """Tool rounds the model may take before it must answer."""
        return self.max_rounds if self.specs else 0

    def dashboard(self, budget: float) -> str | None:
        """The seller's data for a model that gets no tools (None with tools,
        without a main server, or when the call fails)."""
        if self.specs is not None or not self.mainserver.configured:
            return None
        return dashboard_text(self.mainserver, self.telegram_id, budget)

    def run_round(
        self,
        calls: Sequence[ToolCall],
        content: str | None,
        budget: float,
        on_status: Callable[[dict], None],
    ) -> list[dict]:
        """Run one round's ``calls`` (within ``budget`` s) and return the
        messages to append to the prompt: the model's request, then one
        ``tool`` message per call."""
        for call in calls:
            on_status({"tool": call.name, "text": status_text(call)})
        results = run_calls(self.mainserver, list(calls), self.telegram_id, budget)
        self._record(results)
        return [assistant_message(list(calls), content), *(r.message() for r in results)]

    def _record(self, results: list[ToolResult]) -> None:
        """The tools that ran (a call refused before it ran does not count),
        once each, in the order the model first asked for them."""
        for result in results:
            if result.outcome != "refused" and result.name not in self.used:
                self.used.append(result.name)
