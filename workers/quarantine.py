"""Quarantined bodies: list them, and replay one through the current code."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg

from ingest.queue import Entry
from workers.pipeline import split, store
from workers.runtime import Runtime


@dataclass
class ReplayResult:
    id: str
    stored: int
    duplicates: int
    still_rejected: str | None


def list_rows(dsn: str, limit: int = 50) -> list[dict[str, Any]]:
    with psycopg.connect(dsn) as conn:
        cur = conn.execute(
            "SELECT id, received_at, quarantined_at, replays, reason FROM quarantine "
            "ORDER BY quarantined_at DESC, id LIMIT %s", (limit,))
        names = [c.name for c in cur.description or ()]
        return [dict(zip(names, row, strict=True)) for row in cur]


def replay(runtime: Runtime, quarantine_id: str) -> ReplayResult:
    """Normalise the body again; stored events leave quarantine, a new reason replaces the old."""
    dsn = runtime.settings.database_url
    assert dsn
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT payload::text, received_at, event_type_hint FROM quarantine WHERE id = %s",
            (quarantine_id,)).fetchone()
    if row is None:
        raise LookupError(f"no quarantined event with id {quarantine_id!r}")
    payload, received_at, hint = row
    entry = Entry("replay", quarantine_id, int(received_at.timestamp() * 1000),
                  payload.encode(), hint)
    events, rejected = split([entry])
    stored = store(runtime, events, []) if events else None
    with psycopg.connect(dsn) as conn:
        if rejected:
            reason = "; ".join(r.reason for r in rejected)
            conn.execute("UPDATE quarantine SET reason = %s, replays = replays + 1 WHERE id = %s",
                         (reason, quarantine_id))
        else:
            conn.execute("DELETE FROM quarantine WHERE id = %s", (quarantine_id,))
    return ReplayResult(quarantine_id, len(stored.new) if stored else 0,
                        stored.duplicates if stored else 0,
                        "; ".join(r.reason for r in rejected) if rejected else None)
