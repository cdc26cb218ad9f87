"""Celery tasks: thin wrappers that unpack arguments, call the pipeline and decide on retries."""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import redis
from celery import Task, shared_task
from psycopg_pool import PoolTimeout

from sinks.base import RetryableSinkError
from sinks.postgres import oversized
from workers import delivery, metrics, pipeline

log = logging.getLogger("leadpipe.tasks")

TRANSIENT = (RetryableSinkError, psycopg.OperationalError, PoolTimeout, redis.ConnectionError,
             redis.TimeoutError)


def backoff(retries: int, base: float = 1.0, cap: float = 60.0) -> float:
    """Exponential backoff with full jitter."""
    return random.uniform(0, min(cap, base * 2**min(retries, 30)))  # (2**1024: no float)


@contextlib.contextmanager
def held(stream: Any, consumer: str, entry_ids: list[str], every: float) -> Iterator[None]:
    """While the block runs, reset the entries' idle time every `every` seconds: a batch that
    takes longer than LEADPIPE_CLAIM_IDLE_SECONDS (stored one by one, a slow Postgres) is not
    taken for a dead worker's and dispatched a second time beside it."""
    stop = threading.Event()

    def keep() -> None:
        while not stop.wait(every):
            try:
                stream.touch(consumer, entry_ids)
            except redis.RedisError:  # the claim may happen; storing twice changes nothing
                pass

    thread = threading.Thread(target=keep, name="leadpipe-batch-hold", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=1)  # a touch stuck on Redis ends on its own, touching nothing more


def store_down_ms(settings: Any) -> int:
    """How long the pumps read no new entries after a batch found the store down: half a
    claim period, from 10 s (longer than a try waits for a connection) to 30 s; ended early
    by the first batch stored again."""
    return int(1000 * max(10.0, min(30.0, settings.claim_idle_seconds / 2)))


def _cap(runtime: Any) -> float:
    """The longest retry countdown: 60 s, within the runtime's longest wait."""
    return min(60.0, runtime.longest_wait)


@shared_task(bind=True, name="leadpipe.process_batch", acks_late=True, ignore_result=True,
             max_retries=None)
def process_batch(self: Task, entry_ids: list[str], consumer: str,
                  oversized_tries: int = 0, failing_since: float | None = None
                  ) -> dict[str, Any]:
    """Store one batch of ingest-stream entries in Postgres and acknowledge them.

    `oversized_tries`: the tries in a row that ended on an event too big for the server's
    limits (sinks.postgres.oversized); any other failure (Postgres down) starts the count
    again, so only LEADPIPE_OVERSIZED_RETRIES such tries in a row quarantine the event.
    `failing_since`: when this batch's tries began to fail (epoch seconds). Retries go on for
    half of LEADPIPE_CLAIM_IDLE_SECONDS; then the task ends and leaves its entries pending,
    for the pump's claim to send again, re-batched, a claim period later: a long outage keeps
    a bounded number of tasks alive, never a growing heap of retries."""
    runtime = self.app.leadpipe.runtime()
    settings = runtime.settings
    try:
        with held(runtime.stream, consumer, entry_ids, settings.claim_idle_seconds / 3):
            stored = pipeline.process(runtime, entry_ids, last_try=oversized_tries
                                      >= settings.oversized_retries)
    except TRANSIENT as exc:
        big = oversized(exc)
        now = time.time()
        since = now if failing_since is None else failing_since
        countdown = backoff(self.request.retries, cap=_cap(runtime))
        try:  # keep the entries ours while we wait, so no other worker re-dispatches them
            runtime.stream.touch(consumer, entry_ids)
            if not big and not isinstance(exc, redis.RedisError):  # the store is down
                runtime.redis.set(settings.store_down_key, "1", px=store_down_ms(settings))
        except redis.RedisError:
            pass
        if not big and now - since + countdown > settings.claim_idle_seconds / 2:
            log.warning("batch of %d left pending after %.0f s of failures (%s): sent again "
                        "in about %d s", len(entry_ids), now - since, type(exc).__name__,
                        settings.claim_idle_seconds)
            return {"entries": len(entry_ids), "left_pending": len(entry_ids)}
        log.warning("batch of %d will be retried: %s", len(entry_ids), type(exc).__name__)
        tries = oversized_tries + 1 if big else 0
        raise self.retry(exc=exc, countdown=countdown, args=(entry_ids, consumer),
                         kwargs={"oversized_tries": tries, "failing_since": since}) from exc
    if failing_since is not None:  # this batch's store works again: so may the pumps'
        with contextlib.suppress(redis.RedisError):
            runtime.redis.delete(settings.store_down_key)
    metrics.count_batch(runtime.metrics, stored.outcomes)
    summary = {"entries": len(entry_ids), "new": len(stored.new),
               "duplicates": stored.duplicates, "quarantined": stored.quarantined}
    log.info("batch stored", extra={"task_id": self.request.id, **summary})
    return summary


