"""The postgres sink: events (the dedup truth), leads and deals (last writer wins), quarantine."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any
from uuid import uuid4

import psycopg
from marshmallow import Schema, fields
from psycopg_pool import PoolTimeout

from sinks.base import RetryableSinkError, Sink
from workers.events import Event, Rejected
from workers.normalize import claimed_type, dump, lead_hash, legacy_key_before, parse_body
from workers.retention import (
    DOMAIN_PART,
    ERASURE_TURN,
    LOCAL_PART,
    body_lead_digests,
    email_digest,
    erased_key,
    strings,
)

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
              "closed_at": "timestamptz", "deleted_at": "timestamptz", "updated_at": "timestamptz",
              "document_updated_at": "timestamptz"}


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


# what orders a row's events besides updated_at: a deal's document updated_at (milliseconds)
# breaks ties of event_timestamp (whole seconds); an event without one goes after the others
# of its moment (NULL is taken as infinity): a delete, which carries none, ends its second
LEAD_ORDER: tuple[str, ...] = ("updated_at",)
DEAL_ORDER = ("updated_at", "document_updated_at")


def _upsert_sql(table: str, key: str, columns: Sequence[str], types: dict[str, str],
                order: Sequence[str], whole: bool = False, sticky: Sequence[str] = ()) -> str:
    """INSERT ... SELECT FROM unnest(...) that merges newer non-null values and never goes back
    (`whole`: that sets every column as given, NULL included, but the `sticky` ones: rows
    folded from a snapshot).

    The batch was folded against the stored rows (_fold), so the WHERE refuses only what a
    concurrent writer made stale; `order` is set as it is (NULL included), never merged."""
    all_cols = (key, *columns, *order, "last_event_id")
    arrays = ", ".join(f"%b::{'jsonb' if types.get(c) == 'jsonb' else types.get(c, 'text')}[]"
                       for c in all_cols)
    select = ", ".join(
        _TAGS if c == "tags" else f"t.{c}" for c in all_cols)
    merge = ",\n        ".join(
        [f"{c} = EXCLUDED.{c}" if whole and c not in sticky
         else f"{c} = COALESCE(EXCLUDED.{c}, {table}.{c})" for c in columns]
        + [f"{c} = EXCLUDED.{c}" for c in (*order, "last_event_id")])

    def rank(row: str) -> str:
        return ", ".join([f"{row}.{order[0]}"] + [
            f"COALESCE({row}.{c}, 'infinity'::timestamptz)" for c in order[1:]])
    return f"""
    INSERT INTO {table} ({", ".join(all_cols)})
    SELECT {select} FROM unnest({arrays}) AS t({", ".join(all_cols)})
    ON CONFLICT ({key}) DO UPDATE SET
        {merge}
    WHERE ({rank(table)}) <= ({rank("EXCLUDED")})
    """


_LEADS_SQL = _upsert_sql("leads", "lead_key", LEAD_COLUMNS, LEAD_TYPES, LEAD_ORDER)
_DEALS_SQL = _upsert_sql("deals", "id", DEAL_COLUMNS, DEAL_TYPES, DEAL_ORDER)
# deleted_at is ours (a delete's time), not a field of RD's document: a snapshot keeps it
DEAL_STICKY = ("deleted_at",)
_DEALS_WHOLE_SQL = _upsert_sql("deals", "id", DEAL_COLUMNS, DEAL_TYPES, DEAL_ORDER, whole=True,
                               sticky=DEAL_STICKY)
_EVENTS_SQL = """
    INSERT INTO events (id, dedup_key, source, event_type, entity_type, entity_id, occurred_at,
                        received_at, duplicates, payload)
    SELECT * FROM unnest(%b::text[], %b::text[], %b::text[], %b::text[], %b::text[], %b::text[],
                         %b::timestamptz[], %b::timestamptz[], %b::int[], %b::jsonb[])
    ON CONFLICT (dedup_key) DO UPDATE SET
        duplicates = events.duplicates + CASE WHEN events.id = EXCLUDED.id THEN 0
                                              ELSE EXCLUDED.duplicates + 1 END,
        last_duplicate_at = CASE WHEN events.id = EXCLUDED.id THEN events.last_duplicate_at
                                 ELSE now() END
    RETURNING dedup_key, (xmax = 0) AS inserted, id
