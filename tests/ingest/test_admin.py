"""The operator API: authentication on every route, sinks, dead letters and their replay."""

from __future__ import annotations

import pytest
import yaml

from ingest import create_app
from tests.conftest import count, fixture_bytes, post, wait_for

ADMIN = "admin-token-abcdef"
PUBLIC = {"/healthz", "/readyz", "/static/<path:filename>"}


@pytest.fixture
def routed(settings, tmp_path):  # type: ignore[no-untyped-def]
    path = tmp_path / "routes.yaml"
    path.write_text(yaml.safe_dump({
        "sinks": {"audit": {"type": "dummy", "options": {"path": str(tmp_path / "a.jsonl")}},
                  "refuser": {"type": "dummy", "options": {"path": "x", "fail": "permanent"}}},
        "routes": [{"to": ["audit"]}, {"to": ["refuser"], "when": {"match": ["deal.id exists"]}}],
    }))
    return settings.with_(routes_file=str(path), admin_tokens=(ADMIN,))


def auth(token: str = ADMIN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_every_route_but_health_needs_credentials(routed):
    app = create_app(routed)
    client = app.test_client()
    for rule in app.url_map.iter_rules():
        if rule.rule in PUBLIC:
            continue
        url = rule.rule
        for arg in rule.arguments:
            url = url.replace(f"<{arg}>", "1").replace(f"<int:{arg}>", "1")
            url = url.replace(f"<any(pause, resume):{arg}>", "pause")
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            response = client.open(url, method=method, headers=auth("wrong"))
            assert response.status_code == 401, (method, url)
            assert response.get_json()["errors"]["error_type"] == "UNAUTHORIZED"


def test_no_admin_token_configured_means_no_access(settings):
    client = create_app(settings).test_client()
    response = client.get("/api/sinks", headers=auth(""))
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_sinks_pause_resume_and_dead_letter_replay(routed, worker_factory, db):
    worker_factory(routed)
    client = create_app(routed).test_client()
    post(client, fixture_bytes("crm-deal-updated-won.json"))
    wait_for(lambda: count(db, "SELECT count(*) FROM dead_letters") == 1
             and count(db, "SELECT count(*) FROM deliveries WHERE status = 'delivered'") == 1,
             what="a dead letter and a delivery")

    sinks = {s["sink"]: s for s in client.get("/api/sinks", headers=auth()).get_json()["sinks"]}
    assert sinks["audit"]["delivered"] == 1 and sinks["refuser"]["dead"] == 1
    assert client.post("/api/sinks/refuser/pause", headers=auth()).get_json()["paused"] is True
    listed = client.get("/api/sinks", headers=auth()).get_json()["sinks"]
    assert [s["paused"] for s in listed if s["sink"] == "refuser"] == [True]
    assert client.post("/api/sinks/ghost/pause", headers=auth()).status_code == 404
    client.post("/api/sinks/refuser/resume", headers=auth())

    letters = client.get("/api/dead-letters?sink=refuser", headers=auth()).get_json()
    (letter,) = letters["dead_letters"]
    assert letter["status_code"] == 400 and letter["attempts"] == 1
    replay = client.post(f"/api/dead-letters/{letter['id']}/replay", headers=auth())
    assert replay.get_json() == {"replayed": 1}
    assert client.post(f"/api/dead-letters/{letter['id']}/replay",
                       headers=auth()).status_code == 404
    # the sink still refuses: the replayed delivery is tried once more and dies again
    wait_for(lambda: count(db, "SELECT count(*) FROM dead_letters") == 2, what="second death")
    assert count(db, "SELECT attempts FROM deliveries WHERE sink = 'refuser'") == 2
    bulk = client.post("/api/dead-letters/replay", json={"sink": "refuser"}, headers=auth())
    assert bulk.get_json() == {"replayed": 1}
    assert client.post("/api/dead-letters/replay", json={"since": "x"},
                       headers=auth()).status_code == 400
