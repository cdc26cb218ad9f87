"""Stream writers of the request path: every entry lands, and no 2xx for a failed write."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import pytest
import redis

from config.local import LocalRedis, free_port
from ingest.commit import GroupCommit, ThreadWriter
from ingest.queue import make_redis
from tests.support.tls_redis import tls_redis

WRITERS = [GroupCommit, ThreadWriter]


def test_a_caller_handed_the_lead_late_writes_with_what_is_left_of_its_time(redis_url):
    """Redis hangs: a caller that waited for the write before it, then was handed the lead,
    used to write with a whole socket timeout more (about twice LEADPIPE_REDIS_TIMEOUT_SECONDS
    in all, near RD's 5 s): no caller waits past its own timeout now."""
    from ingest.queue import IngestStream
    from tests.support.freezing_proxy import FreezingProxy

    host, port = redis_url.split("//")[1].split("/")[0].split(":")
    proxy = FreezingProxy((host, int(port)))
    client = make_redis(f"redis://127.0.0.1:{proxy.port}/0", timeout=1.0, retries=0)
    stream = IngestStream(client, f"late{time.time_ns()}", writer="group", commit_timeout=1.5)
    stream.append("warm", b"{}")  # connected while Redis answers
    proxy.freeze()
    took: list[float] = []

    def post(i: int) -> None:
        time.sleep(i * 0.1)  # requests keep arriving
        started = time.monotonic()
        with contextlib.suppress(redis.RedisError):
            stream.append(f"e{i}", b"{}")
        took.append(time.monotonic() - started)

    threads = [threading.Thread(target=post, args=(i,)) for i in range(12)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert len(took) == 12 and max(took) < 1.5 + 0.3, sorted(took)
    finally:
        proxy.close()


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


def append_from_threads(commit: GroupCommit, n: int, stagger: float = 0.0) -> list[str]:
    """Append one entry from each of n threads; "ok" or the error's class name, per thread."""
    outcomes: list[str] = []

    def writer() -> None:
        try:
            commit.append({"i": "x", "t": 1, "b": b"{}"})
            outcomes.append("ok")
        except redis.RedisError as exc:
            outcomes.append(type(exc).__name__)

    threads = [threading.Thread(target=writer) for _ in range(n)]
    for t in threads:
        t.start()
        time.sleep(stagger)
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads)
    return outcomes


def test_a_failed_write_fails_every_waiting_caller():
    dead = make_redis(f"redis://127.0.0.1:{free_port()}/0", timeout=0.5, retries=0)
    commit = GroupCommit(dead, "nowhere", timeout=3)
    outcomes = append_from_threads(commit, 8)
    assert len(outcomes) == 8 and "ok" not in outcomes
    with pytest.raises(redis.ConnectionError):
        commit.append({"i": "y", "t": 1, "b": b"{}"})
    commit.close()


def test_a_thread_writer_fails_while_redis_is_down_and_recovers(tmp_path):
    server = LocalRedis(tmp_path / "redis", port=free_port()).start()
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


def test_callers_behind_a_stuck_write_time_out_and_the_next_write_still_runs():
    """A Redis that accepts and never answers: the leader's socket times out, the callers
    queued behind it give up on their own timeout, and nothing is left waiting for a lead."""
    silent = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    accepting = threading.Thread(target=lambda: held.append(silent.accept()[0]), daemon=True)
    accepting.start()
    port = silent.getsockname()[1]
    client = make_redis(f"redis://127.0.0.1:{port}/0", timeout=1.0, retries=0)
    commit = GroupCommit(client, "s", timeout=0.3)
    try:
        started = time.monotonic()
        outcomes = append_from_threads(commit, 8, stagger=0.01)  # the first leads
        assert time.monotonic() - started < 3
        assert len(outcomes) == 8 and set(outcomes) <= {"TimeoutError", "ConnectionError"}
        # no lead was lost: a new write starts (and times out) on its own
        assert append_from_threads(commit, 1) in (["TimeoutError"], ["ConnectionError"])
    finally:
        commit.close()
        for conn in held:
            conn.close()
        silent.close()


@pytest.mark.parametrize("kind", WRITERS)
def test_an_entry_redis_refuses_fails_only_its_own_caller(redis_client, settings, kind):
    """An error reply (here: an XADD with no fields) is that caller's ResponseError; the
    entries written with it land, and the connection goes on serving the next ones."""
    commit = kind(redis_client, settings.stream_key)
    outcomes: dict[int, str] = {}

    def writer(n: int) -> None:
        try:
            commit.append({} if n == 3 else {"i": str(n), "t": 1, "b": b"{}"})
            outcomes[n] = "ok"
        except redis.RedisError as exc:
            outcomes[n] = type(exc).__name__

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert outcomes == {n: ("ResponseError" if n == 3 else "ok") for n in range(8)}
    commit.append({"i": "after", "t": 1, "b": b"{}"})
    ids = {f[b"i"].decode() for _, f in redis_client.xrange(settings.stream_key)}
    assert ids == {str(n) for n in range(8) if n != 3} | {"after"}
    commit.close()


@pytest.mark.parametrize("kind", WRITERS)
def test_appends_over_tls_with_the_certificate_checked(tmp_path, kind):
    with tls_redis(tmp_path / "tls") as (port, ca):
        client = make_redis(f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={ca}", timeout=5)
        writer = kind(client, "tls-stream")
        for i in range(3):
            writer.append({"i": str(i), "t": 1, "b": b"{}"})
        assert [e[1][b"i"] for e in client.xrange("tls-stream")] == [b"0", b"1", b"2"]
        writer.close()
        untrusting = kind(make_redis(f"rediss://127.0.0.1:{port}/0", timeout=5), "tls-stream")
        with pytest.raises(redis.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
            untrusting.append({"i": "x", "t": 1, "b": b"{}"})
        assert client.xlen("tls-stream") == 3


def test_an_interrupted_leader_answers_its_batch_with_an_error_never_ok(redis_client, settings,
                                                                        monkeypatch):
    """SystemExit in the leader's thread while it waits for a batch's replies: the callers
    written for in that batch get a RedisError (their request answers 503), not a 2xx for an
    unconfirmed entry; the leader's own thread gets the interrupt."""
    from ingest import commit as module
    from tests.conftest import wait_for

    commit = GroupCommit(redis_client, settings.stream_key)
    sends = [0]
    real_send, real_reply = module._Wire.send, module._Wire.reply

    def send(wire, data):  # type: ignore[no-untyped-def]
        sends[0] += 1
        if sends[0] == 1:  # hold the first write until three callers queue behind it
            wait_for(lambda: len(commit._queue) == 3, timeout=10, what="three queued callers")
        return real_send(wire, data)

    def reply(wire):  # type: ignore[no-untyped-def]
        if sends[0] == 2:
            raise SystemExit("the worker is going away")
        return real_reply(wire)

    monkeypatch.setattr(module._Wire, "send", send)
    monkeypatch.setattr(module._Wire, "reply", reply)
    outcomes: dict[str, str] = {}

    def writer(name: str) -> None:
        try:
            commit.append({"i": name, "t": 1, "b": b"{}"})
            outcomes[name] = "ok"
        except BaseException as exc:  # noqa: BLE001 (the outcome is what is asserted)
            outcomes[name] = type(exc).__name__

    first = threading.Thread(target=writer, args=("first",))
    first.start()
    wait_for(lambda: sends[0] == 1, timeout=10, what="the first write")
    rest = [threading.Thread(target=writer, args=(name,)) for name in ("b", "c", "d")]
    for t in rest:
        t.start()
    for t in (first, *rest):
        t.join(10)
    assert outcomes["first"] == "ok"
    assert sorted(outcomes[n] for n in "bcd") == ["ConnectionError", "ConnectionError",
                                                  "SystemExit"]
