"""The routing file: validation messages, filters, conditions and `routes explain`."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import orjson
import psycopg
import pytest
import yaml

from ingest.queue import Entry
from tests.conftest import FIXTURES, ROOT, fixture_bytes
from workers.events import Event
from workers.normalize import normalize
from workers.routing import FIELDS, RoutingError, load, parse
from workers.view import view

EXAMPLE = ROOT / "docs" / "routes.example.yaml"


def event(name: str, hint: str | None = None, **changes: object) -> Event:
    body = orjson.loads(fixture_bytes(name))
    body.update(changes)
    item = normalize(Entry("1-0", "ev", 0, orjson.dumps(body), hint))[0]
    assert isinstance(item, Event)
    return item


def routing(tmp_path: Path, routes: list[dict], sinks: dict | None = None):  # type: ignore[no-untyped-def]
    sinks = sinks or {name: {"type": "dummy", "options": {"path": str(tmp_path / name)}}
                      for name in ("a", "b", "c")}
    return parse({"sinks": sinks, "routes": routes})


def test_example_file_is_valid():
    r = load(EXAMPLE)
    assert set(r.sinks) == {"crm", "sales-email"}
    assert r.sinks["crm"].rate == (10, 1.0)


def test_the_example_mails_sales_once_per_new_opportunity_not_per_conversion():
    r = load(EXAMPLE)
    assert r.sinks_for(event("mkt-v2-marked-opportunity.json")) == ["crm", "sales-email"]
    converted = orjson.loads(fixture_bytes("mkt-v2-converted.json"))
    converted["contact"]["funnel"]["opportunity"] = True  # a lead that already is one
    assert r.sinks_for(event_of(converted)) == ["crm"]
    assert r.sinks_for(event("crm-deal-updated-won.json")) == ["crm", "sales-email"]


def test_by_event_type_identifier_and_condition(tmp_path):
    r = routing(tmp_path, [
        {"to": ["a"], "when": {"event_type": ["WEBHOOK.CONVERTED"],
                               "event_identifiers": ["my-event-identifier"]}},
        {"to": ["b"], "when": {"match": ["funnel.opportunity == true"]}},
        {"to": ["c", "a"], "when": {"match": ["deal.status in [won, lost]"]}},
    ])
    assert r.sinks_for(event("mkt-v2-converted.json")) == ["a"]
    assert r.sinks_for(event("mkt-v2-converted.json", event_identifier="other")) == []
    assert r.sinks_for(event("mkt-v2-marked-opportunity.json")) == ["b"]
    assert r.sinks_for(event("legacy-leads-full.json")) == ["b"]  # "true" string, normalised
    assert r.sinks_for(event("crm-deal-updated-won.json")) == ["c", "a"]
    assert r.sinks_for(event("crm-deal-created.json")) == []


def test_legacy_identifier_comes_from_the_last_conversion(tmp_path):
    r = routing(tmp_path, [{"to": ["a"], "when": {"event_identifiers": ["Formulário - LP"]}}])
    assert r.sinks_for(event("legacy-leads-full.json")) == ["a"]
    assert r.sinks_for(event("legacy-leads-official.json")) == []


def test_identifiers_only_filter_conversions_like_rd(tmp_path):
    r = routing(tmp_path, [{"to": ["a"], "when": {"event_identifiers": ["x"]}}])
    assert r.sinks_for(event("mkt-v2-marked-opportunity.json")) == ["a"]


@pytest.mark.parametrize("condition, expected", [
    ("lead.interest >= 45", True), ("lead.interest > 45", False),
    ("lead.city == São Paulo", True), ("lead.city != São Paulo", False),
    ("lead.state not in [SP, RJ]", False), ("lead.website missing", True),
    ("lead.email exists", True), ("contact.cf_segmento == Varejo", True),
    ("deal.status == won", False), ("event.source == MKT", True),
])
def test_conditions(tmp_path, condition, expected):
    r = routing(tmp_path, [{"to": ["a"], "when": {"match": [condition]}}])
    assert bool(r.sinks_for(event("mkt-v2-marked-opportunity.json"))) is expected


def marked_with(**contact: object) -> Event:
    body = orjson.loads(fixture_bytes("mkt-v2-marked-opportunity.json"))
    body["contact"].update(contact)
    return event_of(body)


def event_of(body: dict) -> Event:
    item = normalize(Entry("1-0", "ev", 0, orjson.dumps(body), None))[0]
    assert isinstance(item, Event)
    return item


@pytest.mark.parametrize("condition, expected", [
    # a value is typed only when plainly a flag, null or a decimal number: these are the
    # text as written (YAML 1.1 made them True, True, octal 668, 90 and a date, so none
    # ever matched what RD sent)
    ("contact.state == ON", True), ("contact.cf_newsletter == yes", True),
    ("contact.cf_zip == 01234", True), ("contact.cf_slot == 1:30", True),
    ("contact.cf_zip in [01234, 01235]", True), ("contact.cf_newsletter != no", True),
    # RD's text beside a number or a flag is read as one: fit is kept as text (legacy's
    # letters), a cf_ flag often comes as "true"
    ("funnel.fit >= 50", True), ("funnel.fit == 60", True), ("funnel.fit < 50", False),
    ("funnel.fit in [60, 70]", True), ("contact.cf_optin == true", True),
    ("contact.cf_optin == false", False), ("contact.cf_score > 2.5", True),
    # a time field is compared with an ISO-8601 date or time
    ("event.occurred_at >= 2025-03-10", True), ("event.occurred_at < 2025-03-10", False),
    ("event.occurred_at > 2025-03-10T13:14:58Z", True),
    ("event.occurred_at < 2025-03-10T10:15:00-03:00", True),
    ("event.occurred_at in [2025-03-10T13:14:58.901Z]", True),
    # decimals as written, whether RD sent text or a number
    ("contact.cf_price == 19.9", True), ("contact.cf_price <= 19.9", True),
    ("contact.cf_price in [19.9, 29.9]", True), ("contact.cf_ratio >= 0.1", True),
    ("contact.cf_weight == 0.3", True), ("contact.cf_weight > 0.3", False),
])
def test_a_condition_compares_with_what_the_value_was_written_as(tmp_path, condition, expected):
    r = routing(tmp_path, [{"to": ["a"], "when": {"match": [condition]}}])
    lead = marked_with(state="ON", cf_newsletter="yes", cf_zip="01234", cf_slot="1:30",
                       cf_optin="true", cf_score="3", cf_price="19.9", cf_ratio="0.1",
                       cf_weight=0.3)
    assert bool(r.sinks_for(lead)) is expected, r.explain(lead)


@pytest.mark.parametrize("condition, expected", [
    ("deal.amount_total == 7500", True), ("deal.amount_total == 7500.0", True),
    ("deal.amount_monthly >= 499.9", True), ("deal.amount_unique < 1500.01", True),
    ("deal.amount_unique in [1500.0, 2000]", True), ("deal.amount_total > 7500.5", False),
    ("deal.amount_monthly == 1999.9", True), ("deal.amount_monthly in [1999.9]", True),
])
def test_a_deals_exact_amounts_compare_with_decimals(tmp_path, condition, expected):
    r = routing(tmp_path, [{"to": ["a"], "when": {"match": [condition]}}])
    body = orjson.loads(fixture_bytes("crm-deal-updated-won.json"))
    if "1999.9" in condition:  # no float holds it exactly: the amount is an exact Decimal
        body["document"]["amount_monthly"] = 1999.9
    deal = event_of(body)
    assert bool(r.sinks_for(deal)) is expected, r.explain(deal)


@pytest.mark.parametrize("when, message", [
    ({"match": ["event.occurred_at >= soon"]}, "event.occurred_at is a time"),
    ({"match": ["deal.closed_at < 31/01/2026"]}, "ISO-8601"),
    ({"match": ["lead.updated_at in [2026-01-01, yesterday]"]}, "is a time"),
    ({"event_type": ["WEBHOOK.CONVERTD"]}, "did you mean 'WEBHOOK.CONVERTED'"),
    ({"event_type": ["crm_deal_creatd"]}, "did you mean 'crm_deal_created'"),
    ({"event_type": ["order_paid"]}, "crm_<entity>_<created|updated|deleted>"),
    ({"event_type": []}, "an empty list matches no event"),
    ({"match": ["funnel.opportunity == yes"]}, "is true or false: write true"),
    ({"match": ["lead.opportunity in [off, true]"]}, "write false"),
])
def test_a_route_that_could_never_match_is_refused_at_load(tmp_path, when, message):
    with pytest.raises(RoutingError, match=re.escape(message)):
        routing(tmp_path, [{"name": "r", "to": ["a"], "when": when}])


def test_every_crm_event_type_rd_sends_may_be_routed(tmp_path):
    r = routing(tmp_path, [{"to": ["a"], "when": {"event_type": [
        "crm_organization_updated", "crm_lost_reason_deleted", "crm_task_created"]}}])
    assert r.sinks_for(event_of({"event_name": "crm_task_created", "document": {"id": "t1"},
                                 "transaction_uuid": "tx-task"})) == ["a"]


@pytest.mark.parametrize("doc, words", [
    ({"sinks": {"a": {"type": "nope"}}}, ["'a'", "unknown sink type 'nope'"]),
    ({"sinks": {"a": {"type": "dummy", "options": {}}}}, ["'a'", "option 'path'"]),
    ({"sinks": {"a": {"type": "dummy", "options": {"path": "x", "colour": 1}}}},
     ["'a'", "option 'colour'"]),
    ({"sinks": {}, "routes": [{"to": ["ghost"]}]}, ["unknown sink 'ghost'"]),
    ({"routes": [{"to": []}]}, ["to"]),
    ({"sinks": {"a": {"type": "dummy", "options": {"path": "x"}}},
      "routes": [{"to": ["a"], "when": {"match": ["deal.status is won"]}}]},
     ["deal.status is won"]),
    ({"sinks": {"a": {"type": "dummy", "options": {"path": "x"}}},
      "routes": [{"to": ["a"], "when": {"match": ["weird.path == 1"]}}]}, ["path must start"]),
    ({"sinks": {"a": {"type": "dummy", "options": {"path": "x"}, "rate_limit": "fast"}}},
     ["rate_limit"]),
    ({"sinkz": {}}, ["sinkz"]),
    ({"sinks": {"crm": {"type": "dummy", "options": {"path": "x"}, "quick_retries": 0}}},
     ["sinks.crm.quick_retries: Must be greater than or equal to 1"]),
    ({"routes": [{"to": []}]}, ["routes[0].to: Shorter than minimum length 1"]),
    # the pipeline keeps the e-mail ledger in its own database: another one would be ignored
    ({"sinks": {"mail": {"type": "email", "options": {
        "host": "127.0.0.1", "from": "a@example.com", "to": ["b@example.com"],
        "dsn": "postgresql://elsewhere/x"}}}}, ["sink 'mail'", "'dsn'", "remove it"]),
])
def test_bad_files_are_refused_with_a_clear_message(doc, words):
    with pytest.raises(RoutingError) as info:
        parse(doc)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize("rate", ["0/s", "0/m", "00/s", " 0 / hour"])
def test_a_zero_rate_is_refused_when_the_file_is_loaded(rate):
    # 0 events per period passed the format check and later divided by zero in delivery
    with pytest.raises(RoutingError) as info:
        parse({"sinks": {"crm": {"type": "dummy", "options": {"path": "x"},
                                 "rate_limit": rate}}})
    message = str(info.value)
    assert "sinks.crm.rate_limit:" in message and "at least 1" in message
    assert "\n" not in message


def with_schedule(schedule: list[float]) -> dict:
    return {"sinks": {"crm": {"type": "dummy", "options": {"path": "x"},
                              "retry_schedule": schedule}}}


def test_waits_longer_than_the_visibility_timeout_are_accepted(tmp_path):
    """Rounds and cooldowns of any length: a long wait is made in hops (Runtime.publish), so
    Redis never holds a waiting task long enough to hand it out again."""
    path = tmp_path / "routes.yaml"
    path.write_text(yaml.safe_dump({"sinks": {"crm": {
        "type": "dummy", "options": {"path": "x"}, "retry_schedule": [5, 86400, 172800],
        "circuit_breaker": {"failures": 5, "cooldown": 100000}}}}))
    spec = load(path).sinks["crm"]
    assert (spec.retry_schedule, spec.circuit_cooldown) == ((5.0, 86400.0, 172800.0), 100000.0)


def one_condition(condition: str) -> dict:
    return {"sinks": {"a": {"type": "dummy", "options": {"path": "x"}}},
            "routes": [{"name": "r1", "to": ["a"], "when": {"match": [condition]}}]}


@pytest.mark.parametrize("condition, unknown, closest", [
    ("lead.emial exists", "lead.emial", "lead.email"),
    ("lead.emial missing", "lead.emial", "lead.email"),
    ("lead.intrest >= 40", "lead.intrest", "lead.interest"),
    ("lead.last_conversion_identifer == pricing-form", "lead.last_conversion_identifer",
     "lead.last_conversion_identifier"),
    ("deal.stauts in [won]", "deal.stauts", "deal.status"),
    ("deal.amount == 10", "deal.amount", "deal.amount_total"),
    ("event.tpye == crm_deal_updated", "event.tpye", "event.type"),
    ("funnel.oportunity == true", "funnel.oportunity", "funnel.opportunity"),
    ("funnel.owner_email exists", "funnel.owner_email", "funnel.contact_owner_email"),
])
def test_an_unknown_name_under_a_closed_root_is_refused(condition, unknown, closest):
    # such a route used to load and then silently never match
    with pytest.raises(RoutingError) as info:
        parse(one_condition(condition))
    message = str(info.value)
    assert "\n" not in message
    assert "route 'r1'" in message and repr(condition) in message
    assert f"unknown name {unknown!r}" in message
    assert f"did you mean {closest!r}?" in message


def test_an_unknown_name_with_nothing_close_lists_the_valid_ones():
    with pytest.raises(RoutingError) as info:
        parse(one_condition("deal.zzz exists"))
    assert "unknown name 'deal.zzz'" in str(info.value)
    assert "did you mean" not in str(info.value)
    assert "stage_name" in str(info.value) and "status" in str(info.value)


def test_leads_columns_the_matcher_cannot_see_are_refused_too():
    # a leads column, but not part of the lead a condition reads: it would never exist
    with pytest.raises(RoutingError) as info:
        parse(one_condition("lead.lead_key exists"))
    assert "unknown name 'lead.lead_key'" in str(info.value)


def test_an_unknown_root_is_refused_in_presence_conditions_too():
    with pytest.raises(RoutingError) as info:
        parse(one_condition("weird.path exists"))
    assert "route 'r1'" in str(info.value) and "path must start" in str(info.value)


@pytest.mark.parametrize("condition", [
    "contact.cf_anything_rd_sends == x", "contact.funnel.lifecycle_stage exists",
    "document.deal_stage.name == Proposta", "lead.custom_fields.segmento == Varejo",
    "deal.custom_fields.Origem exists", "lead.tags exists", "deal.id exists",
    "event.identifier == pricing-form", "funnel.fit == A1",
])
def test_free_form_parts_and_known_names_are_accepted(condition):
    assert parse(one_condition(condition)).routes[0].conditions[0].text == condition


def test_the_checked_names_are_what_the_matcher_reads():
    """FIELDS can neither miss a name the matcher sees nor allow one it never does: it equals
    the keys of view() for real events of each kind, the lead and deal dicts normalize builds."""
    seen: dict[str, set[str]] = {root: set() for root in FIELDS}
    for name in ("mkt-v2-converted.json", "mkt-v2-marked-opportunity.json",
                 "legacy-leads-full.json", "crm-deal-updated-won.json", "crm-deal-created.json"):
        data = view(event(name))
        for root in FIELDS:
            seen[root] |= set(data[root])
    assert {root: set(names) for root, names in FIELDS.items()} == seen
    assert {"contact", "document"}.isdisjoint(FIELDS)  # free-form: RD's own fields


def test_lead_and_deal_names_are_columns_of_the_migrated_tables(database_url):
    """`lead.` and `deal.` name columns of the leads and deals tables the migrations create
    (all of them but the bookkeeping ones, which are not part of an event's lead or deal)."""
    with psycopg.connect(database_url) as conn:
        columns = {table: {name for (name,) in conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = %s",
            (table,))} for table in ("leads", "deals")}
    assert columns["leads"] - FIELDS["lead"] == {"lead_key", "last_event_id", "created_at"}
    assert FIELDS["lead"] <= columns["leads"]
    assert columns["deals"] - FIELDS["deal"] == {"last_event_id"}
    assert FIELDS["deal"] <= columns["deals"]


