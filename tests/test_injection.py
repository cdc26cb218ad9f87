"""SQL only through parameters: injection strings in every text field are stored as plain text."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from ingest import create_app, tokens
from ingest.queue import Entry
from tests.conftest import count, fixture_bytes
from workers import pipeline

INJECTIONS = [
    "'); DROP TABLE leads; --",
    "x' OR '1'='1",
    "'; SELECT pg_sleep(10); --",
    "$$; DROP TABLE events; $$",
    "%s %(name)s {0} \\x00'",
    "\" OR 1=1 --",
    "Robert'); DELETE FROM quarantine WHERE ('a'='a",
]
TABLES = ("events", "leads", "deals", "quarantine", "deliveries", "dead_letters",
          "subscriptions", "api_tokens")


# fields with a meaning beyond text (types, times, flags): poisoning them quarantines the body
STRUCTURAL = ("event_type", "entity_type", "event_name", "_at", "timestamp", "date",
              "opportunity", "number_conversions", "cumulative_sum", "status", "fit_score")


def poisoned(value: Any, text: str) -> Any:
    """Every free-text string of a JSON document (custom field names too) prefixed with `text`;
    e-mails get it before the @, so they stay e-mails."""
    if isinstance(value, dict):
        return {(text + k if k.startswith("cf_") else k):
                (v if any(part in k for part in STRUCTURAL) else poisoned(v, text))
                for k, v in value.items()}
    if isinstance(value, list):
        return [poisoned(v, text) for v in value]
    if isinstance(value, str):
        return text + value if "@" not in value else value.replace("@", text + "@", 1)
    return value


def tables(db: Any) -> set[str]:
    return {name for (name,) in db.execute(
        "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}


@pytest.mark.parametrize("text", INJECTIONS)
def test_injection_strings_in_every_field_of_every_dialect_are_just_text(text, runtime, db):
    names = ["mkt-v2-converted.json", "legacy-leads-full.json", "crm-deal-updated-won.json",
             "crm-deal-deleted.json"]
    entries = [Entry(f"{n}-0", f"inj-{n}", 1_700_000_000_000 + n,
                     orjson.dumps(poisoned(orjson.loads(fixture_bytes(name)), text)), None)
               for n, name in enumerate(names)]
    entries.append(Entry("9-0", "inj-9", 1_700_000_000_009, orjson.dumps(
        {"event_type": text, "contact": text}), text))  # quarantined, with its text kept
    events, rejected = pipeline.split(entries)
    stored = pipeline.store(runtime, events, rejected)
    assert len(stored.new) == 4 and stored.quarantined == 1

    assert set(TABLES) <= tables(db)
    assert db.execute("SELECT name, job_title FROM leads WHERE starts_with(name, %s) ORDER BY name",
                      (text,)).fetchall() == sorted(
        [(text + "Contact Name", text + "Developer"), (text + "João Silva", text + "Diretor")])
    assert count(db, "SELECT count(*) FROM deals WHERE starts_with(name, %s)", text) == 2
    assert count(db, "SELECT count(*) FROM events WHERE payload->'contact'->>'name' = %s",
                 text + "Contact Name") == 1
    (reason_hint,) = db.execute("SELECT event_type_hint FROM quarantine").fetchone()
    assert reason_hint == text


@pytest.mark.parametrize("text", INJECTIONS)
def test_injection_strings_through_the_apis_are_just_text(text, settings, database_url, db):
    token = tokens.create(database_url, text)  # a token's name
    app = create_app(settings.with_(subscription_probe=False, ssrf_allow=("93.184.215.0/24",),
                                    admin_tokens=("admin-token-abcdef",)))
    client = app.test_client()
    hooks = {"Authorization": f"Bearer {token}"}
    body = {"entity_type": "CONTACT", "event_type": "WEBHOOK.CONVERTED",
            "url": "https://93.184.215.14/hook?q=" + text.replace(" ", "%20").replace("#", ""),
            "http_method": "POST", "event_identifiers": [text, text + "2"],
            "include_relations": []}
    created = client.post("/integrations/webhooks", json=body, headers=hooks)
    assert created.status_code in (201, 422), created.get_json()
    if created.status_code == 201:
        shown = client.get(f"/integrations/webhooks/{created.get_json()['uuid']}",
                           headers=hooks).get_json()
        assert shown["event_identifiers"] == [text, text + "2"]
    assert client.get(f"/integrations/webhooks/{text}", headers=hooks).status_code == 404
    admin = {"Authorization": "Bearer admin-token-abcdef"}
    listed = client.get("/api/dead-letters", query_string={"sink": text}, headers=admin)
    assert listed.status_code == 200 and listed.get_json()["dead_letters"] == []
    assert client.post(f"/api/sinks/{text}/pause", headers=admin).status_code == 404
    assert set(TABLES) <= tables(db)
    assert db.execute("SELECT name FROM api_tokens").fetchall() == [(text,)]
