"""The metrics recorder: increments applied once, label values from a bounded set."""

from __future__ import annotations

import time

import orjson
import redis

from workers.metrics import Recorder, count_batch
from workers.normalize import claimed_type


def test_a_flush_redis_applied_but_answered_late_is_counted_once(redis_url):
    # the reply comes after the client's timeout: redis-py sends the batch again (its Retry),
    # then the recorder keeps it for its next flush; each used to add the increments again
    from ingest.queue import make_redis
    from tests.support.freezing_proxy import FreezingProxy

    host, port = redis_url.split("//")[1].split("/")[0].split(":")
    proxy = FreezingProxy((host, int(port)))
    client = make_redis(f"redis://127.0.0.1:{proxy.port}/0", timeout=0.5)
    namespace = f"late{time.time_ns()}"
    recorder = Recorder(client, namespace, interval=3600)  # flushed by hand below
    try:
        for _ in range(10):
            recorder.inc("leadpipe_ingest_requests", status="202")
        client.ping()
        proxy.reply_delay = 0.8
        recorder.flush()  # applied by Redis each time it was sent, answered too late
        proxy.reply_delay = 0.0
        recorder.inc("leadpipe_ingest_requests", status="202")
        recorder.flush()  # the kept batch again (applied once already), then the new one
        time.sleep(1)  # the late replies' connections wind down
        direct = redis.Redis.from_url(redis_url)
        totals = {k.decode(): float(v) for k, v in direct.hgetall(f"{namespace}:metrics").items()}
        assert list(totals.values()) == [11.0], totals
        minutes = [k for k in direct.scan_iter(f"{namespace}:metrics:minute:*")]
        assert sum(float(v) for k in minutes for v in direct.hvals(k)) == 11.0
    finally:
        recorder.discard()
        proxy.close()


def test_event_types_rd_does_not_send_are_one_label_value(redis_url):
    # any crm_<word>_created is stored (RD may add entities), but a body of anyone's making
    # must not add label values to every scrape for good
    namespace = f"labels{time.time_ns()}"
    recorder = Recorder(redis.Redis.from_url(redis_url), namespace, interval=3600)
    try:
        count_batch(recorder, {("crm_zzz1_created", "accepted"): 1,
                               ("crm_zzz2_created", "accepted"): 2,
                               ("crm_task_created", "accepted"): 1,
                               ("WEBHOOK.CONVERTED", "duplicate"): 1,
                               (claimed_type('{"foo": 1}'), "quarantined"): 4})
        recorder.flush()
        fields = redis.Redis.from_url(redis_url).hgetall(f"{namespace}:metrics")
        labels = {dict(orjson.loads(k)[1])["event_type"]: float(v) for k, v in fields.items()}
        # a body whose type cannot be told is "unknown", apart from types RD may add
        assert labels == {"other": 3.0, "crm_task_created": 1.0, "WEBHOOK.CONVERTED": 1.0,
                          "unknown": 4.0}
    finally:
        recorder.discard()
    assert claimed_type('{"event_name": "crm_zzz_created", "document": {}}') == "unknown"
    assert claimed_type('{"event_name": "crm_lost_reason_deleted"}') == "crm_lost_reason_deleted"


def test_a_batch_refused_part_way_is_kept_whole_and_applied_once(redis_url):
    # a key of another type where the minute's hash goes: the flush fails before it writes
    # anything (it used to apply part of the batch, record its token, and lose the rest)
    namespace = f"typed{time.time_ns()}"
    client = redis.Redis.from_url(redis_url)
    recorder = Recorder(client, namespace, interval=3600)
    try:
        for _ in range(5):
            recorder.inc("leadpipe_ingest_requests", status="202")
            recorder.inc("leadpipe_ingest_requests", status="503")
        now = int(time.time() // 60)
        minutes = [recorder.minute_key(now), recorder.minute_key(now + 1)]  # (a boundary)
        for minute in minutes:
            client.set(minute, "not a hash")
        recorder.flush()
        assert client.hgetall(f"{namespace}:metrics") == {}
        client.delete(*minutes)
        recorder.flush()
        recorder.flush()
        totals = {dict(orjson.loads(k)[1])["status"]: float(v)
                  for k, v in client.hgetall(f"{namespace}:metrics").items()}
        assert totals == {"202": 5.0, "503": 5.0}
        assert len(list(client.scan_iter(f"{namespace}:metrics:flushed:*"))) == 1
    finally:
        recorder.discard()


def test_the_measured_sink_is_the_inner_sink_in_every_part_of_the_contract(redis_url):
    # the workers wrap every sink for its timings: a wrapper that answered narrowed() or
    # deliver_many() with the base class's defaults sent the CRM nothing of an overtaken event
    # and put Postgres' batch write back to one at a time
    from datetime import UTC, datetime

    from sinks.base import PermanentSinkError, Sink
    from workers.events import Event
    from workers.metrics import MeasuredSink

    class Batched(Sink):
        name = "batched"
        calls: list[int] = []

        def deliver(self, event):
            raise AssertionError("a batch is one call")

        def deliver_many(self, events):
            self.calls.append(len(events))
            return [None, PermanentSinkError("refused")]

        def narrowed(self, older, newer):
            return newer[0]

    def event(n: int) -> Event:
        return Event(id=f"e{n}", dedup_key=f"k{n}", source="test", event_type="WEBHOOK.CONVERTED",
                     entity_type="lead", entity_id="x", occurred_at=datetime.now(UTC),
                     received_at=datetime.now(UTC), payload="{}")

    namespace = f"measured{time.time_ns()}"
    recorder = Recorder(redis.Redis.from_url(redis_url), namespace, interval=3600)
    try:
        sink = MeasuredSink(Batched("b", {}), recorder)
        one, two = event(1), event(2)
        assert sink.narrowed(one, [two]) is two
        outcomes = sink.deliver_many([one, two])
        assert Batched.calls == [2] and outcomes[0] is None
        assert isinstance(outcomes[1], PermanentSinkError)
        recorder.flush()
        fields = redis.Redis.from_url(redis_url).hgetall(f"{namespace}:metrics")
        counts: dict[tuple[str, str | None], float] = {}
        for key, value in fields.items():
            name, labels, bucket = orjson.loads(key)
            if bucket != "sum":
                slot = (name, dict(labels).get("outcome"))
                counts[slot] = counts.get(slot, 0.0) + float(value)
        assert counts == {("leadpipe_delivery_duration_seconds", "delivered"): 1.0,
                          ("leadpipe_delivery_duration_seconds", "permanent"): 1.0,
                          ("leadpipe_delivery_lag_seconds", None): 1.0}, counts
    finally:
        recorder.discard()
