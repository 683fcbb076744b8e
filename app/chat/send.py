"""The send use case: reserve a unit, ask the model, save the exchange.

One ``Exchange`` is one send's life, shared by ``POST /v1/chat/send`` and the
stream (app/chat/stream.py), which differ only in how the model's text
reaches the client:

    open()      claim the key, reserve the unit, read the context, build the
                prompt — everything decided before the model is called
    complete()  ask the model for the whole answer and finish   (send)
    finish()    save the exchange (and complete the key)        (both)
    abandon()   give the unit back and free the key             (both)

No connection is held while the model thinks. From the reservation on, any
failure gives the unit back: a unit is spent only by an answer given.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from decimal import Decimal
from functools import cached_property

from flask import current_app

from app import metrics, sql
from app.cache import MISS
from app.chat import answers, idempotency, memory, prompts, quota, records, spend
from app.chat.quota import Day, Usage
from app.chat.seller_data import SellerData
from app.chat.service import cached_usage, current_day, limits_entry
from app.deadline import WRITE_RESERVE_SECONDS, Deadline
from app.errors import (
    DATABASE_OUTAGE,
    ApiError,
    DailyLimitExceeded,
    DailySpendLimitExceeded,
    RequestInProgress,
)
from app.llm import Completion, Model, Tokens
from app.logs import annotate
from app.render import Rendered, render
from app.user_context import fetch_user_context

log = logging.getLogger(__name__)

# NUL cannot be stored in PostgreSQL text; a lone surrogate cannot be encoded
# as UTF-8 at all. A model may emit either: clean them, never lose the answer.
_UNSTORABLE = re.compile(r"[\x00\ud800-\udfff]")


def storable(text: str) -> str:
    """The model's text with NUL dropped and lone surrogates replaced."""
    if not _UNSTORABLE.search(text):
        return text
    return _UNSTORABLE.sub(lambda m: "" if m.group() == "\x00" else "\ufffd", text)


@dataclass(frozen=True)
class SendCommand:
    telegram_id: int
    message: str
    deadline: Deadline
    format: str
    user_context: str | None = None
    user_id: int | None = None
    request_id: str | None = None
    model: str | None = None


@dataclass
class Answer:
    text: str  # the model's raw text, as stored
    tokens_used: int
    model: str | None
    usage: Usage
    day: Day
    format: str
    timings: dict = field(default_factory=dict)
    tools: list[str] = field(default_factory=list)  # the seller-data tools that ran
    cached: bool = False  # answered from the common-answer cache

    @cached_property
    def rendered(self) -> Rendered:
        return render(self.text, self.format)

    def to_dict(self) -> dict:
        return {
            "response": self.rendered.text,
            "parts": self.rendered.parts,
            "remaining_requests": self.usage.remaining,
            "tokens_used": self.tokens_used,
            "daily_limit": self.usage.limit,
            "model": self.model,
            "tools": self.tools,
            "cached": self.cached,
        }


class Stopwatch:
    """Milliseconds per phase, for the Server-Timing header."""

    def __init__(self):
        self.timings: dict[str, float] = {}
        self._started = self._mark = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = (now - self._mark) * 1000
        self._mark = now

    def total(self) -> dict[str, float]:
        self.timings["total"] = (time.perf_counter() - self._started) * 1000
        return self.timings


def rate_limit_headers(usage: Usage, day: Day) -> dict[str, str]:
    """IETF RateLimit headers; absent when the quota is unlimited."""
    if usage.unlimited:
        return {}
    return {
        "RateLimit-Policy": f'"daily";q={usage.limit};w=86400',
        "RateLimit": f'"daily";r={usage.remaining};t={day.seconds_left}',
    }


def send_message(command: SendCommand) -> Answer:
    """Answer a seller's message, spending one unit of quota only on success.

    Raises:
        DailyLimitExceeded: the user's quota for today is used up.
        RequestInProgress, IdempotencyKeyReused: see ``idempotency.claim_key``.
        ValidationFailed: an unknown ``model``.
        LLMNotConfigured, LLMUnavailable, LLMTimeout: the model gave no answer.
        sqlalchemy errors of DATABASE_OUTAGE: the database is unreachable (→ 503).
    """
    exchange = Exchange(command)
    return exchange.open() or exchange.cached_answer() or exchange.complete()


