"""The spool: with LEADPIPE_SPOOL_DIR, Redis down for 30 s under load costs no 2xx and no event."""

from __future__ import annotations

import threading
import time

import orjson
import requests

from bench.drain import unique_body
from config.local import LocalRedis, free_port
from ingest.spool import decode, encode
from tests.conftest import FIXTURES, TOKEN, ApiProcess, count, wait_for

NAMES = ("mkt-v2-converted.json", "crm-deal-created.json", "legacy-leads-full.json")


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
    templates = {name: orjson.loads((FIXTURES / name).read_bytes()) for name in NAMES}
    answers: list[int] = []
    stop = threading.Event()

    def load() -> None:
        session = requests.Session()
        n = 0
        while not stop.is_set():
            name = NAMES[n % len(NAMES)]
            body = orjson.dumps(unique_body(templates[name], name, n))
            try:
                answers.append(session.post(
                    f"{api.url}/webhooks/rdstation?token={TOKEN}", data=body, timeout=10,
                    headers={"Content-Type": "application/json"}).status_code)
            except requests.RequestException:
                answers.append(0)
            n += 1
            time.sleep(0.02)

    thread = threading.Thread(target=load, daemon=True)
    try:
        thread.start()
        time.sleep(3)
        redis_server.stop(kill=True)
        down_at = len(answers)
        time.sleep(30)
        spooled = sum(1 for _ in spool_dir.glob("spool-*.bin"))
        during = len(answers) - down_at
        redis_server.start()  # the same folder and port
        time.sleep(3)
        stop.set()
        thread.join(timeout=15)
        assert during > 300, during  # it kept answering through the outage
        assert spooled >= 1
        assert set(answers) == {202}, {a: answers.count(a) for a in set(answers)}
        wait_for(lambda: count(db, "SELECT count(*) FROM events") == len(answers), timeout=120,
                 what=f"all {len(answers)} acknowledged events in Postgres")
        wait_for(lambda: not any(p.stat().st_size for p in spool_dir.glob("spool-*.bin")),
                 timeout=30, what="the spool emptied")
    finally:
        stop.set()
        api.stop()
        redis_server.stop()
