"""The shared HTTP outcome mapping, and the recording test server, against a real local server."""

from __future__ import annotations

import base64
import json
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

from ingest.ssrf import Target
from sinks.base import PermanentSinkError, RetryableSinkError
from sinks.http import json_body, retry_after, send
from sinks.transport import Deadline, new_session
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


# -- a total deadline, not requests' per-read timeout ------------------------------------------

Answer = Sequence[tuple[bytes, float]]  # pieces: (bytes, seconds between two of its bytes)
STATUS_LINE_DRIP: Answer = [(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Pad: " + b"a" * 40 +
                             b"\r\n\r\n{}", 0.1)]  # about 6 s, never 0.1 s without a byte
BODY_DRIP: Answer = [(b"HTTP/1.1 200 OK\r\nContent-Length: 40\r\n\r\n", 0), (b"x" * 40, 0.1)]
FAST: Answer = [(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}", 0)]


class Dripper:
    """A real HTTP/1.1 server (keep-alive) on `host` that answers each request from a script of
    `Answer`s, byte by byte where asked; `FAST` once the script is used up. Records the request
    heads and counts connections."""

    def __init__(self, *answers: Answer, host: str = "127.0.0.1", port: int = 0):
        self.script: deque[Answer] = deque(answers)
        self.heads: list[bytes] = []
        self.connections = 0
        self._stop = threading.Event()
        self._listener = socket.create_server((host, port))
        self._listener.settimeout(0.05)
        self.port = self._listener.getsockname()[1]
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def __enter__(self) -> Dripper:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in list(self._threads):
            thread.join(timeout=10)
        self._listener.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            self.connections += 1
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(0.05)
        buffer = b""
        with conn:
            while not self._stop.is_set():
                try:
                    data = conn.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not data:
                    return
                buffer += data
                if b"\r\n\r\n" not in buffer:
                    continue
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                while len(buffer) < length and not self._stop.is_set():
                    try:
                        buffer += conn.recv(65536)
                    except TimeoutError:
                        continue
                buffer = buffer[length:]
                self.heads.append(head)
                if not self._answer(conn, self.script.popleft() if self.script else FAST):
                    return

    def _answer(self, conn: socket.socket, answer: Answer) -> bool:
        for data, gap in answer:
            chunks = [data] if gap == 0 else [data[i:i + 1] for i in range(len(data))]
            for chunk in chunks:
                try:
                    conn.sendall(chunk)
                except OSError:
                    return False  # the client hung up
                if gap and self._stop.wait(gap):
                    return False
        return True


def test_an_answer_whose_head_drips_past_the_timeout_is_cut_at_it_as_a_whole(session):
    # each byte comes well within requests' per-read timeout; the whole answer takes 4-6 s
    with Dripper(STATUS_LINE_DRIP) as drip:
        started = time.monotonic()
        with pytest.raises(RetryableSinkError) as caught:
            send(session, "POST", f"http://127.0.0.1:{drip.port}/x", body=b"{}", headers={},
                 timeout=0.5, label="test")
        assert time.monotonic() - started < 1.5
    assert str(caught.value) == "test: no answer within 0.5 s" and caught.value.status is None


def test_a_2xx_whose_body_drips_past_the_timeout_counts_at_the_timeout(session):
    """RD's rule: a 2xx within the limit is a success. The status and headers came in time;
    the body's late bytes are not waited for past the deadline and change nothing."""
    with Dripper(BODY_DRIP, FAST) as drip:
        url = f"http://127.0.0.1:{drip.port}/x"
        started = time.monotonic()
        assert send(session, "POST", url, body=b"{}", headers={}, timeout=0.5,
                    label="test").status_code == 200
        assert time.monotonic() - started < 1.5
        send(session, "POST", url, body=b"{}", headers={}, timeout=0.5, label="test")
        assert drip.connections == 2  # the cut connection was not used again


def test_a_kept_alive_connection_is_bound_by_the_next_requests_deadline(session):
    with Dripper(FAST, STATUS_LINE_DRIP) as drip:
        url = f"http://127.0.0.1:{drip.port}/x"
        assert send(session, "POST", url, body=b"{}", headers={}, timeout=0.5,
                    label="test").status_code == 200
        started = time.monotonic()
        with pytest.raises(RetryableSinkError, match="no answer within 0.5 s"):
            send(session, "POST", url, body=b"{}", headers={}, timeout=0.5, label="test")
        assert time.monotonic() - started < 1.5
        assert drip.connections == 1 and len(drip.heads) == 2


def test_a_deadline_that_passes_after_its_request_leaves_the_connection_alone(session):
    with Dripper() as drip:
        url = f"http://127.0.0.1:{drip.port}/x"
        send(session, "POST", url, body=b"{}", headers={}, timeout=0.2, label="test")
        time.sleep(0.4)  # the first deadline passes while its connection waits in the pool
        send(session, "POST", url, body=b"{}", headers={}, timeout=0.2, label="test")
        assert drip.connections == 1 and len(drip.heads) == 2


def test_a_deadline_says_whether_it_expired():
    with Deadline(0.05) as deadline:
        assert 0 < deadline.remaining() <= 0.05 and not deadline.expired
        time.sleep(0.2)
        assert deadline.expired
    with Deadline(5) as deadline:
        pass
    assert not deadline.expired


def slow_dns(monkeypatch: pytest.MonkeyPatch, name: str, seconds: float,
             address: str = "127.0.0.1") -> None:
    """`name` resolves to `address` only after `seconds` (a resolver's bad moment). A real
    resolver cannot be made slow, so `_socket.getaddrinfo` is replaced, as tests.support.dns
    does; everything above it runs for real."""
    real = socket._socket.getaddrinfo  # type: ignore[attr-defined]

    def getaddrinfo(host: Any, port: Any, family: int = 0, type: int = 0, proto: int = 0,
                    flags: int = 0) -> list:
        if (host.decode() if isinstance(host, bytes) else host) != name:
            return real(host, port, family, type, proto, flags)
        time.sleep(seconds)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, int(port)))]

    monkeypatch.setattr(socket._socket, "getaddrinfo", getaddrinfo)  # type: ignore


