"""The broker transport: a worker outlives Redis going away, and no task is lost meanwhile."""

from __future__ import annotations

import time

import pytest
from kombu import Connection, Exchange, Producer, Queue
from kombu.exceptions import OperationalError

from config.local import LocalRedis, free_port
from tests.conftest import ApiProcess, count, fixture_bytes, post, wait_for
from tests.support.load import SteadyLoad
from tests.support.tls_redis import tls_redis
from workers.app import make_celery
from workers.broker import transport_for


def _held_task(url: str, transport: str | None):  # type: ignore[no-untyped-def]
    """A connection whose default channel holds one delivered, unacknowledged task."""
    connection = Connection(url, transport=transport,
                            transport_options={"visibility_timeout": 1})
    channel = connection.default_channel
    queue = Queue("held", Exchange("held"), "held", channel=channel)
    queue.declare()
    Producer(channel).publish({"n": 1}, exchange="held", routing_key="held")
    assert queue.get(no_ack=False) is not None
    return connection


@pytest.mark.parametrize("transport", [None, "ours"])
def test_closing_a_detached_channel_with_redis_gone(tmp_path, transport):
    """What Celery's consumer does when Redis dies: the transport is detached from the
    connection (its collect), then the connection is closed with the channel still open."""
    server = LocalRedis(tmp_path / "redis", port=free_port()).start()
    try:
        connection = _held_task(server.url, transport and transport_for(server.url))
        server.stop(kill=True)
        connection._do_close_transport()
        if transport is None:  # kombu's own channel: the error Celery treats as fatal
            with pytest.raises(AttributeError, match="hostname"):
                connection.close()
            return
        connection.close()  # ours: a connection error, which kombu's close path absorbs

        server.start()  # same folder and port: the delivered task is still held in Redis
        again = Connection(server.url, transport=transport_for(server.url),
                           transport_options={"visibility_timeout": 1})
        channel = again.default_channel
        time.sleep(1.2)  # past the visibility timeout
        channel.qos.restore_visible(interval=1)
        message = Queue("held", Exchange("held"), "held", channel=channel).get(no_ack=True)
        assert message is not None and message.payload == {"n": 1}
        again.close()
    finally:
        server.stop()


def test_the_celery_app_uses_it_for_redis_urls(settings):
    assert transport_for("redis://127.0.0.1:6379/0") == "workers.broker:Transport"
    assert transport_for("rediss://example.com:6380/0") == "workers.broker:Transport"
    assert transport_for("sentinel://example.com:26379") is None  # kombu's own
    app = make_celery(settings)
    with app.connection_for_write() as connection:
        assert type(connection.transport).__module__ == "workers.broker"


def test_a_tls_broker_carries_tasks_and_its_certificate_is_checked(settings, tmp_path):
    with tls_redis(tmp_path / "tls") as (port, ca):
        trusted = make_celery(settings.with_(
            redis_url=f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={ca}"))
        trusted.send_task("leadpipe.purge", queue="tls-check")
        with trusted.connection_for_read() as connection:
            assert type(connection.transport).__module__ == "workers.broker"
            message = connection.SimpleQueue("tls-check").get(timeout=5)
            assert message.headers["task"] == "leadpipe.purge"
            message.ack()

        # no CA given: the self-signed certificate is refused, not silently accepted
        unverified = make_celery(settings.with_(redis_url=f"rediss://127.0.0.1:{port}/0"))
        with unverified.connection_for_write() as connection:
            with pytest.raises(OperationalError, match="CERTIFICATE_VERIFY_FAILED"):
                connection.ensure_connection(max_retries=0)
        # what kombu alone does with the same URL: connects without checking anything
        with Connection(f"rediss://127.0.0.1:{port}/0") as connection:
            assert connection.default_channel.client.ping()


def test_the_whole_path_over_a_tls_redis(settings, tmp_path, worker_factory, db):
    from ingest import create_app

    with tls_redis(tmp_path / "tls") as (port, ca):
        tls = settings.with_(redis_url=f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={ca}")
        worker_factory(tls)
        answer = post(create_app(tls).test_client(), fixture_bytes("crm-deal-created.json"))
        assert answer.status_code == 202
        wait_for(lambda: count(db, "SELECT count(*) FROM events WHERE id = %s",
                               answer.get_json()["id"]) == 1,
                 what="the event stored by a worker whose broker and stream are on TLS")


def test_worker_survives_repeated_redis_crashes_and_stores_every_acknowledged_event(
        settings, tmp_path, worker_factory, db):
    redis_server = LocalRedis(tmp_path / "redis", port=free_port()).start()
    custom = settings.with_(redis_url=redis_server.url, redis_timeout_seconds=0.5)
    worker = worker_factory(custom)
    assert worker.proc is not None
    api = ApiProcess(custom, tmp_path / "api.log", workers=2)
    try:
        with SteadyLoad(api.url, pause=0.005) as load:
            for crash in range(1, 5):
                time.sleep(1 + crash % 3)
                redis_server.stop(kill=True)
                time.sleep(3 + crash % 2)
                redis_server.start()  # the same folder and port: the AOF keeps what was acked
                assert worker.proc.poll() is None, (
                    f"worker exited after crash {crash}: {worker.log_path.read_text()[-3000:]}")
            time.sleep(2)
        assert len(load.accepted) > 500, len(load.accepted)
        accepted = set(load.accepted)

        def stored() -> set[str]:
            return {row[0] for row in db.execute("SELECT id FROM events")}

        wait_for(lambda: accepted <= stored(), timeout=120,
                 what=f"all {len(accepted)} acknowledged events in Postgres")
        # a post refused while Redis died may still have reached the AOF before the crash
        # (its reply was lost): stored too, as RD's retry would have been; never more than sent
        assert len(stored()) <= len(load.answers)
        assert worker.proc.poll() is None, worker.log_path.read_text()[-3000:]
    finally:
        api.stop()
        redis_server.stop()
