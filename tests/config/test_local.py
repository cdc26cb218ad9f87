"""Local Redis and Postgres of `leadpipe run` and the tests: made fresh, never left running."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import psycopg
import pytest

from config.local import LocalPostgres, free_port, stop_group
from config.settings import ConfigError
from tests.conftest import wait_for


def running(pid: int) -> bool:
    """Alive and not a zombie (a reparented orphan may wait for a reaper that never comes)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def logs_in(pg: LocalPostgres) -> bool:
    with psycopg.connect(pg.url, connect_timeout=5) as conn:
        return conn.execute("SELECT 1").fetchone() == (1,)


def test_a_folder_made_again_at_the_same_path_gets_a_fresh_cluster(tmp_path):
    """As root the cluster may live outside the folder (the server's user cannot reach a private
    one); a cluster left there by an earlier folder of the same path is not reused blindly."""
    folder = tmp_path / "pg"
    first = LocalPostgres(folder, port=free_port()).start()
    first.stop()
    shutil.rmtree(folder)
    again = LocalPostgres(folder, port=free_port()).start()
    try:
        assert logs_in(again)
    finally:
        again.stop()


def test_clusters_of_removed_folders_are_pruned(tmp_path):
    gone = LocalPostgres(tmp_path / "gone", port=free_port()).start()
    gone.stop()
    gone_data = gone._data_dir()
    assert (gone_data / "PG_VERSION").exists()
    shutil.rmtree(tmp_path / "gone")
    kept = LocalPostgres(tmp_path / "kept", port=free_port()).start()
    try:
        assert not gone_data.exists()
        assert (kept._data_dir() / "PG_VERSION").exists()
    finally:
        kept.stop()


def test_a_discarded_cluster_leaves_nothing_behind(tmp_path):
    """The test suite's cluster is thrown away at its end: as root its data lives under
    /var/lib/leadpipe, where a hundred megabytes a run used to stay."""
    pg = LocalPostgres(tmp_path / "once", port=free_port()).start()
    data = pg.data
    assert data is not None and (data / "PG_VERSION").exists()
    pg.discard()
    assert pg.proc is not None and pg.proc.poll() is not None
    assert not data.exists() and not (tmp_path / "once").exists()
    assert not (data.parent / f"{data.name}.folder").exists()


def test_a_server_that_refuses_us_is_stopped_not_left_running(tmp_path):
    pg = LocalPostgres(tmp_path / "pg", port=free_port()).start()
    pg.stop()
    (tmp_path / "pg" / "password").write_text("not-the-password\n")
    again = LocalPostgres(tmp_path / "pg", port=free_port())
    began = time.monotonic()
    with pytest.raises(ConfigError, match="refused us: .*password authentication failed"):
        again.start()
    # a refusal is final: reported at once, not after the 30 s given to a server starting up
    assert time.monotonic() - began < 20
    assert again.proc is not None and again.proc.poll() is not None


@pytest.mark.parametrize("leader", ["exits first", "still running"])
def test_stop_group_leaves_no_member_of_the_group(leader):
    # a server whose parent process died (or was stopped) with its workers still running
    script = "sleep 300 & echo $!; " + ("exit 0" if leader == "exits first" else "wait")
    proc = subprocess.Popen(["sh", "-c", script], stdout=subprocess.PIPE,
                            start_new_session=True)
    member = int(proc.stdout.readline())
    proc.stdout.close()
    if leader == "exits first":
        assert proc.wait(timeout=10) == 0
    assert running(member)
    stop_group(proc, timeout=5)
    wait_for(lambda: not running(member), timeout=10, what="the group's member to be gone")


def test_local_postgres_has_room_for_the_advisory_locks_of_concurrent_batches(tmp_path):
    pg = LocalPostgres(tmp_path / "pg", port=free_port()).start()
    try:
        with psycopg.connect(pg.url) as conn:
            assert conn.execute("SHOW max_locks_per_transaction").fetchone() == ("256",)
    finally:
        pg.stop()


def test_a_redis_folder_a_live_server_still_serves_is_refused(tmp_path):
    # a run killed before it could stop its Redis left it appending to the folder's AOF: a
    # second server there (on another port) would append to the same files
    from config.local import LocalRedis

    first = LocalRedis(tmp_path / "redis").start()
    try:
        second = LocalRedis(tmp_path / "redis")
        with pytest.raises(ConfigError, match=r"still serves .* \(kill \d+\)"):
            second.start()
        assert second.proc is None  # nothing was started
    finally:
        first.stop()
    assert not (tmp_path / "redis" / "redis-server.pid").exists()
    LocalRedis(tmp_path / "redis").start().stop()  # stopped: the folder is free again
    killed = LocalRedis(tmp_path / "redis").start()
    killed.stop(kill=True)  # its pid file stays, naming a process gone: no refusal
    assert (tmp_path / "redis" / "redis-server.pid").exists()
    LocalRedis(tmp_path / "redis").start().stop()
