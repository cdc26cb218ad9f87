"""Module-level Celery app for `celery -A workers.entry` (Flower, inspect); settings from env."""

from workers.app import make_celery

app = make_celery()
