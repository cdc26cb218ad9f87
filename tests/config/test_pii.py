"""Masking lead PII whatever type a body gives it (quarantined bodies are the odd ones)."""

from __future__ import annotations

from config.pii import mask_value, masked_person


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
