"""/integrations/webhooks as RD Station documents it: every operation, error shape and status."""

from __future__ import annotations

import re
import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any

import orjson
import psycopg
import pytest

from config.local import free_port
from config.settings import Settings
from ingest import create_app, ssrf, subscriptions, tokens
from tests.sinks.test_http import STATUS_LINE_DRIP, Dripper
from tests.support.dns import FakeDNS, connected, internal_listener
from tests.support.http_server import HttpServer, Reply

BIG_ACCOUNT = 9007199254740993  # 2^53 + 1: a float would turn it into ...992
MILLIS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
HOOKS = "/integrations/webhooks"


def subscription_settings(settings: Settings, **options: Any) -> Settings:
    return settings.with_(**options)


def subscription_app(settings: Settings):  # type: ignore[no-untyped-def]
    return create_app(settings)


# -- fixtures and helpers ----------------------------------------------------------------------


@pytest.fixture
def api_token(database_url: str) -> str:
    return tokens.create(database_url, "tests")


def api_client(settings: Settings, token: str, **options: Any):  # type: ignore[no-untyped-def]
    """A test client sending `token`, of an app with these subscription options (default:
    the probe off, no allow-list, a platform_account_id beyond 2^53)."""
    options = {"platform_account_id": BIG_ACCOUNT, "subscription_probe": False,
               "ssrf_allow": (), **options}
    client = subscription_app(subscription_settings(settings, **options)).test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {token}"
    return client


@pytest.fixture
def make_client(settings: Settings, api_token: str):  # type: ignore[no-untyped-def]
    return lambda **options: api_client(settings, api_token, **options)


@pytest.fixture
def client(make_client):  # type: ignore[no-untyped-def]
    """Probe off; 93.184.215.14 is a public address literal, so nothing needs DNS."""
    return make_client()


def body(**changes: Any) -> dict[str, Any]:
    data = {"event_type": "WEBHOOK.CONVERTED", "entity_type": "CONTACT",
            "url": "https://93.184.215.14/rd", "http_method": "POST",
            "event_identifiers": ["newsletter"], "include_relations": ["COMPANY"]}
    data.update(changes)
    return {k: v for k, v in data.items() if v is not ...}


def one_error(response, status: int, error_type: str) -> str:  # type: ignore[no-untyped-def]
    """RD's one-error shape; returns the message."""
    assert response.status_code == status, response.data
    assert response.mimetype == "application/json"
    errors = orjson.loads(response.data)["errors"]
    assert set(errors) == {"error_type", "error_message"} and errors["error_type"] == error_type
    assert errors["error_message"]
    return errors["error_message"]


def field_errors(response) -> dict[str, list[str]]:  # type: ignore[no-untyped-def]
    """RD's by-field shape (422): {field: [error_type, ...]}."""
    assert response.status_code == 422, response.data
    errors = orjson.loads(response.data)["errors"]
    out = {}
    for field, found in errors.items():
        assert found and all(set(e) == {"error_type", "error_message"} and e["error_message"]
                             for e in found), found
        out[field] = [e["error_type"] for e in found]
    return out


# -- the five operations -----------------------------------------------------------------------


def test_create_show_list_update_delete(client, db):
    created = client.post(HOOKS, json=body())
    assert created.status_code == 201
    hook = created.get_json()
    assert set(hook) == {"uuid", "event_type", "entity_type", "url", "http_method",
                         "event_identifiers", "include_relations", "created_at", "updated_at",
                         "status", "source", "platform_account_id", "secret"}
    assert hook | body() == hook  # the input comes back as sent
    assert uuid.UUID(hook["uuid"]).version == 4
    assert MILLIS.match(hook["created_at"]) and MILLIS.match(hook["updated_at"])
    assert (hook["status"], hook["source"]) == ("active", "MKT")
    assert re.fullmatch(r"whsec_[A-Za-z0-9+/]{32}", hook["secret"])
    stored = db.execute("SELECT secret, event_identifiers FROM subscriptions").fetchone()
    assert stored == (hook["secret"], ["newsletter"])

    shown = client.get(f"{HOOKS}/{hook['uuid']}")
    assert shown.status_code == 200
    assert shown.get_json() == {k: v for k, v in hook.items() if k != "secret"}
    for path in (HOOKS, HOOKS + "/"):
        listed = client.get(path)
        assert listed.status_code == 200, path
        assert listed.get_json() == {"webhooks": [shown.get_json()]}

    changed = body(event_identifiers=["pricing", "demo"], include_relations=["CONTACT_FUNNEL"],
                   url="https://93.184.215.14/rd/v2")
    updated = client.put(f"{HOOKS}/{hook['uuid']}", json=changed)
    assert updated.status_code == 200
    after = updated.get_json()
    assert "secret" not in after
    assert after | changed == after and after["uuid"] == hook["uuid"]
    assert after["created_at"] == hook["created_at"] and after["updated_at"] >= hook["updated_at"]

    deleted = client.delete(f"{HOOKS}/{hook['uuid']}")
    assert deleted.status_code == 204 and deleted.data == b""
    assert "Content-Type" not in deleted.headers
    one_error(client.get(f"{HOOKS}/{hook['uuid']}"), 404, "RESOURCE_NOT_FOUND")
    one_error(client.delete(f"{HOOKS}/{hook['uuid']}"), 404, "RESOURCE_NOT_FOUND")
    assert client.get(HOOKS).get_json() == {"webhooks": []}


