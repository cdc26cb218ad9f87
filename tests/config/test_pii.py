"""Masking lead PII whatever type a body gives it (quarantined bodies are the odd ones)."""

from __future__ import annotations

import pytest

from config.pii import mask_email, mask_text, mask_value, masked_person


def test_a_person_whose_fields_are_not_strings_is_masked_all_the_same():
    body = {"contact": {"email": ["maria.souza@example.com.br"], "name": ["Maria Souza"],
                        "mobile_phone": 5511912345678}}
    assert masked_person(body) == {"email": ["m***@***.br"], "name": ["M*** S***"],
                                   "phone": None}
    assert mask_value("mobile_phone", 5511912345678) == "***78"
    assert mask_value("name", {"first": "Maria", "last": ["Souza"]}) == {
        "first": "M***", "last": ["S***"]}


def test_what_carries_no_one_stays_as_it_is():
    for value in (None, True, False, ""):
        assert mask_value("email", value) == value


def test_percent_encoded_addresses_are_masked_too():
    # urllib3's DEBUG line for the crm sink's PUT of a lead keyed by e-mail
    line = ('http://127.0.0.1:8080 "PUT /leads/email%3Amaria.souza%40example.com.br HTTP/1.1" '
            "200 2")
    masked = mask_text(line)
    assert "maria" not in masked and "souza" not in masked and "example" not in masked
    assert masked.endswith('%40***.br HTTP/1.1" 200 2')
    assert mask_email("maria%40example.com.br") == "m***%40***.br"
    assert mask_value("lead_key", "email:ana%40example.com") == "e***%40***.com"
    assert mask_text("50% done at 100%40 s") == "50% done at 100%40 s"  # no address in it


@pytest.mark.timeout(5)
def test_a_long_token_is_scanned_in_linear_time():
    # each start scans at most an address' length: with an unbounded local part, each scanned
    # to the token's end, and these took minutes
    token = "a" * 100_000
    for text in (f"progress 100% of {token}", f"{token}%40", f"{token}@", f"{token}%40{token}"):
        assert mask_text(text) == text
    assert mask_text(f"{token}@example.com") == "a" * (100_000 - 64) + "a***@***.com"


def test_file_names_are_not_addresses():
    for text in ("GET /img/logo%40x2.png 200", "icon@2x.PNG", "GET /files/report%40v2.pdf",
                 "user%40home.html"):
        assert mask_text(text) == text
    assert mask_text("ana@example.zip") == "a***@***.zip"  # .zip is a top-level domain


def test_an_address_under_any_top_level_domain_is_masked():
    # top-level domains that look like file extensions too, and common ones: only the
    # extensions that are no top-level domain (png, pdf, ...) are spared
    for tld in ("zip", "mov", "md", "py", "sh", "rs", "pl", "ps", "io", "ai", "app", "dev",
                "com", "br", "net", "org", "info", "me", "tv", "so"):
        assert mask_text(f"ana@example.{tld}") == f"a***@***.{tld}", tld
