"""Markdown → runs: what the model wrote, as pieces of visible text with their tags.

The Markdown is parsed by pyromark (pulldown-cmark, a CommonMark parser in Rust);
we only walk its events. It parses an answer with about 1/30 of the CPU of
markdown-it-py or mistune, which matters as render runs on every answer and on every
streamed prefix; the ready-made Telegram converters lost text (telegramify-markdown
drops raw HTML) or made HTML Telegram refuses (chatgpt-md-converter mis-nests tags).
The walk produces *runs*: pieces of visible text, each with the stack of Telegram tags
around it (app/render/parts.py escapes, closes, reopens and cuts them).
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field

import pyromark

# Tables are off on purpose: GFM drops the cells of a row beyond the header's width,
# and the contract never drops text; a table stays readable as its own lines.
_MARKDOWN = pyromark.Markdown(options=pyromark.Options.ENABLE_STRIKETHROUGH)

# Any of these may start inline markup anywhere in a line (or is a control character
# the parser rewrites); without them and without a block marker at a line start, the
# text is plain paragraphs and skips the parser (fast path, equal to the parsed result).
_INLINE_SPECIAL = re.compile(r"[\x00-\x09\x0b-\x1f\\`*_\[\]<>&~]")
_LINE_START_SPECIAL = frozenset(" #>-+=0123456789")

_LINK_SCHEMES = ("http://", "https://", "tg://")
_RULE = "——————"
_MAX_INDENT_LEVELS = 6

Tag = tuple[str, str]  # (start tag, end tag) as written: '<a href="…">', "</a>"
Run = tuple[str, tuple[Tag, ...]]


def runs(raw: str, *, plain: bool) -> list[Run]:
    """The runs of ``raw``; ``plain`` leaves out the tags (and shows links' URLs)."""
    return fast_runs(raw) if is_plain_prose(raw) else parsed_runs(raw, plain=plain)


def is_plain_prose(raw: str) -> bool:
    """True when the parser could only find paragraphs in ``raw``."""
    if _INLINE_SPECIAL.search(raw):
        return False
    return not any(line[:1] in _LINE_START_SPECIAL for line in raw.split("\n") if line)


def fast_runs(raw: str) -> list[Run]:
    """What the parser makes of plain prose: paragraphs of lines, trailing spaces cut."""
    paragraphs, lines = [], []
    for line in raw.split("\n"):
        line = line.rstrip(" ")
        if line:
            lines.append(line)
        elif lines:
            paragraphs.append("\n".join(lines))
            lines = []
    if lines:
        paragraphs.append("\n".join(lines))
    return [("\n\n".join(paragraphs), ())]


def parsed_runs(raw: str, *, plain: bool) -> list[Run]:
    """Walk the parser's events; fall back to the raw text when nothing visible is left."""
    walker = _Walker(plain=plain)
    for event in _MARKDOWN.events(_keep_reference_definitions(raw) if "]:" in raw else raw):
        walker.feed(event)
    runs = [("".join(pieces), stack) for pieces, stack in walker.runs]
    if not any(text.strip() for text, _ in runs):
        # e.g. an empty fence or a bare "#": Telegram refuses an empty message.
        return [(raw, ())]
    return runs


def _keep_reference_definitions(raw: str) -> str:
    """Escape the ``[`` of each link reference definition so it stays visible text.

    CommonMark removes definitions (``[1]: https://…``) from the output, which would
    drop text the model wrote; an escaped bracket makes the line an ordinary paragraph.
    """
    # A label defined twice is reported once, so a second pass finds the second one.
    for _ in range(8):
        definitions = _MARKDOWN.reference_definitions(raw).values()
        if not definitions:
            break
        data = raw.encode()
        for start in sorted((d["span"]["start"] for d in definitions), reverse=True):
            if data[start : start + 1] == b"[":  # byte offsets: insert from the end
                data = data[:start] + b"\\" + data[start:]
        if len(data) == len(raw.encode()):
            break
        raw = data.decode()
    return raw


def _href(url: str) -> str | None:
    """The URL as a Telegram link target, or None when Telegram would refuse it."""
    # isprintable() is False for every whitespace but " ": Telegram takes no blank in a URL.
    if url.lower().startswith(_LINK_SCHEMES) and url.isprintable() and " " not in url:
        return url
    return None


def _language(info: str) -> str:
    """The fence's language if it is a plain identifier (it ends up in an attribute)."""
    lang = info.split(maxsplit=1)[0] if info.strip() else ""
    if lang.isascii() and all(c.isalnum() or c in "_+#.-" for c in lang):
        return lang
    return ""


class _Walker:
    """Turns pyromark events into runs; one instance per render."""

    _INLINE_TAGS = {
        "Strong": ("<b>", "</b>"),
        "Emphasis": ("<i>", "</i>"),
        "Strikethrough": ("<s>", "</s>"),
        "Heading": ("<b>", "</b>"),
    }

    def __init__(self, *, plain: bool) -> None:
        self.plain = plain
        self.runs: list[tuple[list[str], tuple[Tag, ...]]] = []  # joined once at the end
        self.stack: tuple[Tag, ...] = ()
        self.pushed: list[bool] = []  # per open inline tag: did it add to the stack?
        self.sep = ""  # whitespace owed before the next visible text
        self.sep_stack: tuple[Tag, ...] | None = None  # where that whitespace belongs
        self.lists: list[int | None] = []  # next number of each open list, None: bullets
        self.links: list[_Link] = []  # open links, outermost first
        self.block: list[str] | None = None  # text of the open code or HTML block
        self.block_tags: tuple[Tag, ...] = ()

    # -- output

    def emit(self, text: str, stack: tuple[Tag, ...] | None = None) -> None:
        stack = self.stack if stack is None else stack
        if self.sep and self.runs:
            self._append(self.sep, self.stack if self.sep_stack is None else self.sep_stack)
        self.sep, self.sep_stack = "", None
        self._append(text, stack)
        for link in self.links:
            link.label.append(text)

    def _append(self, text: str, stack: tuple[Tag, ...]) -> None:
        if self.runs and self.runs[-1][1] == stack:
            self.runs[-1][0].append(text)
        elif text:
            self.runs.append(([text], stack))

    def owe(self, sep: str) -> None:
        """Ask for ``sep`` between the previous and the next block (the longest wins)."""
        if len(sep) > len(self.sep):
            self.sep = sep

    def pin_sep(self) -> None:
        """A block with its own tag starts: the owed whitespace goes outside that tag."""
        if self.sep_stack is None:
            self.sep_stack = self.stack

    def block_sep(self) -> str:
        return "\n" if self.lists else "\n\n"

    # -- events

    def feed(self, event: str | dict) -> None:
        if isinstance(event, str):  # "SoftBreak", "HardBreak" or "Rule"
            if event == "Rule":
                self.emit(_RULE)
                self.owe(self.block_sep())
            elif self.block is None:
                self.emit("\n")
            return
        ((kind, value),) = event.items()
        if kind == "Text" or kind == "Html" or kind == "InlineHtml":
            # Raw HTML is shown as text: "<script>" reaches the seller escaped.
            if self.block is not None:
                self.block.append(value)
            else:
                self.emit(value)
        elif kind == "Code":
            self.inline_code(value)
        elif kind == "Start":
            self.start(value if isinstance(value, str) else next(iter(value)), value)
        elif kind == "End":
            self.end(value if isinstance(value, str) else next(iter(value)))

    def inline_code(self, code: str) -> None:
        # Telegram lets no entity contain code inside a link, and a blank one is noise.
        if self.links or not code.strip() or self.plain:
            self.emit(code)
        else:
            self.emit(code, self.stack + (("<code>", "</code>"),))

    def start(self, name: str, value: str | dict) -> None:
        if name in self._INLINE_TAGS:
            self.push(self._INLINE_TAGS[name])
        elif name == "BlockQuote":
            self.pin_sep()
            # Telegram refuses a quote inside a quote; push() drops the inner one.
            self.push(("<blockquote>", "</blockquote>"))
        elif name == "CodeBlock" or name == "HtmlBlock":
            self.pin_sep()
            self.block = []
            kind = value["CodeBlock"] if isinstance(value, dict) else "HtmlBlock"
            if name == "HtmlBlock" or self.plain:
                self.block_tags = self.stack
            else:
                lang = _language(kind["Fenced"]) if isinstance(kind, dict) else ""
                pre = (("<pre>", "</pre>"),)
                code = ((f'<code class="language-{lang}">', "</code>"),) if lang else ()
                self.block_tags = self.stack + pre + code
        elif name == "List":
            self.lists.append(value["List"])
        elif name == "Item":
            self.owe("\n")
            number = self.lists[-1]
            marker = "• " if number is None else f"{number}. "
            if number is not None:
                self.lists[-1] = number + 1
            self.emit("  " * min(len(self.lists) - 1, _MAX_INDENT_LEVELS) + marker)
        elif name == "Link" or name == "Image":
            self.start_link(value[name])

    def end(self, name: str) -> None:
        if name in self._INLINE_TAGS:
            self.pop()
            if name == "Heading":
                self.owe("\n")  # the heading's bold line, then its section
        elif name == "Paragraph":
            self.owe(self.block_sep())
        elif name == "BlockQuote":
            self.pop()
            self.owe("\n\n")
        elif name == "CodeBlock" or name == "HtmlBlock":
            text = "".join(self.block or ()).rstrip("\n")
            self.block = None
            if text.strip():  # an empty fence is markup only; no empty <pre>
                self.emit(text, self.block_tags)
            self.owe(self.block_sep())
        elif name == "List":
            self.lists.pop()
            self.owe(self.block_sep())
        elif name == "Item":
            self.owe("\n")
        elif name == "Link" or name == "Image":
            self.end_link()

    def push(self, tag: Tag) -> None:
        self.pin_sep()  # blank lines between blocks stay outside bold, links, quotes
        # The same tag inside itself (bold in a bold heading) would nest entities.
        is_new = all(open_tag[1] != tag[1] for open_tag in self.stack)
        self.pushed.append(is_new)
        if is_new:
            self.stack = self.stack + (tag,)

    def pop(self) -> None:
        if self.pushed.pop():
            self.stack = self.stack[:-1]
            if self.sep_stack is not None and len(self.sep_stack) > len(self.stack):
                self.sep_stack = self.stack  # its block closed with no text: not inside it

    def start_link(self, data: dict) -> None:
        url = data["dest_url"]
        # Telegram forbids a link inside a link; the outer one keeps its href.
        href = None if self.links or self.plain else _href(url)
        if href is None:
            self.pushed.append(False)
        else:
            self.push((f'<a href="{html.escape(href)}">', "</a>"))
        self.links.append(_Link(url, has_href=href is not None))

    def end_link(self) -> None:
        link = self.links.pop()
        label = "".join(link.label).strip()
        if not label:
            self.emit(link.url)  # "[](url)": the URL is the only text there is
            label = link.url
        self.pop()
        if not link.has_href and link.url and link.url not in label:
            self.emit(f" ({link.url})")  # the address stays readable: "text (url)"


@dataclass
class _Link:
    """An open link: its target and the text shown for it so far."""

    url: str
    has_href: bool
    label: list[str] = field(default_factory=list)
