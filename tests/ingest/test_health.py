"""/healthz and /readyz: unauthenticated; /readyz follows what taking webhooks needs."""

from __future__ import annotations

import psycopg
import requests

from config.local import LocalPostgres, LocalRedis, free_port
from ingest import create_app
from sinks.db import migrate
from tests.conftest import TOKEN, ApiProcess, fixture_bytes, wait_for

CONVERTED = fixture_bytes("mkt-v2-converted.json")


def test_readyz_when_all_is_well(client):
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok", "checks": {
        "redis": "ok", "postgres": "ok", "migrations": "ok"}}


def test_readyz_reports_pending_migrations(settings, postgres_admin_url):
    name = f"unmigrated_{free_port()}"
    with psycopg.connect(postgres_admin_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    dsn = postgres_admin_url.rsplit("/", 1)[0] + "/" + name
    migrate(dsn, "0001")
    client = create_app(settings.with_(database_url=dsn)).test_client()
    response = client.get("/readyz")  # webhooks are still taken: the balancer keeps the node
    assert response.status_code == 200 and response.get_json()["status"] == "degraded"
    assert response.get_json()["checks"]["migrations"] == "failing"
    full = client.get("/readyz?full=1")  # what a deploy script waits on
    assert full.status_code == 503 and full.get_json()["status"] == "unavailable"


def test_every_api_on_a_database_not_yet_migrated_answers_503_to_retry(settings,
                                                                     postgres_admin_url):
    """A node deployed before `leadpipe migrate` ran: the subscription API (whose token check
    needs a table of a later migration), its OpenAPI document and the operator API answer 503
    with Retry-After and what to run, never a 500."""
    name = f"unmigrated_{free_port()}"
    with psycopg.connect(postgres_admin_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    dsn = postgres_admin_url.rsplit("/", 1)[0] + "/" + name
    migrate(dsn, "0001")
    client = create_app(settings.with_(database_url=dsn, admin_tokens=("admin-token-abcdef",))
                        ).test_client()
    for path in ("/integrations/webhooks", "/openapi.json", "/api/sinks"):
        token = "admin-token-abcdef" if path.startswith("/api/") else "lp_some-api-token"
        answer = client.get(path, headers={"Authorization": f"Bearer {token}"})
        assert answer.status_code == 503, (path, answer.status_code)
        assert answer.headers["Retry-After"] == "5"
        assert "leadpipe migrate" in answer.get_json()["errors"]["error_message"]


def test_readyz_turns_unhealthy_and_back_when_redis_and_postgres_stop(settings, tmp_path):
    redis_server = LocalRedis(tmp_path / "redis", port=free_port()).start()
    pg = LocalPostgres(tmp_path / "pg", port=free_port()).start()
    migrate(pg.url)
    api = ApiProcess(settings.with_(redis_url=redis_server.url, database_url=pg.url),
                     tmp_path / "api.log")
    try:
        def status(query: str = "") -> int:
            return requests.get(api.url + "/readyz" + query, timeout=10).status_code

        assert status() == 200
        redis_server.stop()
        assert wait_for(lambda: status() == 503, what="not ready without Redis (no spool)")
        redis_server = LocalRedis(tmp_path / "redis", port=redis_server.port).start()
        wait_for(lambda: status() == 200, what="ready again")
        pg.stop()
        # ingest needs no Postgres: the node stays in the balancer, saying what is down
        wait_for(lambda: status("?full=1") == 503, what="not fully ready without Postgres")
        body = requests.get(api.url + "/readyz", timeout=10)
        assert body.status_code == 200 and body.json()["status"] == "degraded"
        assert body.json()["checks"]["postgres"] == "failing" and "password" not in body.text
        answer = requests.post(f"{api.url}/webhooks/rdstation?token={TOKEN}", data=CONVERTED,
                               headers={"Content-Type": "application/json"}, timeout=10)
        assert answer.status_code == 202  # and so it is: taken while Postgres is down
        pg = LocalPostgres(tmp_path / "pg", port=pg.port).start()
        wait_for(lambda: status("?full=1") == 200, what="fully ready again")
        assert requests.get(api.url + "/healthz", timeout=10).status_code == 200
    finally:
        api.stop()
        redis_server.stop()
        pg.stop()


def test_readyz_with_a_spool_stays_ready_while_redis_is_away(settings, tmp_path):
    dead = settings.with_(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    with_spool = create_app(dead.with_(spool_dir=str(tmp_path / "spool"))).test_client()
    response = with_spool.get("/readyz")  # the spool holds what Redis cannot take yet
    assert response.status_code == 200 and response.get_json()["status"] == "degraded"
    assert response.get_json()["checks"]["redis"] == "failing"
    assert with_spool.get("/readyz?full=1").status_code == 503
    assert create_app(dead).test_client().get("/readyz").status_code == 503


def test_readyz_asks_postgres_at_most_every_two_seconds_however_many_probes_come(
        settings, monkeypatch):
    # /readyz needs no token: each call used to open a Postgres connection of its own
    import threading
    import time

    from sinks import db

    opened = []
    real_connect = db.psycopg.connect

    def counting(*args, **kwargs):  # the real connection, counted
        opened.append(time.monotonic())
        return real_connect(*args, **kwargs)

    monkeypatch.setattr(db.psycopg, "connect", counting)
    app = create_app(settings)
    answers = []

    def probe() -> None:
        client = app.test_client()
        for _ in range(25):
            answers.append(client.get("/readyz?full=1").status_code)

    threads = [threading.Thread(target=probe) for _ in range(8)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    took = time.monotonic() - started
    assert answers == [200] * 200
    assert 1 <= len(opened) <= 1 + int(took / 2)
    before = len(opened)
    time.sleep(2.1)  # and it is asked again once its answer is two seconds old
    assert app.test_client().get("/readyz?full=1").status_code == 200
    assert len(opened) == before + 1
