"""The common-answer cache (Redis): a seller's first, general question that
another seller already asked is answered without calling the model.

Only a prompt that holds nothing of the seller is looked up — no past
exchanges, no summary, no seller data, no tool results — and only answers
for which no tool ran are stored, so an answer that quotes one seller's
numbers never reaches another. The key is the model, the system prompt's
version, the tools offered (none, or the registry's version) and the
normalised question: case folded, spaces collapsed, trailing punctuation
dropped. No similarity matching: "цена 500" and "цена 600" are two questions
and never share an answer.

A hit is an answer like any other (a unit spent, saved in history) with
``cached: true`` and ``tokens_used`` 0. Entries live ``ANSWER_CACHE_TTL``;
``ANSWER_CACHE=false`` turns the cache off.
"""

from __future__ import annotations

import hashlib
import json
import re

from app.cache import Cache
from app.chat.prompts import SYSTEM_PROMPT
from app.mainserver import TOOL_SPECS

_SPACES = re.compile(r"\s+")
_TRAILING = re.compile(r"[\s.!?…,;:)(\"'«»]+$")
PROMPT_VERSION = hashlib.sha256(SYSTEM_PROMPT.encode()).hexdigest()[:16]


# The registry's specs are the only tools a send offers (app.chat.seller_data):
# their digest, computed once.
TOOLS_VERSION = hashlib.sha256(json.dumps(TOOL_SPECS, sort_keys=True).encode()).hexdigest()[:16]


def normalised(question: str) -> str:
    """The question as the cache compares it."""
    return _TRAILING.sub("", _SPACES.sub(" ", question.casefold()).strip())


def key(model: str, tools: list[dict] | None, question: str) -> str:
    """The entry's key (a digest: questions are up to 4000 characters);
    ``tools``: what the send offers, the registry's specs or None."""
    offered = TOOLS_VERSION if tools else "none"
    return Cache.digest(model, PROMPT_VERSION, offered, normalised(question))


def get(cache: Cache, entry_key: str) -> tuple[str, str] | None:
    """The cached (text, model) of a question, or None (miss, or any doubt)."""
    raw = cache.get("answer", entry_key)
    if raw is None:
        return None
    try:
        value = json.loads(raw)
        return value["text"], value["model"]
    except (ValueError, KeyError, TypeError):
        return None


def put(cache: Cache, entry_key: str, text: str, model: str, ttl: int) -> None:
    cache.set("answer", entry_key, json.dumps({"text": text, "model": model},
                                              ensure_ascii=False), ttl)
