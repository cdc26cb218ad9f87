"""Operator input checks shared by the operator API and the `leadpipe` command."""

from __future__ import annotations

import math
from datetime import UTC, datetime

BIGINT_MAX = 2**63 - 1  # the largest id Postgres can hold (bigint)


class Invalid(ValueError):
    """Operator input refused before it reaches a store (the API answers 400 INVALID with this
    message, the command prints it)."""


def whole_number(value: object, name: str, low: int = 1, high: int = BIGINT_MAX) -> int:
    """A JSON integer, or a string of ASCII digits, from `low` to `high`; else Invalid."""
    number = None
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 20:
        number = int(value)  # isascii: "²" and "٣" are digits to isdigit(), not to us
    elif isinstance(value, int) and not isinstance(value, bool):
        number = value
    if number is None or not low <= number <= high:
        raise Invalid(f"{name} must be a number from {low} to {high}.")
    return number


def finite_number(value: str, name: str) -> float:
    """A decimal number that is not nan or infinite; else Invalid."""
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise Invalid(f"{name} must be a number.")
    return number


def instant(value: object, name: str) -> datetime:
    """An ISO-8601 time (a date alone is its midnight; no offset means UTC); else Invalid."""
    try:
        when = datetime.fromisoformat(str(value))
    except ValueError:
        raise Invalid(f"{name} must be an ISO-8601 time, such as 2026-01-31T12:00:00Z.") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)
