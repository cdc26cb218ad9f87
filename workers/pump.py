"""A worker bootstep that turns new ingest-stream entries into batch tasks, with back-pressure."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any

import psycopg
import redis
from celery import Celery, bootsteps
from psycopg_pool import PoolTimeout

from config.settings import Settings
from ingest.queue import IngestStream, make_redis
from workers import operations
from workers.runtime import Runtime

log = logging.getLogger("leadpipe.pump")


class Pump:
    """Reads the stream as one consumer of the group and dispatches `process_batch` tasks.

    Entries stay pending (owned by this consumer) until a task stores and acknowledges them;
    entries idle longer than `claim_idle_seconds` (their worker died) are claimed and re-sent.
    """

    def __init__(self, app: Celery, settings: Settings, consumer: str | None = None,
                 socket_timeout: float = 10.0):
        assert settings.redis_url
        self.app = app
        self.settings = settings
        # where the purge goes: the default queue, unless this node does not consume it (a
        # node of the ingest queue alone, the others serving the sinks' queues): then the
        # ingest queue, which this node surely consumes, so the purge is never left unserved
        self.purge_queue = settings.default_queue
        self.consumer = consumer or f"{socket.gethostname()}:{os.getpid()}"
        self.stream = IngestStream(make_redis(settings.redis_url, timeout=socket_timeout),
                                   settings.stream_key)
        # one blocking read waits at most this long, well within the socket's timeout: a
        # batch window may be longer, and is then waited out in several reads
        self.longest_block_ms = max(1, int(socket_timeout * 500))
        self.runtime = Runtime(settings, app)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # An upper bound of this consumer's pending entries: what Redis last said plus what was
        # dispatched since (tasks only ever lower the real count, by acknowledging). Redis is
        # asked again only when the bound reaches the limit, and at start, so entries left
        # pending by an earlier life of this consumer count too.
        self._inflight: int | None = None
        self._store_down_until = 0.0  # monotonic; see store_down()
        self._store_checked = 0.0  # when to ask Redis again

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="leadpipe-pump", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)

    def batches(self, entries: list[tuple[str, int]]) -> list[list[str]]:
        """Entries (id, body size) as batches of at most batch_max_bytes of bodies each (an
        entry larger than that alone), in their order."""
        limit = self.settings.batch_max_bytes
        out: list[list[str]] = []
        size = 0
        for entry_id, length in entries:
            if not out or size + length > limit:
                out.append([])
                size = 0
            out[-1].append(entry_id)
            size += length
        return out

    def dispatch(self, entry_ids: list[str]) -> None:
        self.app.send_task("leadpipe.process_batch", args=[entry_ids, self.consumer],
                           queue=self.settings.ingest_queue)
        if self._inflight is not None:
            self._inflight += len(entry_ids)

    def store_down(self) -> bool:
        """Whether a batch task found the store unreachable lately (tasks.process_batch sets
        the mark): new entries are then left on the stream, where they wait at no cost, rather
        than dispatched as tasks that would each wait for Postgres and retry. Redis is asked at
        most once a second."""
        now = time.monotonic()
        if now >= self._store_checked:
            left = self.stream.client.pttl(self.settings.store_down_key)  # ms; < 0: no mark
            self._store_down_until = now + left / 1000 if left > 0 else 0.0
            self._store_checked = min(now + 1.0, max(now, self._store_down_until))
        return now < self._store_down_until

    def saturated(self) -> bool:
        """Whether this consumer holds as many entries as it may (back-pressure)."""
        limit = self.settings.max_inflight_batches * self.settings.batch_size
        if self._inflight is None or self._inflight >= limit:
            self._inflight = self.stream.pending_for(self.consumer)
        return self._inflight >= limit

    def run(self) -> None:
        s = self.settings
        failures = 0
        next_claim = 0.0
        next_relay = time.monotonic() + 5
        next_forget = time.monotonic() + 60
        while not self._stop.is_set():
            try:
                if failures:
                    self.stream.ensure_group()
                now = time.monotonic()
                if now >= next_relay:
                    next_relay = now + max(5.0, s.relay_after_seconds / 10)
                    relayed = operations.relay(self.runtime)
                    if relayed:
                        log.warning("relayed %d deliveries whose task was lost", relayed)
                    operations.schedule_purge(self.runtime, self.purge_queue)
                if now >= next_claim:
                    stale = self.stream.claim_stale(self.consumer, s.claim_idle_seconds * 1000,
                                                    s.batch_size, s.batch_max_bytes,
                                                    s.max_body_bytes)
                    if stale:
                        log.warning("re-dispatching %d entries idle for %d s or more (their "
                                    "worker stopped, or their batch gave up waiting for the "
                                    "store)", len(stale), s.claim_idle_seconds)
                        for batch in self.batches(stale):
                            self.dispatch(batch)
                        continue
                    next_claim = now + max(1.0, s.claim_idle_seconds / 4)
                if now >= next_forget:
                    next_forget = now + 60
                    self.forget_gone_consumers()
                if self.saturated() or self.store_down():
                    self._stop.wait(0.02)
                    continue
                for batch in self.batches(self.collect()):
                    self.dispatch(batch)
                failures = 0
            except Exception as exc:  # the pump must outlive any one failure
                failures += 1
                self._inflight = None  # a dispatch may or may not have happened: ask again
                delay = min(5.0, 0.1 * 2**failures)
                if isinstance(exc, redis.ResponseError) and "NOGROUP" in str(exc):
                    log.warning("the ingest stream's consumer group is gone (the stream was "
                                "deleted, or the group destroyed); making it again in %.1fs",
                                delay)
                elif isinstance(exc, redis.RedisError | OSError):
                    log.warning("pump cannot reach Redis (%s); retrying in %.1fs",
                                type(exc).__name__, delay)
                elif isinstance(exc, psycopg.OperationalError | PoolTimeout):  # the relay's
                    log.warning("pump cannot reach Postgres (%s); retrying in %.1fs",
                                type(exc).__name__, delay)
                else:
                    log.exception("pump failed; retrying in %.1fs", delay)
                self._stop.wait(delay)

    def collect(self) -> list[tuple[str, int]]:
        """Up to batch_size entries (id, body size) or about batch_max_bytes of bodies,
        waiting at most batch_window_ms after the first one."""
        s = self.settings
        found = self.stream.read_new(self.consumer, s.batch_size, 500, s.batch_max_bytes,
                                     s.max_body_bytes)
        if not found:
            return found
        size = sum(length for _, length in found)
        deadline = time.monotonic() + s.batch_window_ms / 1000
        touched = time.monotonic()
        while len(found) < s.batch_size and size < s.batch_max_bytes:
            remaining = int((deadline - time.monotonic()) * 1000)
            if remaining <= 0 or self._stop.is_set():
                break
            try:
                if time.monotonic() - touched > s.claim_idle_seconds / 3:
                    # a window longer than the claim time: keep what was read from being
                    # taken for a dead worker's while the rest is waited for
                    self.stream.touch(self.consumer, [entry_id for entry_id, _ in found])
                    touched = time.monotonic()
                more = self.stream.read_new(
                    self.consumer, s.batch_size - len(found),
                    min(remaining, self.longest_block_ms, s.claim_idle_seconds * 333),
                    s.batch_max_bytes - size, s.max_body_bytes)
                found += more
                size += sum(length for _, length in more)
            except redis.RedisError:  # the entries read so far are ours: dispatch them now
                log.warning("pump stopped collecting a batch early: Redis did not answer")
                break
        return found

    def forget_gone_consumers(self) -> None:
        """Remove consumers of workers gone for good (no entry held, no read for an hour, or
        ten claim periods if longer) from the group."""
        idle = max(3600, 10 * self.settings.claim_idle_seconds) * 1000
        removed = self.stream.forget_idle_consumers(idle, keep=self.consumer)
        if removed:
            log.info("removed %d consumers of stopped workers from the stream's group", removed)


class PumpStep(bootsteps.StartStopStep):
    """Runs a Pump in each worker node that consumes the ingest queue: it also relays lost
    deliveries and schedules the purge (to the default queue, or the ingest queue on a node that
    does not consume the default one), so at least one node must consume the ingest queue.
    (Which sink queues a node consumes is `workers/queues.py`'s, on every node.)"""

    requires = {"celery.worker.components:Pool"}

    def __init__(self, worker: Any, **kwargs: Any):
        super().__init__(worker, **kwargs)
        self.pump: Pump | None = None

    def start(self, worker: Any) -> None:
        settings: Settings = worker.app.leadpipe.settings
        queues = worker.app.amqp.queues.consume_from or worker.app.amqp.queues
        if settings.ingest_queue not in queues:
            return
        self.pump = Pump(worker.app, settings)
        if settings.default_queue not in queues:
            self.pump.purge_queue = settings.ingest_queue
        self.pump.stream.ensure_group()
        self.pump.stream.register(self.pump.consumer)
        self.pump.start()
        log.info("pump started as consumer %s", self.pump.consumer)

    def stop(self, worker: Any) -> None:
        if self.pump:
            self.pump.stop()
