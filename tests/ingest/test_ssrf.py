"""The SSRF guard's resolution: the host it checks is the one the HTTP client calls.

DNS is simulated at the resolver boundary only (`FakeDNS`): `_socket.getaddrinfo`, where CPython's
C code IDNA-2003-encodes a str host before the lookup. Everything above it (socket.getaddrinfo,
urllib3's create_connection, the guard) runs for real."""

from __future__ import annotations

import socket
import time

import pytest
import requests

from ingest import ssrf
from tests.support.dns import FakeDNS

# -- IDNA: the name checked is the name the client calls ---------------------------------------


def test_a_unicode_host_is_checked_under_the_name_requests_calls(monkeypatch):
    # strasse.attacker.test (IDNA 2003, what getaddrinfo would make of the text) is public;
    # xn--strae-oqa.attacker.test (IDNA 2008/UTS 46, what requests connects to) is loopback
    dns = FakeDNS(monkeypatch, {"strasse.attacker.test": "93.184.215.14",
                                "xn--strae-oqa.attacker.test": "127.0.0.1"})
    with pytest.raises(ssrf.Refused, match=r"^xn--strae-oqa\.attacker\.test resolves to a "
                                           r"loopback address") as refused:
        ssrf.check_url("http://straße.attacker.test:8080/latest/meta-data", ssrf.AllowList())
    assert dns.lookups == ["xn--strae-oqa.attacker.test"]
    # the address a name points at is for the server's log, not for whoever gave the URL
    assert "127.0.0.1" not in str(refused.value)
    assert refused.value.detail == "xn--strae-oqa.attacker.test resolved to 127.0.0.1"


def test_the_target_is_what_requests_sends_and_what_was_checked(monkeypatch):
    FakeDNS(monkeypatch, {"xn--strae-oqa.example": ["93.184.215.14", "127.0.0.1"]})
    url = "https://Straße.example/rd?x=1"
    target = ssrf.check_url(url, ssrf.AllowList())
    assert target.url == requests.Request("POST", url).prepare().url
    assert target.url == "https://xn--strae-oqa.example/rd?x=1"
    assert (target.host, target.port) == ("xn--strae-oqa.example", 443)
    assert target.addresses == ((socket.AF_INET, ("93.184.215.14", 443)),)


def test_address_literals_need_no_lookup():
    assert ssrf.check_url("http://[2606:4700::6810:85e5]:81/x", ssrf.AllowList()) == ssrf.Target(
        "http://[2606:4700::6810:85e5]:81/x", "2606:4700::6810:85e5", 81,
        ((socket.AF_INET6, ("2606:4700::6810:85e5", 81, 0, 0)),))


def test_an_allow_list_entry_in_unicode_admits_the_host_as_sent():
    allow = ssrf.AllowList.parse(["Straße.intranet"])
    target = ssrf.check_url("http://straße.intranet/hook", allow)  # no lookup: trusted name
    assert (target.host, target.addresses) == ("xn--strae-oqa.intranet", None)
    assert allow.admits_host("XN--STRAE-OQA.intranet.")


def test_a_host_requests_cannot_encode_is_refused_with_the_reason(monkeypatch):
    # getaddrinfo's IDNA 2003 maps fullwidth letters to ASCII and would find abc.example;
    # requests (IDNA 2008) cannot send the URL at all
    dns = FakeDNS(monkeypatch, {"abc.example": "93.184.215.14"})
    with pytest.raises(ssrf.Refused, match="not a valid internationalized domain name"):
        ssrf.check_url("http://ａｂｃ.example/hook", ssrf.AllowList())
    assert dns.lookups == []


@pytest.mark.parametrize("address, why", [
    ("2002:7f00:1::1", "a 6to4 address of a loopback address"),
    ("2002:a00:1::1", "a 6to4 address of a private address"),
    ("192.0.0.8", "an IETF protocol assignment address"),
])
def test_addresses_that_lead_inside_through_another_form_are_refused(address, why):
    import ipaddress

    assert ssrf.why_not_public(ipaddress.ip_address(address)) == why


@pytest.mark.parametrize("address", ["2002:5db8:d822::1", "192.0.0.9", "93.184.216.34"])
def test_public_addresses_in_those_forms_pass(address):
    import ipaddress

    assert ssrf.why_not_public(ipaddress.ip_address(address)) is None


def test_a_lookup_slower_than_its_time_limit_is_unresolved_for_now():
    def slow(host, port, **kwargs):  # type: ignore[no-untyped-def]
        time.sleep(2)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.215.14", port))]

    started = time.monotonic()
    with pytest.raises(ssrf.Unresolved, match="within 0.3 s") as unresolved:
        ssrf.check_url("https://slow.example/rd", ssrf.AllowList(), resolver=slow, timeout=0.3)
    assert time.monotonic() - started < 1.5 and unresolved.value.temporary
    # within its limit, the same lookup is used as it is
    target = ssrf.check_url("https://slow.example/rd", ssrf.AllowList(), resolver=slow,
                            timeout=5)
    assert target.addresses == ((socket.AF_INET, ("93.184.215.14", 443)),)
