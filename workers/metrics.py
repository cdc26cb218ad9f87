"""Counters and histograms that every Leadpipe process adds to, summed in Redis for one scrape.

Why Redis and not prometheus_client's multiprocess mode: `/metrics` is served by the API, but
most counts happen in Celery worker processes that, deployed with the compose file, run in
other containers (often several, whose pids repeat), so no shared directory of per-pid files
sees them all; granian gives no hook to mark a dead worker process; and one role wiping the
directory at start would erase the others' live counts. Redis is shared by every process
already. Each process adds to a local buffer (a dict, under a lock: no I/O on the request
path) that a background thread flushes every second as one pipelined HINCRBYFLOAT batch; a
process killed outright loses at most its last second of counts. Counts survive restarts.
"""

from __future__ import annotations

import atexit
import bisect
import logging
import os
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any

import orjson
import redis
from celery.signals import worker_process_shutdown
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

from sinks.base import PermanentSinkError, Sink
from workers.events import Event

log = logging.getLogger("leadpipe.metrics")

# name (without _total) -> (help, label names)
COUNTERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "leadpipe_ingest_requests": ("Requests to POST /webhooks/rdstation by answer.", ("status",)),
    "leadpipe_events": ("Events stored by the batch tasks: accepted (new), duplicate, "
                        "quarantined, or erased (of a person erased since).",
                        ("event_type", "outcome")),
    "leadpipe_deliveries": ("Deliveries that ended a round: delivered, retrying (failed, "
                            "another round is scheduled), postponed (paused or rate limited), "
                            "dead.", ("sink", "outcome")),
}
# name -> (help, label names, bucket upper bounds)
HISTOGRAMS: dict[str, tuple[str, tuple[str, ...], tuple[float, ...]]] = {
    "leadpipe_delivery_duration_seconds": (
        "Duration of one call to a sink, by outcome (delivered, retryable, permanent).",
        ("sink", "outcome"), (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)),
    "leadpipe_delivery_lag_seconds": (
        "From the event's arrival at the ingest endpoint to its delivery to the sink.",
        ("sink",), (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 14400, 86400)),
}

_recorders: weakref.WeakSet[Recorder] = weakref.WeakSet()
MINUTE_TTL_SECONDS = 2 * 3600  # per-minute buckets (the dashboard's last hour) expire after this


