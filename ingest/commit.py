"""Stream writers of the request path: group commit, or one connection per request thread."""

from __future__ import annotations

import os
import threading
import weakref
from typing import Any

import redis


class _Pending:
    __slots__ = ("command", "done", "error", "lead")

    def __init__(self, command: tuple):
        self.command = command
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
        pool = client.connection_pool
        self._connect = lambda: pool.connection_class(**pool.connection_kwargs)
        self.key = key
        self.max_batch = max_batch
        self.timeout = timeout
        self._mutex = threading.Lock()
        self._queue: list[_Pending] = []
        self._busy = False  # a leader is writing
        self._conn: Any = None  # used by the leader only
        self._pid = os.getpid()

    def append(self, fields: dict) -> None:
        """Write one entry; returns when it is on the stream, raises RedisError if it is not."""
        command: list = ["XADD", self.key, "*"]
        for item in fields.items():
            command += item
        pending = _Pending(tuple(command))
        with self._mutex:
            if self._pid != os.getpid():  # a forked child shares no socket and no waiters
                self._queue, self._busy, self._conn = [], False, None
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
        self._write()
        if pending.error is not None:
            raise pending.error

    def _write(self) -> None:
        """As leader: write what is queued, hand the lead on, release the callers written for."""
        with self._mutex:
            batch = self._queue[:self.max_batch]
            del self._queue[:self.max_batch]
        answered = 0
        try:
            if self._conn is None:
                self._conn = self._connect()
            self._conn.send_packed_command(self._conn.pack_commands([p.command for p in batch]))
            for pending in batch:
                try:
                    self._conn.read_response()
                except redis.ResponseError as exc:  # this entry refused, the rest not
                    pending.error = exc
                answered += 1
        except Exception as exc:  # no reply: written or not, those callers get the error
            if self._conn is not None:
                self._conn.disconnect()
            for pending in batch[answered:]:
                pending.error = exc
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
            if self._conn is not None and not self._busy:
                self._conn.disconnect()


class ThreadWriter:
    """Appends to a Redis stream over a connection owned by the calling thread.

    No hand-off between threads and no pool lock per request: each request thread sends its
    XADD and waits for the reply (which, with `appendfsync always`, Redis sends after the
    fsync). Redis itself shares one fsync among the writes of all connections that arrive in
    the same event-loop turn.
    """

    def __init__(self, client: redis.Redis, key: str):
        pool = client.connection_pool
        self._connect = lambda: pool.connection_class(**pool.connection_kwargs)
        self.key = key
        self._local = threading.local()
        self._open: weakref.WeakSet = weakref.WeakSet()  # the threads' connections, for close()

    def append(self, fields: dict) -> None:
        """Write one entry; returns when it is on the stream, raises RedisError if it is not."""
        local = self._local
        conn = getattr(local, "conn", None)
        if conn is None or local.pid != os.getpid():  # a forked child never shares a socket
            conn = local.conn = self._connect()
            local.pid = os.getpid()
            self._open.add(conn)
        args: list = ["XADD", self.key, "*"]
        for item in fields.items():
            args += item
        try:
            conn.send_command(*args)
            conn.read_response()
        except BaseException:
            conn.disconnect()  # a half-read reply must not be taken for the next request's
            raise

    def close(self) -> None:
        """Close every thread's connection (a thread's next append opens a new one)."""
        for conn in list(self._open):
            conn.disconnect()
