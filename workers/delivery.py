"""Delivering stored events to one sink: quick retries, attempts, backoff rounds, dead letters."""

from __future__ import annotations

import contextlib
import logging
import random
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import psycopg
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential

from ingest.queue import Entry
from sinks.base import PermanentSinkError, Sink
from sinks.postgres import rank_of, state_row, superseded
from workers.events import Event
from workers.normalize import normalize
from workers.routing import MAX_JITTER, SinkSpec

log = logging.getLogger("leadpipe.delivery")


@dataclass
class Plan:
    """What the task must do next: nothing, or send `event_ids` again after `countdown`."""

    delivered: int = 0
    dead: int = 0
    superseded: int = 0  # not sent: a newer event of the same lead or deal was stored since
    retry_ids: list[str] = field(default_factory=list)
    countdown: float = 0.0
    next_round: int = 0
    reason: str = ""
    rest_ids: list[str] = field(default_factory=list)  # not tried: the task's time was up
    # not tried: another delivery of the same lead or deal to this sink was on its way; sent
    # again in the same round after BUSY_SECONDS
    busy_ids: list[str] = field(default_factory=list)
    # not tried: the sink's rate limit asked for a wait longer than a worker sleeps; sent
    # again in the same round after `limited_wait`, whatever happened to the others
    limited_ids: list[str] = field(default_factory=list)
    limited_wait: float = 0.0


# One task delivers for at most this long, then hands the rest to a new task of the same round:
# a slow receiver must not hold a worker process for minutes, so the storing of new events
# (the ingest queue, served by the same processes) keeps its turns.
TASK_BUDGET_SECONDS = 5.0
BUSY_SECONDS = 1.0
CIRCUIT_OPEN = "circuit open"  # Plan.reason of a grace round (postponed, not a failure)


def _lock_key(sink: str, event_id: str) -> str:
    return f"{sink}:{event_id}"


def load_events(conn: psycopg.Connection, sink: str, event_ids: list[str],
                dispatch: str | None = None) -> tuple[list[Event], list[str], dict[str, str]]:
    """Pending deliveries of `sink` among `event_ids`, rebuilt from the stored raw events.

    Each is first locked for this session (`release` unlocks; Postgres does if the process
    dies), then checked to be still pending and still the task's (`dispatch`: the relay's name
    for the task it sent, None for the first one), so two tasks never deliver one event at once
    and a task the relay took for lost cannot start a second chain of rounds.
    Returns the events, the ids this session now holds locks for, and the stored events the
    current code no longer reads as an event (id -> why). An event keeps its stored dedup key
    (the idempotency key its sinks were given), whatever the key the code would make today.
    """
    locked = [event_id for event_id, ok in conn.execute(
        "SELECT id, pg_try_advisory_lock(hashtextextended(%s || ':' || id, 0)) "
        "FROM unnest(%s::text[]) AS id", (sink, event_ids)) if ok]
    try:
        rows = conn.execute(
            f"SELECT {_STORED} FROM deliveries d JOIN events e ON e.id = d.event_id "
            "WHERE d.sink = %s AND d.event_id = ANY(%s) AND d.status = 'pending' "
            "AND d.dispatch IS NOT DISTINCT FROM %s "
            "ORDER BY e.received_at, e.id", (sink, locked, dispatch)).fetchall()
        events, unreadable = _rebuilt(rows)
    except BaseException:
        release(conn, sink, locked)  # nobody else would: the caller never saw them
        raise
    return events, locked, unreadable


# the columns of `events` (as `e`) an event is rebuilt from (_rebuilt)
_STORED = "e.id, e.event_type, e.entity_id, e.received_at, e.dedup_key, e.payload::text"