class Exchange:
    """One send: its claim, its reserved unit, its prompt, and their undoing."""

    def __init__(self, command: SendCommand):
        self.command = command
        self.config = current_app.config
        self.llm = current_app.extensions["llm"]
        self.day = current_day()
        self.watch = Stopwatch()
        self.claim: idempotency.Claim | None = None
        self.reservation: quota.Reservation | None = None
        self.cache = current_app.extensions["cache"]
        # Held against the spend cap from the reservation until the save or refund.
        self.estimate = spend.answer_bound(self.config)
        self.view = MISS  # the user's entries in Redis, read before PostgreSQL
        self.answer_key: str | None = None  # set when the answer may be shared
        self.seller: SellerData | None = None
        self.model_by = 0.0  # time.monotonic() by which the model must have answered
        self.messages: list[dict] = []
        # The model calls of the answer and their tokens, and the tools it ran.
        self.calls: list[records.Call] = []
        self.tokens = Tokens()
        self._settled = False
        annotate(telegram_id=command.telegram_id, message_chars=len(command.message))

    # --- before the model ---------------------------------------------------

    def open(self) -> Answer | None:
        """Claim, reserve, read the context and build the prompt.

        Returns the stored answer when the key was answered before (nothing
        reserved then), else None: the unit is reserved and ``messages`` /
        ``chain`` are ready for the model.

        With Redis, one round trip before PostgreSQL reads the user's entries:
        a user already at the limit is refused from it (never from an entry
        older than 60 s), and a cached context spares the reservation reading
        one. PostgreSQL's one statement still decides every reservation.

        Raises: as ``send_message``, except the model's errors.
        """
        command = self.command
        config = self.config
        default_limit = config["DAILY_LIMIT"]
        self.view = self.cache.read_user(command.telegram_id)
        # A busy pool is waited for as long as admission would still let the
        # request in: it has time for an answer until then.
        admitted_until = command.deadline.admitted_until(config["MIN_ANSWER_SECONDS"])
        refused = self._refused_by_cache()
        if refused is not None:
            return self._refuse_from_cache(refused, admitted_until)
        failure = None
        with sql.connection(wait_until=admitted_until) as conn:
            if command.request_id:
                claimed = idempotency.claim_key(
                    conn, command.telegram_id, command.request_id, command.message,
                    self.day.now, self.claim_ttl(), default_limit, self.day.today,
                )
                if isinstance(claimed, idempotency.StoredAnswer):
                    return self._replay(claimed)  # whatever the models are now
                self.claim = claimed
            try:
                # An unknown model (422) or no model at all (503) is known
                # before anything is reserved.
                self.llm.route(command.model)
                self.reservation = quota.reserve(
                    conn, command.telegram_id, self.day,
                    quota.Limits(default_limit, config["DAILY_SPEND_LIMIT"], self.estimate),
                    0 if self.view.context is not None else config["CONTEXT_MESSAGES"],
                    memory.fold_offset(config) if config["SUMMARY_ENABLED"] else None,
                    # Only the ids, to check Redis's copy against.
                    config["CONTEXT_MESSAGES"] if self.view.context is not None else 0,
                )
            except BaseException as error:
                failure = error
        if failure is not None:
            # Nothing reserved (refused, or the statement failed): only the key
            # to free, on a connection of its own once this one is back.
            self._release_key()
            raise failure
        self.watch.lap("quota")
        reservation = self.reservation
        # The counter's day, when this instance's clock is behind it.
        self.day = reservation.day
        self.cache.write_limits(command.telegram_id, self.view.gen,
                                limits_entry(reservation.usage, reservation.day))
        if not reservation.granted:
            self._release_key()
            self._refuse(reservation.usage, "postgresql", reservation.spend)
        metrics.QUOTA_RESERVATIONS.inc()
        # From here on the unit is taken (autocommit): any failure gives it back.
        try:
            self.seller = SellerData(
                config, current_app.extensions["mainserver"], command.telegram_id,
                self.llm.route(command.model, reservation.preferred_model),
            )
            context = self._context()
            summary = self.reservation.memory.summary if self.reservation.memory else None
            seller_data = self._personalisation()
            self.messages = prompts.build_messages(
                command.message, [(m, r) for _, m, r in context], seller_data,
                config["CONTEXT_MAX_CHARS"], summary,
            )
            if config["ANSWER_CACHE"] and self.cache.configured and not (
                context or summary or seller_data
            ):
                # Nothing of the seller in the prompt: a common question.
                self.answer_key = answers.key(self.chain[0].name, self.seller.specs,
                                              command.message)
        except BaseException as error:
            self.abandon(error)
            raise
        self.model_by = time.monotonic() + self.command.deadline.budget(
            config["LLM_DEADLINE"], WRITE_RESERVE_SECONDS
        )
        self.watch.lap("context")
        return None

    @property
    def chain(self) -> list[Model]:
        """The models to try in turn (those that can take the seller's data)."""
        return self.seller.chain

    def _refused_by_cache(self) -> tuple[Usage, Day] | None:
        """The usage and day of a user Redis says is already at the limit, or
        None: PostgreSQL decides."""
        cached = cached_usage(self.view, self.day)
        if cached is None or cached[0].remaining != 0:
            return None
        return cached

    def _refuse_from_cache(self, refused: tuple[Usage, Day], admitted_until: float) -> Answer:
        """The 429 of a user Redis says is at the limit, with no statement
        unless the request has a key: a retry of an answered request gets its
        answer, limit or not. An unknown model (422) or none (503) comes first."""
        command = self.command
        if command.request_id:
            with sql.connection(wait_until=admitted_until) as conn:
                stored = idempotency.answer_of_key(
                    conn, command.telegram_id, command.request_id, command.message,
                    self.config["DAILY_LIMIT"], self.day.today,
                )
            if stored is not None:
                return self._replay(stored)
        self.llm.route(command.model)
        self.watch.lap("quota")
        usage, self.day = refused
        self._refuse(usage, "redis")

    def _context(self) -> list[tuple]:
        """The past exchanges (id, message, response), oldest first: Redis's
        copy when it holds exactly the user's newest exchanges (their ids came
        with the reservation), else what the reservation read (then copied to
        Redis); on SQLite, what statements of their own read, with the memory."""
        command, config = self.command, self.config
        cached, context = self.view.context, self.reservation.context
        newest = self.reservation.newest
        if context is None:  # SQLite: read after the reservation
            with sql.connection() as conn:
                if cached is None:
                    context = quota.recent_exchanges(
                        conn, command.telegram_id, config["CONTEXT_MESSAGES"]
                    )
                else:
                    newest = quota.recent_ids(conn, command.telegram_id,
                                              config["CONTEXT_MESSAGES"])
                if config["SUMMARY_ENABLED"]:
                    self.reservation = replace(self.reservation, memory=memory.read_memory(
                        conn, command.telegram_id, memory.fold_offset(config)
                    ))
        if cached is None:
            self.cache.write_context(command.telegram_id, self.view.gen, context)
            return context
        if [exchange[0] for exchange in reversed(cached)] == newest:
            return [tuple(exchange) for exchange in cached]
        # Redis's copy missed a change (an append skipped while this or
        # another process could not reach Redis): PostgreSQL's, and the copy
        # goes, so that the next send populates it afresh.
        self.cache.invalidate_user(command.telegram_id)
        with sql.connection() as conn:
            return quota.recent_exchanges(conn, command.telegram_id, config["CONTEXT_MESSAGES"])

    def _refuse(self, usage: Usage, by: str, spend: quota.Spend | None = None):
        """Raise the 429 of the daily limit or of the spend cap; ``by`` ("redis"
        or "postgresql") goes into the request's log line: which of the two
        knew the user was at the limit."""
        metrics.QUOTA_REJECTIONS.labels("spend" if spend else "daily").inc()
        annotate(outcome="spend_limit_exceeded" if spend else "limit_exceeded", refused_by=by)
        raise self._limit_exceeded(usage, spend)

    def claim_ttl(self) -> float:
        """A claim outlives the longest request (a stream), whatever the clocks
        of the instances say: only then is a taken-over claim really dead."""
        longest = max(self.config["REQUEST_DEADLINE"], self.config["STREAM_MAX_SECONDS"])
        return longest + self.config["LLM_DEADLINE"] + 30

    def llm_budget(self) -> float:
        """What is left of the model's time, every round and tool call
        included: LLM_DEADLINE from when the prompt was ready at most, and
        time left for the writes after it."""
        return max(0.0, self.model_by - time.monotonic())

    # --- the model and after ------------------------------------------------

    def model_rounds(self, ask, on_status: Callable[[dict], None] = lambda status: None):
        """Ask the model, running the seller-data tools it calls, round after
        round (TOOLS_MAX_ROUNDS at most), then once more without tools.

        ``ask(tools)`` calls the model on ``self.messages`` with the tools
        offered (None: none) and returns a Completion when the model asked
        for tools, else whatever its delivery needs (send: the Completion;
        stream: the open upstream). ``on_status`` gets each call's status
        (the stream's ``status`` events). Returns the last ``ask``'s result.

        Raises: the model's errors (the caller abandons the exchange).
        """
        for _ in range(self.seller.rounds):
            result = ask(self.seller.specs)
            if not (isinstance(result, Completion) and result.tool_calls):
                return result
            self.calls.append(spend.priced_call(
                self.config["LLM_PRICES"], "tool_round", result.model, result.tokens
            ))
            self.tokens += result.tokens
            budget = min(self.config["TOOL_TIMEOUT"], self.llm_budget())
            self.messages += self.seller.run_round(
                result.tool_calls, result.text or None, budget, on_status
            )
        return ask(None)

    def complete(self) -> Answer:
        """Ask the model for the whole answer (its tool rounds first), then save it."""
        try:
            completion = self.model_rounds(lambda tools: self.llm.complete(
                self.messages, self.chain, self.llm_budget(), tools
            ))
        except BaseException as error:
            self.abandon(error)
            raise
        self.watch.lap("llm")
        return self.finish(completion.text, completion.tokens, completion.model)

    def cached_answer(self) -> Answer | None:
        """The common answer to this question, saved as this seller's answer
        (a unit spent, no model call), or None: ask the model."""
        if self.answer_key is None:
            return None
        hit = answers.get(self.cache, self.answer_key)
        if hit is None:
            return None
        text, model = hit
        annotate(cached=True)
        return self.finish(text, Tokens(), model, cached=True)

    def finish(self, text: str, tokens: Tokens, model: str, cached: bool = False) -> Answer:
        """Save the answer (and complete the key, and record its model calls);
        the unit stays spent.

        An answer whose save fails after retries is still returned: the
        seller was charged for it and gets it; the missing row is logged.

        Raises:
            RequestInProgress: the claim was taken over while the model was
                answering; this answer is dropped and its unit given back.
        """
        command = self.command
        text = storable(text)
        # A cached answer is an answer too (the spend report counts it), at no cost.
        self.calls.append(
            records.Call("answer", model, 0, 0, Decimal(0)) if cached
            else spend.priced_call(self.config["LLM_PRICES"], "answer", model, tokens)
        )
        self.tokens += tokens
        values = {
            "telegram_id": command.telegram_id,
            "user_id": command.user_id,
            "message": command.message,
            "response": text,
            "tokens_used": self.tokens.total,
            "request_date": self.reservation.counted_on,
            "created_at": self.day.now,
            "model": model,
            "tools": ",".join(self.seller.used),
            "prompt_tokens": self.tokens.prompt,
            "completion_tokens": self.tokens.completion,
            "cost": spend.total_cost(self.calls),
        }
        try:
            saved = self._write(
                lambda conn: records.save_answer(
                    conn, values, self.calls, self.estimate, self.claim
                ),
                "save an answer",
            )
        except DATABASE_OUTAGE:
            log.error("answer delivered without its history row (database unavailable)")
            saved = 0  # no row: no id for Redis's copy of the context
        except Exception as error:
            self.abandon(error)
            raise
        if saved is None:
            log.warning("idempotency claim taken over while answering; answer dropped")
            self.claim = None  # not ours to release any more
            self.abandon(RequestInProgress())
            raise RequestInProgress()
        self._settled = True
        self.watch.lap("save")
        timings = self.watch.total()
        try:
            if saved:  # without its row, PostgreSQL's context lacks it too
                self.cache.append_context(command.telegram_id, self.view.gen,
                                          (saved, command.message, text),
                                          self.config["CONTEXT_MESSAGES"])
            if self.answer_key and not cached and not self.seller.used:
                answers.put(self.cache, self.answer_key, text, model,
                            self.config["ANSWER_CACHE_TTL"])
            for call in self.calls:
                spend.count_call(self.llm, call)
            for phase, ms in timings.items():
                metrics.PHASE_DURATION.labels(phase).observe(ms / 1000)
            annotate(outcome="answered", llm_ms=round(timings.get("llm", 0.0), 1),
                     tokens=self.tokens.total, model=model)
            if self.reservation.memory is not None and self.reservation.memory.fold_due_after_save:
                current_app.extensions["memory"].schedule(command.telegram_id)
        except Exception:  # bookkeeping never turns a saved, charged answer into an error
            log.exception("bookkeeping of a saved answer failed")
        usage = self.reservation.usage
        return Answer(text, self.tokens.total, model, usage, self.day, command.format, timings,
                      list(self.seller.used), cached)

    def abandon(self, error: BaseException) -> None:
        """Refund the unit and free the key of a request that got no answer."""
        if self._settled:
            return
        self._settled = True
        if not isinstance(error, ApiError):
            log.error("send failed after the reservation: %s", type(error).__name__)
        annotate(outcome=getattr(error, "code", "internal_error"))
        telegram_id, counted_on = self.command.telegram_id, self.reservation.counted_on

        def undo(conn):
            if self.claim is None:
                quota.refund(conn, telegram_id, counted_on, self.day.now, self.estimate)
                return
            with sql.transaction(conn):
                idempotency.release_key(conn, self.claim)
                quota.refund(conn, telegram_id, counted_on, self.day.now, self.estimate)

        try:
            self._write(undo, "refund a reserved unit")
            metrics.QUOTA_REFUNDS.inc()
        except Exception as failure:  # never hides the error being answered
            log.error("quota unit of telegram_id=%s not refunded (%s)", telegram_id,
                      type(failure).__name__)
        # Redis's count is one too high now: a refusal must never be served
        # from it after a refund.
        self.cache.invalidate_user(telegram_id)

    # --- helpers ------------------------------------------------------------

    def _write(self, action, what: str):
        """Run ``action(conn)``, riding out a database blip or a busy pool
        until the request's deadline (at least one attempt).

        Used for the writes that follow an answer or a failure: the model's
        work is done, and giving up at once would lose an answer or a refund
        because PostgreSQL restarted or every pooled connection was busy.
        """
        delay = 0.05
        while True:
            try:
                with sql.connection() as conn:
                    return action(conn)
            except DATABASE_OUTAGE:
                if self.command.deadline.remaining() < delay:
                    log.error("could not %s: database unavailable", what)
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    def _release_key(self) -> None:
        if self.claim is not None:
            claim, self.claim = self.claim, None
            try:
                self._write(lambda conn: idempotency.release_key(conn, claim), "release a key")
            except DATABASE_OUTAGE:
                log.error("idempotency key left claimed until it expires")

    def _replay(self, stored: idempotency.StoredAnswer) -> Answer:
        metrics.IDEMPOTENT_REPLAYS.inc()
        annotate(outcome="replayed")
        usage = Usage(stored.daily_limit, stored.used_today)
        return Answer(
            stored.response, stored.tokens_used, stored.model, usage, self.day,
            self.command.format, tools=stored.tools,
        )

    def _limit_exceeded(self, usage: Usage, spend: quota.Spend | None) -> ApiError:
        """The 429 of the daily limit or, same fields and headers, of the spend cap."""
        headers = rate_limit_headers(usage, self.day)
        headers["Retry-After"] = str(self.day.seconds_left)
        fields = {
            "daily_limit": usage.limit,
            "requests_today": usage.used,
            "requests_remaining": 0,
            "reset_at": self.day.reset_at.isoformat(),
        }
        if spend is None:
            return DailyLimitExceeded(headers=headers, **fields)
        return DailySpendLimitExceeded(
            headers=headers, **fields, daily_spend_limit=float(spend.limit),
            spend_today=float(spend.spent),
        )

    def _personalisation(self) -> str | None:
        """The seller's data given with the question: the request's own
        context ("" = none), else the USER_CONTEXT_URL fetch, else, for a model
        that gets no tools, the main server's dashboard."""
        command = self.command
        if command.user_context is not None:
            return command.user_context or None
        config = self.config
        budget = command.deadline.budget(config["USER_CONTEXT_TIMEOUT"], WRITE_RESERVE_SECONDS)
        if not config["USER_CONTEXT_URL"]:
            return self.seller.dashboard(budget)
        text, outcome = fetch_user_context(
            config["USER_CONTEXT_URL"], command.telegram_id, config["USER_CONTEXT_API_KEY"],
            budget,
        )
        metrics.USER_CONTEXT_FETCHES.labels(outcome).inc()
        return text
