"""The routing file: which sink instances exist, and which events go to which of them, and why."""

from __future__ import annotations

import difflib
import math
import operator
import re
import tomllib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import yaml
from marshmallow import RAISE, Schema, ValidationError, fields, validate, validates

from sinks.postgres import (
    DEAL_COLUMNS,
    DEAL_ORDER,
    DEAL_TYPES,
    LEAD_COLUMNS,
    LEAD_ORDER,
    LEAD_TYPES,
)
from sinks.registry import SinkConfigError, load_options
from workers.events import CRM_ENTITIES, EVENT_TYPES, Event
from workers.view import MISSING, identifier, lookup, view

DEFAULT_SCHEDULE = (5.0, 60.0, 300.0, 1800.0, 7200.0, 21600.0)
# A round waits its entry times uniform(2 - MAX_JITTER, MAX_JITTER) (jitter): workers.delivery.
MAX_JITTER = 1.2
ROOTS = ("event", "lead", "funnel", "deal", "contact", "document")
# The roots whose names are a closed set: what workers.view.view() puts under them (an event's
# lead and deal are the leads and deals columns the postgres sink writes, less the bookkeeping
# leads.lead_key, leads.created_at and last_event_id). A condition naming anything else is
# refused: it would never match. contact. and document. are RD's own fields as it sent them,
# and a `custom_fields` value holds whatever the account defined: below those any name goes.
FIELDS: dict[str, frozenset[str]] = {
    "event": frozenset({"id", "type", "source", "entity_type", "entity_id", "identifier",
                        "occurred_at", "received_at", "dedup_key"}),
    "lead": frozenset({*LEAD_COLUMNS, *LEAD_ORDER}),
    "funnel": frozenset({"opportunity", "lifecycle_stage", "fit", "interest",
                         "contact_owner_email"}),
    "deal": frozenset({"id", *DEAL_COLUMNS, *DEAL_ORDER}),
}
# the names whose values are times (datetimes): a condition on one compares with a time
TIMES = frozenset({"event.occurred_at", "event.received_at",
                   *(f"lead.{c}" for c, t in LEAD_TYPES.items() if t == "timestamptz"),
                   *(f"deal.{c}" for c, t in DEAL_TYPES.items() if t == "timestamptz")})
# the names whose values are true or false
FLAGS = frozenset({"funnel.opportunity", "lead.opportunity"})
_FIELDS_ARE = {"event": "the event's fields", "lead": "the leads columns",
               "funnel": "the funnel's fields", "deal": "the deals columns"}
_CONDITION = re.compile(r"^\s*([A-Za-z_][\w.]*)\s+(==|!=|>=|<=|>|<|not in|in)\s+(.+?)\s*$")
_PRESENCE = re.compile(r"^\s*([A-Za-z_][\w.]*)\s+(exists|missing)\s*$")
_RATE = re.compile(r"^\s*(\d+)\s*/\s*(s|sec|second|m|min|minute|h|hour)\s*$")
_PERIODS = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60, "h": 3600,
            "hour": 3600}
_COMPARE = {"==": operator.eq, "!=": operator.ne, ">=": operator.ge, "<=": operator.le,
            ">": operator.gt, "<": operator.lt}


class RoutingError(ValueError):
    """The routing file is wrong; the message says where and how."""


