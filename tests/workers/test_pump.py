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
