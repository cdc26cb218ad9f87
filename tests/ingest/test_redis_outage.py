"""With Redis down the endpoint answers 503, never a 2xx; what was acknowledged survives a crash."""

from __future__ import annotations

import time

import orjson
import requests

from config.local import LocalRedis, free_port
from tests.conftest import TOKEN, ApiProcess, count, fixture_bytes, wait_for

TEMPLATE = orjson.loads(fixture_bytes("crm-deal-updated-won.json"))


def body(n: int) -> bytes:
    return orjson.dumps({**TEMPLATE, "transaction_uuid": f"tx-{n}",
                         "document": {**TEMPLATE["document"], "id": f"deal-{n}"}})


def test_redis_crash_gives_503_and_loses_nothing_acknowledged(settings, tmp_path, db,
                                                              worker_factory):
    redis_server = LocalRedis(tmp_path / "redis", port=free_port()).start()
    own = settings.with_(redis_url=redis_server.url, redis_timeout_seconds=1.0)
    api = ApiProcess(own, tmp_path / "api.log", workers=2)
    url = f"{api.url}/webhooks/rdstation?token={TOKEN}"
    headers = {"Content-Type": "application/json"}
    acknowledged: list[str] = []
    try:
        for n in range(200):
            response = requests.post(url, data=body(n), headers=headers, timeout=10)
            assert response.status_code == 202
            acknowledged.append(response.json()["id"])

        redis_server.stop(kill=True)  # kill -9: only the AOF on disk remains
        for n in range(200, 230):
            started = time.monotonic()
            response = requests.post(url, data=body(n), headers=headers, timeout=10)
            assert response.status_code == 503
            assert int(response.headers["Retry-After"]) > 0
            assert response.json()["errors"]["error_type"] == "SERVICE_UNAVAILABLE"
            assert time.monotonic() - started < 5  # RD gives up after 5 s

        redis_server = LocalRedis(tmp_path / "redis", port=redis_server.port).start()
        wait_for(lambda: requests.post(url, data=body(999), headers=headers,
                                       timeout=10).status_code == 202,
                 what="the endpoint to accept again")
        worker_factory(own)
        wait_for(lambda: count(db, "SELECT count(*) FROM events") == 201, timeout=60,
                 what="every acknowledged event stored")
        stored = {r[0] for r in db.execute("SELECT id FROM events")}
        assert set(acknowledged) <= stored
        assert count(db, "SELECT count(*) FROM deals WHERE id LIKE 'deal-2__'") == 0
    finally:
        api.stop()
        redis_server.stop()
