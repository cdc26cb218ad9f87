"""Quarantined bodies: list them, and replay one through the current code."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ingest.queue import Entry
from sinks.db import connect
from sinks.postgres import Stored
from workers.operations import publish_or_relay
from workers.pipeline import split, store_each
from workers.runtime import Runtime


@dataclass
class ReplayResult:
    id: str
    stored: int
    duplicates: int
    still_rejected: str | None


def list_rows(dsn: str, limit: int = 50) -> list[dict[str, Any]]:
    with connect(dsn) as conn:
        cur = conn.execute(
            "SELECT id, received_at, quarantined_at, replays, reason FROM quarantine "
            "ORDER BY quarantined_at DESC, received_at DESC, id DESC LIMIT %s", (limit,))
        names = [c.name for c in cur.description or ()]
        return [dict(zip(names, row, strict=True)) for row in cur]


def replay(runtime: Runtime, quarantine_id: str) -> ReplayResult:
    """Normalise the body again; stored events leave quarantine, a new reason replaces the old.
    The stored events' deliveries are queued at once when the runtime has the Celery app
    (otherwise the relay sends them after LEADPIPE_RELAY_AFTER_SECONDS).

    A body that could not be kept as JSON (not JSON at all, or refused by Postgres) is kept as
    a JSON string of its text: that text is what is replayed, not the string."""
    dsn = runtime.settings.database_url
    assert dsn
    with connect(dsn) as conn:
        row = conn.execute(
            "SELECT CASE WHEN jsonb_typeof(payload) = 'string' THEN payload #>> '{}' "
            "ELSE payload::text END, received_at, event_type_hint FROM quarantine WHERE id = %s",
            (quarantine_id,)).fetchone()
    if row is None:
        raise LookupError(f"no quarantined event with id {quarantine_id!r}")
    payload, received_at, hint = row
    entry = Entry("replay", quarantine_id, int(received_at.timestamp() * 1000),
                  payload.encode(), hint)
    events, rejected = split([entry])
    # one by one, keeping the reason of an event Postgres still refuses: the row stays, with it
    stored, refusals = (store_each(runtime, events, runtime.router()) if events
                        else (Stored(), []))
    if runtime.app is not None:
        for sink, event_ids in stored.deliveries.items():
            publish_or_relay(runtime, sink, event_ids)
    reason = "; ".join(r.reason for r in (*rejected, *refusals)) or None
    with connect(dsn) as conn:
        if reason is None:
            conn.execute("DELETE FROM quarantine WHERE id = %s", (quarantine_id,))
        elif not conn.execute("UPDATE quarantine SET reason = %s, replays = replays + 1 "
                              "WHERE id = %s", (reason, quarantine_id)).rowcount:
            # the purge (LEADPIPE_RETAIN_QUARANTINE_DAYS) or an erasure took it meanwhile
            raise LookupError(f"quarantined event {quarantine_id!r} was removed while it was "
                              "replayed (purged or erased): nothing of it was stored")
    return ReplayResult(quarantine_id, len(stored.new), stored.duplicates, reason)
