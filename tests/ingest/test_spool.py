"""The spool: with LEADPIPE_SPOOL_DIR, Redis down for 30 s under load costs no 2xx and no event."""

from __future__ import annotations

import json
import logging
import os
import stat
import struct
import subprocess
import sys
import threading
import time

import redis

from config.local import LocalRedis, free_port
from ingest.queue import make_redis
from ingest.spool import Spool, decode, encode, parse
from tests.conftest import ROOT, TOKEN, ApiProcess, count, wait_for
from tests.support.freezing_proxy import FreezingProxy
from tests.support.load import SteadyLoad


def test_records_survive_a_torn_tail():
    data = encode("a", 1, b'{"x": 1}', None) + encode("b", 2, b"{}", "WEBHOOK.CONVERTED")
    assert [(h["i"], b) for h, b in decode(data)] == [("a", b'{"x": 1}'), ("b", b"{}")]
    assert [h["i"] for h, _ in decode(data + encode("c", 3, b"{}", None)[:-1])] == ["a", "b"]


def test_redis_down_for_30_seconds_under_load_no_non_2xx_nothing_lost(settings, tmp_path,
                                                                     worker_factory, db):
    redis_server = LocalRedis(tmp_path / "redis", port=free_port()).start()
    spool_dir = tmp_path / "spool"
    custom = settings.with_(redis_url=redis_server.url, spool_dir=str(spool_dir),
                            redis_timeout_seconds=0.5)
    worker_factory(custom)
    api = ApiProcess(custom, tmp_path / "api.log", workers=2)
    try:
        with SteadyLoad(api.url) as load:
            time.sleep(3)
            redis_server.stop(kill=True)
            down_at = len(load.answers)
            time.sleep(30)
            spooled = sum(1 for _ in spool_dir.glob("spool-*.bin"))
            during = len(load.answers) - down_at
            redis_server.start()  # the same folder and port
            time.sleep(3)
        answers = load.answers
        assert during > 300, during  # it kept answering through the outage
        assert spooled >= 1
        assert set(answers) == {202}, {a: answers.count(a) for a in set(answers)}
        wait_for(lambda: count(db, "SELECT count(*) FROM events") == len(answers), timeout=120,
                 what=f"all {len(answers)} acknowledged events in Postgres")
        wait_for(lambda: not any(p.stat().st_size for p in spool_dir.glob("spool-*.bin")),
                 timeout=30, what="the spool emptied")
    finally:
        api.stop()
        redis_server.stop()


# Run in a child process: RLIMIT_FSIZE caps how large a file it may write, as a nearly full disk
# would. With SIGXFSZ ignored, a write crossing the cap is cut short and the next one fails.
SHORT_WRITE = r"""
import json, resource, signal, sys
from config.settings import Settings
from ingest import create_app

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
settings = Settings.from_env()
app = create_app(settings)
# no drainer: one holding the file as a request writes sends that record to a new file
app.extensions["leadpipe"].spool.start = lambda: None
client = app.test_client()
bodies, token = json.loads(sys.argv[1]), sys.argv[2]
answers = []
for n, body in enumerate(bodies):
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    if n == 1:  # room for 100 bytes more: less than this record
        from pathlib import Path
        (spooled,) = Path(settings.spool_dir).glob("spool-*.bin")
        resource.setrlimit(resource.RLIMIT_FSIZE, (spooled.stat().st_size + 100, hard))
    answer = client.post(f"/webhooks/rdstation?token={token}", data=body,
                         content_type="application/json")
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, hard))
    answers.append([answer.status_code, answer.get_json()])
print(json.dumps(answers))
"""