def _rebuilt(rows: Sequence[tuple[Any, ...]]) -> tuple[list[Event], dict[str, str]]:
    """Events read again from stored rows (_STORED), and the ids the current code no longer
    reads as an event (id -> why)."""
    events: list[Event] = []
    unreadable: dict[str, str] = {}
    for event_id, event_type, entity_id, received_at, dedup_key, payload in rows:
        entry = Entry("stored", event_id, int(received_at.timestamp() * 1000), payload.encode(),
                      event_type if event_type.startswith("WEBHOOK.") else None)
        items = normalize(entry)
        found = [item for item in items if isinstance(item, Event)]
        if not found:
            unreadable[event_id] = "; ".join(
                str(getattr(item, "reason", item))[:300] for item in items) or "no event"
        for event in found[:1]:
            event.entity_id = entity_id  # the resolved identity, as stored
            event.dedup_key = dedup_key
            events.append(event)
    return events, unreadable


def _newer_here(conn: psycopg.Connection, sink: str, event: Event) -> list[Event] | None:
    """The events of the same lead or deal newer than `event` (sinks.postgres.rank_of) whose
    delivery to `sink` is pending or done: what that sink gets, or got, after it. None when
    one of them cannot be read again (its body purged, or no longer read by this version):
    what it carried is then unknown."""
    rank = rank_of(event)
    if rank is None or rank[0] is None:
        return None
    found, unreadable = _rebuilt(conn.execute(
        f"SELECT {_STORED} FROM events e JOIN deliveries d ON d.event_id = e.id AND d.sink = %s "
        "AND d.status IN ('pending', 'delivered') "
        "WHERE e.entity_type = %s AND e.entity_id = %s AND e.id <> %s "
        "AND e.occurred_at >= %s",  # (a lead's rank is its event's time: the newer ones only)
        (sink, event.entity_type, event.entity_id, event.id, event.occurred_at)).fetchall())
    if unreadable:
        return None
    return [e for e in found if (later := rank_of(e)) is not None and later[0] is not None
            and later > rank]


def release(conn: psycopg.Connection, sink: str, locked: list[str]) -> None:
    conn.execute("SELECT pg_advisory_unlock(hashtextextended(%s || ':' || id, 0)) "
                 "FROM unnest(%s::text[]) AS id", (sink, locked))


def _quick_retry(exc: BaseException) -> bool:
    """Worth another try within this call: not permanent, and the sink did not ask us to wait."""
    return not isinstance(exc, PermanentSinkError) and getattr(exc, "retry_after", None) is None


@dataclass
class Try:
    """One call to a sink, as delivery_attempts records it."""

    event_id: str
    started: datetime
    seconds: float
    outcome: str  # delivered | permanent | retryable
    status: int | None
    error: str | None


def _try(event: Event, sink: str, started: datetime, seconds: float,
         exc: BaseException | None, status: int | None = None) -> Try:
    outcome = ("delivered" if exc is None else
               "permanent" if isinstance(exc, PermanentSinkError) else "retryable")
    error = None if exc is None else f"{type(exc).__name__}: {exc}"[:1000]
    status = getattr(exc, "status", status)
    log.info("delivery attempt", extra={
        "event_id": event.id, "sink": sink, "outcome": outcome,
        "duration_ms": round(seconds * 1000, 1), "status_code": status, "error": error})
    return Try(event.id, started, seconds, outcome, status, error)


# One try in one statement: the delivery's attempt count and last error move on (and its
# status, when the try succeeded), and the try gets its delivery_attempts row.
_WRITE_TRY = """
WITH d AS (
    UPDATE deliveries SET attempts = attempts + 1, last_error = %(error)s,
           status = CASE WHEN %(ok)s THEN 'delivered' ELSE status END,
           delivered_at = CASE WHEN %(ok)s THEN now() ELSE delivered_at END
    WHERE event_id = %(id)s AND sink = %(sink)s RETURNING attempts)
INSERT INTO delivery_attempts (event_id, sink, attempt, started_at, duration_ms, outcome,
                               status_code, error)
SELECT %(id)s, %(sink)s, d.attempts, %(started)s, %(ms)s, %(outcome)s, %(status)s, %(error)s
FROM d
"""