def test_a_slow_name_lookup_is_bounded_by_the_deadline(server, session, monkeypatch):
    slow_dns(monkeypatch, "slow.test", 3.0)
    started = time.monotonic()
    with pytest.raises(RetryableSinkError, match="no answer within 0.5 s"):
        send(session, "PUT", f"http://slow.test:{server.port}/x", body=b"{}", headers={},
             timeout=0.5, label="test")
    assert time.monotonic() - started < 2.0  # not the lookup's 3 s (slack for a busy machine)
    assert server.requests == []


def test_a_caller_deadline_leaves_the_request_only_what_is_left(server, session):
    server.script(Reply(200, delay=0.6))
    started = time.monotonic()
    with Deadline(1.0) as deadline:
        time.sleep(0.5)  # what a name lookup before the request took
        with pytest.raises(RetryableSinkError, match="no answer within 1 s"):
            send(session, "PUT", server.url + "/x", body=b"{}", headers={}, timeout=1.0,
                 label="test", deadline=deadline)
    assert time.monotonic() - started < 1.4


# -- the host's environment adds nothing but a CA bundle ----------------------------------------


def netrc_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A netrc with a `default` entry (credentials for every host), named by $NETRC as an
    operator's ~/.netrc would be found; the Basic credentials requests would make of it."""
    path = tmp_path / "netrc"
    path.write_text("default login ops password hunter2\n")
    path.chmod(0o600)
    monkeypatch.setenv("NETRC", str(path))
    return "Basic " + base64.b64encode(b"ops:hunter2").decode()


def test_no_credentials_from_netrc(server, tmp_path, monkeypatch):
    basic = netrc_default(tmp_path, monkeypatch)
    assert requests.get(server.url, timeout=2).request.headers["Authorization"] == basic
    with new_session() as plain, new_session(pin=pin("hooks.example", server.port)) as pinned:
        put(plain, server)
        send(pinned, "POST", f"http://hooks.example:{server.port}/hook", body=b"{}",
             headers={}, timeout=2, label="test")
    assert [r.header("Authorization") for r in server.requests] == [basic, None, None]


def test_no_proxy_from_the_environment(server, monkeypatch):
    with HttpServer() as proxy:
        for name in ("NO_PROXY", "no_proxy"):
            monkeypatch.delenv(name, raising=False)
        for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY"):
            monkeypatch.setenv(name, proxy.url)
        with new_session() as plain:
            assert put(plain, server).status_code == 200
        assert proxy.requests == []
    assert [r.path for r in server.requests] == ["/x"]


# -- pinning: connect to the checked addresses only ---------------------------------------------


def pin(host: str, port: int, address: str = "127.0.0.1", scheme: str = "http") -> Target:
    return Target(f"{scheme}://{host}:{port}/hook", host, port,
                  ((socket.AF_INET, (address, port)),))


@pytest.fixture
def no_dns(monkeypatch):  # type: ignore[no-untyped-def]
    """Any name lookup fails the test (address literals go through)."""
    real = socket._socket.getaddrinfo  # type: ignore[attr-defined]

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> list:
        text = host.decode() if isinstance(host, bytes) else str(host)
        if text and not text.replace(".", "").isdigit() and ":" not in text:
            raise AssertionError(f"looked up {text!r}")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket._socket, "getaddrinfo", getaddrinfo)  # type: ignore


def test_a_pinned_session_connects_to_its_address_and_keeps_the_host_name(server, no_dns):
    target = pin("hooks.example", server.port)
    with new_session(pin=target) as pinned:
        assert send(pinned, "POST", target.url, body=b"{}", headers={}, timeout=2,
                    label="test").status_code == 200
    (got,) = server.requests
    assert got.path == "/hook" and got.header("Host") == f"hooks.example:{server.port}"


