"""How caller input appears in error texts and log lines: quoted, and never more than ~100 characters.

A caller controls ids, names and keys, and Stigg's own messages may echo them. Repeating them in
full lets one request inflate a log line to megabytes, or push a gRPC status trailer past the
client's metadata limit (which the client reports as RESOURCE_EXHAUSTED instead of the real
error). Every place that quotes input in a message goes through `quoted` (one value) or `clipped`
(free text that may contain input). Pure functions; no I/O.
"""

from __future__ import annotations

# Characters of one input value shown in a message; the rest is summarised by its length.
QUOTE_LIMIT = 100
# Characters of free text that may echo input (an upstream error message) kept in a message.
TEXT_LIMIT = 160


def quoted(value: object, limit: int = QUOTE_LIMIT) -> str:
    """`value` as a message shows it: repr-quoted (so control characters stay visible), at most
    `limit` characters of it, followed by its full length when it was cut."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def clipped(text: str, limit: int = TEXT_LIMIT) -> str:
    """Free text cut to `limit` characters, saying how much was left out."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"