def test_a_write_the_disk_cuts_short_is_answered_503_and_leaves_no_partial_record(
        settings, redis_url, tmp_path):
    spool_dir = tmp_path / "spool"
    down = settings.with_(redis_url=f"redis://127.0.0.1:{free_port()}/0",  # nothing listens
                          spool_dir=str(spool_dir), redis_timeout_seconds=0.5)
    bodies = [json.dumps({"event_type": "WEBHOOK.CONVERTED",
                          "contact": {"uuid": f"u{n}", "pad": "x" * 300}}) for n in range(3)]
    child = subprocess.run([sys.executable, "-c", SHORT_WRITE, json.dumps(bodies), TOKEN],
                           env={**os.environ, **down.to_env()}, cwd=ROOT, capture_output=True,
                           text=True, timeout=60)
    assert child.returncode == 0, child.stderr[-3000:]
    answers = json.loads(child.stdout.splitlines()[-1])
    assert [status for status, _ in answers] == [202, 503, 202], answers
    assert answers[1][1]["errors"]["error_type"] == "SERVICE_UNAVAILABLE"

    (path,) = spool_dir.glob("spool-*.bin")
    records = list(decode(path.read_bytes()))
    acknowledged = [answers[0][1]["id"], answers[2][1]["id"]]
    assert [h["i"] for h, _ in records] == acknowledged
    assert path.read_bytes() == b"".join(encode(h["i"], h["t"], b, h["h"], h["k"])
                                         for h, b in records)

    client = redis.Redis.from_url(redis_url)
    spool = Spool(spool_dir, client, settings.stream_key, interval=3600)
    assert spool.drain() == 2
    stored = [(f[b"i"].decode(), f[b"b"].decode())
              for _, f in client.xrange(settings.stream_key)]
    assert stored == [(acknowledged[0], bodies[0]), (acknowledged[1], bodies[2])]
    assert spool.pending() == 0 and not list(spool_dir.glob("*.bad"))


def _spool_file(directory, name: str, data: bytes, mtime: int):
    path = directory / name
    path.write_bytes(data)
    os.utime(path, (mtime, mtime))
    return path


def test_undecodable_spool_bytes_are_moved_aside_and_the_rest_is_drained(
        redis_url, tmp_path, caplog):
    directory = tmp_path / "spool"
    directory.mkdir()
    secret = b'{"email": "never.logged@example.com"}'
    not_json = struct.pack(">I", 2) + b"{x" + struct.pack(">I", len(secret)) + secret
    not_a_header = encode("x", 1, secret, None).replace(b'{"i": "x", "t": 1, "h": null}',
                                                        b'["i", "x", "t", 1, "h", null]')
    dead = 2**22 + 1  # a pid no process has: its empty files are deleted once drained
    first = _spool_file(directory, f"spool-{dead}-1.bin",
                        encode("a1", 1, b'{"n": 1}', None) + not_json
                        + encode("a2", 2, secret, None), 1_000)
    whole = _spool_file(directory, f"spool-{dead}-2.bin", not_a_header, 2_000)
    _spool_file(directory, f"spool-{dead}-3.bin", encode("d1", 3, b'{"n": 3}', None), 3_000)
    client = redis.Redis.from_url(redis_url)
    key = f"spool-test-{time.time_ns()}"
    spool = Spool(directory, client, key, interval=0.05)
    with caplog.at_level(logging.DEBUG, logger="leadpipe.spool"):
        spool.start()
        wait_for(lambda: client.xlen(key) == 2, timeout=10, what="the good records drained")
        wait_for(lambda: not spool.files(), timeout=10, what="the drained files deleted")
        assert spool._drainer is not None and spool._drainer.is_alive()
        spool.stop()
    assert [f[b"i"] for _, f in client.xrange(key)] == [b"a1", b"d1"]
    aside = {p.name.split(".bin.")[0]: p.read_bytes() for p in directory.glob("*.bad")}
    assert aside == {first.stem: not_json + encode("a2", 2, secret, None),  # nothing deleted
                     whole.stem: not_a_header}
    moved = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert {r.path for r in moved} == {str(first), str(whole)}
    assert sorted(r.reason for r in moved) == [
        "a record header that is not JSON", "a record header without a valid event id and time"]
    assert "never.logged" not in caplog.text  # where and why, never what


def test_the_drainer_outlives_any_error(redis_url, tmp_path):
    spool = Spool(tmp_path, redis.Redis.from_url(redis_url), "unused", interval=0.01)
    calls, recovered = [], threading.Event()

    def drain() -> int:
        calls.append(1)
        if len(calls) <= 3:
            raise [KeyError, ValueError, RuntimeError][len(calls) - 1]("unexpected")
        recovered.set()
        return 0

    spool.drain = drain  # type: ignore[method-assign]
    spool.start()
    assert recovered.wait(5), f"the drainer died after {len(calls)} round(s)"
    assert spool._drainer is not None and spool._drainer.is_alive()
    spool.stop()


