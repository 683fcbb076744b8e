"""The output ``format`` of answers (contract, "Output format") through the API:
send, stream and history.

The model writes Markdown; the API renders it as Telegram HTML (default, via
RESPONSE_FORMAT), returns it as it came (``markdown``) or strips the markup
(``plain``), cut into parts Telegram accepts one by one; the database always
keeps the model's raw text, and history renders it in the request's format.
HTML is judged by tests/telegram_html.py, a checker written apart from
app/render.py; rows are read back from PostgreSQL, and what the model was
told from the fake LLM's records.
"""

from __future__ import annotations

import json
import re

import pytest

from app.render import TELEGRAM_MAX_CHARS
from tests.conftest import API_KEY, request_count
from tests.fake_llm import ok
from tests.telegram_html import assert_words_in_order, check, shown_with_attributes

LINK = "https://seller.wildberries.ru/analytics?tab=returns&period=30"


def section(number: int) -> str:
    """One numbered section of a long answer, with every kind of markup a model writes."""
    return f"""## Неделя {number}: возвраты

Процент возвратов **вырос до {number + 10}%**, а цена < 500 ₽ & выше в Q&A не влияет.

- Проверьте таблицу размеров {number}
- Обновите фото при дневном свете

```python
if price < 500 and stock & {number}:
    print("<ok>")
```

Отчёт: [аналитика продавца]({LINK}). Не вставляйте <script>alert({number})</script> в описание.
Незакрытая **звёздочка номер {number} остаётся текстом.
"""


LONG_ANSWER = "\n".join(section(number) for number in range(1, 23))  # ~9300 characters
# Well-formed Markdown only: every marker has its pair, no literal HTML, a fence
# with no language (plain text has nowhere to show one).
MARKUP_ANSWER = f"""## Как поднять продажи

Главное: **рейтинг карточки** и *быстрые ответы* на отзывы.

1. Обновите фото
2. Проверьте артикул `WB-12345`

```
цена < 500 & скидка
```

Подробнее: [аналитика]({LINK}).
"""
MESSAGE = "Как поднять продажи?"
TAG = re.compile(r"</?(?:b|strong|i|em|u|s|code|pre|a|blockquote)\b")


# --- helpers ------------------------------------------------------------------------


def utf16_units(text: str) -> int:
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


def stored_responses(sql, telegram_id: int = 1) -> list[str]:
    rows = sql(
        "SELECT response FROM ai_chat_requests WHERE telegram_id = %s ORDER BY id", (telegram_id,)
    )
    return [response for (response,) in rows]


def streamed_done(api, **fields) -> dict:
    """POST /v1/chat/stream through the test client; the data of its ``done`` event."""
    body = {"telegram_id": 1, "message": MESSAGE, **fields}
    with api.client.post("/v1/chat/stream", json=body, headers=api.headers) as response:
        assert response.status_code == 200
        text = response.get_data(as_text=True)
    events = re.findall(r"^event: (\w+)\ndata: (.*)$", text, re.M)
    assert events and events[-1][0] == "done", text[-300:]
    return json.loads(events[-1][1])


@pytest.fixture
def long_answer(api, fake_llm) -> dict:
    """The send body for LONG_ANSWER in the default format."""
    fake_llm.script(ok(LONG_ANSWER))
    response = api.send()
    assert response.status_code == 200
    return response.get_json()


# --- a long Markdown answer as Telegram HTML -------------------------------------------


def test_long_answer_is_sent_in_several_parts(long_answer):
    assert len(LONG_ANSWER) >= 9000
    assert len(long_answer["parts"]) >= 2


def test_each_part_of_a_long_answer_is_valid_telegram_html(long_answer):
    for part in long_answer["parts"]:
        check(part)


def test_parts_of_a_long_answer_keep_every_word_in_order(long_answer):
    shown = "".join(shown_with_attributes(part) for part in long_answer["parts"])
    assert_words_in_order(LONG_ANSWER, shown)


def test_whole_response_of_a_long_answer_is_valid_telegram_html_apart_from_its_length(
    long_answer,
):
    check(long_answer["response"], max_chars=None)
    assert utf16_units(shown_with_attributes(long_answer["response"])) > TELEGRAM_MAX_CHARS


def test_long_answer_shows_markup_as_tags_and_html_as_escaped_text(long_answer):
    response = long_answer["response"]

    assert "<b>вырос до 11%</b>" in response
    assert f'<a href="{LINK.replace("&", "&amp;")}">аналитика продавца</a>' in response
    assert '<pre><code class="language-python">' in response
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in response
    assert "**звёздочка номер 1 " in response


# --- markdown and plain ------------------------------------------------------------------


def test_markdown_format_returns_the_models_text_as_it_came(api, fake_llm):
    fake_llm.script(ok(LONG_ANSWER))

    body = api.send(format="markdown").get_json()

    assert body["response"] == LONG_ANSWER


def test_markdown_format_splits_the_raw_text_into_parts_telegram_accepts(api, fake_llm):
    fake_llm.script(ok(LONG_ANSWER))

    parts = api.send(format="markdown").get_json()["parts"]

    assert len(parts) >= 2
    assert all(part.strip() and utf16_units(part) <= TELEGRAM_MAX_CHARS for part in parts)
    assert_words_in_order(LONG_ANSWER, "".join(parts))
    assert all(part in LONG_ANSWER for part in parts)