def test_a_pinned_session_calls_no_other_host(server):
    with new_session(pin=pin("hooks.example", server.port)) as pinned:
        for url in (server.url + "/hook", f"http://hooks.example:{server.port + 1}/hook"):
            with pytest.raises(requests.exceptions.InvalidURL):
                pinned.post(url, timeout=2)
    assert server.requests == []


# -- TLS through a pinned session: SNI and the certificate check keep the host name -----------


def certificate_for(folder: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for the DNS name `name` (tests.support.certs makes IP ones)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is missing (make setup installs it)")
    cert, key = folder / f"{name}-cert.pem", folder / f"{name}-key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj", f"/CN={name}",
                    "-addext", f"subjectAltName=DNS:{name}", "-keyout", str(key), "-out",
                    str(cert)], check=True, capture_output=True, timeout=30)
    return cert, key


class TLSServer:
    """A real HTTPS server on 127.0.0.1 answering 200 to anything; records the SNI and Host."""

    def __init__(self, cert: Path, key: Path):
        self.seen: list[tuple[str | None, str | None]] = []
        self.sni: list[str | None] = []
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        context.sni_callback = lambda sock, name, ctx: self.sni.append(name)
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                owner.seen.append((owner.sni[-1] if owner.sni else None,
                                   self.headers.get("Host")))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.handle_error = lambda *args: None  # type: ignore[method-assign]
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def __enter__(self) -> TLSServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


@pytest.fixture
def tls(tmp_path) -> Iterator[tuple[TLSServer, Path]]:  # type: ignore[no-untyped-def]
    cert, key = certificate_for(tmp_path, "hooks.example")
    with TLSServer(cert, key) as srv:
        yield srv, cert


def trust(monkeypatch: pytest.MonkeyPatch, cert: Path) -> None:
    """Trust `cert` alone, the way an operator points requests at a CA bundle."""
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.setenv(name, str(cert))


def test_https_through_a_pin_verifies_the_certificate_for_the_host_name(tls, no_dns,
                                                                        monkeypatch):
    srv, cert = tls
    trust(monkeypatch, cert)
    target = pin("hooks.example", srv.port, scheme="https")
    with new_session(pin=target) as pinned:
        assert send(pinned, "POST", target.url, body=b"{}", headers={}, timeout=5,
                    label="test").status_code == 200
    assert srv.seen == [("hooks.example", f"hooks.example:{srv.port}")]


@pytest.mark.parametrize("name", ["other.example", "127.0.0.1"])
def test_https_through_a_pin_refuses_a_certificate_for_another_name(tls, name, monkeypatch):
    srv, cert = tls  # the certificate names hooks.example; the pin has the right address
    trust(monkeypatch, cert)
    target = pin(name, srv.port, scheme="https")
    with new_session(pin=target) as pinned:
        with pytest.raises(RetryableSinkError, match="connection failed") as caught:
            send(pinned, "POST", target.url, body=b"{}", headers={}, timeout=5, label="test")
    assert "mismatch" in str(caught.value)  # the name check, not trust, refused it
    assert srv.seen == []


def test_https_through_a_pin_still_needs_a_trusted_certificate(tls, no_dns):
    srv, _ = tls  # the system's CA bundle does not hold it
    target = pin("hooks.example", srv.port, scheme="https")
    with new_session(pin=target) as pinned, pytest.raises(RetryableSinkError):
        send(pinned, "POST", target.url, body=b"{}", headers={}, timeout=5, label="test")
    assert srv.seen == []


def test_retry_after_is_bounded_and_reads_only_ascii_digits():
    from sinks.http import MAX_RETRY_AFTER_SECONDS

    now = 1_700_000_000.0
    assert retry_after("99999999999999") == MAX_RETRY_AFTER_SECONDS
    assert retry_after("Fri, 31 Dec 9999 23:59:59 GMT", now=now) == MAX_RETRY_AFTER_SECONDS
    assert retry_after("31536000") == MAX_RETRY_AFTER_SECONDS  # a year: one hour at most
    assert retry_after("120") == 120.0
    assert retry_after("\xb2") is None and retry_after("\u0663") is None  # "²", Arabic three


def test_an_endless_answer_body_is_not_read_past_a_small_limit(session):
    """A destination that answers 2xx with a body that never ends (or gigabytes of it): the
    send returns on the status once a little of the body is read; memory stays flat."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def serve() -> None:
        conn, _ = listener.accept()
        held.append(conn)
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 10000000000\r\n\r\n" + b"x" * (1024 * 1024))
        # and then nothing more, the connection left open: reading it all would never end

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        answer = send(session, "PUT", f"http://127.0.0.1:{listener.getsockname()[1]}/x",
                      body=b"{}", headers={}, timeout=5, label="crm")
        assert answer.status_code == 200
    finally:
        for conn in held:
            conn.close()
        listener.close()