"""
# (the same event id is this batch stored again: a retry after a failure that came after its
# commit, or entries claimed from a worker that died before acknowledging them; not news)
# shared with every other storing batch, exclusive while an erasure records itself
_ERASURE_TURN_SQL = f"SELECT pg_advisory_xact_lock_shared({ERASURE_TURN})"
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
            if not transient(exc):  # a value of the batch Postgres will never take, such as
                raise  # a key past the index row limit (54000): trying again cannot help
            raise RetryableSinkError(f"postgres unavailable: {type(exc).__name__}") from exc

    def close(self) -> None:
        self.pool.close()


# SQLSTATE classes of a database that is unavailable or busy, where the same write can succeed
# later: connection exception, transaction rollback (deadlock, serialization failure),
# insufficient resources, object in use (lock timeout), operator intervention (shutdown,
# cancel), system error, configuration file error. Every other class is about what was sent
# (22 data exception, 23 integrity, 54 program limit exceeded...), the same on every try.
_TRANSIENT_CLASSES = frozenset({"08", "40", "53", "55", "57", "58", "F0"})


# Errors of a write too big for one transaction under the server's limits, or of a busy
# server: the lock table full (53200 out of shared memory), `statement_timeout` or a cancel
# (57014). Transient, but a smaller write may pass at once: a batch meeting one is stored one
# event at a time, and one event that meets it alone is quarantined after a few tries.
_OVERSIZED = frozenset({"53200", "57014"})


def oversized(exc: BaseException) -> bool:
    """Whether the write failed for its size as much as for the server's state (_OVERSIZED)."""
    if isinstance(exc, RetryableSinkError) and exc.__cause__ is not None:
        exc = exc.__cause__
    return isinstance(exc, psycopg.Error) and exc.sqlstate in _OVERSIZED


def transient(exc: BaseException) -> bool:
    """Whether writing the same batch again later can succeed: Postgres or its pool was
    unavailable, as opposed to Postgres refusing a value (or a bug) that fails every time."""
    if isinstance(exc, RetryableSinkError | PoolTimeout):
        return True
    if not isinstance(exc, psycopg.Error):
        return False
    if exc.sqlstate is None:  # raised by psycopg itself: a lost, closed or refused connection
        return isinstance(exc, psycopg.OperationalError)
    return exc.sqlstate[:2] in _TRANSIENT_CLASSES


def store(conn: psycopg.Connection, events: Sequence[Event],
          rejected: Sequence[Rejected], route: Router | None = None) -> Stored:
    """The batch write itself, inside the caller's transaction (which must not have taken
    any lock before: `leadpipe erase` waits for the storing under way, and new storing waits
    behind it)."""
    if events or rejected:  # first: it decides which erasures the batch's checks below see
        conn.execute(_ERASURE_TURN_SQL)
    events = _as_stored_before(conn, events)
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
        # in dedup key order: two batches holding the same events lock their keys in one order,
        # so the second waits for the first instead of deadlocking with it
        keyed = sorted(batch, key=lambda e: e.dedup_key)
        rows = conn.execute(_EVENTS_SQL, (
            [e.id for e in keyed], [e.dedup_key for e in keyed], [e.source for e in keyed],
            [e.event_type for e in keyed], [e.entity_type for e in keyed],
            [e.entity_id for e in keyed], [e.occurred_at for e in keyed],
            [e.received_at for e in keyed], [repeats.get(e.dedup_key, 0) for e in keyed],
            [e.payload for e in keyed],
        )).fetchall()
        ids = {e.dedup_key: e.id for e in keyed}
        inserted = {key for key, fresh, _ in rows if fresh}
        again = {key for key, fresh, row_id in rows if not fresh and row_id == ids[key]}
        result.duplicates += len(rows) - len(inserted) - len(again)
        result.new = [e for e in batch if e.dedup_key in inserted]
        for e in batch:  # stored again: counted once, as its first storing never was
            result.outcomes[(e.event_type, "accepted" if e.dedup_key in inserted | again else
                             "duplicate")] += 1
            if e.dedup_key in repeats:
                result.outcomes[(e.event_type, "duplicate")] += repeats[e.dedup_key]
        _upsert_leads(conn, [e for e in result.new if e.lead is not None])
        _upsert_deals(conn, [e for e in result.new if e.deal is not None])
        if route is not None:
            _outbox(conn, result, route)
    gone_ids = _erased_rejected(conn, rejected) if rejected else set()
    if gone_ids:
        result.erased += len(gone_ids)
        result.outcomes.update((claimed_type(r.payload, r.hint), "erased") for r in rejected
                               if r.id in gone_ids)
        rejected = [r for r in rejected if r.id not in gone_ids]
    if rejected:
        conn.execute(_QUARANTINE_SQL, (
            [r.id for r in rejected], [r.received_at for r in rejected],
            [r.reason for r in rejected], [r.hint for r in rejected],
            [r.payload for r in rejected],
        ))
        result.quarantined = len(rejected)
        result.outcomes.update((claimed_type(r.payload, r.hint), "quarantined") for r in rejected)
    return result


