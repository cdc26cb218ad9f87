"""/healthz and /readyz: unauthenticated, and /readyz follows Redis and Postgres."""

from __future__ import annotations

import psycopg
import requests

from config.local import LocalPostgres, LocalRedis, free_port
from ingest import create_app
from sinks.db import migrate
from tests.conftest import ApiProcess, wait_for


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
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.get_json()["checks"]["migrations"] == "failing"


def test_readyz_turns_unhealthy_and_back_when_redis_and_postgres_stop(settings, tmp_path):
    redis_server = LocalRedis(tmp_path / "redis", port=free_port()).start()
    pg = LocalPostgres(tmp_path / "pg", port=free_port()).start()
    migrate(pg.url)
    api = ApiProcess(settings.with_(redis_url=redis_server.url, database_url=pg.url),
                     tmp_path / "api.log")
    try:
        def status() -> int:
            return requests.get(api.url + "/readyz", timeout=10).status_code

        assert status() == 200
        redis_server.stop()
        assert wait_for(lambda: status() == 503, what="not ready without Redis")
        redis_server = LocalRedis(tmp_path / "redis", port=redis_server.port).start()
        wait_for(lambda: status() == 200, what="ready again")
        pg.stop()
        wait_for(lambda: status() == 503, what="not ready without Postgres")
        body = requests.get(api.url + "/readyz", timeout=10).json()
        assert body["checks"]["postgres"] == "failing" and "password" not in str(body)
        pg = LocalPostgres(tmp_path / "pg", port=pg.port).start()
        wait_for(lambda: status() == 200, what="ready again")
        assert requests.get(api.url + "/healthz", timeout=10).status_code == 200
    finally:
        api.stop()
        redis_server.stop()
        pg.stop()