def test_create_with_a_trailing_slash_and_crm_source(client):
    response = client.post(HOOKS + "/", json=body(event_type="crm_deal_updated",
                                                  event_identifiers=..., include_relations=...))
    assert response.status_code == 201
    hook = response.get_json()
    assert hook["source"] == "CRM"
    assert (hook["event_identifiers"], hook["include_relations"]) == ([], [])


def test_platform_account_id_is_exact_in_the_raw_json(client):
    created = client.post(HOOKS, json=body())
    for response in (created, client.get(HOOKS), client.get(f"{HOOKS}/{created.json['uuid']}")):
        assert b'"platform_account_id":9007199254740993' in response.data
        assert float(BIG_ACCOUNT) != BIG_ACCOUNT  # what a float would have done to it


def test_secret_is_shown_on_create_only(client):
    hook = client.post(HOOKS, json=body()).get_json()
    other = client.post(HOOKS, json=body(event_type="WEBHOOK.MARKED_OPPORTUNITY")).get_json()
    assert hook["secret"] != other["secret"]
    assert b"whsec_" not in client.get(HOOKS).data
    assert b"whsec_" not in client.get(f"{HOOKS}/{hook['uuid']}").data
    assert b"whsec_" not in client.put(f"{HOOKS}/{hook['uuid']}", json=body()).data


def test_null_lists_are_empty_and_unknown_fields_are_ignored(client):
    hook = client.post(HOOKS, json=body(event_identifiers=None, include_relations=None,
                                        uuid="not-mine", status="suspended")).get_json()
    assert (hook["event_identifiers"], hook["include_relations"]) == ([], [])
    assert hook["uuid"] != "not-mine" and hook["status"] == "active"
    # a client may PUT back what it listed, read-only fields and all
    listed = client.get(HOOKS).get_json()["webhooks"][0]
    assert client.put(f"{HOOKS}/{hook['uuid']}", json=listed).status_code == 200


def test_put_needs_every_required_field_and_replaces_the_lists(client):
    hook = client.post(HOOKS, json=body()).get_json()
    response = client.put(f"{HOOKS}/{hook['uuid']}", json={"url": hook["url"]})
    assert field_errors(response) == {"event_type": ["CANNOT_BE_NULL"],
                                      "entity_type": ["CANNOT_BE_NULL"],
                                      "http_method": ["CANNOT_BE_NULL"]}
    replaced = client.put(f"{HOOKS}/{hook['uuid']}",
                          json=body(event_identifiers=..., include_relations=...))
    assert replaced.get_json()["event_identifiers"] == []
    assert replaced.get_json()["include_relations"] == []


def test_put_reactivates_a_suspended_subscription(client, db):
    hook = client.post(HOOKS, json=body()).get_json()
    db.execute("UPDATE subscriptions SET status = 'suspended', consecutive_failures = 7, "
               "suspended_at = now(), last_error = 'HTTP 500'")
    assert client.get(f"{HOOKS}/{hook['uuid']}").get_json()["status"] == "suspended"
    assert client.put(f"{HOOKS}/{hook['uuid']}", json=body()).get_json()["status"] == "active"
    # no longer suspended; the last error stays as the history it is
    assert db.execute("SELECT consecutive_failures, suspended_at, last_error FROM subscriptions"
                      ).fetchone() == (0, None, "HTTP 500")


