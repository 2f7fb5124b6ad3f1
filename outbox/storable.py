"""What PostgreSQL can store of text and JSON: no NUL, no lone surrogate, finite
numbers, and (for JSON) nesting a parser can walk."""

from __future__ import annotations

import math
from typing import Any

# Deeper JSON than this is refused (PostgreSQL's own parser, and Python's, stop not
# far beyond).
MAX_JSON_DEPTH = 512


def text_problem(text: str) -> str | None:
    """Why PostgreSQL cannot store ``text``, or None."""
    if "\x00" in text:
        return "holds a NUL character, which PostgreSQL refuses"
    try:
        text.encode()
    except UnicodeEncodeError:
        return "holds a lone surrogate, which is not UTF-8"
    return None


def json_problem(value: Any) -> tuple[tuple[str | int, ...], str] | None:
    """The path (object names and array indexes) and reason of the first place in a
    parsed JSON value that PostgreSQL cannot store, or None."""
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(value, ())]
    while stack:
        item, path = stack.pop()
        if len(path) > MAX_JSON_DEPTH:
            return path[:MAX_JSON_DEPTH], f"nests deeper than {MAX_JSON_DEPTH} levels"
        if isinstance(item, str):
            reason = text_problem(item)
            if reason is not None:
                return path, reason
        elif isinstance(item, float) and not math.isfinite(item):
            return path, f"{item} is not a number PostgreSQL's JSON takes"
        elif isinstance(item, dict):
            for name, child in item.items():
                reason = text_problem(name)
                if reason is not None:
                    return path, f"a name {reason}"
                stack.append((child, (*path, name)))
        elif isinstance(item, list):
            stack.extend((child, (*path, i)) for i, child in enumerate(item))
    return None
