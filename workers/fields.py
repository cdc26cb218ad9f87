"""Lenient marshmallow fields for what real RD deliveries contain ("true", "3", nulls, big ints)."""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from marshmallow import ValidationError, fields, missing

_INTEGER = re.compile(r"\s*([+-]?[0-9]+)(?:\.0*)?\s*", re.ASCII)

_TRUE = {"true", "1", "yes", "sim", "t"}
_FALSE = {"false", "0", "no", "nao", "não", "f"}


class Lean(fields.Field):
    """Field.deserialize without the per-call work these fields never need (most of a body's
    declared fields are missing or null): the same checks in the same order, the same errors."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if callable(self.load_default) or self.pre_load or self.post_load:
            self.deserialize = super().deserialize  # type: ignore[method-assign]

    def deserialize(self, value: Any, attr: str | None = None, data: Any = None,
                    **kwargs: Any) -> Any:
        if value is missing:
            if self.required:
                raise self.make_error("required")
            return self.load_default
        if value is None:
            if not self.allow_none:
                raise self.make_error("null")
            return None
        output = self._deserialize(value, attr, data, **kwargs)
        if self.validators:  # Field._validate builds an And() of them on every call
            self._validate(output)
        return output


class String(Lean, fields.String):
    """marshmallow's String, deserialized through Lean."""


class Raw(Lean, fields.Raw):
    """marshmallow's Raw, deserialized through Lean."""


class Nested(Lean, fields.Nested):
    """marshmallow's Nested, deserialized through Lean."""


class List(Lean, fields.List):
    """marshmallow's List, deserialized through Lean."""


class Optional(Lean):
    """A field that may be null or missing (then None) unless declared required."""

    def __init__(self, **kwargs: Any):
        kwargs.setdefault("allow_none", True)
        if not kwargs.get("required"):
            kwargs.setdefault("load_default", None)
        super().__init__(**kwargs)


class Text(Optional):
    """A string; numbers become their text, null stays null, lists and objects are refused."""

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> str | None:
        if isinstance(value, str):
            return value.replace("\x00", "")
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, int | float):
            return str(value)
        raise ValidationError("Not a valid string.")


class Identifier(Text):
    """A lead's uuid or legacy id: surrounding blanks are not part of it, and a blank one is
    none (else every lead sent with `"uuid": " "` would be one lead)."""

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> str | None:
        text = super()._deserialize(value, attr, data, **kwargs)
        return text.strip() or None if text is not None else None


class Flag(Optional):
    """A boolean that also takes "true"/"false" strings and 0/1."""

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> bool | None:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str):
            low = value.strip().lower()
            if not low:
                return None
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
        raise ValidationError("Not a valid boolean.")


class Count(Optional):
    """An integer that also takes integer strings ("3", "+3", "3.0") and integral floats (3.0);
    only ASCII digits ("²" and "٣" are digits to str.isdigit, not to int())."""

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> int | None:
        if isinstance(value, bool):
            raise ValidationError("Not a valid integer.")
        if isinstance(value, int):
            result = value
        elif isinstance(value, float) and value.is_integer():
            result = int(value)
        elif isinstance(value, str) and (match := _INTEGER.fullmatch(value)):
            if len(match.group(1)) > 30:
                raise ValidationError("Integer too large.")
            result = int(match.group(1))
        elif isinstance(value, str) and not value.strip():
            return None
        else:
            raise ValidationError("Not a valid integer.")
        if abs(result) >= 2**63:
            raise ValidationError("Integer too large.")
        return result


class Amount(Optional):
    """A money amount kept exact as Decimal (from ints, floats or numeric strings)."""

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> Decimal | None:
        if isinstance(value, bool):
            raise ValidationError("Not a valid number.")
        try:
            if isinstance(value, int):
                result = Decimal(value)
            elif isinstance(value, float):
                if not math.isfinite(value):
                    raise ValidationError("Not a finite number.")
                result = Decimal(repr(value))
            elif isinstance(value, str) and value.strip():
                result = Decimal(value.strip().replace(",", "."))
            elif isinstance(value, str):
                return None
            else:
                raise ValidationError("Not a valid number.")
        except InvalidOperation:
            raise ValidationError("Not a valid number.") from None
        if not result.is_finite() or abs(result) >= Decimal(10) ** 20:
            raise ValidationError("Number out of range.")
        return result


class When(Optional):
    """An ISO-8601 moment; RD sends offsets and milliseconds. Naive times are taken as UTC."""

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> datetime | None:
        if isinstance(value, str):
            if not value.strip():
                return None
            try:
                moment = datetime.fromisoformat(value.strip())
            except ValueError:
                raise ValidationError("Not a valid ISO-8601 datetime.") from None
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=UTC)
            # read back as a datetime in the database session's time zone, whatever it is:
            # a year from 2 to 9998 in UTC is a year from 1 to 9999 in every zone
            try:
                year = moment.astimezone(UTC).year
            except OverflowError:
                year = 0
            if not 2 <= year <= 9998:
                raise ValidationError("Datetime out of range: only the years 2 to 9998 are "
                                      "taken.")
            return moment
        raise ValidationError("Not a valid ISO-8601 datetime.")


class Tags(Optional):
    """A list of strings; null becomes [], a lone string becomes a list of one."""

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> list[str]:
        if value is None:
            return []
        if isinstance(value, str):
            return [value.replace("\x00", "")] if value else []
        if isinstance(value, list):
            out = []
            for item in value:
                if item is None:
                    continue
                if isinstance(item, str):
                    out.append(item.replace("\x00", ""))
                elif isinstance(item, int | float) and not isinstance(item, bool):
                    out.append(str(item))
                else:
                    raise ValidationError("Tags must be strings.")
            return out
        raise ValidationError("Not a valid list of strings.")


class Obj(Optional):
    """A JSON object kept as is; null or a missing value becomes {}."""

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> dict:
        if value is None:
            return {}
        if isinstance(value, dict):
            return value
        raise ValidationError("Not a valid object.")