# A delivery a newer event made pointless: closed, with an attempt row saying by which event.
_SUPERSEDE = """
WITH d AS (
    UPDATE deliveries SET status = 'superseded', attempts = attempts + 1, last_error = NULL
    WHERE event_id = %(id)s AND sink = %(sink)s AND status = 'pending' RETURNING attempts)
INSERT INTO delivery_attempts (event_id, sink, attempt, started_at, duration_ms, outcome, error)
SELECT %(id)s, %(sink)s, d.attempts, now(), 0, 'superseded', %(note)s FROM d
"""


def supersede(conn: psycopg.Connection, sink: str, events: list[Event],
              narrow: Callable[[Event, list[Event]], Event | None] | None = None,
              ) -> list[Event]:
    """Close the deliveries of events a newer event of their lead or deal has overtaken (see
    sinks.postgres.superseded) when that newer event goes to this sink too (its delivery
    pending or done): it brings the newer state. The rest, still to be sent; with `narrow`
    (Sink.narrowed), an overtaken event that carries fields none of the newer ones going to
    the sink carries is sent with those alone instead of closed."""
    newer = superseded(conn, events)
    if newer:
        coming = {row[0] for row in conn.execute(
            "SELECT event_id FROM deliveries WHERE sink = %s AND event_id = ANY(%s) "
            "AND status IN ('pending', 'delivered')", (sink, list(set(newer.values()))))}
        newer = {old: new for old, new in newer.items() if new in coming}
    narrowed: dict[str, Event] = {}
    if newer and narrow is not None:
        for event in events:
            if event.id not in newer:
                continue
            later = _newer_here(conn, sink, event)
            # only when every newer event is known, the row's newest among them: else what
            # they carried is not, and the older values could be put back over newer ones
            if later is None or newer[event.id] not in {e.id for e in later}:
                continue
            if rest := narrow(event, later):
                narrowed[event.id] = rest
                log.info("delivery narrowed to the fields newer events lack",
                         extra={"event_id": event.id, "sink": sink,
                                "fields": sorted(rest.only or ()),
                                "newer_event_id": newer[event.id]})
        newer = {old: new for old, new in newer.items() if old not in narrowed}
    for event in events:
        if event.id in newer:
            conn.execute(_SUPERSEDE, {"id": event.id, "sink": sink,
                                      "note": f"superseded by newer event {newer[event.id]}"})
            log.info("delivery superseded", extra={"event_id": event.id, "sink": sink,
                                                   "newer_event_id": newer[event.id]})
    return [narrowed.get(event.id, event) for event in events if event.id not in newer]


@contextlib.contextmanager
def turn(conn: psycopg.Connection, sink: str, event: Event) -> Iterator[bool]:
    """For a sink that keeps an entity's current state: True while this session alone sends to
    `sink` an event of that lead or deal (False: another one is on its way, try later).

    Held from the superseded check to the end of the last quick retry, so a newer event can
    neither be sent while an older one is under way (and be overwritten by it) nor be
    overtaken after its check. The lock is the session's: Postgres frees it if the process
    dies mid-send."""
    row = state_row(event)
    if row is None:
        yield True
        return
    key = f"{sink}:{row[0]}:{row[1]}"
    if not conn.execute("SELECT pg_try_advisory_lock(hashtextextended('turn:' || %s, 0))",
                        (key,)).fetchone()[0]:
        yield False
        return
    try:
        yield True
    finally:
        try:
            conn.execute("SELECT pg_advisory_unlock(hashtextextended('turn:' || %s, 0))", (key,))
        except psycopg.OperationalError:  # a lost session has freed its locks; the next
            pass  # statement reports the loss, after the send's outcome is known


