"""Stream writers of the request path: group commit, or one connection per request thread."""

from __future__ import annotations

import os
import threading

import redis


class _Pending:
    __slots__ = ("fields", "done", "error")

    def __init__(self, fields: dict):
        self.fields = fields
        self.done = threading.Event()
        self.error: BaseException | None = None


class GroupCommit:
    """Appends to a Redis stream for many request threads at once.

    Each caller blocks until its entry is written (with the server's fsync policy applied, as a
    single XADD would), but concurrent callers share one pipelined round trip and, with
    `appendfsync always`, one fsync. A failed write fails every caller of that round trip, so
    no caller is ever answered 2xx for an entry that is not on the stream.
    """

    def __init__(self, client: redis.Redis, key: str, max_batch: int = 256,
                 timeout: float = 5.0, linger: float = 0.0005):
        self.client = client
        self.key = key
        self.max_batch = max_batch
        self.timeout = timeout
        self.linger = linger
        self._cv = threading.Condition()
        self._queue: list[_Pending] = []
        self._pid = 0

    def _ensure_writer(self) -> None:
        # one writer per process, started after a fork (gunicorn forks after loading the app)
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._queue = []
            threading.Thread(target=self._run, name="leadpipe-group-commit", daemon=True).start()

    def append(self, fields: dict) -> None:
        """Write one entry; returns when it is on the stream, raises RedisError if it is not."""
        pending = _Pending(fields)
        with self._cv:
            self._ensure_writer()
            self._queue.append(pending)
            self._cv.notify()
        if not pending.done.wait(self.timeout):
            raise redis.TimeoutError("the stream write did not complete in time")
        if pending.error is not None:
            raise pending.error

    def _run(self) -> None:
        last = 1
        while True:
            with self._cv:
                while not self._queue:
                    self._cv.wait()
                if last > 1 and len(self._queue) < last:
                    # callers come back one by one after a batch: give them a moment to join
                    self._cv.wait(self.linger)
                batch = self._queue[:self.max_batch]
                del self._queue[:self.max_batch]
            last = len(batch)
            try:
                pipe = self.client.pipeline(transaction=False)
                for pending in batch:
                    pipe.xadd(self.key, pending.fields)
                pipe.execute()
            except Exception as exc:  # every caller of this round trip gets the error
                for pending in batch:
                    pending.error = exc
            for pending in batch:
                pending.done.set()


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

    def append(self, fields: dict) -> None:
        """Write one entry; returns when it is on the stream, raises RedisError if it is not."""
        local = self._local
        conn = getattr(local, "conn", None)
        if conn is None or local.pid != os.getpid():  # a forked child never shares a socket
            conn = local.conn = self._connect()
            local.pid = os.getpid()
        args: list = ["XADD", self.key, "*"]
        for item in fields.items():
            args += item
        try:
            conn.send_command(*args)
            conn.read_response()
        except BaseException:
            conn.disconnect()  # a half-read reply must not be taken for the next request's
            raise
