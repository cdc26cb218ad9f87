"""Operator actions shared by the CLI and the HTTP API: sinks, dead letters, the relay."""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any

import kombu.exceptions
import redis

from sinks.db import connect
from workers import subscribers
from workers.runtime import Runtime, sink_queue

log = logging.getLogger("leadpipe.operations")


def sink_states(runtime: Runtime) -> list[dict[str, Any]]:
    """Every configured sink with its pause/circuit state and delivery counts."""
    paused = runtime.control.paused()
    counts: dict[tuple[str, str], int] = {}
    with runtime.pool.connection() as conn:
        for sink, status, n in conn.execute(
                "SELECT sink, status, count(*) FROM deliveries GROUP BY sink, status"):
            counts[(sink, status)] = n
    return [{"sink": name, "type": spec.type, "paused": name in paused,
             "circuit": runtime.control.circuit_state(name),
             "pending": counts.get((name, "pending"), 0),
             "delivered": counts.get((name, "delivered"), 0),
             "dead": counts.get((name, "dead"), 0),
             "superseded": counts.get((name, "superseded"), 0)}
            for name, spec in runtime.routing.sinks.items()]


def _known(runtime: Runtime, sink: str) -> None:
    if sink not in runtime.routing.sinks:
        raise LookupError(f"no sink {sink!r} in {runtime.routing.source}; configured: "
                          f"{', '.join(sorted(runtime.routing.sinks)) or 'none'}")


def pause(runtime: Runtime, sink: str) -> None:
    """Hold a sink's deliveries: its queue is no longer consumed; they wait in order."""
    _known(runtime, sink)
    runtime.control.pause(sink)
    if runtime.app is not None:
        _tell_nodes(runtime, runtime.app.control.cancel_consumer,
                    sink_queue(runtime.settings, sink))


def resume(runtime: Runtime, sink: str) -> None:
    """Release a sink's deliveries: the nodes that serve the sink consume its queue again.

    The command (`workers/queues.py`) is evaluated by each node: one started without --queues,
    or given this queue in --queues, consumes it; the others ignore it (Celery's own
    `add_consumer` would make every node consume it, storing nodes too)."""
    _known(runtime, sink)
    runtime.control.resume(sink)
    if runtime.app is not None:
        _tell_nodes(runtime, runtime.app.control.broadcast, "leadpipe_resume_queue",
                    arguments={"queue": sink_queue(runtime.settings, sink)})


def _tell_nodes(runtime: Runtime, broadcast: Callable[..., Any], *args: Any,
                **kwargs: Any) -> None:
    """Broadcast a pause or resume, which only hastens it: every node compares what it
    consumes with the pause set in Redis every few seconds (workers.queues). Celery retries a
    broadcast for as long as the broker does not answer, so an operator request waits for it
    at most the runtime's Redis timeout, in a thread of its own (left to end with the broker)."""
    if not runtime.interactive:
        broadcast(*args, **kwargs)
        return

    def send() -> None:
        try:
            broadcast(*args, **kwargs)
        except Exception as exc:  # the state is in Redis already: the nodes will follow it
            log.warning("broadcast to the nodes failed: %s", type(exc).__name__)

    sender = threading.Thread(target=send, daemon=True, name="leadpipe-broadcast")
    sender.start()
    sender.join(runtime.redis_timeout)
    if sender.is_alive():
        log.warning("broker not answering: nodes take the pause state from Redis in a few "
                    "seconds instead")


def dead_letters(dsn: str, sink: str | None = None, limit: int = 100,
                 include_replayed: bool = False,
                 since: datetime | None = None) -> list[dict[str, Any]]:
    with connect(dsn) as conn:
        cur = conn.execute(
            "SELECT id, event_id, sink, error, status_code, attempts, first_attempt_at, "
            "last_attempt_at, dead_at, replayed_at FROM dead_letters "
            "WHERE (%(sink)s::text IS NULL OR sink = %(sink)s) "
            "AND (%(since)s::timestamptz IS NULL OR dead_at >= %(since)s) "
            "AND (%(all)s OR replayed_at IS NULL) ORDER BY id DESC LIMIT %(limit)s",
            {"sink": sink, "all": include_replayed, "limit": limit, "since": since})
        names = [c.name for c in cur.description or ()]
        return [dict(zip(names, row, strict=True)) for row in cur]