def test_toml_files_work_too(tmp_path):
    path = tmp_path / "routes.toml"
    path.write_text(f'[sinks.a]\ntype = "dummy"\noptions = {{ path = "{tmp_path / "a"}" }}\n'
                    '[[routes]]\nto = ["a"]\n')
    assert load(path).sinks_for(event("crm-deal-created.json")) == ["a"]


def leadpipe(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "config.cli", *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=60, env={**os.environ, **(env or {})})


def test_routes_check_command():
    ok = leadpipe("routes", "check", str(EXAMPLE))
    assert ok.returncode == 0, ok.stderr
    assert "OK: 2 sink(s), 3 route(s)" in ok.stdout


def test_routes_check_command_refuses_a_bad_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"sinks": {"crm": {"type": "crm", "options": {}}}}))
    result = leadpipe("routes", "check", str(bad))
    assert result.returncode == 2
    assert "crm" in result.stderr and "base_url" in result.stderr
    assert "Traceback" not in result.stderr


def test_routes_explain_says_which_sinks_and_why():
    result = leadpipe("routes", "explain", str(FIXTURES / "crm-deal-updated-won.json"),
                      "--routes", str(EXAMPLE))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "route 'every lead and deal to the CRM' -> crm: MATCH" in out
    assert "route 'new opportunities to sales' -> sales-email: no match" in out
    assert ("event type crm_deal_updated is not in ['WEBHOOK.MARKED_OPPORTUNITY']" in out)
    assert "route 'won deals to sales' -> sales-email: MATCH" in out
    assert "`deal.status in [won]` holds: deal.status is 'won'" in out
    assert out.strip().endswith("=> sinks: postgres, crm, sales-email")


def test_a_worker_with_a_bad_routing_file_does_not_start(settings, tmp_path):
    bad = tmp_path / "routes.yaml"
    bad.write_text(yaml.safe_dump({"sinks": {"crm": {"type": "crm", "options": {
        "base_url": "https://crm.example", "auth_value": "x", "colour": "red"}}}}))
    result = leadpipe("worker", env=settings.with_(routes_file=str(bad)).to_env())
    assert result.returncode == 2
    assert "sink 'crm'" in result.stderr and "option 'colour'" in result.stderr
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text(yaml.safe_dump({"sinks": {"x": {"type": "carrier-pigeon"}}}))
    result = leadpipe("worker", env=settings.with_(routes_file=str(unknown)).to_env())
    assert result.returncode == 2 and "unknown sink type 'carrier-pigeon'" in result.stderr