# -- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("changes", "field", "error_type"), [
    ({"url": ...}, "url", "CANNOT_BE_NULL"),
    ({"url": None}, "url", "CANNOT_BE_NULL"),
    ({"url": ""}, "url", "CANNOT_BE_BLANK"),
    ({"url": "   "}, "url", "CANNOT_BE_BLANK"),
    ({"url": 42}, "url", "MUST_BE_STRING"),
    ({"url": "ftp://93.184.215.14/rd"}, "url", "INVALID"),
    ({"url": "not a url"}, "url", "INVALID"),
    ({"url": "https://"}, "url", "INVALID"),
    ({"url": "/relative/path"}, "url", "INVALID"),
    ({"url": "http://93.184.215.14:0/rd"}, "url", "INVALID"),  # port 0 reaches no one
    ({"url": "https://93.184.215.14/" + "a" * 2048}, "url", "TOO_LONG"),
    ({"url": "https://93.184.215.14/a\x00b"}, "url", "INVALID"),
    ({"url": "https://93.184.215.14/a\udc00"}, "url", "INVALID"),
    # 93.184.215.14 as one number: the same endpoint under a second name
    ({"url": "https://1572394766/rd"}, "url", "INVALID"),
    ({"event_type": ...}, "event_type", "CANNOT_BE_NULL"),
    ({"event_type": ""}, "event_type", "CANNOT_BE_BLANK"),
    ({"event_type": "WEBHOOK.UNSUBSCRIBED"}, "event_type", "INCLUSION"),
    ({"event_type": ["WEBHOOK.CONVERTED"]}, "event_type", "MUST_BE_STRING"),
    ({"entity_type": "DEAL"}, "entity_type", "INCLUSION"),
    ({"entity_type": None}, "entity_type", "CANNOT_BE_NULL"),
    ({"http_method": "GET"}, "http_method", "INCLUSION"),
    ({"http_method": 1}, "http_method", "MUST_BE_STRING"),
    ({"event_identifiers": "newsletter"}, "event_identifiers", "MUST_BE_STRING_ARRAY"),
    ({"event_identifiers": ["ok", 7]}, "event_identifiers", "MUST_BE_STRING_ARRAY"),
    ({"event_identifiers": ["ok", None]}, "event_identifiers", "MUST_BE_STRING_ARRAY"),
    ({"event_identifiers": [""]}, "event_identifiers", "CANNOT_BE_BLANK"),
    ({"event_identifiers": ["x" * 256]}, "event_identifiers", "TOO_LONG"),
    ({"event_identifiers": ["a\x00b"]}, "event_identifiers", "INVALID"),  # Postgres text: no NUL
    ({"event_identifiers": ["\ud800"]}, "event_identifiers", "INVALID"),  # a lone surrogate
    ({"event_identifiers": [str(i) for i in range(101)]}, "event_identifiers", "TOO_LONG"),
    ({"include_relations": ["COMPANY", "DEALS"]}, "include_relations", "MUST_BE_VALID_OPTION"),
    ({"include_relations": "COMPANY"}, "include_relations", "MUST_BE_STRING_ARRAY"),
    ({"include_relations": [{"name": "COMPANY"}]}, "include_relations", "MUST_BE_STRING_ARRAY"),
])
def test_invalid_field_is_422_by_field_with_rd_types(client, changes, field, error_type):
    for response in (client.post(HOOKS, json=body(**changes)),
                     client.put(f"{HOOKS}/{_existing(client)}", json=body(**changes))):
        assert field_errors(response) == {field: [error_type]}
    assert len(client.get(HOOKS).get_json()["webhooks"]) == 1  # only _existing's


def _existing(client) -> str:  # type: ignore[no-untyped-def]
    listed = client.get(HOOKS).get_json()["webhooks"]
    if listed:
        return listed[0]["uuid"]
    return client.post(HOOKS, json=body(url="https://93.184.215.14/existing")).get_json()["uuid"]


def test_every_invalid_field_is_reported_at_once(client):
    response = client.post(HOOKS, json={"url": "", "include_relations": ["X"]})
    assert field_errors(response) == {
        "url": ["CANNOT_BE_BLANK"], "event_type": ["CANNOT_BE_NULL"],
        "entity_type": ["CANNOT_BE_NULL"], "http_method": ["CANNOT_BE_NULL"],
        "include_relations": ["MUST_BE_VALID_OPTION"]}
    message = orjson.loads(response.data)["errors"]["include_relations"][0]["error_message"]
    assert "COMPANY" in message and "CONTACT_FUNNEL" in message


