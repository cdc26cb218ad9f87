"""Personal data over time: retention purges (`leadpipe purge`) and erasure of one person."""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import psycopg
import redis
from psycopg.types.json import Jsonb

from config.settings import Settings
from ingest.queue import IngestStream
from workers.normalize import lead_hash, legacy_key_before, parse_body
from workers.quoting import find_and_lock, rewrite_quotes

log = logging.getLogger("leadpipe.retention")

BATCH = 5000
PURGED = '{"purged": true}'
ERASED = '{"erased": true}'
Progress = Callable[[str, int], None]

# (store, setting, statement); each statement changes at most %(batch)s rows per transaction,
# skipping rows another transaction holds, so ingest and deliveries never wait on a purge.
# The events' statement only picks (and locks) the rows: _purge_payloads empties them, keeping
# what a redelivery under an earlier version's key is matched by (sinks.postgres._as_stored_before).
_PURGES = (
    ("events.payload", "retain_payload_days", """
          SELECT e.id, e.dedup_key,
                 CASE WHEN e.dedup_key LIKE 'legacy:%%' AND e.dedup_key NOT LIKE 'legacy:hash:%%'
                      AND e.dedup_key !~ ':[^:]{16}$' THEN e.payload->'leads'->0 END
          FROM events e
          WHERE e.received_at < now() - make_interval(days => %(days)s) AND e.purged_at IS NULL
            AND NOT EXISTS (SELECT 1 FROM deliveries d
                            WHERE d.event_id = e.id AND d.status = 'pending')
            AND NOT EXISTS (SELECT 1 FROM dead_letters l
                            WHERE l.event_id = e.id AND l.replayed_at IS NULL)
          LIMIT %(batch)s FOR UPDATE SKIP LOCKED"""),
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
            if store == "events.payload":
                n = _purge_payloads(conn, sql, days, batch)
            else:
                n = conn.execute(sql, {"days": days, "batch": batch}).rowcount
            done[store] += n
            if progress:
                progress(store, done[store])
            if n < batch:
                break
    return done


def purged_marker(dedup_key: str, lead: Any) -> str:
    """What a purged body becomes: `{"purged": true}`, and for a legacy event stored under an
    earlier version's key (no lead hash in it) that hash, never the lead itself."""
    if (isinstance(lead, dict) and dedup_key.startswith("legacy:")
            and not dedup_key.startswith("legacy:hash:")
            and legacy_key_before(dedup_key) is None):
        return orjson.dumps({"purged": True, "lead_hash": lead_hash(lead)}).decode()
    return PURGED


def _purge_payloads(conn: psycopg.Connection, pick: str, days: int, batch: int) -> int:
    with conn.transaction():
        rows = conn.execute(pick, {"days": days, "batch": batch}).fetchall()
        if rows:
            conn.execute(
                "UPDATE events SET payload = p.payload, purged_at = now() "
                "FROM unnest(%s::text[], %s::jsonb[]) AS p(id, payload) WHERE events.id = p.id",
                ([r[0] for r in rows], [purged_marker(key, lead) for _, key, lead in rows]))
    return len(rows)


def email_digest(email: str) -> str:
    return hashlib.sha256(email.strip().lower().encode("utf-8")).hexdigest()


def _digest(kind: str, value: str) -> str:
    return hashlib.sha256(f"{kind}\n{value}".encode()).hexdigest()  # (no address holds \n)


def erased_lead_digests(uuid: str | None, legacy_id: str | None,
                        email: str | None) -> list[str]:
    """What an erasure records of one of the person's leads (`erasures.lead_sha256`), so that
    a body still on its way that would have been stored as that lead is theirs, whatever
    address it carries: its uuid, its legacy id and current e-mail, and these two again
    marked `+` when the lead has no uuid (a body with a uuid of its own joins it then)."""
    found = [_digest("uuid", uuid)] if uuid else []
    for kind, value in (("id", legacy_id), ("email", email)):
        if value:
            found += [_digest(kind, value)] + ([] if uuid else [_digest(kind + "+", value)])
    return found


def body_lead_digests(uuid: str | None, legacy_id: str | None, email: str | None) -> list[str]:
    """The digests of `erased_lead_digests` a lead of a body matches when it would have been
    stored as that lead (sinks.postgres._Leads.resolve): by uuid; else by legacy id or e-mail,
    unless both have a uuid and they differ (two contacts are never merged)."""
    mark = "+" if uuid else ""
    return ([_digest("uuid", uuid)] if uuid else []) + [
        _digest(kind + mark, value) for kind, value in (("id", legacy_id), ("email", email))
        if value]


def erased_key(dedup_key: str) -> str:
    """What an erased event's dedup key becomes: a redelivery still finds it, nothing is read
    from it (Postgres computes the same: 'erased:' || sha256 of the key's UTF-8)."""
    return "erased:" + hashlib.sha256(dedup_key.encode("utf-8")).hexdigest()


_EMAIL = re.compile(r"[^@\s]+@[^@\s]+")
# The characters of an address, Unicode letters and digits included (\w): what may stand
# right before one inside a longer one (RFC 5322's local-part characters), and in a domain.
# sinks.postgres finds the addresses of a body with the same classes.
LOCAL_PART = r"[\w.!#$%&'*+/=?^`{|}~\-]"
DOMAIN_PART = r"[\w\-]"

# The turn of storing and erasing (an advisory lock key): every storing transaction holds it
# shared from its start (sinks.postgres.store), an erasure takes it alone for as long as it
# takes to record itself, so each batch either ended before the erasure (whose deletions then
# find what it stored) or checks for erasures after it (and drops the person's bodies).
ERASURE_TURN = "hashtextextended('leadpipe:erasure-turn', 0)"
# How long recording an erasure waits for the batches under way before it lets the others go
# on and tries again: storing waits behind it meanwhile.
_TURN_WAIT = "1s"
_TURN_TRIES = 30
_TURN_PAUSE = 1.0


def _address(email: str) -> re.Pattern[str]:
    """The address as a whole, in lower-cased text: "Ana <ana@x.com>" and "mailto:ana@x.com"
    mention ana@x.com; "joana@x.com" and "ana@x.com.br" are other people."""
    return re.compile(rf"(?<!{LOCAL_PART}){re.escape(email)}(?!{DOMAIN_PART}|\.\w)")


def _like(text: str) -> str:
    """A LIKE pattern for text holding `text`, whatever Postgres' lower() makes of letters past
    ASCII (nothing, under the C locale): they match anything, Python then checks the match."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return "%" + re.sub(r"[^\x00-\x7f]+", "%", escaped) + "%"


def erase(conn: psycopg.Connection, stream: IngestStream | None, email: str) -> dict[str, int]:
    """Remove one person (by e-mail) from every store; returns what was touched, per store.

    Their lead rows, quarantined bodies, dead letters, delivery records and not yet processed
    stream entries are deleted; rows kept for others that quote the address (another lead's
    owner, a deal's custom field, an error text) have it rewritten (workers.quoting). Their
    events keep only an anonymous row: the body becomes `{"erased": true}` and the dedup key
    its hash, so a later redelivery of the same event is still a duplicate and brings nothing
    back; a body received before the erasure and still on
    its way is dropped when its batch is stored (see `sinks.postgres`). A body is theirs when
    one of its strings holds the whole address (any case), never a longer one around it, or
    when its lead would have joined one of theirs (`erased_lead_digests`).

    Two transactions: the erasure is recorded first (so every batch stored from then on drops
    their bodies), then the rows are changed. Should the second fail, running it again
    finishes the work. `conn` must not be inside a transaction. Their bodies stored long ago
    are still in Redis' append-only file until it is rewritten: the caller then asks for that
    (`rewrite_append_only_file`).
    """
    email = email.strip().lower()
    if not _EMAIL.fullmatch(email):
        raise ValueError("expected one e-mail address")
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        raise RuntimeError("erase needs a connection outside any transaction")
    erasure = _record(conn, email)
    try:
        return _remove(conn, stream, email, erasure)
    except (psycopg.Error, redis.RedisError) as exc:  # a store failed us: worth a new run
        raise ErasureUnfinished(
            "the erasure is recorded (bodies naming the person are dropped from now on) but "
            f"did not finish ({type(exc).__name__}); run it again") from exc


AOF_WAIT_SECONDS = 30.0
AOF_REWRITE_SECONDS = 86_400  # the scheduled purge asks for a rewrite this often at most


def rewrite_append_only_file(client: redis.Redis, wait: float = 0.0) -> str:
    """Have Redis rewrite its append-only file, and say how that went (also logged).

    Deleting a stream entry only appends the deletion to that log: every body acknowledged
    since the last rewrite stays on Redis' disk until the next one, which Redis itself starts
    only as the file doubles. An erasure asks for one at once, the purge once a day. A rewrite
    under way started before the deletions (its copy may hold them): waited for up to `wait`
    seconds, then ours is asked for. A Redis without the log, or refusing the command (a
    managed service may), is left as it is."""
    deadline = time.monotonic() + wait
    try:
        if not int(client.info("persistence").get("aof_enabled", 0)):
            return "off"
        while True:
            try:
                client.bgrewriteaof()
            except redis.ResponseError as exc:
                if "in progress" not in str(exc) or time.monotonic() >= deadline:
                    raise
                time.sleep(0.2)
                continue
            log.info("redis append-only file: rewrite started")
            return "started"
    except redis.RedisError as exc:
        log.warning("redis append-only file not rewritten (%s): bodies deleted from the "
                    "stream stay in it until Redis rewrites it (BGREWRITEAOF)", exc)
        return "not rewritten"


class ErasureBusy(RuntimeError):
    """Batches being stored kept the erasure from being recorded: nothing was erased."""


class ErasureUnfinished(RuntimeError):
    """The erasure is recorded but its rows were not changed: it must be run again."""


def _record(conn: psycopg.Connection, email: str) -> int:
    """Record the erasure, at the time it takes the turn alone (clock_timestamp(), not the
    transaction's start): the batches under way have then ended, those after it see it."""
    for _ in range(_TURN_TRIES):
        try:
            with conn.transaction():
                conn.execute(f"SET LOCAL lock_timeout = '{_TURN_WAIT}'")
                conn.execute(f"SELECT pg_advisory_xact_lock({ERASURE_TURN})")
                # their leads' identifiers, read while no batch can change a lead: a body on
                # its way that would join one of them is theirs whatever address it carries
                # (stored e-mails are lower-cased, as `email` is: workers.schemas.normal_email)
                leads = {digest for lead in conn.execute(
                    "SELECT uuid, legacy_id, email FROM leads "
                    "WHERE email = %(email)s OR lead_key = 'email:' || %(email)s",
                    {"email": email}) for digest in erased_lead_digests(*lead)}
                row = conn.execute(
                    "INSERT INTO erasures (email_sha256, lead_sha256, erased_at) "
                    "VALUES (%s, %s, clock_timestamp()) RETURNING id",
                    (email_digest(email), sorted(leads))).fetchone()
                assert row is not None
                return int(row[0])
        except psycopg.errors.LockNotAvailable:
            # a batch under way waits on something slow (another erasure's lead locks): let
            # the batches queued behind us go on, and try again
            time.sleep(_TURN_PAUSE)
    raise ErasureBusy(f"the erasure waited {_TURN_TRIES} times for the batches being stored "
                      "and recorded nothing; run it again")


def _remove(conn: psycopg.Connection, stream: IngestStream | None, email: str,
            erasure: int) -> dict[str, int]:
    """Change every row (and stream entry) of the person, in one transaction that ends by
    writing what it touched into the erasure's record (`{}` until then)."""
    from sinks.postgres import lock_leads  # here: sinks.postgres imports this module

    pattern, address = _like(email), _address(email)
    touched: dict[str, int] = {}
    with conn.transaction():
        def holds(value: Any) -> bool:
            return _contains(value, address)

        # theirs: the rows of the address, and one keyed by it whose e-mail changed since;
        # candidates read unlocked and confirmed here, so a row another address only resembles
        # (`joana@` for `ana@`) is never locked
        candidates = conn.execute(
            "SELECT lead_key, uuid, legacy_id, lower(email) = %(email)s "
            "OR lead_key = 'email:' || %(email)s, to_jsonb(leads) FROM leads "
            "WHERE lower(email) = %(email)s OR lead_key = 'email:' || %(email)s "
            "OR lower(leads::text) LIKE %(like)s", {"email": email, "like": pattern}).fetchall()
        mine = [row for row in candidates if row[3]]
        quoted = [(row[0],) for row in candidates if not row[3] and holds(row[4])]
        keys = [row[0] for row in mine]
        # the order a storing batch locks in (sinks.postgres.lock_leads: identifiers, then the
        # leads rows, then events), else a batch redelivering their event deadlocks with us;
        # their rows and those quoting them (rewritten below) in one statement: two erasures
        # of people who quote each other then wait for one another, never in a cycle
        lock_leads(conn, [r[1] for r in mine if r[1]], [r[2] for r in mine if r[2]], [email])
        conn.execute("SELECT 1 FROM leads WHERE lead_key = ANY(%s) "
                     "ORDER BY created_at, lead_key FOR UPDATE",
                     (keys + [k for (k,) in quoted],)).fetchall()
        rows = [(event_id, dedup_key) for event_id, dedup_key, theirs, payload in conn.execute(
            "SELECT id, dedup_key, entity_type = 'CONTACT' AND entity_id = ANY(%s), payload "
            "FROM events WHERE (entity_type = 'CONTACT' AND entity_id = ANY(%s)) "
            "OR lower(payload::text) LIKE %s", (keys, keys, pattern))
            if theirs or holds(payload)]
        ids = [r[0] for r in rows]
        dedup_keys = [r[1] for r in rows]
        # theirs alone, in the order a batch locks events (dedup keys): a batch storing a
        # neighbour's events never meets us holding them in another order
        conn.execute("SELECT 1 FROM events WHERE id = ANY(%s) ORDER BY dedup_key FOR UPDATE",
                     (ids,)).fetchall()
        # a body Postgres refused is kept as a JSON string of its text, whose JSON escapes
        # ("joao\u0040x.com") stay as written: such a row is read as the body it holds
        quarantined = [row_id for row_id, payload in conn.execute(
            "SELECT id, payload FROM quarantine WHERE lower(payload::text) LIKE %s "
            "OR (jsonb_typeof(payload) = 'string' AND strpos(payload::text, '\\u') > 0)",
            (pattern,))
            if (_mentions(payload.encode(), email) if isinstance(payload, str)
                else holds(payload))]
        # a delivery of theirs under way (workers.delivery.load_events holds its lock) would
        # record its e-mail ledger rows after our delete: wait for it to end, and keep the rest
        # from starting until we commit (they then find the delivery gone). Nothing of ours is
        # written yet, so the ledger write it may be finishing never waits for us.
        conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(sink || ':' || event_id, 0)) "
                     "FROM (SELECT sink, event_id FROM deliveries WHERE event_id = ANY(%s) "
                     "ORDER BY sink, event_id) AS theirs", (ids,)).fetchall()
        # the deals, dead letters, deliveries and attempts changed below, theirs and those of
        # others that quote them: each table's locked in one ordered statement, before any
        # is changed (deleting theirs first, then locking others', made cycles with replays)
        found = find_and_lock(conn, pattern, holds, ids)
        for store, sql, params in (
            ("email_sent", "DELETE FROM email_sent WHERE dedup_key = ANY(%s) "
                           "OR lower(recipient) = %s", (dedup_keys, email)),  # sent to them too
            ("delivery_attempts", "DELETE FROM delivery_attempts WHERE event_id = ANY(%s)",
             (ids,)),
            ("dead_letters", "DELETE FROM dead_letters WHERE event_id = ANY(%s)", (ids,)),
            ("deliveries", "DELETE FROM deliveries WHERE event_id = ANY(%s)", (ids,)),
            ("events", "UPDATE events SET payload = %s::jsonb, entity_id = NULL, "
                       "dedup_key = 'erased:' || encode(sha256(convert_to(dedup_key, 'UTF8')), "
                       "'hex') WHERE id = ANY(%s) AND dedup_key NOT LIKE 'erased:%%'",
             (ERASED, ids)),  # (an erasure of another person it names may have hashed it)
            ("leads", "DELETE FROM leads WHERE lead_key = ANY(%s)", (keys,)),
            ("quarantine", "DELETE FROM quarantine WHERE id = ANY(%s)", (quarantined,)),
        ):
            touched[store] = conn.execute(sql, params).rowcount
        # what stays but quotes them: another lead's owner, a deal's custom field, an error
        # text (their own rows are gone by now, so only others' are found)
        touched.update(rewrite_quotes(conn, address, {"leads": quoted, **found}))
        touched["stream"] = 0
        if stream is not None:
            touched["stream"] = erase_from_stream(stream, email)
        # this one done, and any earlier one of the person that failed half-way (still `{}`:
        # while it is, their bodies are dropped whenever received, sinks.postgres._ERASED_AT)
        conn.execute("UPDATE erasures SET touched = %s WHERE id = %s", (Jsonb(touched), erasure))
        conn.execute("UPDATE erasures SET touched = jsonb_build_object('finished_by', %s::bigint) "
                     "WHERE email_sha256 = %s AND touched = '{}' AND id < %s",
                     (erasure, email_digest(email), erasure))
    return touched


def erase_from_stream(stream: IngestStream, email: str) -> int:
    """Delete (and acknowledge) the not yet stored entries that mention the e-mail.

    A legacy body holding several leads, some of them other people's, stays: storing makes one
    event per lead and drops the person's (received before the erasure), so the others'
    accepted events are not lost with it. Returns the entries deleted."""
    address = _address(email)
    found = [entry.entry_id for entry in stream.entries()
             if _mentions(entry.body, email) and not _shared(entry.body, address)]
    for start in range(0, len(found), 500):
        stream.done(found[start:start + 500])
    return len(found)


def _shared(body: bytes, address: re.Pattern[str]) -> bool:
    """A legacy body of several leads, one at least not naming the address."""
    try:
        data = parse_body(body)
    except (ValueError, RecursionError):
        return False
    leads = data.get("leads") if isinstance(data, dict) else None
    return (isinstance(leads, list) and len(leads) > 1
            and any(not _contains(lead, address) for lead in leads))


def _mentions(body: bytes, email: str) -> bool:
    text = body.decode("utf-8", "replace").lower()  # str.lower: "JOÃO" is "joão" too
    if email not in text and "\\u" not in text:
        return False  # JSON escapes can spell the address without its bytes appearing as such
    address = _address(email)
    try:
        return _contains(parse_body(body), address)
    except (ValueError, RecursionError):  # not JSON after all (or too deep to read): its text,
        # as written and with JSON's escapes read ("jo\u00e3o", "ana\u0040x.com")
        return (address.search(text) is not None
                or address.search(_unescaped(text)) is not None)


_ESCAPE = re.compile(r"\\u([0-9a-fA-F]{4})")


def _unescaped(text: str) -> str:
    """Text with JSON's \\uXXXX escapes (surrogate pairs joined) and \\/ read, lower-cased."""
    read = _ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), text).replace("\\/", "/")
    return read.encode("utf-16", "surrogatepass").decode("utf-16", "replace").lower()


def strings(value: Any) -> Iterator[str]:
    """Every string in a JSON value, keys too; walked with a stack of its own, so a body nested
    as deep as JSON allows cannot run out of Python's."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            yield item
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _contains(value: Any, address: re.Pattern[str]) -> bool:
    return any(address.search(text.lower()) for text in strings(value))