@dataclass(frozen=True)
class Condition:
    """`path op value`, e.g. `funnel.opportunity == true` or `deal.status in [won, lost]`."""

    text: str
    path: str
    op: str
    value: Any = None

    @classmethod
    def parse(cls, text: str) -> Condition:
        presence = _PRESENCE.match(text)
        if presence:
            _check_path(text, presence.group(1))
            return cls(text, presence.group(1), presence.group(2))
        found = _CONDITION.match(text)
        if not found:
            raise RoutingError(f"condition {text!r}: expected `path op value` with op one of "
                               "==, !=, >, >=, <, <=, in, not in, or `path exists|missing`")
        path, op, raw = found.groups()
        _check_path(text, path)
        try:
            value = yaml.load(raw, Loader=_Scalars)  # noqa: S506 (a SafeLoader)
        except yaml.YAMLError:
            raise RoutingError(f"condition {text!r}: cannot read the value {raw!r}") from None
        if op in ("in", "not in") and not isinstance(value, list):
            raise RoutingError(f"condition {text!r}: `{op}` needs a list like [a, b]")
        if path in TIMES:
            value = _times(text, path, value)
        elif path in FLAGS:
            _flag(text, path, value)
        return cls(text, path, op, value)

    def holds(self, data: dict[str, Any]) -> tuple[bool, str]:
        actual = lookup(data, self.path)
        if self.op == "exists":
            return actual is not MISSING and actual is not None, f"{self.path} is {_show(actual)}"
        if self.op == "missing":
            return actual is MISSING or actual is None, f"{self.path} is {_show(actual)}"
        if actual is MISSING:
            return False, f"{self.path} is missing"
        if self.op in ("in", "not in"):
            found = any(operator.eq(*_comparable(actual, item)) for item in self.value)
            return found is (self.op == "in"), f"{self.path} is {_show(actual)}"
        try:
            ok = _COMPARE[self.op](*_comparable(actual, self.value))
        except TypeError:
            return False, f"{self.path} is {_show(actual)}, not comparable with {self.value!r}"
        return bool(ok), f"{self.path} is {_show(actual)}"


class _Scalars(yaml.SafeLoader):
    """Reads a condition's value with only the plainest scalars typed: true and false, null,
    and decimal numbers without a leading zero. Anything else is text as written: `ON`,
    `yes`, `01234` (a postal code), `1:30` and `2026-01-31` are not a flag, octal, sexagesimal
    or a date, as YAML 1.1 would have them."""


_Scalars.yaml_implicit_resolvers = {}
# a decimal as written (19.9 is 19.9, as RD's "19.9" and a deal's amount are), not a float
_Scalars.add_constructor("tag:yaml.org,2002:float",
                         lambda loader, node: Decimal(loader.construct_scalar(node)))