def test_same_url_twice_for_one_event_type_is_taken(client):
    first = client.post(HOOKS, json=body()).get_json()
    assert field_errors(client.post(HOOKS, json=body())) == {"url": ["TAKEN"]}
    other_event = client.post(HOOKS, json=body(event_type="WEBHOOK.MARKED_OPPORTUNITY"))
    assert other_event.status_code == 201
    # moving the second onto the first's event_type collides too; re-sending its own data doesn't
    second = other_event.get_json()["uuid"]
    assert field_errors(client.put(f"{HOOKS}/{second}", json=body())) == {"url": ["TAKEN"]}
    assert client.put(f"{HOOKS}/{first['uuid']}", json=body()).status_code == 200
    assert len(client.get(HOOKS).get_json()["webhooks"]) == 2


def test_one_endpoint_written_another_way_is_taken_too(client, db):
    """Case of scheme and host, the default port, a fragment, an empty query: the same endpoint,
    which two subscriptions would each send every event to. The URL is kept as given."""
    first = client.post(HOOKS, json=body(url="https://93.184.215.14/rd"))
    assert first.status_code == 201
    for same in ("HTTPS://93.184.215.14/rd", "https://93.184.215.14:443/rd",
                 "https://93.184.215.14/rd#x", "https://93.184.215.14/rd?"):
        assert field_errors(client.post(HOOKS, json=body(url=same))) == {"url": ["TAKEN"]}, same
    for other in ("https://93.184.215.14/RD", "https://93.184.215.14:8443/rd",
                  "http://93.184.215.14/rd", "https://93.184.215.14/rd?x=1",
                  "https://tenant-a:pw@93.184.215.14/rd"):  # Basic auth: another tenant
        created = client.post(HOOKS, json=body(url=other))
        assert created.status_code == 201 and created.get_json()["url"] == other
    moved = client.post(HOOKS, json=body(url="https://93.184.215.14/moved")).get_json()["uuid"]
    assert field_errors(client.put(f"{HOOKS}/{moved}", json=body(
        url="https://93.184.215.14:443/rd#y"))) == {"url": ["TAKEN"]}
    assert db.execute("SELECT count(*) FROM subscriptions").fetchone() == (7,)
    # a URL the API takes whose key, percent-encoded, is past what one index entry can hold
    long = "https://93.184.215.14/" + "字" * 900
    assert client.post(HOOKS, json=body(url=long)).status_code == 201
    assert field_errors(client.post(HOOKS, json=body(url=long + "#x"))) == {"url": ["TAKEN"]}


def test_two_subscriptions_of_one_endpoint_made_before_keys_both_still_work(client, db,
                                                                             database_url):
    """Migration 0008 keeps both; each can still be PUT with its own data (a suspended one
    re-activated), and deleting the first frees the endpoint for no one else but it."""
    import sqlalchemy
    from alembic import command

    from sinks.db import _alembic_config, _sqlalchemy_url, migrate

    engine = sqlalchemy.create_engine(_sqlalchemy_url(database_url),
                                      poolclass=sqlalchemy.NullPool)
    with engine.begin() as conn:
        command.downgrade(_alembic_config(conn), "0007")
    engine.dispose()
    for n, url in enumerate(("https://93.184.215.14/rd", "HTTPS://93.184.215.14:443/rd")):
        db.execute("INSERT INTO subscriptions (uuid, event_type, entity_type, url, http_method, "
                   "source, secret, status, created_at) VALUES (%s, 'WEBHOOK.CONVERTED', "
                   "'CONTACT', %s, 'POST', 'MKT', 'whsec_x', 'suspended', "
                   "now() + make_interval(secs => %s))",
                   (f"00000000-0000-4000-8000-00000000000{n}", url, n))
    migrate(database_url)
    for n, url in enumerate(("https://93.184.215.14/rd", "HTTPS://93.184.215.14:443/rd")):
        again = client.put(f"{HOOKS}/00000000-0000-4000-8000-00000000000{n}",
                           json=body(url=url, event_identifiers=[], include_relations=[]))
        assert again.status_code == 200, again.data
        assert again.get_json()["status"] == "active"
    assert field_errors(client.post(HOOKS, json=body(url="https://93.184.215.14/rd#3"))) == {
        "url": ["TAKEN"]}


def test_include_relations_is_a_set(client):
    created = client.post(HOOKS, json=body(include_relations=["COMPANY", "CONTACT_FUNNEL",
                                                              "COMPANY"]))
    assert created.status_code == 201
    assert created.get_json()["include_relations"] == ["COMPANY", "CONTACT_FUNNEL"]


