"""A TCP proxy that can freeze (connections stay open, bytes go nowhere: a server that hangs),
hold replies back (a server that does the work but answers late) or cut every connection (a
server that is down)."""

from __future__ import annotations

import socket
import threading
import time


class FreezingProxy:
    """Forwards 127.0.0.1:`port` to `target` until `freeze()`: from then on it takes new
    connections and every byte sent, and answers nothing, as a frozen server or a half-open
    network path does."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.frozen = threading.Event()
        self.down = threading.Event()
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.reply_delay = 0.0  # seconds each chunk from the server waits before it is passed on
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def freeze(self) -> None:
        self.frozen.set()

    def thaw(self) -> None:
        """Forward again (what was swallowed meanwhile stays lost; cut connections stay cut)."""
        self.frozen.clear()
        self.down.clear()

    def cut(self) -> None:
        """Close every connection, and each new one at once, until `thaw()`."""
        self.down.set()
        with self._lock:
            for end in list(self._open):
                _close(end)

    def close(self) -> None:
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
                if self.down.is_set():
                    _close(client)
                    continue
                upstream = socket.create_connection(self.target)
            except OSError:
                return
            with self._lock:
                self._open.update((client, upstream))
            for a, b, replies in ((client, upstream, False), (upstream, client, True)):
                threading.Thread(target=self._pipe, args=(a, b, replies), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, replies: bool) -> None:
        try:
            while data := source.recv(65536):
                if replies and self.reply_delay:
                    time.sleep(self.reply_delay)
                if not self.frozen.is_set():  # else swallowed
                    sink.sendall(data)
        except OSError:
            pass
        finally:  # either side gone: both ends closed, the other pipe ends too
            with self._lock:
                for end in (source, sink):
                    _close(end)
                    self._open.discard(end)


def _close(end: socket.socket) -> None:
    try:
        end.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    end.close()