def _as_stored_before(conn: psycopg.Connection, events: Sequence[Event]) -> Sequence[Event]:
    """The events, those of them an earlier version stored under its older legacy key (without
    the lead's hash) with the same lead taking that key again: a redelivery across an upgrade
    is then the duplicate it was before (counted by the upsert), not a second event. A body
    purged since keeps that hash (workers.retention.purged_marker)."""
    older: dict[str, list[Event]] = {}
    for e in events:
        if old := legacy_key_before(e.dedup_key):
            older.setdefault(old, []).append(e)  # a retry and a re-send with news may meet
    if not older:
        return events
    for old, payload in conn.execute(
            "SELECT dedup_key, payload FROM events WHERE dedup_key = ANY(%s)", (list(older),)):
        if same := _stored_lead_hash(payload):
            for e in older[old]:
                if e.dedup_key.endswith(":" + same):
                    e.dedup_key = old
    return events


def _stored_lead_hash(payload: Any) -> str | None:
    """The lead hash of a stored legacy body, or of the purged one's marker."""
    if not isinstance(payload, dict):
        return None
    if isinstance(payload.get("lead_hash"), str):
        return payload["lead_hash"]
    leads = payload.get("leads")
    return lead_hash(leads[0]) if isinstance(leads, list) and leads else None


def _erased(conn: psycopg.Connection, batch: list[Event]) -> set[str]:
    """Dedup keys of the batch that must not be stored: redeliveries of an erased event, and
    events received before an erasure whose body names the erased person anywhere, as
    `leadpipe erase` found them among the stored ones (the lead's e-mail, a CRM contact's
    `emails`, a deal's contacts), or whose lead would have joined one of theirs."""
    hashed: dict[str, list[str]] = {}
    for e in batch:
        hashed.setdefault(erased_key(e.dedup_key), []).append(e.dedup_key)
        if old := legacy_key_before(e.dedup_key):  # erased under an earlier version's key
            hashed.setdefault(erased_key(old), []).append(e.dedup_key)
    emails = {email_digest(e.lead["email"]) for e in batch if e.lead and e.lead.get("email")}
    gone: set[str] = set()
    erased_at: dict[str, Any] = {}
    recent = None  # the last erasure since the batch's oldest event arrived, if any
    for key, digest, when in conn.execute(
            "SELECT dedup_key, NULL, NULL FROM events WHERE dedup_key = ANY(%s) UNION ALL "
            f"SELECT NULL, email_sha256, max({_ERASED_AT}) FROM erasures "
            "WHERE email_sha256 = ANY(%s) GROUP BY email_sha256 UNION ALL "
            f"SELECT NULL, NULL, max({_ERASED_AT}) FROM erasures "
            "WHERE erased_at >= %s OR touched = '{}'",
            (list(hashed), list(emails), min(e.received_at for e in batch))):
        if key is not None:
            gone.update(hashed[key])
        elif digest is not None:
            erased_at[digest] = when
        else:
            recent = when
    named: dict[str, set[str]] = {}  # event's key -> digests of every address in its body
    if recent is not None:  # rare: only then is every body read for addresses
        for event in batch:
            if event.received_at <= recent:
                named[event.dedup_key] = {email_digest(a) for a in _addresses(event.payload)}
        wanted = set().union(*named.values()) - set(erased_at)
        if wanted:
            erased_at.update(_erased_at(conn, wanted))
        gone.update(_erased_leads(conn, [e for e in batch if e.lead and e.received_at <= recent]))
    if erased_at:
        for event in batch:
            email = event.lead.get("email") if event.lead else None
            digests = named.get(event.dedup_key, set()) | (
                {email_digest(email)} if email else set())
            if any(event.received_at <= erased_at[d] for d in digests if d in erased_at):
                gone.add(event.dedup_key)
    return gone