@pytest.mark.parametrize(("data", "content_type", "status", "error_type"), [
    (b"{not json", "application/json", 400, "BAD_REQUEST"),
    (b"", "application/json", 400, "BAD_REQUEST"),
    (b"[]", "application/json", 400, "BAD_REQUEST"),
    (b'"text"', "application/json", 400, "BAD_REQUEST"),
    (b"\xff\xfe", "application/json", 400, "BAD_REQUEST"),
    (orjson.dumps(body()), "text/plain", 415, "UNSUPPORTED_MEDIA_TYPE"),
    (orjson.dumps(body()), "application/x-www-form-urlencoded", 415, "UNSUPPORTED_MEDIA_TYPE"),
])
def test_malformed_bodies(client, data, content_type, status, error_type):
    hook = client.post(HOOKS, json=body(url="https://93.184.215.14/existing")).get_json()
    one_error(client.post(HOOKS, data=data, content_type=content_type), status, error_type)
    one_error(client.put(f"{HOOKS}/{hook['uuid']}", data=data, content_type=content_type),
              status, error_type)


def test_a_body_over_max_body_bytes_is_413(make_client):
    client = make_client(max_body_bytes=300)
    assert client.post(HOOKS, json=body()).status_code == 201
    large = body(event_type="crm_deal_created", event_identifiers=["x" * 250])
    one_error(client.post(HOOKS, json=large), 413, "PAYLOAD_TOO_LARGE")


def test_json_with_a_charset_or_a_vendor_type_is_json(client):
    response = client.post(HOOKS, data=orjson.dumps(body()),
                           content_type="application/json; charset=utf-8")
    assert response.status_code == 201
    response = client.post(HOOKS, data=orjson.dumps(body(event_type="crm_deal_created")),
                           content_type="application/vnd.api+json")
    assert response.status_code == 201


UNKNOWN = "5f0c1d2e-0000-4000-8000-000000000404"  # no subscription has it (a fixed id: the
# parameters are the same wherever the suite is collected)


@pytest.mark.parametrize("key", [UNKNOWN, "not-a-uuid", "1"])
def test_unknown_uuid_is_404_resource_not_found(client, key):
    one_error(client.get(f"{HOOKS}/{key}"), 404, "RESOURCE_NOT_FOUND")
    one_error(client.put(f"{HOOKS}/{key}", json=body()), 404, "RESOURCE_NOT_FOUND")
    one_error(client.delete(f"{HOOKS}/{key}"), 404, "RESOURCE_NOT_FOUND")


REQUESTS = [("GET", HOOKS), ("GET", HOOKS + "/"), ("POST", HOOKS),
            ("GET", f"{HOOKS}/{UNKNOWN}"), ("PUT", f"{HOOKS}/{UNKNOWN}"),
            ("DELETE", f"{HOOKS}/{UNKNOWN}"),
            ("POST", f"{HOOKS}/{UNKNOWN}/secret/rotate"), ("GET", "/openapi.json")]


@pytest.mark.parametrize(("authorization", "error"), [
    (None, None),
    ("Bearer ", None),
    ("Bearer lp_wrong-token-0123456789abcdefghijk", "invalid_token"),
    ("Basic dXNlcjpwYXNz", None),
    ("test-token-0123456789", None),  # an ingest token is not an API token
])
def test_every_route_needs_an_api_token(make_client, authorization, error, db):
    client = make_client()
    if authorization is None:
        del client.environ_base["HTTP_AUTHORIZATION"]
    else:
        client.environ_base["HTTP_AUTHORIZATION"] = authorization
    for method, path in REQUESTS:
        response = client.open(path, method=method, json=body())
        assert one_error(response, 401, "UNAUTHORIZED") == "Invalid token.", (method, path)
        challenge = response.headers["WWW-Authenticate"]
        assert challenge.startswith('Bearer realm="leadpipe"')
        assert ("error=" in challenge) == (error is not None)
    assert db.execute("SELECT count(*) FROM subscriptions").fetchone() == (0,)


def test_the_route_table_has_no_unauthenticated_subscription_route(make_client):
    client = make_client()
    client.environ_base.pop("HTTP_AUTHORIZATION")
    rules = [r for r in client.application.url_map.iter_rules()
             if r.endpoint.startswith(("subscriptions.", "openapi."))]
    assert len(rules) == 7
    for rule in rules:
        path = rule.rule.replace("<webhook_uuid>", str(uuid.uuid4()))
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            assert client.open(path, method=method).status_code == 401, (method, path)


