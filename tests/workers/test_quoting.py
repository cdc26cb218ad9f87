"""Rewriting an erased address inside text and JSON kept for others (no database needed)."""

from __future__ import annotations

from workers.quoting import ERASED_TEXT, json_rewritten
from workers.retention import _address


def test_the_address_in_any_case_becomes_erased_and_longer_addresses_stay():
    address = _address("joão.silva@exemplo.com.br")
    value = {"note": "De JOÃO.SILVA@EXEMPLO.COM.BR para joana@x.com",
             "list": ["xjoão.silva@exemplo.com.br", "joão.silva@exemplo.com.br.ar", 3, None],
             "joão.silva@exemplo.com.br": True}
    assert json_rewritten(value, address) == {
        "note": f"De {ERASED_TEXT} para joana@x.com",
        "list": ["xjoão.silva@exemplo.com.br", "joão.silva@exemplo.com.br.ar", 3, None],
        ERASED_TEXT: True}


def test_a_value_nested_as_deep_as_json_allows_is_rewritten_without_exhausting_the_stack():
    address = _address("ana@example.com")
    value: object = "Ana <ana@example.com>"
    for _ in range(5000):
        value = [value]
    out = json_rewritten(value, address)
    for _ in range(5000):
        assert isinstance(out, list)
        out = out[0]
    assert out == f"Ana <{ERASED_TEXT}>"


def test_the_original_value_is_left_as_it_was():
    address = _address("ana@example.com")
    value = {"a": ["ana@example.com"]}
    json_rewritten(value, address)
    assert value == {"a": ["ana@example.com"]}
