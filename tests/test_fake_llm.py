"""The fake OpenAI server itself (tests/fake_llm.py), seen through the real
``openai`` SDK and, where the wire format matters, raw httpx2.

Service tests trust the fake to speak the chat-completions protocol exactly as
the SDK parses it (streams above all) and to report what its clients did
(abandoned streams, keep-alive, models asked for). These tests pin that down,
so a failing service test points at the service, not at its upstream double.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import httpx2
import openai
import pytest

from tests.fake_llm import (
    ANSWER_PREFIX,
    TOOL_ANSWER_PREFIX,
    FakeLLM,
    delay,
    drop,
    garbage,
    hang,
    ok,
    status,
    stream_break,
    stream_error,
    stream_hang,
    stream_ok,
    tool_calls,
)
from tests.servers import ROOT, free_port, wait_until_up

MESSAGES = [
    {"role": "system", "content": "Ты помощник продавца."},
    {"role": "user", "content": "Как поднять продажи зимой?"},
]
DEFAULT_ANSWER = ANSWER_PREFIX + "Как поднять продажи зимой?"
PROMPT_TOKENS = len("Ты помощник продавца.Как поднять продажи зимой?") // 4 + 1


# --- helpers -------------------------------------------------------------------


@pytest.fixture
def fake():
    """A fake of its own per test: counters and connections start at zero."""
    with FakeLLM() as server:
        yield server


@pytest.fixture
def client(fake):
    with openai.OpenAI(base_url=fake.url, api_key="sk-test", max_retries=0, timeout=5) as sdk:
        yield sdk


def stream(client, model: str = "gpt-test", **options):
    return client.chat.completions.create(model=model, messages=MESSAGES, stream=True, **options)


def content_of(chunks) -> list[str]:
    """The content pieces after the role chunk, in order."""
    return [
        chunk.choices[0].delta.content
        for chunk in chunks[1:]
        if chunk.choices and chunk.choices[0].delta.content is not None
    ]


def read_until_error(iterator) -> tuple[list[str], Exception | None]:
    pieces: list[str] = []
    try:
        for chunk in iterator:
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
    except Exception as error:  # the caller checks which one
        return pieces, error
    return pieces, None


# --- stream protocol -----------------------------------------------------------


def test_stream_sends_role_then_pieces_then_stop_then_usage(client, fake):
    chunks = list(stream(client, stream_options={"include_usage": True}))

    first, *middle, finish, usage = chunks
    assert first.choices[0].delta.role == "assistant"
    assert first.choices[0].delta.content == ""
    assert first.choices[0].finish_reason is None
    assert all(chunk.choices[0].finish_reason is None for chunk in middle)
    assert "".join(chunk.choices[0].delta.content for chunk in middle) == DEFAULT_ANSWER
    assert finish.choices[0].finish_reason == "stop"
    assert finish.choices[0].delta.content is None and finish.choices[0].delta.role is None
    assert usage.choices == []
    assert usage.usage.prompt_tokens == PROMPT_TOKENS
    assert usage.usage.completion_tokens == len(DEFAULT_ANSWER) // 4 + 1
    assert {chunk.object for chunk in chunks} == {"chat.completion.chunk"}
    assert {chunk.model for chunk in chunks} == {"gpt-test"}
    assert len({chunk.id for chunk in chunks}) == 1
    assert fake.streamed == [True]
    # The fake counts a stream once its last write returned, which may be just
    # after the client read [DONE].
    assert fake.wait_for(lambda: (fake.streams_started, fake.streams_completed) == (1, 1))


def test_default_stream_is_one_piece_per_word(client):
    pieces = content_of(list(stream(client)))
    assert pieces == ["Ответ: ", "Как ", "поднять ", "продажи ", "зимой?"]


@pytest.mark.parametrize(
    ("stream_options", "asked"),
    [(None, False), ({"include_usage": False}, False), ({"include_usage": True}, True)],
)
def test_usage_chunk_only_when_the_client_asks_for_it(client, stream_options, asked):
    options = {} if stream_options is None else {"stream_options": stream_options}
    chunks = list(stream(client, **options))

    if asked:
        assert [chunk.usage is not None for chunk in chunks[-2:]] == [False, True]
        assert chunks[-1].choices == []
        assert chunks[-2].choices[0].finish_reason == "stop"
    else:
        assert all(chunk.usage is None for chunk in chunks)
        assert chunks[-1].choices[0].finish_reason == "stop"


def test_step_without_usage_leaves_out_the_usage_chunk(client, fake):
    fake.script(stream_ok("Да", usage=False))
    chunks = list(stream(client, stream_options={"include_usage": True}))
    assert all(chunk.usage is None for chunk in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_scripted_tokens_are_the_usage_total(client, fake):
    fake.script(stream_ok("Короткий ответ", tokens=7))
    usage = list(stream(client, stream_options={"include_usage": True}))[-1].usage
    assert usage.total_tokens == 7
    assert usage.prompt_tokens + usage.completion_tokens == 7


@pytest.mark.parametrize(
    ("step", "pieces"),
    [
        (stream_ok(chunks=["При", "вет", "!"]), ["При", "вет", "!"]),
        (stream_ok("abcdef", pieces=3), ["ab", "cd", "ef"]),
        (stream_ok("один  два три"), ["один  ", "два ", "три"]),
        (ok("Скриптованный ответ"), ["Скриптованный ", "ответ"]),
    ],
)
def test_scripted_text_is_streamed_in_the_given_pieces(client, fake, step, pieces):
    fake.script(step)
    assert content_of(list(stream(client))) == pieces


def test_stream_is_chunked_server_sent_events_ending_in_done(fake):
    body = {"model": "m", "messages": MESSAGES, "stream": True}
    with httpx2.Client() as http:
        with http.stream("POST", f"{fake.url}/chat/completions", json=body) as response:
            raw = response.read().decode()

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["transfer-encoding"] == "chunked"
    events = raw.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    assert all(event.startswith("data: {") for event in events[:-2])


def test_stream_paces_first_token_and_chunks(client, fake):
    fake.script(stream_ok("a b c d e", first_token_delay=0.2, chunk_delay=0.05))
    started = time.monotonic()
    arrivals = []
    for chunk in stream(client):
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.monotonic() - started)
    assert len(arrivals) == 5
    # The fake may send up to a millisecond early to batch due chunks.
    assert 0.19 <= arrivals[0] < 0.6
    assert 0.39 <= arrivals[-1] < 1.0


def test_default_stream_follows_the_runtime_settings(client, fake):
    fake.latency, fake.chunk_delay, fake.stream_pieces, fake.answer_chars = 0.1, 0.01, 10, 100
    started = time.monotonic()
    pieces = content_of(list(stream(client)))
    assert time.monotonic() - started >= 0.18  # latency, then 9 gaps of 10 ms
    assert len(pieces) == 10
    assert "".join(pieces).startswith(DEFAULT_ANSWER)
    assert len("".join(pieces)) == 100

    fake.reset()
    assert (fake.latency, fake.chunk_delay, fake.stream_pieces, fake.answer_chars) == (
        0.0,
        0.0,
        None,
        None,
    )


# --- failures ------------------------------------------------------------------


def test_stream_break_raises_in_the_client_after_the_given_pieces(client, fake):
    fake.script(stream_break(after=2))
    pieces, error = read_until_error(stream(client))
    assert pieces == ["Ответ: ", "Как "]
    assert isinstance(error, openai.APIConnectionError)
    assert fake.streams_broken == 1
    assert fake.streams_abandoned == 0
    assert fake.outcomes == ["stream_break"]


def test_stream_error_raises_api_error_with_its_message(client, fake):
    fake.script(stream_error(after=1, message="model overloaded"))
    pieces, error = read_until_error(stream(client))
    assert pieces == ["Ответ: "]
    assert isinstance(error, openai.APIError)
    assert "model overloaded" in str(error)


def test_stream_hang_ends_in_a_client_read_timeout(client, fake):
    fake.script(stream_hang(after=1))
    started = time.monotonic()
    pieces, error = read_until_error(stream(client.with_options(timeout=0.3)))
    assert pieces == ["Ответ: "]
    assert isinstance(error, openai.APITimeoutError)
    assert time.monotonic() - started < 2
    # The SDK closes the response on the error, which the fake notices.
    assert fake.wait_for(lambda: fake.streams_abandoned == 1, timeout=1)


def test_hang_never_answers_and_counts_the_request_abandoned(client, fake):
    fake.script(hang())
    with pytest.raises(openai.APITimeoutError):
        client.with_options(timeout=0.3).chat.completions.create(model="m", messages=MESSAGES)
    assert fake.wait_for(lambda: fake.requests_abandoned == 1, timeout=1)
    assert fake.streams_started == 0


@pytest.mark.parametrize(
    ("step", "error"),
    [
        (status(429), openai.RateLimitError),
        (status(503), openai.InternalServerError),
        (drop(), openai.APIConnectionError),
        (hang(), openai.APITimeoutError),
    ],
)
def test_non_stream_failures_happen_before_the_stream_starts(client, fake, step, error):
    fake.script(step)
    with pytest.raises(error):
        stream(client.with_options(timeout=0.3))
    assert fake.streams_started == 0
    if step["kind"] == "hang":
        assert fake.wait_for(lambda: fake.requests_abandoned == 1, timeout=1)


def test_garbage_to_a_stream_is_an_undecodable_event(client, fake):
    fake.script(garbage())
    _, error = read_until_error(stream(client))
    assert isinstance(error, ValueError)


@pytest.mark.parametrize(
    ("step", "outcome"),
    [
        (stream_ok(chunks=["Соб", "ранный"], tokens=5), "Собранный"),
        (stream_break(after=1), openai.APIConnectionError),
        (stream_error(), openai.InternalServerError),
        (stream_hang(), openai.APITimeoutError),
    ],
)
def test_stream_steps_served_to_a_plain_request(client, fake, step, outcome):
    fake.script(step)
    create = client.with_options(timeout=0.3).chat.completions.create
    if isinstance(outcome, str):
        completion = create(model="m", messages=MESSAGES)
        assert completion.choices[0].message.content == outcome
        assert completion.usage.total_tokens == 5
    else:
        with pytest.raises(outcome):
            create(model="m", messages=MESSAGES)


# --- client gone ---------------------------------------------------------------


def test_client_closing_mid_stream_is_counted_within_a_second(client, fake):
    fake.script(stream_ok("a b c d e f g h i j", chunk_delay=0.5))
    chunks = stream(client)
    next(chunks), next(chunks)  # the role chunk and the first piece
    chunks.close()
    started = time.monotonic()

    assert fake.wait_for(lambda: fake.streams_abandoned == 1, timeout=1)
    assert time.monotonic() - started < 0.3
    assert fake.streams_completed == 0
    assert fake.streams_in_flight == 0


def test_client_closing_before_the_first_token_is_counted(client, fake):
    fake.script(stream_ok(first_token_delay=30))
    chunks = stream(client)
    next(chunks)  # the role chunk goes out at once
    chunks.close()
    assert fake.wait_for(lambda: fake.streams_abandoned == 1, timeout=1)


def test_finished_stream_is_not_abandoned_when_the_client_closes(client, fake):
    fake.script(stream_ok("a b c", chunk_delay=0.01))
    with stream(client) as chunks:
        assert len(content_of(list(chunks))) == 3
    client.close()

    assert not fake.wait_for(lambda: fake.streams_abandoned > 0, timeout=0.3)
    assert (fake.streams_started, fake.streams_completed) == (1, 1)


def test_client_timing_out_during_a_delay_abandons_the_request(client, fake):
    fake.script(ok("поздно", delay=30))
    with pytest.raises(openai.APITimeoutError):
        client.with_options(timeout=0.2).chat.completions.create(model="m", messages=MESSAGES)
    assert fake.wait_for(lambda: fake.requests_abandoned == 1, timeout=1)


# --- keep-alive ----------------------------------------------------------------


def test_connection_is_reused_after_a_fully_read_stream(fake):
    body = {"model": "m", "messages": MESSAGES, "stream": True}
    with httpx2.Client() as http:
        for _ in range(3):
            with http.stream("POST", f"{fake.url}/chat/completions", json=body) as response:
                assert response.read().endswith(b"data: [DONE]\n\n")
        plain = http.post(f"{fake.url}/chat/completions", json={**body, "stream": False})
    assert plain.json()["choices"][0]["message"]["content"] == DEFAULT_ANSWER
    assert fake.calls == 4
    assert fake.connections == 1


def test_async_sdk_reuses_the_connection_after_a_stream(fake):
    async def two_streams() -> list[str]:
        async with openai.AsyncOpenAI(base_url=fake.url, api_key="k", max_retries=0) as sdk:
            answers = []
            for _ in range(2):
                chunks = await sdk.chat.completions.create(
                    model="m", messages=MESSAGES, stream=True
                )
                answers.append(
                    "".join([chunk.choices[0].delta.content or "" async for chunk in chunks])
                )
            return answers

    assert asyncio.run(two_streams()) == [DEFAULT_ANSWER, DEFAULT_ANSWER]
    assert fake.connections == 1


# --- models, providers, records ------------------------------------------------


def test_model_scripts_come_before_the_global_script(client, fake):
    fake.script_for("gpt-big", status(500), stream_break(after=0))
    fake.script(ok("глобальный"))

    def ask(model: str):
        try:
            return client.chat.completions.create(model=model, messages=MESSAGES)
        except openai.APIError as error:
            return type(error)

    assert ask("gpt-small").choices[0].message.content == "глобальный"
    assert ask("gpt-big") is openai.InternalServerError
    assert ask("gpt-big") is openai.APIConnectionError
    assert ask("gpt-big").choices[0].message.content == DEFAULT_ANSWER
    assert fake.models == ["gpt-small", "gpt-big", "gpt-big", "gpt-big"]
    assert fake.outcomes == ["ok", "status:500", "stream_break", "ok"]


def test_records_model_stream_flag_and_authorization(client, fake):
    list(stream(client, model="gpt-a"))
    client.chat.completions.create(model="gpt-b", messages=MESSAGES)

    assert fake.models == ["gpt-a", "gpt-b"]
    assert fake.streamed == [True, False]
    assert fake.authorizations == ["Bearer sk-test", "Bearer sk-test"]
    assert fake.requests[0]["model"] == "gpt-a" and fake.requests[0]["stream"] is True


def test_several_fakes_are_independent_providers(fake):
    with FakeLLM() as other:
        fake.script(status(503))
        other.script(stream_ok("второй"))
        with (
            openai.OpenAI(base_url=fake.url, api_key="key-1", max_retries=0) as first,
            openai.OpenAI(base_url=other.url, api_key="key-2", max_retries=0) as second,
        ):
            with pytest.raises(openai.InternalServerError):
                first.chat.completions.create(model="m", messages=MESSAGES)
            assert content_of(list(stream(second))) == ["второй"]

        assert fake.port != other.port
        assert (fake.outcomes, other.outcomes) == (["status:503"], ["stream_ok"])
        assert (fake.authorizations, other.authorizations) == (["Bearer key-1"], ["Bearer key-2"])
        assert (fake.streams_started, other.streams_started) == (0, 1)


def test_reset_forgets_model_scripts_and_counters(client, fake):
    fake.script_for("m", status(500))
    list(stream(client))
    fake.reset()

    assert client.chat.completions.create(model="m", messages=MESSAGES).choices
    assert fake.outcomes == ["ok"]
    assert (fake.calls, fake.streams_started, fake.streams_completed) == (1, 0, 0)


def test_delay_served_to_a_stream_delays_the_first_token(client, fake):
    fake.script(delay(0.2))
    started = time.monotonic()
    pieces = content_of(list(stream(client)))
    assert time.monotonic() - started >= 0.19
    assert "".join(pieces) == DEFAULT_ANSWER


def test_invalid_steps_are_refused(fake):
    with pytest.raises(ValueError):
        fake.script({"kind": "explode"})
    with pytest.raises(ValueError):
        fake.script_for("m", {"kind": "status"})
    with pytest.raises(ValueError):
        stream_ok(pieces=0)


# --- standalone ----------------------------------------------------------------


def test_command_line_streams_with_the_benchmark_options():
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "tests.fake_llm",
        "--port",
        str(port),
        "--latency",
        "0.05",
        "--stream-pieces",
        "20",
        "--chunk-delay",
        "0.005",
        "--answer-chars",
        "300",
    ]
    process = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_until_up(f"http://127.0.0.1:{port}/v1/models", 15, process)
        with openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0, timeout=5
        ) as sdk:
            pieces = content_of(list(stream(sdk)))
    finally:
        process.terminate()
        process.wait(10)
    assert len(pieces) == 20
    assert len("".join(pieces)) == 300
    assert process.returncode == 0


# --- tool calls ------------------------------------------------------------------

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_sales",
            "description": "Продажи продавца",
            "parameters": {
                "type": "object",
                "properties": {"period": {"type": "string", "enum": ["7d", "30d"]}},
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_dashboard",
            "description": "Сводка",
            "parameters": {"type": "object", "properties": {}, "additionalProperties": False},
        },
    },
]
TWO_CALLS = (("get_sales", {"period": "30d"}), ("get_dashboard", {}))


def test_tool_calls_answer_a_plain_request_in_the_openai_shape(client, fake):
    fake.script(tool_calls(*TWO_CALLS))

    completion = client.chat.completions.create(model="m", messages=MESSAGES, tools=TOOLS)

    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.role == "assistant" and choice.message.content is None
    calls = choice.message.tool_calls
    assert [(c.type, c.function.name) for c in calls] == [
        ("function", "get_sales"), ("function", "get_dashboard"),
    ]
    assert [json.loads(c.function.arguments) for c in calls] == [{"period": "30d"}, {}]
    assert all(c.id.startswith("call_") for c in calls) and calls[0].id != calls[1].id
    assert completion.usage.prompt_tokens == PROMPT_TOKENS
    assert completion.usage.completion_tokens > 0
    assert fake.outcomes == ["tool_calls"]
    assert fake.requests[0]["body"]["tools"] == TOOLS


def test_tool_calls_stream_as_the_standard_deltas(client, fake):
    fake.script(tool_calls(*TWO_CALLS))

    chunks = list(stream(client, tools=TOOLS, stream_options={"include_usage": True}))

    role, *deltas, finish, usage = chunks
    assert role.choices[0].delta.role == "assistant"
    pieces = [chunk.choices[0].delta.tool_calls for chunk in deltas]
    assert all(piece is not None and len(piece) == 1 for piece in pieces)
    heads = [piece[0] for piece in pieces if piece[0].id is not None]
    assert [(h.index, h.type, h.function.name, h.function.arguments) for h in heads] == [
        (0, "function", "get_sales", ""), (1, "function", "get_dashboard", ""),
    ]
    arguments = {0: "", 1: ""}
    for piece in pieces:
        if piece[0].id is None:
            assert piece[0].function.name is None
            arguments[piece[0].index] += piece[0].function.arguments
    assert [json.loads(text) for text in arguments.values()] == [{"period": "30d"}, {}]
    assert sum(1 for piece in pieces if piece[0].index == 0 and piece[0].id is None) > 1
    assert finish.choices[0].finish_reason == "tool_calls"
    assert usage.choices == [] and usage.usage.prompt_tokens == PROMPT_TOKENS
    assert fake.wait_for(lambda: fake.streams_completed == 1)


def test_the_sdks_stream_helper_assembles_the_streamed_calls(client, fake):
    fake.script(tool_calls(*TWO_CALLS))

    with client.chat.completions.stream(model="m", messages=MESSAGES, tools=TOOLS) as events:
        completion = events.get_final_completion()

    calls = completion.choices[0].message.tool_calls
    assert completion.choices[0].finish_reason == "tool_calls"
    assert [(c.function.name, c.function.arguments) for c in calls] == [
        ("get_sales", '{"period": "30d"}'), ("get_dashboard", "{}"),
    ]


def test_tool_call_stream_ends_in_done_on_the_wire(fake):
    fake.script(tool_calls(("get_dashboard", {})))
    body = {"model": "m", "messages": MESSAGES, "stream": True, "tools": TOOLS}
    with httpx2.Client() as http:
        with http.stream("POST", f"{fake.url}/chat/completions", json=body) as response:
            raw = response.read().decode()

    events = raw.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    assert '"finish_reason":"tool_calls"' in events[-3]


@pytest.mark.parametrize("streamed", [False, True])
def test_malformed_arguments_are_sent_as_they_are(client, fake, streamed):
    fake.script(tool_calls(("get_sales", '{"period": "30d"')))

    if streamed:
        with client.chat.completions.stream(model="m", messages=MESSAGES, tools=TOOLS) as s:
            [call] = s.get_final_completion().choices[0].message.tool_calls
    else:
        completion = client.chat.completions.create(model="m", messages=MESSAGES, tools=TOOLS)
        [call] = completion.choices[0].message.tool_calls
    assert call.function.arguments == '{"period": "30d"'


def test_tools_forever_answers_every_request_that_offers_tools(client, fake):
    fake.tools_forever = [("get_dashboard", {})]

    asked = [
        client.chat.completions.create(model="m", messages=MESSAGES, tools=TOOLS)
        for _ in range(3)
    ]
    plain = client.chat.completions.create(model="m", messages=MESSAGES)
    streamed = list(stream(client, tools=TOOLS))

    assert {a.choices[0].finish_reason for a in asked} == {"tool_calls"}
    assert {a.choices[0].message.tool_calls[0].function.name for a in asked} == {"get_dashboard"}
    assert plain.choices[0].message.content == DEFAULT_ANSWER
    assert streamed[-1].choices[0].finish_reason == "tool_calls"
    fake.reset()
    assert fake.tools_forever is None


def test_a_scripted_step_comes_before_tools_forever(client, fake):
    fake.tools_forever = [("get_dashboard", {})]
    fake.script(ok("Готово"))

    first = client.chat.completions.create(model="m", messages=MESSAGES, tools=TOOLS)
    second = client.chat.completions.create(model="m", messages=MESSAGES, tools=TOOLS)

    assert first.choices[0].message.content == "Готово"
    assert second.choices[0].finish_reason == "tool_calls"


def tool_round(result: str) -> list[dict]:
    return [
        *MESSAGES,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "call_1", "type": "function",
                            "function": {"name": "get_dashboard", "arguments": "{}"}}],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": result},
    ]


RESULT = '{"tool":"get_dashboard","data":{"orders_today":{"amount":18450}}}'


@pytest.mark.parametrize("streamed", [False, True])
def test_the_default_answer_quotes_the_tool_results(client, fake, streamed):
    messages = tool_round(RESULT)

    if streamed:
        text = "".join(content_of(list(
            client.chat.completions.create(model="m", messages=messages, stream=True)
        )))
    else:
        text = client.chat.completions.create(model="m", messages=messages).choices[0]
        text = text.message.content

    assert text == TOOL_ANSWER_PREFIX + RESULT
    assert fake.requests[0]["body"]["messages"][-1] == messages[-1]


def test_prompt_tokens_count_the_tool_results(client):
    messages = tool_round(RESULT)

    usage = client.chat.completions.create(model="m", messages=messages).usage

    assert usage.prompt_tokens == (len("Ты помощник продавца.Как поднять продажи зимой?")
                                   + len(RESULT)) // 4 + 1


def test_a_long_tool_result_is_quoted_within_a_sane_length(client):
    messages = tool_round("7" * 5000)

    text = client.chat.completions.create(model="m", messages=messages).choices[0].message.content

    assert text.startswith(TOOL_ANSWER_PREFIX + "777")
    assert len(text) == 1500


def test_a_tool_calls_step_needs_a_call(fake):
    with pytest.raises(ValueError):
        tool_calls()
    with pytest.raises(ValueError):
        fake.script({"kind": "tool_calls", "calls": []})