def test_plain_format_has_no_markup(api, fake_llm):
    fake_llm.script(ok(MARKUP_ANSWER))

    response = api.send(format="plain").get_json()["response"]

    assert not TAG.search(response), response
    for marker in ("**", "`", "##", "](", "&amp;", "&lt;"):
        assert marker not in response, marker


def test_plain_format_keeps_every_word_in_order(api, fake_llm):
    fake_llm.script(ok(MARKUP_ANSWER))

    response = api.send(format="plain").get_json()["response"]

    assert_words_in_order(MARKUP_ANSWER, response)
    assert "цена < 500 & скидка" in response


def test_plain_format_parts_of_a_long_answer_fit_telegram(api, fake_llm):
    fake_llm.script(ok(LONG_ANSWER))

    parts = api.send(format="plain").get_json()["parts"]

    assert len(parts) >= 2
    assert all(part.strip() and utf16_units(part) <= TELEGRAM_MAX_CHARS for part in parts)
    assert not any(TAG.search(part) for part in parts)


@pytest.mark.parametrize("path", ["/v1/chat/send", "/v1/chat/stream", "/v1/chat/history"])
def test_unknown_format_is_a_422_naming_the_field(api, fake_llm, sql, path):
    body = {"telegram_id": 1, "message": MESSAGE, "format": "html"}
    if path.endswith("history"):
        body.pop("message")

    response = api.client.post(path, json=body, headers={"X-API-KEY": API_KEY})

    assert response.status_code == 422
    assert response.get_json()["error"] == "validation_error"
    assert "format" in response.get_json()["errors"]
    assert fake_llm.calls == 0
    assert request_count(sql) == 0


# --- history and the stored text ---------------------------------------------------------


@pytest.mark.parametrize("fmt", ["telegram_html", "markdown", "plain"])
def test_database_keeps_the_raw_text_whatever_the_format(api, fake_llm, sql, fmt):
    fake_llm.script(ok(MARKUP_ANSWER))

    assert api.send(format=fmt).status_code == 200

    assert stored_responses(sql) == [MARKUP_ANSWER]


@pytest.mark.parametrize("fmt", ["telegram_html", "markdown", "plain"])
def test_history_renders_in_the_requests_format_as_send_does(api, fake_llm, fmt):
    fake_llm.script(ok(MARKUP_ANSWER), ok(MARKUP_ANSWER))
    api.send(telegram_id=1)  # answered in the default format
    sent = api.send(telegram_id=2, format=fmt).get_json()

    items = api.history(telegram_id=1, format=fmt).get_json()["items"]

    assert [item["response"] for item in items] == [sent["response"]]


def test_history_in_markdown_returns_the_raw_text_of_an_answer_sent_as_html(api, fake_llm):
    fake_llm.script(ok(MARKUP_ANSWER))
    assert "<b>" in api.send().get_json()["response"]

    items = api.history(format="markdown").get_json()["items"]

    assert items[0]["response"] == MARKUP_ANSWER


def test_history_in_the_default_format_is_valid_telegram_html(api, fake_llm):
    fake_llm.script(ok(MARKUP_ANSWER))
    api.send(format="markdown")

    response = api.history().get_json()["items"][0]["response"]

    check(response)
    assert "<b>рейтинг карточки</b>" in response


# --- the default format --------------------------------------------------------------------


def test_send_without_format_answers_telegram_html(api, fake_llm):
    fake_llm.script(ok(MARKUP_ANSWER))

    response = api.send().get_json()["response"]

    check(response)
    assert "<b>рейтинг карточки</b>" in response


def test_send_without_format_uses_response_format(make_api, fake_llm):
    api = make_api(RESPONSE_FORMAT="markdown")
    fake_llm.script(ok(MARKUP_ANSWER))

    assert api.send().get_json()["response"] == MARKUP_ANSWER


def test_stream_without_format_uses_response_format(make_api, fake_llm):
    api = make_api(RESPONSE_FORMAT="markdown")
    fake_llm.script(ok(MARKUP_ANSWER))

    assert streamed_done(api)["response"] == MARKUP_ANSWER


def test_history_without_format_uses_response_format(make_api, fake_llm):
    api = make_api(RESPONSE_FORMAT="plain")
    fake_llm.script(ok(MARKUP_ANSWER))
    api.send(format="markdown")

    response = api.history().get_json()["items"][0]["response"]

    assert not TAG.search(response)
    assert "**" not in response
    assert_words_in_order(MARKUP_ANSWER, response)


def test_format_in_the_request_wins_over_response_format(make_api, fake_llm):
    api = make_api(RESPONSE_FORMAT="markdown")
    fake_llm.script(ok(MARKUP_ANSWER))

    response = api.send(format="telegram_html").get_json()["response"]

    assert "<b>рейтинг карточки</b>" in response


# --- what the model is told ------------------------------------------------------------------


def test_system_prompt_allows_light_markdown(api, fake_llm):
    api.send()

    system = fake_llm.requests[0]["body"]["messages"][0]
    assert system["role"] == "system"
    assert "Markdown" in system["content"]
    assert "**" in system["content"]
