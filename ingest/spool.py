"""A local append-only spool: ingest keeps acknowledging truthfully while Redis is down.

With `LEADPIPE_SPOOL_DIR` set, a body Redis cannot take is appended to this process' spool
file and fsynced before the endpoint answers 202. A drainer thread in every API process moves
spooled records to the stream once Redis answers, oldest first, then empties the file. A crash
between the hand-over and the emptying hands a record over twice: its dedup key makes the second
a counted duplicate, nothing more.

Record: 4-byte length + JSON header {"i": event id, "t": received ms, "h": hint} + 4-byte length
+ the body. A torn record at the end (a crash mid-write: never acknowledged) is dropped.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis

log = logging.getLogger("leadpipe.spool")
_LEN = struct.Struct(">I")


def encode(event_id: str, received_ms: int, body: bytes, hint: str | None) -> bytes:
    header = json.dumps({"i": event_id, "t": received_ms, "h": hint}).encode()
    return _LEN.pack(len(header)) + header + _LEN.pack(len(body)) + body


def decode(data: bytes) -> Iterator[tuple[dict[str, Any], bytes]]:
    """The complete records of a spool file, in order."""
    at = 0
    while at + 4 <= len(data):
        (size,) = _LEN.unpack_from(data, at)
        if at + 4 + size + 4 > len(data):
            return
        header = json.loads(data[at + 4:at + 4 + size])
        at += 4 + size
        (size,) = _LEN.unpack_from(data, at)
        if at + 4 + size > len(data):
            return
        yield header, data[at + 4:at + 4 + size]
        at += 4 + size


class Spool:
    """This process' spool file, and the drainer that empties every spool file of the folder."""

    def __init__(self, directory: str | Path, client: redis.Redis, stream_key: str,
                 interval: float = 1.0):
        self.dir = Path(directory)
        self.client = client
        self.key = stream_key
        self.interval = interval
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._pid = 0
        self._drainer: threading.Thread | None = None

    def _own_fd(self) -> int:
        if self._fd is None or self._pid != os.getpid():  # a new file after a fork
            self.dir.mkdir(parents=True, exist_ok=True)
            path = self.dir / f"spool-{os.getpid()}-{time.time_ns()}.bin"
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            self._pid = os.getpid()
        return self._fd

    def append(self, event_id: str, body: bytes, hint: str | None) -> None:
        """Durably spool one body (raises OSError if the disk refuses)."""
        record = encode(event_id, time.time_ns() // 1_000_000, body, hint)
        with self._lock:
            fd = self._own_fd()
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                os.write(fd, record)
                os.fsync(fd)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        self.start()

    def start(self) -> None:
        """Run the drainer in this process (once; again after a fork)."""
        if self._drainer is None or not self._drainer.is_alive():
            self._drainer = threading.Thread(target=self._run, name="leadpipe-spool",
                                             daemon=True)
            self._drainer.start()

    def _run(self) -> None:
        while True:
            try:
                self.drain()
            except (redis.RedisError, OSError) as exc:
                log.debug("spool not drained yet: %s", type(exc).__name__)
            time.sleep(self.interval)

    def files(self) -> list[Path]:
        return sorted(self.dir.glob("spool-*.bin"), key=lambda p: p.stat().st_mtime) \
            if self.dir.exists() else []

    def drain(self) -> int:
        """Hand every spooled record to the stream, oldest file first; returns how many."""
        moved = 0
        for path in self.files():
            moved += self._drain_file(path)
        return moved

    def _drain_file(self, path: Path) -> int:
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            return 0
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return 0  # another process is draining it, or its writer is writing
            size = os.fstat(fd).st_size
            if not size:
                self._forget(path, fd)
                return 0
            data = os.pread(fd, size, 0)
            records = list(decode(data))
            if records:
                pipe = self.client.pipeline(transaction=False)
                for header, body in records:
                    fields: dict[str, Any] = {"i": header["i"], "t": header["t"], "b": body}
                    if header.get("h"):
                        fields["h"] = header["h"]
                    pipe.xadd(self.key, fields)
                pipe.execute()  # raises if Redis is still down: the file stays as it is
            os.ftruncate(fd, 0)
            os.fsync(fd)
            log.warning("spool drained", extra={"records": len(records)})
            self._forget(path, fd)
            return len(records)
        finally:
            os.close(fd)

    def _forget(self, path: Path, fd: int) -> None:
        """Delete an empty file whose writer is gone (another process' file, or an old one)."""
        mine = self._fd is not None and os.fstat(self._fd).st_ino == os.fstat(fd).st_ino \
            if self._pid == os.getpid() else False
        if not mine:
            pid = path.name.split("-")[1]
            if not pid.isdigit() or not Path(f"/proc/{pid}").exists():
                path.unlink(missing_ok=True)

    def pending(self) -> int:
        """Records waiting in the spool (for status and tests)."""
        return sum(len(list(decode(p.read_bytes()))) for p in self.files())