@shared_task(bind=True, name="leadpipe.deliver", acks_late=True, ignore_result=True,
             max_retries=None)
def deliver(self: Task, sink: str, event_ids: list[str], round_: int = 0,
            dispatch: str | None = None, due: float | None = None) -> dict[str, Any]:
    """One round of deliveries of stored events to one sink; schedules the next round (in the
    same `dispatch`: the relay's name for a task it sent again, None for the first). A task
    with a `due` time still ahead is a hop of a long wait (Runtime.publish): it sends itself on."""
    runtime = self.app.leadpipe.runtime()
    if due is not None and (left := due - time.time()) > 0:
        runtime.publish(sink, event_ids, round_, left, dispatch, due)
        return {"sink": sink, "round": round_, "waiting": len(event_ids),
                "in_seconds": round(left, 2)}
    try:
        with runtime.pool.connection() as conn:
            target = runtime.target(conn, sink)
            if target is None:  # the sink left the routing file: its deliveries wait for it
                log.warning("deliveries for unknown sink %s left pending", sink)
                return {"sink": sink, "unknown": len(event_ids)}
            if target.sink is None:  # a deleted or suspended subscription
                dead = delivery.bury(conn, sink, event_ids, target.gone)
                metrics.count_round(runtime.metrics, sink, 0, dead, 0, target.gone)
                return {"sink": sink, "dead": dead, "why": target.gone}
            plan = delivery.run(conn, target.sink, target.spec, runtime.control, event_ids,
                                round_, target.health, dispatch, target.refuses)
    except TRANSIENT as exc:  # our own Postgres or Redis: try the same round again soon
        raise self.retry(exc=exc, countdown=backoff(self.request.retries, cap=_cap(runtime))
                         ) from exc
    if plan.retry_ids:
        runtime.publish(sink, plan.retry_ids, plan.next_round, plan.countdown, dispatch)
    if plan.rest_ids:  # the time budget ran out: the rest go on at once, in the same round
        runtime.publish(sink, plan.rest_ids, round_, dispatch=dispatch)
    if plan.busy_ids:  # their lead's or deal's turn was taken: shortly, in the same round
        runtime.publish(sink, plan.busy_ids, round_, delivery.BUSY_SECONDS, dispatch)
    if plan.limited_ids:  # the rate limit's turn: in the same round, when it comes
        runtime.publish(sink, plan.limited_ids, round_, plan.limited_wait, dispatch)
    metrics.count_round(runtime.metrics, sink, plan.delivered, plan.dead, len(plan.retry_ids),
                        plan.reason, plan.superseded,
                        len(plan.busy_ids) + len(plan.limited_ids))
    summary = {"sink": sink, "round": round_, "delivered": plan.delivered, "dead": plan.dead,
               "superseded": plan.superseded,
               "again": len(plan.retry_ids), "in_seconds": round(plan.countdown, 2),
               "rest": len(plan.rest_ids), "busy": len(plan.busy_ids),
               "rate_limited": len(plan.limited_ids),
               "why": plan.reason}
    log.info("deliveries", extra={"task_id": self.request.id, **summary})
    return summary


@shared_task(bind=True, name="leadpipe.purge", acks_late=True, ignore_result=True)
def purge(self: Task) -> dict[str, int]:
    """Apply the retention settings (the pump sends this every LEADPIPE_PURGE_INTERVAL_SECONDS,
    from one worker at a time)."""
    from workers import retention

    runtime = self.app.leadpipe.runtime()
    with runtime.pool.connection() as conn:
        done = retention.purge(conn, runtime.settings)
    log.info("purged", extra={"task_id": self.request.id, **done})
    # acknowledged bodies leave Redis' disk only when its log is rewritten: once a day
    if runtime.redis.set(f"{runtime.settings.namespace}:aof-rewrite-turn", "1", nx=True,
                         ex=retention.AOF_REWRITE_SECONDS):
        retention.rewrite_append_only_file(runtime.redis)
    return done