# When an erasure counts from: its time, or, while it runs (`touched` still `{}`: recorded,
# its rows not yet changed), the end of time: a body naming the person that arrives meanwhile
# is dropped whenever it was received (a redelivery of an event the erasure is about to hash
# would otherwise find its key still free once the erasure commits, and be stored again).
_ERASED_AT = "CASE WHEN touched = '{}' THEN '9999-12-31 00:00+00'::timestamptz ELSE erased_at END"


def _erased_at(conn: psycopg.Connection, digests: Collection[str]) -> dict[str, Any]:
    """Address digest -> when its latest erasure counts from (_ERASED_AT)."""
    return dict(conn.execute(
        f"SELECT email_sha256, max({_ERASED_AT}) FROM erasures WHERE email_sha256 = ANY(%s) "
        "GROUP BY email_sha256", (list(digests),)).fetchall())


def _erased_leads(conn: psycopg.Connection, batch: list[Event]) -> set[str]:
    """Dedup keys of lead events received before an erasure whose person's lead they would
    have joined (`erasures.lead_sha256`): theirs even when the body carries a new address.

    By its uuid, a body is theirs. By a legacy id or an e-mail (the steps storing takes after
    the uuid, `_Leads.resolve`), only when no lead left answers to it: one that does, another
    contact's, is where storing puts it, and it stays theirs."""
    digests = {e.dedup_key: body_lead_digests(e.lead["uuid"], e.lead["legacy_id"],
                                              e.lead["email"]) for e in batch if e.lead}
    wanted = set().union(*map(set, digests.values()))
    if not wanted:
        return set()
    erased_at = dict(conn.execute(
        f"SELECT d, max({_ERASED_AT}) FROM erasures, unnest(lead_sha256) AS d "
        "WHERE (erased_at >= %s OR touched = '{}') AND lead_sha256 && %s::text[] "
        "AND d = ANY(%s) GROUP BY d",
        (min(e.received_at for e in batch), list(wanted), list(wanted))).fetchall())
    gone: set[str] = set()
    other: list[dict[str, Any]] = []  # (the leads matched by a legacy id or an e-mail)
    keys: list[str] = []
    for e in batch:
        hits = [n for n, d in enumerate(digests.get(e.dedup_key, ()))
                if d in erased_at and e.received_at <= erased_at[d]]
        if not hits or e.lead is None:
            continue
        if hits[0] == 0 and e.lead["uuid"]:  # its uuid is theirs
            gone.add(e.dedup_key)
        else:
            other.append(e.lead)
            keys.append(e.dedup_key)
    if other:  # resolved as storing resolves them, against the leads left
        known = _Leads()
        for row in conn.execute(
                "SELECT lead_key, uuid, legacy_id, email, updated_at FROM leads "
                "WHERE uuid = ANY(%s) OR legacy_id = ANY(%s) OR email = ANY(%s) "
                "ORDER BY created_at, lead_key",
                [[lead[name] for lead in other if lead[name]] for name in _IDENTIFIERS]):
            known.add(*row)
        gone.update(key for key, lead in zip(keys, other, strict=True)
                    if known.resolve(lead) not in known.rows)
    return gone


