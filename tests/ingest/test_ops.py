"""The /ops dashboard in a real headless Chromium (Debian's) against real API and workers."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
import yaml

from config.local import free_port
from config.settings import MAX_HOURS, Settings
from ingest import create_app
from tests.conftest import TOKEN, ApiProcess, count, fixture_bytes, wait_for

ADMIN = "ops-admin-token-4f9c2a"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
QUARANTINED_EMAIL = "quinn.quarantine@example.org"
# a v2 conversion without the contact's uuid: valid JSON, that cannot be normalised
QUARANTINED = json.dumps({"event_type": "WEBHOOK.CONVERTED", "entity_type": "CONTACT",
                          "event_identifier": "x", "timestamp": "2025-01-01T00:00:00Z",
                          "event_timestamp": "2025-01-01T00:00:00Z"}).encode()
MIX = [  # (body, times): 7 answered 202
    (fixture_bytes("mkt-v2-converted.json"), 2),  # one new, one duplicate
    (fixture_bytes("mkt-v2-marked-opportunity.json"), 1),
    (fixture_bytes("legacy-leads-full.json"), 1),
    (fixture_bytes("crm-deal-created.json"), 1),  # deals also go to `refuser`: dead letters
    (fixture_bytes("crm-deal-updated-won.json"), 1),
    (QUARANTINED, 1),
]
RAW_EMAILS = ["contact@example.com", "maria.souza@example.com.br", "joao.silva@example.com",
              "owner@example.org", "ana@example.com.br"]


@pytest.fixture
def ops_settings(settings: Settings, tmp_path: Path) -> Settings:
    path = tmp_path / "routes.yaml"
    path.write_text(yaml.safe_dump({
        "sinks": {"audit": {"type": "dummy", "options": {"path": str(tmp_path / "a.jsonl")}},
                  "refuser": {"type": "dummy", "options": {"path": "x", "fail": "permanent"}}},
        "routes": [{"to": ["audit"]}, {"to": ["refuser"], "when": {"match": ["deal.id exists"]}}],
    }))
    return settings.with_(routes_file=str(path), admin_tokens=(ADMIN,), worker_concurrency=1,
                          flower_url="http://flower.invalid:5555/")


@pytest.fixture
def api(ops_settings: Settings, tmp_path: Path) -> Iterator[ApiProcess]:
    process = ApiProcess(ops_settings, tmp_path / "api.log", workers=2)  # a cookie any one takes
    yield process
    process.stop()


def bearer(token: str = ADMIN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_session_cookie_flags_and_csrf(ops_settings):
    client = create_app(ops_settings).test_client()
    assert client.post("/ops/login", data={"token": "wrong"}).status_code == 401
    page = client.get("/ops", headers={"Accept": "text/html"})
    assert page.status_code == 401 and b'name="token"' in page.data  # the sign-in form
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    refused = client.post("/ops/login", data={"token": ADMIN},
                          headers={"Origin": "https://elsewhere.example"})
    assert refused.status_code == 401
    signed = client.post("/ops/login", data={"token": ADMIN})
    assert signed.status_code == 303 and signed.headers["Location"] == "/ops"
    cookie = signed.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and ADMIN not in cookie
    assert "Secure" not in cookie  # plain HTTP here; HTTPS requests get Secure
    html = client.get("/ops").get_data(as_text=True)
    csrf = re.search(r'name="csrf-token" content="([^"]+)"', html).group(1)
    assert client.get("/api/sinks").status_code == 200  # reading needs the session only
    assert client.post("/api/sinks/audit/pause").status_code == 401  # a change needs CSRF too
    assert client.post("/api/sinks/audit/pause",
                       headers={"X-CSRF-Token": csrf + "x"}).status_code == 401
    assert client.post("/api/sinks/audit/resume", headers={"X-CSRF-Token": csrf}).status_code == 200
    copied = cookie.split(";")[0].split("=", 1)[1]  # a copy of the cookie, kept by someone
    assert client.post("/ops/logout", headers={"X-CSRF-Token": csrf}).status_code == 204
    ended = redis.Redis.from_url(ops_settings.redis_url)
    (key,) = ended.keys(f"{ops_settings.namespace}:ops:signed-out:*")
    # as long as any session may last, not this one's 12 h: a longer setting later must not
    # bring the copied cookie back
    assert ended.ttl(key) > MAX_HOURS * 3600 - 60
    assert client.get("/api/sinks").status_code == 401
    for elsewhere in (client, create_app(ops_settings).test_client()):  # any API process
        elsewhere.set_cookie("leadpipe_ops", copied)
        assert elsewhere.get("/api/sinks").status_code == 401
        assert elsewhere.get("/ops", headers={"Accept": "application/json"}).status_code == 401
        assert elsewhere.post("/api/sinks/audit/pause",
                              headers={"X-CSRF-Token": csrf}).status_code == 401
    secure = create_app(ops_settings).test_client()
    https = secure.post("/ops/login", data={"token": ADMIN}, base_url="https://localhost")
    assert "Secure" in https.headers["Set-Cookie"]
    rotated = create_app(ops_settings.with_(admin_tokens=("another-admin-token",))).test_client()
    rotated.set_cookie("leadpipe_ops", cookie.split(";")[0].split("=", 1)[1])
    assert rotated.get("/api/sinks").status_code == 401  # the token behind it was retired


def test_a_session_is_not_ended_nor_trusted_with_changes_while_redis_is_down(ops_settings):
    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    client = create_app(ops_settings.with_(redis_url=dead)).test_client()
    assert client.post("/ops/login", data={"token": ADMIN}).status_code == 303
    page = client.get("/ops")
    assert page.status_code == 200  # watching the outage from the dashboard still works
    csrf = re.search(r'name="csrf-token" content="([^"]+)"', page.get_data(as_text=True)).group(1)
    change = client.post("/api/sinks/audit/pause", headers={"X-CSRF-Token": csrf})
    assert change.status_code == 503 and change.headers["Retry-After"] == "5"
    assert change.get_json()["errors"]["error_type"] == "SERVICE_UNAVAILABLE"
    assert "Bearer" in change.get_json()["errors"]["error_message"]
    out = client.post("/ops/logout", headers={"X-CSRF-Token": csrf})
    assert out.status_code == 503 and "Set-Cookie" not in out.headers  # not ended: says so
    assert client.get("/ops").status_code == 200


def _post_mix(api: ApiProcess) -> list[str]:
    ids = []
    with requests.Session() as session:
        for body, times in MIX:
            for _ in range(times):
                answer = session.post(f"{api.url}/webhooks/rdstation?token={TOKEN}", data=body,
                                      headers={"Content-Type": "application/json"}, timeout=10)
                assert answer.status_code == 202, answer.text
                ids.append(answer.json()["id"])
    return ids


def _dashboard(api: ApiProcess) -> dict[str, Any]:
    return requests.get(f"{api.url}/api/dashboard", headers=bearer(), timeout=10).json()


def _shown(page: Any, testid: str) -> str:
    return page.get_by_test_id(testid).first.inner_text().strip()


def test_dashboard_in_a_real_browser(ops_settings, api, worker_factory, db, tmp_path, capsys):
    from playwright.sync_api import expect, sync_playwright

    # each check waits for the page as long as a loaded two-core CI machine may need (the
    # default 5 s is a desktop's): a click's request and the re-render it triggers
    expect.set_options(timeout=20_000)

    worker_factory(ops_settings)
    _post_mix(api)
    quarantined_with_email = json.dumps({"event_type": "WEBHOOK.CONVERTED",
                                         "event_timestamp": "not a time",
                                         "contact": {"email": QUARANTINED_EMAIL,
                                                     "name": "Quinn Q"}}).encode()
    assert requests.post(f"{api.url}/webhooks/rdstation?token={TOKEN}",
                         data=quarantined_with_email, timeout=10,
                         headers={"Content-Type": "application/json"}).status_code == 202
    def settled() -> tuple[int, int, int]:
        return (count(db, "SELECT count(*) FROM dead_letters"),
                count(db, "SELECT count(*) FROM quarantine"),
                count(db, "SELECT count(*) FROM deliveries WHERE sink = 'audit' "
                          "AND status = 'delivered'"))

    try:
        wait_for(lambda: settled() == (2, 2, 5), timeout=60, what="deliveries and failures")
    except AssertionError:
        raise AssertionError(f"dead letters, quarantined, delivered: {settled()}") from None
    # the counters reach Redis within a second of each process' flush
    wait_for(lambda: _dashboard(api)["totals"] == {
        "in": 8, "processed": 8, "delivered": 5, "failed": 2, "quarantined": 2, "duplicate": 1,
        "dead": 2}, timeout=20, what="the dashboard's totals")

    errors: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1400, "height": 1800})
        page.on("console", lambda m: errors.append(f"console {m.type}: {m.text} {m.location}")
                if m.type == "error" else None)
        page.on("pageerror", lambda exc: errors.append(f"page error: {exc}"))
        page.on("requestfailed", lambda r: errors.append(f"request failed: {r.url}"))

        # sign in: the first answer is the form (401), a wrong token is refused
        first = page.goto(f"{api.url}/ops")
        assert first is not None and first.status == 401
        page.fill("#token", "not-the-token")
        page.click("button[type=submit]")
        expect(page.get_by_test_id("login-message")).to_contain_text("not one of")
        page.fill("#token", ADMIN)
        page.click("button[type=submit]")
        expect(page.get_by_test_id("total-in")).to_have_text("8")
        errors.clear()  # the sign-in form's own 401s are expected; from here on, none

        # the numbers
        expect(page.get_by_test_id("total-processed")).to_have_text("8")
        expect(page.get_by_test_id("total-duplicate")).to_have_text("1")
        expect(page.get_by_test_id("total-delivered")).to_have_text("5")
        expect(page.get_by_test_id("total-failed")).to_have_text("2")
        expect(page.get_by_test_id("total-dead")).to_have_text("2")
        expect(page.get_by_test_id("quarantined")).to_have_text("2")
        expect(page.get_by_test_id("ingest-depth")).to_have_text("0")
        expect(page.get_by_test_id("plot-in")).to_have_text("In: 8 in the hour")
        audit, refuser = page.get_by_test_id("sink-audit"), page.get_by_test_id("sink-refuser")
        expect(audit.get_by_test_id("sink-delivered")).to_have_text("5")
        expect(audit.get_by_test_id("sink-success")).to_have_text("100.0%")
        expect(audit.get_by_test_id("sink-p95")).to_contain_text("ms")
        expect(refuser.get_by_test_id("sink-dead")).to_have_text("2")
        expect(refuser.get_by_test_id("sink-success")).to_have_text("0.0%")
        expect(page.get_by_test_id("dead-letters").locator("tbody tr")).to_have_count(2)
        expect(page.get_by_test_id("dead-letters")).to_contain_text("permanent: PermanentSinkError")
        expect(page.get_by_test_id("quarantine").locator("tbody tr")).to_have_count(2)
        expect(page.get_by_test_id("worker")).to_have_count(1)
        assert page.get_by_test_id("flower-link").get_attribute("href") == \
            "http://flower.invalid:5555/"

        # pause and resume by clicking; the operator API agrees
        def paused() -> bool:
            sinks = requests.get(f"{api.url}/api/sinks", headers=bearer(), timeout=10).json()
            return next(s["paused"] for s in sinks["sinks"] if s["sink"] == "audit")

        audit.get_by_test_id("sink-toggle").click()
        expect(audit.get_by_test_id("sink-state")).to_have_text("paused")
        assert paused() is True
        expect(audit.get_by_test_id("sink-toggle")).to_have_text("Resume")
        audit.get_by_test_id("sink-toggle").click()
        expect(audit.get_by_test_id("sink-state")).to_have_text("running")
        assert paused() is False

        # PII masked until one record is revealed
        won = db.execute("SELECT d.id FROM dead_letters d JOIN events e ON e.id = d.event_id "
                         "WHERE e.payload->>'event_name' = 'crm_deal_updated'").fetchone()[0]
        row = page.get_by_test_id(f"dead-letter-{won}")
        expect(row.get_by_test_id("pii-email")).to_have_text("a***@***.br")
        expect(row.get_by_test_id("pii-name")).to_have_text("A*** V***")
        body = page.inner_text("body")
        for email in [*RAW_EMAILS, QUARANTINED_EMAIL]:
            assert email not in body
        row.get_by_test_id("reveal").click()
        expect(row.get_by_test_id("pii-email")).to_have_text("ana@example.com.br")
        other = page.locator("[data-testid^=dead-letter-]").filter(has_not_text="ana@")
        expect(other.get_by_test_id("pii-email")).to_have_text("o***@***.org")  # only that one
        held = db.execute("SELECT id FROM quarantine WHERE payload ? 'contact'").fetchone()[0]
        quarantined = page.get_by_test_id(f"quarantine-{held}")
        expect(quarantined.get_by_test_id("pii-email")).to_have_text("q***@***.org")
        expect(quarantined).to_contain_text("Not a valid ISO-8601 datetime.")
        quarantined.get_by_test_id("reveal").click()
        expect(quarantined.get_by_test_id("pii-email")).to_have_text(QUARANTINED_EMAIL)

        # replay one dead letter by clicking: the sink still refuses, so it dies once more
        row.get_by_test_id("replay").click()
        wait_for(lambda: count(db, "SELECT count(*) FROM dead_letters WHERE id = %s "
                                   "AND replayed_at IS NOT NULL", won) == 1, what="replayed")
        wait_for(lambda: count(db, "SELECT count(*) FROM dead_letters") == 3, what="a new death")

        # bulk replay asks first; cancel does nothing, confirming replays them all
        expect(refuser.get_by_test_id("sink-replay-all")).to_have_text("Replay all 2")
        refuser.get_by_test_id("sink-replay-all").click()
        expect(page.get_by_test_id("confirm-text")).to_have_text(
            "Replay all 2 dead letter(s) of refuser?")
        page.get_by_test_id("confirm-cancel").click()
        assert count(db, "SELECT count(*) FROM dead_letters WHERE replayed_at IS NULL") == 2
        refuser.get_by_test_id("sink-replay-all").click()
        page.get_by_test_id("confirm-ok").click()
        expect(page.get_by_test_id("toast")).to_have_text("2 dead letter(s) of refuser replayed")
        assert count(db, "SELECT count(*) FROM dead_letters WHERE replayed_at IS NOT NULL") == 3
        wait_for(lambda: count(db, "SELECT count(*) FROM dead_letters") == 5, what="deaths")
        expect(refuser.get_by_test_id("sink-dead")).to_have_text("2")

        shot = tmp_path / "ops-dashboard.png"
        page.screenshot(path=str(shot), full_page=True)
        with capsys.disabled():
            print(f"\n/ops screenshot: {shot}")

        signed_in_errors = list(errors)
        page.get_by_test_id("logout").click()
        expect(page.get_by_test_id("login-form")).to_be_visible()
        browser.close()

    assert signed_in_errors == []
    logs = (tmp_path / "api.log").read_text() + "".join(
        p.read_text() for p in tmp_path.glob("worker-*.log"))
    revealed = [json.loads(line) for line in logs.splitlines()
                if line.startswith("{") and '"pii revealed"' in line]
    assert {(r["kind"], r["operator"].startswith("token:")) for r in revealed} == {
        ("dead_letter", True), ("quarantine", True)}
    for email in [*RAW_EMAILS, QUARANTINED_EMAIL]:
        assert email not in logs


@pytest.mark.parametrize("origin", ["http://[", "http://[::1", "https://[zz]:80"])
def test_an_unparsable_origin_is_refused_like_a_foreign_one(ops_settings, origin):
    client = create_app(ops_settings).test_client()
    answer = client.post("/ops/login", data={"token": ADMIN}, headers={"Origin": origin})
    assert answer.status_code == 401, answer.data  # no session for it, and no 500
    assert "Set-Cookie" not in answer.headers
    assert answer.get_json()["errors"]["error_type"] == "UNAUTHORIZED"