def replay(runtime: Runtime, ids: list[int] | None = None, sink: str | None = None,
           since: datetime | None = None,
           progress: Callable[[int, int], None] | None = None) -> int:
    """Send dead letters back to their sinks as fresh deliveries; returns how many.

    A dead letter is taken once: of two replays at the same moment (a double click, the CLI
    and the page), the second finds it taken and sends nothing. Dead letters of a sink no
    longer configured stay waiting (no worker would consume its queue); naming such a sink
    raises LookupError. The deliveries go in a dispatch of their own (see `relay`): a task of
    theirs from before they died, still waiting somewhere, does nothing."""
    if sink is not None:
        known_target(runtime, sink)
    dispatch = uuid.uuid4().hex
    with runtime.pool.connection() as conn:
        rows = conn.execute(
            "SELECT id, sink FROM dead_letters WHERE replayed_at IS NULL "
            "AND (%(ids)s::bigint[] IS NULL OR id = ANY(%(ids)s)) "
            "AND (%(sink)s::text IS NULL OR sink = %(sink)s) "
            "AND (%(since)s::timestamptz IS NULL OR dead_at >= %(since)s) ORDER BY id",
            {"ids": ids, "sink": sink, "since": since}).fetchall()
        gone = sorted({name for _, name in rows if not _target(runtime, name)})
        if gone:
            if ids is not None and len(gone) == len({name for _, name in rows}):
                raise LookupError(f"dead letter of sink {gone[0]!r}, which is no longer "
                                  f"configured in {runtime.routing.source}; configure it to "
                                  "replay")
            log.warning("dead letters of sinks no longer configured left waiting",
                        extra={"sinks": gone})
        letters = [letter for letter, name in rows if name not in gone]
        done = 0
        for start in range(0, len(letters), 500):
            chunk = letters[start:start + 500]
            with conn.transaction():
                # rows locked in key order, as an erasure locks them (workers.quoting): an
                # UPDATE alone locks in the order its plan scans, storage order on a small table
                taken = conn.execute(
                    "UPDATE dead_letters SET replayed_at = now() WHERE id IN ("
                    "  SELECT id FROM dead_letters WHERE id = ANY(%s) AND replayed_at IS NULL "
                    "  ORDER BY id FOR UPDATE) RETURNING event_id, sink", (chunk,)).fetchall()
                moved = conn.execute(
                    "UPDATE deliveries d SET status = 'pending', dispatched_at = now(), "
                    "dispatch = %s, round = 0 FROM ("  # a replay starts the rounds afresh
                    "  SELECT l.event_id, l.sink FROM deliveries l "
                    "  JOIN unnest(%s::text[], %s::text[]) AS t(event_id, sink) "
                    "  ON l.event_id = t.event_id AND l.sink = t.sink WHERE l.status = 'dead' "
                    "  ORDER BY l.event_id, l.sink FOR UPDATE OF l) AS t "
                    "WHERE d.event_id = t.event_id AND d.sink = t.sink AND d.status = 'dead' "
                    "RETURNING d.event_id, d.sink",
                    (dispatch, [t[0] for t in taken], [t[1] for t in taken])).fetchall()
            by_sink: dict[str, list[str]] = {}
            for event_id, sink_name in moved:
                by_sink.setdefault(sink_name, []).append(event_id)
            for sink_name, event_ids in by_sink.items():
                publish_or_relay(runtime, sink_name, event_ids, dispatch)
            done += len(moved)
            if progress:
                progress(start + len(chunk), len(letters))
    return done


