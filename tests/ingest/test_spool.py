"""The spool: with LEADPIPE_SPOOL_DIR, Redis down for 30 s under load costs no 2xx and no event."""

from __future__ import annotations

import time

from config.local import LocalRedis, free_port
from ingest.spool import decode, encode
from tests.conftest import ApiProcess, count, wait_for
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