def test_database_down_is_503(settings, api_token):
    down = settings.with_(database_url=f"postgresql://leadpipe@127.0.0.1:{free_port()}/none")
    client = subscription_app(subscription_settings(down, subscription_probe=False)).test_client()
    response = client.get(HOOKS, headers={"Authorization": f"Bearer {api_token}"})
    one_error(response, 503, "SERVICE_UNAVAILABLE")
    assert response.headers["Retry-After"]


# -- the probe (a real HTTP server on 127.0.0.1) ----------------------------------------------


@pytest.fixture
def subscriber():  # type: ignore[no-untyped-def]
    with HttpServer() as server:
        yield server


@pytest.fixture
def probing(make_client):  # type: ignore[no-untyped-def]
    return make_client(subscription_probe=True, ssrf_allow=("127.0.0.1",))


def test_probe_answered_2xx_creates(probing, subscriber):
    subscriber.set_default(204)
    response = probing.post(HOOKS, json=body(url=subscriber.url + "/rd?token=abc"))
    assert response.status_code == 201
    (request,) = subscriber.requests
    assert (request.method, request.path, request.body) == ("POST", "/rd?token=abc", b"{}")
    assert request.header("Content-Type") == "application/json"


@pytest.mark.parametrize("reply", [500, 404, 301, Reply(401, b'{"error": "no"}')])
def test_probe_not_2xx_refuses_with_401(probing, subscriber, reply, db):
    subscriber.set_default(reply)
    response = probing.post(HOOKS, json=body(url=subscriber.url + "/rd"))
    message = one_error(response, 401, "UNAUTHORIZED")
    status = reply if isinstance(reply, int) else reply.status
    assert str(status) in message and "2xx" in message
    assert "WWW-Authenticate" not in response.headers  # not a token problem
    assert len(subscriber.requests) == 1  # a redirect is not followed
    assert db.execute("SELECT count(*) FROM subscriptions").fetchone() == (0,)


def test_probe_of_a_closed_port_refuses(probing):
    url = f"http://127.0.0.1:{free_port()}/rd"
    assert "could not be reached" in one_error(probing.post(HOOKS, json=body(url=url)), 401,
                                                "UNAUTHORIZED")


def test_probe_gives_up_after_its_timeout(subscriber):
    subscriber.set_default(Reply(200, delay=3))
    assert subscriptions.probe(subscriber.url, timeout=0.5) == "did not answer within 0.5 s"
    assert subscriptions.probe(subscriber.url + "/x", timeout=5.0) is None


def test_probe_deadline_covers_the_whole_answer_not_each_read():
    # one byte every 0.1 s: each read is quick, the status line takes about 6 s
    with Dripper(STATUS_LINE_DRIP) as drip:
        started = time.monotonic()
        assert subscriptions.probe(f"http://127.0.0.1:{drip.port}/rd",
                                   timeout=0.5) == "did not answer within 0.5 s"
        assert time.monotonic() - started < 1.5


