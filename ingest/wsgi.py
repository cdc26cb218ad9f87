"""The app factory the production servers load: JSON logs for the process, then the app."""

from __future__ import annotations

from flask import Flask

from config.logs import setup
from config.settings import Settings


def create_app() -> Flask:
    """`leadpipe api` serves this: granian and gunicorn call it once per worker process."""
    from ingest import create_app as make

    settings = Settings.from_env()
    setup(settings.log_level, settings.log_pii)
    return make(settings)
