"""The plain-WSGI fast path gives exactly the answers Flask gives, through real servers."""

from __future__ import annotations

import io
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import redis
import requests
from flask import request_started

from config.local import free_port
from config.settings import Settings
from ingest import create_app
from tests.conftest import OTHER_TOKEN, TOKEN, ApiProcess, fixture_bytes

CONVERTED = fixture_bytes("mkt-v2-converted.json")
LIMIT = 4096
JSON = {"Content-Type": "application/json"}
HEADER = "X-Leadpipe-Token"
URL = "/webhooks/rdstation"


def chunked(*parts: bytes) -> Iterator[bytes]:
    yield from parts  # requests sends a generator without Content-Length, chunked


# (case, method, path and query, headers, body, status both paths must give)
CASES = [
    ("token in query", "POST", f"?token={TOKEN}", JSON, CONVERTED, 202),
    ("rotated token", "POST", f"?token={OTHER_TOKEN}", JSON, CONVERTED, 202),
    ("token in header", "POST", "", {**JSON, HEADER: TOKEN}, CONVERTED, 202),
    ("blank query token, header", "POST", "?token=", {**JSON, HEADER: TOKEN}, CONVERTED, 202),
    ("percent-encoded token", "POST", "?token=" + TOKEN.replace("-", "%2D"), JSON, CONVERTED,
     202),
    ("json with charset", "POST", f"?token={TOKEN}",
     {"Content-Type": "application/json; charset=utf-8"}, CONVERTED, 202),
    ("upper-case json", "POST", f"?token={TOKEN}", {"Content-Type": "APPLICATION/JSON"},
     CONVERTED, 202),
    ("+json type", "POST", f"?token={TOKEN}", {"Content-Type": "application/vnd.rd+json"},
     CONVERTED, 202),
    ("opportunity hint", "POST", f"?token={TOKEN}&event_type=WEBHOOK.MARKED_OPPORTUNITY", JSON,
     fixture_bytes("legacy-leads-full.json"), 202),
    ("integer past 64 bits", "POST", f"?token={TOKEN}", JSON,
     b'{"event_name": "crm_deal_updated", "n": 123456789012345678901234567890}', 202),
    ("NaN is not JSON", "POST", f"?token={TOKEN}", JSON,
     b'{"event_name": "crm_deal_updated", "n": 123456789012345678901234567890, "x": NaN}', 400),
    ("lone surrogate", "POST", f"?token={TOKEN}", JSON,
     b'{"event_name": "crm_deal_updated", "name": "cut \\ud83d"}', 202),
    ("no token", "POST", "", JSON, CONVERTED, 401),
    ("wrong token", "POST", "?token=wrong", JSON, CONVERTED, 401),
    ("wrong header token", "POST", "", {**JSON, HEADER: "wrong"}, CONVERTED, 401),
    ("first token wins", "POST", f"?token=wrong&token={TOKEN}", JSON, CONVERTED, 401),
    ("blank first token", "POST", f"?token=&token={TOKEN}", JSON, CONVERTED, 401),
    ("text/plain", "POST", f"?token={TOKEN}", {"Content-Type": "text/plain"}, CONVERTED, 415),
    ("no content type", "POST", f"?token={TOKEN}", {}, CONVERTED, 415),
    ("over the limit", "POST", f"?token={TOKEN}", JSON,
     b'{"pad": "' + b"x" * LIMIT + b'"}', 413),
    ("empty probe", "POST", f"?token={TOKEN}", JSON, b"", 200),
    ("{} probe", "POST", f"?token={TOKEN}", JSON, b"  { }  ", 200),
    ("not json", "POST", f"?token={TOKEN}", JSON, b"{not json", 400),
    ("json array", "POST", f"?token={TOKEN}", JSON, b"[{}]", 400),
    ("unknown hint", "POST", f"?token={TOKEN}&event_type=DROP", JSON, CONVERTED, 400),
    ("blank hint", "POST", f"?token={TOKEN}&event_type=", JSON, CONVERTED, 400),
    ("chunked", "POST", f"?token={TOKEN}", JSON, lambda: chunked(CONVERTED[:99],
                                                                  CONVERTED[99:]), 202),
    ("chunked over the limit", "POST", f"?token={TOKEN}", JSON,
     lambda: chunked(b'{"pad": "', *[b"x" * 1000] * 6, b'"}'), 413),
    ("wrong method", "GET", f"?token={TOKEN}", {}, b"", 405),
    ("trailing slash", "POST", f"/?token={TOKEN}", JSON, CONVERTED, 404),
]
IDS = [case[0] for case in CASES]


