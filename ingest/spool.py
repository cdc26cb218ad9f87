"""A local append-only spool: ingest keeps acknowledging truthfully while Redis is down.

With `LEADPIPE_SPOOL_DIR` set, a body Redis cannot take is appended to this process' spool
file and fsynced before the endpoint answers 202. A drainer thread in every API process moves
spooled records to the stream once Redis answers, oldest first, then empties the file. A crash
between the hand-over and the emptying hands a record over twice: its dedup key makes the second
a counted duplicate, nothing more.

Files of one spool: `spool-<pid>-<ns>.bin` (the records), `.live` beside it (a lock its
writing process holds for as long as it writes to it: the drainer deletes an emptied file only
once nobody holds it, whatever the process or PID namespace), and `.pos` while a drain is half
done (where the records already on the stream end, and the last one's id: Redis took the first
chunks and refused the next, e.g. out of memory; each chunk is a MULTI/EXEC, run whole or
not). A record appended to a file that was deleted or moved meanwhile (a cleaner, a person)
is written again to a new file before the answer, never acknowledged from a file nobody will
drain.

Record: 4-byte length + JSON header {"i": event id, "t": received ms, "h": hint, "k": stream
key} + 4-byte length + the body. A drainer hands over only the files of its own stream key
(several namespaces may share a folder); a file of records without "k" (an earlier version's)
is taken for its own. A write the disk cuts short is taken back (the file is truncated to where
the record began) and the append fails, so the endpoint answers 503. Whatever the drainer
cannot decode (a torn record a crash left at the end, never acknowledged, or damaged bytes) is
not deleted: once the records before it are handed over, it is moved aside to a
`<file>.<time_ns>.bad` file next to it, logged, and the drainer goes on.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import struct
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis

log = logging.getLogger("leadpipe.spool")
_LEN = struct.Struct(">I")


def encode(event_id: str, received_ms: int, body: bytes, hint: str | None,
           key: str | None = None) -> bytes:
    fields: dict[str, Any] = {"i": event_id, "t": received_ms, "h": hint}
    if key is not None:
        fields["k"] = key
    header = json.dumps(fields).encode()
    return _LEN.pack(len(header)) + header + _LEN.pack(len(body)) + body


def _valid_header(header: Any) -> bool:
    return (isinstance(header, dict) and isinstance(header.get("i"), str)
            and isinstance(header.get("t"), int) and not isinstance(header["t"], bool)
            and (header.get("h") is None or isinstance(header["h"], str))
            and (header.get("k") is None or isinstance(header["k"], str)))


def parse(data: bytes, ends: list[int] | None = None,
          ) -> tuple[list[tuple[dict[str, Any], bytes]], int, str | None]:
    """The well-formed records at the start of a spool file's bytes, the offset where they end,
    and why the bytes from there on are not a record (None when there are none). `ends`, if
    given, gets the offset where each record ends."""
    records: list[tuple[dict[str, Any], bytes]] = []
    at = 0
    while at < len(data):
        if at + 4 > len(data):
            return records, at, "an incomplete record at the end"
        (size,) = _LEN.unpack_from(data, at)
        body_at = at + 4 + size
        if body_at + 4 > len(data):
            return records, at, "an incomplete record at the end"
        try:
            header = json.loads(data[at + 4:body_at])
        except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError included
            return records, at, "a record header that is not JSON"
        if not _valid_header(header):
            return records, at, "a record header without a valid event id and time"
        (size,) = _LEN.unpack_from(data, body_at)
        end = body_at + 4 + size
        if end > len(data):
            return records, at, "an incomplete record at the end"
        records.append((header, data[body_at + 4:end]))
        if ends is not None:
            ends.append(end)
        at = end
    return records, at, None


def decode(data: bytes) -> Iterator[tuple[dict[str, Any], bytes]]:
    """The complete, well-formed records of a spool file, in order (up to the first bad one)."""
    yield from parse(data)[0]


def _write_all(fd: int, data: bytes) -> None:
    """os.write until all of `data` is written; OSError if the disk takes no more."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError(errno.ENOSPC, "the spool disk took no more bytes")
        view = view[written:]


