"""Masking lead PII whatever type a body gives it (quarantined bodies are the odd ones)."""

from __future__ import annotations

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
