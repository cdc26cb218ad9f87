"""The pump: back-pressure at the in-flight limit (sink queues: tests/workers/test_queues.py)."""

from __future__ import annotations

import time

import redis

from ingest.queue import GROUP, IngestStream
from tests.conftest import wait_for
from workers.app import make_celery
from workers.pump import Pump


def held(client: redis.Redis, key: str, consumer: str) -> list[str]:
    rows = client.xpending_range(key, GROUP, "-", "+", 1000, consumername=consumer)
    return [row["message_id"].decode() for row in rows]


def test_pump_holds_at_the_limit_and_resumes_as_batches_are_acknowledged(settings,
                                                                         redis_client):
    # no worker consumes the tasks: entries stay pending until this test acknowledges them
    custom = settings.with_(batch_size=10, max_inflight_batches=2, batch_window_ms=5)
    stream = IngestStream(redis_client, custom.stream_key)
    stream.ensure_group()
    for n in range(100):
        stream.append(f"ev-{n}", b"{}")
    limit = custom.batch_size * custom.max_inflight_batches
    key = custom.stream_key

    # entries an earlier life of the same consumer left pending count from the start
    redis_client.xreadgroup(GROUP, "pump-a", {key: ">"}, count=15)
    pump = Pump(make_celery(custom), custom, consumer="pump-a")
    pump.start()
    try:
        wait_for(lambda: len(held(redis_client, key, "pump-a")) >= limit, what="the limit")
        time.sleep(0.5)
        full = len(held(redis_client, key, "pump-a"))  # 15, then one batch more
        assert limit <= full < limit + custom.batch_size

        for round_ in range(3):  # acknowledge a batch's worth: the pump takes as many again
            stream.done(held(redis_client, key, "pump-a")[:10])
            wait_for(lambda: len(held(redis_client, key, "pump-a")) == full,  # noqa: B023
                     what=f"the pump to refill (round {round_})")
            time.sleep(0.3)
            assert len(held(redis_client, key, "pump-a")) == full
        assert stream.depth() == 100 - 30
    finally:
        pump.stop()


