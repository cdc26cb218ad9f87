"""Simulated DNS at the resolver boundary, and an internal listener the SSRF guard must keep out.

`FakeDNS` replaces `_socket.getaddrinfo` only, where CPython's C code IDNA-2003-encodes a str host
before the lookup: everything above it (socket.getaddrinfo, urllib3's create_connection, the
guard) runs for real."""

from __future__ import annotations

import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import pytest


class FakeDNS:
    """Answers for some names, every other lookup going to the real resolver.

    `zone` maps an ASCII name to an address, or to a list of addresses given to its successive
    lookups (the last one repeats: a TTL-0 name that rebinds), or to the socket.gaierror a
    lookup of it raises. A str host is encoded with the
    "idna" codec (IDNA 2003) first, as Modules/socketmodule.c does: "straße" -> "strasse".
    `lookups` lists the names asked for, in order."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch,
                 zone: dict[str, str | Sequence[str] | socket.gaierror]):
        self.zone = zone
        self.lookups: list[str] = []
        real = socket._socket.getaddrinfo  # type: ignore[attr-defined]

        def getaddrinfo(host: Any, port: Any, family: int = 0, type: int = 0, proto: int = 0,
                        flags: int = 0) -> list:
            name = host.encode("idna").decode() if isinstance(host, str) else host.decode()
            if name not in self.zone:
                return real(host, port, family, type, proto, flags)
            asked = sum(1 for n in self.lookups if n == name)
            self.lookups.append(name)
            answer = self.zone[name]
            if isinstance(answer, socket.gaierror):
                raise answer
            address = answer if isinstance(answer, str) else answer[min(asked, len(answer) - 1)]
            af = socket.AF_INET6 if ":" in address else socket.AF_INET
            if family not in (0, af):
                return []
            sockaddr = (address, int(port), 0, 0) if af == socket.AF_INET6 else (address, int(port))
            return [(af, socket.SOCK_STREAM, 6, "", sockaddr)]

        monkeypatch.setattr(socket._socket, "getaddrinfo", getaddrinfo)  # type: ignore


@contextmanager
def internal_listener() -> Iterator[socket.socket]:
    """A listener on 127.0.0.2, standing for an internal service the guard must keep out."""
    with socket.create_server(("127.0.0.2", 0)) as listener:
        listener.setblocking(False)
        yield listener


def connected(listener: socket.socket) -> bool:
    """Whether anyone connected to `listener` (accepting and closing that connection)."""
    try:
        listener.accept()[0].close()
    except BlockingIOError:
        return False
    return True