def _erased_rejected(conn: psycopg.Connection, rejected: Sequence[Rejected]) -> set[str]:
    """Ids of bodies to quarantine that must not be kept: received before an erasure of a
    person they name anywhere (as `leadpipe erase` deletes the quarantine rows naming them)."""
    (recent,) = conn.execute(f"SELECT max({_ERASED_AT}) FROM erasures "
                             "WHERE erased_at >= %s OR touched = '{}'",
                             (min(r.received_at for r in rejected),)).fetchone()
    if recent is None:  # the common case: no erasure since the oldest of them arrived
        return set()
    named = {r.id: (r.received_at, {email_digest(a) for a in _addresses(r.payload)})
             for r in rejected if r.received_at <= recent}
    wanted = set().union(*(digests for _, digests in named.values()))
    if not wanted:
        return set()
    erased_at = _erased_at(conn, wanted)
    return {rid for rid, (received, digests) in named.items()
            if any(received <= erased_at[d] for d in digests if d in erased_at)}


# what `leadpipe erase` takes for an address in a body: the whole of one, never a part, with
# its letters past ASCII (found in lower-cased text, as `erase` lower-cases the address)
# (bounded as RFC 5321 bounds them, 64 characters before the @ and 63 per label: unbounded,
# finding them in a long run of such characters took time growing with its square)
_ADDRESSES = re.compile(rf"{LOCAL_PART}{{1,64}}@{DOMAIN_PART}{{1,63}}(?:\.{DOMAIN_PART}{{1,63}})+")


def _addresses(payload: str) -> list[str]:
    """Every address in a body, lower-cased; JSON escapes ("jo\\u00e3o") spelled out first."""
    if "\\u" in payload:
        try:
            payload = "\n".join(strings(parse_body(payload.encode())))
        except (ValueError, RecursionError):  # a quarantined body may not parse: its text
            pass
    return _ADDRESSES.findall(payload.lower())


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


Rank = tuple[Any, ...]  # what orders the events of one row (and the row as stored)


def _fold(items: list[tuple[str, Rank, dict[str, Any], str]], stored: dict[str, Rank],
          exact: Sequence[str] = (), snapshots: Collection[str] = (),
          whole: set[str] | None = None, sticky: Sequence[str] = ()) -> dict[str, dict[str, Any]]:
    """One row per key from (key, rank, state, event id), as storing the items one at a time,
    oldest first, would leave it: an item older than the key's stored row is dropped (last
    writer wins would refuse it), the others are merged in order, ties in batch order.
    `exact` columns are the newest item's value, NULL included. The state of an event in
    `snapshots` is the entity's whole state: it replaces the row, NULLs included, and the
    row's key goes into `whole` (to be stored as it is, not merged with the stored row), but
    for its `sticky` columns, which keep a value once set."""
    rows: dict[str, dict[str, Any]] = {}
    for key, rank, state, event_id in sorted(items, key=lambda item: item[1]):
        if key in stored and rank < stored[key]:
            continue
        if event_id in snapshots:
            before = rows.get(key, {})
            rows[key] = {**state, "last_event_id": event_id}
            for column in sticky:
                if rows[key].get(column) is None:
                    rows[key][column] = before.get(column)
            if whole is not None:
                whole.add(key)
        else:
            _merge(rows, key, state, event_id)
        for column in exact:
            rows[key][column] = state.get(column)
    return rows


def _columns(rows: dict[str, dict[str, Any]], columns: Sequence[str],
             types: dict[str, str], order: Sequence[str]) -> list[list[Any]]:
    out: list[list[Any]] = [list(rows)]
    for column in (*columns, *order, "last_event_id"):
        values = [row.get(column) for row in rows.values()]
        if types.get(column) == "jsonb":
            values = [None if v is None else dump(v) for v in values]
        out.append(values)
    return out


# Transaction-scoped advisory locks on names (identifiers of the batch), all taken in one
# statement in one global order (their hash), so two batches never wait on each other in a
# cycle; released at commit or rollback.
_LOCK_SQL = """
    SELECT count(pg_advisory_xact_lock(h)) FROM (
        SELECT DISTINCT hashtextextended(name, 0) AS h FROM unnest(%s::text[]) AS name
        ORDER BY h) AS ordered
"""


