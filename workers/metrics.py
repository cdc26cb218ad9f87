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
import uuid
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import orjson
import redis
from celery.signals import worker_process_shutdown
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

from sinks.base import PermanentSinkError, Sink
from workers.events import EVENT_TYPES, Event

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
# A flush: its increments, once per token. A process sends its batches one after another (a
# kept one first, again until it is answered), so KEYS[3], the process's own key, holds the
# token of the last batch applied: one key per process. The keys' types are checked before
# anything is written, so no batch is ever half applied.
_FLUSH = """
if redis.call('GET', KEYS[3]) == ARGV[3] then return 0 end
for i = 1, 2 do
  local kind = redis.call('TYPE', KEYS[i]).ok
  if kind ~= 'hash' and kind ~= 'none' then
    return redis.error_reply('metrics key ' .. KEYS[i] .. ' holds a ' .. kind)
  end
end
for i = 4, #ARGV, 2 do
  redis.call('HINCRBYFLOAT', KEYS[1], ARGV[i], ARGV[i + 1])
  redis.call('HINCRBYFLOAT', KEYS[2], ARGV[i], ARGV[i + 1])
end
redis.call('EXPIRE', KEYS[2], ARGV[1])
redis.call('SET', KEYS[3], ARGV[3], 'EX', ARGV[2])
return 1
"""
MINUTE_TTL_SECONDS = 2 * 3600  # per-minute buckets (the dashboard's last hour) expire after this
FLUSH_TOKEN_SECONDS = MINUTE_TTL_SECONDS  # a batch retried within this is applied once


class Recorder:
    """Buffers this process's increments and flushes them to one Redis hash per namespace."""

    def __init__(self, client: redis.Redis, namespace: str, interval: float = 1.0):
        self.client = client
        self._script = client.register_script(_FLUSH)
        self.key = f"{namespace}:metrics"
        self.interval = interval
        self._reset()
        _recorders.add(self)

    def _reset(self) -> None:
        """Fresh state; also in a forked child, whose parent flushes what it had buffered."""
        self._lock = threading.Lock()
        self._sender = uuid.uuid4().hex  # this process's (a forked child gets its own)
        self._pending: dict[bytes, float] = {}
        # a batch sent without a known outcome (the reply lost, Redis slow): sent again as it
        # was, under the same token, which Redis applies once (FLUSH)
        self._unsent: tuple[str, str, dict[bytes, float]] | None = None  # token, minute key
        self._thread: threading.Thread | None = None
        self._discarded = False

    def discard(self) -> None:
        """Drop what is buffered and stop flushing (an app thrown away, as in tests)."""
        with self._lock:
            self._pending.clear()
            self._unsent = None
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
                    if not self._pending and self._unsent is None:
                        self._thread = None
                        return

    def flush(self) -> bool:
        """Send the buffered increments, each batch applied once: a batch whose outcome is
        unknown (a Redis error, a reply that came too late for the client, which may have
        sent it again itself) is kept and sent again under its token, before anything newer."""
        sent = False
        for _ in range(2):  # the batch kept from an earlier try, then what came since
            with self._lock:
                if self._unsent is None:
                    pending, self._pending = self._pending, {}
                    if not pending:
                        return sent
                    token = uuid.uuid4().hex
                    self._unsent = (token, self.minute_key(int(time.time() // 60)), pending)
                token, minute, pending = self._unsent
            args: list[Any] = [MINUTE_TTL_SECONDS, FLUSH_TOKEN_SECONDS, token]
            for field, amount in pending.items():
                args += [field, amount]
            try:
                self._script(keys=[self.key, minute, f"{self.key}:flushed:{self._sender}"],
                             args=args)
            except redis.RedisError as exc:
                log.warning("metrics not flushed, kept for the next try: %s",
                            type(exc).__name__)
                return True
            with self._lock:
                if self._unsent is not None and self._unsent[0] == token:
                    self._unsent = None
            sent = True
        return sent

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
    """Wraps a sink: each call to deliver() is timed into the metrics, then passed on as is;
    every other part of the sink contract (narrowed, deliver_many, close) is the inner sink's."""

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
            self._observe(event, outcome, time.perf_counter() - started)

    def deliver_many(self, events: Sequence[Event]) -> list[BaseException | None]:
        started = time.perf_counter()
        outcomes = self.inner.deliver_many(events)
        each = (time.perf_counter() - started) / max(1, len(events))
        for event, error in zip(events, outcomes, strict=True):
            self._observe(event, "delivered" if error is None else "permanent"
                          if isinstance(error, PermanentSinkError) else "retryable", each)
        return outcomes

    def narrowed(self, older: Event, newer: list[Event]) -> Event | None:
        return self.inner.narrowed(older, newer)

    def _observe(self, event: Event, outcome: str, seconds: float) -> None:
        sink = self.inner.instance
        self.recorder.observe("leadpipe_delivery_duration_seconds", seconds, sink=sink,
                              outcome=outcome)
        if outcome == "delivered":
            lag = time.time() - event.received_at.timestamp()
            self.recorder.observe("leadpipe_delivery_lag_seconds", max(lag, 0.0), sink=sink)

    def close(self) -> None:
        self.inner.close()


# a body whose type cannot be told (quarantined) is "unknown", as docs/OPERATIONS.md says
_LABELLED = frozenset(EVENT_TYPES) | {"unknown"}


def count_batch(recorder: Recorder, outcomes: dict[tuple[str, str], int]) -> None:
    """What one process_batch stored, by event type and outcome."""
    for (event_type, outcome), n in outcomes.items():
        # a type RD does not send (a CRM entity it may add, or a body's own making) is
        # "other": label values stay a bounded set whatever bodies arrive
        recorder.inc("leadpipe_events", n, outcome=outcome,
                     event_type=event_type if event_type in _LABELLED else "other")


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
