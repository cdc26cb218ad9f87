"""Structured logging: one JSON object per line, with event_id and task_id when known.

Lead PII is masked on its way out unless LEADPIPE_LOG_PII says otherwise: the values of
PII keys given in `extra=` (email, name, phone...) and any e-mail address or phone number
inside a message, an extra's text or a traceback.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import orjson

from config import pii

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


def _masked(value: Any) -> Any:
    if isinstance(value, str):
        return pii.mask_text(value)
    if isinstance(value, dict):
        return {k: _masked(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_masked(v) for v in value]
    return value


def _current_task_id() -> str | None:
    """The id of the Celery task this line is logged from, if any (without importing Celery)."""
    state = sys.modules.get("celery._state")
    task = state.get_current_task() if state is not None else None  # type: ignore[attr-defined]
    request = getattr(task, "request", None)
    return getattr(request, "id", None)


class JsonFormatter(logging.Formatter):
    """Formats a record and whatever `extra=` it carries as one JSON line."""

    def __init__(self, log_pii: bool = False):
        super().__init__()
        self.log_pii = log_pii

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if "task_id" not in entry and (task_id := _current_task_id()):
            entry["task_id"] = task_id
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        if not self.log_pii:
            entry = {k: pii.mask_value(k, v) if k in pii.PII_KEYS else _masked(v)
                     for k, v in entry.items()}
        return orjson.dumps(entry, default=str).decode()


def setup(level: str = "INFO", log_pii: bool = False) -> None:
    """JSON lines on stderr for the whole process (the root logger's only handler); urllib3
    logs nothing below WARNING, whatever the level."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(log_pii))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # urllib3's DEBUG lines hold each request line: URLs with lead keys (an e-mail, encoded)
    logging.getLogger("urllib3").setLevel(max(logging.WARNING, root.level))
    logging.captureWarnings(True)  # warnings too become JSON lines, not bare text on stderr
