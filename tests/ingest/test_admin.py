"""The operator API: authentication on every route, sinks, dead letters and their replay."""

from __future__ import annotations

import hashlib
import logging
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import yaml

from ingest import create_app
from tests.conftest import count, fixture_bytes, free_port, post, wait_for

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

    # an error text naming a person (a destination's answer quoted) is masked, as on /ops
    db.execute("UPDATE dead_letters SET error = 'HTTP 400: ana.souza@example.com refused'")
    letters = client.get("/api/dead-letters?sink=refuser", headers=auth()).get_json()
    (letter,) = letters["dead_letters"]
    assert letter["status_code"] == 400 and letter["attempts"] == 1
    assert "ana.souza@example.com" not in letter["error"] and "refused" in letter["error"]
    replay = client.post(f"/api/dead-letters/{letter['id']}/replay", headers=auth())
    assert replay.get_json() == {"replayed": 1}
    assert client.post(f"/api/dead-letters/{letter['id']}/replay",
                       headers=auth()).status_code == 404
    # the sink still refuses: the replayed delivery is tried once more and dies again
    wait_for(lambda: count(db, "SELECT count(*) FROM dead_letters") == 2, what="second death")
    assert count(db, "SELECT attempts FROM deliveries WHERE sink = 'refuser'") == 2
    listed = client.get("/api/dead-letters?sink=refuser&all=true", headers=auth()).get_json()
    ids = [d["id"] for d in listed["dead_letters"]]
    assert len(ids) == 2 and ids == sorted(ids, reverse=True)  # newest first
    bulk = client.post("/api/dead-letters/replay", json={"sink": "refuser"}, headers=auth())
    assert bulk.get_json() == {"replayed": 1}
    assert client.post("/api/dead-letters/replay", json={"since": "x"},
                       headers=auth()).status_code == 400


def dead_letter(routed, worker_factory, db) -> int:  # type: ignore[no-untyped-def]
    """One dead letter of the refuser sink, made by a real worker."""
    worker_factory(routed)
    post(create_app(routed).test_client(), fixture_bytes("crm-deal-updated-won.json"))
    wait_for(lambda: count(db, "SELECT count(*) FROM dead_letters") == 1, what="a dead letter")
    return count(db, "SELECT id FROM dead_letters")