def test_a_new_spool_file_is_made_durable_with_its_directory_entry(tmp_path, monkeypatch):
    real_fsync, synced = os.fsync, []

    def fsync(fd: int) -> None:
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    spool = Spool(tmp_path / "spool", redis.Redis(port=free_port()), "unused", interval=3600)
    spool.start = lambda: None  # type: ignore[method-assign]  # no drainer: only the append
    spool.append("e1", b'{"n": 1}', None)
    assert synced.count(True) >= 1 and synced[-1] is False  # the folder, then the record
    synced.clear()
    spool.append("e2", b'{"n": 2}', None)
    assert synced == [False]  # the same file: only the record


def test_a_short_write_that_cannot_be_taken_back_moves_to_a_new_file(redis_url, tmp_path,
                                                                     monkeypatch):
    import ingest.spool as module

    real_write, real_truncate = os.write, os.ftruncate
    full = {"on": False}

    def write(fd: int, data) -> int:  # type: ignore[no-untyped-def]
        if full["on"]:
            full["on"] = False
            real_write(fd, bytes(data[:10]))  # half a record, then the disk is full
            raise OSError(28, "No space left on device")
        return real_write(fd, data)

    def ftruncate(fd: int, length: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(module.os, "write", write)
    spool = Spool(tmp_path, redis.Redis.from_url(redis_url), f"s{time.time_ns()}",
                  interval=3600)
    spool.start = lambda: None  # type: ignore[method-assign]
    spool.append("e1", b'{"n": 1}', None)
    full["on"] = True
    monkeypatch.setattr(module.os, "ftruncate", ftruncate)
    try:
        spool.append("e2", b'{"n": 2}', None)
    except OSError:
        pass
    else:
        raise AssertionError("a record the disk cut short was acknowledged")
    monkeypatch.setattr(module.os, "ftruncate", real_truncate)
    spool.append("e3", b'{"n": 3}', None)
    assert len(spool.files()) == 2  # e3 is not written behind e2's torn bytes
    assert spool.drain() == 2
    assert [f[b"i"] for _, f in spool.client.xrange(spool.key)] == [b"e1", b"e3"]
    (aside,) = tmp_path.glob("*.bad")  # the torn bytes, kept
    assert len(aside.read_bytes()) == 10


def test_a_full_spool_file_is_closed_and_every_record_of_every_file_drained(redis_url, tmp_path):
    client = redis.Redis.from_url(redis_url)
    key = f"s{time.time_ns()}"
    spool = Spool(tmp_path, client, key, interval=3600, max_file_bytes=4096)
    spool.start = lambda: None  # type: ignore[method-assign]  # no drainer racing the count
    bodies = [b'{"n": %d, "pad": "%s"}' % (n, b"x" * 900) for n in range(20)]
    for n, body in enumerate(bodies):
        spool.append(f"rot-{n}", body, None)
    assert len(spool.files()) >= 4  # about four records per file
    assert spool.drain() == 20
    assert [f[b"b"] for _, f in client.xrange(key)] == bodies  # all of them, in order
    spool.drain()  # the emptied files this process has moved on from are deleted
    assert len(spool.files()) <= 1 and not spool.set_aside()


def test_a_drained_record_carries_how_long_it_waited_in_the_spool(redis_url, tmp_path):
    # the stream's age of it (workers/status) adds `w` to its new id's time: on one clock
    client = redis.Redis.from_url(redis_url)
    key = f"s{time.time_ns()}"
    spool = Spool(tmp_path, client, key, interval=3600)
    spool.start = lambda: None  # type: ignore[method-assign]  # drained by hand below
    spool.append("held-1", b"{}", None)
    time.sleep(0.3)
    assert spool.drain() == 1
    (_, fields), = client.xrange(key)
    assert 300 <= int(fields[b"w"]) < 5000


def test_a_drainer_reads_a_file_whole_even_when_one_read_returns_less(redis_url, tmp_path,
                                                                        monkeypatch):
    client = redis.Redis.from_url(redis_url)
    key = f"s{time.time_ns()}"
    spool = Spool(tmp_path, client, key, interval=3600)
    spool.start = lambda: None  # type: ignore[method-assign]  # no drainer racing the count
    for n in range(5):
        spool.append(f"short-read-{n}", b'{"n": %d}' % n, None)
    pread = os.pread
    monkeypatch.setattr(os, "pread", lambda fd, n, at: pread(fd, min(n, 7), at))  # as past 2 GiB
    assert spool.drain() == 5
    assert client.xlen(key) == 5 and not spool.set_aside()


def test_a_spool_file_deleted_while_in_use_is_never_written_to_again(redis_url, tmp_path):
    """A cleaner or a person deletes the spool file (or the whole folder) between two outages:
    the next record must not go to the deleted file, where no drainer would ever find it."""
    client = redis.Redis.from_url(redis_url)
    key = f"s{time.time_ns()}"
    spool = Spool(tmp_path / "spool", client, key, interval=3600)
    spool.start = lambda: None  # type: ignore[method-assign]
    spool.append("before", b'{"n": 1}', None)
    (path,) = spool.files()
    path.unlink()  # "before" is gone with it: acknowledged, and deleted by someone else
    spool.append("after-file", b'{"n": 2}', None)
    import shutil

    shutil.rmtree(tmp_path / "spool")
    spool.append("after-folder", b'{"n": 3}', None)
    (tmp_path / "spool").rename(tmp_path / "spool.old")  # moved aside with what it holds
    spool.append("after-move", b'{"n": 4}', None)
    assert spool.drain() == 1  # the configured folder: a new file there
    assert [f[b"i"] for _, f in client.xrange(key)] == [b"after-move"]
    assert spool.pending() == 0


def test_an_empty_spool_file_whose_writer_lives_is_never_deleted(redis_url, tmp_path):
    """Whether its writer is this process (a file just made, not yet in use) or one in another
    PID namespace (a pid this one cannot see), its .live lock says it lives."""
    import fcntl

    spool = Spool(tmp_path, redis.Redis.from_url(redis_url), f"s{time.time_ns()}",
                  interval=3600)
    spool.start = lambda: None  # type: ignore[method-assign]
    spool._own_fd()  # made, nothing written yet
    unseen = 2**22 + 3  # no such pid here: a process of another container sharing the folder
    other = tmp_path / f"spool-{unseen}-1.bin"
    other.write_bytes(b"")
    lock = os.open(other.with_suffix(".live"), os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock, fcntl.LOCK_SH)
    try:
        spool.drain()
        assert len(spool.files()) == 2  # neither deleted
    finally:
        os.close(lock)  # that process ends
    spool.drain()
    assert not other.exists() and not other.with_suffix(".live").exists()
    spool.append("e1", b'{"n": 1}', None)  # ours still works and is drained
    assert spool.drain() == 1


def test_a_drain_redis_takes_half_of_goes_on_from_where_it_stopped(tmp_path):
    """Out of memory, Redis takes the first records of a drain and refuses the rest: the next
    drain sends only the rest, so no record is on the stream twice, and none is missing."""
    server = LocalRedis(tmp_path / "redis", port=free_port()).start()
    try:
        client = redis.Redis.from_url(server.url)
        key = "spool-oom"
        spool = Spool(tmp_path / "spool", client, key, interval=3600, chunk=2)
        spool.start = lambda: None  # type: ignore[method-assign]
        bodies = [b'{"n": %d, "pad": "%s"}' % (n, b"x" * 60_000) for n in range(12)]
        for n, body in enumerate(bodies):
            spool.append(f"oom-{n}", body, None)
        used = int(client.info("memory")["used_memory"])
        client.config_set("maxmemory-policy", "noeviction")
        client.config_set("maxmemory", used + 500_000)  # room for a few records
        try:
            spool.drain()
        except redis.exceptions.OutOfMemoryError:
            pass
        else:
            raise AssertionError("Redis took every record: the limit is not reached")
        taken = client.xlen(key)
        assert 0 < taken < len(bodies) and taken % 2 == 0  # whole chunks only: MULTI/EXEC
        client.config_set("maxmemory", 0)
        assert spool.drain() == len(bodies) - taken
        assert [f[b"i"].decode() for _, f in client.xrange(key)] == [
            f"oom-{n}" for n in range(len(bodies))]  # each once, in order
        assert spool.pending() == 0 and not list((tmp_path / "spool").glob("*.pos"))
    finally:
        server.stop()


def test_a_half_done_mark_that_does_not_fit_the_file_skips_nothing(redis_url, tmp_path):
    """A .pos left by a drain of what the file held before (emptied and written again by a
    drainer of another version, or by a person) must not skip the records it holds now."""
    client = redis.Redis.from_url(redis_url)
    for n, stale in enumerate(("{end} before-0", "999999 now-0", "garbage")):
        key = f"s{time.time_ns()}"
        spool = Spool(tmp_path / str(n), client, key, interval=3600)
        spool.start = lambda: None  # type: ignore[method-assign]
        for k in range(3):
            spool.append(f"now-{k}", b'{"n": %d}' % k, None)
        (path,) = spool.files()
        ends: list[int] = []
        parse(path.read_bytes(), ends)
        path.with_suffix(".pos").write_text(stale.format(end=ends[0]))  # a boundary, not its id
        assert spool.drain() == 3, stale
        assert [f[b"i"] for _, f in client.xrange(key)] == [b"now-0", b"now-1", b"now-2"]
        assert not list((tmp_path / str(n)).glob("*.pos"))
    # and one that fits is followed: the first record is not sent again
    spool = Spool(tmp_path / "fits", client, key := f"s{time.time_ns()}", interval=3600)
    spool.start = lambda: None  # type: ignore[method-assign]
    for k in range(3):
        spool.append(f"now-{k}", b'{"n": %d}' % k, None)
    (path,) = spool.files()
    ends = []
    parse(path.read_bytes(), ends)
    path.with_suffix(".pos").write_text(f"{ends[0]} now-0")
    assert spool.drain() == 2
    assert [f[b"i"] for _, f in client.xrange(key)] == [b"now-1", b"now-2"]


def test_a_forked_child_spools_to_a_file_of_its_own_and_leaves_the_parents_alone(redis_url,
                                                                                 tmp_path):
    client = redis.Redis.from_url(redis_url)
    key = f"s{time.time_ns()}"
    spool = Spool(tmp_path, client, key, interval=3600)
    spool.start = lambda: None  # type: ignore[method-assign]
    spool.append("parent-1", b"{}", None)
    pid = os.fork()
    if pid == 0:  # the child: a file of its own; exit code 0 if that worked
        code = 1
        try:
            spool.append("child-1", b"{}", None)
            code = 0 if spool._fd is not None and len(spool.files()) == 2 else 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    spool.append("parent-2", b"{}", None)  # still its own file, lock held
    assert spool.drain() == 3
    assert sorted(f[b"i"] for _, f in client.xrange(key)) == [b"child-1", b"parent-1",
                                                               b"parent-2"]
    assert len(spool.files()) == 1  # the child's, emptied and abandoned, is gone; ours stays


def test_a_drainer_stuck_on_a_hung_redis_never_holds_a_request_back(redis_url, tmp_path):
    """While Redis hangs, the drainer sits in its call holding the spool file it drains; a
    request spooling meanwhile writes to a new file at once instead of waiting for that call
    to time out (5 s, RD's whole limit for an answer). Both records reach the stream after."""
    host, port = redis_url.split("//")[1].split("/")[0].split(":")
    proxy = FreezingProxy((host, int(port)))
    client = redis.Redis(port=proxy.port, socket_timeout=5)
    key = f"s{time.time_ns()}"
    spool = Spool(tmp_path, client, key, interval=3600)
    spool.start = lambda: None  # type: ignore[method-assign]  # the drains below are ours
    spool.append("hung-1", b'{"n": 1}', None)
    proxy.freeze()
    stuck = threading.Thread(target=lambda: _drain_quietly(spool))
    stuck.start()
    wait_for(lambda: _locked(spool.files()[0]), timeout=5, what="the drainer on the file")
    started = time.monotonic()
    spool.append("hung-2", b'{"n": 2}', None)
    assert time.monotonic() - started < 1.0  # not the drainer's 5 s
    assert len(spool.files()) == 2
    proxy.thaw()  # the stuck drain's retry goes through now, or it fails and leaves the file
    stuck.join(timeout=30)
    assert not stuck.is_alive()
    spool.drain()
    assert spool.pending() == 0
    assert [f[b"i"] for _, f in redis.Redis.from_url(redis_url).xrange(key)] == [
        b"hung-1", b"hung-2"]
    proxy.close()


def _drain_quietly(spool: Spool) -> None:
    try:
        spool.drain()
    except redis.RedisError:
        pass  # the hung call times out


def _locked(path) -> bool:  # type: ignore[no-untyped-def]
    """Whether another open file description holds the file's lock (as a drainer does)."""
    import fcntl

    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def test_a_process_forked_while_the_drainer_holds_a_file_leaves_it_drainable(redis_url,
                                                                            tmp_path):
    """The drainer holds a file's lock while Redis answers; a child forked then (a server
    forking its workers after the app loaded) shared that lock for as long as it lived, and
    every drainer skipped the file, its acknowledged records with it, saying nothing."""
    host, port = redis_url.split("//")[1].split("/")[0].split(":")
    proxy = FreezingProxy((host, int(port)))
    client = make_redis(f"redis://127.0.0.1:{proxy.port}/0", timeout=1, retries=0)
    key = f"f{time.time_ns()}"
    spool = Spool(tmp_path, client, key, interval=3600)
    spool.start = lambda: None  # type: ignore[method-assign]  # the drains below are ours
    spool.append("fork-1", b'{"n": 1}', None)
    spool.append("fork-2", b'{"n": 2}', None)
    spool._retire()  # a file an earlier life of the server left
    proxy.freeze()
    stuck = threading.Thread(target=lambda: _drain_quietly(spool))
    stuck.start()
    wait_for(lambda: _locked(spool.files()[0]), timeout=5, what="the drainer on the file")
    child = os.fork()
    if child == 0:  # a worker process that lives on, doing nothing with the spool
        time.sleep(30)
        os._exit(0)
    try:
        stuck.join(timeout=30)
        proxy.thaw()
        assert spool.drain() == 2
        assert [f[b"i"] for _, f in redis.Redis.from_url(redis_url).xrange(key)] == [
            b"fork-1", b"fork-2"]
    finally:
        os.kill(child, 9)
        os.waitpid(child, 0)
        proxy.close()


def test_a_full_disk_does_not_hold_back_the_records_before_a_torn_tail(redis_url, tmp_path):
    """Setting a torn tail aside takes disk space; the records before it need none to be
    handed over: they go first, and the tail waits in place until the disk takes it. A disk
    so full that not even the small .pos mark fits must not make every round send them
    again (a file size limit stands for the full disk: a real kernel refusal, in a child)."""
    directory = tmp_path / "spool"
    directory.mkdir()
    key = f"d{time.time_ns()}"
    tail = encode("torn", 3, b'{"pad": "' + b"x" * 4000 + b'"}', None, key)[:-10]
    path = _spool_file(directory, f"spool-{2**22 + 1}-1.bin",
                       encode("d1", 1, b'{"n": 1}', None, key)
                       + encode("d2", 2, b'{"n": 2}', None, key) + tail, 1_000)
    child = subprocess.run([sys.executable, "-c", FULL_DISK, str(directory), redis_url, key],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert child.returncode == 0, child.stderr[-3000:]
    assert "spool file not drained" in child.stderr  # said, not silent
    rounds = json.loads(child.stdout.splitlines()[-1])
    # three rounds on the full disk: the records once, the tail left in place; then the disk
    # takes it again: the tail is set aside, nothing is handed over twice
    assert rounds == [[2, False], [2, False], [2, False], [2, True]], rounds
    client = redis.Redis.from_url(redis_url)
    assert [f[b"i"] for _, f in client.xrange(key)] == [b"d1", b"d2"]
    [bad] = directory.glob("*.bad")
    assert bad.read_bytes() == tail and not path.exists()


FULL_DISK = """
import json, resource, signal, sys
import redis
from ingest.spool import Spool
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead
directory, url, key = sys.argv[1:]
client = redis.Redis.from_url(url)
spool = Spool(directory, client, key, interval=3600)
rounds = []
for limit in (4, 4, 4, resource.RLIM_INFINITY):  # not even a .pos mark fits, then room again
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    spool.drain()
    rounds.append([client.xlen(key), bool(spool.set_aside())])
print(json.dumps(rounds))
"""


def test_a_drainer_hands_over_only_the_files_of_its_own_stream(redis_url, tmp_path):
    """Two namespaces sharing a spool folder: each drainer moves its own records, never the
    other pipeline's to its stream."""
    client = redis.Redis.from_url(redis_url)
    prod, staging = f"prod{time.time_ns()}:ingest", f"staging{time.time_ns()}:ingest"
    mine = Spool(tmp_path, client, prod, interval=3600)
    theirs = Spool(tmp_path, client, staging, interval=3600)
    for spool in (mine, theirs):
        spool.start = lambda: None  # type: ignore[method-assign]
    mine.append("prod-event", b'{"n": 1}', None)
    mine._retire()
    assert theirs.drain() == 0 and client.xlen(staging) == 0
    theirs.append("staging-event", b'{"n": 2}', None)
    assert mine.drain() == 1 and theirs.drain() == 1
    assert [f[b"i"] for _, f in client.xrange(prod)] == [b"prod-event"]
    assert [f[b"i"] for _, f in client.xrange(staging)] == [b"staging-event"]


def test_while_redis_hangs_requests_spool_at_once_after_the_first_timeout(settings, redis_url,
                                                                         tmp_path):
    """Every request used to try the hung Redis first, holding a request thread its whole
    timeout before spooling: past a few requests a second, answers queued beyond RD's 5 s.
    After one failure the next requests spool at once; one a second tries Redis again."""
    from ingest import create_app

    host, port = redis_url.split("//")[1].split("/")[0].split(":")
    proxy = FreezingProxy((host, int(port)))
    hung = settings.with_(redis_url=f"redis://127.0.0.1:{proxy.port}/0",
                          spool_dir=str(tmp_path / "spool"), redis_timeout_seconds=1.0)
    app = create_app(hung)
    client = app.test_client()
    url = f"/webhooks/rdstation?token={TOKEN}"
    assert client.post(url, json={"warm": "up"}).status_code == 202  # connected while it works
    proxy.freeze()
    took, ids = [], []
    try:
        for n in range(30):
            started = time.monotonic()
            answer = client.post(url, json={"n": n})
            took.append(time.monotonic() - started)
            assert answer.status_code == 202, answer.get_json()
            ids.append(answer.get_json()["id"])
            time.sleep(0.05)
        slow = [t for t in took if t >= 0.5]
        # 30 requests over about 2 s: the first timed out, then about one try a second
        assert 1 <= len(slow) <= 3, took
    finally:
        proxy.thaw()
    direct = redis.Redis.from_url(redis_url)
    wait_for(lambda: {f[b"i"].decode() for _, f in direct.xrange(hung.stream_key)} >= set(ids),
             timeout=30, what="every acknowledged body on the stream")
    # Redis answers again (the drainer moved the spool to it): requests go to it at once
    spool = app.extensions["leadpipe"].spool
    wait_for(lambda: spool.pending() == 0, timeout=10, what="the spool emptied")
    assert spool.redis_allowed()
    answer = client.post(url, json={"after": True})
    assert answer.status_code == 202
    wait_for(lambda: answer.get_json()["id"].encode() in
             {f[b"i"] for _, f in direct.xrange(hung.stream_key)}, timeout=10,
             what="the request after the outage on the stream")
    proxy.close()


def test_a_spool_that_refuses_while_redis_is_passed_over_gets_redis_tried(settings, redis_url,
                                                                          tmp_path):
    """Redis failed a moment ago, so requests go to the spool without trying it; a spool that
    refuses then (a full or read-only disk) must not cost a 503 while Redis answers."""
    from ingest import create_app

    host, port = redis_url.split("//")[1].split("/")[0].split(":")
    proxy = FreezingProxy((host, int(port)))
    blocked = tmp_path / "a file"
    blocked.write_text("")  # the spool folder cannot be made under a file
    hung = settings.with_(redis_url=f"redis://127.0.0.1:{proxy.port}/0",
                          spool_dir=str(blocked / "spool"), redis_timeout_seconds=0.5)
    client = create_app(hung).test_client()
    url = f"/webhooks/rdstation?token={TOKEN}"
    assert client.post(url, json={"warm": "up"}).status_code == 202
    proxy.freeze()
    assert client.post(url, json={"n": 0}).status_code == 503  # neither could take it
    proxy.thaw()
    answers = [client.post(url, json={"n": n}) for n in range(1, 6)]  # within the second
    assert [a.status_code for a in answers] == [202] * 5
    direct = redis.Redis.from_url(redis_url)
    ids = {f[b"i"].decode() for _, f in direct.xrange(hung.stream_key)}
    assert {a.get_json()["id"] for a in answers} <= ids
    proxy.close()
