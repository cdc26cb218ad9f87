"""SSRF guard: a subscriber URL must reach the public internet, unless an allow-list admits it.

Leadpipe calls subscriber URLs from inside the network it runs in (the probe, then every
delivery). Without this guard, whoever holds an API token could make it call the cloud metadata
service (169.254.169.254), a database port on localhost, or any host of the private network.

`check_url` answers a `Target`: the URL exactly as the HTTP client sends it (an internationalized
host in the ASCII form requests connects to, so the name checked is the name called) and the
addresses it checked. The caller connects to those addresses only
(`sinks.transport.new_session(pin=)`): the name is resolved once, so a DNS answer that changes
between the check and the connection (rebinding) cannot lead anywhere the check did not see.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import requests
from urllib3.util import parse_url

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[..., list]
SockAddr = tuple[Any, ...]

_METADATA = ipaddress.ip_address("169.254.169.254")


class Refused(ValueError):
    """The URL's host is, or resolves to, an address subscriptions may not reach.

    The message is for whoever gave the URL: it names the host and why, never the addresses a
    name resolved to (those are in `detail`, for the server's log), so the API does not tell
    its callers what an internal name points at."""

    def __init__(self, message: str, detail: str = ""):
        super().__init__(message)
        self.detail = detail


class Unresolved(Refused):
    """The host name could not be looked up. `temporary`: the resolver failed this time (no
    answer, a server failure), so the same lookup may succeed later; else the name has no
    address."""

    def __init__(self, message: str, temporary: bool):
        super().__init__(message)
        self.temporary = temporary


# getaddrinfo failures that say nothing about the name: the resolver could not answer now
_TEMPORARY = frozenset(getattr(socket, name) for name in (
    "EAI_AGAIN", "EAI_FAIL", "EAI_MEMORY", "EAI_SYSTEM") if hasattr(socket, name))


@dataclass(frozen=True)
class Target:
    """A checked URL and where it may be called.

    `url` is the URL as requests sends it: call this one, not the text the user gave (the same
    but for the host's encoding). `host` is its host as urllib3 keys connections (ASCII, lower
    case, an IPv6 literal without brackets) and `port` its port. `addresses` are the checked
    (family, socket address) pairs to connect to, in the resolver's order; None for a host name
    the allow-list trusts as it is, which is resolved when connecting."""

    url: str
    host: str
    port: int
    addresses: tuple[tuple[int, SockAddr], ...] | None


@dataclass(frozen=True)
class AllowList:
    """Operator-admitted exceptions: networks (CIDR or single address) and exact host names."""

    networks: tuple[IPNetwork, ...] = ()
    hosts: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, entries: Iterable[str]) -> AllowList:
        networks: list[IPNetwork] = []
        hosts: set[str] = set()
        for entry in entries:
            entry = entry.strip()
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                hosts.add(_normal_host(entry))
        return cls(tuple(networks), frozenset(hosts))

    def admits_host(self, host: str) -> bool:
        return _normal_host(host) in self.hosts

    def admits(self, address: IPAddress) -> bool:
        return any(address.version == net.version and address in net for net in self.networks)


def _normal_host(host: str) -> str:
    host = host.strip().strip("[]").rstrip(".")
    if not host.isascii():  # an allow-list entry written in Unicode: the form requests sends
        try:
            host = parse_url(f"http://{host}/").host or host
        except ValueError:
            pass
    return host.lower()


def client_url(url: str) -> str:
    """`url` exactly as requests will send it: above all, a non-ASCII host encoded the way the
    connection will look it up (IDNA 2008 as urllib3 applies it: "straße" -> "xn--strae-oqa"),
    where `socket.getaddrinfo` would apply IDNA 2003 ("strasse"), another DNS name."""
    prepared = requests.PreparedRequest()
    try:
        prepared.prepare_url(url, None)
    except (requests.RequestException, ValueError, UnicodeError):
        if url.isascii():
            raise Refused("The URL's host or port is not valid.") from None
        raise Refused("The URL's host is not a valid internationalized domain name (IDNA 2008, "
                      "as in xn--strae-oqa.de for straße.de).") from None
    if prepared.url is None:  # pragma: no cover (prepare_url always sets it)
        raise Refused("The URL has no host.")
    return prepared.url


_DEFAULT_PORTS = {"http": 80, "https": 443}


def endpoint_key(url: str) -> str:
    """`url` as the endpoint it reaches, for telling two subscriptions of one endpoint apart
    from two endpoints: scheme and host in lower case (the host as requests calls it), no
    default port, no fragment (never sent), no empty query, "/" for an empty path. The path,
    query and credentials are kept as they are (a server may tell /Hook from /hook, and
    user:password@ is sent as Basic auth)."""
    parts = parse_url(client_url(url))
    scheme = (parts.scheme or "").lower()
    host = (parts.host or "").lower()
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    port = "" if parts.port in (None, _DEFAULT_PORTS.get(scheme)) else f":{parts.port}"
    query = f"?{parts.query}" if parts.query else ""
    auth = f"{parts.auth}@" if parts.auth else ""  # sent as Basic auth: another tenant
    return f"{scheme}://{auth}{host}{port}{parts.path or '/'}{query}"


_IETF_PROTOCOL = ipaddress.ip_network("192.0.0.0/24")  # RFC 6890: not global but two hosts
_IETF_GLOBAL = (ipaddress.ip_address("192.0.0.9"), ipaddress.ip_address("192.0.0.10"))


def why_not_public(address: IPAddress) -> str | None:
    """Why `address` is not a public internet address (a short phrase), or None when it is."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return why_not_public(address.ipv4_mapped)
        # 6to4 (2002::/16) carries an IPv4 address a relay delivers to: judge that one
        if address.sixtofour is not None and why_not_public(address.sixtofour):
            return f"a 6to4 address of {why_not_public(address.sixtofour)}"
    if address in _IETF_PROTOCOL and address not in _IETF_GLOBAL:  # tables of Python < 3.12
        return "an IETF protocol assignment address"
    if address == _METADATA:
        return "the cloud metadata service (link-local)"
    for test, label in (
        (address.is_unspecified, "an unspecified address"),
        (address.is_loopback, "a loopback address"),
        (address.is_link_local, "a link-local address"),
        (address.is_multicast, "a multicast address"),
        (isinstance(address, ipaddress.IPv6Address) and address.is_site_local,
         "a site-local address"),
        (isinstance(address, ipaddress.IPv6Address)
         and address in ipaddress.ip_network("fc00::/7"), "a unique-local address"),
        (address.is_reserved, "a reserved address"),
        (address.is_private, "a private address"),
        (not address.is_global, "not a public address"),
    ):
        if test:
            return label
    return None


def lookup(resolver: Resolver, host: str, port: int, timeout: float | None) -> list:
    """resolver(host, port) answered within `timeout` seconds (None: however long it takes).

    getaddrinfo cannot be interrupted, so a bounded lookup runs in a thread of its own, left to
    finish on its own when it is too slow: the caller (an API thread that also serves ingest, a
    delivery with its own deadline) goes on."""
    if timeout is None:
        return resolver(host, port, type=socket.SOCK_STREAM)
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append((True, resolver(host, port, type=socket.SOCK_STREAM)))
        except BaseException as exc:  # handed to the caller below
            outcome.append((False, exc))

    worker = threading.Thread(target=run, name="leadpipe-dns", daemon=True)
    worker.start()
    worker.join(timeout)
    if not outcome:
        raise Unresolved(f"The host {host} could not be resolved within {timeout:g} s; try "
                         "again later.", True)
    ok, value = outcome[0]
    if not ok:
        raise value
    return value  # type: ignore[no-any-return]


def _resolve(host: str, port: int, resolver: Resolver,
             timeout: float | None = None) -> list[tuple[IPAddress, int, SockAddr]]:
    """(address, family, socket address) of every answer for `host` (ASCII), or Refused."""
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        if literal.version == 6:
            return [(literal, socket.AF_INET6, (host, port, 0, 0))]
        return [(literal, socket.AF_INET, (host, port))]
    try:
        infos = lookup(resolver, host, port, timeout)
    except UnicodeError as exc:
        raise Unresolved(f"The host {host} could not be resolved ({exc}).", False) from None
    except socket.gaierror as exc:
        temporary = exc.errno in _TEMPORARY
        why = " now; try again later." if temporary else f" ({exc})."
        raise Unresolved(f"The host {host} could not be resolved{why}", temporary) from None
    found = []
    for info in infos:
        family, sockaddr = info[0], tuple(info[4])
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        text = str(sockaddr[0]).split("%", 1)[0]  # drop an IPv6 zone ("fe80::1%eth0")
        found.append((ipaddress.ip_address(text), family, sockaddr))
    if not found:
        raise Unresolved(f"The host {host} has no address.", False)
    return found


def check_url(url: str, allow: AllowList, resolver: Resolver | None = None,
              timeout: float | None = None) -> Target:
    """The Target of `url`, or Refused unless every address its host resolves to is public or
    allow-listed.

    The host checked is the one requests will call (`client_url`), resolved once here: connect
    to `Target.addresses` (`sinks.transport.new_session(pin=target)`), never to the name again. An
    allow-listed host name is trusted as it is, without looking at its addresses. The caller is
    expected to have checked that `url` is an absolute http(s) URL. With `timeout`, a lookup
    slower than that many seconds is Unresolved (temporary)."""
    sent = client_url(url)
    try:
        parts = parse_url(sent)
    except ValueError:
        raise Refused("The URL's host or port is not valid.") from None
    host = (parts.host or "").strip("[]").lower()
    if not host:
        raise Refused("The URL has no host.")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    if allow.admits_host(host):
        return Target(sent, host, port, None)
    found = _resolve(host, port, resolver or socket.getaddrinfo, timeout)  # at each call
    for address, _, _ in found:
        if allow.admits(address):
            continue
        reason = why_not_public(address)
        if reason is not None:
            named = host != str(address)
            raise Refused(
                f"{host} {'resolves to' if named else 'is'} {reason}: subscriber URLs must reach "
                "a public address. An operator can admit it with LEADPIPE_SSRF_ALLOW.",
                detail=f"{host} resolved to {address}" if named else "")
    return Target(sent, host, port, tuple((family, sockaddr) for _, family, sockaddr in found))
