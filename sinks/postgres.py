"""The postgres sink: events (the dedup truth), leads and deals (last writer wins), quarantine."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from marshmallow import Schema, fields
from psycopg_pool import PoolTimeout

from sinks.base import RetryableSinkError, Sink
from workers.events import Event, Rejected
from workers.normalize import claimed_type, dump
from workers.retention import email_digest, erased_key

LEAD_COLUMNS = (
    "uuid", "legacy_id", "email", "name", "company", "job_title", "mobile_phone",
    "personal_phone", "city", "state", "website", "tags", "lifecycle_stage", "opportunity", "fit",
    "interest", "owner_email", "number_conversions", "last_conversion_identifier",
    "last_conversion_at", "custom_fields",
)
LEAD_TYPES = {"tags": "jsonb", "opportunity": "boolean", "interest": "bigint",
              "number_conversions": "bigint", "last_conversion_at": "timestamptz",
              "custom_fields": "jsonb", "updated_at": "timestamptz"}

DEAL_COLUMNS = (
    "name", "status", "amount_monthly", "amount_unique", "amount_total", "rating", "stage_name",
    "pipeline_name", "source_name", "campaign_name", "owner_email", "custom_fields",
    "prediction_date", "created_at", "closed_at", "deleted_at",
)
DEAL_TYPES = {"amount_monthly": "numeric", "amount_unique": "numeric", "amount_total": "numeric",
              "rating": "bigint", "custom_fields": "jsonb", "created_at": "timestamptz",
              "closed_at": "timestamptz", "deleted_at": "timestamptz", "updated_at": "timestamptz"}


Router = Callable[[Event], list[str]]


@dataclass
class Stored:
    """What one batch did: new events, their deliveries per sink, duplicates, quarantined."""

    new: list[Event] = field(default_factory=list)
    duplicates: int = 0
    quarantined: int = 0
    erased: int = 0  # events of a person erased since (or redeliveries of erased events)
    deliveries: dict[str, list[str]] = field(default_factory=dict)  # sink -> event ids
    # (event type, "accepted" | "duplicate" | "quarantined") -> how many, for the metrics
    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)

    def add(self, other: Stored) -> None:
        self.new += other.new
        self.duplicates += other.duplicates
        self.quarantined += other.quarantined
        self.erased += other.erased
        self.outcomes.update(other.outcomes)
        for sink, ids in other.deliveries.items():
            self.deliveries.setdefault(sink, []).extend(ids)


# tags travel as jsonb (unnest would flatten a text[][]) and become text[] again here
_TAGS = ("CASE WHEN t.tags IS NULL THEN NULL "
         "ELSE ARRAY(SELECT jsonb_array_elements_text(t.tags)) END")


def _upsert_sql(table: str, key: str, columns: Sequence[str], types: dict[str, str]) -> str:
    """INSERT ... SELECT FROM unnest(...) that merges newer non-null values and never goes back."""
    all_cols = (key, *columns, "updated_at", "last_event_id")
    arrays = ", ".join(f"%b::{'jsonb' if types.get(c) == 'jsonb' else types.get(c, 'text')}[]"
                       for c in all_cols)
    select = ", ".join(
        _TAGS if c == "tags" else f"t.{c}" for c in all_cols)
    merge = ",\n        ".join(f"{c} = COALESCE(EXCLUDED.{c}, {table}.{c})" for c in columns)
    return f"""
    INSERT INTO {table} ({", ".join(all_cols)})
    SELECT {select} FROM unnest({arrays}) AS t({", ".join(all_cols)})
    ON CONFLICT ({key}) DO UPDATE SET
        {merge},
        updated_at = EXCLUDED.updated_at,
        last_event_id = EXCLUDED.last_event_id
    WHERE {table}.updated_at <= EXCLUDED.updated_at
    """


_LEADS_SQL = _upsert_sql("leads", "lead_key", LEAD_COLUMNS, LEAD_TYPES)
_DEALS_SQL = _upsert_sql("deals", "id", DEAL_COLUMNS, DEAL_TYPES)
_EVENTS_SQL = """
    INSERT INTO events (id, dedup_key, source, event_type, entity_type, entity_id, occurred_at,
                        received_at, duplicates, payload)
    SELECT * FROM unnest(%b::text[], %b::text[], %b::text[], %b::text[], %b::text[], %b::text[],
                         %b::timestamptz[], %b::timestamptz[], %b::int[], %b::jsonb[])
    ON CONFLICT (dedup_key) DO UPDATE SET
        duplicates = events.duplicates + EXCLUDED.duplicates + 1,
        last_duplicate_at = now()
    RETURNING dedup_key, (xmax = 0) AS inserted
"""
_QUARANTINE_SQL = """
    INSERT INTO quarantine (id, received_at, reason, event_type_hint, payload)
    SELECT * FROM unnest(%b::text[], %b::timestamptz[], %b::text[], %b::text[], %b::jsonb[])
    ON CONFLICT (id) DO NOTHING
