"""`leadpipe flower`: real Flower on our broker, behind basic auth, sees our worker and tasks."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from config.settings import Settings
from ingest import create_app
from tests.conftest import ROOT, ServerProcess, count, fixture_bytes, post, wait_for

AUTH = ("ops", "flower-secret-123")


class FlowerProcess(ServerProcess):
    """`leadpipe flower` on a free port; its Flower JSON API read with our credentials."""

    def __init__(self, settings: Settings, log_path: Path):
        super().__init__(settings, log_path, ["flower"], "/healthcheck", timeout=60)

    def api(self, path: str, **params: str) -> dict:
        response = requests.get(self.url + path, params=params, auth=AUTH, timeout=10)
        assert response.status_code == 200, (path, response.status_code, response.text)
        return response.json()


@pytest.fixture
def flower_settings(settings: Settings) -> Settings:
    return settings.with_(flower_basic_auth=(f"{AUTH[0]}:{AUTH[1]}",))


@pytest.fixture
def flower(flower_settings: Settings, tmp_path: Path) -> Iterator[FlowerProcess]:
    process = FlowerProcess(flower_settings, tmp_path / "flower.log")
    yield process
    process.stop()


def test_flower_sees_the_worker_and_the_batches_a_post_produced(flower, flower_settings, worker,
                                                                db):
    worker_name = f"leadpipe-{worker.proc.pid}@"
    # Flower's event receiver is live once it has heard the worker's heartbeat
    online = wait_for(lambda: [name for name, up in flower.api("/api/workers",
                                                               status="true").items()
                               if name.startswith(worker_name) and up],
                      timeout=30, what="flower to hear the worker")
    (name,) = online  # type: ignore[misc]

    client = create_app(flower_settings).test_client()
    bodies = ["mkt-v2-converted.json", "mkt-v2-marked-opportunity.json", "crm-deal-created.json"]
    ids = {post(client, fixture_bytes(body)).get_json()["id"] for body in bodies}
    wait_for(lambda: count(db, "SELECT count(*) FROM events") == 3, what="events stored")

    workers = flower.api("/api/workers", refresh="true", workername=name)
    assert "leadpipe.process_batch" in workers[name]["registered"]
    assert flower_settings.ingest_queue in {q["name"] for q in workers[name]["active_queues"]}

    def batches() -> list[dict] | None:
        tasks = flower.api("/api/tasks", taskname="leadpipe.process_batch", state="SUCCESS")
        mine = [t for t in tasks.values() if t["worker"] == name]
        return mine if sum(_new(t) for t in mine) == 3 else None

    done = wait_for(batches, timeout=30, what="flower to list the batches")
    # the tasks carry stream entry ids and answer with counts: no lead data reaches Flower
    shown = str([(t["args"], t["kwargs"], t["result"]) for t in done])  # type: ignore[union-attr]
    assert "@example.com" not in shown and not any(i in shown for i in ids)


def _new(task: dict) -> int:
    """How many new events a succeeded process_batch stored, from its result as Flower shows it."""
    return int(ast.literal_eval(task["result"])["new"])


def test_flower_without_credentials_answers_401(flower):
    for path in ("/api/workers", "/api/tasks", "/"):
        assert requests.get(flower.url + path, timeout=5).status_code == 401, path
    wrong = requests.get(flower.url + "/api/workers", auth=(AUTH[0], "guess"), timeout=5)
    assert wrong.status_code == 401


def test_flower_refuses_to_start_without_credentials(settings, tmp_path):
    env = {**os.environ, **settings.to_env()}
    result = subprocess.run([sys.executable, "-m", "config.cli", "flower"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "LEADPIPE_FLOWER_BASIC_AUTH" in result.stderr and "--no-auth" in result.stderr


def test_flower_basic_auth_setting_refuses_junk_without_echoing_it():
    from config.settings import ConfigError

    with pytest.raises(ConfigError, match="LEADPIPE_FLOWER_BASIC_AUTH") as caught:
        Settings.from_env({"LEADPIPE_FLOWER_BASIC_AUTH": "no-colon-s3cret"})
    assert "s3cret" not in str(caught.value)
