"""The shared HTTP outcome mapping, and the recording test server, against a real local server."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from email.utils import formatdate

import pytest
import requests

from sinks.base import PermanentSinkError, RetryableSinkError
from sinks.http import json_body, new_session, retry_after, send
from tests.support.http_server import HttpServer, Reply


@pytest.fixture
def server() -> Iterator[HttpServer]:
    with HttpServer() as srv:
        yield srv


@pytest.fixture
def session() -> Iterator[requests.Session]:
    s = new_session()
    yield s
    s.close()


def put(session: requests.Session, server: HttpServer, path: str = "/x",
        timeout: float = 2.0) -> requests.Response:
    return send(session, "PUT", server.url + path, body=b'{"a":1}',
                headers={"Content-Type": "application/json"}, timeout=timeout, label="test")


# -- the recording server ----------------------------------------------------------------------


def test_server_records_requests_and_answers_script_then_default(server, session):
    server.script(Reply(201, b'{"n":1}', {"X-A": "1"}), 202)
    before = time.time()
    first = session.post(server.url + "/a?q=1", data=b"hello", headers={"X-Test": "yes"},
                         timeout=2)
    second = session.delete(server.url + "/b", timeout=2)
    third = session.get(server.url + "/c", timeout=2)
    assert (first.status_code, first.content, first.headers["X-A"]) == (201, b'{"n":1}', "1")
    assert (second.status_code, third.status_code, third.content) == (202, 200, b"{}")
    seen = server.requests
    assert [(r.method, r.path) for r in seen] == [("POST", "/a?q=1"), ("DELETE", "/b"),
                                                  ("GET", "/c")]
    assert seen[0].body == b"hello" and seen[0].headers["X-Test"] == "yes"
    assert seen[0].header("x-test") == "yes" and seen[0].header("missing") is None
    assert before <= seen[0].at <= seen[1].at <= seen[2].at <= time.time()
    server.set_default(404, body="nope")
    assert session.get(server.url, timeout=2).status_code == 404
    server.clear()
    assert server.requests == []


def test_server_reads_chunked_bodies(server, session):
    session.post(server.url + "/chunked", data=iter([b"ab", b"cd"]), timeout=2)
    assert server.requests[0].body == b"abcd"


def test_server_stops_refusing_connections_and_comes_back_on_the_same_port(server, session):
    port = server.port
    server.stop()
    with pytest.raises(requests.ConnectionError):
        session.get(server.url, timeout=2)
    server.start()
    assert server.port == port
    assert session.get(server.url, timeout=2).status_code == 200


# -- outcomes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [200, 201, 202, 204])
def test_2xx_is_delivered(server, session, status):
    server.script(status)
    assert put(session, server).status_code == status
    assert len(server.requests) == 1


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
def test_overload_and_server_errors_are_retryable(server, session, status):
    server.script(status)
    with pytest.raises(RetryableSinkError) as caught:
        put(session, server)
    assert caught.value.status == status and caught.value.retry_after is None
    assert len(server.requests) == 1  # one call, one request: retries belong to the caller


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 410, 413, 422])
def test_other_4xx_are_permanent(server, session, status):
    server.script(status)
    with pytest.raises(PermanentSinkError) as caught:
        put(session, server)
    assert caught.value.status == status
    assert not isinstance(caught.value, RetryableSinkError)


def test_redirects_are_not_followed_and_are_permanent(server, session):
    server.script(Reply(307, b"", {"Location": server.url + "/elsewhere"}))
    with pytest.raises(PermanentSinkError) as caught:
        put(session, server)
    assert caught.value.status == 307 and len(server.requests) == 1


def test_retry_after_seconds_on_503_and_429(server, session):
    for status in (503, 429):
        server.script(Reply(status, headers={"Retry-After": "7"}))
        with pytest.raises(RetryableSinkError) as caught:
            put(session, server)
        assert caught.value.retry_after == 7


def test_retry_after_http_date_on_429(server, session):
    server.script(Reply(429, headers={"Retry-After": formatdate(time.time() + 120,
                                                                 usegmt=True)}))
    with pytest.raises(RetryableSinkError) as caught:
        put(session, server)
    assert 115 <= caught.value.retry_after <= 121


def test_retry_after_is_ignored_where_it_means_nothing(server, session):
    server.script(Reply(500, headers={"Retry-After": "7"}))
    with pytest.raises(RetryableSinkError) as caught:
        put(session, server)
    assert caught.value.retry_after is None


def test_retry_after_parsing():
    now = 1_700_000_000.0
    assert retry_after(None) is None
    assert retry_after(" 12 ") == 12.0
    assert retry_after(formatdate(now + 30, usegmt=True), now=now) == 30.0
    assert retry_after(formatdate(now - 30, usegmt=True), now=now) == 0.0  # already past
    assert retry_after("Tue, 14 Nov 2023 22:13:50 -0000", now=now) == 30.0
    assert retry_after("soon") is None and retry_after("-5") is None and retry_after("") is None


def test_connection_refused_is_retryable(server, session):
    server.stop()
    with pytest.raises(RetryableSinkError) as caught:
        put(session, server)
    assert caught.value.status is None
    assert "connection failed" in str(caught.value)


def test_no_answer_within_the_timeout_is_retryable(server, session):
    server.script(Reply(200, delay=3))
    started = time.monotonic()
    with pytest.raises(RetryableSinkError) as caught:
        put(session, server, timeout=0.3)
    assert time.monotonic() - started < 2
    assert caught.value.status is None and "0.3 s" in str(caught.value)


def test_messages_hold_neither_url_nor_answer(server, session):
    server.script(Reply(422, b'{"error":"ana@example.com is taken"}'))
    with pytest.raises(PermanentSinkError) as caught:
        put(session, server, path="/leads/ana%40example.com")
    assert str(caught.value).startswith("test: HTTP 422 Unprocessable ")  # the standard phrase
    assert "ana" not in str(caught.value) and "taken" not in str(caught.value)
    server.stop()
    with pytest.raises(RetryableSinkError) as refused:
        put(session, server, path="/leads/ana%40example.com")
    assert "ana" not in str(refused.value) and refused.value.__cause__ is None


# -- the body encoding -------------------------------------------------------------------------


def test_json_body_is_compact_utf8_in_build_order():
    data = {"z": 1, "a": "São Paulo", "n": None, "l": [1.5, True]}
    assert json_body(data) == '{"z":1,"a":"São Paulo","n":null,"l":[1.5,true]}'.encode()
    assert json_body({"big": 2**70}) == b'{"big":1180591620717411303424}'


def test_json_body_escapes_what_utf8_cannot_carry():
    assert json_body({"s": "a\ud800"}) == b'{"s":"a\\ud800"}'


def test_json_body_refuses_nan():
    with pytest.raises(ValueError):
        json_body({"x": float("nan")})


def test_body_and_headers_arrive_as_sent(server, session):
    put(session, server)
    got = server.requests[0]
    assert got.method == "PUT" and json.loads(got.body) == {"a": 1}
    assert got.header("User-Agent") == "leadpipe"
