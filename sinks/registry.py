"""Sinks found by type name: the built-in table, then the `leadpipe.sinks` entry-point group."""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any

from marshmallow import ValidationError

from sinks.base import Sink

ENTRY_POINT_GROUP = "leadpipe.sinks"

BUILTIN = {
    "postgres": "sinks.postgres:PostgresSink",
    "crm": "sinks.crm:CrmSink",
    "email": "sinks.email:EmailSink",
    "webhook": "sinks.webhook:WebhookSink",
}


class SinkConfigError(ValueError):
    """A sink type that does not exist, or options its schema refuses; says which and why."""


def available() -> dict[str, str]:
    """type name -> "module:Class" for every sink this installation knows."""
    found = dict(BUILTIN)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, ep.value)
    return found


def sink_class(type_name: str) -> type[Sink]:
    target = available().get(type_name)
    if target is None:
        raise SinkConfigError(f"unknown sink type {type_name!r}; known: "
                              + ", ".join(sorted(available())))
    module, _, attr = target.partition(":")
    cls = getattr(importlib.import_module(module), attr)
    if not (isinstance(cls, type) and issubclass(cls, Sink)):
        raise SinkConfigError(f"{target} (sink type {type_name!r}) is not a leadpipe Sink")
    return cls


def load_options(instance: str, type_name: str, options: dict[str, Any]) -> dict[str, Any]:
    """Validate an instance's options with its type's schema; errors name sink and option."""
    try:
        cls = sink_class(type_name)
    except SinkConfigError as exc:
        raise SinkConfigError(f"sink {instance!r}: {exc}") from None
    try:
        return cls.Options().load(options or {})
    except ValidationError as exc:
        detail = "; ".join(f"option {field!r}: {_text(msgs)}"
                           for field, msgs in _flat(exc.messages))
        raise SinkConfigError(f"sink {instance!r} (type {type_name}): {detail}") from None


def build(instance: str, type_name: str, options: dict[str, Any]) -> Sink:
    return sink_class(type_name)(instance, load_options(instance, type_name, options))


def _text(messages: Any) -> str:
    return " ".join(map(str, messages)) if isinstance(messages, list) else str(messages)


def _flat(messages: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(messages, dict):
        out: list[tuple[str, Any]] = []
        for key, value in messages.items():
            name = f"{prefix}.{key}" if prefix else str(key)
            if isinstance(value, dict):
                out += _flat(value, name)
            else:
                out.append((name, value))
        return out
    return [(prefix or "_schema", messages)]
