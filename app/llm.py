"""The OpenAI-compatible chat adapter.

One ``OpenAI`` client per process, with an explicit per-attempt timeout and the
SDK's own retries off, so ``backoff`` is the only retry layer. Only transient
failures (connection errors, timeouts, 429, 5xx) are retried; the whole call,
sleeps included, stays inside ``LLM_DEADLINE``. Failures leave as the domain
errors of ``app.errors`` with a Russian message; upstream text is only logged.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import backoff
import openai

from app import metrics
from app.errors import LLMNotConfigured, LLMTimeout, LLMUnavailable

log = logging.getLogger(__name__)

# APITimeoutError is a subclass of APIConnectionError.
TRANSIENT = (openai.APIConnectionError, openai.RateLimitError, openai.InternalServerError)


@dataclass(frozen=True)
class Completion:
    text: str
    tokens: int


@dataclass(frozen=True)
class LLMSettings:
    api_key: str | None
    base_url: str | None
    model: str
    temperature: float
    max_tokens: int
    timeout: float
    max_retries: int
    retry_base_delay: float
    deadline: float

    @classmethod
    def from_config(cls, config) -> LLMSettings:
        return cls(
            api_key=config["OPENAI_API_KEY"],
            base_url=config["OPENAI_BASE_URL"],
            model=config["OPENAI_MODEL"],
            temperature=config["OPENAI_TEMPERATURE"],
            max_tokens=config["OPENAI_MAX_TOKENS"],
            timeout=config["OPENAI_TIMEOUT"],
            max_retries=config["OPENAI_MAX_RETRIES"],
            retry_base_delay=config["OPENAI_RETRY_BASE_DELAY"],
            deadline=config["LLM_DEADLINE"],
        )


class LLMClient:
    """Chat completions with bounded retries; build once, share across threads."""

    def __init__(self, settings: LLMSettings):
        self.settings = settings
        self.configured = bool(settings.api_key or settings.base_url)
        self._client = None
        if self.configured:
            self._client = openai.OpenAI(
                # Local servers (vLLM, Ollama, llama.cpp) take any key.
                api_key=settings.api_key or "not-needed",
                base_url=settings.base_url,
                timeout=settings.timeout,
                max_retries=0,
            )
        self._create_with_retries = backoff.on_exception(
            backoff.expo,
            TRANSIENT,
            max_tries=settings.max_retries + 1,
            max_time=settings.deadline,
            jitter=backoff.full_jitter,
            factor=settings.retry_base_delay,
            max_value=4,
            on_backoff=self._log_retry,
            logger=None,
        )(self._create)

    def complete(self, messages: list[dict]) -> Completion:
        """Ask the model for the next assistant message.

        Raises:
            LLMNotConfigured: neither OPENAI_API_KEY nor OPENAI_BASE_URL is set.
            LLMTimeout: the last attempt timed out or LLM_DEADLINE ran out.
            LLMUnavailable: retries exhausted on 5xx/429/connection errors, any
                other 4xx, or an unusable answer.
        """
        started = time.monotonic()
        outcome = "unavailable"
        try:
            completion = self._complete(messages, started)
            outcome = "ok"
            metrics.LLM_TOKENS.inc(completion.tokens)
            return completion
        except LLMTimeout:
            outcome = "timeout"
            raise
        except LLMNotConfigured:
            outcome = "not_configured"
            raise
        finally:
            metrics.LLM_REQUESTS.labels(outcome).inc()
            metrics.LLM_DURATION.observe(time.monotonic() - started)

    def ping(self, timeout: float) -> str:
        """``GET {base_url}/models`` once, for operators' checks.

        Returns a one-line description. Raises LLMNotConfigured or any
        ``openai`` error.
        """
        if not self.configured:
            raise LLMNotConfigured()
        client = self._client.with_options(timeout=timeout, max_retries=0)
        count = len(client.models.list().data)
        return f"GET {client.base_url}models answered ({count} model(s))"

    def close(self) -> None:
        """Close pooled connections (tests; a worker simply exits)."""
        if self._client is not None:
            self._client.close()

    def _complete(self, messages: list[dict], started: float) -> Completion:
        if not self.configured:
            raise LLMNotConfigured()
        deadline_at = started + self.settings.deadline
        attempts = [0]
        try:
            response = self._create_with_retries(messages, deadline_at, attempts)
        except openai.APITimeoutError:
            log.warning("llm timed out after %d attempt(s)", attempts[0])
            raise LLMTimeout() from None
        except openai.APIStatusError as error:
            log.warning("llm answered HTTP %s after %d attempt(s)", error.status_code, attempts[0])
            raise LLMUnavailable() from None
        except (openai.OpenAIError, ValueError) as error:
            log.warning("llm failed after %d attempt(s): %s", attempts[0], type(error).__name__)
            raise LLMUnavailable() from None
        text = response.choices[0].message.content if response.choices else None
        if not text or not text.strip():
            log.warning("llm returned an empty answer")
            raise LLMUnavailable()
        tokens = response.usage.total_tokens if response.usage else 0
        return Completion(text=text, tokens=tokens or 0)

    def _create(self, messages, deadline_at: float, attempts: list[int]):
        remaining = deadline_at - time.monotonic()
        if remaining <= 0.05:
            raise LLMTimeout()
        attempts[0] += 1
        return self._client.chat.completions.create(
            model=self.settings.model,
            messages=messages,
            temperature=self.settings.temperature,
            max_tokens=self.settings.max_tokens,
            timeout=min(self.settings.timeout, remaining),
        )

    @staticmethod
    def _log_retry(details) -> None:
        log.info(
            "llm attempt %d failed (%s), retrying in %.2fs",
            details["tries"],
            type(details.get("exception")).__name__,
            details["wait"],
        )
