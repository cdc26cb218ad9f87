"""The lenient schemas' field loop and lean fields load and refuse exactly as marshmallow does."""

from __future__ import annotations

import copy
from typing import Any

import orjson
import pytest
from marshmallow import Schema, ValidationError, fields

from tests.conftest import fixture_bytes
from workers.fields import Lean
from workers.schemas import (
    CrmEnvelopeSchema,
    DealSchema,
    LegacyLeadSchema,
    Lenient,
    MarketingV2Schema,
)


def fixture(name: str) -> dict:
    return orjson.loads(fixture_bytes(name))


def variants() -> list[tuple[type[Schema], Any]]:
    v2 = fixture("mkt-v2-converted.json")
    lead = fixture("legacy-leads-full.json")["leads"][0]
    deal = fixture("crm-deal-updated-won.json")
    out: list[tuple[type[Schema], Any]] = [
        (MarketingV2Schema, v2), (MarketingV2Schema, fixture("mkt-v2-marked-opportunity.json")),
        (LegacyLeadSchema, lead),
        (LegacyLeadSchema, fixture("legacy-leads-official.json")["leads"][0]),
        (CrmEnvelopeSchema, deal), (DealSchema, deal["document"]),
        (DealSchema, fixture("crm-deal-created.json")["document"]),
        (DealSchema, fixture("crm-deal-deleted.json")["document"]),
        (MarketingV2Schema, {}), (MarketingV2Schema, []), (MarketingV2Schema, "text"),
        (LegacyLeadSchema, {"name": "no identity"}), (DealSchema, {"id": None}),
        (CrmEnvelopeSchema, {"event_name": 5, "document": []}),
    ]
    broken = [
        ("event_type", "WEBHOOK.OTHER"), ("contact", None), ("contact", []),
        ("timestamp", "yesterday"),
    ]
    for key, value in broken:
        out.append((MarketingV2Schema, {**v2, key: value}))
    for key, value in [("tags", {"a": 1}), ("funnel", []), ("company", {"name": ["x"]}),
                       ("uuid", None), ("email", {"x": 1})]:
        body = copy.deepcopy(v2)
        body["contact"][key] = value
        if key == "uuid":
            body["contact"].pop("email", None)
        out.append((MarketingV2Schema, body))
    for key, value in [("opportunity", "maybe"), ("number_conversions", "3.5"),
                       ("last_conversion", {"created_at": 7}), ("custom_fields", [1])]:
        out.append((LegacyLeadSchema, {**lead, key: value}))
    for key, value in [("amount_total", "abc"), ("deal_custom_fields", [1, {"value": 2}]),
                       ("rating", True), ("closed_at", "")]:
        out.append((DealSchema, {**deal["document"], key: value}))
    return out


def load(schema: Schema, data: Any) -> tuple[str, Any, Any]:
    try:
        return "ok", schema.load(data), None
    except ValidationError as exc:
        return "error", exc.messages, exc.valid_data


@pytest.mark.parametrize(("schema", "data"), variants())
def test_same_result_and_same_errors_as_marshmallow(schema, data, monkeypatch):
    ours = load(schema(), copy.deepcopy(data))
    monkeypatch.setattr(Lenient, "_deserialize", Schema._deserialize)  # marshmallow's own
    monkeypatch.setattr(Lean, "deserialize", fields.Field.deserialize)
    assert load(schema(), copy.deepcopy(data)) == ours