def _lock(conn: psycopg.Connection, names: list[str]) -> None:
    if names:
        conn.execute(_LOCK_SQL, (names,))


def _deal_rank(updated_at: Any, document_updated_at: Any) -> Rank:
    """(event time, document updated_at); without the latter, after the others of its moment,
    as the upsert's COALESCE(document_updated_at, 'infinity') has it."""
    if document_updated_at is None:
        return (updated_at, True, updated_at)
    return (updated_at, False, document_updated_at)


def _upsert_deals(conn: psycopg.Connection, events: list[Event]) -> None:
    """Fold new deal events against the stored rows (_fold), then upsert. Each deal id is locked
    first, so a concurrent batch with events of the same deal, stored or not yet, waits for this
    one's commit and then folds against its row."""
    if not events:
        return
    ids = list({e.deal["id"] for e in events if e.deal is not None})
    _lock(conn, [f"leadpipe:deal:{deal_id}" for deal_id in ids])
    stored = {key: _deal_rank(at, document_at) for key, at, document_at in conn.execute(
        "SELECT id, updated_at, document_updated_at FROM deals WHERE id = ANY(%s) "
        "ORDER BY id FOR UPDATE", (ids,))}
    items = []
    for event in events:
        deal = event.deal
        assert deal is not None
        items.append((deal["id"], _deal_rank(deal["updated_at"], deal.get("document_updated_at")),
                      {k: v for k, v in deal.items() if k != "id"}, event.id))
    # a created or updated document is the deal's whole state: a value RD cleared (closed_at
    # of a reopened deal, a rating or custom field removed) is NULL in it and must clear the
    # row; a delete carries only id and name, and keeps the rest
    snapshots = {e.id for e in events if e.event_type != "crm_deal_deleted"}
    whole: set[str] = set()
    rows = _fold(items, stored, exact=("document_updated_at",), snapshots=snapshots,
                 whole=whole, sticky=DEAL_STICKY)
    for sql, part in ((_DEALS_WHOLE_SQL, {k: v for k, v in rows.items() if k in whole}),
                      (_DEALS_SQL, {k: v for k, v in rows.items() if k not in whole})):
        if part:
            conn.execute(sql, _columns(part, DEAL_COLUMNS, DEAL_TYPES, DEAL_ORDER))


def lock_leads(conn: psycopg.Connection, uuids: Sequence[str], legacy: Sequence[str],
               emails: Sequence[str]) -> None:
    """Lock these lead identifiers until the transaction ends, the way every batch that stores
    leads does, before it touches a `leads` or `events` row: whoever else changes a lead's rows
    (`leadpipe erase`) takes them first too, so the two wait for each other in one order."""
    _lock(conn, [f"leadpipe:lead:uuid:{v}" for v in uuids]
          + [f"leadpipe:lead:id:{v}" for v in legacy]
          + [f"leadpipe:lead:email:{v}" for v in emails])


def _resolve_leads(conn: psycopg.Connection, events: list[Event]) -> None:
    """Set each lead event's entity_id to its lead's key: the same lead across dialects is
    matched by uuid, else legacy id, else e-mail, so every sink sees one identity.

    Every uuid, legacy id and e-mail of the batch is locked first, so a concurrent batch that
    brings the same person (in whatever dialect) waits for this one's commit and then finds its
    row; the rows found are locked as well, for a batch that reaches one by another identifier.
    Events are resolved in time order, each against the rows as the earlier ones left them."""
    if not events:
        return
    leads = [e.lead for e in events if e.lead is not None]
    uuids = list({lead["uuid"] for lead in leads if lead["uuid"]})
    legacy = list({lead["legacy_id"] for lead in leads if lead["legacy_id"]})
    emails = list({lead["email"] for lead in leads if lead["email"]})
    lock_leads(conn, uuids, legacy, emails)
    # a key this batch could make may belong to a row that no longer carries its identifier
    # (an e-mail changed since): fetched too, for its updated_at, never matched by it
    keys = uuids + ["id:" + v for v in legacy] + ["email:" + v for v in emails]
    known = _Leads()
    for row in conn.execute(
        "SELECT lead_key, uuid, legacy_id, email, updated_at FROM leads "
        "WHERE uuid = ANY(%s) OR legacy_id = ANY(%s) OR email = ANY(%s) OR lead_key = ANY(%s) "
        "ORDER BY created_at, lead_key FOR UPDATE",
        (uuids, legacy, emails, keys),
        # never a prepared statement: its generic plan cannot hash the arrays and compares
        # every row with every value, a hundred times slower once the table has some rows
        prepare=False,
    ):
        known.add(*row)
    for event in sorted(events, key=_lead_time):
        lead = event.lead
        assert lead is not None
        key = known.resolve(lead)
        known.apply(key, lead)
        event.entity_id = key


