"""A strict checker of Telegram's HTML (Bot API, parse_mode=HTML) for the tests.

Written apart from app/render/ on purpose, from the Bot API's "HTML style" section:
a bug shared by the renderer and its checker would pass unseen. It is stricter than
Telegram where Telegram would silently lose formatting (entities nested where the API
forbids it) and where our contract promises less (only b, i, u, s, code, pre, a,
blockquote). `check` raises AssertionError with the reason and the place.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

MAX_CHARS = 4096

# Tag → attributes it may carry, per the Bot API's "HTML style".
TELEGRAM_TAGS: dict[str, frozenset[str]] = {
    "b": frozenset(),
    "strong": frozenset(),
    "i": frozenset(),
    "em": frozenset(),
    "u": frozenset(),
    "ins": frozenset(),
    "s": frozenset(),
    "strike": frozenset(),
    "del": frozenset(),
    "span": frozenset({"class"}),
    "tg-spoiler": frozenset(),
    "a": frozenset({"href"}),
    "tg-emoji": frozenset({"emoji-id"}),
    "code": frozenset({"class"}),
    "pre": frozenset(),
    "blockquote": frozenset({"expandable"}),
}
CONTRACT_TAGS = frozenset({"b", "i", "u", "s", "code", "pre", "a", "blockquote"})
# The API: "All other entities can't contain each other" (code, pre, a, emoji);
# code inside pre is not nesting but the way to give pre a language.
_EXCLUSIVE = frozenset({"a", "code", "pre", "tg-emoji"})

_TAG = re.compile(r"<(/?)([a-z][a-z0-9-]*)((?:\s+[a-z][a-z-]*(?:=(?:\"[^\"]*\"|'[^']*'))?)*)\s*>")
_ATTR = re.compile(r"\s+([a-z][a-z-]*)(?:=(?:\"([^\"]*)\"|'([^']*)'))?")
_ENTITY = re.compile(r"&(?:(lt|gt|amp|quot)|#([0-9]{1,7})|#[xX]([0-9a-fA-F]{1,6}));")
_NAMED = {"lt": "<", "gt": ">", "amp": "&", "quot": '"'}


@dataclass
class Event:
    """One piece of the markup: text (decoded), a start tag or an end tag."""

    kind: str  # "text", "start" or "end"
    name: str = ""
    attrs: dict[str, str | None] = field(default_factory=dict)
    text: str = ""


def parse(html: str) -> list[Event]:
    """Tokenize ``html`` strictly: every ``<`` starts a tag, every ``&`` an entity."""
    events: list[Event] = []
    text: list[str] = []  # decoded text since the last tag
    pos = 0
    while pos < len(html):
        char = html[pos]
        if char == "<":
            match = _TAG.match(html, pos)
            _require(match is not None, html, pos, "'<' that does not start a valid tag")
            closing, name, raw_attrs = match.groups()
            attrs = _attributes(raw_attrs, html, pos)
            _require(not (closing and attrs), html, pos, f"attributes on </{name}>")
            if text:
                events.append(Event("text", text="".join(text)))
                text = []
            events.append(Event("end" if closing else "start", name, attrs))
            pos = match.end()
        elif char == "&":
            decoded, pos = _entity(html, pos)
            text.append(decoded)
        else:
            end = min(
                (i for i in (html.find("<", pos), html.find("&", pos)) if i >= 0), default=len(html)
            )
            chunk = html[pos:end]
            _require(">" not in chunk, html, pos + chunk.find(">"), "raw '>' (write &gt;)")
            text.append(chunk)
            pos = end
    if text:
        events.append(Event("text", text="".join(text)))
    return events


def check(html: str, *, max_chars: int | None = MAX_CHARS, contract: bool = True) -> None:
    """Fail unless Telegram accepts ``html`` as one message, with nothing lost.

    ``max_chars=None`` skips the length limit (a whole answer before splitting);
    ``contract=False`` accepts every tag Telegram knows, not only the ones we promise.
    """
    stack: list[_Open] = []
    for event in parse(html):
        if event.kind == "text":
            if stack and stack[-1].name == "pre":
                stack[-1].has_text = True
                assert not stack[-1].had_code, f"text after </code> inside <pre>: {html!r:.200}"
            continue
        if event.kind == "end":
            assert stack, f"</{event.name}> closes nothing: {html!r:.200}"
            top = stack.pop()
            assert top.name == event.name, (
                f"</{event.name}> closes <{top.name}> (improper nesting): {html!r:.200}"
            )
            if top.name == "code" and stack and stack[-1].name == "pre":
                stack[-1].had_code = True
            continue
        _check_start(event, stack, contract, html)
        stack.append(_Open(event.name))
    assert not stack, f"unclosed <{stack[-1].name}> at the end: {html!r:.200}"
    shown = visible_text(html)
    assert shown.strip(), f"no visible text (Telegram refuses an empty message): {html!r:.200}"
    if max_chars is not None:
        units = len(shown.encode("utf-16-le", "surrogatepass")) // 2
        assert units <= max_chars, f"{units} UTF-16 units of visible text > {max_chars}"


def visible_text(html: str) -> str:
    """The text Telegram shows for ``html``: tags removed, entities decoded."""
    return "".join(event.text for event in parse(html) if event.kind == "text")


@dataclass
class _Open:
    name: str
    has_text: bool = False
    had_code: bool = False


def _check_start(event: Event, stack: list[_Open], contract: bool, html: str) -> None:
    name, attrs = event.name, event.attrs
    where = f"<{name}> in {html!r:.200}"
    assert name in TELEGRAM_TAGS, f"tag Telegram does not know: {where}"
    assert not contract or name in CONTRACT_TAGS, f"tag outside the contract's list: {where}"
    unknown = set(attrs) - TELEGRAM_TAGS[name]
    assert not unknown, f"attributes {sorted(unknown)} not allowed: {where}"
    parent = stack[-1] if stack else None
    code_in_pre = name == "code" and parent is not None and parent.name == "pre"
    if code_in_pre:
        assert not parent.has_text and not parent.had_code, f"<code> must be all of <pre>: {where}"
    else:
        inside = [open_.name for open_ in stack if open_.name in ("pre", "code")]
        assert not inside, f"an entity inside <{inside[-1]}>: {where}"
    if name in _EXCLUSIVE and not code_in_pre:
        clash = [open_.name for open_ in stack if open_.name in _EXCLUSIVE]
        assert not clash, f"<{name}> inside <{clash[-1]}>: {where}"
    if name == "blockquote":
        assert all(open_.name != "blockquote" for open_ in stack), f"nested quote: {where}"
        assert attrs.get("expandable", None) is None, f"expandable takes no value: {where}"
    if name == "a":
        href = attrs.get("href") or ""
        assert re.match(r"[a-z][a-z0-9+.-]*://\S+$", href), f"href is no absolute URL: {where}"
    if name == "code" and "class" in attrs:
        assert code_in_pre, f"a language class outside <pre>: {where}"
        assert re.fullmatch(r"language-\S+", attrs["class"] or ""), f"bad class: {where}"
    if name == "span":
        assert attrs.get("class") == "tg-spoiler", f'span needs class="tg-spoiler": {where}'
    if name == "tg-emoji":
        assert (attrs.get("emoji-id") or "").isdigit(), f"tg-emoji needs emoji-id: {where}"


def _attributes(raw: str, html: str, pos: int) -> dict[str, str | None]:
    attrs: dict[str, str | None] = {}
    for match in _ATTR.finditer(raw):
        name, double, single = match.groups()
        _require(name not in attrs, html, pos, f"attribute {name} twice")
        value = double if double is not None else single
        attrs[name] = None if value is None else _decode_value(value, html, pos)
    return attrs


def _decode_value(value: str, html: str, pos: int) -> str:
    _require("<" not in value and ">" not in value, html, pos, "raw '<' or '>' in an attribute")
    out, at = [], 0
    while (amp := value.find("&", at)) >= 0:
        out.append(value[at:amp])
        text, at = _entity(value, amp)
        out.append(text)
    out.append(value[at:])
    return "".join(out)


def _entity(html: str, pos: int) -> tuple[str, int]:
    match = _ENTITY.match(html, pos)
    _require(match is not None, html, pos, "'&' that starts no &lt; &gt; &amp; &quot; &#N;")
    named, decimal, hexadecimal = match.groups()
    if named:
        return _NAMED[named], match.end()
    code = int(decimal) if decimal else int(hexadecimal, 16)
    valid = 0 < code <= 0x10FFFF and not 0xD800 <= code <= 0xDFFF
    _require(valid, html, pos, f"numeric entity of no character ({code})")
    return chr(code), match.end()


def _require(ok: bool, html: str, pos: int, reason: str) -> None:
    if not ok:
        raise AssertionError(f"{reason} at {pos}: …{html[max(pos - 40, 0) : pos + 40]!r}…")


# --- words the reader must still find ---------------------------------------------


def words(text: str) -> list[str]:
    """Runs of letters and digits: what a reader must still find in the answer."""
    return re.findall(r"[^\W_]+", text)


def shown_with_attributes(html: str) -> str:
    """Visible text, plus each link's href after its text and each fence's language.

    Both are words the model wrote that Telegram shows in another way (a tappable link,
    a code block header), so the word checks count them as shown, in the place where
    the Markdown wrote them.
    """
    out = []
    hrefs = []
    for event in parse(html):
        if event.kind == "text":
            out.append(event.text)
        elif event.kind == "start" and event.name == "a":
            hrefs.append(event.attrs["href"])
        elif event.kind == "end" and event.name == "a":
            out.append(f" {hrefs.pop()} ")
        elif event.kind == "start" and event.name == "code" and event.attrs.get("class"):
            out.append(f"{event.attrs['class'].removeprefix('language-')} ")
    return "".join(out)


def assert_words_in_order(expected: str, actual: str) -> None:
    """Each word of ``expected`` occurs in ``actual``, in order.

    Matched as substrings of the parts' joined text, since a cut may glue the last word
    of one part to the first of the next, or split an enormous word in two.
    """
    at = 0
    for word in words(expected):
        found = actual.find(word, at)
        assert found >= 0, f"{word!r} lost or out of order after …{actual[at - 60 : at]!r}"
        at = found + len(word)
