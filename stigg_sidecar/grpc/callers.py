"""Callers: who may call the sidecar, from CALLER_TOKENS_FILE (`name scope token` a line).

Owns the file's format, its checks and the lookup of a presented token. A token is never kept as
itself beside the name: each caller is held by the SHA-256 of its token, and a presented token is
hashed and compared with every caller's digest by `hmac.compare_digest`, without stopping at a
match, so the time taken says nothing about which caller, or how much of a token, matched.
Errors name the file, the line and the caller, never a token.

`CallerTokens` holds the current table; `reload()` (on the reactor, when the file changed) swaps
in a new one when the file checks out, else logs once and keeps the last good table.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass

from twisted.logger import Logger

from stigg_sidecar.lifecycle.files import UnreadableFile, read_text

log = Logger()

READ, WRITE = "read", "write"
SCOPES = (READ, WRITE)
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MIN_TOKEN_CHARS = 16
# The digest compared against when no caller matches, so a miss costs what a hit costs.
_NOBODY = hashlib.sha256(b"").digest()


class CallerTokensError(ValueError):
    """CALLER_TOKENS_FILE cannot be used; one line naming the file and line, never a token."""


@dataclass(frozen=True)
class Caller:
    name: str
    scope: str

    @property
    def may_write(self) -> bool:
        return self.scope == WRITE


@dataclass(frozen=True)
class CallerTable:
    """Callers by the SHA-256 of their tokens (a tuple, walked whole on every lookup)."""

    entries: tuple[tuple[bytes, Caller], ...]

    def find(self, token: str) -> Caller | None:
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        found = None
        for known, caller in self.entries:
            if hmac.compare_digest(digest, known):
                found = caller
        return found

    @property
    def names(self) -> list[str]:
        return [caller.name for _, caller in self.entries]

    def describe(self) -> str:
        return ", ".join(f"{caller.name} ({caller.scope})" for _, caller in self.entries)


def parse_callers(text: str, where: str) -> CallerTable:
    """The table in `text`; `where` names the file in errors."""
    entries: list[tuple[bytes, Caller]] = []
    names: set[str] = set()
    digests: set[bytes] = set()
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        fields = stripped.split()
        at = f"CALLER_TOKENS_FILE: {where} line {number}"
        if len(fields) != 3:
            raise CallerTokensError(f"{at}: expected 'name scope token' (3 fields), got {len(fields)}")
        name, scope, token = fields
        if not NAME_PATTERN.fullmatch(name):
            # Not quoted: a line written in the wrong order would put the token here.
            raise CallerTokensError(
                f"{at}: the name must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
            )
        if scope not in SCOPES:
            raise CallerTokensError(f"{at} (caller {name}): the scope must be read or write")
        if len(token) < MIN_TOKEN_CHARS:
            raise CallerTokensError(f"{at} (caller {name}): the token is shorter than {MIN_TOKEN_CHARS} characters")
        if name in names:
            raise CallerTokensError(f"{at}: caller {name} appears twice")
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        if digest in digests:
            raise CallerTokensError(f"{at} (caller {name}): the same token is given to another caller")
        names.add(name)
        digests.add(digest)
        entries.append((digest, Caller(name, scope)))
    if not entries:
        raise CallerTokensError(f"CALLER_TOKENS_FILE: {where} has no callers (every call would be refused)")
    return CallerTable(tuple(entries))


def read_callers(path: str) -> CallerTable:
    try:
        text = read_text(path)
    except UnreadableFile as e:
        raise CallerTokensError(f"CALLER_TOKENS_FILE: {e}") from None
    return parse_callers(text, path)


class CallerTokens:
    """The callers currently allowed. `table` is replaced whole; handler threads read it lock-free."""

    def __init__(self, path: str) -> None:
        self._path = path
        self.table = read_callers(path)  # CallerTokensError at start: start-up stops with one line
        self.reloads = 0
        self.rejected = 0
        log.info("caller tokens on: {count} callers from CALLER_TOKENS_FILE: {callers}",
                 count=len(self.table.entries), callers=self.table.describe())

    def find(self, token: str) -> Caller | None:
        return self.table.find(token)

    def reload(self) -> bool:
        """Re-read the file; True when the new table is in use. A broken file is logged (once per
        change: the watcher calls this only then) and the last good table stays."""
        try:
            table = read_callers(self._path)
        except CallerTokensError as e:
            self.rejected += 1
            log.error("{error}; still using the {count} callers loaded before", error=str(e),
                      count=len(self.table.entries))
            return False
        if table == self.table:
            return False
        self.table = table
        self.reloads += 1
        log.info("caller tokens reloaded: {count} callers: {callers}", count=len(table.entries),
                 callers=table.describe())
        return True