def _fsync_dir(directory: Path) -> None:
    """Make a file's creation (its directory entry) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# A spool file is closed for writing once it holds this much (the next record starts a new
# one), so a drainer reads a bounded file into memory however long Redis stays away.
FILE_BYTES = 64 * 1024 * 1024
CHUNK = 100  # records a drain hands over in one MULTI/EXEC


def _read_all(fd: int, size: int) -> bytes:
    """The first `size` bytes of the file (a single pread may return fewer: Linux gives at
    most 2 GiB per call)."""
    parts, at = [], 0
    while at < size:
        part = os.pread(fd, size - at, at)
        if not part:
            break  # the file is shorter than it was: parse() sees the end where it is
        parts.append(part)
        at += len(part)
    return b"".join(parts)


class Spool:
    """This process' spool file, and the drainer that empties every spool file of the folder."""

    def __init__(self, directory: str | Path, client: redis.Redis, stream_key: str,
                 interval: float = 1.0, max_file_bytes: int = FILE_BYTES, chunk: int = CHUNK):
        self.dir = Path(directory)
        self.max_file_bytes = max_file_bytes
        self.chunk = chunk
        self.client = client
        self.key = stream_key
        self.interval = interval
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._live: int | None = None  # the .live lock of the file this process writes to
        self._path: Path | None = None  # where that file must still be for a drainer to find it
        self._pid = 0
        self._drainer: threading.Thread | None = None
        self._stopping = threading.Event()
        self._bypass_until = 0.0  # monotonic time until which requests spool without Redis
        # what this drainer handed over of a file it could not empty, by path: (inode, byte
        # where those records end, the last one's id). The .pos mark says the same for other
        # processes and later lives, but writing it needs disk space a full disk refuses: this
        # keeps the drainer from sending those records again every round meanwhile
        self._sent: dict[str, tuple[int, int, str]] = {}
        self._bypass_lock = threading.Lock()
        # descriptors the drainer has open (and may hold a lock through): a forked child
        # closes its copies, else its copy would keep the lock, and every drainer would skip
        # that file for as long as the child lives. Opened and closed under `_held_lock`,
        # which a fork waits for, so none is ever open but untracked at the fork.
        self._held: set[int] = set()
        self._held_lock = threading.Lock()
        ref = weakref.ref(self)
        os.register_at_fork(
            before=lambda: (spool := ref()) and spool._held_lock.acquire(),
            after_in_parent=lambda: (spool := ref()) and spool._held_lock.release(),
            after_in_child=lambda: (spool := ref()) and spool._after_fork())

    def _after_fork(self) -> None:
        """In a forked child: the parent's files and locks stay the parent's. Runs before the
        child can reuse a descriptor number, so closing our copies closes nothing else."""
        inherited = (self._fd, self._live, *self._held)
        self._fd = self._live = None
        self._held = set()
        self._lock = threading.Lock()  # another thread may have held it at the fork
        self._held_lock = threading.Lock()
        self._drainer = None
        for fd in inherited:
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _open_held(self, path: Path) -> int:
        """Open `path` for the drainer (FileNotFoundError if it is gone), tracked for forks."""
        with self._held_lock:
            fd = os.open(path, os.O_RDWR)
            self._held.add(fd)
        return fd

    def _close_held(self, fd: int) -> None:
        with self._held_lock:
            self._held.discard(fd)
            os.close(fd)

    # After Redis failed a request, the requests of the next BYPASS_SECONDS spool at once,
    # then one tries Redis again while the others go on spooling: a Redis that hangs costs a
    # request its timeout once a period, not every request (each would hold a request thread
    # that long, and the queue behind them would pass RD's 5 s).
    BYPASS_SECONDS = 1.0

    def redis_allowed(self) -> bool:
        """Should this request try Redis (or spool at once)?"""
        if not self._bypass_until:
            return True
        with self._bypass_lock:
            now = time.monotonic()
            if now < self._bypass_until:
                return False
            self._bypass_until = now + self.BYPASS_SECONDS  # this one tries; the others spool
            return True

    def redis_failed(self) -> None:
        self._bypass_until = time.monotonic() + self.BYPASS_SECONDS

    def redis_answered(self) -> None:
        if self._bypass_until:
            self._bypass_until = 0.0

    def _own_fd(self) -> int:
        if self._pid != os.getpid():  # forked: _after_fork closed what was the parent's
            self._fd = self._live = None
        while self._fd is None:
            made = not self.dir.exists()
            self.dir.mkdir(parents=True, exist_ok=True)
            stem = self.dir / f"spool-{os.getpid()}-{time.time_ns()}"
            live_path, path = stem.with_suffix(".live"), stem.with_suffix(".bin")
            live = fd = None
            try:  # the lock first: no drainer may take the new file for an abandoned one
                live = os.open(live_path, os.O_RDWR | os.O_CREAT, 0o600)
                fcntl.flock(live, fcntl.LOCK_SH)
                if os.fstat(live).st_nlink == 0:  # a sweep took it for a leftover meanwhile
                    os.close(live)
                    continue
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
                # a record acknowledged in it must not vanish with the file on power loss
                _fsync_dir(self.dir)
                if made:
                    _fsync_dir(self.dir.parent)
            except BaseException:
                for opened in (fd, live):
                    if opened is not None:
                        os.close(opened)
                path.unlink(missing_ok=True)
                live_path.unlink(missing_ok=True)
                raise
            self._fd, self._live, self._pid, self._path = fd, live, os.getpid(), path
        return self._fd

    def _in_place(self, fd: int) -> bool:
        """Is the file still where the drainers look: not deleted, nor moved with its folder?"""
        try:
            return os.stat(self._path).st_ino == os.fstat(fd).st_ino if self._path else False
        except FileNotFoundError:
            return False

    def _retire(self) -> None:
        """Stop writing to the current file (full, torn, or deleted): the next record goes to a
        new one, and the drainer may delete this one once it is empty."""
        for opened in (self._fd, self._live):
            if opened is not None:
                os.close(opened)
        self._fd = self._live = None

    def append(self, event_id: str, body: bytes, hint: str | None) -> None:
        """Durably spool one body, or raise OSError with nothing of it left in the spool."""
        record = encode(event_id, time.time_ns() // 1_000_000, body, hint, self.key)
        with self._lock:
            for _ in range(2):
                if self._append(record):
                    break
            else:
                raise OSError(errno.ENOENT, "spool files are deleted as they are written")
        self.start()

    def _append(self, record: bytes) -> bool:
        """Write and fsync one record; False if its file turned out to be deleted (the record
        is then in no file anyone will drain: write it again)."""
        fd = self._own_fd()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            # a drainer holds it, most likely waiting on the Redis that just failed us: the
            # record goes to a new file rather than wait (RD gives up on an answer after 5 s)
            self._retire()
            fd = self._own_fd()
            fcntl.flock(fd, fcntl.LOCK_EX)  # new and empty: a drainer lets go of it at once
        kept, full, linked = True, False, True
        try:
            start = os.fstat(fd).st_size  # the end: only lock holders write or truncate
            try:
                _write_all(fd, record)
                os.fsync(fd)
            except BaseException:
                kept = self._take_back(fd, start)
                raise
            linked = self._in_place(fd)
            full = start + len(record) >= self.max_file_bytes
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            # the next record goes to a new file: not behind a torn one, nor into a full one
            if not kept or full or not linked:
                self._retire()
        if not linked:
            log.error("spool: the spool file was deleted or moved while in use; writing to a "
                      "new one")
        return linked

    @staticmethod
    def _take_back(fd: int, start: int) -> bool:
        """Truncate a record the disk cut short; False if that failed too."""
        try:
            os.ftruncate(fd, start)
            os.fsync(fd)
        except OSError:
            log.error("spool: a short write could not be taken back; using a new spool file")
            return False
        return True

    def start(self) -> None:
        """Run the drainer in this process (once; again after a fork)."""
        if self._drainer is None or not self._drainer.is_alive():
            self._stopping.clear()
            self._drainer = threading.Thread(target=self._run, name="leadpipe-spool",
                                             daemon=True)
            self._drainer.start()

    def stop(self, timeout: float = 10.0) -> None:
        """End the drainer after its current round (for tests; the process' end ends it too)."""
        self._stopping.set()
        if self._drainer is not None:
            self._drainer.join(timeout)

    def _run(self) -> None:
        while not self._stopping.is_set():  # no error ends it: acknowledged bodies wait on it
            try:
                if self.drain():
                    self.redis_answered()  # Redis took records: requests may try it again
            except (redis.RedisError, OSError) as exc:
                log.debug("spool not drained yet: %s", type(exc).__name__)
            except Exception:
                log.exception("spool drainer: unexpected error; retrying")
            self._stopping.wait(self.interval)

    def files(self) -> list[Path]:
        """The spool files of the folder, oldest first."""
        found = []
        for path in self.dir.glob("spool-*.bin") if self.dir.exists() else ():
            try:
                found.append((path.stat().st_mtime, path))
            except FileNotFoundError:  # drained and deleted meanwhile by another process
                continue
        return [path for _, path in sorted(found)]

    def drain(self) -> int:
        """Hand every spooled record to the stream, oldest file first; returns how many.

        Raises RedisError while Redis refuses; a file that fails otherwise is logged and skipped
        (it stays as it is) so the other files are still drained."""
        moved = 0
        for path in self.files():
            try:
                moved += self._drain_file(path)
            except redis.RedisError:
                raise
            except Exception:
                log.exception("spool file not drained; the others are", extra={"path": str(path)})
        self._sweep_locks()
        return moved

    def _sweep_locks(self) -> None:
        """Delete .live files left without their .bin (a crash between the two creations), and
        .pos marks left without theirs."""
        if not self.dir.exists():
            return
        for live in self.dir.glob("spool-*.live"):
            if not live.with_suffix(".bin").exists():
                self._unlink_if_abandoned(live, live.with_suffix(".bin"))
        for mark in (*self.dir.glob("spool-*.pos"), *self.dir.glob("spool-*.pos-new")):
            if not mark.with_suffix(".bin").exists():
                mark.unlink(missing_ok=True)

    def _drain_file(self, path: Path) -> int:
        try:
            fd = self._open_held(path)
        except FileNotFoundError:
            return 0
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return 0  # another process is draining it, or its writer is writing
            size = os.fstat(fd).st_size
            if not size:
                path.with_suffix(".pos").unlink(missing_ok=True)
                self._forget(path)
                return 0
            data = _read_all(fd, size)
            ends: list[int] = []
            records, end, problem = parse(data, ends)
            if records and records[0][0].get("k", self.key) != self.key:
                return 0  # another pipeline's (its namespace shares the folder): its own drains it
            inode = os.fstat(fd).st_ino
            done = self._done(path, records, ends, self._sent.get(str(path)), inode)
            sent = done
            try:
                now_ms = time.time_ns() // 1_000_000
                for first in range(done, len(records), self.chunk):
                    # MULTI/EXEC: Redis runs a chunk whole or, refusing one command (out of
                    # memory), none of it; so what is on the stream is always a prefix
                    pipe = self.client.pipeline(transaction=True)
                    for header, body in records[first:first + self.chunk]:
                        # "w": how long it waited here, on this host's clock as "t" is, so
                        # the stream's age of it needs no other host's clock (workers/status)
                        fields: dict[str, Any] = {"i": header["i"], "t": header["t"], "b": body,
                                                  "w": max(0, now_ms - header["t"])}
                        if header.get("h"):
                            fields["h"] = header["h"]
                        pipe.xadd(self.key, fields)
                    pipe.execute()
                    sent = min(first + self.chunk, len(records))
            except redis.RedisError:
                if sent > done:  # the next drain starts after them, not at the head again
                    self._mark(path, inode, records[sent - 1][0]["i"], ends[sent - 1])
                raise
            if problem is not None:
                # after the records went: setting the rest aside takes disk space, which a
                # full disk refuses, and the records before it need none to be handed over
                try:
                    self._set_aside(path, fd, data, end, problem)
                except OSError:
                    if sent > done:
                        self._mark(path, inode, records[sent - 1][0]["i"], ends[sent - 1])
                    raise
            pos = path.with_suffix(".pos")
            if pos.exists():  # before emptying: a crash between the two re-sends, never skips
                pos.unlink()
                _fsync_dir(self.dir)
            os.ftruncate(fd, 0)
            os.fsync(fd)
            self._sent.pop(str(path), None)
            log.warning("spool drained", extra={"records": len(records) - done})
            self._forget(path)
            return len(records) - done
        finally:
            self._close_held(fd)

    @staticmethod
    def _done(path: Path, records: list[tuple[dict[str, Any], bytes]], ends: list[int],
              remembered: tuple[int, int, str] | None = None, inode: int = 0) -> int:
        """How many records of `path` a half-done drain handed over: its .pos names the byte
        where they end and the last one's event id (or this drainer `remembered` so, for the
        file of that `inode`). A mark that does not fit the file as it is (emptied and written
        again, by another version or a person) counts for nothing: its records go again, as
        duplicates the workers count, never skipped."""
        marks = []
        if remembered is not None and remembered[0] == inode:
            marks.append(remembered[1:])
        try:
            offset, event_id = path.with_suffix(".pos").read_text().split(" ", 1)
            marks.append((int(offset), event_id))
        except (FileNotFoundError, ValueError):
            pass
        best = 0
        for offset, event_id in marks:
            if offset in ends:
                count = ends.index(offset) + 1
                if records[count - 1][0]["i"] == event_id:
                    best = max(best, count)
        return best

    def _mark(self, path: Path, inode: int, event_id: str, offset: int) -> None:
        """Remember, then record in .pos, where the records handed over end (the .pos write
        may fail on a full disk: the memory still keeps this drainer from repeating them)."""
        self._sent[str(path)] = (inode, offset, event_id)
        self._set_done(path, event_id, offset)

    def _set_done(self, path: Path, event_id: str, offset: int) -> None:
        pos, tmp = path.with_suffix(".pos"), path.with_suffix(".pos-new")
        tmp_fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            _write_all(tmp_fd, f"{offset} {event_id}".encode())
            os.fsync(tmp_fd)
        finally:
            os.close(tmp_fd)
        os.replace(tmp, pos)
        _fsync_dir(self.dir)
        log.warning("spool drain half done: Redis refused the rest",
                    extra={"path": str(path), "offset": offset})

    def _set_aside(self, path: Path, fd: int, data: bytes, start: int, problem: str) -> None:
        """Move the bytes of `path` from `start` on (not a record) to a .bad file next to it, so
        that its records before them can be drained. Raises OSError with `path` unchanged if the
        .bad file cannot be written."""
        bad = path.with_name(f"{path.name}.{time.time_ns()}.bad")
        out = os.open(bad, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            try:
                _write_all(out, data[start:])
                os.fsync(out)
            finally:
                os.close(out)
            _fsync_dir(self.dir)
        except BaseException:
            bad.unlink(missing_ok=True)
            raise
        os.ftruncate(fd, start)
        os.fsync(fd)
        log.error("spool: %s at byte %d of %s; %d byte(s) moved aside to %s", problem, start,
                  path, len(data) - start, bad,
                  extra={"path": str(path), "moved_to": str(bad), "offset": start,
                         "reason": problem})

    def _forget(self, path: Path) -> None:
        """Delete an empty file nobody writes to any more: its .live lock is free (the process
        that wrote to it moved on or is gone, in any PID namespace)."""
        self._unlink_if_abandoned(path.with_suffix(".live"), path)

    def _unlink_if_abandoned(self, live: Path, path: Path) -> None:
        try:
            lock = self._open_held(live)
        except FileNotFoundError:  # a file from a version without .live: its pid tells
            pid = path.name.split("-")[1]
            if (not pid.isdigit() or int(pid) == os.getpid()
                    or not Path(f"/proc/{pid}").exists()):
                path.unlink(missing_ok=True)
            return
        try:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return  # its writer holds it: it may append at any moment
            path.unlink(missing_ok=True)
            live.unlink(missing_ok=True)
        finally:
            self._close_held(lock)

    def pending(self) -> int:
        """Records waiting in the spool (for status and tests)."""
        total = 0
        for path in self.files():
            try:
                total += len(parse(path.read_bytes())[0])
            except FileNotFoundError:
                continue
        return total

    def set_aside(self) -> list[Path]:
        """The .bad files: bytes that were not records, kept for a person to look at."""
        return sorted(self.dir.glob("spool-*.bad")) if self.dir.exists() else []