def publish_or_relay(runtime: Runtime, sink: str, event_ids: list[str],
                     dispatch: str | None = None) -> None:
    """Queue deliveries already committed as pending (in `dispatch`, the name their rows
    carry); if the broker cannot take them now, the relay sends them after
    LEADPIPE_RELAY_AFTER_SECONDS (they are in Postgres: nothing lost)."""
    try:
        runtime.publish(sink, event_ids, dispatch=dispatch)
    except (kombu.exceptions.OperationalError, redis.RedisError) as exc:
        log.warning("broker unavailable: deliveries left to the relay",
                    extra={"sink": sink, "deliveries": len(event_ids),
                           "error": type(exc).__name__})


def known_target(runtime: Runtime, sink: str) -> None:
    """Raise LookupError unless `sink` names a configured sink or an existing subscription."""
    if not subscribers.is_target(sink):
        _known(runtime, sink)
        return
    with runtime.pool.connection() as conn:
        if subscribers.load(conn, sink) is None:
            raise LookupError(f"no subscription {sink[len(subscribers.PREFIX):]!r} "
                              "(GET /integrations/webhooks lists them)")


def _target(runtime: Runtime, sink: str) -> bool:
    """A sink the workers deliver to: configured in the routing file, or a subscription."""
    return sink in runtime.routing.sinks or subscribers.is_target(sink)


# The relay's pick: the candidates first (at most the limit, their rows locked), then the
# try-lock of each delivery on those only (in one WHERE, Postgres would try it on every stale
# row before the LIMIT, holding them all until commit: past the lock table's size the relay
# failed every time). A delivery whose lock a task holds is being sent: its next round
# follows, and renamed under it, it would have no task that may send it.
RELAY_SQL = (
    "WITH picked AS MATERIALIZED ("
    "  SELECT event_id, sink FROM deliveries WHERE status = 'pending' "
    "  AND dispatched_at < now() - make_interval(secs => %s) AND sink <> ALL(%s) "
    "  ORDER BY dispatched_at LIMIT %s FOR UPDATE SKIP LOCKED) "
    "UPDATE deliveries d SET dispatched_at = now(), dispatch = %s FROM picked p "
    "WHERE d.event_id = p.event_id AND d.sink = p.sink "
    "AND pg_try_advisory_xact_lock(hashtextextended(p.sink || ':' || p.event_id, 0)) "
    "RETURNING d.event_id, d.sink, d.round")


def relay(runtime: Runtime, limit: int = 1000) -> int:
    """Dispatch pending deliveries whose task was lost (a crash between commit and publish, or
    a worker killed holding it); paused sinks keep theirs in their queue.

    A task only waiting in a long queue looks lost too: the relay gives the deliveries it sends
    a new dispatch name, and the task it took for lost finds them no longer its own (see
    `delivery.load_events`), so each delivery has one chain of rounds at a time."""
    dispatch = uuid.uuid4().hex
    with runtime.pool.connection() as conn, conn.transaction():
        rows = conn.execute(RELAY_SQL, (runtime.settings.relay_after_seconds,
                                        sorted(runtime.control.paused()), limit,
                                        dispatch)).fetchall()
    by_round: dict[tuple[str, int], list[str]] = {}
    for event_id, sink, round_ in rows:  # on in the round each was in, not from the first
        by_round.setdefault((sink, round_), []).append(event_id)
    for (sink, round_), event_ids in by_round.items():
        if _target(runtime, sink):
            runtime.publish(sink, event_ids, round_, dispatch=dispatch)
    return len(rows)


def schedule_purge(runtime: Runtime, queue: str | None = None) -> bool:
    """Send the purge task (to `queue`, by default the default queue) if retention is set and
    no worker sent it this interval (a Redis key with the interval as its expiry is the turn,
    so N workers purge once, not N times)."""
    from workers.retention import retention

    settings = runtime.settings
    if not retention(settings) or runtime.app is None:
        return False
    turn = runtime.redis.set(f"{settings.namespace}:purge-turn", "1", nx=True,
                             ex=settings.purge_interval_seconds)
    if turn:
        runtime.app.send_task("leadpipe.purge", queue=queue or settings.default_queue)
    return bool(turn)
