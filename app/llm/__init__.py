"""The model layer: which model answers, fallback, circuit breaking.

Providers and models are data, built once per process from configuration
(app/config.py): ``route`` picks the chain (the request's model, else the
user's preference, else the default; then the fallbacks), and ``complete`` /
``stream`` walk it. A transient failure of a model after its own retries
moves on to the next model; a provider whose circuit is open is skipped
without being waited on; a 4xx other than 429 is the request's fault and ends
the walk. The whole chain stays inside the budget it is given. Failures leave
as the domain errors of ``app.errors`` with a Russian message; upstream text
is only logged.
"""

from __future__ import annotations

import logging
import threading
import time

import openai

from app import metrics
from app.errors import LLMNotConfigured, LLMTimeout, LLMUnavailable, ValidationFailed
from app.llm.breaker import make_breaker
from app.llm.providers import (
    TRANSIENT,
    CallSettings,
    Completion,
    Model,
    Provider,
    Tokens,
    ToolCall,
    Unusable,
    Upstream,
    cancelled,
    complete,
    open_stream,
)

__all__ = ["LLM", "Cancelled", "Completion", "Model", "Tokens", "ToolCall", "Upstream"]

log = logging.getLogger("app.llm")

# Below this many seconds an attempt could not even connect.
MIN_ATTEMPT_SECONDS = 0.05


class Cancelled(Exception):
    """The caller cancelled the call (a stream's client went away)."""


