"""Postgres down for a while: tasks stay few, entries wait on the stream, nothing is lost."""

from __future__ import annotations

import time
from urllib.parse import urlsplit, urlunsplit

from ingest.queue import IngestStream
from tests.conftest import count, wait_for
from tests.support.freezing_proxy import FreezingProxy
from tests.workers.test_crash_recovery import body


def test_postgres_down_keeps_the_tasks_few_and_loses_nothing(settings, worker_factory, db, tmp_path,
                                                             redis_client):
    # Each batch used to retry for as long as the outage lasted, each new event dispatched
    # as one more such task, and the claim took the waiting tasks' entries for a dead
    # worker's and dispatched them again: the ingest queue grew for the whole outage.
    url = urlsplit(settings.database_url)
    proxy = FreezingProxy((url.hostname or "127.0.0.1", url.port or 5432))
    netloc = url.netloc.rsplit("@", 1)
    via = f"{netloc[0]}@127.0.0.1:{proxy.port}" if len(netloc) == 2 else \
        f"127.0.0.1:{proxy.port}"
    custom = settings.with_(database_url=urlunsplit(url._replace(netloc=via)),
                            claim_idle_seconds=4)
    stream = IngestStream(redis_client, custom.stream_key)
    try:
        worker_factory(custom)
        stream.append("before", body(999))
        wait_for(lambda: count(db, "SELECT count(*) FROM events") == 1, what="the first event")

        proxy.cut()
        queued: list[int] = []
        marked = False
        for n in range(40):
            stream.append(f"during-{n}", body(n))
            time.sleep(0.25)
            queued.append(redis_client.llen(custom.ingest_queue)
                          + redis_client.hlen("unacked"))
            marked = marked or redis_client.pttl(custom.store_down_key) > 0
        assert marked  # the pumps were told the store is down
        assert max(queued) <= 6, (queued, (tmp_path / "worker-0.log").read_text()[-6000:])
        assert count(db, "SELECT count(*) FROM events") == 1

        proxy.thaw()
        wait_for(lambda: count(db, "SELECT count(*) FROM events") == 41, timeout=60,
                 what="every event stored after Postgres returned")
        wait_for(lambda: stream.depth() == 0, timeout=30, what="the stream emptied")
        time.sleep(1)
        assert count(db, "SELECT count(*) FROM events") == 41
    finally:
        proxy.close()