class RecordingPump(Pump):
    """A pump whose batches are recorded instead of sent as tasks."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sent: list[list[str]] = []

    def dispatch(self, entry_ids: list[str]) -> None:
        self.sent.append(entry_ids)


def _sizes(client: redis.Redis, key: str, batch: list[str]) -> int:
    return sum(len(client.xrange(key, i, i)[0][1][b"b"]) for i in batch)


def test_batches_are_cut_at_batch_max_bytes_whether_read_or_claimed(settings, redis_client):
    # a body up to LEADPIPE_MAX_BODY_BYTES parses to some 25 times its size: 500 of them in
    # one task would take gigabytes of a worker's memory
    custom = settings.with_(batch_size=50, batch_window_ms=300, batch_max_bytes=1_000_000,
                            claim_idle_seconds=1)
    stream = IngestStream(redis_client, custom.stream_key)
    stream.ensure_group()
    bodies = [b'{"n":"%s"}' % (b"x" * (300_000 if n % 3 else 10)) for n in range(12)]
    for n, body in enumerate(bodies):
        stream.append(f"ev-{n}", body)
    # a worker that read half of them and died: the pump claims those after a second
    redis_client.xreadgroup(GROUP, "gone", {custom.stream_key: ">"}, count=6)
    for n, body in enumerate(bodies):
        stream.append(f"ev-{n + 12}", body)
    pump = RecordingPump(make_celery(custom), custom, consumer="pump-a")
    pump.start()
    try:  # (nothing acknowledges them: the pump claims its own again each second too)
        wait_for(lambda: len({i for b in pump.sent for i in b}) == 24,
                 what="every entry dispatched")
    finally:
        pump.stop()
    assert {i for b in pump.sent for i in b} == {e.entry_id for e in stream.entries()}
    claimed = set(held(redis_client, custom.stream_key, "pump-a"))
    assert len(claimed) == 24  # the dead worker's six are the pump's now
    assert len(pump.sent) >= 8  # 24 entries of which 16 of 300 kB: at most 3 big per batch
    for batch in pump.sent:
        assert _sizes(redis_client, custom.stream_key, batch) <= 1_000_000
        assert batch == sorted(batch, key=lambda i: tuple(map(int, i.split("-"))))


def test_a_backlog_of_large_bodies_is_read_about_a_batch_at_a_time(settings, redis_client):
    # the pump reads whole entries to learn their sizes: 500 bodies of 1 MB in one reply
    # took half a gigabyte of the worker's main process, and as much again of Redis' memory
    custom = settings.with_(batch_size=100, batch_window_ms=200, batch_max_bytes=1_000_000,
                            max_body_bytes=300_000, claim_idle_seconds=1)
    stream = IngestStream(redis_client, custom.stream_key)
    stream.ensure_group()
    small = b'{"n": 1}'
    for n in range(60):  # a run of small bodies first: the count grows, then must shrink
        stream.append(f"small-{n}", small)
    for n in range(30):
        stream.append(f"big-{n}", b'{"n":"%s"}' % (b"x" * 250_000))
    redis_client.xreadgroup(GROUP, "gone", {custom.stream_key: ">"}, count=1000)  # all
    replies: list[int] = []
    pump = RecordingPump(make_celery(custom), custom, consumer="pump-a")

    def measuring(read):  # type: ignore[no-untyped-def]
        def measured(*args, **kwargs):  # type: ignore[no-untyped-def]
            found = read(*args, **kwargs)
            replies.append(sum(length for _, length in found))
            return found
        return measured

    pump.stream.read_new = measuring(pump.stream.read_new)  # type: ignore[method-assign]
    pump.stream.claim_stale = measuring(pump.stream.claim_stale)  # type: ignore[method-assign]
    for n in range(30):  # and new ones, read by XREADGROUP rather than claimed
        stream.append(f"new-big-{n}", b'{"n":"%s"}' % (b"x" * 250_000))
    pump.start()
    try:
        wait_for(lambda: len({i for b in pump.sent for i in b}) == 120,
                 what="every entry dispatched")
    finally:
        pump.stop()
    assert sum(replies) >= 60 * 250_000
    # a read may end with one body past the batch's bytes, never with a reply of many
    assert max(replies) <= 1_000_000 + 300_000, sorted(replies)[-5:]


def test_a_consumer_group_destroyed_under_the_pump_is_made_again_and_said_so(
        settings, redis_client, caplog):
    # the pump logged "cannot reach Redis (ResponseError)" for what is a missing group
    custom = settings.with_(batch_window_ms=20, claim_idle_seconds=600)
    stream = IngestStream(redis_client, custom.stream_key)
    stream.ensure_group()
    stream.append("ev-1", b"{}")
    pump = RecordingPump(make_celery(custom), custom, consumer="pump-a")
    pump.start()
    try:
        wait_for(lambda: len(pump.sent) == 1, what="the first entry")
        redis_client.xgroup_destroy(custom.stream_key, GROUP)
        stream.append("ev-2", b"{}")
        wait_for(lambda: {i for b in pump.sent for i in b} == {e.entry_id for e in
                                                                 stream.entries()},
                 what="the entries read again by the group made anew")
    finally:
        pump.stop()
    said = [r.getMessage() for r in caplog.records if r.name == "leadpipe.pump"]
    assert any("consumer group is gone" in m for m in said), said
    assert not any("cannot reach Redis" in m for m in said), said


def test_a_batch_window_longer_than_the_socket_timeout_is_waited_out_in_several_reads(
        settings, redis_client, caplog):
    # each read blocks within the socket's timeout: a long window used to end in a timeout
    # taken for Redis down, its entries held until another worker claimed them
    custom = settings.with_(batch_size=50, batch_window_ms=2500, claim_idle_seconds=600)
    stream = IngestStream(redis_client, custom.stream_key)
    stream.ensure_group()
    pump = RecordingPump(make_celery(custom), custom, consumer="pump-a", socket_timeout=1.0)
    pump.start()
    try:
        time.sleep(0.3)
        started = time.monotonic()
        stream.append("ev-1", b"{}")
        wait_for(lambda: pump.sent, timeout=10, what="the batch")
        waited = time.monotonic() - started
    finally:
        pump.stop()
    assert 2.0 < waited < 3.5  # the window: not a claim 600 s later, nor timeouts retried
    assert [len(b) for b in pump.sent] == [1]
    assert not [r for r in caplog.records if "Redis" in r.getMessage()]


def test_consumers_of_workers_gone_for_good_are_removed_but_never_one_holding_entries(
        settings, redis_client):
    stream = IngestStream(redis_client, settings.stream_key)
    stream.ensure_group()
    stream.append("ev-1", b"{}")
    for name in ("gone-empty", "gone-holding", "me"):
        stream.register(name)
    redis_client.xreadgroup(GROUP, "gone-holding", {settings.stream_key: ">"}, count=1)
    time.sleep(0.2)
    assert stream.forget_idle_consumers(idle_ms=100, keep="me") == 1
    names = {c["name"].decode() for c in
             redis_client.xinfo_consumers(settings.stream_key, GROUP)}
    assert names == {"gone-holding", "me"}
    redis_client.xreadgroup(GROUP, "fresh", {settings.stream_key: ">"}, count=1)
    assert stream.forget_idle_consumers(idle_ms=60_000, keep="me") == 0  # none idle long


class StoringPump(RecordingPump):
    """A recording pump whose batches are stored at once (acknowledged as a task would)."""

    def dispatch(self, entry_ids: list[str]) -> None:
        super().dispatch(entry_ids)
        self.stream.done(entry_ids)


def test_entries_held_through_a_window_longer_than_the_claim_time_are_not_claimed(
        settings, redis_client):
    # the window (4 s) outlasts the claim time (1 s): without the collecting pump keeping its
    # entries fresh, the other node's pump took them over and both dispatched them
    custom = settings.with_(batch_size=50, batch_window_ms=4000, claim_idle_seconds=1)
    stream = IngestStream(redis_client, custom.stream_key)
    stream.ensure_group()
    pumps = [StoringPump(make_celery(custom), custom, consumer=name)
             for name in ("node-a", "node-b")]
    for pump in pumps:
        pump.start()
    try:
        time.sleep(0.3)
        stream.append("ev-1", b"{}")
        wait_for(lambda: any(p.sent for p in pumps), timeout=10, what="the batch")
        time.sleep(2.5)  # a claim by the other node would have come by now
    finally:
        for pump in pumps:
            pump.stop()
    assert sorted(len(b) for p in pumps for b in p.sent) == [1]