def _dead(conn: psycopg.Connection, event_id: str, sink: str, exc: BaseException | None,
          reason: str) -> int:
    """Dead-letter one pending delivery; 1 if it was pending, else 0."""
    dead = conn.execute(
        "WITH d AS (UPDATE deliveries SET status = 'dead' WHERE event_id = %s AND sink = %s "
        "           AND status = 'pending' RETURNING attempts) "
        "INSERT INTO dead_letters (event_id, sink, error, status_code, attempts, "
        "                          first_attempt_at, last_attempt_at) "
        "SELECT %s, %s, %s, %s, d.attempts, "
        "  (SELECT min(started_at) FROM delivery_attempts WHERE event_id = %s AND sink = %s), "
        "  (SELECT max(started_at) FROM delivery_attempts WHERE event_id = %s AND sink = %s) "
        "FROM d",
        (event_id, sink, event_id, sink, reason[:1000], getattr(exc, "status", None),
         event_id, sink, event_id, sink)).rowcount
    if dead:
        log.warning("dead letter", extra={"event_id": event_id, "sink": sink,
                                          "reason": reason[:1000]})
    return dead


def attempt(sink: Sink, spec: SinkSpec, event: Event) -> tuple[BaseException | None, list[Try]]:
    """Deliver one event with a few quick tries (tenacity); the outcome and every try."""
    outcome: BaseException | None = None
    tries: list[Try] = []
    retrying = Retrying(stop=stop_after_attempt(spec.quick_retries),
                        wait=wait_exponential(multiplier=0.2, max=2),
                        retry=retry_if_exception(_quick_retry), reraise=True)
    try:
        for try_ in retrying:
            with try_:
                started = datetime.now(UTC)
                t0 = time.perf_counter()
                try:
                    status = sink.deliver(event)
                except Exception as exc:
                    tries.append(_try(event, spec.name, started, time.perf_counter() - t0, exc))
                    raise
                tries.append(_try(event, spec.name, started, time.perf_counter() - t0, None,
                                  status if isinstance(status, int) else None))
    except Exception as exc:  # every try failed: the caller decides (retry round or dead)
        outcome = exc
    return outcome, tries


class Health(Protocol):
    """Watches a target's outcomes; `failed` returns a reason when the target must stop
    receiving (a subscription suspended), and its undelivered events go to dead letters."""

    def succeeded(self, conn: psycopg.Connection) -> None: ...

    def failed(self, conn: psycopg.Connection, exc: BaseException) -> str | None: ...


def run(conn: psycopg.Connection, sink: Sink, spec: SinkSpec, control: Any, event_ids: list[str],
        round_: int, health: Health | None = None, dispatch: str | None = None,
        refuses: Callable[[Event], str | None] | None = None) -> Plan:
    """One round of deliveries to one sink; tells the task what to schedule next.
    `refuses`: why an event is no longer the target's (None: it is); those go to dead
    letters with that reason, unsent."""
    events, locked, unreadable = load_events(conn, spec.name, event_ids, dispatch)
    try:
        dead = sum(_dead(conn, event_id, spec.name, None,
                         f"stored event no longer readable by this version: {why}")
                   for event_id, why in unreadable.items())
        if refuses is not None:
            refused = {event.id: why for event in events if (why := refuses(event))}
            dead += sum(_dead(conn, event_id, spec.name, None, why)
                        for event_id, why in refused.items())
            events = [event for event in events if event.id not in refused]
        plan = _run(conn, sink, spec, control, events, round_, health, dispatch)
        plan.dead += dead
        return plan
    finally:
        release(conn, spec.name, locked)


def bury(conn: psycopg.Connection, sink: str, event_ids: list[str], reason: str) -> int:
    """Move pending deliveries straight to dead letters (their target cannot receive now)."""
    dead = 0
    for event_id in event_ids:
        dead += _dead(conn, event_id, sink, None, reason)
    return dead


