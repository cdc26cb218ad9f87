"""The pump's upkeep: a worker that missed a pause or resume broadcast catches up by itself."""

from __future__ import annotations

import time

import yaml

from tests.conftest import count, fixture_bytes, post, wait_for
from workers.control import SinkControl


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