def test_a_dripping_url_holds_the_api_thread_no_longer_than_the_probe_limit(probing):
    slow = [(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX-Pad: " + b"a" * 30 + b"\r\n\r\n", 0.2)]
    with Dripper(slow) as drip:  # about 13 s byte by byte
        started = time.monotonic()
        response = probing.post(HOOKS, json=body(url=f"http://127.0.0.1:{drip.port}/rd"))
        elapsed = time.monotonic() - started
    assert "did not answer within 5 s" in one_error(response, 401, "UNAUTHORIZED")
    assert subscriptions.PROBE_TIMEOUT <= elapsed < subscriptions.PROBE_TIMEOUT + 2


def test_update_probes_only_a_new_url(probing, subscriber):
    hook = probing.post(HOOKS, json=body(url=subscriber.url + "/a")).get_json()
    subscriber.clear().set_default(500)
    same = probing.put(f"{HOOKS}/{hook['uuid']}", json=body(url=subscriber.url + "/a",
                                                           event_identifiers=["other"]))
    assert same.status_code == 200 and subscriber.requests == []
    moved = probing.put(f"{HOOKS}/{hook['uuid']}", json=body(url=subscriber.url + "/b"))
    one_error(moved, 401, "UNAUTHORIZED")
    assert [r.path for r in subscriber.requests] == ["/b"]
    assert probing.get(f"{HOOKS}/{hook['uuid']}").get_json()["url"] == subscriber.url + "/a"
    subscriber.set_default(200)
    moved = probing.put(f"{HOOKS}/{hook['uuid']}", json=body(url=subscriber.url + "/b"))
    assert moved.status_code == 200 and moved.get_json()["url"] == subscriber.url + "/b"


def test_taken_is_checked_before_probing(probing, subscriber):
    probing.post(HOOKS, json=body(url=subscriber.url + "/a"))
    subscriber.clear()
    assert field_errors(probing.post(HOOKS, json=body(url=subscriber.url + "/a"))) == {
        "url": ["TAKEN"]}
    assert subscriber.requests == []


# -- SSRF guard --------------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "words"), [
    ("http://169.254.169.254/latest/meta-data/", "metadata"),
    ("http://10.0.0.1/hook", "private"),
    ("http://localhost:8080/hook", "loopback"),
    ("http://127.0.0.1/hook", "loopback"),
    ("http://[::1]:8080/hook", "loopback"),
    ("http://0.0.0.0/hook", "unspecified"),
    ("http://172.16.3.4/hook", "private"),
    ("http://192.168.0.10/hook", "private"),
    ("http://[fd12:3456::1]/hook", "unique-local"),
    ("http://[fe80::1]/hook", "link-local"),
    ("http://[::ffff:a9fe:a9fe]/hook", "metadata"),  # 169.254.169.254 mapped into IPv6
    ("http://224.0.0.251/hook", "multicast"),
    ("http://240.0.0.1/hook", "reserved"),
    ("http://100.64.0.1/hook", "not a public address"),
    ("http://no-such-host.invalid/hook", "could not be resolved"),
])
def test_ssrf_guard_refuses_non_public_addresses(make_client, url, words, db):
    existing = _existing(make_client())
    # the probe is on: a 422 (not a 401 from a probe that failed) shows the guard came first
    client = make_client(subscription_probe=True)
    for response in (client.post(HOOKS, json=body(url=url)),
                     client.put(f"{HOOKS}/{existing}", json=body(url=url))):
        assert field_errors(response) == {"url": ["INVALID"]}
        message = orjson.loads(response.data)["errors"]["url"][0]["error_message"]
        assert words in message, message
    assert db.execute("SELECT count(*) FROM subscriptions").fetchone() == (1,)


def test_ssrf_message_says_what_and_how_to_admit_it(client):
    response = client.post(HOOKS, json=body(url="http://169.254.169.254/latest/meta-data/"))
    message = orjson.loads(response.data)["errors"]["url"][0]["error_message"]
    assert message.startswith("169.254.169.254 is the cloud metadata service")
    assert "LEADPIPE_SSRF_ALLOW" in message


def test_ssrf_allow_list_admits_networks_and_host_names(make_client):
    client = make_client(ssrf_allow=("10.0.0.0/8", "127.0.0.1", "hooks.internal", "::1"))
    for url in ("http://10.1.2.3/a", "http://127.0.0.1:9000/a", "http://hooks.internal/a",
                "http://HOOKS.internal./b", "http://[::1]/a"):
        assert client.post(HOOKS, json=body(url=url)).status_code == 201, url
    assert field_errors(client.post(HOOKS, json=body(url="http://192.168.1.1/"))) == {
        "url": ["INVALID"]}


@pytest.fixture
def internal() -> Iterator[socket.socket]:
    with internal_listener() as listener:
        yield listener


def test_ssrf_checks_the_idna_name_the_probe_calls(make_client, subscriber, monkeypatch, db):
    # getaddrinfo makes strasse.attacker.test of the text (IDNA 2003): public; requests calls
    # xn--strae-oqa.attacker.test (IDNA 2008): loopback, where the subscriber server listens
    FakeDNS(monkeypatch, {"strasse.attacker.test": "93.184.215.14",
                          "xn--strae-oqa.attacker.test": "127.0.0.1"})
    client = make_client(subscription_probe=True)
    url = f"http://straße.attacker.test:{subscriber.port}/latest/meta-data"
    assert field_errors(client.post(HOOKS, json=body(url=url))) == {"url": ["INVALID"]}
    assert subscriber.requests == []
    assert db.execute("SELECT count(*) FROM subscriptions").fetchone() == (0,)