for _tag, _pattern, _first in (
        ("bool", r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
        ("null", r"^(?:~|null|Null|NULL|)$", ["~", "n", "N", ""]),
        ("int", r"^[-+]?(?:0|[1-9][0-9]*)$", "-+0123456789"),
        ("float", r"^[-+]?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?$", "-+0123456789")):
    _Scalars.add_implicit_resolver(f"tag:yaml.org,2002:{_tag}", re.compile(_pattern),
                                   list(_first))


def _times(text: str, path: str, value: Any) -> Any:
    """A condition's value on a time field, as times (null stays null); else RoutingError."""
    if isinstance(value, list):
        return [_times(text, path, item) for item in value]
    if value is None:
        return None
    moment = _moment(value) if isinstance(value, str) else None
    if moment is None:
        raise RoutingError(f"condition {text!r}: {path} is a time: compare it with an ISO-8601 "
                           "date or time, such as 2026-01-31 or 2026-01-31T12:00:00-03:00")
    return moment


def _flag(text: str, path: str, value: Any) -> None:
    """A condition on a true/false field does not compare it with YAML 1.1's words for them."""
    for item in value if isinstance(value, list) else [value]:
        if isinstance(item, str) and item.strip().lower() in _FLAG_WORDS:
            raise RoutingError(f"condition {text!r}: {path} is true or false: write "
                               f"{'true' if item.strip().lower() in _TRUE_WORDS else 'false'}")


_TRUE_WORDS = frozenset({"yes", "y", "on"})
_FLAG_WORDS = _TRUE_WORDS | {"no", "n", "off"}


def _moment(text: str) -> datetime | None:
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _comparable(actual: Any, wanted: Any) -> tuple[Any, Any]:
    """The two sides of a comparison, RD's text read as the number or flag it stands for when
    the other side is one: `funnel.fit >= 50` with fit "80", `contact.cf_optin == true` with
    "true", `deal.rating == "3"` with 3."""
    if isinstance(actual, float):  # a JSON number: compared as the decimal it was written as
        actual = Decimal(repr(actual)) if math.isfinite(actual) else actual
    if isinstance(wanted, bool):
        if isinstance(actual, str) and actual.strip().lower() in ("true", "false"):
            return actual.strip().lower() == "true", wanted
    elif isinstance(wanted, int | Decimal):
        if isinstance(actual, str) and (number := _number(actual)) is not None:
            return number, wanted
    elif isinstance(wanted, str) and isinstance(actual, int | Decimal) \
            and not isinstance(actual, bool) and (number := _number(wanted)) is not None:
        return actual, number
    return actual, wanted


def _number(text: str) -> Decimal | None:
    try:
        number = Decimal(text.strip())
    except InvalidOperation:
        return None
    return number if number.is_finite() else None


def _check_path(text: str, path: str) -> None:
    """A path's root is known, and so is the name after it where the root's names are a closed
    set (FIELDS); the message suggests the closest valid name."""
    root, _, rest = path.partition(".")
    if root not in ROOTS:
        raise RoutingError(f"condition {text!r}: path must start with one of {ROOTS}")
    known = FIELDS.get(root)
    name = rest.partition(".")[0]
    if known is None or not name or name in known:
        return
    unknown = f"{root}.{name}"
    close = difflib.get_close_matches(name, known, n=1)
    if close:
        suggestion = f"{root}.{close[0]}"
        raise RoutingError(f"condition {text!r}: unknown name {unknown!r}; "
                           f"did you mean {suggestion!r}?")
    raise RoutingError(f"condition {text!r}: unknown name {unknown!r}; {root}. has "
                       f"{_FIELDS_ARE[root]}: {', '.join(sorted(known))}")


def _show(value: Any) -> str:
    return "missing" if value is MISSING else repr(value)


@dataclass(frozen=True)
class Route:
    """Events that pass every filter go to every sink in `to`."""

    name: str
    to: tuple[str, ...]
    event_types: frozenset[str] | None = None
    event_identifiers: frozenset[str] | None = None
    conditions: tuple[Condition, ...] = ()

    def explain(self, event: Event, data: dict[str, Any]) -> tuple[bool, list[str]]:
        reasons = []
        if self.event_types is not None:
            ok = event.event_type in self.event_types
            reasons.append(f"event type {event.event_type} {'is' if ok else 'is not'} in "
                           f"{sorted(self.event_types)}")
            if not ok:
                return False, reasons
        if self.event_identifiers and event.event_type == "WEBHOOK.CONVERTED":
            ident = identifier(event)
            ok = ident in self.event_identifiers
            reasons.append(f"conversion identifier {ident!r} {'is' if ok else 'is not'} in "
                           f"{sorted(self.event_identifiers)}")
            if not ok:
                return False, reasons
        for condition in self.conditions:
            ok, why = condition.holds(data)
            reasons.append(f"`{condition.text}` {'holds' if ok else 'fails'}: {why}")
            if not ok:
                return False, reasons
        if not reasons:
            reasons.append("no filter: every event")
        return True, reasons


@dataclass(frozen=True)
class SinkSpec:
    """One configured sink instance and its delivery policy."""

    name: str
    type: str
    options: dict[str, Any]
    retry_schedule: tuple[float, ...] = DEFAULT_SCHEDULE
    quick_retries: int = 3
    rate: tuple[int, float] | None = None  # (events, per seconds)
    circuit_failures: int = 5
    circuit_cooldown: float = 30.0


@dataclass(frozen=True)
class Routing:
    sinks: dict[str, SinkSpec] = field(default_factory=dict)
    routes: tuple[Route, ...] = ()
    source: str = "(no routing file: events are stored in Postgres only)"

    def sinks_for(self, event: Event) -> list[str]:
        """The sink instances an event goes to, each once, in the order routes name them."""
        if not self.routes:
            return []
        data = view(event)
        out: list[str] = []
        for route in self.routes:
            ok, _ = route.explain(event, data)
            if ok:
                out += [name for name in route.to if name not in out]
        return out

    def explain(self, event: Event) -> list[str]:
        data = view(event)
        lines = [f"event {event.id} {event.event_type} ({event.source} {event.entity_type} "
                 f"{event.entity_id}):", "  postgres: always (events, leads, deals)"]
        for route in self.routes:
            ok, reasons = route.explain(event, data)
            lines.append(f"  route {route.name!r} -> {', '.join(route.to)}: "
                         f"{'MATCH' if ok else 'no match'}")
            lines += [f"    - {r}" for r in reasons]
        lines.append(f"  => sinks: {', '.join(['postgres', *self.sinks_for(event)])}")
        return lines


class _Circuit(Schema):
    class Meta:
        unknown = RAISE

    failures = fields.Integer(load_default=5, validate=validate.Range(min=1))
    cooldown = fields.Float(load_default=30.0, validate=validate.Range(min=0.01))


class _SinkSchema(Schema):
    class Meta:
        unknown = RAISE

    type = fields.String(required=True)
    options = fields.Dict(keys=fields.String(), load_default=dict)
    retry_schedule = fields.List(fields.Float(validate=validate.Range(min=0)),
                                 load_default=list(DEFAULT_SCHEDULE))
    quick_retries = fields.Integer(load_default=3, validate=validate.Range(min=1, max=10))
    rate_limit = fields.String(load_default=None, allow_none=True)
    circuit_breaker = fields.Nested(_Circuit, load_default=lambda: {"failures": 5,
                                                                   "cooldown": 30.0})

    @validates("rate_limit")
    def _rate(self, value: str | None, **kwargs: Any) -> None:
        if value is None:
            return
        found = _RATE.match(value)
        if not found:
            raise ValidationError("expected N/s, N/min or N/hour, e.g. 10/s")
        if int(found.group(1)) == 0:  # delivery spaces events per_seconds / N apart
            raise ValidationError(f"{value.strip()!r} lets no event through: allow at least 1 "
                                  "per period, e.g. 1/hour (to hold a sink's deliveries, "
                                  "pause it: leadpipe sinks pause NAME)")


class _When(Schema):
    class Meta:
        unknown = RAISE

    event_type = fields.List(fields.String(), load_default=None)
    event_identifiers = fields.List(fields.String(), load_default=None)
    match = fields.List(fields.String(), load_default=list)


class _RouteSchema(Schema):
    class Meta:
        unknown = RAISE

    name = fields.String(load_default=None)
    to = fields.List(fields.String(), required=True, validate=validate.Length(min=1))
    when = fields.Nested(_When, load_default=lambda: {"match": []})


class _FileSchema(Schema):
    class Meta:
        unknown = RAISE

    sinks = fields.Dict(keys=fields.String(), values=fields.Nested(_SinkSchema),
                        load_default=dict)
    routes = fields.List(fields.Nested(_RouteSchema), load_default=list)


def _problems(messages: Any, path: str = "") -> list[str]:
    """marshmallow's nested messages as "sinks.crm.quick_retries: Must be ..." lines (the
    "value" level a Dict field adds for its values is left out of the path)."""
    if isinstance(messages, dict):
        found = []
        for key, inner in messages.items():
            if key == "value" and path.startswith("sinks."):
                found += _problems(inner, path)
            elif isinstance(key, int):
                found += _problems(inner, f"{path}[{key}]")
            else:
                found += _problems(inner, f"{path}.{key}" if path else str(key))
        return found
    if isinstance(messages, list) and all(isinstance(m, str) for m in messages):
        return [f"{path or 'file'}: {' '.join(messages)}"]
    if isinstance(messages, list):
        return [line for inner in messages for line in _problems(inner, path)]
    return [f"{path or 'file'}: {messages}"]


def parse(data: Any, source: str = "<routing>") -> Routing:
    """Validate a routing document (already read from YAML or TOML)."""
    try:
        doc = _FileSchema().load(data or {})
    except ValidationError as exc:
        raise RoutingError(f"{source}: " + "; ".join(_problems(exc.messages))) from None
    sinks = {}
    for name, spec in doc["sinks"].items():
        if name == "postgres" or not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,62}", name):
            raise RoutingError(f"{source}: sink name {name!r}: use a-z, 0-9, - and _ "
                               "(and not 'postgres', which always stores every event)")
        try:
            options = load_options(name, spec["type"], spec["options"])
        except SinkConfigError as exc:
            raise RoutingError(f"{source}: {exc}") from None
        if spec["type"] == "email" and options.get("dsn") is not None:
            # the pipeline gives e-mail sinks their ledger (workers.runtime): it lives where
            # erasure and retention find it, so an option naming another database is refused
            raise RoutingError(f"{source}: sink {name!r} (type email): option 'dsn' is not "
                               "used by the pipeline (the ledger is kept in "
                               "LEADPIPE_DATABASE_URL): remove it")
        rate = None
        if spec["rate_limit"]:
            count, unit = _RATE.match(spec["rate_limit"]).groups()  # type: ignore[union-attr]
            rate = (int(count), float(_PERIODS[unit]))
        sinks[name] = SinkSpec(name, spec["type"], options, tuple(spec["retry_schedule"]),
                               spec["quick_retries"], rate,
                               spec["circuit_breaker"]["failures"],
                               spec["circuit_breaker"]["cooldown"])
    routes = []
    for n, raw in enumerate(doc["routes"]):
        name = raw["name"] or f"route {n + 1}"
        for target in raw["to"]:
            if target not in sinks:
                raise RoutingError(f"{source}: route {name!r} sends to unknown sink {target!r}; "
                                   f"defined: {sorted(sinks) or 'none'}")
        when = raw["when"]
        try:
            _check_event_types(when.get("event_type"))
            conditions = tuple(Condition.parse(text) for text in when.get("match") or [])
        except RoutingError as exc:
            raise RoutingError(f"{source}: route {name!r}: {exc}") from None
        routes.append(Route(
            name, tuple(raw["to"]),
            frozenset(when["event_type"]) if when.get("event_type") is not None else None,
            frozenset(when["event_identifiers"]) if when.get("event_identifiers") else None,
            conditions))
    return Routing(sinks, tuple(routes), source)


