"""The workers' Postgres pool: what each of its sessions is set up with."""

from __future__ import annotations

import pytest

from sinks.db import KEEPALIVE, make_pool


@pytest.mark.parametrize("autocommit", [True, False])
def test_pooled_sessions_have_the_server_probe_a_dead_worker_soon(database_url, autocommit):
    # the advisory locks of a worker whose host died go with its session: the server must
    # notice in minutes, not after the kernel's two-hour default
    pool = make_pool(database_url, autocommit=autocommit)
    try:
        with pool.connection() as conn:
            shown = {name: int(conn.execute(f"SHOW {name}").fetchone()[0])
                     for name in KEEPALIVE}
            assert conn.execute("SELECT inet_client_addr() IS NOT NULL").fetchone() == (True,)
        assert shown == KEEPALIVE
    finally:
        pool.close()
