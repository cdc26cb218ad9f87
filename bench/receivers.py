"""Receivers for the chaos run: idempotent HTTP endpoints that fail on purpose, and can go away."""

from __future__ import annotations

import random
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    disable_nagle_algorithm = True  # headers and body go out as two writes: no delayed-ACK stall
    server: _Server

    def setup(self) -> None:
        if self.server.owner.keep_alive:  # one connection per sending process, as a CRM allows
            self.protocol_version = "HTTP/1.1"
        super().setup()

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        owner = self.server.owner
        key = self.headers.get(owner.key_header)
        status, delay = owner.decide(key)
        if delay:
            time.sleep(delay)  # past the sink's timeout: it gives up, nothing is applied
            self.close_connection = True
            return
        if status < 300 and key:
            owner.accept(key)
        body = b"{}"
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_PUT = do_PATCH = _serve

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], owner: Receiver):
        self.owner = owner
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a sender closing its keep-alive connection is not news

    def server_bind(self) -> None:  # skip the reverse DNS lookup of HTTPServer's
        socket.socket.setsockopt(self.socket, socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(self.server_address)
        self.server_address = self.socket.getsockname()
        self.server_name, self.server_port = self.server_address[:2]


class Receiver:
    """An endpoint that applies each idempotency key once, like a well-built CRM or subscriber.

    `fail` of requests get a 503 and `hang` get no answer for `hang_seconds` (both apply
    nothing); `refuse()` closes the port until `listen()` opens it again. Counts what a
    receiver would: requests, keys applied (the side effects) and repeats of applied keys.
    """

    def __init__(self, key_header: str, fail: float = 0.0, hang: float = 0.0,
                 hang_seconds: float = 3.0, seed: int = 0, keep_alive: bool = False):
        self.key_header = key_header
        self.keep_alive = keep_alive
        self.fail = fail
        self.hang = hang
        self.hang_seconds = hang_seconds
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.requests = 0
        self.applied: Counter[str] = Counter()  # key -> 2xx answers given for it
        self.first_applied: dict[str, float] = {}  # key -> time.time() of its first 2xx
        self.port = 0
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def listen(self) -> Receiver:
        self._server = _Server(("127.0.0.1", self.port), self)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def refuse(self) -> None:
        """Stop listening: connections are refused until `listen()`."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def decide(self, key: str | None) -> tuple[int, float]:
        with self.lock:
            self.requests += 1
            if key is None:  # a subscription's URL check (POST {}): always fine
                return 200, 0.0
            roll = self.rng.random()
        if roll < self.hang:
            return 0, self.hang_seconds
        if roll < self.hang + self.fail:
            return 503, 0.0
        return 200, 0.0

    def accept(self, key: str) -> None:
        now = time.time()
        with self.lock:
            self.applied[key] += 1
            self.first_applied.setdefault(key, now)

    @property
    def side_effects(self) -> int:
        return len(self.applied)

    @property
    def repeats(self) -> int:
        """Requests for a key already applied: deduplicated here, harmless, but counted."""
        return sum(n - 1 for n in self.applied.values())
