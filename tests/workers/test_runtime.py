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


def test_a_task_s_own_retries_wait_less_than_half_the_visibility_timeout(settings):
    """A retry waiting longer may be handed to a second worker meanwhile (as long waits
    between rounds, which go in hops)."""
    from workers.tasks import _cap, backoff

    short = Runtime(settings.with_(visibility_timeout_seconds=45))
    assert _cap(short) == 22.5 and _cap(Runtime(settings)) == 60.0
    assert max(backoff(20, cap=_cap(short)) for _ in range(200)) <= 22.5