def test_two_replays_at_once_send_a_dead_letter_once(routed, worker_factory, db, database_url):
    """A double click, or the CLI and the page together: both read the dead letter as waiting;
    the one that takes it second must find it taken, not send it again."""
    letter = dead_letter(routed, worker_factory, db)
    app = create_app(routed)
    answers: list[tuple[int, dict]] = []

    def replay() -> None:
        response = app.test_client().post(f"/api/dead-letters/{letter}/replay", headers=auth())
        answers.append((response.status_code, response.get_json()))

    with psycopg.connect(database_url) as holder:  # holds the row: both replays queue behind it
        holder.execute("SELECT 1 FROM dead_letters WHERE id = %s FOR UPDATE", (letter,))
        threads = [threading.Thread(target=replay) for _ in range(2)]
        for thread in threads:
            thread.start()
        waiting = ("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                   "AND query LIKE 'UPDATE dead_letters%%'")
        wait_for(lambda: count(db, waiting) == 2, what="both replays waiting for the dead letter")
        holder.commit()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(status for status, _ in answers) == [200, 404]
    assert [body for status, body in answers if status == 200] == [{"replayed": 1}]
    # the refuser refuses again: one more attempt, one more dead letter, and no third
    wait_for(lambda: count(db, "SELECT count(*) FROM dead_letters") == 2, what="second death")
    time.sleep(2)
    assert count(db, "SELECT attempts FROM deliveries WHERE sink = 'refuser'") == 2
    assert count(db, "SELECT count(*) FROM dead_letters") == 2


def test_replay_names_an_unknown_sink_and_leaves_a_removed_sinks_letters_waiting(
        routed, worker_factory, db, tmp_path):
    letter = dead_letter(routed, worker_factory, db)
    client = create_app(routed).test_client()
    unknown = client.post("/api/dead-letters/replay", json={"sink": "ghost"}, headers=auth())
    assert unknown.status_code == 404 and "ghost" in unknown.get_json()["errors"]["error_message"]
    nobody = "subscription:1b4e28ba-2fa1-11d2-883f-0016d3cca427"  # no such subscription
    unknown = client.post("/api/dead-letters/replay", json={"sink": nobody}, headers=auth())
    assert unknown.status_code == 404
    assert "1b4e28ba-2fa1-11d2-883f-0016d3cca427" in unknown.get_json()["errors"]["error_message"]

    # the refuser taken out of the routing file: its dead letter has no worker to go to
    path = tmp_path / "without-refuser.yaml"
    path.write_text(yaml.safe_dump({"sinks": {"audit": {"type": "dummy", "options": {
        "path": str(tmp_path / "a.jsonl")}}}, "routes": [{"to": ["audit"]}]}))
    client = create_app(routed.with_(routes_file=str(path))).test_client()
    answer = client.post(f"/api/dead-letters/{letter}/replay", headers=auth())
    assert answer.status_code == 404
    assert "'refuser', which is no longer configured" in answer.get_json()["errors"][
        "error_message"]
    assert db.execute("SELECT d.status, l.replayed_at FROM deliveries d JOIN dead_letters l "
                      "USING (event_id, sink)").fetchall() == [("dead", None)]


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that takes connections and never answers: a frozen server, a half-open proxy."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        yield listener.getsockname()[1]


@pytest.mark.timeout(120)  # each answer within seconds: before, some waited minutes or for good
@pytest.mark.parametrize("down", ["redis", "postgres", "silent redis", "silent postgres"])
def test_operator_api_answers_503_when_a_store_is_down(routed, down, silent_port):
    port = silent_port if down.startswith("silent") else free_port()
    redis_side = down.endswith("redis")
    dead = f"{'redis' if redis_side else 'postgresql'}://leadpipe@127.0.0.1:{port}/0"
    broken = routed.with_(**{"redis_url" if redis_side else "database_url": dead})
    client = create_app(broken).test_client()
    needs = {"redis": [("GET", "/api/sinks"), ("POST", "/api/sinks/audit/pause"),
                       ("GET", "/api/workers?timeout=0.5")],
             "postgres": [("GET", "/api/sinks"), ("GET", "/api/dead-letters"),
                          ("GET", "/api/quarantine"), ("POST", "/api/dead-letters/1/replay")]}
    for method, url in needs["redis" if redis_side else "postgres"]:
        answer = client.open(url, method=method, headers=auth())
        assert answer.status_code == 503, (url, answer.status_code, answer.get_data())
        assert answer.headers["Retry-After"] == "5"
        assert answer.get_json()["errors"]["error_type"] == "SERVICE_UNAVAILABLE"
    # the dashboard shows what it could read, the metrics say which source failed
    overview = client.get("/api/dashboard", headers=auth())
    assert overview.status_code == 200
    assert overview.get_json()["redis_up" if redis_side else "postgres_up"] is False
    scrape = client.get("/metrics", headers=auth())
    assert scrape.status_code == 200
    source = "redis" if redis_side else "postgres"
    assert f'leadpipe_source_up{{source="{source}"}} 0.0' in scrape.get_data(as_text=True)


def test_quarantined_bodies_with_odd_types_show_no_pii(routed, db):
    db.execute("INSERT INTO quarantine (id, received_at, reason, payload) VALUES "
               "('q1', now(), 'contact.email: Not a valid string.', %s)",
               ('{"event_type": "WEBHOOK.CONVERTED", "contact": {"email": '
                '["maria.souza@example.com.br"], "name": ["Maria Souza"]}}',))
    client = create_app(routed).test_client()
    for url in ("/api/quarantine", "/api/dashboard"):
        answer = client.get(url, headers=auth())
        assert answer.status_code == 200
        text = answer.get_data(as_text=True)
        assert "maria.souza" not in text and "Maria Souza" not in text, (url, text)
        assert "m***@***.br" in text


@pytest.mark.timeout(120)  # the broadcast's endless retries held the request for good
@pytest.mark.parametrize("action", ["pause", "resume"])
def test_a_pause_or_resume_answers_though_redis_freezes_before_the_broadcast(
        routed, redis_url, monkeypatch, action):
    """The pause state is written, then Redis stops answering (a failover, a freeze) before
    the broadcast to the nodes: the request answers within seconds (the nodes follow the state
    in Redis by themselves) instead of waiting on Celery's retries."""
    from tests.support.freezing_proxy import FreezingProxy
    from workers.control import SinkControl

    host, port = redis_url.split("//")[1].split("/")[0].split(":")
    proxy = FreezingProxy((host, int(port)))
    client = create_app(routed.with_(redis_url=f"redis://127.0.0.1:{proxy.port}/0")
                        ).test_client()
    written = getattr(SinkControl, action)

    def then_freeze(self: SinkControl, sink: str) -> None:
        written(self, sink)
        proxy.freeze()

    monkeypatch.setattr(SinkControl, action, then_freeze)
    answered: dict[str, Any] = {}
    caller = threading.Thread(target=lambda: answered.update(
        r=client.post(f"/api/sinks/audit/{action}", headers=auth())), daemon=True)
    caller.start()
    caller.join(30)
    held = caller.is_alive()
    proxy.thaw()  # the broadcast left running goes through, and its thread ends
    wait_for(lambda: not any(t.name == "leadpipe-broadcast" for t in threading.enumerate()),
             what="the broadcast thread to end")
    proxy.close()
    assert not held, "the request is held by the broadcast"
    assert answered["r"].status_code == 200


def test_the_workers_answering_are_listed_through_the_api(routed, worker_factory):
    """The API's broker connection gives up in seconds (above); on a broker that answers,
    Celery's inspect through it still finds the workers and their queues."""
    worker_factory(routed)
    client = create_app(routed).test_client()

    def listed() -> list[dict[str, Any]]:
        answer = client.get("/api/workers?timeout=2", headers=auth())
        assert answer.status_code == 200
        return list(answer.get_json()["workers"].values())

    (node,) = wait_for(listed, what="the worker listed")  # a busy worker may miss one inspect
    assert routed.ingest_queue in node["queues"] and node["pool"]


@pytest.mark.timeout(120)  # a broker that does not answer held the replay for good
@pytest.mark.parametrize("broker", ["refusing", "silent"])
def test_a_replay_while_the_broker_is_down_is_left_to_the_relay(routed, worker_factory, db,
                                                                broker, silent_port):
    """The dead letter is taken and its delivery pending in Postgres before the publish: a
    broker that cannot take the task must not turn that into an error (the relay sends it)."""
    letter = dead_letter(routed, worker_factory, db)
    port = silent_port if broker == "silent" else free_port()
    broker_down = routed.with_(redis_url=f"redis://127.0.0.1:{port}/0")
    answer = create_app(broker_down).test_client().post(f"/api/dead-letters/{letter}/replay",
                                                        headers=auth())
    assert (answer.status_code, answer.get_json()) == (200, {"replayed": 1})
    assert db.execute("SELECT d.status, l.replayed_at IS NOT NULL FROM deliveries d JOIN "
                      "dead_letters l USING (event_id, sink)").fetchall() == [("pending", True)]


def test_an_erasure_is_logged_with_its_operator_never_the_address(settings, caplog):
    from ingest.session import sessions

    app = create_app(settings.with_(admin_tokens=(ADMIN,)))
    client = app.test_client()
    with caplog.at_level(logging.INFO):
        answer = client.post("/api/erase", json={"email": "Ana.Audit@example.com"},
                             headers=auth())
    assert answer.status_code == 200
    lines = [r for r in caplog.records if r.getMessage() == "erasure done"]
    assert len(lines) == 1
    with app.app_context():
        assert getattr(lines[0], "operator", None) == f"token:{sessions().fingerprint(ADMIN)}"
    assert lines[0].name == "leadpipe.ops"  # with the other operator actions
    assert lines[0].touched == answer.get_json()["erased"]
    assert "ana.audit" not in str(vars(lines[0])).lower()


@pytest.mark.parametrize("session_key", [None, "a-long-random-session-key-0123456789"])
def test_the_operator_named_in_logs_cannot_be_checked_against_a_guess_of_the_token(
        settings, caplog, session_key):
    # a plain hash of the token in every audit line let whoever reads the logs try guesses
    # offline; the name is an HMAC under the session key (set, or made of every admin token)
    client = create_app(settings.with_(admin_tokens=(ADMIN,), ops_session_key=session_key)
                        ).test_client()
    with caplog.at_level(logging.INFO):
        assert client.post("/api/erase", json={"email": "x@example.com"},
                           headers=auth()).status_code == 200
    [line] = [r for r in caplog.records if r.getMessage() == "erasure done"]
    named = line.operator.removeprefix("token:")
    assert len(named) == 12
    for digest in (hashlib.sha256, hashlib.sha1, hashlib.md5, hashlib.sha512):
        assert named not in digest(ADMIN.encode()).hexdigest()
    other = create_app(settings.with_(admin_tokens=(ADMIN,), ops_session_key="another-key"))
    with other.app_context():
        from ingest.session import sessions

        assert sessions().fingerprint(ADMIN) != named  # the key, not the token alone
