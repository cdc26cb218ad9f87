"""The HTTP client of the sinks and the subscription probe: requests with a total deadline,
and connections pinned to the addresses the SSRF guard checked.

- a total deadline (`Deadline`): requests' timeout bounds each socket operation, so a server
  that drips its answer a byte at a time holds the caller for as long as it likes. Inside
  `with Deadline(seconds)`, every connection the block uses is shut down when the time is up.
- pinning (`new_session(pin=target)`): the session connects only to the addresses the SSRF guard
  checked (`ingest.ssrf.Target`), while the Host header, TLS SNI and the certificate check keep
  the URL's host name. The name is not resolved again, so DNS rebinding cannot lead elsewhere.
"""

from __future__ import annotations

import contextvars
import heapq
import ipaddress
import itertools
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import (
    ConnectTimeoutError,
    LocationValueError,
    NameResolutionError,
    NewConnectionError,
)
from urllib3.poolmanager import PoolManager
from urllib3.util.connection import allowed_gai_family
from urllib3.util.timeout import Timeout

from ingest import ssrf

if TYPE_CHECKING:
    from ingest.ssrf import Target

USER_AGENT = "leadpipe"

_current: contextvars.ContextVar[Deadline | None] = contextvars.ContextVar(
    "leadpipe_http_deadline", default=None)


class Deadline:
    """`with Deadline(seconds) as deadline:` bounds the network time of the block as a whole.

    Connections made or used in the block (by this thread, through a `new_session` session)
    are shut down once `seconds` have passed, which ends a read or write blocked on them with an
    error; `deadline.expired` then says the time was up. Connecting, name resolution included,
    is bounded by what is left."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.at = time.monotonic() + seconds
        self.expired = False
        self._done = False
        self._lock = threading.Lock()
        self._watched: list[socket.socket] = []
        self._token: contextvars.Token[Deadline | None] | None = None

    def remaining(self) -> float:
        return self.at - time.monotonic()

    def __enter__(self) -> Deadline:
        self._token = _current.set(self)
        _watchdog.add(self)
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._done = True
            watched, self._watched = self._watched, []
        for dup in watched:
            dup.close()
        if self._token is not None:
            _current.reset(self._token)
            self._token = None

    def watch(self, sock: Any) -> None:
        """Shut `sock` down when the time is up (at once if it already is)."""
        try:  # a duplicate descriptor: shuts down the same connection, even once TLS wraps it
            dup = socket.fromfd(sock.fileno(), sock.family, sock.type)
        except (OSError, AttributeError, ValueError):
            return
        with self._lock:
            done, expired = self._done, self.expired
            if not done:
                self._watched.append(dup)
        if done:
            dup.close()
        elif expired:
            _shut(dup)

    def expire(self) -> None:
        with self._lock:
            if self._done:
                return
            self.expired = True
            watched = list(self._watched)
        for dup in watched:
            _shut(dup)


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])  # an IPv6 literal may carry a zone
    except ValueError:
        return False
    return True


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # not connected (any more)


class _Watchdog:
    """One thread that expires deadlines when their time comes (a thread per request would
    cost every delivery a thread start)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, Deadline]] = []
        self._order = itertools.count()
        self._thread: threading.Thread | None = None

    def add(self, deadline: Deadline) -> None:
        with self._cond:
            heapq.heappush(self._heap, (deadline.at, next(self._order), deadline))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="http-deadlines",
                                                daemon=True)
                self._thread.start()
            elif self._heap[0][2] is deadline:
                self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    while self._heap and self._heap[0][2]._done:
                        heapq.heappop(self._heap)
                    now = time.monotonic()
                    if self._heap and self._heap[0][0] <= now:
                        due = heapq.heappop(self._heap)[2]
                        break
                    self._cond.wait(self._heap[0][0] - now if self._heap else None)
            due.expire()


_watchdog = _Watchdog()


def _after_fork() -> None:  # the thread (and perhaps a held lock) did not come along
    global _watchdog
    _watchdog = _Watchdog()


os.register_at_fork(after_in_child=_after_fork)


def current_deadline() -> Deadline | None:
    """The Deadline of the calling block, if any."""
    return _current.get()


def resolve(host: str, port: int, deadline: Deadline) -> list[tuple[int, Any]]:
    """(family, socket address) of each address of `host`, looked up within what is left of
    `deadline`: getaddrinfo cannot be interrupted, so a lookup that outlasts it is left to
    finish in a thread of its own (ingest.ssrf.lookup) and ssrf.Unresolved is raised; a name
    with no address raises socket.gaierror."""

    def getaddrinfo(name: str, port: int, type: int = socket.SOCK_STREAM) -> list:
        return socket.getaddrinfo(name, port, allowed_gai_family(), type)

    left = deadline.remaining()
    if _is_address(host):  # a literal needs no resolver, nor a thread
        infos = getaddrinfo(host, port)
    elif left <= 0:
        raise ssrf.Unresolved("no time left to resolve the host", True)
    else:
        infos = ssrf.lookup(getaddrinfo, host, port, left)
    return [(info[0], info[4]) for info in infos]


def connect(candidates: list[tuple[int, Any]], timeout: float | None,
            deadline: Deadline | None,
            prepare: Callable[[socket.socket], None] | None = None) -> socket.socket:
    """A TCP connection to the first of `candidates` ((family, address) pairs) that answers,
    each tried within `timeout` and what is left of `deadline`, the socket then put under it.
    Raises TimeoutError when the time is up, else the last connection error."""
    error: OSError = OSError("no address to connect to")
    for family, sockaddr in candidates:
        wait = timeout
        if deadline is not None:
            left = deadline.remaining()
            if left <= 0:
                raise TimeoutError("no time left to connect")
            wait = left if wait is None else min(wait, left)
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            if prepare is not None:
                prepare(sock)
            sock.settimeout(wait)
            sock.connect(sockaddr)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        sock.settimeout(timeout)
        if deadline is not None:
            deadline.watch(sock)
        return sock
    raise error