class LLM:
    """Every configured model, built once per process; share across threads."""

    def __init__(self, config, cache=None):
        self.settings = CallSettings.from_config(config)
        self.providers = {
            name: Provider(
                name,
                provider,
                self.settings.timeout,
                # Shared by every instance through Redis when ``cache`` is configured.
                make_breaker(f"llm:{name}", config["LLM_BREAKER_FAILURES"],
                             config["LLM_BREAKER_OPEN_SECONDS"], cache),
            )
            for name, provider in config["LLM_PROVIDERS"].items()
        }
        self.models = {
            name: Model(name, self.providers[provider])
            for name, provider in config["LLM_MODELS"].items()
        }
        self.default = self.models[config["LLM_DEFAULT_MODEL"]]
        self.fallbacks = [self.models[name] for name in config["LLM_FALLBACK_MODELS"]]

    @property
    def configured(self) -> bool:
        return self.default.provider.configured

    @property
    def names(self) -> list[str]:
        return list(self.models)

    def check_model(self, name: str | None) -> None:
        """Raises ValidationFailed (422) naming the models when ``name`` is unknown."""
        if name is not None and name not in self.models:
            available = ", ".join(self.models)
            raise ValidationFailed(
                f"Unknown model {name!r}; available: {available}.",
                errors={"model": [f"Must be one of: {available}."]},
            )

    def route(self, requested: str | None = None, preferred: str | None = None) -> list[Model]:
        """The models to try, in order: the request's model, else the user's
        preference (ignored when no longer configured), else the default;
        then the fallbacks.

        Raises:
            ValidationFailed: ``requested`` is not a configured model.
            LLMNotConfigured: no provider of the chain is configured.
        """
        self.check_model(requested)
        first = self.models.get(requested or preferred or "", self.default)
        chain = [first, *(model for model in self.fallbacks if model is not first)]
        chain = [model for model in chain if model.provider.configured]
        if not chain:
            raise LLMNotConfigured()
        return chain

    def complete(
        self, messages: list[dict], chain: list[Model], budget: float,
        tools: list[dict] | None = None,
    ) -> Completion:
        """The first answer the chain gives within ``budget`` seconds (the calls
        the model asks for, when it is offered ``tools`` and wants them).

        Raises:
            LLMTimeout: the last attempt timed out, or the budget ran out.
            LLMUnavailable: every model failed or was skipped, or one answered
                a 4xx other than 429.
        """
        return self._walk(chain, budget, lambda model, share: complete(
            model, messages, self.settings, share, tools
        ))

    def stream(
        self, messages: list[dict], chain: list[Model], budget: float, on_open,
        cancel: threading.Event | None = None, tools: list[dict] | None = None,
    ):
        """Start a streamed answer: the first model of the chain to give a
        first piece within ``budget``. Returns (Upstream, first piece); the
        rest of the pieces come from ``Upstream.pieces`` with no retry or
        fallback any more (the client already has the first). ``on_open``
        gets each attempt's Upstream as soon as the provider answers.

        ``cancel`` set (the client went away, and the caller cut the
        upstream call): the failure that follows is our own doing, not the
        provider's, so it is neither retried nor passed to a fallback nor
        counted by the breaker.

        Raises: as ``complete``, and Cancelled once ``cancel`` is set.
        """
        return self._walk(chain, budget, lambda model, share: open_stream(
            model, messages, self.settings, share, on_open, cancel, tools
        ), cancel)

    def _walk(self, chain: list[Model], budget: float, call, cancel=None):
        started = time.monotonic()
        last_error: Exception | None = None
        previous: Model | None = None
        for index, model in enumerate(chain):
            if cancelled(cancel):
                raise Cancelled()
            remaining = budget - (time.monotonic() - started)
            if remaining <= MIN_ATTEMPT_SECONDS:
                break
            provider = model.provider
            if not provider.breaker.allow():
                metrics.LLM_SKIPPED.labels(provider.name).inc()
                continue
            if previous is not None:
                metrics.LLM_FALLBACKS.labels(previous.name, model.name).inc()
            # A model that hangs must not take the whole budget from the
            # fallbacks behind it: it gets half of what is left.
            later = any(m.provider.breaker.state != "open" for m in chain[index + 1:])
            share = remaining / 2 if later else remaining
            attempt_started = time.monotonic()
            outcome = "unavailable"
            try:
                result = call(model, share)
                outcome = "ok"
                provider.breaker.record_success()
                return result
            except (openai.OpenAIError, Unusable) as error:
                if cancelled(cancel):  # we cut the call: the provider did nothing wrong
                    outcome = "cancelled"
                    raise Cancelled() from None
                if isinstance(error, openai.APIStatusError) and not isinstance(error, TRANSIENT):
                    # The provider is up and refuses this request: no fallback helps.
                    outcome = "rejected"
                    provider.breaker.record_success()
                    log.warning("llm %s@%s answered HTTP %s", model.name, provider.name,
                                error.status_code)
                    raise LLMUnavailable() from None
                outcome = self._failed(model, error)
                last_error, previous = error, model
            finally:
                metrics.LLM_REQUESTS.labels(model.name, provider.name, outcome).inc()
                metrics.LLM_DURATION.labels(model.name, provider.name).observe(
                    time.monotonic() - attempt_started
                )
        out_of_time = budget - (time.monotonic() - started) <= MIN_ATTEMPT_SECONDS
        if out_of_time or isinstance(last_error, openai.APITimeoutError):
            raise LLMTimeout()
        raise LLMUnavailable()

    @staticmethod
    def _failed(model: Model, error: Exception) -> str:
        """Count a failure of the model's provider; returns the metric outcome."""
        provider = model.provider
        log.warning("llm %s@%s failed: %s", model.name, provider.name, _describe(error))
        if provider.breaker.record_failure():
            metrics.LLM_BREAKER_OPENED.labels(provider.name).inc()
            log.warning("llm provider %s: circuit opened", provider.name)
        return "timeout" if isinstance(error, openai.APITimeoutError) else "unavailable"

    def count_tokens(self, model: str, tokens: int) -> None:
        """Tokens of an answer given (streamed or not), by model and provider."""
        metrics.LLM_TOKENS.labels(model, self.models[model].provider.name).inc(tokens)

    def ping(self, provider: Provider, timeout: float) -> str:
        """``GET {base_url}/models`` once, for operators' checks.

        Returns a one-line description; raises any ``openai`` error.
        """
        client = provider.client.with_options(timeout=timeout, max_retries=0)
        count = len(client.models.list().data)
        return f"GET {client.base_url}models answered ({count} model(s))"

    def close(self) -> None:
        """Close pooled connections (tests; a worker simply exits)."""
        for provider in self.providers.values():
            provider.close()


def _describe(error: Exception) -> str:
    status = getattr(error, "status_code", None)
    return f"HTTP {status}" if status else type(error).__name__
