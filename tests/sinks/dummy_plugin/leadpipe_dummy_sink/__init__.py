"""A sink that appends each event to a JSON-lines file; it exists to test the plugin path."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from marshmallow import RAISE, Schema, fields, validate

from sinks.base import PermanentSinkError, RetryableSinkError, Sink


class DummyOptions(Schema):
    class Meta:
        unknown = RAISE

    path = fields.String(required=True)
    fail = fields.String(load_default=None, validate=validate.OneOf(["retryable", "permanent"]))


class DummySink(Sink):
    """Writes `{"id", "dedup_key", "type"}` per delivered event to `path`."""

    name = "dummy"
    Options = DummyOptions

    def deliver(self, event: Any) -> None:
        if self.options["fail"] == "retryable":
            raise RetryableSinkError("dummy is down", status=503)
        if self.options["fail"] == "permanent":
            raise PermanentSinkError("dummy refuses", status=400)
        path = Path(self.options["path"])
        if path.exists() and any(json.loads(line)["dedup_key"] == event.dedup_key
                                 for line in path.read_text().splitlines()):
            return  # idempotent: delivered before
        with path.open("a") as out:
            out.write(json.dumps({"id": event.id, "dedup_key": event.dedup_key,
                                  "type": event.event_type}) + "\n")
