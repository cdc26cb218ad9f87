"""A real threaded HTTP server on 127.0.0.1 that records every request and answers from a script."""

from __future__ import annotations

import json
import socketserver
import sys
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

HOST = "127.0.0.1"


@dataclass(frozen=True)
class Reply:
    """One scripted answer. `delay` (seconds) is waited before answering, and then `hold`, if
    given, until it is set (at most 30 s); stopping the server cuts either short and drops the
    connection unanswered."""

    status: int = 200
    body: bytes | str = b"{}"
    headers: Mapping[str, str] = field(
        default_factory=lambda: {"Content-Type": "application/json"})
    delay: float = 0.0
    hold: threading.Event | None = None

    def payload(self) -> bytes:
        return self.body.encode("utf-8") if isinstance(self.body, str) else self.body


@dataclass(frozen=True)
class Recorded:
    """One request as it arrived: time.time() once its head was read, and the raw body."""

    at: float
    method: str
    path: str
    headers: dict[str, str]  # as sent (names keep their case; a repeated name keeps the last)
    body: bytes

    def header(self, name: str) -> str | None:
        """A header by case-insensitive name."""
        lowered = name.lower()
        for key, value in self.headers.items():
            if key.lower() == lowered:
                return value
        return None

    def json(self) -> Any:
        return json.loads(self.body)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # one request per connection: nothing lingers at stop()
    timeout = 10  # a client that connects and says nothing cannot hold a thread for ever
    server: _Server

    def _serve(self) -> None:
        arrived = time.time()
        body = self._read_body()
        owner = self.server.owner
        owner._record(Recorded(arrived, self.command, self.path, dict(self.headers.items()),
                               body))
        reply = owner._next_reply()
        if reply.delay > 0 and owner._stopping.wait(reply.delay):
            self.close_connection = True
            return
        if reply.hold is not None:
            deadline = time.monotonic() + 30
            while not reply.hold.wait(0.05):
                if owner._stopping.is_set() or time.monotonic() > deadline:
                    self.close_connection = True
                    return
        payload = reply.payload()
        self.send_response(reply.status)
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _serve

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline(65537).split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline(65537)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: the test reads .requests instead


class _Server(ThreadingHTTPServer):
    allow_reuse_address = True  # come back on the same port right after stop()
    daemon_threads = True  # a stuck handler never blocks interpreter exit...
    block_on_close = True  # ...but server_close() still joins every handler thread

    def __init__(self, address: tuple[str, int], owner: HttpServer):
        self.owner = owner
        super().__init__(address, _Handler)

    def server_bind(self) -> None:  # HTTPServer's would do a reverse DNS lookup (getfqdn)
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = HOST, self.server_address[1]

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionError | TimeoutError):
            return  # the client gave up (its own timeout): expected in tests
        super().handle_error(request, client_address)


class HttpServer:
    """`with HttpServer() as server:` or start()/stop().

    stop() closes the listening socket, so connections are refused; start() again listens on the
    same port. Answers come from the script (consumed in order), then from the default.
    """

    def __init__(self, port: int = 0):
        self.port = port
        self._lock = threading.Lock()
        self._requests: list[Recorded] = []
        self._script: deque[Reply] = deque()
        self._default = Reply()
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- life cycle ---------------------------------------------------------------------------

    def start(self) -> HttpServer:
        if self._server is not None:
            return self
        self._stopping.clear()
        server = _Server((HOST, self.port), self)
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"http-server-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None:
            return
        self._server = self._thread = None
        self._stopping.set()  # cut scripted delays short
        server.shutdown()
        server.server_close()  # closes the socket and joins the handler threads
        if thread is not None:
            thread.join()

    @property
    def running(self) -> bool:
        return self._server is not None

    def __enter__(self) -> HttpServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- script and record --------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def requests(self) -> list[Recorded]:
        with self._lock:
            return list(self._requests)

    def script(self, *replies: Reply | int) -> HttpServer:
        """Queue answers for the next requests; an int is a status with the default body."""
        with self._lock:
            self._script.extend(Reply(r) if isinstance(r, int) else r for r in replies)
        return self

    def set_default(self, reply: Reply | int | None = None, **kwargs: Any) -> HttpServer:
        """The answer once the script is used up: a Reply, a status, or Reply's fields."""
        if reply is None:
            reply = Reply(**kwargs)
        elif isinstance(reply, int):
            reply = Reply(reply, **kwargs)
        with self._lock:
            self._default = reply
        return self

    def clear(self) -> HttpServer:
        """Forget recorded requests and queued answers; the default answer stays."""
        with self._lock:
            self._requests.clear()
            self._script.clear()
        return self

    def _record(self, request: Recorded) -> None:
        with self._lock:
            self._requests.append(request)

    def _next_reply(self) -> Reply:
        with self._lock:
            return self._script.popleft() if self._script else self._default
