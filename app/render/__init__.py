"""Rendering of the model's answer for the bot: Telegram HTML, Markdown or plain text.

A pure function, no Flask or database: ``render(raw, fmt)`` gives the whole text and
the parts to send, each within Telegram's 4096 characters and valid on its own.
``markdown`` walks the parser's events into runs of text with their tags; ``parts``
turns runs into HTML and cuts them.
"""

from __future__ import annotations

from dataclasses import dataclass

from app.render.markdown import runs
from app.render.parts import TELEGRAM_MAX_CHARS, serialize, split

__all__ = ["FORMATS", "TELEGRAM_MAX_CHARS", "Rendered", "render"]

FORMATS = ("telegram_html", "markdown", "plain")


@dataclass(frozen=True)
class Rendered:
    """The answer in one format: the whole text and the parts to send one by one."""

    text: str
    parts: tuple[str, ...]


def render(raw: str, fmt: str) -> Rendered:
    """Render the model's Markdown ``raw`` (complete or a prefix of a stream) as ``fmt``.

    Raises:
        ValueError: ``fmt`` is not one of ``FORMATS``.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}, expected one of {', '.join(FORMATS)}")
    if not raw.strip():
        return Rendered(text=raw if fmt == "markdown" else "", parts=())
    if fmt == "markdown":
        return Rendered(text=raw, parts=split([(raw, ())], raw, as_html=False))
    pieces = runs(raw, plain=fmt == "plain")
    as_html = fmt == "telegram_html"
    text = serialize(pieces) if as_html else "".join(t for t, _ in pieces)
    return Rendered(text=text, parts=split(pieces, text, as_html=as_html))
