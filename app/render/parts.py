"""Runs → Telegram HTML, and the cut into parts of one Telegram message each.

A part holds at most ``TELEGRAM_MAX_CHARS`` visible characters, counted in UTF-16
units as Telegram counts them; it is cut at a paragraph, else a line, else a word,
and is valid on its own: the tags open at a cut are closed at the end of one part
and reopened at the start of the next. Runs are never cut inside a tag or an
entity, because escaping and tags are added here, after the cut is chosen.
"""

from __future__ import annotations

import unicodedata
from bisect import bisect_right

from app.render.markdown import Run, Tag

TELEGRAM_MAX_CHARS = 4096


def serialize(runs: list[Run]) -> str:
    """Runs as Telegram HTML: text escaped, each tag change closed and opened in order."""
    out: list[str] = []
    open_tags: tuple[Tag, ...] = ()
    for text, stack in runs:
        if stack != open_tags:
            common = 0
            for mine, theirs in zip(open_tags, stack, strict=False):
                if mine != theirs:
                    break
                common += 1
            for _, end_tag in reversed(open_tags[common:]):
                out.append(end_tag)
            for start_tag, _ in stack[common:]:
                out.append(start_tag)
            open_tags = stack
        out.append(text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;"))
    for _, end_tag in reversed(open_tags):
        out.append(end_tag)
    return "".join(out)


def _utf16_len(text: str) -> int:
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


def split(runs: list[Run], rendered: str, *, as_html: bool) -> tuple[str, ...]:
    """Cut the runs' visible text into parts of at most TELEGRAM_MAX_CHARS UTF-16 units.

    ``rendered`` is the runs' whole text in the format: the one part of a short answer.
    """
    full = "".join(text for text, _ in runs) if as_html else rendered
    if len(full) <= TELEGRAM_MAX_CHARS // 2 or _utf16_len(full) <= TELEGRAM_MAX_CHARS:
        return (rendered,)
    starts, offset = [], 0
    for text, _ in runs:
        starts.append(offset)
        offset += len(text)
    parts = []
    for begin, stop in _cuts(full):
        if not as_html:
            parts.append(full[begin:stop])
            continue
        first = bisect_right(starts, begin) - 1
        piece = []
        for i in range(first, len(runs)):
            if starts[i] >= stop:
                break
            text, stack = runs[i]
            piece.append((text[max(begin - starts[i], 0) : stop - starts[i]], stack))
        parts.append(serialize(piece))
    return tuple(parts)


def _cuts(full: str) -> list[tuple[int, int]]:
    """(start, end) of each part: at a paragraph, else a line, else a word boundary."""
    cuts = []
    start, length = 0, len(full)
    while True:
        while start < length and full[start] == "\n":
            start += 1
        if not full[start:].strip():
            return cuts
        end = _fit(full, start)
        if end == length:
            cuts.append((start, end))
            return cuts
        for boundary in ("\n\n", "\n", " ", "\t"):
            cut = full.rfind(boundary, start, end)
            if cut > start and full[start:cut].strip():
                cuts.append((start, cut))
                start = cut + len(boundary)
                if boundary in (" ", "\t"):
                    while start < length and full[start] in " \t":
                        start += 1
                break
        else:
            cut = _hard_cut(full, start, end)
            if full[start:cut].strip():
                cuts.append((start, cut))
            start = cut


def _fit(full: str, start: int) -> int:
    """The largest end (or nearly) such that full[start:end] fits one Telegram message."""
    end = min(len(full), start + TELEGRAM_MAX_CHARS)
    while (units := _utf16_len(full[start:end])) > TELEGRAM_MAX_CHARS:
        # Each character is one or two units: this never cuts more than one unit too much.
        end -= max(1, (units - TELEGRAM_MAX_CHARS + 1) // 2)
    return end


def _hard_cut(full: str, start: int, end: int) -> int:
    """Where to cut one enormous word: not inside a surrogate pair or a ZWJ sequence."""
    for cut in range(end, max(start + 1, end - 32), -1):
        if not _glued(full[cut - 1], full[cut]):
            return cut
    return end


def _glued(before: str, after: str) -> bool:
    return (
        "\ud800" <= before <= "\udbff"
        or before == "\u200d"
        or after in "\u200d\ufe0e\ufe0f"
        or unicodedata.combining(after) != 0
        or "\U0001f3fb" <= after <= "\U0001f3ff"  # skin-tone modifiers
    )
