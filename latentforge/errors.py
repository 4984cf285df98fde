"""Errors users can act on. The CLI prints their message (no traceback) and exits non-zero."""

from __future__ import annotations


class LatentForgeError(Exception):
    """A problem with the user's input or environment, explained in the message."""

    exit_code = 1


class ConfigError(LatentForgeError):
    """Bad parameters: unknown key, wrong type or value out of range. Nothing has run."""

    exit_code = 2


class DataError(LatentForgeError):
    """Bad input data: unreadable file, inconsistent IDX headers, empty source."""
