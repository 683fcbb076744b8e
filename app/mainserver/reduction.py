"""From the main server's bodies to what informs the model, within a size.

The bot's bodies carry things the model cannot use or would be misled by:
the bot's ready-made ``telegram_text``, image URLs, nulls and empty lists,
fixed placeholders (shared/MAIN_SERVER_API.md names them), unrounded
percentages such as 89.67391304347827. Each tool (app.mainserver.tools)
says, as data, which subtree it keeps (``root``), which paths it drops and
which keys it renames; ``reduce_payload`` applies that, then ``compact``
the generic rules. ``fit`` turns the result into the tool message's JSON,
dropping list items from the end until it fits the size limit.

Paths are tuples of keys; ``"*"`` stands for every item of a list or every
value of a dict (e.g. ``("products", "*", "warehouses", "*", "warehouse_name")``).
"""

from __future__ import annotations

import json
import math
from typing import Any

# The bot's own text and pictures: nothing the model can read.
DROPPED_KEYS = frozenset({"telegram_text", "image_url"})
# Shares are kept to one decimal: 89.7 % informs as much as 89.67391304347827.
PERCENT_SUFFIXES = ("_percent", "_percentage", "_rate")

_ENCODE = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def dumps(value: Any) -> str:
    """Compact JSON that keeps Cyrillic as it is (a \\uXXXX escape is six characters)."""
    return _ENCODE(value)


def reduce_payload(
    payload: dict,
    root: str | None = None,
    drop: tuple[tuple[str, ...], ...] = (),
    rename: dict[tuple[str, ...], str] | None = None,
) -> Any:
    """``payload[root]`` (when it is there), without the ``drop`` paths, with
    the ``rename`` paths' last keys renamed, then ``compact``.

    Changes ``payload`` in place (the drops and renames), without a copy: its
    one caller (app.mainserver.run, through ``Tool.reduce``) passes a body
    just parsed from the main server's answer, which nothing else holds.
    """
    data = payload
    if root is not None and isinstance(data.get(root), dict):
        data = data[root]
    for path in drop:
        _apply(data, path, _delete)
    for path, new_name in (rename or {}).items():
        _apply(data, path, lambda parent, key, new=new_name: _rename(parent, key, new))
    return compact(data)


def compact(value: Any, key: str | None = None) -> Any:
    """Without nulls, empty strings, lists and dicts, ``DROPPED_KEYS``; floats
    rounded (percentages to 1 decimal, others to 2) and written as integers
    when whole (18450.0 → 18450)."""
    if isinstance(value, dict):
        kept = {}
        for name, item in value.items():
            if name in DROPPED_KEYS:
                continue
            item = compact(item, name)
            if not _empty(item):
                kept[name] = item
        return kept
    if isinstance(value, list):
        return [item for item in (compact(item) for item in value) if not _empty(item)]
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        digits = 1 if key is not None and key.endswith(PERCENT_SUFFIXES) else 2
        value = round(value, digits)
        return int(value) if value.is_integer() else value
    return value


def fit(envelope: dict, data: Any, max_chars: int) -> str | None:
    """``envelope`` with ``"data": data`` as compact JSON of at most ``max_chars``
    characters: whole when it fits, else with items dropped from the end of the
    longest lists and ``"truncated": true``; None when even that cannot fit.

    Truncating drops the items from ``data``'s own lists, in place: its caller
    (app.mainserver.run) passes what ``reduce_payload`` just built and does not
    use it afterwards.
    """
    text = dumps(_wrap(envelope, data, truncated=False))
    if len(text) <= max_chars:
        return text
    while True:
        lists = [items for items in _lists(data) if items]
        if not lists:
            return None
        longest = max(lists, key=len)
        keep = len(longest) - 1
        if len(text) > 2 * max_chars:
            # Far too long (a server that ignored the limit): cut in proportion
            # first, which always keeps more than what fits, then item by item.
            keep = min(keep, len(longest) * max_chars // len(text))
        del longest[keep:]
        text = dumps(_wrap(envelope, data, truncated=True))
        if len(text) <= max_chars:
            return text


def _wrap(envelope: dict, data: Any, truncated: bool) -> dict:
    # "data" right after the tool's name, the note (if any) after it.
    wrapped = {"tool": envelope["tool"], "data": data}
    if truncated:
        wrapped["truncated"] = True
    wrapped.update((name, value) for name, value in envelope.items() if name != "tool")
    return wrapped


def _lists(value: Any) -> list[list]:
    found = []
    if isinstance(value, dict):
        for item in value.values():
            found.extend(_lists(item))
    elif isinstance(value, list):
        found.append(value)
        for item in value:
            found.extend(_lists(item))
    return found


def _empty(value: Any) -> bool:
    return value is None or (isinstance(value, (str, list, dict)) and not value)


def _apply(data: Any, path: tuple[str, ...], action) -> None:
    """Call ``action(parent, key)`` for every place ``path`` names in ``data``."""
    *parents, last = path
    nodes = [data]
    for step in parents:
        nodes = [child for node in nodes for child in _children(node, step)]
    for node in nodes:
        if isinstance(node, dict) and last in node:
            action(node, last)


def _children(node: Any, step: str) -> list:
    if step == "*":
        if isinstance(node, dict):
            return list(node.values())
        return list(node) if isinstance(node, list) else []
    if isinstance(node, dict) and step in node:
        return [node[step]]
    return []


def _delete(parent: dict, key: str) -> None:
    del parent[key]


def _rename(parent: dict, key: str, new_name: str) -> None:
    # In place and in order: the model reads the keys as the server gave them.
    items = list(parent.items())
    parent.clear()
    parent.update((new_name if name == key else name, value) for name, value in items)
