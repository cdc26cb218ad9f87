"""The pump: back-pressure at the in-flight limit, and catching up with missed pause/resume."""

from __future__ import annotations

import time

import redis
import yaml

from ingest.queue import GROUP, IngestStream
from tests.conftest import count, fixture_bytes, post, wait_for
from workers.app import make_celery
from workers.control import SinkControl
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


def test_a_missed_pause_or_resume_is_caught_up_within_seconds(client, settings, tmp_path,
                                                              worker_factory, db,
                                                              redis_client):
    path = tmp_path / "routes.yaml"
    path.write_text(yaml.safe_dump({
        "sinks": {"audit": {"type": "dummy", "options": {"path": str(tmp_path / "a.jsonl")}}},
        "routes": [{"to": ["audit"]}]}))
    custom = settings.with_(routes_file=str(path))
    worker_factory(custom)
    control = SinkControl(redis_client, settings.namespace)
    delivered = "SELECT count(*) FROM deliveries WHERE sink = 'audit' AND status = 'delivered'"

    post(client, fixture_bytes("crm-deal-created.json"))
    wait_for(lambda: count(db, delivered) == 1, what="a first delivery")
    control.pause("audit")  # the pause set only, as if the worker missed the broadcast
    time.sleep(7)  # one upkeep round: the worker stops consuming the sink's queue
    post(client, fixture_bytes("crm-deal-updated-won.json"))
    wait_for(lambda: count(db, "SELECT count(*) FROM deliveries") == 2, what="the outbox row")
    depth = f"{settings.namespace}.sink.audit"
    wait_for(lambda: redis_client.llen(depth) == 1, what="the task waiting in the sink's queue")
    time.sleep(1)
    assert count(db, delivered) == 1  # not consumed while paused

    control.resume("audit")  # again without a broadcast
    wait_for(lambda: count(db, delivered) == 2, timeout=20, what="the delivery after resume")


def test_a_node_given_queues_never_takes_on_a_sink_queue(client, settings, tmp_path,
                                                         worker_factory, db, redis_client):
    # the storing/delivering split of docs/SCALING.md: the storing node must not start
    # consuming the sinks' queues when it reconciles them with the pause set
    path = tmp_path / "routes.yaml"
    path.write_text(yaml.safe_dump({
        "sinks": {"audit": {"type": "dummy", "options": {"path": str(tmp_path / "a.jsonl")}}},
        "routes": [{"to": ["audit"]}]}))
    custom = settings.with_(routes_file=str(path))
    ns = settings.namespace
    worker_factory(custom, ["--queues", f"{ns}.ingest,{ns}.default"])
    delivered = "SELECT count(*) FROM deliveries WHERE sink = 'audit' AND status = 'delivered'"

    post(client, fixture_bytes("crm-deal-created.json"))
    wait_for(lambda: redis_client.llen(f"{ns}.sink.audit") == 1, what="the delivery task")
    time.sleep(7)  # more than one upkeep round of the storing node's pump
    assert redis_client.llen(f"{ns}.sink.audit") == 1
    assert count(db, delivered) == 0

    worker_factory(custom, ["--queues", f"{ns}.sink.audit"])  # a delivering node takes it
    wait_for(lambda: count(db, delivered) == 1, timeout=20, what="the delivery")
