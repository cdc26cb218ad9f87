"""The webhook sink against a real local receiver that verifies Standard Webhooks signatures."""

from __future__ import annotations

import base64
import itertools
import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from ingest.queue import Entry
from sinks.base import PermanentSinkError, RetryableSinkError
from sinks.registry import SinkConfigError, build, load_options, sink_class
from sinks.webhook import WebhookSink
from tests.conftest import fixture_bytes
from tests.sinks.test_http import (
    STATUS_LINE_DRIP,
    Dripper,
    TLSServer,
    certificate_for,
    netrc_default,
    slow_dns,
    trust,
)
from tests.support.dns import FakeDNS, connected, internal_listener
from tests.support.http_server import HttpServer, Reply
from workers.events import Event
from workers.normalize import normalize

_ids = itertools.count()
SECRET = "whsec_" + base64.b64encode(b"leadpipe-test-signing-key-0123456789").decode()
OTHER_SECRET = "whsec_" + base64.b64encode(b"some-other-signing-key-0123456789ab").decode()


def events(body: dict | bytes, hint: str | None = None) -> list[Event]:
    n = next(_ids)
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    out = normalize(Entry(f"{n}-0", f"ev-{n}", 1_700_000_000_000 + n, raw, hint))
    assert all(isinstance(item, Event) for item in out), out
    return out  # type: ignore[return-value]


def event(body: dict | bytes) -> Event:
    (only,) = events(body)
    return only


@pytest.fixture
def server() -> Iterator[HttpServer]:
    with HttpServer() as srv:
        yield srv


@pytest.fixture
def make_sink(server: HttpServer) -> Iterator[Any]:
    sinks: list[WebhookSink] = []

    def make(**options: Any) -> WebhookSink:
        sink = build("hook-test", "webhook",
                     {"url": server.url + "/hooks/leadpipe?k=1", "secret": SECRET, **options})
        assert isinstance(sink, WebhookSink)
        sinks.append(sink)
        return sink

    yield make
    for sink in sinks:
        sink.close()


def test_registry_knows_webhook():
    assert sink_class("webhook") is WebhookSink


def test_receiver_verifies_the_signature_and_reads_the_event(server, make_sink):
    raw = fixture_bytes("mkt-v2-converted.json")
    ev = event(raw)
    before = int(time.time())
    make_sink().deliver(ev)
    (got,) = server.requests
    assert (got.method, got.path) == ("POST", "/hooks/leadpipe?k=1")
    assert got.header("Content-Type") == "application/json"
    assert before <= int(got.header("webhook-timestamp")) <= time.time()
    assert got.header("webhook-signature").startswith("v1,")
    received = Webhook(SECRET).verify(got.body, got.headers)
    assert received == {"event_type": "WEBHOOK.CONVERTED", "event_id": ev.id,
                        "occurred_at": "2018-03-13T14:07:04.254000-03:00",
                        "payload": json.loads(raw)}
    assert got.body.startswith(
        b'{"event_type":"WEBHOOK.CONVERTED","event_id":"' + ev.id.encode()
        + b'","occurred_at":"2018-03-13T14:07:04.254000-03:00","payload":{"event_type":')
    assert "Florianópolis".encode() in got.body  # UTF-8, not \u escapes