def _lead_time(event: Event) -> Any:
    assert event.lead is not None
    return event.lead["updated_at"]


def _upsert_leads(conn: psycopg.Connection, events: list[Event]) -> None:
    """Fold new lead events against the stored rows (_fold), one row per lead key, then
    upsert. The rows were locked by _resolve_leads, new keys by their identifiers."""
    if not events:
        return
    keys = list({e.entity_id for e in events})
    stored = {key: (at,) for key, at in conn.execute(
        "SELECT lead_key, updated_at FROM leads WHERE lead_key = ANY(%s)", (keys,))}
    items = []
    for event in events:
        assert event.lead is not None and event.entity_id is not None
        items.append((event.entity_id, (event.lead["updated_at"],), event.lead, event.id))
    rows = _fold(items, stored)
    if rows:
        conn.execute(_LEADS_SQL, _columns(rows, LEAD_COLUMNS, LEAD_TYPES, LEAD_ORDER))
    _fill_identifiers(conn, [e for e in events if e.entity_id in stored
                             and (e.lead["updated_at"],) < stored[e.entity_id]])  # type: ignore


def _fill_identifiers(conn: psycopg.Connection, late: list[Event]) -> None:
    """An event older than its lead's row changes none of its state, but gives it the uuid,
    legacy id or e-mail it lacks: the order RD delivers in must not decide whether a later
    event, found only by that identifier, joins this lead or makes a second one. Filling
    what is NULL undoes nothing newer. Oldest first, as _Leads.apply takes them."""
    fills: dict[str, list[str | None]] = {}
    for event in sorted(late, key=_lead_time):
        assert event.lead is not None and event.entity_id is not None
        fill = fills.setdefault(event.entity_id, [None, None, None])
        for n, name in enumerate(_IDENTIFIERS):
            if fill[n] is None:
                fill[n] = event.lead[name]
    if fills:
        conn.execute(
            "UPDATE leads AS l SET uuid = COALESCE(l.uuid, f.uuid), "
            "  legacy_id = COALESCE(l.legacy_id, f.legacy_id), email = COALESCE(l.email, f.email) "
            "FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[]) "
            "  AS f(lead_key, uuid, legacy_id, email) "
            "WHERE l.lead_key = f.lead_key AND (l.uuid IS NULL AND f.uuid IS NOT NULL "
            "  OR l.legacy_id IS NULL AND f.legacy_id IS NOT NULL "
            "  OR l.email IS NULL AND f.email IS NOT NULL)",
            [list(fills), *([fill[n] for fill in fills.values()] for n in range(3))])


def state_row(event: Event) -> tuple[str, str] | None:
    """The row an event's state lands in: ("leads", lead key) or ("deals", deal id), if any."""
    if event.lead is not None:
        return ("leads", event.entity_id) if event.entity_id else None
    if event.deal is not None and event.deal.get("id") is not None:
        return ("deals", str(event.deal["id"]))
    return None


