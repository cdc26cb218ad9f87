"""The crm sink against a real local HTTP server: request, exact body, outcomes, options."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from email.utils import formatdate
from typing import Any

import orjson
import pytest

from ingest.queue import Entry
from sinks.base import PermanentSinkError, RetryableSinkError, SinkError
from sinks.crm import CrmSink
from sinks.registry import SinkConfigError, build, load_options, sink_class
from tests.conftest import fixture_bytes
from tests.sinks.test_http import netrc_default, slow_dns
from tests.support.http_server import HttpServer, Reply
from workers.events import Event
from workers.normalize import normalize

_ids = itertools.count()
TOKEN = "Bearer crm-token-123"
V2_UUID = "c2f3d2b3-7250-4d27-97f4-eef38be32f7f"


def event(body: dict | bytes, hint: str | None = None) -> Event:
    """The one event a body normalises to."""
    n = next(_ids)
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    (item,) = normalize(Entry(f"{n}-0", f"ev-{n}", 1_700_000_000_000 + n, raw, hint))
    assert isinstance(item, Event), item
    return item


@pytest.fixture
def server() -> Iterator[HttpServer]:
    with HttpServer() as srv:
        yield srv


@pytest.fixture
def make_sink(server: HttpServer) -> Iterator[Any]:
    sinks: list[CrmSink] = []

    def make(**options: Any) -> CrmSink:
        options = {"base_url": server.url + "/api", "auth_value": TOKEN, **options}
        sink = build("crm-test", "crm", options)
        assert isinstance(sink, CrmSink)
        sinks.append(sink)
        return sink

    yield make
    for sink in sinks:
        sink.close()


# -- the request -------------------------------------------------------------------------------


def test_registry_knows_crm():
    assert sink_class("crm") is CrmSink


def test_v2_lead_is_put_by_uuid_with_the_default_mapping(server, make_sink):
    ev = event(fixture_bytes("mkt-v2-converted.json"))
    make_sink().deliver(ev)
    (got,) = server.requests
    assert got.method == "PUT"
    assert got.path == f"/api/leads/{V2_UUID}"
    assert got.header("Content-Type") == "application/json"
    assert got.header("Authorization") == TOKEN
    assert got.header("Idempotency-Key") == ev.dedup_key == (
        f"mkt:WEBHOOK.CONVERTED:{V2_UUID}:my-event-identifier:2018-03-13T14:07:04.254-03:00")
    assert got.header("X-Leadpipe-Event-Id") == ev.id
    assert got.body == (
        '{"uuid":"c2f3d2b3-7250-4d27-97f4-eef38be32f7f","email":"contact@example.com",'
        '"name":"Contact Name","company":"Company Example 0","job_title":"Developer",'
        '"mobile_phone":"48 30252598","personal_phone":"48 30252598","city":"Florianópolis",'
        '"website":"http://rdstation.com.br","tags":["tag 1","tag 2"],"stage":"Lead",'
        '"opportunity":false,"fit":"0","interest":20,"owner_email":"owner@example.org",'
        '"last_conversion":"my-event-identifier",'
        '"last_conversion_at":"2018-03-13T14:07:04.254000-03:00",'
        '"custom_fields":{"custom_field_example":["Option1","Option2"]},'
        '"updated_at":"2018-03-13T14:07:04.254000-03:00"}').encode()


def test_deal_is_put_by_its_rd_id(server, make_sink):
    ev = event(fixture_bytes("crm-deal-updated-won.json"))
    make_sink().deliver(ev)
    (got,) = server.requests
    assert (got.method, got.path) == ("PUT", "/api/deals/67a1c0f2e4b0a1001a2b3c4d")
    assert got.header("Idempotency-Key") == "crm:0c5b7e7a-3f7d-4c1e-9a55-2f1e8d6b4a10"
    assert got.header("Authorization") == TOKEN
    assert got.body == (
        '{"id":"67a1c0f2e4b0a1001a2b3c4d","name":"Contrato anual - Loja Exemplo",'
        '"status":"won","amount_monthly":"500.0","amount_unique":"1500.0",'
        '"amount_total":"7500.0","rating":4,"stage":"Fechamento","pipeline":"Funil Padrão",'
        '"source":"Prospecção Ativa","campaign":"Páscoa 2025","owner_email":"ana@example.com.br",'
        '"custom_fields":{"Link da Proposta":"https://example.com.br/proposta/123",'
        '"Produto de Interesse":["Plano Anual"]},"prediction_date":"2025-03-31",'
        '"created_at":"2025-02-03T10:12:44.120000-03:00",'
        '"closed_at":"2025-03-12T16:40:05.860000-03:00",'
        '"updated_at":"2025-03-12T19:40:05+00:00"}').encode()


def test_lead_without_uuid_is_addressed_by_legacy_id_else_quoted_email(server, make_sink):
    sink = make_sink()
    sink.deliver(event({"leads": [{"id": "77", "email": "Ana@Example.com"}]}))
    sink.deliver(event({"leads": [{"email": "Ana+x/y@Example.com"}]}))
    assert [r.path for r in server.requests] == ["/api/leads/77",
                                                 "/api/leads/ana%2Bx%2Fy%40example.com"]


def test_mapping_keeps_its_order_and_leaves_out_what_the_event_lacks(server, make_sink):
    sink = make_sink(mapping={"lead": {"stage": "funnel.lifecycle_stage",
                                       "e-mail": "lead.email",
                                       "nickname": "contact.nickname",  # not in the body
                                       "state": "lead.state",  # null in this event
                                       "bio": "contact.bio",
                                       "kind": "event.type"}})
    sink.deliver(event(fixture_bytes("mkt-v2-converted.json")))
    assert server.requests[0].body == (b'{"stage":"Lead","e-mail":"contact@example.com",'
                                       b'"bio":"This is my bio","kind":"WEBHOOK.CONVERTED"}')


def test_paths_and_auth_header_are_options_and_null_path_turns_a_kind_off(server, make_sink):
    sink = make_sink(paths={"lead": "/v2/contacts/"}, auth_header="X-Api-Key",
                     auth_value="k-1")
    sink.deliver(event(fixture_bytes("mkt-v2-converted.json")))
    got = server.requests[0]
    assert got.path == f"/api/v2/contacts/{V2_UUID}"
    assert got.header("X-Api-Key") == "k-1" and got.header("Authorization") is None
    only_leads = make_sink(paths={"deal": None})
    only_leads.deliver(event(fixture_bytes("crm-deal-created.json")))
    assert len(server.requests) == 1


def test_events_without_lead_or_deal_send_nothing(server, make_sink):
    make_sink().deliver(event({"event_name": "crm_organization_created", "transaction_uuid": "t1",
                               "document": {"id": "o1", "name": "Org"}}))
    assert server.requests == []


def test_redelivery_carries_the_same_idempotency_key(server, make_sink):
    sink = make_sink()
    body = fixture_bytes("mkt-v2-marked-opportunity.json")
    sink.deliver(event(body))
    sink.deliver(event(body))
    first, second = server.requests
    assert first.header("Idempotency-Key") == second.header("Idempotency-Key")
    assert first.header("X-Leadpipe-Event-Id") != second.header("X-Leadpipe-Event-Id")
    assert first.body == second.body


@pytest.mark.parametrize("key", [".", "..", "..."])
def test_a_key_of_dots_only_is_refused_not_sent_to_the_collection(server, make_sink, key):
    # URL normalisation drops "." and ".." segments: /api/leads/.. would PUT to /api/
    body = orjson.loads(fixture_bytes("mkt-v2-converted.json"))
    body["contact"]["uuid"] = key
    deal = orjson.loads(fixture_bytes("crm-deal-updated-won.json"))
    deal["document"]["id"] = key
    sink = make_sink()
    for ev in (event(body), event(deal)):
        with pytest.raises(PermanentSinkError, match="only dots") as caught:
            sink.deliver(ev)
        assert caught.value.status is None
    assert server.requests == []


def test_keys_with_dots_among_other_characters_arrive_as_sent(server, make_sink):
    sink = make_sink()
    for key in (".hidden", "a..b", "v1.2."):
        body = orjson.loads(fixture_bytes("mkt-v2-converted.json"))
        body["contact"]["uuid"] = key
        sink.deliver(event(body))
    assert [r.path for r in server.requests] == ["/api/leads/.hidden", "/api/leads/a..b",
                                                 "/api/leads/v1.2."]


def test_an_unsendable_dedup_key_becomes_a_stable_hash(server, make_sink):
    body = orjson.loads(fixture_bytes("mkt-v2-converted.json"))
    body["event_identifier"] = "conversão → página"
    sink = make_sink()
    sink.deliver(event(body))
    sink.deliver(event(body))
    keys = {r.header("Idempotency-Key") for r in server.requests}
    assert len(keys) == 1 and keys.pop().startswith("sha256:")


def test_a_dedup_key_ending_in_a_line_break_is_sent_as_its_hash(server, make_sink):
    # a transaction_uuid is RD's text as sent: one ending in "\n" passed for a plain header
    # value, and requests refused every try of it (retried forever, opening the circuit)
    body = orjson.loads(fixture_bytes("crm-deal-created.json"))
    body["transaction_uuid"] = "tx-1\n"
    make_sink().deliver(event(body))
    [request] = server.requests
    assert request.header("Idempotency-Key").startswith("sha256:")


# -- outcomes ----------------------------------------------------------------------------------


def lead_event() -> Event:
    return event(fixture_bytes("mkt-v2-converted.json"))


def test_503_is_retryable(server, make_sink):
    server.script(503)
    with pytest.raises(RetryableSinkError) as caught:
        make_sink().deliver(lead_event())
    assert caught.value.status == 503 and caught.value.retry_after is None
    assert len(server.requests) == 1  # no retries inside the sink


def test_503_honours_retry_after_seconds(server, make_sink):
    server.script(Reply(503, headers={"Retry-After": "7"}))
    with pytest.raises(RetryableSinkError) as caught:
        make_sink().deliver(lead_event())
    assert caught.value.retry_after == 7


def test_429_honours_retry_after_http_date(server, make_sink):
    server.script(Reply(429, headers={"Retry-After": formatdate(time.time() + 60, usegmt=True)}))
    with pytest.raises(RetryableSinkError) as caught:
        make_sink().deliver(lead_event())
    assert caught.value.status == 429 and 55 <= caught.value.retry_after <= 61


@pytest.mark.parametrize("status", [400, 404, 422, 301, 308, 103])
def test_client_errors_redirects_and_informational_answers_are_permanent(server, make_sink,
                                                                         status):
    server.script(status)
    with pytest.raises(PermanentSinkError) as caught:
        make_sink().deliver(lead_event())
    assert caught.value.status == status


def test_connection_refused_is_retryable(server, make_sink):
    sink = make_sink()
    server.stop()
    with pytest.raises(RetryableSinkError) as caught:
        sink.deliver(lead_event())
    assert caught.value.status is None
    server.start()  # back on the same port: the same sink delivers again
    sink.deliver(lead_event())
    assert len(server.requests) == 1


def test_slow_server_beyond_timeout_is_retryable(server, make_sink):
    server.script(Reply(200, delay=3))
    started = time.monotonic()
    with pytest.raises(RetryableSinkError):
        make_sink(timeout=0.3).deliver(lead_event())
    assert time.monotonic() - started < 2


def test_a_slow_name_lookup_counts_within_the_timeout(server, make_sink, monkeypatch):
    slow_dns(monkeypatch, "crm.test", 3.0)
    sink = make_sink(base_url=f"http://crm.test:{server.port}/api", timeout=0.5)
    started = time.monotonic()
    with pytest.raises(RetryableSinkError, match="no answer within 0.5 s"):
        sink.deliver(lead_event())
    assert time.monotonic() - started < 2.0  # not the lookup's 3 s (slack for a busy machine)
    assert server.requests == []


def test_lookup_and_answer_together_are_bounded_by_the_timeout(server, make_sink, monkeypatch):
    slow_dns(monkeypatch, "crm.test", 0.5)
    server.script(Reply(200, delay=0.8))
    sink = make_sink(base_url=f"http://crm.test:{server.port}/api", timeout=1.0)
    started = time.monotonic()
    with pytest.raises(RetryableSinkError, match="no answer within 1 s"):
        sink.deliver(lead_event())
    assert time.monotonic() - started < 1.4


def test_no_credentials_from_netrc_replace_the_auth_header(server, make_sink, tmp_path,
                                                           monkeypatch):
    netrc_default(tmp_path, monkeypatch)  # a `default` entry: credentials for any host
    make_sink().deliver(lead_event())
    make_sink(auth_header="X-Api-Key", auth_value="k-1").deliver(lead_event())
    configured, other = server.requests
    assert configured.header("Authorization") == TOKEN
    assert other.header("Authorization") is None and other.header("X-Api-Key") == "k-1"


def test_error_messages_carry_no_personal_data(server, make_sink):
    sink = make_sink()
    email_keyed = event({"leads": [{"email": "ana.silva@example.com", "name": "Ana Silva",
                                    "mobile_phone": "+55 48 99999-0000"}]})
    errors: list[Exception] = []
    for reply in (Reply(422, b'{"error":"ana.silva@example.com invalid"}'), Reply(503)):
        server.script(reply)
        with pytest.raises(SinkError) as caught:
            sink.deliver(email_keyed)
        errors.append(caught.value)
    server.stop()
    with pytest.raises(RetryableSinkError) as refused:
        sink.deliver(email_keyed)
    errors.append(refused.value)
    for exc in errors:
        text = str(exc)
        assert "crm-test" in text
        for secret in ("ana", "Silva", "9999", "example.com", TOKEN):
            assert secret not in text, text


# -- options -----------------------------------------------------------------------------------


def options_error(options: dict) -> str:
    with pytest.raises(SinkConfigError) as caught:
        load_options("crm-x", "crm", options)
    return str(caught.value)


def test_defaults():
    loaded = load_options("crm-x", "crm", {"base_url": "https://crm.example.com/api/",
                                           "auth_value": TOKEN})
    assert loaded["base_url"] == "https://crm.example.com/api"
    assert loaded["paths"] == {"lead": "/leads", "deal": "/deals"}
    assert (loaded["auth_header"], loaded["timeout"]) == ("Authorization", 5.0)
    assert loaded["mapping"]["lead"]["email"] == "lead.email"
    assert loaded["mapping"]["lead"]["stage"] == "funnel.lifecycle_stage"
    assert loaded["mapping"]["deal"]["status"] == "deal.status"


@pytest.mark.parametrize(("options", "option"), [
    ({"auth_value": TOKEN}, "base_url"),
    ({"base_url": "not a url", "auth_value": TOKEN}, "base_url"),
    ({"base_url": "ftp://crm.example.com", "auth_value": TOKEN}, "base_url"),
    ({"base_url": "https://crm.example.com/?x=1", "auth_value": TOKEN}, "base_url"),
    ({"base_url": "https://u:p@crm.example.com", "auth_value": TOKEN}, "base_url"),
    ({"base_url": "https://crm.example.com"}, "auth_value"),
    ({"base_url": "https://crm.example.com", "auth_value": TOKEN, "base_ur": "x"}, "base_ur"),
    ({"base_url": "https://crm.example.com", "auth_value": TOKEN, "timeout": 0}, "timeout"),
    ({"base_url": "https://crm.example.com", "auth_value": TOKEN, "auth_header": "Bad Name"},
     "auth_header"),
    ({"base_url": "https://crm.example.com", "auth_value": TOKEN,
      "auth_header": "Idempotency-Key"}, "auth_header"),
    # a YAML block scalar ends in a line break: every request would fail, refused at load
    ({"base_url": "https://crm.example.com", "auth_value": TOKEN + "\n"}, "auth_value"),
    ({"base_url": "https://crm.example.com", "auth_value": TOKEN, "auth_header": "X-Key\n"},
     "auth_header"),
    ({"base_url": "https://crm.example.com", "auth_value": TOKEN, "paths": {"lead": "leads"}},
     "paths.lead"),
    ({"base_url": "https://crm.example.com", "auth_value": TOKEN, "paths": {"contacts": "/c"}},
     "paths.contacts"),
    ({"base_url": "https://crm.example.com", "auth_value": TOKEN,
      "mapping": {"lead": {"email": "lead.emial"}}}, "mapping.lead"),
    ({"base_url": "https://crm.example.com", "auth_value": TOKEN,
      "mapping": {"lead": {"email": "person.email"}}}, "mapping.lead"),
    ({"base_url": "https://crm.example.com", "auth_value": TOKEN, "mapping": {"lead": {}}},
     "mapping.lead"),
])
def test_bad_options_name_the_sink_and_the_option(options, option):
    text = options_error(options)
    assert text.startswith("sink 'crm-x' (type crm): ")
    assert f"option '{option}" in text, text


def test_auth_value_errors_do_not_echo_it():
    text = options_error({"base_url": "https://crm.example.com",
                          "auth_value": "Bearer s3cr3t\r\nX-Evil: 1"})
    assert "auth_value" in text and "s3cr3t" not in text
