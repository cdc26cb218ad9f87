"""Settings, logging, local services and the `leadpipe` command."""

from config.settings import ConfigError, Settings

__all__ = ["ConfigError", "Settings"]