def superseded(conn: psycopg.Connection, events: Sequence[Event]) -> dict[str, str]:
    """Events whose lead or deal row a newer event has since changed, by the order the upserts
    keep (a row's rank past the event's): event id -> the id of the row's newest event.

    A sink that keeps an entity's current state must not be sent these: their values are older
    than what the row, and that newer event's own delivery, hold."""
    rows = [row for row in map(state_row, events) if row is not None]
    leads = {key: None for table, key in rows if table == "leads"}
    deals = {key: None for table, key in rows if table == "deals"}
    lead_rows = {key: ((at,), last) for key, at, last in conn.execute(
        "SELECT lead_key, updated_at, last_event_id FROM leads WHERE lead_key = ANY(%s)",
        (list(leads),))} if leads else {}
    deal_rows = {key: (_deal_rank(at, document_at), last) for key, at, document_at, last in
                 conn.execute("SELECT id, updated_at, document_updated_at, last_event_id "
                              "FROM deals WHERE id = ANY(%s)", (list(deals),))} if deals else {}
    newer: dict[str, str] = {}
    for event in events:
        if event.lead is not None:
            row = lead_rows.get(event.entity_id)
        elif event.deal is not None:
            row = deal_rows.get(str(event.deal.get("id")))
        else:
            continue
        rank = rank_of(event)
        if (row is not None and rank is not None and rank[0] is not None and row[1] != event.id
                and row[0] > rank):
            newer[event.id] = row[1]
    return newer


def rank_of(event: Event) -> Rank | None:
    """Where an event's state stands in its lead's or deal's order (the upserts' order)."""
    if event.lead is not None:
        return (event.lead["updated_at"],)
    if event.deal is not None:
        return _deal_rank(event.deal["updated_at"], event.deal.get("document_updated_at"))
    return None


_IDENTIFIERS = ("uuid", "legacy_id", "email")


class _Leads:
    """The leads rows one batch can reach, as its events stored one at a time would leave
    them: each row's uuid, legacy id, e-mail and updated_at, in the order the rows were made."""

    def __init__(self) -> None:
        self.rows: dict[str, list[Any]] = {}  # lead key -> [uuid, legacy_id, email, updated_at]
        self.made: dict[str, int] = {}  # lead key -> rank of its row's created_at
        self.index: tuple[dict[str, list[str]], ...] = ({}, {}, {})  # per identifier

    def add(self, key: str, uuid: str | None, legacy_id: str | None, email: str | None,
            updated_at: Any) -> None:
        self.rows[key] = [uuid, legacy_id, email, updated_at]
        self.made[key] = len(self.made)
        self._index(key)

    def _index(self, key: str) -> None:
        for n, value in enumerate(self.rows[key][:3]):
            if value:
                keys = self.index[n].setdefault(value, [])
                if key not in keys:
                    keys.append(key)

    def first(self, n: int, value: str) -> str | None:
        """The oldest row whose identifier n is `value` now (an e-mail can change)."""
        found = [key for key in self.index[n].get(value, ()) if self.rows[key][n] == value]
        return min(found, key=self.made.__getitem__) if found else None

    def resolve(self, lead: dict[str, Any]) -> str:
        uuid = lead["uuid"]
        if uuid and (key := self.first(0, uuid)) is not None:
            return key
        for n, value in ((1, lead["legacy_id"]), (2, lead["email"])):
            if value and (key := self.first(n, value)) is not None:
                known_uuid = self.rows[key][0]
                if not uuid or not known_uuid or known_uuid == uuid:  # never merge two contacts
                    return key
        if uuid:
            return uuid
        key = "id:" + lead["legacy_id"] if lead["legacy_id"] else "email:" + lead["email"]
        if key in self.rows:  # made for a lead that carries another id or e-mail now: the
            return "lead:" + uuid4().hex  # new lead must not take over that row
        return key

    def apply(self, key: str, lead: dict[str, Any]) -> None:
        """What the upsert does to the row's identity: the row made, or a newer event's
        non-null identifiers taken; an older event only fills identifiers the row lacks
        (_fill_identifiers)."""
        row = self.rows.get(key)
        if row is None:
            self.add(key, lead["uuid"], lead["legacy_id"], lead["email"], lead["updated_at"])
        elif lead["updated_at"] >= row[3]:
            for n, name in enumerate(_IDENTIFIERS):
                if lead[name] is not None:
                    row[n] = lead[name]
            row[3] = lead["updated_at"]
            self._index(key)
        elif any(row[n] is None and lead[name] is not None
                 for n, name in enumerate(_IDENTIFIERS)):
            for n, name in enumerate(_IDENTIFIERS):
                if row[n] is None:
                    row[n] = lead[name]
            self._index(key)
