"""Marshmallow schemas for the four body shapes RD Station sends (see the spec, section 2)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from marshmallow import EXCLUDE, Schema, ValidationError, missing, validates_schema
from marshmallow.validate import OneOf

from workers.fields import (
    Amount,
    Count,
    Flag,
    Identifier,
    List,
    Nested,
    Obj,
    Raw,
    String,
    Tags,
    Text,
    When,
)

MKT_EVENTS = ("WEBHOOK.CONVERTED", "WEBHOOK.MARKED_OPPORTUNITY")
DEAL_EVENTS = ("crm_deal_created", "crm_deal_updated", "crm_deal_deleted")


def normal_email(value: str | None) -> str | None:
    """An e-mail as leads are stored and matched by: trimmed, in lower case; blank is none."""
    return value.strip().lower() or None if value else None


class Lenient(Schema):
    """Unknown fields are no error (RD adds fields without notice); they are not copied into
    the loaded dict, which nothing reads them from: the stored payload is the body as sent."""

    class Meta:
        unknown = EXCLUDE

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        # (data key, result key, field) of every field loaded, worked out once, not per load
        self._plan = tuple(
            (f.data_key if f.data_key is not None else name, f.attribute or name, f)
            for name, f in self.load_fields.items())
        self._plain_keys = not any("." in key for _, key, _ in self._plan)

    def _deserialize(self, data: Any, *, error_store: Any, many: bool = False,
                     partial: Any = None, unknown: Any = None, index: Any = None) -> Any:
        """marshmallow's field loop for the one case normalisation uses (a single object, no
        partial loading, unknown keys excluded, plain keys), without the closure and helper
        calls it makes per field; each field still deserializes and validates itself and its
        errors go to marshmallow's error store as they would. Any other case: marshmallow's."""
        if (many or partial is not None or unknown != EXCLUDE or not isinstance(data, Mapping)
                or not self._plain_keys):
            return super()._deserialize(data, error_store=error_store, many=many,
                                        partial=partial, unknown=unknown, index=index)
        index = index if self.opts.index_errors else None
        result = self.dict_class()
        for data_key, key, field in self._plan:
            try:
                value = field.deserialize(data.get(data_key, missing), data_key, data)
            except ValidationError as error:
                error_store.store_error(error.messages, data_key, index=index)
                value = error.valid_data or missing
            if value is not missing:
                result[key] = value
        return result


class CompanySchema(Lenient):
    name = Text()


class FunnelSchema(Lenient):
    name = Text()
    lifecycle_stage = Text()
    opportunity = Flag()
    contact_owner_email = Text()
    interest = Count()
    fit = Count()
    origin = Text()


class ContactSchema(Lenient):
    """Marketing v2 `contact`; custom fields arrive flattened as cf_<api_id>."""

    uuid = Identifier()
    email = Text()
    name = Text()
    job_title = Text()
    bio = Text()
    website = Text()
    personal_phone = Text()
    mobile_phone = Text()
    city = Text()
    state = Text()
    tags = Tags()
    company = Nested(CompanySchema, allow_none=True, load_default=None)
    funnel = Nested(FunnelSchema, allow_none=True, load_default=None)

    @validates_schema
    def _identified(self, data: dict[str, Any], **kwargs: Any) -> None:
        # the e-mail as stored: one of spaces would leave the lead with no identity at all
        if not data.get("uuid") and not normal_email(data.get("email")):
            raise ValidationError("A contact needs a uuid or an email.", "uuid")


class MarketingV2Schema(Lenient):
    """Dialect A: webhooks created through RD's API."""

    event_type = String(required=True, validate=OneOf(MKT_EVENTS))
    entity_type = Text()
    event_identifier = Text()
    timestamp = When()
    event_timestamp = When()
    contact = Nested(ContactSchema, required=True)


class ConversionSchema(Lenient):
    content = Obj()
    created_at = When()
    cumulative_sum = Count()
    source = Text()
    conversion_origin = Obj()


class LegacyLeadSchema(Lenient):
    """Dialect B: one lead of a `{"leads": [...]}` body; strings where v2 has types."""

    id = Identifier()
    uuid = Identifier()
    email = Text()
    name = Text()
    company = Text()
    job_title = Text()
    bio = Text()
    public_url = Text()
    created_at = When()
    opportunity = Flag()
    number_conversions = Count()
    user = Text()
    first_conversion = Nested(ConversionSchema, allow_none=True, load_default=None)
    last_conversion = Nested(ConversionSchema, allow_none=True, load_default=None)
    custom_fields = Obj()
    website = Text()
    personal_phone = Text()
    mobile_phone = Text()
    city = Text()
    state = Text()
    lead_stage = Text()
    tags = Tags()
    last_marked_opportunity_date = When()
    fit_score = Text()
    interest = Count()

    @validates_schema
    def _identified(self, data: dict[str, Any], **kwargs: Any) -> None:
        if not (data.get("uuid") or data.get("id") or normal_email(data.get("email"))):
            raise ValidationError("A lead needs a uuid, an id or an email.", "uuid")


class CustomFieldValueSchema(Lenient):
    value = Raw(allow_none=True, load_default=None)
    custom_field = Obj()


class DealSchema(Lenient):
    """The `document` of crm_deal_* events (deleted ones carry only id and name)."""

    id = Text(required=True, allow_none=False)
    name = Text()
    amount_monthly = Amount()
    amount_unique = Amount()
    amount_total = Amount()
    prediction_date = Text()
    created_at = When()
    updated_at = When()
    rating = Count()
    status = Text()
    closed_at = When()
    user = Obj()
    deal_stage = Obj()
    deal_pipeline = Obj()
    deal_source = Obj()
    campaign = Obj()
    deal_lost_reason = Obj()
    deal_custom_fields = List(Nested(CustomFieldValueSchema), allow_none=True,
                                     load_default=None)


class CrmEnvelopeSchema(Lenient):
    """Dialects C and D: `event_name` + `document`, for deals and every other CRM entity."""

    event_name = String(required=True)
    document = Obj(required=True, allow_none=False)
    event_timestamp = When()
    # any JSON value: RD's own example is not a valid UUID, and only the key uses it, as sent
    transaction_uuid = Raw(allow_none=True, load_default=None)
