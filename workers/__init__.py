"""Celery workers: read the ingest stream in batches, normalise, deduplicate and store events."""
