"""SSRF guard: a subscriber URL must reach the public internet, unless an allow-list admits it.

Leadpipe calls subscriber URLs from inside the network it runs in (the probe, then every
delivery). Without this guard, whoever holds an API token could make it call the cloud metadata
service (169.254.169.254), a database port on localhost, or any host of the private network.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[..., list]

_METADATA = ipaddress.ip_address("169.254.169.254")


class Refused(ValueError):
    """The URL's host is, or resolves to, an address subscriptions may not reach."""


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
    return host.strip().strip("[]").rstrip(".").lower()


def why_not_public(address: IPAddress) -> str | None:
    """Why `address` is not a public internet address (a short phrase), or None when it is."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return why_not_public(address.ipv4_mapped)
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


def _resolve(host: str, port: int, resolver: Resolver) -> list[IPAddress]:
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return [literal]
    try:
        infos = resolver(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise Refused(f"The host {host} could not be resolved ({exc}).") from None
    addresses = []
    for info in infos:
        text = str(info[4][0]).split("%", 1)[0]  # drop an IPv6 zone ("fe80::1%eth0")
        addresses.append(ipaddress.ip_address(text))
    if not addresses:
        raise Refused(f"The host {host} has no address.")
    return addresses


def check_url(url: str, allow: AllowList, resolver: Resolver = socket.getaddrinfo) -> None:
    """Raise Refused unless every address `url`'s host resolves to is public or allow-listed.

    An allow-listed host name is trusted as it is, without looking at its addresses. The
    caller is expected to have checked that `url` is an absolute http(s) URL."""
    parts = urlsplit(url)
    host = parts.hostname
    if not host:
        raise Refused("The URL has no host.")
    if allow.admits_host(host):
        return
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise Refused("The URL's port is not a number from 0 to 65535.") from None
    for address in _resolve(host, port, resolver):
        if allow.admits(address):
            continue
        reason = why_not_public(address)
        if reason is not None:
            shown = host if host == str(address) else f"{host} ({address})"
            raise Refused(
                f"{shown} is {reason}: subscriber URLs must reach a public address. An "
                "operator can admit it with LEADPIPE_SSRF_ALLOW.")
