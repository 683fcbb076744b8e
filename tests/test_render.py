"""Rendering of model answers (app/render/): Telegram HTML, Markdown, plain text, parts.

Every HTML result is judged by tests/telegram_html.py, a checker written apart from the
renderer. The property tests build model-like Markdown from fragments (headings, bold,
fences, links with ``&``, lists, stray ``<``/``&``, emoji, RTL marks, very long
paragraphs and words) and check that every part is valid and that the words survive.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from app.render import FORMATS, TELEGRAM_MAX_CHARS, Rendered, render
from app.render.markdown import fast_runs, is_plain_prose, parsed_runs
from tests.telegram_html import (
    assert_words_in_order,
    check,
    parse,
    shown_with_attributes,
    visible_text,
)

# Slow CI machines: no per-example deadline; the example counts keep the file fast.
PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

LINK = "https://seller.wildberries.ru/analytics?tab=returns&period=30"
SECTION = f"""## Возвраты за неделю

Процент возвратов **вырос до 12%**, а цена < 500 ₽ & выше в Q&A не влияет.

1. Проверьте таблицу размеров
2. Обновите фото
   - при дневном свете
   - без ретуши

```python
if price < 500 and stock & 1:
    print("<ok>")
```

Отчёт: [аналитика продавца]({LINK}). Не вставляйте <script>alert(1)</script> в описание.
Незакрытая **звёздочка остаётся текстом.
"""
LONG_ANSWER = "\n".join(SECTION for _ in range(1 + 9000 // len(SECTION)))


def shown(part: str, fmt: str) -> str:
    return shown_with_attributes(part) if fmt == "telegram_html" else part


def assert_valid_parts(result: Rendered, fmt: str) -> None:
    assert result.parts, "no parts for a non-blank answer"
    for part in result.parts:
        if fmt == "telegram_html":
            check(part)
        else:
            assert part.strip(), "a blank part"
            assert len(part.encode("utf-16-le", "surrogatepass")) // 2 <= TELEGRAM_MAX_CHARS


def html_of(raw: str) -> str:
    return render(raw, "telegram_html").text


# --- the long answer -------------------------------------------------------------------


def test_long_answer_splits_into_valid_parts_that_keep_every_word_in_order():
    result = render(LONG_ANSWER, "telegram_html")

    assert len(LONG_ANSWER) >= 9000
    assert len(result.parts) >= 2
    for part in result.parts:
        check(part)
    assert_words_in_order(LONG_ANSWER, "".join(shown_with_attributes(p) for p in result.parts))


def test_long_answer_whole_text_is_valid_html_apart_from_its_length():
    check(html_of(LONG_ANSWER), max_chars=None)


def test_long_answer_is_cut_at_paragraph_boundaries():
    parts = [visible_text(p) for p in render(LONG_ANSWER, "telegram_html").parts]
    whole = visible_text(html_of(LONG_ANSWER))

    for before, after in zip(parts, parts[1:], strict=False):
        assert before[-40:] + "\n\n" + after[:40] in whole


# --- Telegram HTML: one behaviour each --------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    ["цена < 500 ₽", "Q&A", "a > b", "Введите <название товара> в поиск", "a&b; &copy"],
)
def test_stray_angle_brackets_and_ampersands_are_escaped_text(raw):
    html = html_of(raw)

    check(html)
    assert visible_text(html) == raw


def test_script_tag_shows_as_text():
    html = html_of("<script>alert(1)</script> готово")

    check(html)
    assert visible_text(html) == "<script>alert(1)</script> готово"
    assert "<script" not in html


def test_raw_html_block_shows_as_text():
    html = html_of("<div>\n**жирный**\n</div>\n\nдальше")

    check(html)
    assert visible_text(html) == "<div>\n**жирный**\n</div>\n\nдальше"


@pytest.mark.parametrize(
    "raw", ["это **важно, но не закрыто", "команда `ls -la без конца", "итог: *", "__x", "~~a"]
)
def test_unbalanced_markers_render_as_text(raw):
    html = html_of(raw)

    check(html)
    assert visible_text(html) == raw
    assert "<" not in html


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("**жирный**", "<b>жирный</b>"),
        ("__жирный__", "<b>жирный</b>"),
        ("*курсив*", "<i>курсив</i>"),
        ("_курсив_", "<i>курсив</i>"),
        ("~~зачёркнутый~~", "<s>зачёркнутый</s>"),
        ("`код`", "<code>код</code>"),
        ("**жир *курсив* жир**", "<b>жир <i>курсив</i> жир</b>"),
        ("`a < b & c`", "<code>a &lt; b &amp; c</code>"),
    ],
)
def test_inline_markdown_becomes_telegram_tags(raw, expected):
    assert html_of(raw) == expected


def test_code_fence_keeps_language_and_escapes_lt_and_amp():
    html = html_of("```python\nif a < b and c & d:\n    print('<x>')\n```")

    assert html == (
        '<pre><code class="language-python">if a &lt; b and c &amp; d:\n'
        "    print('&lt;x&gt;')</code></pre>"
    )


def test_code_fence_without_language_is_a_bare_pre():
    assert html_of("```\nx = 1\n```") == "<pre>x = 1</pre>"


def test_link_keeps_url_in_href_with_ampersand_escaped():
    html = html_of("[отчёт](https://seller.wildberries.ru/r?a=1&b=2) тут")

    check(html)
    assert html == '<a href="https://seller.wildberries.ru/r?a=1&amp;b=2">отчёт</a> тут'


def test_link_with_a_quote_in_its_url_stays_one_attribute():
    html = html_of('[x](https://a.b/"><b>)')

    check(html)
    assert parse(html)[0].attrs == {"href": 'https://a.b/"><b>'}


@pytest.mark.parametrize("url", ["javascript:alert(1)", "/relative/path", "ftp://x.y/z"])
def test_link_telegram_would_refuse_shows_text_and_url(url):
    html = html_of(f"[ссылка]({url})")

    check(html)
    assert "<a" not in html
    assert visible_text(html) == f"ссылка ({url})"


def test_image_becomes_a_link_to_its_source():
    assert html_of("![схема](https://wb.ru/a.png)") == '<a href="https://wb.ru/a.png">схема</a>'


def test_link_without_text_shows_its_url():
    assert html_of("[](https://wb.ru)") == '<a href="https://wb.ru">https://wb.ru</a>'


def test_code_inside_a_link_loses_the_code_tag():
    # Telegram lets no link contain code.
    assert html_of("[`api`](https://wb.ru)") == '<a href="https://wb.ru">api</a>'


def test_link_reference_definition_stays_visible():
    html = html_of("Источники:\n\n[1]: https://wb.ru/a?x=1&y=2")

    check(html)
    assert visible_text(html) == "Источники:\n\n[1]: https://wb.ru/a?x=1&y=2"


def test_heading_becomes_a_bold_line():
    assert html_of("## Итоги & выводы\nтекст") == "<b>Итоги &amp; выводы</b>\nтекст"


def test_bold_inside_a_heading_is_not_nested():
    assert html_of("# **Важно** сегодня") == "<b>Важно сегодня</b>"


def test_lists_become_bullet_and_numbered_lines():
    html = html_of("- один\n  - вложенный\n- два\n\n3. третий\n4. четвёртый")

    assert visible_text(html) == "• один\n  • вложенный\n• два\n\n3. третий\n4. четвёртый"


def test_blockquote_becomes_blockquote_and_nested_quotes_are_flattened():
    html = html_of("до\n\n> цитата\n> > вложенная\n\nпосле")

    check(html)
    assert html == "до\n\n<blockquote>цитата\n\nвложенная</blockquote>\n\nпосле"


def test_table_stays_as_its_lines():
    raw = "| a | b |\n|---|---|\n| 1 | 2 | 3 |"

    assert visible_text(html_of(raw)) == raw


@pytest.mark.parametrize("raw", ["```\n```", "```", "#", ">", "[]()", "```python\n   \n```"])
def test_markup_without_text_falls_back_to_the_raw_text(raw):
    html = html_of(raw)

    check(html)
    assert visible_text(html) == raw


def test_empty_fence_inside_an_answer_is_dropped_not_rendered_empty():
    html = html_of("Пример:\n\n```\n```")

    assert html == "Пример:"


# --- streaming prefixes ----------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_prefix_of_a_streamed_answer_renders_valid(fmt):
    for end in range(1, len(SECTION) + 1):
        prefix = SECTION[:end]
        if prefix.strip():
            assert_valid_parts(render(prefix, fmt), fmt)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (
            "Пример:\n```py\nx = 1 <",
            'Пример:\n\n<pre><code class="language-py">x = 1 &lt;</code></pre>',
        ),
        ("см. [ссылку](https://wb.ru/?a=1&", "см. [ссылку](https://wb.ru/?a=1&amp;"),
        ("итог: **жир", "итог: **жир"),
        ("итог: *", "итог: *"),
    ],
)
def test_partial_markdown_renders_what_is_there(raw, expected):
    assert html_of(raw) == expected


# --- parts -----------------------------------------------------------------------------


def test_short_answer_is_one_part_equal_to_the_text():
    result = render("**Да**, можно.", "telegram_html")

    assert result.parts == (result.text,)


def test_parts_cut_at_a_paragraph_boundary_first():
    first, second = "а" * 3000, "б" * 3000

    parts = render(f"{first}\n\n{second}", "telegram_html").parts

    assert parts == (first, second)


def test_parts_cut_at_a_line_when_there_is_no_paragraph_boundary():
    first, second = "а" * 3000, "б" * 3000

    assert render(f"{first}\n{second}", "telegram_html").parts == (first, second)


def test_parts_cut_at_a_word_when_there_is_no_line_boundary():
    raw = " ".join(["слово"] * 1500)

    parts = render(raw, "telegram_html").parts

    assert len(parts) == 3
    assert all(p.startswith("слово") and p.endswith("слово") for p in parts)


def test_an_enormous_word_is_cut_anywhere():
    parts = render("ж" * 9000, "telegram_html").parts

    assert [len(p) for p in parts] == [4096, 4096, 808]


def test_tags_are_closed_and_reopened_across_a_cut():
    parts = render("**" + " ".join(["жирное"] * 1000) + "**", "telegram_html").parts

    assert len(parts) == 2
    for part in parts:
        check(part)
        assert part.startswith("<b>") and part.endswith("</b>")


def test_code_block_reopens_with_its_language_in_the_next_part():
    code = "\n".join(f"x{i} = a < b" for i in range(600))

    parts = render(f"```python\n{code}\n```", "telegram_html").parts

    assert len(parts) >= 2
    for part in parts:
        check(part)
        assert part.startswith('<pre><code class="language-python">')


def test_visible_length_counts_utf16_units():
    # An emoji outside the BMP is two UTF-16 units: 3000 of them do not fit in one part.
    parts = render("😀" * 3000, "telegram_html").parts

    assert [len(p) for p in parts] == [2048, 952]


def test_visible_length_counts_an_entity_as_one_character():
    parts = render("<" * TELEGRAM_MAX_CHARS, "telegram_html").parts

    assert parts == ("&lt;" * TELEGRAM_MAX_CHARS,)


def test_an_enormous_word_is_not_cut_inside_an_emoji_sequence():
    family = "👨\u200d👩\u200d👧"  # one visible emoji, five code points
    parts = render(family * 2000, "telegram_html").parts

    for part in parts:
        check(part)
        assert part.startswith("👨") and part.endswith("👧")


# --- markdown and plain ------------------------------------------------------------------


def test_markdown_returns_the_model_text_as_it_came():
    raw = "## Итог\n\n**жирный** <script> & `код`\n"

    assert render(raw, "markdown").text == raw


def test_markdown_parts_split_the_raw_text():
    parts = render(LONG_ANSWER, "markdown").parts

    assert len(parts) >= 2
    assert_valid_parts(render(LONG_ANSWER, "markdown"), "markdown")
    assert "".join(parts).replace("\n", "") == LONG_ANSWER.replace("\n", "")


def test_plain_removes_markup_and_keeps_the_words():
    raw = "## Итог\n\n**Жирный** и _курсив_, `код`, ~~старое~~.\n\n- пункт\n\n```\nx = 1\n```"

    text = render(raw, "plain").text

    assert not re.search(r"<[a-z/]|\*\*|`|~~|##", text)
    assert_words_in_order(raw, text)


def test_plain_link_becomes_text_and_url():
    assert render(f"[отчёт]({LINK})", "plain").text == f"отчёт ({LINK})"


def test_plain_keeps_html_looking_text():
    assert render("цена < 500 & <b>", "plain").text == "цена < 500 & <b>"


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("raw", ["", "   ", "\n\n"])
def test_blank_answer_has_no_parts(fmt, raw):
    assert render(raw, fmt).parts == ()


def test_unknown_format_raises_value_error():
    with pytest.raises(ValueError, match="unknown format"):
        render("текст", "html")


# --- the checker itself ------------------------------------------------------------------


@pytest.mark.parametrize(
    "html",
    [
        "a &lt; b &gt; c &amp; d &quot; &#128512; &#x1F600;",
        "<b>a <i>b <u>c <s>d</s></u></i></b>",
        '<a href="https://wb.ru/?a=1&amp;b=2"><b>a</b></a>',
        '<pre><code class="language-python">x &lt; 1</code></pre>',
        "<blockquote>a <code>b</code></blockquote>",
    ],
)
def test_checker_accepts_telegram_html(html):
    check(html)


@pytest.mark.parametrize(
    ("html", "reason"),
    [
        ("a < b", "'<'"),
        ("a > b", "raw '>'"),
        ("Q&A", "'&'"),
        ("&copy;", "'&'"),
        ("<b>x", "unclosed"),
        ("<b><i>x</b></i>", "improper nesting"),
        ("x</b>", "closes nothing"),
        ("<br>", "does not know"),
        ('<span class="tg-spoiler">x</span>', "outside the contract"),
        ('<a href="/x">y</a>', "no absolute URL"),
        ('<a href="https://a?x=1&b=2">x</a>', "'&'"),
        ('<a href="https://a"><a href="https://b">x</a></a>', "<a> inside <a>"),
        ('<a href="https://a"><code>x</code></a>', "<code> inside <a>"),
        ("<pre><b>x</b></pre>", "inside <pre>"),
        ("<code><i>x</i></code>", "inside <code>"),
        ("<pre>t<code>x</code></pre>", "all of <pre>"),
        ('<code class="language-x">x</code>', "outside <pre>"),
        ("<blockquote><blockquote>x</blockquote></blockquote>", "nested quote"),
        ('<b class="x">y</b>', "not allowed"),
        ("<b></b>", "no visible text"),
        ("x" * (TELEGRAM_MAX_CHARS + 1), "UTF-16 units"),
        ("😀" * (TELEGRAM_MAX_CHARS // 2 + 1), "UTF-16 units"),
        ("&#0;", "no character"),
    ],
)
def test_checker_rejects_what_telegram_refuses_or_we_do_not_promise(html, reason):
    with pytest.raises(AssertionError, match=re.escape(reason)):
        check(html)


# --- properties ------------------------------------------------------------------------

WORDS = st.sampled_from(
    [
        "возврат",
        "цена",
        "FBS",
        "артикул",
        "Q&A",
        "500",
        "₽",
        "😀",
        "👩\u200d💻",  # a ZWJ sequence
        "שלום\u200f",  # Hebrew with a right-to-left mark
        "\u202bمرحبا\u202c",  # Arabic in an RTL embedding
        "и\u0306",  # й as a letter and a combining mark
        "x_y",
        "C++",
    ]
)
STRAYS = st.sampled_from(["<", ">", "&", "**", "`", "_", "*", "<script>", "</b>", "[", "]", "~~"])
URLS = st.sampled_from([LINK, "https://wb.ru/?a=1&b=2", "https://x.io/p/q"])


@st.composite
def paragraphs(draw) -> tuple[str, str]:
    """(Markdown, its words) of one paragraph of inline pieces."""
    markdown, text = [], []
    for _ in range(draw(st.integers(1, 8))):
        word = " ".join(draw(st.lists(WORDS, min_size=1, max_size=4)))
        kind = draw(st.sampled_from(["plain", "bold", "italic", "code", "strike", "link", "stray"]))
        if kind == "link":
            url = draw(URLS)
            markdown.append(f"[{word}]({url})")
            text.append(f"{word} {url}")
        elif kind == "stray":
            stray = draw(STRAYS)
            markdown.append(f"{stray} {word}")
            text.append(word)
        else:
            mark = {"plain": "", "bold": "**", "italic": "_", "code": "`", "strike": "~~"}[kind]
            markdown.append(f"{mark}{word}{mark}")
            text.append(word)
    return " ".join(markdown), " ".join(text)


@st.composite
def blocks(draw) -> tuple[str, str]:
    """(Markdown, its words) of one block; fence info strings are markup, not words."""
    kind = draw(st.sampled_from(["para", "heading", "list", "fence", "quote", "long", "word"]))
    if kind == "long":
        word = draw(WORDS)
        count = draw(st.integers(300, 1500))
        return " ".join([word] * count), " ".join([word] * count)
    if kind == "word":
        word = draw(st.sampled_from(["ж", "😀", "👩\u200d💻", "a\u0301"]))
        return word * draw(st.integers(2000, 5000)), word
    if kind == "fence":
        lang = draw(st.sampled_from(["", "python", "sql"]))
        code = "\n".join(draw(st.lists(st.sampled_from(["a < b & c", "x = 1", "  y"]), max_size=4)))
        closed = draw(st.booleans())
        return f"```{lang}\n{code}" + ("\n```" if closed else ""), code
    markdown, text = draw(paragraphs())
    if kind == "heading":
        return "#" * draw(st.integers(1, 4)) + " " + markdown, text
    if kind == "quote":
        return "> " + markdown, text
    if kind == "list":
        items = [markdown] + [draw(paragraphs())[0] for _ in range(draw(st.integers(0, 2)))]
        texts = [text] + [""] * (len(items) - 1)
        ordered = draw(st.booleans())
        lines = [
            ("  " if i % 2 else "") + (f"{i + 1}. " if ordered else "- ") + item
            for i, item in enumerate(items)
        ]
        # Only the first item's words are tracked; the others are drawn for structure.
        return "\n".join(lines), texts[0]
    return markdown, text


@st.composite
def answers(draw) -> tuple[str, str]:
    """(Markdown, the words that must survive) of a whole model answer."""
    drawn = draw(st.lists(blocks(), min_size=1, max_size=6))
    separators = [draw(st.sampled_from(["\n\n", "\n", "\n\n\n"])) for _ in drawn]
    markdown = "".join(block + sep for (block, _), sep in zip(drawn, separators, strict=True))
    return markdown, " ".join(text for _, text in drawn)


@PROPERTY
@given(answer=answers(), fmt=st.sampled_from(FORMATS))
def test_every_part_is_valid_and_the_words_survive_in_order(answer, fmt):
    markdown, text = answer

    result = render(markdown, fmt)

    assert_valid_parts(result, fmt)
    assert_words_in_order(text, "".join(shown(part, fmt) for part in result.parts))


@PROPERTY
@given(answer=answers(), cut=st.floats(0, 1), fmt=st.sampled_from(FORMATS))
def test_every_prefix_of_an_answer_renders_valid(answer, cut, fmt):
    prefix = answer[0][: int(len(answer[0]) * cut)]
    if prefix.strip():
        assert_valid_parts(render(prefix, fmt), fmt)


MARKDOWNISH = st.text(
    alphabet=st.sampled_from(list("*_`#->[]()!<&;:|~\\\n 1.\t=+") + ["a", "я", "😀", "\u200d"]),
    max_size=300,
)


@PROPERTY
@given(raw=st.one_of(MARKDOWNISH, st.text(max_size=300)), fmt=st.sampled_from(FORMATS))
def test_arbitrary_text_renders_valid_parts(raw, fmt):
    result = render(raw, fmt)

    if raw.strip():
        assert_valid_parts(result, fmt)
        if fmt == "telegram_html":
            check(result.text, max_chars=None)
    else:
        assert result.parts == ()


PROSE = st.text(
    alphabet=st.sampled_from(list("абв xyz.,?!:;()'\"%$@/\n-1#") + ["\u00a0", "😀"]), max_size=200
)


@PROPERTY
@given(raw=PROSE)
def test_fast_path_for_plain_prose_equals_the_parser(raw):
    # The fast path skips the parser for text with no markup; it must change nothing.
    assume(is_plain_prose(raw) and raw.strip())

    assert fast_runs(raw) == parsed_runs(raw, plain=False)
