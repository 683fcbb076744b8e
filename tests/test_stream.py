"""POST /v1/chat/stream: the send use case delivered as Server-Sent Events.

Every stream is read over real HTTP as it arrives (httpx2, one client per
stream, each event stamped with the time it was read), from the in-process
threaded server and, for the order of events and a client that goes away,
from real gunicorn with the project's gthread worker, as production runs it.
Assertions are on what the client read (status, headers, events), on the rows
and counters in PostgreSQL, and on what the fake LLM was asked and saw (its
calls, the upstream streams it saw closed).
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import httpx2
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.render import render
from tests.conftest import API_KEY, base_env, exchange_count, request_count, served
from tests.fake_llm import hang, status, stream_break, stream_error, stream_hang, stream_ok
from tests.servers import Gunicorn
from tests.telegram_html import check

MESSAGE = "Как поднять продажи?"
MODEL = "wb-stream-model"
# Markdown the way a model writes it: a heading, bold, a list, inline code, a
# fence with < and &, a link whose URL has &, and a ** never closed. Cut into
# 25 pieces, the prefixes end inside every kind of markup.
ANSWER = (
    "## План на неделю\n\n"
    "Поднимите **рейтинг карточки**, если цена < 500 ₽ & скидка выше 10%.\n\n"
    "1. Обновите фото\n"
    "2. Ответьте на `отзывы` покупателей\n\n"
    "```python\n"
    "if price < 500 and stock & 1:\n"
    "    print('<ok>')\n"
    "```\n\n"
    "Отчёт: [аналитика](https://seller.wildberries.ru/a?tab=1&period=30). "
    "**Незакрытая звёздочка остаётся текстом.\n"
)
PIECES = 25
TOKENS = 77
# The settings every streaming server of this module runs with: keep-alives
# and snapshots often enough for a client that goes away to be noticed fast,
# and model timeouts far beyond every wait of a test, so that a silent model's
# stream ends only when the client goes away (tests of the timeouts set them).
STREAM_ENV = {
    "OPENAI_MODEL": MODEL,
    "OPENAI_TIMEOUT": "30",
    "LLM_DEADLINE": "30",
    "STREAM_KEEPALIVE_SECONDS": "0.2",
    "STREAM_SNAPSHOT_INTERVAL": "0.05",
}
# Generous: two cores are shared with other test runs.
DEADLINE = 15



# --- an SSE client ----------------------------------------------------------------


def loopback_client() -> httpx2.Client:
    """A client for plain HTTP on loopback: no CA bundle to load (~0.1 s of CPU
    each), no proxy from the environment."""
    return httpx2.Client(timeout=30, verify=False, trust_env=False)


@dataclass(frozen=True)
class Event:
    """One server-sent event; a ``: comment`` line is an event named "comment"."""

    name: str
    data: Any  # the event's JSON data, or the comment's text
    at: float  # time.monotonic() when the client read it


@dataclass
class Reading:
    """Everything a client read from one POST /v1/chat/stream."""

    status: int
    headers: httpx2.Headers
    events: list[Event] = field(default_factory=list)
    body: Any = None  # the JSON body of an answer that is not an event stream

    def named(self, name: str) -> list[Event]:
        return [event for event in self.events if event.name == name]

    def names(self) -> list[str]:
        """Event names in order, comments left out."""
        return [event.name for event in self.events if event.name != "comment"]

    def text(self) -> str:
        """The deltas joined: the model's text as the client received it."""
        return "".join(event.data["text"] for event in self.named("delta"))

    def last(self) -> Event:
        return [event for event in self.events if event.name != "comment"][-1]


class EventStream:
    """One POST /v1/chat/stream, read as it arrives.

    Usage: ``with EventStream(url, telegram_id=1) as stream: for event in stream.events()``.
    Leaving the block early closes the connection: the client went away.
    """

    def __init__(self, base_url: str, *, telegram_id=1, message=MESSAGE, headers=None, **fields):
        self._client = loopback_client()
        self._context = self._client.stream(
            "POST",
            f"{base_url}/v1/chat/stream",
            json={"telegram_id": telegram_id, "message": message, **fields},
            headers={"X-API-KEY": API_KEY, **(headers or {})},
        )
        self.response: httpx2.Response | None = None

    def __enter__(self) -> EventStream:
        try:
            self.response = self._context.__enter__()
        except BaseException:
            self._client.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._context.__exit__(*exc)
        finally:
            self._client.close()

    @property
    def is_event_stream(self) -> bool:
        return self.response.headers.get("content-type", "").startswith("text/event-stream")

    def events(self) -> Iterator[Event]:
        name, data = None, []
        for line in self.response.iter_lines():
            if line.startswith(":"):
                yield Event("comment", line[1:].strip(), time.monotonic())
            elif line.startswith("event:"):
                name = line.removeprefix("event:").strip()
            elif line.startswith("data:"):
                data.append(line.removeprefix("data:").removeprefix(" "))
            elif not line and name is not None:
                yield Event(name, json.loads("\n".join(data)), time.monotonic())
                name, data = None, []


