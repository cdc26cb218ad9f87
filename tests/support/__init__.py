"""Test helpers that are real local services, not mocks."""
