"""Destinations for events, behind one contract (sinks.base.Sink)."""