class Bookkeeping:
    """The records of one task's deliveries: one statement per try (its row, the delivery's
    attempt count, and its status when the try succeeded).

    The successes reach the circuit breaker and the target's health (a Redis command and a
    Postgres statement that change nothing while all is well) right after a failure or at a
    task's first success (a half-open probe closes the circuit at once), otherwise at most
    every SIGNAL_SECONDS. A permanent refusal the target answered (a 422 for one bad lead)
    shows it is up: it closes the circuit as a success does, though it is no success for the
    target's health.
    """

    def __init__(self, conn: psycopg.Connection, sink: str, control: Any,
                 health: Health | None):
        self.conn = conn
        self.sink = sink
        self.control = control
        self.health = health
        self.signal_now = True
        self.signalled = 0.0

    def write(self, tries: list[Try]) -> None:
        if not tries:
            return
        for t in tries:
            self.conn.execute(_WRITE_TRY, {
                "id": t.event_id, "sink": self.sink, "ok": t.outcome == "delivered",
                "started": t.started, "ms": t.seconds * 1000, "outcome": t.outcome,
                "status": t.status, "error": t.error})
        last = tries[-1]
        if last.outcome == "permanent" and last.status is not None:
            self.control.circuit_success(self.sink)  # rare: no need to space these out
            self.signal_now = True  # the next success still reaches the health
        elif last.outcome != "delivered":
            self.signal_now = True
        elif self.signal_now or time.monotonic() - self.signalled >= SIGNAL_SECONDS:
            if self.health is not None:
                self.health.succeeded(self.conn)
            self.control.circuit_success(self.sink)
            self.signal_now, self.signalled = False, time.monotonic()


SIGNAL_SECONDS = 0.5
_ALWAYS = contextlib.nullcontext(True)  # the turn of a sink that gets every event


def _run(conn: psycopg.Connection, sink: Sink, spec: SinkSpec, control: Any,
         events: list[Event], round_: int, health: Health | None = None,
         dispatch: str | None = None) -> Plan:
    if control.is_paused(spec.name):
        # bounced as they are, nothing written (every 2 s for as long as the pause lasts): a
        # delivery the relay takes for lost after the resume goes on in its round all the same
        return Plan(retry_ids=[e.id for e in events], countdown=2.0, next_round=round_,
                    reason="paused")
    # The records of deliveries are committed without waiting for the WAL flush: a worker
    # killed after a commit loses nothing (Postgres has it); only a crash of Postgres itself
    # may lose the last few hundred ms of them, and those events are then delivered again
    # under the same idempotency key. Events themselves are always stored with a full commit.
    conn.execute("SET synchronous_commit = off")
    try:
        plan = _deliver_all(conn, sink, spec, control, events, round_, health,
                            Bookkeeping(conn, spec.name, control, health))
        _schedule(conn, spec.name, plan, dispatch, round_)
        return plan
    finally:
        conn.execute("RESET synchronous_commit")


