"""Personal data over time: retention purges (`leadpipe purge`) and erasure of one person."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from config.settings import Settings
from ingest.queue import IngestStream
from workers.normalize import parse_body

BATCH = 5000
PURGED = '{"purged": true}'
ERASED = '{"erased": true}'
Progress = Callable[[str, int], None]

# (store, setting, statement); each statement changes at most %(batch)s rows per transaction,
# skipping rows another transaction holds, so ingest and deliveries never wait on a purge.
_PURGES = (
    ("events.payload", "retain_payload_days", f"""
        UPDATE events SET payload = '{PURGED}'::jsonb, purged_at = now() WHERE id IN (
          SELECT e.id FROM events e
          WHERE e.received_at < now() - make_interval(days => %(days)s) AND e.purged_at IS NULL
            AND NOT EXISTS (SELECT 1 FROM deliveries d
                            WHERE d.event_id = e.id AND d.status = 'pending')
            AND NOT EXISTS (SELECT 1 FROM dead_letters l
                            WHERE l.event_id = e.id AND l.replayed_at IS NULL)
          LIMIT %(batch)s FOR UPDATE SKIP LOCKED)"""),
    ("quarantine", "retain_quarantine_days", """
        DELETE FROM quarantine WHERE id IN (
          SELECT id FROM quarantine WHERE received_at < now() - make_interval(days => %(days)s)
          LIMIT %(batch)s FOR UPDATE SKIP LOCKED)"""),
    ("dead_letters", "retain_dead_letters_days", """
        DELETE FROM dead_letters WHERE id IN (
          SELECT id FROM dead_letters WHERE dead_at < now() - make_interval(days => %(days)s)
          LIMIT %(batch)s FOR UPDATE SKIP LOCKED)"""),
    ("delivery_attempts", "retain_attempts_days", """
        DELETE FROM delivery_attempts WHERE id IN (
          SELECT id FROM delivery_attempts
          WHERE started_at < now() - make_interval(days => %(days)s)
          LIMIT %(batch)s FOR UPDATE SKIP LOCKED)"""),
)


def retention(settings: Settings) -> dict[str, int]:
    """Days kept per store; 0 (keep) is left out."""
    return {store: getattr(settings, name) for store, name, _ in _PURGES
            if getattr(settings, name)}


def purge(conn: psycopg.Connection, settings: Settings, progress: Progress | None = None,
          batch: int = BATCH) -> dict[str, int]:
    """Apply every retention setting, in batches of `batch` rows, one transaction each.

    `conn` must be in autocommit mode. Returns the rows purged per store."""
    done: dict[str, int] = {}
    for store, name, sql in _PURGES:
        days = getattr(settings, name)
        if not days:
            continue
        done[store] = 0
        while True:
            n = conn.execute(sql, {"days": days, "batch": batch}).rowcount
            done[store] += n
            if progress:
                progress(store, done[store])
            if n < batch:
                break
    return done


def email_digest(email: str) -> str:
    return hashlib.sha256(email.strip().lower().encode("utf-8")).hexdigest()


def erased_key(dedup_key: str) -> str:
    """What an erased event's dedup key becomes: a redelivery still finds it, nothing is read
    from it (Postgres computes the same: 'erased:' || sha256 of the key's UTF-8)."""
    return "erased:" + hashlib.sha256(dedup_key.encode("utf-8")).hexdigest()


_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+$")
# What may stand right before an address inside a longer one (RFC 5322's local-part characters)
_LOCAL_PART = r"[a-z0-9.!#$%&'*+/=?^_`{|}~\-]"


def _address(email: str) -> re.Pattern[str]:
    """The address as a whole, in lower-cased text: "Ana <ana@x.com>" and "mailto:ana@x.com"
    mention ana@x.com; "joana@x.com" and "ana@x.com.br" are other people."""
    return re.compile(rf"(?<!{_LOCAL_PART}){re.escape(email)}(?![a-z0-9_\-]|\.[a-z0-9])")


def _like(text: str) -> str:
    return "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def erase(conn: psycopg.Connection, stream: IngestStream | None, email: str) -> dict[str, int]:
    """Remove one person (by e-mail) from every store; returns what was touched, per store.

    Their lead rows, quarantined bodies, dead letters, delivery records and not yet processed
    stream entries are deleted. Their events keep only an anonymous row: the body becomes
    `{"erased": true}` and the dedup key its hash, so a later redelivery of the same event is
    still a duplicate and brings nothing back; a body received before the erasure and still on
    its way is dropped when its batch is stored (see `sinks.postgres`). A body is theirs when
    one of its strings holds the whole address (any case), never a longer one around it.
    """
    from sinks.postgres import lock_leads  # here: sinks.postgres imports this module

    email = email.strip().lower()
    if not _EMAIL.match(email):
        raise ValueError("expected one e-mail address")
    pattern, address = _like(email), _address(email)
    touched: dict[str, int] = {}
    with conn.transaction():
        # the order a storing batch locks in (sinks.postgres.lock_leads: identifiers, then the
        # leads rows, then events), else a batch redelivering their event deadlocks with us
        found = conn.execute("SELECT uuid, legacy_id FROM leads WHERE lower(email) = %s",
                             (email,)).fetchall()
        lock_leads(conn, [u for u, _ in found if u], [i for _, i in found if i], [email])
        keys = [k for (k,) in conn.execute(
            "SELECT lead_key FROM leads WHERE lower(email) = %s "
            "ORDER BY created_at, lead_key FOR UPDATE", (email,))]
        rows = [(event_id, dedup_key) for event_id, dedup_key, theirs, payload in conn.execute(
            "SELECT id, dedup_key, entity_type = 'CONTACT' AND entity_id = ANY(%s), payload "
            "FROM events WHERE (entity_type = 'CONTACT' AND entity_id = ANY(%s)) "
            "OR lower(payload::text) LIKE %s", (keys, keys, pattern))
            if theirs or _contains(payload, address)]
        ids = [r[0] for r in rows]
        dedup_keys = [r[1] for r in rows]
        quarantined = [row_id for row_id, payload in conn.execute(
            "SELECT id, payload FROM quarantine WHERE lower(payload::text) LIKE %s", (pattern,))
            if _contains(payload, address)]
        # a delivery of theirs under way (workers.delivery.load_events holds its lock) would
        # record its e-mail ledger rows after our delete: wait for it to end, and keep the rest
        # from starting until we commit (they then find the delivery gone). Nothing of ours is
        # written yet, so the ledger write it may be finishing never waits for us.
        conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(sink || ':' || event_id, 0)) "
                     "FROM (SELECT sink, event_id FROM deliveries WHERE event_id = ANY(%s) "
                     "ORDER BY sink, event_id) AS theirs", (ids,)).fetchall()
        for store, sql, params in (
            ("email_sent", "DELETE FROM email_sent WHERE dedup_key = ANY(%s)", (dedup_keys,)),
            ("delivery_attempts", "DELETE FROM delivery_attempts WHERE event_id = ANY(%s)",
             (ids,)),
            ("dead_letters", "DELETE FROM dead_letters WHERE event_id = ANY(%s)", (ids,)),
            ("deliveries", "DELETE FROM deliveries WHERE event_id = ANY(%s)", (ids,)),
            ("events", "UPDATE events SET payload = %s::jsonb, entity_id = NULL, "
                       "dedup_key = 'erased:' || encode(sha256(convert_to(dedup_key, 'UTF8')), "
                       "'hex') WHERE id = ANY(%s)", (ERASED, ids)),
            ("leads", "DELETE FROM leads WHERE lead_key = ANY(%s) OR lower(email) = %s",
             (keys, email)),
            ("quarantine", "DELETE FROM quarantine WHERE id = ANY(%s)", (quarantined,)),
        ):
            touched[store] = conn.execute(sql, params).rowcount
        touched["stream"] = 0
        if stream is not None:
            touched["stream"] = erase_from_stream(stream, email)
        conn.execute("INSERT INTO erasures (email_sha256, touched) VALUES (%s, %s)",
                     (email_digest(email), Jsonb(touched)))
    return touched