def test_a_wrong_secret_or_a_changed_body_fails_verification(server, make_sink):
    make_sink().deliver(event(fixture_bytes("crm-deal-created.json")))
    (got,) = server.requests
    with pytest.raises(WebhookVerificationError):
        Webhook(OTHER_SECRET).verify(got.body, got.headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(got.body.replace(b"ongoing", b"won"), got.headers)


def test_redelivery_carries_the_same_webhook_id(server, make_sink):
    sink = make_sink()
    body = fixture_bytes("crm-deal-updated-won.json")
    sink.deliver(event(body))
    sink.deliver(event(body))  # the same RD event again: same dedup key
    sink.deliver(event(fixture_bytes("crm-deal-created.json")))
    first, again, other = (r.header("webhook-id") for r in server.requests)
    assert first == again != other
    assert first.startswith("evt_") and len(first) == 36
    for got in server.requests:
        Webhook(SECRET).verify(got.body, got.headers)


def test_each_lead_of_a_legacy_body_is_its_own_event(server, make_sink):
    (lead,) = orjson.loads(fixture_bytes("legacy-leads-full.json"))["leads"]
    other = {**lead, "uuid": "another-uuid", "id": "999", "email": "other@example.com"}
    sink = make_sink()
    evs = events({"leads": [lead, other]})
    for ev in evs:
        sink.deliver(ev)
    received = [Webhook(SECRET).verify(r.body, r.headers) for r in server.requests]
    assert [r["payload"] for r in received] == [{"leads": [lead]}, {"leads": [other]}]
    assert [r["event_id"] for r in received] == [evs[0].id, evs[0].id + "-1"]
    assert len({r.header("webhook-id") for r in server.requests}) == 2


def test_static_headers_are_sent_but_cannot_replace_the_signature(server, make_sink):
    make_sink(headers={"X-Tenant": "acme"}).deliver(event(fixture_bytes("mkt-v2-converted.json")))
    assert server.requests[0].header("X-Tenant") == "acme"
    with pytest.raises(SinkConfigError, match="headers"):
        load_options("hook-x", "webhook", {"url": server.url, "secret": SECRET,
                                           "headers": {"webhook-signature": "v1,forged"}})


# -- outcomes ----------------------------------------------------------------------------------


def test_410_gone_is_permanent(server, make_sink):
    server.script(410)
    with pytest.raises(PermanentSinkError) as caught:
        make_sink().deliver(event(fixture_bytes("mkt-v2-converted.json")))
    assert caught.value.status == 410


@pytest.mark.parametrize("status", [301, 400, 404, 410])
def test_with_retry_any_status_every_answer_but_a_2xx_is_retryable(server, make_sink, status):
    server.script(status)  # RD's rule, which subscriptions follow
    with pytest.raises(RetryableSinkError) as caught:
        make_sink(retry_any_status=True).deliver(event(fixture_bytes("mkt-v2-converted.json")))
    assert caught.value.status == status and caught.value.retry_after is None


def test_503_with_retry_after_is_retryable(server, make_sink):
    server.script(Reply(503, headers={"Retry-After": "7"}))
    with pytest.raises(RetryableSinkError) as caught:
        make_sink().deliver(event(fixture_bytes("mkt-v2-converted.json")))
    assert (caught.value.status, caught.value.retry_after) == (503, 7)
    assert len(server.requests) == 1


def test_refused_and_slow_receivers_are_retryable(server, make_sink):
    ev = event(fixture_bytes("mkt-v2-converted.json"))
    server.script(Reply(200, delay=3))
    started = time.monotonic()
    with pytest.raises(RetryableSinkError):
        make_sink(timeout=0.3).deliver(ev)
    assert time.monotonic() - started < 2
    sink = make_sink()
    server.stop()
    with pytest.raises(RetryableSinkError) as caught:
        sink.deliver(ev)
    assert caught.value.status is None


# -- options -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("options", "option"), [
    ({"secret": SECRET}, "url"),
    ({"url": "not a url", "secret": SECRET}, "url"),
    ({"url": "ftp://hooks.example.com", "secret": SECRET}, "url"),
    ({"url": "https://hooks.example.com"}, "secret"),
    ({"url": "https://hooks.example.com", "secret": "plain-password"}, "secret"),
    ({"url": "https://hooks.example.com", "secret": "whsec_not*base64!"}, "secret"),
    ({"url": "https://hooks.example.com", "secret": "whsec_" + base64.b64encode(b"short").decode()},
     "secret"),
    ({"url": "https://hooks.example.com", "secret": SECRET, "timeout": -1}, "timeout"),
    ({"url": "https://hooks.example.com", "secret": SECRET, "header": {}}, "header"),
    ({"url": "https://hooks.example.com", "secret": SECRET, "headers": {"X-A": "a\nb"}},
     "headers"),
])
def test_bad_options_name_the_sink_and_the_option(options, option):
    with pytest.raises(SinkConfigError) as caught:
        load_options("hook-x", "webhook", options)
    text = str(caught.value)
    assert text.startswith("sink 'hook-x' (type webhook): ")
    assert f"option '{option}" in text, text
    secret = options.get("secret", "")
    assert not secret or secret[6:] not in text


def test_defaults():
    loaded = load_options("hook-x", "webhook", {"url": "https://hooks.example.com/x",
                                                "secret": SECRET})
    assert (loaded["timeout"], loaded["headers"], loaded["retry_any_status"]) == (5.0, {}, False)


# -- RD's body, secret rotation, the SSRF re-check (what subscriptions use) --------------------


def test_rd_body_option_sends_rds_own_shape_with_the_relations_asked_for(server, make_sink):
    raw = fixture_bytes("mkt-v2-converted.json")
    make_sink(body="rd", include_relations=["COMPANY"]).deliver(event(raw))
    (got,) = server.requests
    expected = json.loads(raw)
    del expected["contact"]["funnel"]
    assert Webhook(SECRET).verify(got.body, got.headers) == expected


