"""Group commit: many request threads, one pipelined write, and no 2xx for a failed write."""

from __future__ import annotations

import threading

import pytest
import redis

from config.local import free_port
from ingest.commit import GroupCommit
from ingest.queue import make_redis


def test_concurrent_appends_all_land_and_each_caller_waits_for_its_own(redis_client, settings):
    commit = GroupCommit(redis_client, settings.stream_key)
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