def erase_from_stream(stream: IngestStream, email: str) -> int:
    """Delete (and acknowledge) the not yet stored entries that mention the e-mail."""
    found = [entry_id for entry_id, body in _entries(stream) if _mentions(body, email)]
    for start in range(0, len(found), 500):
        stream.done(found[start:start + 500])
    return len(found)


def _entries(stream: IngestStream, chunk: int = 1000) -> Iterator[tuple[str, bytes]]:
    start = "-"
    while True:
        rows = stream.client.xrange(stream.key, start, "+", count=chunk)
        for entry_id, fields in rows:
            yield entry_id.decode(), fields[b"b"]
        if len(rows) < chunk:
            return
        start = "(" + rows[-1][0].decode()


def _mentions(body: bytes, email: str) -> bool:
    if email.encode() not in body.lower() and b"\\u" not in body:
        return False  # JSON escapes can spell the address without its bytes appearing as such
    address = _address(email)
    try:
        return _contains(parse_body(body), address)
    except ValueError:  # not JSON after all: look at its text as it is
        return address.search(body.decode("utf-8", "replace").lower()) is not None


def _contains(value: Any, address: re.Pattern[str]) -> bool:
    if isinstance(value, str):
        return address.search(value.lower()) is not None
    if isinstance(value, dict):
        return any(_contains(k, address) or _contains(v, address) for k, v in value.items())
    if isinstance(value, list):
        return any(_contains(v, address) for v in value)
    return False
