"""Which sink queues each worker node consumes, through pause, resume and missed broadcasts."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import kombu.exceptions
import redis
import yaml

from config.local import LocalRedis, free_port
from config.settings import Settings
from tests.conftest import WorkerProcess, count, fixture_bytes, post, wait_for
from workers import operations
from workers.app import make_celery
from workers.control import SinkControl
from workers.runtime import Runtime


def routed(settings: Settings, tmp_path: Path) -> Settings:
    path = tmp_path / "routes.yaml"
    path.write_text(yaml.safe_dump({
        "sinks": {"crm": {"type": "dummy", "options": {"path": str(tmp_path / "c.jsonl")}}},
        "routes": [{"to": ["crm"]}]}))
    return settings.with_(routes_file=str(path))


def consumed(app, node: WorkerProcess) -> set[str] | None:  # type: ignore[no-untyped-def]
    """The queues a worker node consumes now, as it answers `inspect active_queues`; None when
    it did not answer in time (or the broker could not be reached)."""
    assert node.proc is not None
    name = f"leadpipe-{node.proc.pid}@{socket.gethostname()}"
    try:
        replies = app.control.inspect(destination=[name], timeout=2, limit=1).active_queues()
    except (OSError, redis.RedisError, kombu.exceptions.OperationalError):
        return None  # the broker (restarting): no answer this time
    if not replies or name not in replies:
        return None
    return {queue["name"] for queue in replies[name]}


def consuming(app, node: WorkerProcess, queue: str) -> bool:  # type: ignore[no-untyped-def]
    return queue in (consumed(app, node) or ())


def not_consuming(app, node: WorkerProcess, queue: str) -> bool:  # type: ignore[no-untyped-def]
    queues = consumed(app, node)
    return queues is not None and queue not in queues


def never_consumes(app, node: WorkerProcess, queue: str,  # type: ignore[no-untyped-def]
                   seconds: float = 7) -> None:
    """Asks the node over `seconds` (more than one reconciliation) that it does not consume."""
    deadline = time.monotonic() + seconds
    answers = 0
    while time.monotonic() < deadline:
        queues = consumed(app, node)
        if queues is not None:
            answers += 1
            assert queue not in queues, f"the node consumes {queue}: {sorted(queues)}"
        time.sleep(0.5)
    assert answers >= 3, "the node hardly answered"


def test_a_resume_makes_only_the_nodes_serving_the_sink_consume_it(settings, tmp_path,
                                                                   worker_factory):
    custom = routed(settings, tmp_path)
    ns = custom.namespace
    queue = f"{ns}.sink.crm"
    storing = worker_factory(custom, ["--queues", f"{ns}.ingest,{ns}.default"])
    full = worker_factory(custom)
    app = make_celery(custom)
    runtime = Runtime(custom, app)
    wait_for(lambda: consuming(app, full, queue), timeout=10, what="the full node's sink")
    assert not_consuming(app, storing, queue)

    operations.pause(runtime, "crm")
    wait_for(lambda: not_consuming(app, full, queue), timeout=10, what="the pause")
    operations.resume(runtime, "crm")
    wait_for(lambda: consuming(app, full, queue), timeout=10, what="the full node resuming")
    never_consumes(app, storing, queue)  # the broadcast, then a reconciliation or more
    assert consuming(app, full, queue)


def test_a_delivery_node_that_missed_a_resume_catches_up(settings, tmp_path, worker_factory,
                                                         redis_client):
    custom = routed(settings, tmp_path)
    queue = f"{custom.namespace}.sink.crm"
    control = SinkControl(redis_client, custom.namespace)
    control.pause("crm")  # before the node starts: its --queues names a paused sink
    node = worker_factory(custom, ["--queues", queue])  # no ingest queue: no pump
    app = make_celery(custom)
    wait_for(lambda: not_consuming(app, node, queue), timeout=10, what="the paused sink dropped")

    control.resume("crm")  # the pause set only: no broadcast reaches the node
    wait_for(lambda: consuming(app, node, queue), timeout=10, what="the missed resume")


def test_a_sink_queue_a_node_does_not_serve_is_dropped(settings, tmp_path, worker_factory):
    # e.g. Celery's own add_consumer, broadcast to every node by an older `sinks resume`
    custom = routed(settings, tmp_path)
    ns = custom.namespace
    queue = f"{ns}.sink.crm"
    storing = worker_factory(custom, ["--queues", f"{ns}.ingest,{ns}.default"])
    app = make_celery(custom)
    wait_for(lambda: not_consuming(app, storing, queue), timeout=10, what="the node listening")
    app.control.add_consumer(queue)
    wait_for(lambda: consuming(app, storing, queue), timeout=10, what="the broadcast")
    wait_for(lambda: not_consuming(app, storing, queue), timeout=10, what="the queue dropped")


def test_a_missed_pause_or_resume_is_caught_up_within_seconds(client, settings, tmp_path,
                                                              worker_factory, db,
                                                              redis_client):
    custom = routed(settings, tmp_path)
    worker_factory(custom)
    control = SinkControl(redis_client, settings.namespace)
    delivered = "SELECT count(*) FROM deliveries WHERE sink = 'crm' AND status = 'delivered'"

    post(client, fixture_bytes("crm-deal-created.json"))
    wait_for(lambda: count(db, delivered) == 1, what="a first delivery")
    control.pause("crm")  # the pause set only, as if the worker missed the broadcast
    time.sleep(7)  # one upkeep round: the worker stops consuming the sink's queue
    post(client, fixture_bytes("crm-deal-updated-won.json"))
    wait_for(lambda: count(db, "SELECT count(*) FROM deliveries") == 2, what="the outbox row")
    depth = f"{settings.namespace}.sink.crm"
    wait_for(lambda: redis_client.llen(depth) == 1, what="the task waiting in the sink's queue")
    time.sleep(1)
    assert count(db, delivered) == 1  # not consumed while paused

    control.resume("crm")  # again without a broadcast
    wait_for(lambda: count(db, delivered) == 2, timeout=20, what="the delivery after resume")


def test_a_node_given_queues_never_takes_on_a_sink_queue(client, settings, tmp_path,
                                                         worker_factory, db, redis_client):
    # the storing/delivering split of docs/SCALING.md: the storing node must not start
    # consuming the sinks' queues when it reconciles them with the pause set
    custom = routed(settings, tmp_path)
    ns = settings.namespace
    worker_factory(custom, ["--queues", f"{ns}.ingest,{ns}.default"])
    delivered = "SELECT count(*) FROM deliveries WHERE sink = 'crm' AND status = 'delivered'"

    post(client, fixture_bytes("crm-deal-created.json"))
    wait_for(lambda: redis_client.llen(f"{ns}.sink.crm") == 1, what="the delivery task")
    time.sleep(7)  # more than one reconciliation of the storing node
    assert redis_client.llen(f"{ns}.sink.crm") == 1
    assert count(db, delivered) == 0

    worker_factory(custom, ["--queues", f"{ns}.sink.crm"])  # a delivering node takes it
    wait_for(lambda: count(db, delivered) == 1, timeout=20, what="the delivery")


def test_reconciling_outlives_redis_going_away(settings, tmp_path, worker_factory):
    server = LocalRedis(tmp_path / "redis", port=free_port()).start()
    try:
        custom = routed(settings.with_(redis_url=server.url), tmp_path)
        queue = f"{custom.namespace}.sink.crm"
        node = worker_factory(custom, ["--queues", queue])
        app = make_celery(custom)
        wait_for(lambda: consuming(app, node, queue), timeout=10, what="the sink's queue")

        server.stop(kill=True)
        log = node.log_path
        wait_for(lambda: "cannot reconcile sink queues" in log.read_text(), timeout=15,
                 what="a reconciliation with Redis down")
        server.start()  # same folder and port
        SinkControl(redis.Redis.from_url(server.url), custom.namespace).pause("crm")
        wait_for(lambda: not_consuming(app, node, queue), timeout=30,
                 what="the pause caught up after Redis came back")
        assert node.proc is not None and node.proc.poll() is None
    finally:
        server.stop()