def test_a_resolver_failure_is_a_503_not_an_invalid_url(make_client, monkeypatch, db):
    """The resolver could not answer now: the URL may be right, so the client is told to come
    back (503, Retry-After), not that its URL is invalid. A name that does not exist stays 422."""
    FakeDNS(monkeypatch, {
        "flaky.example": socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution"),
        "nowhere.example": socket.gaierror(socket.EAI_NONAME, "Name or service not known")})
    client = make_client(subscription_probe=True)
    response = client.post(HOOKS, json=body(url="https://flaky.example/rd"))
    assert response.status_code == 503 and response.headers["Retry-After"] == "5"
    assert response.get_json()["errors"]["error_type"] == "SERVICE_UNAVAILABLE"
    assert "flaky.example could not be resolved now" in response.get_json()["errors"][
        "error_message"]
    assert field_errors(client.post(HOOKS, json=body(url="https://nowhere.example/rd"))) == {
        "url": ["INVALID"]}
    assert db.execute("SELECT count(*) FROM subscriptions").fetchone() == (0,)


def test_a_slow_resolver_holds_the_api_thread_no_longer_than_the_probe_limit(
        make_client, monkeypatch):
    import ingest.subscriptions as api

    real = socket._socket.getaddrinfo  # type: ignore[attr-defined]

    def getaddrinfo(host, *args, **kwargs):  # type: ignore[no-untyped-def]
        if host in ("slow.example", b"slow.example"):
            time.sleep(3)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket._socket, "getaddrinfo", getaddrinfo)  # type: ignore[attr-defined]
    monkeypatch.setattr(api, "PROBE_TIMEOUT", 0.5)
    started = time.monotonic()
    response = make_client(subscription_probe=True).post(
        HOOKS, json=body(url="https://slow.example/rd"))
    assert response.status_code == 503 and time.monotonic() - started < 2


def test_an_idn_subscriber_url_is_probed_under_its_idna_name(probing, subscriber, monkeypatch):
    FakeDNS(monkeypatch, {"xn--strae-oqa.test": "127.0.0.1"})
    url = f"http://straße.test:{subscriber.port}/rd"
    response = probing.post(HOOKS, json=body(url=url))
    assert response.status_code == 201 and response.get_json()["url"] == url  # kept as given
    (request,) = subscriber.requests
    assert request.header("Host") == f"xn--strae-oqa.test:{subscriber.port}"


def test_the_probe_connects_to_the_address_the_guard_checked(make_client, internal, monkeypatch):
    # DNS rebinding: the admitted 127.0.0.1 to the check, the internal 127.0.0.2 afterwards
    dns = FakeDNS(monkeypatch, {"rebind.test": ["127.0.0.1", "127.0.0.2"]})
    port = internal.getsockname()[1]
    client = make_client(subscription_probe=True, ssrf_allow=("127.0.0.1",))
    with HttpServer(port) as subscriber:  # the admitted address, same port as the internal one
        response = client.post(HOOKS, json=body(url=f"http://rebind.test:{port}/internal"))
        assert response.status_code == 201, response.data
        (request,) = subscriber.requests
    assert request.path == "/internal" and request.header("Host") == f"rebind.test:{port}"
    assert dns.lookups == ["rebind.test"]  # resolved once: the check
    assert not connected(internal)


def test_ssrf_check_looks_at_every_resolved_address():
    allow = ssrf.AllowList.parse(["127.0.0.1"])

    def resolver(host: str, port: int, **kwargs: Any) -> list:
        return [(2, 1, 6, "", ("127.0.0.1", port)), (10, 1, 6, "", ("::1", port, 0, 0))]

    with pytest.raises(ssrf.Refused, match=r"localhost resolves to a loopback address"):
        ssrf.check_url("http://localhost/x", allow, resolver)
    ssrf.check_url("http://localhost/x", ssrf.AllowList.parse(["127.0.0.0/8", "::1/128"]),
                   resolver)
    ssrf.check_url("https://93.184.215.14/x", ssrf.AllowList())  # public: no error
    with pytest.raises(ssrf.Refused, match="metadata"):
        ssrf.check_url("http://[::ffff:169.254.169.254]/", ssrf.AllowList())


def test_subscriptions_table_matches_the_api(database_url):
    with psycopg.connect(database_url) as conn:
        columns = {r[0] for r in conn.execute(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_name = 'subscriptions'")}
    assert {"uuid", "event_type", "entity_type", "url", "http_method", "event_identifiers",
            "include_relations", "status", "source", "created_at", "updated_at", "secret",
            "previous_secret", "previous_secret_expires_at", "consecutive_failures",
            "suspended_at", "last_error", "url_key", "older_secrets", "failing_since"} == columns
