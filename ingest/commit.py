"""Stream writers of the request path: group commit, or one connection per request thread."""

from __future__ import annotations

import os
import queue
import threading
import weakref

import redis


class _Pending:
    __slots__ = ("command", "done", "error")

    def __init__(self, command: tuple):
        self.command = command
        self.done = threading.Lock()
        self.done.acquire()  # released by the writer once the entry is written, or failed
        self.error: BaseException | None = None


class GroupCommit:
    """Appends to a Redis stream for many request threads at once.

    Each caller blocks until its entry is written (with the server's fsync policy applied, as a
    single XADD would), but the callers waiting at the same moment share one pipelined round
    trip on the writer thread's own connection and, with `appendfsync always`, one fsync. A
    caller whose write failed (or whose reply never came) gets the error, so no caller is ever
    answered 2xx for an entry that is not on the stream. The hand-off is a C queue and a plain
    lock per call: no Condition or Event objects, whose Python-level locking cost more per
    request than the shared write saved.
    """

    def __init__(self, client: redis.Redis, key: str, max_batch: int = 256,
                 timeout: float = 5.0):
        pool = client.connection_pool
        self._connect = lambda: pool.connection_class(**pool.connection_kwargs)
        self.key = key
        self.max_batch = max_batch
        self.timeout = timeout
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._pid = 0
        self._start = threading.Lock()

    def _ensure_writer(self) -> None:
        # one writer per process, started after a fork (gunicorn forks after loading the app)
        with self._start:
            if self._pid != os.getpid():
                self._queue = queue.SimpleQueue()
                threading.Thread(target=self._run, args=(self._queue,), daemon=True,
                                 name="leadpipe-group-commit").start()
                self._pid = os.getpid()  # last: a caller that sees it finds the new queue

    def append(self, fields: dict) -> None:
        """Write one entry; returns when it is on the stream, raises RedisError if it is not."""
        command: list = ["XADD", self.key, "*"]
        for item in fields.items():
            command += item
        pending = _Pending(tuple(command))
        if self._pid != os.getpid():
            self._ensure_writer()
        self._queue.put(pending)
        if not pending.done.acquire(timeout=self.timeout):
            raise redis.TimeoutError("the stream write did not complete in time")
        if pending.error is not None:
            raise pending.error

    def close(self) -> None:
        """Stop the writer once what is queued is written, and close its connection."""
        self._queue.put(None)

    def _run(self, waiting: queue.SimpleQueue[_Pending | None]) -> None:
        conn = None
        while True:
            first = waiting.get()
            if first is None:
                if conn is not None:
                    conn.disconnect()
                return
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    more = waiting.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    waiting.put(more)  # close() after this batch
                    break
                batch.append(more)
            answered = 0
            try:
                if conn is None:
                    conn = self._connect()
                conn.send_packed_command(conn.pack_commands([p.command for p in batch]))
                for pending in batch:
                    try:
                        conn.read_response()
                    except redis.ResponseError as exc:  # this entry refused, the rest not
                        pending.error = exc
                    answered += 1
            except Exception as exc:  # no reply: written or not, those callers get the error
                if conn is not None:
                    conn.disconnect()
                for pending in batch[answered:]:
                    pending.error = exc
            for pending in batch:
                pending.done.release()


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