def read_stream(base_url: str, **kwargs) -> Reading:
    """Read one stream to its end (or the JSON answer given instead of a stream)."""
    with EventStream(base_url, **kwargs) as stream:
        reading = Reading(stream.response.status_code, stream.response.headers)
        if stream.is_event_stream:
            reading.events = list(stream.events())
        else:
            reading.body = json.loads(stream.response.read())
        return reading


def read_keep_alives_then_leave(base_url: str, count: int, **kwargs) -> None:
    """Read ``count`` keep-alive comments (no token yet), then close the connection."""
    with EventStream(base_url, **kwargs) as stream:
        assert stream.response.status_code == 200
        seen = 0
        for event in stream.events():
            assert event.name == "comment", event
            seen += 1
            if seen == count:
                return
    raise AssertionError("the stream ended during the model's silence")


def upstream_calls_abandoned(fake) -> int:
    """Calls whose client (the service) closed the connection before the fake was done:
    streams cut after their head, and requests left before any answer."""
    return fake.streams_abandoned + fake.requests_abandoned


def read_until_first_delta_then_leave(base_url: str, **kwargs) -> list[Event]:
    """Read up to the first delta, then close the connection (the client goes away)."""
    with EventStream(base_url, **kwargs) as stream:
        assert stream.response.status_code == 200
        read = []
        for event in stream.events():
            read.append(event)
            if event.name == "delta":
                return read
    raise AssertionError(f"the stream ended before its first delta: {read}")


def post_json(base_url: str, path: str, body, headers=None) -> tuple[int, str, Any]:
    """A plain POST: (status, content type, JSON body)."""
    with loopback_client() as client:
        response = client.post(
            f"{base_url}{path}", json=body, headers={"X-API-KEY": API_KEY, **(headers or {})}
        )
        return response.status_code, response.headers.get("content-type", ""), response.json()


def stored_rows(sql, telegram_id: int = 1) -> list[tuple]:
    return sql(
        "SELECT message, response, tokens_used, model FROM ai_chat_requests "
        "WHERE telegram_id = %s ORDER BY id",
        (telegram_id,),
    )


def refunded_and_nothing_stored(sql, telegram_id: int = 1) -> bool:
    return request_count(sql, telegram_id) == 0 and exchange_count(sql, telegram_id) == 0