class Recorder:
    """Buffers this process's increments and flushes them to one Redis hash per namespace."""

    def __init__(self, client: redis.Redis, namespace: str, interval: float = 1.0):
        self.client = client
        self.key = f"{namespace}:metrics"
        self.interval = interval
        self._reset()
        _recorders.add(self)

    def _reset(self) -> None:
        """Fresh state; also in a forked child, whose parent flushes what it had buffered."""
        self._lock = threading.Lock()
        self._pending: dict[bytes, float] = {}
        self._thread: threading.Thread | None = None
        self._discarded = False

    def discard(self) -> None:
        """Drop what is buffered and stop flushing (an app thrown away, as in tests)."""
        with self._lock:
            self._pending.clear()
            self._discarded = True

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        assert tuple(sorted(labels)) == tuple(sorted(COUNTERS[name][1])), (name, labels)
        self._add(_field(name, labels), amount)

    def observe(self, name: str, value: float, **labels: str) -> None:
        _, names, buckets = HISTOGRAMS[name]
        assert tuple(sorted(labels)) == tuple(sorted(names)), (name, labels)
        i = bisect.bisect_left(buckets, value)  # the first bound >= value; past the last: +Inf
        bucket: float | str = buckets[i] if i < len(buckets) else "+Inf"
        self._add(_field(name, labels, bucket), 1, _field(name, labels, "sum"), value)

    def _add(self, *pairs: Any) -> None:
        with self._lock:
            for field, amount in zip(pairs[::2], pairs[1::2], strict=True):
                self._pending[field] = self._pending.get(field, 0.0) + amount
            if self._thread is None and not self._discarded:
                self._thread = threading.Thread(target=self._loop, name="leadpipe-metrics",
                                                daemon=True)
                self._thread.start()

    def _loop(self) -> None:
        """Flush every interval; stop when idle a while (the next increment starts it again)."""
        idle = 0
        while True:
            time.sleep(self.interval)
            if self._discarded:
                return
            idle = 0 if self.flush() else idle + 1
            if idle >= 30:
                with self._lock:
                    if not self._pending:
                        self._thread = None
                        return

    def flush(self) -> bool:
        """Send the buffered increments; on a Redis error keep them for the next try."""
        with self._lock:
            pending, self._pending = self._pending, {}
        if not pending:
            return False
        minute = self.minute_key(int(time.time() // 60))
        try:
            pipe = self.client.pipeline(transaction=False)
            for field, amount in pending.items():
                pipe.hincrbyfloat(self.key, field, amount)
                pipe.hincrbyfloat(minute, field, amount)
            pipe.expire(minute, MINUTE_TTL_SECONDS)
            pipe.execute()
        except redis.RedisError as exc:
            log.warning("metrics not flushed, kept for the next try: %s", type(exc).__name__)
            with self._lock:
                for field, amount in pending.items():
                    self._pending[field] = self._pending.get(field, 0.0) + amount
        return True

    def minute_key(self, minute: int) -> str:
        """The hash of what was flushed during one minute (minutes since the epoch)."""
        return f"{self.key}:minute:{minute}"

    def minutes(self, last: int = 60) -> list[tuple[int, list[tuple[str, dict[str, str], Any,
                                                                    float]]]]:
        """The last `last` minutes, oldest first: (minute, [(name, labels, bucket, value)])."""
        now = int(time.time() // 60)
        span = range(now - last + 1, now + 1)
        pipe = self.client.pipeline(transaction=False)
        for minute in span:
            pipe.hgetall(self.minute_key(minute))
        result = []
        for minute, fields in zip(span, pipe.execute(), strict=True):
            rows = []
            for raw, value in fields.items():
                name, labels, extra = orjson.loads(raw)
                rows.append((name, dict(labels), extra, float(value)))
            result.append((minute, rows))
        return result

    def families(self) -> Iterator[Metric]:
        """Every counter and histogram, summed over all processes, as prometheus_client metrics."""
        values: dict[str, dict[tuple[tuple[str, str], ...], dict[Any, float]]] = {}
        for raw, value in self.client.hgetall(self.key).items():
            name, labels, extra = orjson.loads(raw)
            series = values.setdefault(name, {}).setdefault(tuple(map(tuple, labels)), {})
            series[extra] = float(value)
        for name, (doc, label_names) in COUNTERS.items():
            counter = CounterMetricFamily(name, doc, labels=label_names)
            for labels, series in sorted(values.get(name, {}).items()):
                counter.add_metric([dict(labels)[n] for n in label_names], series[None])
            yield counter
        for name, (doc, label_names, bounds) in HISTOGRAMS.items():
            histogram = HistogramMetricFamily(name, doc, labels=label_names)
            for labels, series in sorted(values.get(name, {}).items()):
                running, buckets = 0.0, []
                for bound in (*bounds, "+Inf"):
                    running += series.get(bound, 0.0)
                    buckets.append((bound if bound == "+Inf" else repr(float(bound)), running))
                histogram.add_metric([dict(labels)[n] for n in label_names], buckets,
                                     series.get("sum", 0.0))
            yield histogram


def _field(name: str, labels: dict[str, str], extra: float | str | None = None) -> bytes:
    return orjson.dumps([name, sorted(labels.items()), extra])


def flush_all(**_: Any) -> None:
    for recorder in list(_recorders):
        recorder.flush()


def _after_fork_in_child() -> None:
    for recorder in list(_recorders):
        recorder._reset()


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(flush_all)
worker_process_shutdown.connect(flush_all, weak=False)  # Celery's pool children skip atexit


class MeasuredSink(Sink):
    """Wraps a sink: each call to deliver() is timed into the metrics, then passed on as is."""

    name = "measured"

    def __init__(self, inner: Sink, recorder: Recorder):
        super().__init__(inner.instance, inner.options)
        self.inner = inner
        self.latest_state_only = inner.latest_state_only  # type: ignore[misc]
        self.recorder = recorder

    def deliver(self, event: Event) -> int | None:
        started = time.perf_counter()
        outcome = "retryable"
        try:
            answer = self.inner.deliver(event)
            outcome = "delivered"
            return answer
        except PermanentSinkError:
            outcome = "permanent"
            raise
        finally:
            sink = self.inner.instance
            self.recorder.observe("leadpipe_delivery_duration_seconds",
                                  time.perf_counter() - started, sink=sink, outcome=outcome)
            if outcome == "delivered":
                lag = time.time() - event.received_at.timestamp()
                self.recorder.observe("leadpipe_delivery_lag_seconds", max(lag, 0.0), sink=sink)

    def close(self) -> None:
        self.inner.close()


def count_batch(recorder: Recorder, outcomes: dict[tuple[str, str], int]) -> None:
    """What one process_batch stored, by event type and outcome."""
    for (event_type, outcome), n in outcomes.items():
        recorder.inc("leadpipe_events", n, event_type=event_type, outcome=outcome)


def count_round(recorder: Recorder, sink: str, delivered: int, dead: int, again: int,
                reason: str, superseded: int = 0, busy: int = 0) -> None:
    """How the deliveries of one task round ended (`busy`: postponed, their lead's or deal's
    turn was taken)."""
    postponed = reason in {"paused", "rate limited", "circuit open"}
    again_as = "postponed" if postponed else "retrying"
    for outcome, n in (("delivered", delivered), ("dead", dead), ("superseded", superseded),
                       (again_as, again), ("postponed", busy)):
        if n:
            recorder.inc("leadpipe_deliveries", n, sink=sink, outcome=outcome)
