"""Stream writers of the request path: group commit, or one connection per request thread."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
import weakref
from collections.abc import Callable

import hiredis
import redis


class _Pending:
    __slots__ = ("command", "deadline", "done", "error", "lead")

    def __init__(self, command: bytes, deadline: float):
        self.command = command
        self.deadline = deadline  # time.monotonic() by which its caller must have an answer
        self.done = threading.Lock()
        self.done.acquire()  # released once the entry is written or failed, or to hand the lead
        self.error: BaseException | None = None
        self.lead = False


class GroupCommit:
    """Appends to a Redis stream for many request threads at once.

    Each caller blocks until its entry is written (with the server's fsync policy applied, as a
    single XADD would), but the callers waiting at the same moment share one pipelined round
    trip and, with `appendfsync always`, one fsync. There is no writer thread: the caller that
    finds no write in progress leads, writing every entry queued by then, and hands the lead to
    the first caller queued behind that write; the others just wait for their own entry. A
    caller whose write failed (or whose reply never came) gets the error, so no caller is ever
    answered 2xx for an entry that is not on the stream.
    """

    def __init__(self, client: redis.Redis, key: str, max_batch: int = 256,
                 timeout: float = 5.0):
        self._connect = _Wire.opener(client)
        self.key = key
        self.max_batch = max_batch
        self.timeout = timeout
        self._mutex = threading.Lock()
        self._queue: list[_Pending] = []
        self._busy = False  # a leader is writing
        self._wire: _Wire | None = None  # used by the leader only
        self._pid = os.getpid()

    def append(self, fields: dict) -> None:
        """Write one entry; returns when it is on the stream, raises RedisError if it is not.
        Within `timeout` seconds in all: a caller handed the lead late writes with what is
        left of its time, not a whole socket timeout more."""
        pending = _Pending(_xadd(self.key, fields), time.monotonic() + self.timeout)
        with self._mutex:
            if self._pid != os.getpid():  # a forked child shares no socket and no waiters
                self._queue, self._busy, self._wire = [], False, None
                self._pid = os.getpid()
            self._queue.append(pending)
            lead = not self._busy
            self._busy = True
        if not lead:
            if not pending.done.acquire(timeout=self.timeout):
                with self._mutex:
                    if not pending.lead:
                        if pending in self._queue:  # never written; nobody will lead it now
                            self._queue.remove(pending)
                        raise redis.TimeoutError("the stream write did not complete in time")
                pending.done.acquire()  # the lead was handed over just now: take it
            if not pending.lead:
                if pending.error is not None:
                    raise pending.error
                return
        self._write(pending.deadline)
        if pending.error is not None:
            raise pending.error

    def _write(self, deadline: float) -> None:
        """As leader (whose caller must have an answer by `deadline`): write what is queued,
        hand the lead on, release the callers written for."""
        with self._mutex:
            batch = self._queue[:self.max_batch]
            del self._queue[:self.max_batch]
        answered = 0
        try:
            left = deadline - time.monotonic()
            if left <= 0:  # the earlier writes took all of it: nothing sent, all told so
                raise redis.TimeoutError("the stream write did not complete in time")
            if self._wire is None:
                self._wire = self._connect(left)
            wire = self._wire
            wire.bound(max(0.001, deadline - time.monotonic()))
            wire.send(b"".join([p.command for p in batch]))
            for pending in batch:
                reply = wire.reply()
                if isinstance(reply, hiredis.ReplyError):  # this entry refused, the rest not
                    pending.error = redis.ResponseError(str(reply))
                answered += 1
        except BaseException as exc:  # no reply: written or not, those callers get the error
            if self._wire is not None:
                self._wire.close()
                self._wire = None
            # the waiters answer 503 for a RedisError; an interrupt of the leader's thread
            # (SystemExit, KeyboardInterrupt) is theirs as a lost connection, and the leader's
            error = exc if isinstance(exc, Exception) else redis.ConnectionError(
                f"the stream write was interrupted ({type(exc).__name__})")
            for pending in batch[answered:]:
                pending.error = error
            if error is not exc:
                raise
        finally:
            with self._mutex:
                if self._queue:  # callers came while this write ran: the first one leads next
                    self._queue[0].lead = True
                    self._queue[0].done.release()
                else:
                    self._busy = False
            for pending in batch:
                if not pending.lead:
                    pending.done.release()

    def close(self) -> None:
        """Close the connection (the next append opens a new one)."""
        with self._mutex:
            if self._wire is not None and not self._busy:
                self._wire.close()
                self._wire = None


def _xadd(key: str, fields: dict) -> bytes:
    """The XADD of one entry, in the wire format (RESP)."""
    args: list = ["XADD", key, "*"]
    for item in fields.items():
        args += item
    return hiredis.pack_command(tuple(args))


class _Wire:
    """The group commit's own connection: redis-py opens it (address, TLS, AUTH, SELECT,
    protocol), then the leader sends packed commands on its socket and parses the replies with
    hiredis — redis-py's per-command send and read path cost more CPU than the write itself.
    Every socket failure is raised as the redis-py error a plain client call would raise."""

    @staticmethod
    def opener(client: redis.Redis) -> Callable[..., _Wire]:
        """Opens a connection of its own with the client's settings (never one of its pool),
        its handshake within `limit` seconds when given (and shorter than the client's)."""
        pool = client.connection_pool
        kwargs = pool.connection_kwargs
        timeout = kwargs.get("socket_timeout")

        def open_wire(limit: float | None = None) -> _Wire:
            own = kwargs
            if limit is not None:
                own = {**kwargs, **{name: limit for name in ("socket_timeout",
                                                             "socket_connect_timeout")
                                    if kwargs.get(name) is None or kwargs[name] > limit}}
            return _Wire(pool.connection_class(**own), timeout)

        return open_wire

    def __init__(self, conn: redis.Connection, timeout: float | None):
        try:
            conn.connect()
        except BaseException:
            conn.disconnect()  # a handshake that failed half-way leaves no socket open
            raise
        self._conn = conn
        self._sock = sock = conn._sock
        self._reader = hiredis.Reader()
        # A blocking socket whose kernel timeouts stand for Python's: with a Python timeout every
        # send and receive would first poll(), two system calls more per batch.
        sock.settimeout(None)
        self._timeout = timeout or None
        self._bound = self._timeout  # what the socket's timeouts are now
        if self._timeout:
            self._set_timeouts(self._timeout)

    def _set_timeouts(self, seconds: float) -> None:
        whole, micro = int(seconds), int(seconds % 1 * 1e6)
        if not whole and not micro:
            micro = 1  # zero would mean no timeout at all
        value = struct.pack("ll", whole, micro)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)

    def bound(self, seconds: float) -> None:
        """Let the next send and replies wait at most `seconds` (or the connection's own
        timeout, if shorter): a system call only when that changes."""
        value = seconds if self._timeout is None or seconds < self._timeout else self._timeout
        if value != self._bound:
            self._set_timeouts(value)
            self._bound = value

    def send(self, data: bytes) -> None:
        try:
            self._sock.sendall(data)
        except (TimeoutError, BlockingIOError) as exc:
            raise redis.TimeoutError("timeout writing to the ingest stream") from exc
        except OSError as exc:
            raise redis.ConnectionError(f"error writing to the ingest stream: {exc}") from exc

    def reply(self) -> object:
        """The next reply; an error reply is returned (hiredis.ReplyError), not raised."""
        while True:
            try:
                reply = self._reader.gets()
            except hiredis.ProtocolError as exc:
                raise redis.ConnectionError(f"protocol error: {exc}") from exc
            if reply is not False:
                return reply
            try:
                data = self._sock.recv(65536)
            except (TimeoutError, BlockingIOError) as exc:
                raise redis.TimeoutError("timeout reading from the ingest stream") from exc
            except OSError as exc:
                raise redis.ConnectionError(f"error reading from the ingest stream: {exc}") from exc
            if not data:
                raise redis.ConnectionError("the ingest stream's server closed the connection")
            self._reader.feed(data)

    def close(self) -> None:
        self._conn.disconnect()

    def __del__(self) -> None:  # a request thread's connection, left when the thread ended
        conn = getattr(self, "_conn", None)
        if conn is not None:
            conn.disconnect()


