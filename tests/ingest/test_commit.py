"""Stream writers of the request path: every entry lands, and no 2xx for a failed write."""

from __future__ import annotations

import threading

import pytest
import redis

from config.local import LocalRedis, free_port
from ingest.commit import GroupCommit, ThreadWriter
from ingest.queue import make_redis

WRITERS = [GroupCommit, ThreadWriter]


@pytest.mark.parametrize("kind", WRITERS)
def test_concurrent_appends_all_land_and_each_caller_waits_for_its_own(redis_client, settings,
                                                                       kind):
    commit = kind(redis_client, settings.stream_key)
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        try:
            for i in range(50):
                commit.append({"i": f"{n}-{i}", "t": 1, "b": b"{}"})
                # returned: the entry must already be readable
                assert redis_client.xlen(settings.stream_key) >= 1
        except BaseException as exc:  # collected, asserted below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    commit.close()
    assert errors == []
    ids = {f[b"i"].decode() for _, f in redis_client.xrange(settings.stream_key)}
    assert ids == {f"{n}-{i}" for n in range(16) for i in range(50)}


def test_a_failed_write_fails_every_waiting_caller():
    dead = make_redis(f"redis://127.0.0.1:{free_port()}/0", timeout=0.5, retries=0)
    commit = GroupCommit(dead, "nowhere", timeout=3)
    failures: list[BaseException] = []

    def writer() -> None:
        try:
            commit.append({"i": "x", "t": 1, "b": b"{}"})
        except redis.RedisError as exc:
            failures.append(exc)

    threads = [threading.Thread(target=writer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(failures) == 8
    with pytest.raises(redis.ConnectionError):
        commit.append({"i": "y", "t": 1, "b": b"{}"})
    commit.close()


def test_a_thread_writer_fails_while_redis_is_down_and_recovers(tmp_path):
    server = LocalRedis(tmp_path / "redis").start()
    try:
        client = make_redis(server.url, timeout=0.5, retries=0)
        writer = ThreadWriter(client, "s")
        writer.append({"i": "a", "t": 1, "b": b"{}"})
        server.stop(kill=True)
        with pytest.raises(redis.ConnectionError):
            writer.append({"i": "b", "t": 1, "b": b"{}"})
        server = LocalRedis(tmp_path / "redis", port=server.port).start()
        writer.append({"i": "c", "t": 1, "b": b"{}"})  # the thread's connection is made again
        ids = [f[b"i"] for _, f in client.xrange("s")]
        assert ids == [b"a", b"c"]  # the AOF kept what was acknowledged before the kill
        writer.close()
    finally:
        server.stop()