"""


class PostgresOptions(Schema):
    dsn = fields.String(required=True)


class PostgresSink(Sink):
    """Stores every event once; leads and deals reflect the newest state by the event's own time."""

    name = "postgres"
    Options = PostgresOptions

    def __init__(self, instance: str, options: dict[str, Any], pool: Any = None):
        super().__init__(instance, options)
        if pool is None:
            from sinks.db import make_pool

            pool = make_pool(options["dsn"])
        self.pool = pool

    def deliver(self, event: Event) -> None:
        self.store([event], ())

    def deliver_many(self, events: Sequence[Event]) -> list[BaseException | None]:
        try:  # one transaction: all stored, or the same error for all
            self.store(events, ())
        except Exception as exc:
            return [exc] * len(events)
        return [None] * len(events)

    def store(self, events: Sequence[Event], rejected: Sequence[Rejected],
              route: Router | None = None) -> Stored:
        """Write one batch in one transaction; a batch stored twice changes nothing twice.

        `route` names the sinks each new event goes to; their deliveries are written in the
        same transaction (an outbox), so no event is stored without its deliveries.
        """
        try:
            with self.pool.connection() as conn, conn.transaction():
                return store(conn, events, rejected, route)
        except (psycopg.OperationalError, PoolTimeout) as exc:
            raise RetryableSinkError(f"postgres unavailable: {type(exc).__name__}") from exc

    def close(self) -> None:
        self.pool.close()


def store(conn: psycopg.Connection, events: Sequence[Event],
          rejected: Sequence[Rejected], route: Router | None = None) -> Stored:
    """The batch write itself, inside the caller's transaction."""
    result = Stored()
    unique: dict[str, Event] = {}
    repeats: dict[str, int] = {}
    for event in events:
        if event.dedup_key in unique:
            repeats[event.dedup_key] = repeats.get(event.dedup_key, 0) + 1
        else:
            unique[event.dedup_key] = event
    result.duplicates = sum(repeats.values())
    batch = list(unique.values())
    gone = _erased(conn, batch) if batch else set()
    if gone:
        result.erased = len(gone)
        result.outcomes.update((e.event_type, "erased") for e in batch if e.dedup_key in gone)
        batch = [e for e in batch if e.dedup_key not in gone]
    if batch:
        _resolve_leads(conn, [e for e in batch if e.lead is not None])
        rows = conn.execute(_EVENTS_SQL, (
            [e.id for e in batch], [e.dedup_key for e in batch], [e.source for e in batch],
            [e.event_type for e in batch], [e.entity_type for e in batch],
            [e.entity_id for e in batch], [e.occurred_at for e in batch],
            [e.received_at for e in batch], [repeats.get(e.dedup_key, 0) for e in batch],
            [e.payload for e in batch],
        )).fetchall()
        inserted = {key for key, fresh in rows if fresh}
        result.duplicates += len(rows) - len(inserted)
        result.new = [e for e in batch if e.dedup_key in inserted]
        for e in batch:
            result.outcomes[(e.event_type, "accepted" if e.dedup_key in inserted else
                             "duplicate")] += 1
            if e.dedup_key in repeats:
                result.outcomes[(e.event_type, "duplicate")] += repeats[e.dedup_key]
        _upsert_leads(conn, [e for e in result.new if e.lead is not None])
        _upsert_deals(conn, [e for e in result.new if e.deal is not None])
        if route is not None:
            _outbox(conn, result, route)
    if rejected:
        conn.execute(_QUARANTINE_SQL, (
            [r.id for r in rejected], [r.received_at for r in rejected],
            [r.reason for r in rejected], [r.hint for r in rejected],
            [r.payload for r in rejected],
        ))
        result.quarantined = len(rejected)
        result.outcomes.update((claimed_type(r.payload, r.hint), "quarantined") for r in rejected)
    return result


def _erased(conn: psycopg.Connection, batch: list[Event]) -> set[str]:
    """Dedup keys of the batch that must not be stored: redeliveries of an erased event, and
    events of an erased person received before their erasure (`leadpipe erase`)."""
    hashed = {erased_key(e.dedup_key): e.dedup_key for e in batch}
    emails = {email_digest(e.lead["email"]) for e in batch if e.lead and e.lead.get("email")}
    gone: set[str] = set()
    erased_at: dict[str, Any] = {}
    for key, digest, when in conn.execute(
            "SELECT dedup_key, NULL, NULL FROM events WHERE dedup_key = ANY(%s) UNION ALL "
            "SELECT NULL, email_sha256, max(erased_at) FROM erasures "
            "WHERE email_sha256 = ANY(%s) GROUP BY email_sha256",
            (list(hashed), list(emails))):
        if key is not None:
            gone.add(hashed[key])
        else:
            erased_at[digest] = when
    if erased_at:
        for event in batch:
            email = event.lead.get("email") if event.lead else None
            when = erased_at.get(email_digest(email)) if email else None
            if when is not None and event.received_at <= when:
                gone.add(event.dedup_key)
    return gone