class _Connecting:
    """What both connection classes add: connect to the pinned addresses (if any) within the
    deadline (if any), and put the connection under the deadline of every request it serves."""

    def __init__(self, *args: Any, pinned: tuple[tuple[int, Any], ...] | None = None,
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.pinned = pinned
        self._deadline: Deadline | None = None

    def _new_conn(self) -> socket.socket:
        deadline = _current.get()
        if self.pinned is None and deadline is None:
            return super()._new_conn()  # type: ignore[misc]
        self._deadline = deadline
        timeout = Timeout.resolve_default_timeout(self.timeout)  # type: ignore[attr-defined]
        try:
            if self.pinned is not None:
                candidates = list(self.pinned)
            else:
                assert deadline is not None  # neither pinned nor under a deadline: urllib3's
                candidates = resolve(self._dns_host, self.port, deadline)  # type: ignore
            return connect(candidates, timeout, deadline, self._prepare)
        except socket.gaierror as exc:
            raise NameResolutionError(self.host, self, exc) from exc  # type: ignore
        except ssrf.Unresolved as exc:
            raise ConnectTimeoutError(  # type: ignore[arg-type]
                self, f"Resolving {self.host} timed out.") from exc  # type: ignore
        except TimeoutError as exc:
            raise ConnectTimeoutError(  # type: ignore[arg-type]
                self, f"Connection to {self.host} timed out.") from exc  # type: ignore
        except OSError as exc:
            raise NewConnectionError(  # type: ignore[arg-type]
                self, f"Failed to establish a new connection: {exc}") from exc

    def _prepare(self, sock: socket.socket) -> None:
        for option in self.socket_options or ():  # type: ignore[attr-defined]
            sock.setsockopt(*option)
        if self.source_address:  # type: ignore[attr-defined]
            sock.bind(self.source_address)  # type: ignore[attr-defined]

    def request(self, *args: Any, **kwargs: Any) -> None:
        deadline = _current.get()
        sock = self.sock  # type: ignore[attr-defined]
        if deadline is not None and sock is not None and self._deadline is not deadline:
            self._deadline = deadline  # a kept-alive connection, made under an earlier deadline
            deadline.watch(sock)
        super().request(*args, **kwargs)  # type: ignore[misc]


class _Connection(_Connecting, HTTPConnection):
    pass


class _TLSConnection(_Connecting, HTTPSConnection):
    pass


class _Pool(HTTPConnectionPool):
    ConnectionCls = _Connection


class _TLSPool(HTTPSConnectionPool):
    ConnectionCls = _TLSConnection


_POOLS = {"http": _Pool, "https": _TLSPool}


class _PoolManager(PoolManager):
    def __init__(self, *args: Any, pin: Target | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.pool_classes_by_scheme = _POOLS  # type: ignore[assignment]
        self.pin = pin

    def _new_pool(self, scheme: str, host: str, port: int,
                  request_context: dict[str, Any] | None = None) -> HTTPConnectionPool:
        pin = self.pin
        if pin is not None and (host.strip("[]").lower(), port) != (pin.host, pin.port):
            raise LocationValueError(f"this session only calls {pin.host}:{pin.port}")
        pool = super()._new_pool(scheme, host, port, request_context)
        if pin is not None and pin.addresses is not None:
            pool.conn_kw["pinned"] = pin.addresses
        return pool


class _Adapter(HTTPAdapter):
    def __init__(self, pin: Target | None = None):
        self.pin = pin  # before super().__init__, which makes the pool manager
        super().__init__()

    def init_poolmanager(self, connections: int, maxsize: int, block: bool = False,
                         **pool_kwargs: Any) -> None:
        self._pool_connections = connections
        self._pool_maxsize = maxsize
        self._pool_block = block
        self.poolmanager = _PoolManager(num_pools=connections, maxsize=maxsize, block=block,
                                        pin=self.pin, **pool_kwargs)

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        manager.pool_classes_by_scheme = _POOLS  # the deadline applies through a proxy too
        return manager

    def send(self, request: Any, stream: bool = False, timeout: Any = None,
             verify: Any = True, cert: Any = None, proxies: Any = None) -> Any:
        if self.pin is not None:
            proxies = None  # a proxy would resolve the name again: connect to the pin directly
        return super().send(request, stream=stream, timeout=timeout, verify=verify, cert=cert,
                            proxies=proxies)


def new_session(pin: Target | None = None) -> requests.Session:
    """One connection pool per sink instance. requests does not retry by itself (max_retries 0),
    so one call to `send` is one request on the wire.

    With `pin` (an `ingest.ssrf.Target`), the session calls only `pin.host` and `pin.port`, and
    connects only to `pin.addresses` (unless they are None: an allow-listed name, resolved as
    usual); call `pin.url`. Every session honours the `Deadline` its caller sets.

    The host's environment adds nothing (requests' trust_env is off): no credentials from
    ~/.netrc or $NETRC (they would replace the CRM's auth header and reach every subscriber), no
    HTTP(S)_PROXY. A CA bundle named by REQUESTS_CA_BUNDLE or CURL_CA_BUNDLE is still trusted
    for https (a CRM behind a private CA), as requests itself would."""
    session = requests.Session()
    session.trust_env = False
    session.verify = _ca_bundle() or True
    session.headers["User-Agent"] = USER_AGENT
    adapter = _Adapter(pin)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def _ca_bundle() -> str | None:
    """The CA bundle requests would read from the environment (trust, never credentials)."""
    return os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or None