def fake_pieces(text: str, pieces: int) -> list[str]:
    """How the fake cuts ``text`` into ``pieces`` (equal slices)."""
    length = len(text)
    return [text[i * length // pieces : (i + 1) * length // pieces] for i in range(pieces)]


def the_answer(**overrides) -> dict:
    """ANSWER streamed in PIECES pieces, ~20 ms apart, with TOKENS of usage."""
    return stream_ok(ANSWER, pieces=PIECES, chunk_delay=0.02, tokens=TOKENS, **overrides)


# --- servers ----------------------------------------------------------------------


@pytest.fixture
def serve(make_app):
    """Serve an app built from env-style overrides (on top of STREAM_ENV) on a
    threaded loopback server: ``serve(DAILY_LIMIT="1")`` → base URL."""
    with ExitStack() as stack:
        yield lambda **overrides: stack.enter_context(
            served(make_app(**{**STREAM_ENV, **overrides}))
        )


@pytest.fixture(scope="module")
def gunicorn(database_url, _fake_llm_server, tmp_path_factory):
    """The service under real gunicorn (gthread worker), with STREAM_ENV."""
    env = {**base_env(database_url, _fake_llm_server.url), **STREAM_ENV}
    with Gunicorn(env, workers=1, threads=4, log_dir=tmp_path_factory.mktemp("gunicorn")) as server:
        yield server


@pytest.fixture(params=["threaded", "gunicorn"])
def base_url(request, serve):
    """The same streaming service in-process and under real gunicorn."""
    if request.param == "gunicorn":
        return request.getfixturevalue("gunicorn").url
    return serve()


# --- the answer, in order ---------------------------------------------------------


def test_deltas_join_to_exactly_the_models_text(base_url, fake_llm):
    fake_llm.script(the_answer())

    reading = read_stream(base_url)

    assert reading.status == 200
    assert reading.text() == ANSWER
    # Pieces that arrive together may share a delta; more deltas than pieces is a bug.
    assert 2 <= len(reading.named("delta")) <= PIECES


def test_done_is_the_last_event_and_comes_once(base_url, fake_llm):
    fake_llm.script(the_answer())

    names = read_stream(base_url).names()

    assert names[0] == "delta"
    assert names[-1] == "done"
    assert names.count("done") == 1
    assert set(names[:-1]) == {"delta", "snapshot"}


def test_the_exchange_is_stored_with_the_raw_text_when_done_is_read(base_url, fake_llm, sql):
    fake_llm.script(the_answer())
    rows_at_done = None

    with EventStream(base_url) as stream:
        for event in stream.events():
            if event.name == "done":
                rows_at_done = stored_rows(sql)

    assert rows_at_done == [(MESSAGE, ANSWER, TOKENS, MODEL)]
    assert request_count(sql) == 1


def test_done_equals_what_send_answers_for_the_same_answer(serve, fake_llm):
    url = serve()
    fake_llm.script(the_answer(), the_answer())

    done = read_stream(url, telegram_id=1).last()
    status_code, _, sent = post_json(url, "/v1/chat/send", {"telegram_id": 2, "message": MESSAGE})

    assert done.name == "done"
    assert status_code == 200
    assert done.data == sent


def test_done_reports_the_providers_tokens_the_model_and_the_quota(serve, fake_llm):
    fake_llm.script(the_answer())

    done = read_stream(serve()).last().data

    assert done["tokens_used"] == TOKENS
    assert done["model"] == MODEL
    assert fake_llm.models == [MODEL]
    assert (done["remaining_requests"], done["daily_limit"]) == (29, 30)
    assert done["response"] == render(ANSWER, "telegram_html").text


def test_tokens_used_is_zero_when_the_provider_sends_no_usage(serve, fake_llm, sql):
    fake_llm.script(stream_ok(ANSWER, pieces=PIECES, usage=False))

    done = read_stream(serve()).last()

    assert done.name == "done"
    assert done.data["tokens_used"] == 0
    assert stored_rows(sql) == [(MESSAGE, ANSWER, 0, MODEL)]


def test_stream_answers_with_event_stream_headers(serve, fake_llm):
    fake_llm.script(the_answer())

    headers = read_stream(serve()).headers

    assert headers["Content-Type"].split(";")[0] == "text/event-stream"
    assert headers["Cache-Control"] == "no-cache"
    assert headers["X-Accel-Buffering"] == "no"


def test_stream_carries_rate_limit_headers_counting_the_unit_it_holds(serve, fake_llm):
    fake_llm.script(the_answer())

    reading = read_stream(serve())

    assert reading.headers["RateLimit-Policy"] == '"daily";q=30;w=86400'
    assert reading.headers["RateLimit"].startswith('"daily";r=29;t=')
    assert reading.last().data["remaining_requests"] == 29


# --- snapshots ----------------------------------------------------------------------


def test_every_snapshot_is_valid_telegram_html_whole_and_in_parts(serve, fake_llm):
    fake_llm.script(the_answer())

    snapshots = read_stream(serve()).named("snapshot")

    assert len(snapshots) >= 3
    for snapshot in snapshots:
        check(snapshot.data["text"])
        assert snapshot.data["parts"]
        for part in snapshot.data["parts"]:
            check(part)


@pytest.mark.parametrize("fmt", ["telegram_html", "markdown", "plain"])
def test_each_snapshot_is_the_text_so_far_in_the_requests_format(serve, fake_llm, fmt):
    fake_llm.script(the_answer())
    so_far = []
    checked = 0

    for event in read_stream(serve(), format=fmt).events:
        if event.name == "delta":
            so_far.append(event.data["text"])
        elif event.name == "snapshot":
            expected = render("".join(so_far), fmt)
            assert event.data == {"text": expected.text, "parts": list(expected.parts)}
            checked += 1

    assert checked >= 3


def test_snapshots_come_at_most_once_per_interval(serve, fake_llm):
    interval = 0.3
    # 40 pieces over ~1.2 s: without the interval a snapshot would follow each piece.
    fake_llm.script(stream_ok(ANSWER, pieces=40, chunk_delay=0.03))

    reading = read_stream(serve(STREAM_SNAPSHOT_INTERVAL=str(interval)))

    times = [event.at for event in reading.named("snapshot")]
    assert reading.last().name == "done"
    assert 2 <= len(times) < len(reading.named("delta")) / 3
    gaps = [later - earlier for earlier, later in zip(times, times[1:], strict=False)]
    # Read times, not write times: a snapshot read late (a busy machine) shortens
    # one gap, hence the tolerance; a snapshot per piece would be 0.03 s apart.
    assert min(gaps) >= interval / 2, gaps


# --- keep-alive ---------------------------------------------------------------------


def test_keep_alive_comments_flow_while_the_model_is_silent_before_its_first_token(
    serve, fake_llm
):
    fake_llm.script(stream_ok(ANSWER, pieces=3, first_token_delay=1.0))

    reading = read_stream(serve())

    first_delta = next(i for i, event in enumerate(reading.events) if event.name == "delta")
    before = reading.events[:first_delta]
    assert len(before) >= 2
    assert all(event.name == "comment" and event.data == "keep-alive" for event in before)
    assert reading.last().name == "done"


def test_keep_alive_comments_flow_while_the_model_is_silent_between_tokens(serve, fake_llm):
    fake_llm.script(stream_ok(chunks=["Первая часть. ", "Вторая часть."], chunk_delay=1.0))

    reading = read_stream(serve())

    deltas = [i for i, event in enumerate(reading.events) if event.name == "delta"]
    between = [event.name for event in reading.events[deltas[0] : deltas[1]]]
    assert between.count("comment") >= 2
    assert reading.text() == "Первая часть. Вторая часть."


# --- refused before the stream: JSON, exactly as send ---------------------------------


@pytest.mark.parametrize(
    ("overrides", "body", "headers", "expected_status"),
    [
        ({}, {"telegram_id": 1, "message": MESSAGE}, {"X-API-KEY": "wrong"}, 403),
        ({}, [1, 2], None, 400),
        ({"MAX_CONTENT_LENGTH": "1024"}, {"telegram_id": 1, "message": "ы" * 2000}, None, 413),
        ({}, {"telegram_id": 1, "message": MESSAGE, "format": "html"}, None, 422),
        ({}, {"telegram_id": 1, "message": MESSAGE, "model": "gpt-nonexistent"}, None, 422),
        ({}, {"telegram_id": 1, "message": ""}, None, 422),
        ({"OPENAI_BASE_URL": ""}, {"telegram_id": 1, "message": MESSAGE}, None, 503),
    ],
    ids=[
        "wrong-key", "not-an-object", "too-large", "unknown-format", "unknown-model",
        "blank-message", "llm-not-configured",
    ],
)
def test_refusal_before_the_model_is_json_exactly_as_send_answers(
    serve, fake_llm, sql, overrides, body, headers, expected_status
):
    url = serve(**overrides)

    streamed = post_json(url, "/v1/chat/stream", body, headers)
    sent = post_json(url, "/v1/chat/send", body, headers)

    assert streamed[0] == expected_status
    assert streamed[1].startswith("application/json")
    assert streamed == sent
    assert fake_llm.calls == 0
    assert request_count(sql) == 0


def test_quota_used_up_is_a_429_json_answer_with_detail_not_a_stream(serve, fake_llm, sql):
    url = serve(DAILY_LIMIT="1")
    fake_llm.script(the_answer())
    assert read_stream(url).last().name == "done"

    reading = read_stream(url)

    assert reading.status == 429
    assert reading.headers["content-type"].startswith("application/json")
    assert reading.body["error"] == "daily_limit_exceeded"
    assert reading.body["detail"]["message"] == reading.body["message"]
    assert (reading.body["daily_limit"], reading.body["requests_remaining"]) == (1, 0)
    assert fake_llm.calls == 1
    assert request_count(sql) == 1


def test_request_id_still_being_answered_is_a_409_json_answer_as_send_gives(serve, fake_llm):
    url = serve()
    fake_llm.script(the_answer(first_token_delay=1.0))
    body = {"telegram_id": 1, "message": MESSAGE, "request_id": "r-busy"}

    with EventStream(url, request_id="r-busy") as first:  # claimed: its head has come
        streamed = post_json(url, "/v1/chat/stream", body)
        sent = post_json(url, "/v1/chat/send", body)
        first_ended_with = [event.name for event in first.events()][-1]

    assert streamed[0] == 409
    assert streamed[1].startswith("application/json")
    assert streamed[2]["error"] == "request_in_progress"
    assert streamed == sent
    assert first_ended_with == "done"
    assert fake_llm.calls == 1


def test_quota_used_up_answers_the_same_429_body_as_send(serve, fake_llm):
    url = serve(DAILY_LIMIT="1")
    fake_llm.script(the_answer())
    read_stream(url)
    body = {"telegram_id": 1, "message": MESSAGE}

    assert post_json(url, "/v1/chat/stream", body) == post_json(url, "/v1/chat/send", body)


# --- the model fails after the stream began ---------------------------------------


def test_model_breaking_mid_stream_ends_with_llm_unavailable_and_a_refund(serve, fake_llm, sql):
    fake_llm.script(stream_break(after=3, text=ANSWER, pieces=PIECES))

    reading = read_stream(serve())

    assert reading.status == 200
    assert reading.text() == "".join(fake_pieces(ANSWER, PIECES)[:3])
    assert reading.last().name == "error"
    assert reading.last().data["error"] == "llm_unavailable"
    assert reading.last().data["message"]
    assert "done" not in reading.names()
    assert refunded_and_nothing_stored(sql)


def test_model_reporting_an_error_mid_stream_ends_with_an_error_event_and_a_refund(
    serve, fake_llm, sql
):
    fake_llm.script(stream_error(after=3, text=ANSWER, pieces=PIECES))

    reading = read_stream(serve())

    assert reading.status == 200
    assert reading.last().name == "error"
    assert reading.last().data["error"] == "llm_unavailable"
    assert refunded_and_nothing_stored(sql)


@pytest.mark.parametrize("unstorable", ["\ud800", "\x00"], ids=["lone-surrogate", "nul"])
def test_text_the_database_cannot_store_is_cleaned_in_snapshots_as_in_deltas_and_done(
    serve, fake_llm, sql, unstorable
):
    fake_llm.script(stream_ok(chunks=["Ответ ", unstorable, " конец"], chunk_delay=0.1))

    reading = read_stream(serve())

    assert reading.last().name == "done"
    cleaned = reading.text()
    assert unstorable not in cleaned
    for snapshot in reading.named("snapshot"):
        assert unstorable not in snapshot.data["text"]
    assert stored_rows(sql)[0][1] == cleaned


def test_blank_answer_is_an_error_event_and_a_refund_as_send_refuses_it(serve, fake_llm, sql):
    fake_llm.script(stream_ok(chunks=["   ", "\n "]))

    reading = read_stream(serve(OPENAI_MAX_RETRIES="0"))

    assert reading.last().name == "error"
    assert reading.last().data["error"] == "llm_unavailable"
    assert refunded_and_nothing_stored(sql)


def test_blank_answer_is_refused_by_send(serve, fake_llm, sql):
    fake_llm.script(stream_ok(chunks=["   ", "\n "]))

    status_code, _, body = post_json(
        serve(OPENAI_MAX_RETRIES="0"), "/v1/chat/send", {"telegram_id": 1, "message": MESSAGE}
    )

    assert (status_code, body["error"]) == (502, "llm_unavailable")
    assert refunded_and_nothing_stored(sql)


def test_model_failing_before_its_first_token_is_an_error_event_after_200(serve, fake_llm, sql):
    fake_llm.script(status(500))

    reading = read_stream(serve(OPENAI_MAX_RETRIES="0"))

    assert reading.status == 200
    assert reading.names() == ["error"]
    assert reading.last().data["error"] == "llm_unavailable"
    assert fake_llm.calls == 1
    assert refunded_and_nothing_stored(sql)


@pytest.mark.parametrize(
    "step", [stream_hang(after=0), hang()], ids=["stream-hang", "no-headers"]
)
def test_no_first_token_within_llm_deadline_is_llm_timeout_and_a_refund(
    serve, fake_llm, sql, step
):
    fake_llm.script(step)
    started = time.monotonic()

    reading = read_stream(serve(LLM_DEADLINE="1", OPENAI_TIMEOUT="10", OPENAI_MAX_RETRIES="0"))

    assert reading.status == 200
    assert reading.names() == ["error"]
    assert reading.last().data["error"] == "llm_timeout"
    # Bound by LLM_DEADLINE (1 s), far below OPENAI_TIMEOUT (10 s).
    assert time.monotonic() - started < 6
    assert refunded_and_nothing_stored(sql)


@pytest.mark.parametrize(
    "step",
    [
        pytest.param(stream_hang(after=0), id="head-sent"),
        pytest.param(hang(), id="no-head-yet"),
    ],
)
def test_no_first_token_within_llm_deadline_closes_the_upstream_call(serve, fake_llm, step):
    fake_llm.script(step)

    reading = read_stream(serve(LLM_DEADLINE="1", OPENAI_TIMEOUT="10", OPENAI_MAX_RETRIES="0"))

    assert reading.last().data["error"] == "llm_timeout"
    # Well before OPENAI_TIMEOUT (10 s) would end the call by itself.
    assert fake_llm.wait_for(lambda: upstream_calls_abandoned(fake_llm) == 1, timeout=3)


def test_silence_after_the_first_token_longer_than_openai_timeout_is_llm_timeout(
    serve, fake_llm, sql
):
    fake_llm.script(stream_hang(after=2, text=ANSWER, pieces=PIECES))

    reading = read_stream(serve(OPENAI_TIMEOUT="0.5"))

    assert reading.text() == "".join(fake_pieces(ANSWER, PIECES)[:2])
    assert reading.last().name == "error"
    assert reading.last().data["error"] == "llm_timeout"
    assert refunded_and_nothing_stored(sql)
    assert fake_llm.wait_for(lambda: fake_llm.streams_abandoned == 1, timeout=DEADLINE)


def test_stream_longer_than_stream_max_seconds_ends_with_llm_timeout(serve, fake_llm, sql):
    # 60 pieces, 0.1 s apart: six seconds of answer against a one-second stream.
    fake_llm.script(stream_ok(ANSWER, pieces=60, chunk_delay=0.1))

    reading = read_stream(serve(STREAM_MAX_SECONDS="1"))

    assert reading.named("delta")
    assert reading.last().name == "error"
    assert reading.last().data["error"] == "llm_timeout"
    assert refunded_and_nothing_stored(sql)
    assert fake_llm.wait_for(lambda: fake_llm.streams_abandoned == 1, timeout=DEADLINE)


# --- the client goes away -------------------------------------------------------------


@pytest.mark.parametrize(
    "step",
    [
        stream_hang(after=1, text=ANSWER, pieces=PIECES),
        stream_ok(ANSWER, pieces=PIECES, chunk_delay=0.2),
    ],
    ids=["model-silent", "model-writing"],
)
def test_client_gone_mid_stream_refunds_stores_nothing_and_closes_upstream(
    base_url, fake_llm, sql, step
):
    fake_llm.script(step)

    read_until_first_delta_then_leave(base_url)

    assert fake_llm.wait_for(lambda: fake_llm.streams_abandoned == 1, timeout=DEADLINE)
    assert fake_llm.wait_for(lambda: refunded_and_nothing_stored(sql), timeout=DEADLINE)
    assert fake_llm.streams_completed == 0


@pytest.mark.parametrize(
    "step",
    [
        pytest.param(stream_ok(ANSWER, pieces=PIECES, first_token_delay=6.0), id="head-sent"),
    ],
)
def test_client_gone_before_the_first_token_closes_the_upstream_call_at_once(
    serve, fake_llm, sql, step
):
    fake_llm.script(step)

    read_keep_alives_then_leave(serve(OPENAI_MAX_RETRIES="0"), 2)

    assert fake_llm.wait_for(lambda: refunded_and_nothing_stored(sql), timeout=DEADLINE)
    # Well before the model's first token (or its answer) at 6 s.
    assert fake_llm.wait_for(lambda: upstream_calls_abandoned(fake_llm) == 1, timeout=3)


def test_client_gone_before_the_provider_answered_frees_the_call_by_the_first_token_deadline(
    serve, fake_llm, sql
):
    # Until a provider answers, its call has no connection the service can shut: the
    # call's own timeout, cut to the first-token budget (2 s here), ends it instead.
    fake_llm.script(status(503, delay=6.0))

    read_keep_alives_then_leave(serve(OPENAI_MAX_RETRIES="0", LLM_DEADLINE="2"), 2)

    assert fake_llm.wait_for(lambda: refunded_and_nothing_stored(sql), timeout=DEADLINE)
    # Before the provider's answer at 6 s.
    assert fake_llm.wait_for(lambda: upstream_calls_abandoned(fake_llm) == 1, timeout=4.5)


def test_retry_of_a_stream_the_client_left_answers_afresh(serve, fake_llm, sql):
    url = serve()
    fake_llm.script(stream_hang(after=1, text=ANSWER, pieces=PIECES), the_answer())
    read_until_first_delta_then_leave(url, request_id="r-left")
    assert fake_llm.wait_for(lambda: refunded_and_nothing_stored(sql), timeout=DEADLINE)

    reading = read_stream(url, request_id="r-left")

    assert reading.last().name == "done"
    assert reading.text() == ANSWER
    assert fake_llm.calls == 2
    assert stored_rows(sql) == [(MESSAGE, ANSWER, TOKENS, MODEL)]


# --- replay ---------------------------------------------------------------------------


@pytest.mark.parametrize("first_by", ["stream", "send"])
def test_replayed_request_id_streams_the_stored_answer_without_the_model(
    serve, fake_llm, sql, first_by
):
    url = serve()
    fake_llm.script(the_answer())
    if first_by == "stream":
        assert read_stream(url, request_id="r-1").last().name == "done"
    else:
        body = {"telegram_id": 1, "message": MESSAGE, "request_id": "r-1"}
        assert post_json(url, "/v1/chat/send", body)[0] == 200

    reading = read_stream(url, request_id="r-1", format="markdown")

    assert reading.names() == ["delta", "snapshot", "done"]
    assert reading.text() == ANSWER
    markdown = render(ANSWER, "markdown")
    assert reading.named("snapshot")[0].data == {
        "text": markdown.text, "parts": list(markdown.parts)
    }
    assert reading.last().data["response"] == ANSWER
    assert reading.last().data["tokens_used"] == TOKENS
    assert fake_llm.calls == 1
    assert request_count(sql) == 1
    assert exchange_count(sql) == 1


# --- many streams of one user -------------------------------------------------------------


@pytest.fixture
def fifty_streams_at_once(serve, fake_llm) -> list[Reading]:
    """50 simultaneous streams of user 1 against DAILY_LIMIT=30."""
    url = serve(DAILY_LIMIT="30")
    fake_llm.latency = 0.2  # keep the answered streams in flight together
    barrier = threading.Barrier(50)

    def one(_):
        barrier.wait(timeout=DEADLINE)
        return read_stream(url)

    with ThreadPoolExecutor(max_workers=50) as pool:
        return list(pool.map(one, range(50)))


def test_fifty_concurrent_streams_give_exactly_the_daily_limit_of_answers(
    fifty_streams_at_once,
):
    outcomes = Counter(
        (reading.status, reading.last().name if reading.status == 200 else reading.body["error"])
        for reading in fifty_streams_at_once
    )

    assert outcomes == {(200, "done"): 30, (429, "daily_limit_exceeded"): 20}


def test_fifty_concurrent_streams_refused_ones_are_json(fifty_streams_at_once):
    refused = [reading for reading in fifty_streams_at_once if reading.status == 429]

    assert refused
    for reading in refused:
        assert reading.headers["content-type"].startswith("application/json")
        assert reading.events == []


def test_fifty_concurrent_streams_count_store_and_call_the_model_once_per_answer(
    fifty_streams_at_once, fake_llm, sql
):
    assert request_count(sql) == 30
    assert exchange_count(sql) == 30
    assert fake_llm.calls == 30


# --- metrics ----------------------------------------------------------------------------


def scrape(url: str) -> dict[tuple, float]:
    """The stream samples of /metrics: (name, outcome label) → value."""
    with loopback_client() as client:
        response = client.get(f"{url}/metrics")
    assert response.status_code == 200
    return {
        (sample.name, sample.labels.get("outcome")): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
        if sample.name.startswith(("ai_chat_stream", "ai_chat_streams"))
    }


def streams_in_flight(url: str) -> float:
    return scrape(url).get(("ai_chat_streams_in_flight", None), 0.0)


def test_stream_metrics_count_outcomes_first_tokens_and_streams_in_flight(
    serve, fake_llm, sql
):
    url = serve()
    # Streams of earlier tests may still be ending in this process.
    assert fake_llm.wait_for(lambda: streams_in_flight(url) == 0, timeout=DEADLINE)
    before = scrape(url)
    fake_llm.script(
        the_answer(),
        stream_break(after=1, text=ANSWER, pieces=PIECES),
        stream_hang(after=1, text=ANSWER, pieces=PIECES),
    )

    assert read_stream(url).last().name == "done"
    assert read_stream(url).last().name == "error"
    read_until_first_delta_then_leave(url)
    assert fake_llm.wait_for(lambda: streams_in_flight(url) == 0, timeout=DEADLINE)
    after = scrape(url)

    def added(name, outcome=None):
        return after.get((name, outcome), 0.0) - before.get((name, outcome), 0.0)

    assert added("ai_chat_streams_total", "done") == 1
    assert added("ai_chat_streams_total", "error") == 1
    assert added("ai_chat_streams_total", "client_gone") == 1
    assert added("ai_chat_stream_first_token_seconds_count") == 3


# --- line separators inside the text (U+2028, U+2029, U+0085) ----------------------

# Characters that str.splitlines (and so httpx's and aiohttp's line readers)
# takes for line breaks, while JSON allows them raw inside strings.
SEPARATED = ["Первая строка\u2028вторая", " строка\u2029новый абзац", "\x85и конец."]
SEPARATORS_UTF8 = ("\u2028".encode(), "\u2029".encode(), "\x85".encode())


def raw_stream(base_url: str, **fields) -> bytes:
    """The bytes of one POST /v1/chat/stream, as they came."""
    with loopback_client() as client:
        response = client.post(
            f"{base_url}/v1/chat/stream",
            json={"telegram_id": 1, "message": MESSAGE, **fields},
            headers={"X-API-KEY": API_KEY},
        )
        return response.content


def test_provider_writing_line_separators_raw_in_its_json_streams_to_done(serve, fake_llm, sql):
    """The provider's SSE is split at LF only: its data lines stay whole."""
    fake_llm.script(stream_ok(chunks=SEPARATED, tokens=9))

    reading = read_stream(serve())

    assert reading.last().name == "done"
    assert reading.text() == "".join(SEPARATED)
    assert stored_rows(sql) == [(MESSAGE, "".join(SEPARATED), 9, MODEL)]


@pytest.mark.parametrize("replayed", [False, True], ids=["answered", "replayed"])
def test_our_events_never_carry_a_line_separator_raw(serve, fake_llm, replayed):
    """A bot reading lines the str.splitlines way (httpx's aiter_lines, as in
    docs/API.md) gets every event whole, done included, on a replay too."""
    url = serve()
    fake_llm.script(stream_ok(chunks=SEPARATED))
    if replayed:
        assert read_stream(url, request_id="sep-1").last().name == "done"

    raw = raw_stream(url, request_id="sep-1", format="markdown")
    reading = read_stream(url, request_id="sep-1", format="markdown")

    assert not any(separator in raw for separator in SEPARATORS_UTF8)
    assert reading.last().name == "done"
    assert reading.text() == "".join(SEPARATED)
    assert reading.last().data["response"] == "".join(SEPARATED)
    assert fake_llm.calls == 1


# --- the client leaves before the first token ------------------------------------------


def test_clients_leaving_before_the_first_token_never_open_a_healthy_providers_breaker(
    serve, fake_llm, sql
):
    """Our own abort of the upstream call is not the provider's failure: no
    retry, no breaker count; the next stream is answered by the same provider."""
    url = serve(OPENAI_MAX_RETRIES="2", LLM_BREAKER_FAILURES="2")
    before = llm_request_outcomes(url)
    for left in range(1, 4):
        fake_llm.script(stream_ok(ANSWER, pieces=PIECES, first_token_delay=6.0))
        read_keep_alives_then_leave(url, 2)
        assert fake_llm.wait_for(lambda: refunded_and_nothing_stored(sql), timeout=DEADLINE)
        assert fake_llm.wait_for(
            lambda n=left: upstream_calls_abandoned(fake_llm) == n, timeout=DEADLINE
        )
        time.sleep(0.3)  # room for a retry, if one were (wrongly) made
        assert fake_llm.calls == left

    fake_llm.script(the_answer())
    reading = read_stream(url)

    assert reading.last().name == "done"
    assert fake_llm.calls == 4
    after = llm_request_outcomes(url)
    counted = {outcome: after[outcome] - before.get(outcome, 0) for outcome in after}
    assert counted.get("cancelled") == 3
    assert counted.get("unavailable", 0) == 0
    assert counted.get("ok") == 1


def llm_request_outcomes(url: str) -> dict[str, float]:
    """ai_chat_llm_requests_total of MODEL by outcome, as /metrics says now."""
    return {
        sample.labels["outcome"]: sample.value
        for family in text_string_to_metric_families(
            httpx2.get(f"{url}/metrics", trust_env=False).text
        )
        if family.name == "ai_chat_llm_requests"
        for sample in family.samples
        if sample.name == "ai_chat_llm_requests_total" and sample.labels["model"] == MODEL
    }


# --- a late retry leaves OPENAI_TIMEOUT to every silence ---------------------------------


def test_silences_after_a_late_retry_are_bound_by_openai_timeout_not_the_leftover_budget(
    serve, fake_llm, sql
):
    """After a retry that started with 1 s of the first-token budget left,
    pauses of 2 s between pieces (under OPENAI_TIMEOUT = 3 s) are a normal stream."""
    url = serve(OPENAI_TIMEOUT="3", LLM_DEADLINE="3.5", OPENAI_MAX_RETRIES="1",
                OPENAI_RETRY_BASE_DELAY="0.01")
    pieces = ["Сначала ", "подумаем, ", "потом ответим."]
    fake_llm.script(status(500, delay=2.5), stream_ok(chunks=pieces, chunk_delay=2.0, tokens=5))

    reading = read_stream(url)

    assert reading.last().name == "done", reading.last()
    assert reading.text() == "".join(pieces)
    assert fake_llm.outcomes == ["status:500", "stream_ok"]
    assert stored_rows(sql) == [(MESSAGE, "".join(pieces), 5, MODEL)]


# --- the provider's usage is not trusted -------------------------------------------------


@pytest.mark.parametrize(
    ("usage", "counted"),
    [({"total_tokens": "many"}, 0), ({"total_tokens": -5}, 0), ({"total_tokens": 1.5}, 0),
     ({"total_tokens": True}, 0), ({"total_tokens": None}, 0),
     ({"prompt_tokens": 3, "completion_tokens": "x"}, 3)],
    ids=["text", "negative", "float", "bool", "null", "parts-only"],
)
def test_a_malformed_usage_counts_only_real_counts_of_a_saved_answer_never_an_error(
    serve, fake_llm, sql, usage, counted
):
    fake_llm.script(stream_ok(ANSWER, pieces=PIECES, usage=usage))

    reading = read_stream(serve())

    assert reading.names()[-1] == "done"
    assert "error" not in reading.names()
    assert reading.last().data["tokens_used"] == counted
    assert stored_rows(sql) == [(MESSAGE, ANSWER, counted, MODEL)]
    assert request_count(sql) == 1


# --- a client that stops reading -----------------------------------------------------------


def test_a_client_that_stops_reading_is_a_client_gone_within_the_write_timeout(
    database_url, fake_llm, sql, tmp_path
):
    """gthread writes with a blocking sendall: without a write timeout a client
    that never reads would hold the thread, the unit and its key for ever."""
    env = {**base_env(database_url, fake_llm.url), **STREAM_ENV, "STREAM_WRITE_TIMEOUT": "1"}
    # A long answer (8 s) with a snapshot of it every 50 ms: far more than the
    # socket buffers (4 MiB at most here) of a client that reads nothing take.
    fake_llm.script(stream_ok("Длинный ответ. " * 15000, pieces=400, chunk_delay=0.02))
    body = json.dumps({"telegram_id": 1, "message": MESSAGE, "request_id": "stuck-1"}).encode()
    with Gunicorn(env, workers=1, threads=4, log_dir=tmp_path) as server:
        stuck = socket.socket()
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.connect(("127.0.0.1", server.port))
        stuck.sendall(
            b"POST /v1/chat/stream HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            b"X-API-KEY: " + API_KEY.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(body)
            + body
        )
        try:
            assert fake_llm.wait_for(lambda: request_count(sql) == 1, timeout=DEADLINE)
            assert fake_llm.wait_for(lambda: refunded_and_nothing_stored(sql), timeout=DEADLINE)
            # Before the model would have finished writing: the upstream was cut.
            assert fake_llm.wait_for(lambda: fake_llm.streams_abandoned == 1, timeout=DEADLINE)
            assert sql("SELECT count(*) FROM ai_chat_idempotency_keys")[0][0] == 0
            # The key is free again: a retry is answered, not refused with 409.
            fake_llm.script(the_answer())
            assert read_stream(server.url, request_id="stuck-1").last().name == "done"
        finally:
            stuck.close()
        log = server.log()
    assert "Traceback" not in log
    assert request_count(sql) == 1


# --- shutdown while the model is silent ------------------------------------------------------


def test_a_stream_waiting_on_a_silent_model_at_sigterm_ends_and_refunds_before_the_kill(
    database_url, fake_llm, sql, tmp_path
):
    """The stream loop sleeps up to a keep-alive interval (here 14 s) while the
    model is silent; SIGTERM wakes it, so it ends with an error event and gives
    its unit back before gunicorn's graceful timeout (REQUEST_DEADLINE + 5 s)."""
    env = {
        **base_env(database_url, fake_llm.url), **STREAM_ENV,
        "LLM_DEADLINE": "3", "REQUEST_DEADLINE": "6", "OPENAI_TIMEOUT": "30",
        "STREAM_KEEPALIVE_SECONDS": "14", "STREAM_WRITE_TIMEOUT": "1",
    }
    fake_llm.script(stream_hang(after=1, text=ANSWER, pieces=PIECES))
    with Gunicorn(env, workers=1, threads=4, log_dir=tmp_path) as server:
        with EventStream(server.url) as stream:
            events = stream.events()
            assert next(events).name == "delta"
            server.process.send_signal(signal.SIGTERM)
            rest = [event for event in events if event.name != "comment"]
        assert server.process.wait(timeout=30) == 0
    assert [event.name for event in rest] == ["snapshot", "error"] or [
        event.name for event in rest] == ["error"]
    assert rest[-1].data["error"] == "service_unavailable"
    assert refunded_and_nothing_stored(sql)
