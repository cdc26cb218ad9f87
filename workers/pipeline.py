"""The logic of one batch, free of Celery: fetch raw entries, normalise, store, acknowledge."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import UTC, datetime

import psycopg

from ingest.queue import Entry
from sinks.base import RetryableSinkError
from sinks.postgres import Stored
from workers.events import Event, Rejected
from workers.normalize import as_json_string, normalize, quarantine
from workers.runtime import Runtime

log = logging.getLogger("leadpipe.pipeline")


def split(entries: Sequence[Entry]) -> tuple[list[Event], list[Rejected]]:
    """Normalise entries; anything that cannot be understood becomes a Rejected, never a crash."""
    events: list[Event] = []
    rejected: list[Rejected] = []
    for entry in entries:
        try:
            items = normalize(entry)
        except Exception as exc:  # a bug must quarantine one body, not stall the stream
            log.exception("normaliser failed", extra={"event_id": entry.event_id})
            received = datetime.fromtimestamp(entry.received_ms / 1000, UTC)
            items = [quarantine(entry, received, f"internal error: {type(exc).__name__}")]
        for item in items:
            (events if isinstance(item, Event) else rejected).append(item)
    return events, rejected


def store(runtime: Runtime, events: list[Event], rejected: list[Rejected]) -> Stored:
    """Store a batch; if Postgres refuses some value, store the rest and quarantine the culprits."""
    route = runtime.router()
    try:
        return runtime.postgres.store(events, rejected, route)
    except (psycopg.OperationalError, RetryableSinkError):
        raise
    except psycopg.Error as exc:
        log.warning("batch refused by postgres, storing one by one: %s", type(exc).__name__)
    total = Stored()
    for item in [*events, *rejected]:
        try:
            one = runtime.postgres.store(*(([item], []) if isinstance(item, Event) else
                                           ([], [item])), route)
        except (psycopg.OperationalError, RetryableSinkError):
            raise
        except psycopg.Error as exc:  # Postgres refuses this body (NaN, a lone surrogate...)
            one = runtime.postgres.store([], [refused(item, exc)])
        total.add(one)
    return total


def refused(item: Event | Rejected, exc: psycopg.Error) -> Rejected:
    """A quarantine row for what Postgres would not store: the reason, and the body kept as a
    JSON string (which jsonb always accepts), so nothing is lost and the batch goes on."""
    why = f"postgres refused the event: {type(exc).__name__}: {exc}".strip()
    if isinstance(item, Rejected):
        why = f"{item.reason}; {why}"
        hint = item.hint
    else:
        hint = item.event_type if "leads" in item.data else None  # a legacy body's type
    return Rejected(item.id, item.received_at, why[:2000],
                    as_json_string(item.payload.encode("utf-8", "surrogatepass")), hint)


def process(runtime: Runtime, entry_ids: list[str]) -> Stored:
    """Handle one batch of stream entries end to end; running it twice changes nothing twice."""
    entries = runtime.stream.fetch(entry_ids)
    # the first line of each event's journey: arrival is logged per batch, not per request,
    # so the ingest endpoint's hot path does no logging at all
    log.info("batch received", extra={"event_ids": [e.event_id for e in entries],
                                      "entries": len(entry_ids)})
    events, rejected = split(entries)
    stored = store(runtime, events, rejected)
    fan_out(runtime, stored)
    runtime.stream.done(entry_ids)
    return stored


def fan_out(runtime: Runtime, stored: Stored) -> None:
    """Queue the deliveries the batch's transaction recorded (a lost publish is relayed later)."""
    for sink, event_ids in stored.deliveries.items():
        runtime.publish(sink, event_ids)