def _check_event_types(names: list[str] | None) -> None:
    """`when.event_type` names events there are (else the route would never match), at least
    one (an empty list would match none: leave the key out for every type)."""
    if names is None:
        return
    if not names:
        raise RoutingError("event_type: an empty list matches no event; leave event_type out "
                           "to match every type")
    for name in names:
        if name in EVENT_TYPES:
            continue
        close = difflib.get_close_matches(name, EVENT_TYPES, n=1)
        hint = (f"did you mean {close[0]!r}?" if close else
                "RD sends WEBHOOK.CONVERTED, WEBHOOK.MARKED_OPPORTUNITY and crm_<entity>_"
                "<created|updated|deleted> for the entities " + ", ".join(CRM_ENTITIES))
        raise RoutingError(f"event_type: unknown event type {name!r}; {hint}")


def _one_line(exc: Exception) -> str:
    """A parser's error in one line: YAML's own message draws the line it quotes with a caret."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        return f"{exc.problem} (line {mark.line + 1}, column {mark.column + 1})"
    return " ".join(str(exc).split())


def load(path: str | Path | None) -> Routing:
    """Read a routing file (.yaml/.yml or .toml); no path means no sinks besides Postgres."""
    if not path:
        return Routing()
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise RoutingError(f"{p}: cannot read the routing file: {exc.strerror}") from None
    try:
        data = tomllib.loads(text) if p.suffix == ".toml" else yaml.safe_load(text)
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as exc:
        raise RoutingError(f"{p}: not valid {'TOML' if p.suffix == '.toml' else 'YAML'}: "
                           f"{_one_line(exc)}") from None
    return parse(data, str(p))