def test_during_the_grace_period_both_secrets_sign(server, make_sink):
    from datetime import UTC, datetime, timedelta

    soon = datetime.now(UTC) + timedelta(hours=1)
    make_sink(secret=OTHER_SECRET, previous_secret=SECRET,
              previous_secret_expires_at=soon.isoformat()).deliver(
        event(fixture_bytes("crm-deal-created.json")))
    (got,) = server.requests
    assert len(got.header("webhook-signature").split(" ")) == 2
    Webhook(SECRET).verify(got.body, got.headers)  # a receiver not yet switched
    Webhook(OTHER_SECRET).verify(got.body, got.headers)  # a receiver already switched


def test_after_the_grace_period_only_the_new_secret_signs(server, make_sink):
    from datetime import UTC, datetime, timedelta

    past = datetime.now(UTC) - timedelta(seconds=1)
    make_sink(secret=OTHER_SECRET, previous_secret=SECRET,
              previous_secret_expires_at=past.isoformat()).deliver(
        event(fixture_bytes("crm-deal-created.json")))
    (got,) = server.requests
    assert " " not in got.header("webhook-signature")
    Webhook(OTHER_SECRET).verify(got.body, got.headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(got.body, got.headers)


def test_the_ssrf_guard_is_checked_again_before_each_request(server, make_sink):
    with pytest.raises(PermanentSinkError, match="loopback"):
        make_sink(ssrf_allow=[]).deliver(event(fixture_bytes("crm-deal-created.json")))
    assert server.requests == []  # refused before connecting
    make_sink(ssrf_allow=["127.0.0.1"]).deliver(event(fixture_bytes("crm-deal-created.json")))
    assert len(server.requests) == 1


@pytest.fixture
def internal() -> Iterator[socket.socket]:
    with internal_listener() as listener:
        yield listener


def test_a_delivery_connects_to_the_address_it_checked(server, make_sink, internal, monkeypatch):
    # DNS rebinding: rebind.test answers the admitted 127.0.0.1 to the check, then the internal
    # 127.0.0.2 to whoever asks again (TTL 0)
    dns = FakeDNS(monkeypatch, {"rebind.test": ["127.0.0.1", "127.0.0.2"]})
    internal_port = internal.getsockname()[1]
    with HttpServer(internal_port) as srv:  # the admitted address, same port as the internal one
        sink = make_sink(url=f"http://rebind.test:{internal_port}/hook", ssrf_allow=["127.0.0.1"],
                         timeout=2)
        sink.deliver(event(fixture_bytes("crm-deal-created.json")))
        (got,) = srv.requests
    assert dns.lookups == ["rebind.test"]  # resolved once, for the check
    assert got.path == "/hook" and got.header("Host") == f"rebind.test:{internal_port}"
    assert not connected(internal)
    with pytest.raises(PermanentSinkError, match=r"rebind\.test resolves to a loopback.*"
                                                 r"\(rebind\.test resolved to 127\.0\.0\.2\)"):
        sink.deliver(event(fixture_bytes("crm-deal-created.json")))  # checked again: refused
    assert not connected(internal)


@pytest.mark.parametrize("failure", [
    socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution"),
    socket.gaierror(socket.EAI_NONAME, "Name or service not known"),
])
def test_a_host_that_does_not_resolve_now_is_retried_not_dead_lettered(make_sink, monkeypatch,
                                                                         failure):
    """A resolver's bad moment (or a name that lapsed for a while) is the subscriber's outage:
    the retry rounds decide, as for a refused connection; only a non-public address is final."""
    FakeDNS(monkeypatch, {"hooks.example": failure})
    sink = make_sink(url="https://hooks.example/rd", ssrf_allow=[], timeout=2)
    with pytest.raises(RetryableSinkError, match="hooks.example could not be resolved"):
        sink.deliver(event(fixture_bytes("crm-deal-created.json")))


def test_a_unicode_host_is_checked_under_the_name_it_is_delivered_to(make_sink, internal,
                                                                     monkeypatch):
    # getaddrinfo's IDNA 2003 makes strasse.test of the text; requests calls xn--strae-oqa.test
    port = internal.getsockname()[1]
    FakeDNS(monkeypatch, {"strasse.test": "127.0.0.1", "xn--strae-oqa.test": "127.0.0.2"})
    with HttpServer(port) as srv:
        sink = make_sink(url=f"http://straße.test:{port}/hook", ssrf_allow=["127.0.0.1"],
                         timeout=2)
        with pytest.raises(PermanentSinkError,
                           match=r"xn--strae-oqa\.test resolved to 127\.0\.0\.2"):
            sink.deliver(event(fixture_bytes("crm-deal-created.json")))
        assert srv.requests == []
    assert not connected(internal)


def test_a_unicode_host_is_delivered_to_its_idna_2008_name(make_sink, monkeypatch):
    FakeDNS(monkeypatch, {"xn--strae-oqa.test": "127.0.0.1"})
    with HttpServer() as srv:
        make_sink(url=f"http://straße.test:{srv.port}/hook", ssrf_allow=["127.0.0.1"]).deliver(
            event(fixture_bytes("crm-deal-created.json")))
        (got,) = srv.requests
    assert got.header("Host") == f"xn--strae-oqa.test:{srv.port}"


def test_the_address_check_and_the_request_share_one_timeout(server, make_sink, monkeypatch):
    # the lookup took 0.5 s of 1: a receiver that answers 0.8 s later is too late
    slow_dns(monkeypatch, "hooks.test", 0.5)
    server.script(Reply(200, delay=0.8))
    sink = make_sink(url=f"http://hooks.test:{server.port}/hook", ssrf_allow=["127.0.0.1"],
                     timeout=1.0)
    started = time.monotonic()
    with pytest.raises(RetryableSinkError, match="no answer within 1 s"):
        sink.deliver(event(fixture_bytes("crm-deal-created.json")))
    assert time.monotonic() - started < 1.4


def test_an_address_check_that_outlasts_the_timeout_is_a_timeout(server, make_sink,
                                                                 monkeypatch):
    slow_dns(monkeypatch, "hooks.test", 3.0)
    sink = make_sink(url=f"http://hooks.test:{server.port}/hook", ssrf_allow=["127.0.0.1"],
                     timeout=0.5)
    started = time.monotonic()
    with pytest.raises(RetryableSinkError, match=r"no answer within 0\.5 s \(resolving"):
        sink.deliver(event(fixture_bytes("crm-deal-created.json")))
    assert time.monotonic() - started < 2.0  # not the lookup's 3 s
    assert server.requests == []


def test_no_credentials_from_netrc_reach_the_receiver(server, make_sink, tmp_path,
                                                      monkeypatch):
    netrc_default(tmp_path, monkeypatch)  # a `default` entry: credentials for any host
    for options in ({}, {"ssrf_allow": ["127.0.0.1"]}):  # plain and pinned sessions
        make_sink(**options).deliver(event(fixture_bytes("crm-deal-created.json")))
    assert [r.header("Authorization") for r in server.requests] == [None, None]


def test_a_dripping_receiver_is_cut_at_the_timeout_as_a_whole(make_sink):
    with Dripper() as drip:
        for options in ({}, {"ssrf_allow": ["127.0.0.1"]}):  # plain and pinned sessions
            drip.script.append(STATUS_LINE_DRIP)
            sink = make_sink(url=f"http://127.0.0.1:{drip.port}/hook", timeout=0.5, **options)
            started = time.monotonic()
            with pytest.raises(RetryableSinkError, match="no answer within 0.5 s"):
                sink.deliver(event(fixture_bytes("crm-deal-created.json")))
            assert time.monotonic() - started < 1.5


def test_https_delivery_to_a_checked_address_verifies_the_host_name(make_sink, tmp_path,
                                                                    monkeypatch):
    cert, key = certificate_for(tmp_path, "hooks.example")
    trust(monkeypatch, cert)
    dns = FakeDNS(monkeypatch, {"hooks.example": "127.0.0.1"})
    with TLSServer(cert, key) as srv:
        sink = make_sink(url=f"https://hooks.example:{srv.port}/hook", ssrf_allow=["127.0.0.1"])
        assert sink.deliver(event(fixture_bytes("crm-deal-created.json"))) == 200
        sink.deliver(event(fixture_bytes("crm-deal-created.json")))
    assert srv.seen == [("hooks.example", f"hooks.example:{srv.port}")] * 2
    assert dns.lookups == ["hooks.example"] * 2  # checked before each delivery


def test_a_round_robin_answer_in_another_order_keeps_the_pinned_session(make_sink):
    import socket

    from ingest.ssrf import Target
    from sinks.webhook import _same_place

    one = (socket.AF_INET, ("203.0.113.1", 443))
    two = (socket.AF_INET, ("203.0.113.2", 443))
    first = Target("https://hooks.example/x", "hooks.example", 443, (one, two))
    assert _same_place(Target(first.url, first.host, 443, (two, one)), first)
    assert not _same_place(Target(first.url, first.host, 443, (one,)), first)
    assert not _same_place(Target(first.url, first.host, 443, None), first)
    assert not _same_place(first, None)