class ThreadWriter:
    """Appends to a Redis stream over a connection owned by the calling thread.

    No hand-off between threads and no pool lock per request: each request thread sends its
    XADD and waits for the reply (which, with `appendfsync always`, Redis sends after the
    fsync). Redis itself shares one fsync among the writes of all connections that arrive in
    the same event-loop turn.
    """

    def __init__(self, client: redis.Redis, key: str):
        self._connect = _Wire.opener(client)
        self.key = key
        self._local = threading.local()
        self._open: weakref.WeakSet = weakref.WeakSet()  # the threads' connections, for close()

    def append(self, fields: dict) -> None:
        """Write one entry; returns when it is on the stream, raises RedisError if it is not."""
        local = self._local
        wire = getattr(local, "wire", None)
        if wire is None or local.pid != os.getpid():  # a forked child never shares a socket
            wire = local.wire = self._connect()
            local.pid = os.getpid()
            self._open.add(wire)
        try:
            wire.send(_xadd(self.key, fields))
            reply = wire.reply()
        except BaseException:
            wire.close()  # a half-read reply must not be taken for the next request's
            local.wire = None
            raise
        if isinstance(reply, hiredis.ReplyError):
            raise redis.ResponseError(str(reply))

    def close(self) -> None:
        """Close every thread's connection (a thread's next append opens a new one)."""
        for wire in list(self._open):
            wire.close()