def _outbox(conn: psycopg.Connection, result: Stored, route: Router) -> None:
    pairs = [(e.id, sink) for e in result.new for sink in route(e)]
    if pairs:
        conn.execute("INSERT INTO deliveries (event_id, sink) SELECT * FROM unnest(%b::text[], "
                     "%b::text[]) ON CONFLICT DO NOTHING",
                     ([p[0] for p in pairs], [p[1] for p in pairs]))
    for event_id, sink in pairs:
        result.deliveries.setdefault(sink, []).append(event_id)


def _merge(rows: dict[str, dict[str, Any]], key: str, state: dict[str, Any], event_id: str) -> None:
    """Fold one event's state into the batch's row for `key`; callers go oldest first."""
    row = rows.setdefault(key, {})
    for column, value in state.items():
        if value is not None:
            row[column] = value
    row["last_event_id"] = event_id


def _columns(rows: dict[str, dict[str, Any]], columns: Sequence[str],
             types: dict[str, str]) -> list[list[Any]]:
    out: list[list[Any]] = [list(rows)]
    for column in (*columns, "updated_at", "last_event_id"):
        values = [row.get(column) for row in rows.values()]
        if types.get(column) == "jsonb":
            values = [None if v is None else dump(v) for v in values]
        out.append(values)
    return out


def _upsert_deals(conn: psycopg.Connection, events: list[Event]) -> None:
    if not events:
        return
    rows: dict[str, dict[str, Any]] = {}
    for event in sorted(events, key=lambda e: e.occurred_at):
        assert event.deal is not None
        state = {k: v for k, v in event.deal.items() if k != "id"}
        _merge(rows, event.deal["id"], state, event.id)
    conn.execute(_DEALS_SQL, _columns(rows, DEAL_COLUMNS, DEAL_TYPES))


def _resolve_leads(conn: psycopg.Connection, events: list[Event]) -> None:
    """Set each lead event's entity_id to its lead's key: the same lead across dialects is
    matched by uuid, else legacy id, else e-mail, so every sink sees one identity."""
    if not events:
        return
    leads = [e.lead for e in events if e.lead is not None]
    uuids = list({lead["uuid"] for lead in leads if lead["uuid"]})
    legacy = list({lead["legacy_id"] for lead in leads if lead["legacy_id"]})
    emails = list({lead["email"] for lead in leads if lead["email"]})
    by_uuid: dict[str, str] = {}
    by_legacy: dict[str, tuple[str, str | None]] = {}
    by_email: dict[str, tuple[str, str | None]] = {}
    for key, uuid, legacy_id, email in conn.execute(
        "SELECT lead_key, uuid, legacy_id, email FROM leads "
        "WHERE uuid = ANY(%s) OR legacy_id = ANY(%s) OR email = ANY(%s) ORDER BY created_at",
        (uuids, legacy, emails),
    ):
        _remember(by_uuid, by_legacy, by_email, key, uuid, legacy_id, email)
    for event in sorted(events, key=lambda e: e.occurred_at):
        lead = event.lead
        assert lead is not None
        key = _resolve(by_uuid, by_legacy, by_email, lead)
        _remember(by_uuid, by_legacy, by_email, key, lead["uuid"], lead["legacy_id"],
                  lead["email"])
        event.entity_id = key


def _upsert_leads(conn: psycopg.Connection, events: list[Event]) -> None:
    """Fold new lead events, oldest first, into one row per lead key, then upsert."""
    if not events:
        return
    rows: dict[str, dict[str, Any]] = {}
    for event in sorted(events, key=lambda e: e.occurred_at):
        assert event.lead is not None and event.entity_id is not None
        _merge(rows, event.entity_id, event.lead, event.id)
    conn.execute(_LEADS_SQL, _columns(rows, LEAD_COLUMNS, LEAD_TYPES))


def _remember(by_uuid: dict, by_legacy: dict, by_email: dict, key: str, uuid: str | None,
              legacy_id: str | None, email: str | None) -> None:
    if uuid:
        by_uuid.setdefault(uuid, key)
    if legacy_id:
        by_legacy.setdefault(legacy_id, (key, uuid))
    if email:
        by_email.setdefault(email, (key, uuid))


def _resolve(by_uuid: dict, by_legacy: dict, by_email: dict, lead: dict[str, Any]) -> str:
    uuid = lead["uuid"]
    if uuid and uuid in by_uuid:
        return by_uuid[uuid]
    for index, value in ((by_legacy, lead["legacy_id"]), (by_email, lead["email"])):
        if value and value in index:
            key, known_uuid = index[value]
            if not uuid or not known_uuid or known_uuid == uuid:  # never merge two RD contacts
                return key
    if uuid:
        return uuid
    if lead["legacy_id"]:
        return "id:" + lead["legacy_id"]
    return "email:" + lead["email"]
