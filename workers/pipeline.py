"""The logic of one batch, free of Celery: fetch raw entries, normalise, store, acknowledge."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from datetime import UTC, datetime

import psycopg

from ingest.queue import Entry
from sinks.base import RetryableSinkError
from sinks.postgres import Router, Stored, oversized, transient
from workers.events import Event, Rejected
from workers.normalize import as_json_string, normalize, quarantine
from workers.operations import publish_or_relay
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


def store(runtime: Runtime, events: list[Event], rejected: list[Rejected],
          last_try: bool = False) -> Stored:
    """Store a batch. If it fails for anything but an unavailable database, store it one by
    one and quarantine each event that still fails, with the reason: one event Postgres will
    never take (or one a bug trips on) cannot block its batch. A transient error (Postgres
    down, the pool exhausted) is raised, for the whole batch to be retried. A batch too big
    for the server's limits (sinks.postgres.oversized) is stored one by one too; an event that
    meets such a limit alone is raised for a retry, and quarantined on the `last_try`."""
    route = runtime.router()
    try:
        return runtime.postgres.store(events, rejected, route)
    except Exception as exc:
        if oversized(exc):  # even a batch of one: the last try quarantines it, below
            log.warning("batch too big for the server's limits, storing one by one: %s",
                        type(exc.__cause__ or exc).__name__)
        elif transient(exc):
            raise
        else:
            log.warning("batch not stored, storing one by one: %s", type(exc).__name__)
    total, refusals = store_each(runtime, [*events, *rejected], route, last_try)
    if refusals:
        try:
            total.add(runtime.postgres.store([], refusals))
        except Exception:
            fan_out(runtime, total)  # what store_each committed: queued now, not by the relay
            raise
    return total


def store_each(runtime: Runtime, items: Sequence[Event | Rejected],
               route: Router | None = None,
               last_try: bool = False) -> tuple[Stored, list[Rejected]]:
    """Store each event or quarantine row in a transaction of its own. What fails comes back
    as a quarantine row (not yet stored) saying why; a transient error is raised (after the
    deliveries of what was stored are queued), unless it is an oversized one on the last try."""
    total = Stored()
    refusals: list[Rejected] = []
    for item in items:
        try:
            total.add(runtime.postgres.store(*(([item], []) if isinstance(item, Event) else
                                               ([], [item])), route))
        except Exception as exc:
            if transient(exc) and not (last_try and oversized(exc)):
                fan_out(runtime, total)  # committed: queued now, not left to the relay
                raise
            if not isinstance(exc, psycopg.Error | RetryableSinkError):  # a bug
                log.exception("storing an event failed", extra={"event_id": item.id})
            refusals.append(refused(item, exc))
    return total, refusals


# a primary message that quotes the refused input ends with it: `...for type bigint: "..."`
_QUOTED_INPUT = re.compile(r':\s*".*\Z', re.DOTALL)


def refusal_reason(exc: BaseException) -> str:
    """Why storing an event failed, fit for the quarantine table: Postgres' error type,
    SQLSTATE and primary message, never its DETAIL or CONTEXT (they quote the body: an
    e-mail, a phone); for anything else (a bug), only the exception's type."""
    if not isinstance(exc, psycopg.Error):
        return f"internal error while storing the event: {type(exc).__name__}"
    why = f"postgres refused the event: {type(exc).__name__}"
    if exc.sqlstate:  # an error from the server (else psycopg's own: its text is not ours)
        why += f" ({exc.sqlstate})"
        primary = _QUOTED_INPUT.sub("", exc.diag.message_primary or "")
        if primary:
            why += f": {primary}"
    return why


def refused(item: Event | Rejected, exc: BaseException) -> Rejected:
    """A quarantine row for what could not be stored: the reason, and the body kept as a
    JSON string (which jsonb always accepts), so nothing is lost and the batch goes on."""
    if isinstance(exc, RetryableSinkError) and exc.__cause__ is not None:
        exc = exc.__cause__  # the sink's wrapper of what Postgres said
    why = refusal_reason(exc)
    if isinstance(item, Rejected):
        why = f"{item.reason}; {why}"
        hint = item.hint
    else:
        hint = item.event_type if "leads" in item.data else None  # a legacy body's type
    return Rejected(item.id, item.received_at, why[:2000],
                    as_json_string(item.payload.encode("utf-8", "surrogatepass")), hint)


def process(runtime: Runtime, entry_ids: list[str], last_try: bool = False) -> Stored:
    """Handle one batch of stream entries end to end; running it twice changes nothing twice.
    `last_try`: an event too big for the server's limits is quarantined, not retried."""
    entries = runtime.stream.fetch(entry_ids)
    # the first line of each event's journey: arrival is logged per batch, not per request,
    # so the ingest endpoint's hot path does no logging at all
    log.info("batch received", extra={"event_ids": [e.event_id for e in entries],
                                      "entries": len(entry_ids)})
    events, rejected = split(entries)
    stored = store(runtime, events, rejected, last_try)
    fan_out(runtime, stored)
    runtime.stream.done(entry_ids)
    return stored


def fan_out(runtime: Runtime, stored: Stored) -> None:
    """Queue the deliveries the batch's transaction recorded; a broker that cannot take them
    now leaves them to the relay (they are committed as pending: nothing lost)."""
    for sink, event_ids in stored.deliveries.items():
        publish_or_relay(runtime, sink, event_ids)
