"""The workers' runtime: what it opens, it closes."""

from __future__ import annotations

from workers.runtime import Runtime


def test_close_closes_every_store_it_opened(settings):
    """A pool left to the garbage collector can be collected on one of its own threads, which
    cannot join itself (an error at some later, unrelated moment)."""
    runtime = Runtime(settings)
    pool, store, client = runtime.pool, runtime.postgres, runtime.redis
    with pool.connection() as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert client.ping()
    runtime.close()
    assert pool.closed and store.pool.closed
    runtime.close()  # twice is fine (a CLI command's finally after the task's own)