def _deliver_all(conn: psycopg.Connection, sink: Sink, spec: SinkSpec, control: Any,
                 events: list[Event], round_: int, health: Health | None,
                 book: Bookkeeping) -> Plan:
    plan = Plan(next_round=round_)
    waits: list[float] = []
    failed: list[tuple[Event, BaseException]] = []
    deadline = time.monotonic() + TASK_BUDGET_SECONDS
    caller = uuid.uuid4().hex  # the name this task takes a half-open circuit's probe in
    check_circuit = True  # at the start, after each failure, and every SIGNAL_SECONDS
    checked = time.monotonic()
    for n, event in enumerate(events):
        if n and time.monotonic() > deadline:
            plan.rest_ids = [e.id for e in events[n:]]
            break
        if check_circuit or time.monotonic() - checked >= SIGNAL_SECONDS:
            check_circuit, checked = False, time.monotonic()
            blocked = control.circuit_wait(spec.name, spec.circuit_cooldown, caller)
            if blocked > 0:  # the sink is known down: do not hammer it, back off as a whole
                rest = events[n:]
                last = len(spec.retry_schedule)
                # the last round met the open circuit: one grace round when it may be probed
                # (a sink back by then gets them), waited again while another task's probe is
                # out (half-open); dead letters only when it is open again
                if round_ == last or (round_ > last and
                                      control.circuit_state(spec.name) == "half-open"):
                    plan.retry_ids, plan.countdown = [e.id for e in rest], blocked
                    plan.next_round, plan.reason = last + 1, CIRCUIT_OPEN
                else:
                    failed += [(e, RuntimeError("circuit open")) for e in rest]
                    waits.append(blocked)
                break
        with turn(conn, spec.name, event) if sink.latest_state_only else _ALWAYS as mine:
            if not mine:
                plan.busy_ids.append(event.id)
                continue
            # checked just before the send (and before it costs a rate-limit token), in the
            # entity's turn: no newer event can be sent meanwhile
            if sink.latest_state_only:
                kept = supersede(conn, spec.name, [event], sink.narrowed)
                if not kept:
                    plan.superseded += 1
                    continue
                event = kept[0]  # whole, or narrowed to what a newer event lacks
            if spec.rate:
                wait = control.rate_wait(spec.name, *spec.rate)
                if wait > 1.0:  # a long wait is a scheduled task, not a sleeping worker
                    plan.limited_ids = [e.id for e in events[n:]]
                    plan.limited_wait = wait
                    break
                while wait > 0:
                    time.sleep(wait)
                    wait = control.rate_wait(spec.name, *spec.rate)
            exc, tries = attempt(sink, spec, event)
        book.write(tries)
        if exc is None:
            plan.delivered += 1
            continue
        check_circuit = True
        if health is not None and (stop := health.failed(conn, exc)):
            # the target stops receiving: this event, the rest and the failed go to dead letters
            for item, item_exc in [(event, exc), *failed, *((e, None) for e in events[n + 1:])]:
                plan.dead += _dead(conn, item.id, spec.name, item_exc,
                                   f"{stop}: {type(exc).__name__}: {exc}")
            return plan
        if isinstance(exc, PermanentSinkError):
            _dead(conn, event.id, spec.name, exc, f"permanent: {type(exc).__name__}: {exc}")
            plan.dead += 1
        else:
            control.circuit_failure(spec.name, spec.circuit_failures, spec.circuit_cooldown)
            failed.append((event, exc))
            if getattr(exc, "retry_after", None):
                waits.append(float(exc.retry_after))  # type: ignore[attr-defined]
    if failed:
        if round_ >= len(spec.retry_schedule):
            for event, exc in failed:
                _dead(conn, event.id, spec.name, exc,
                      f"retries exhausted after {min(round_, len(spec.retry_schedule)) + 1} "
                      f"rounds: {type(exc).__name__}: "
                      f"{exc}")
                plan.dead += 1
        else:
            base = spec.retry_schedule[round_] * random.uniform(2 - MAX_JITTER, MAX_JITTER)  # noqa: S311
            plan.retry_ids = [e.id for e, _ in failed] + plan.retry_ids
            plan.countdown = max([base, plan.countdown, *waits])
            plan.next_round = round_ + 1
            plan.reason = "retrying"
    return plan


def _schedule(conn: psycopg.Connection, sink: str, plan: Plan, dispatch: str | None,
              round_: int = 0) -> None:
    """When the deliveries the task sends on are due (the relay waits that long and more), and
    in which round (the relay sends a lost one on in it), for those still in this task's
    dispatch."""
    for ids, seconds, in_round in ((plan.retry_ids, plan.countdown, plan.next_round),
                                   (plan.rest_ids, 0.0, round_),
                                   (plan.busy_ids, BUSY_SECONDS, round_),
                                   (plan.limited_ids, plan.limited_wait, round_)):
        if ids:
            # locked in key order (a subquery's ORDER BY ... FOR UPDATE), as an erasure locks
            # deliveries (workers.quoting); the UPDATE alone would lock in scan order
            conn.execute("UPDATE deliveries SET dispatched_at = now() + make_interval(secs => %s), "
                         "round = %s WHERE sink = %s AND event_id IN ("
                         "  SELECT event_id FROM deliveries WHERE sink = %s AND event_id = ANY(%s)"
                         "  AND dispatch IS NOT DISTINCT FROM %s ORDER BY event_id FOR UPDATE)",
                         (seconds, in_round, sink, sink, ids, dispatch))