def send(api: ApiProcess, method: str, query: str, headers: dict, body) -> requests.Response:  # type: ignore[no-untyped-def]
    data = body() if callable(body) else body
    return requests.request(method, api.url + URL + query, headers=headers, data=data, timeout=10)


def comparable(response: requests.Response) -> tuple:
    """Status, headers but the clock, and the body with an accepted event's id made generic.

    `Connection: close` is left out too: granian adds it to an answer given before the request
    body has fully arrived, which depends on timing, not on which path answered."""
    headers = {k.lower(): v for k, v in response.headers.items()
               if k.lower() not in ("date", "connection")}
    if "allow" in headers:  # werkzeug lists methods from a set: order varies by process
        headers["allow"] = ", ".join(sorted(headers["allow"].split(", ")))
    body = response.content
    if response.status_code == 202:
        answer = orjson.loads(body)
        assert set(answer) == {"id"} and uuid.UUID(answer["id"]).version == 7
        body = b'{"id":"%s"}' % (b"-" * 36)
    return response.status_code, headers, body


def api_settings(redis_url: str, **changes: object) -> Settings:
    return Settings(redis_url=redis_url, ingest_tokens=(TOKEN, OTHER_TOKEN),
                    ingest_token_header=HEADER, max_body_bytes=LIMIT,
                    namespace="f" + uuid.uuid4().hex[:10]).with_(**changes)


@pytest.fixture(scope="module", params=["granian", "gunicorn"])
def apis(request, redis_url: str, tmp_path_factory) -> Iterator[dict[str, ApiProcess]]:  # type: ignore[no-untyped-def]
    """One server with the fast path, one where Flask answers everything; same server kind."""
    logs: Path = tmp_path_factory.mktemp("fast")
    started: dict[str, ApiProcess] = {}
    try:
        for path, fast in (("fast", True), ("flask", False)):
            settings = api_settings(redis_url, ingest_fast_path=fast)
            started[path] = ApiProcess(settings, logs / f"{request.param}-{path}.log",
                                       server=request.param)
        yield started
    finally:
        for api in started.values():
            api.stop()


@pytest.mark.parametrize(("case", "method", "query", "headers", "body", "status"), CASES,
                         ids=IDS)
def test_both_paths_give_the_same_answer(apis, redis_url, case, method, query, headers, body,
                                         status):
    client = redis.Redis.from_url(redis_url)
    answers = {}
    for path, api in apis.items():
        key = api.settings.stream_key
        before = client.xlen(key)
        response = send(api, method, query, headers, body)
        assert response.status_code == status, (path, response.content)
        answers[path] = comparable(response)
        added = client.xlen(key) - before
        assert added == (1 if status == 202 else 0), path
        if status == 202:  # the id answered is the entry just written, with the body as sent
            fields = client.xrevrange(key, count=1)[0][1]
            assert fields[b"i"].decode() == response.json()["id"]
            sent = body() if callable(body) else body
            assert fields[b"b"] == b"".join(sent) if not isinstance(sent, bytes) else sent
            hint = fields.get(b"h")
            assert (hint.decode() if hint else None) == (
                "WEBHOOK.MARKED_OPPORTUNITY" if "event_type=" in query else None)
    assert answers["fast"] == answers["flask"]


def raw(api: ApiProcess, head: bytes, body: bytes) -> tuple[int, bytes]:
    """Send a request as written, close the sending side, and read the answer: status, body."""
    with socket.create_connection(("127.0.0.1", api.port), timeout=10) as sock:
        sock.sendall(b"POST " + URL.encode() + b"?token=" + TOKEN.encode() + b" HTTP/1.1\r\n"
                     b"Host: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Connection: close\r\n" + head + b"\r\n" + body)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    status = int(answer.split(b" ", 2)[1])
    return status, answer.split(b"\r\n\r\n", 1)[1]


PII = b"Maria Joaquina Souza"  # a name: what the log masking does not catch


def test_a_body_shorter_than_its_content_length_is_400_on_both_paths(apis, redis_url):
    """The client closes before sending all it announced: a clear 400 from both paths, not a
    202 of what arrived nor the 200 of an empty probe; nothing stored, nothing of it logged."""
    client = redis.Redis.from_url(redis_url)
    whole = b'{"event_name": "crm_deal_updated", "document": {"name": "' + PII + b'"}}'
    answers = {}
    for path, api in apis.items():
        before = client.xlen(api.settings.stream_key)
        for sent in (whole, whole[:30]):  # a whole object, then a cut one
            status, body = raw(api, b"Content-Length: %d\r\n" % (len(whole) + 50), sent)
            assert status == 400, (path, body)
            assert b"could not be read as sent" in body
            answers[path, sent] = body
        assert client.xlen(api.settings.stream_key) == before
        assert PII not in api.log_path.read_bytes()
    assert {body for (path, _), body in answers.items() if path == "fast"} == {
        body for (path, _), body in answers.items() if path == "flask"}


