"""Project exceptions. Every message names the offending value or file and says what to do."""

from __future__ import annotations


class GeoposeError(Exception):
    """Base class: the CLI prints these as one clear line, never a traceback."""


class DataError(GeoposeError):
    """A dataset, cache or submission on disk is missing, malformed or inconsistent."""


class ConfigError(GeoposeError):
    """An argument or configuration value is invalid."""
