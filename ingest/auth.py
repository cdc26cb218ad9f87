"""Constant-time checks of the shared secrets RD Station sends with each delivery."""

from __future__ import annotations

import hmac
from collections.abc import Iterable


class TokenSet:
    """Valid ingest secrets; several at once so a secret can be rotated without downtime."""

    def __init__(self, tokens: Iterable[str]):
        self._tokens = [t.encode() for t in tokens if t]

    def __bool__(self) -> bool:
        return bool(self._tokens)

    def accepts(self, candidate: str | None) -> bool:
        if not candidate or not self._tokens:
            return False
        given = candidate.encode()
        ok = False
        for token in self._tokens:  # check every token: timing does not reveal which matched
            ok |= hmac.compare_digest(given, token)
        return ok