class Breaks(io.RawIOBase):
    """A request body whose connection breaks as it is read (the error quotes the body)."""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def]
        raise ConnectionResetError(f"reset after {PII.decode()}")

    at = 0  # the test client measures a stream it is given by seeking to its end: 40 bytes

    def tell(self) -> int:
        return self.at

    def seek(self, offset: int, whence: int = 0) -> int:
        self.at = 40 if whence == io.SEEK_END else offset
        return self.at


def test_a_body_whose_read_fails_is_the_same_400_on_both_paths(redis_url, caplog):
    """In one process: the server's input raising as it is read gets the view's 400 from the
    fast path too, its type logged and not its text; nothing is stored."""
    answers = {}
    for fast in (True, False):
        settings = api_settings(redis_url, ingest_fast_path=fast)
        client = create_app(settings).test_client()
        caplog.clear()
        response = client.post(URL + f"?token={TOKEN}", input_stream=Breaks(), headers=JSON)
        assert response.status_code == 400, response.data
        answers[fast] = response.data
        assert "request body unreadable: ConnectionResetError" in caplog.text
        assert PII.decode() not in caplog.text
        assert redis.Redis.from_url(redis_url).xlen(settings.stream_key) == 0
    assert answers[True] == answers[False] and b"could not be read as sent" in answers[True]


def test_chunks_gunicorn_cannot_parse_are_a_400_with_nothing_of_the_body_logged(redis_url,
                                                                                tmp_path):
    """gunicorn's error for a chunk size that is no number quotes the line it read: the answer
    is a 400 (not a 500) and the log names the error's type only."""
    for fast in (True, False):
        settings = api_settings(redis_url, ingest_fast_path=fast)
        api = ApiProcess(settings, tmp_path / f"{fast}.log", server="gunicorn")
        try:
            status, body = raw(api, b"Transfer-Encoding: chunked\r\n",
                               b'{"name": "' + PII + b'"}\r\n0\r\n\r\n')
        finally:
            api.stop()
        assert status == 400, body
        assert b"could not be read as sent" in body
        log = api.log_path.read_bytes()
        assert PII not in log and b"request body unreadable: InvalidChunkSize" in log


@pytest.mark.parametrize("server", ["granian", "gunicorn"])
def test_redis_down_is_the_same_503_on_both_paths(server, tmp_path):
    dead = f"redis://127.0.0.1:{free_port()}/0"
    answers, logged = {}, {}
    for path, fast in (("fast", True), ("flask", False)):
        settings = api_settings(dead, ingest_fast_path=fast, redis_timeout_seconds=0.5)
        api = ApiProcess(settings, tmp_path / f"{path}.log", server=server)
        try:
            response = send(api, "POST", f"?token={TOKEN}", JSON, CONVERTED)
        finally:
            api.stop()
        assert response.status_code == 503
        assert response.headers["Retry-After"] == str(settings.retry_after_seconds)
        assert response.json()["errors"]["error_type"] == "SERVICE_UNAVAILABLE"
        answers[path] = comparable(response)
        log = (tmp_path / f"{path}.log").read_text()
        assert orjson.loads(CONVERTED)["contact"]["email"] not in log  # no lead data logged
        lines = [x for x in log.splitlines() if "ingest stream unavailable" in x]
        assert len(lines) == 1, log
        line = orjson.loads(lines[0])  # a JSON log line
        line.pop("ts")
        logged[path] = line  # the same line but for its time
    assert answers["fast"] == answers["flask"]
    assert logged["fast"] == logged["flask"]


def test_only_a_sure_202_skips_flask(redis_url):
    """In one process: which requests Flask saw (its request_started signal fires per request)."""
    app = create_app(api_settings(redis_url))
    client = app.test_client()
    seen: list[str] = []

    def started(sender, **extra) -> None:  # type: ignore[no-untyped-def]
        seen.append("flask")

    request_started.connect(started, app)
    try:
        for case, method, query, headers, body, status in CASES:
            if callable(body):
                continue  # chunked bodies need a real server: see above
            seen.clear()
            response = client.open(URL + query, method=method, headers=headers, data=body)
            assert response.status_code == status, case
            assert seen == ([] if status == 202 else ["flask"]), case
    finally:
        request_started.disconnect(started, app)
