"""One error root for everything pcim reports to a user; each class carries its exit code.

Subclasses also inherit the built-in error they resemble, so library callers can catch either.
Only `cli.py` turns these into exit codes (shared/DESIGN.md §3.4).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3
EXIT_DATA = 65
EXIT_TEMPFAIL = 75
EXIT_CONFIG = 78


class PcimError(Exception):
    """Root of every error pcim explains to its user."""

    exit_code = EXIT_INTERNAL


class ConfigError(PcimError, ValueError):
    """plate.yaml (or an override) is invalid; the message lists every problem with its YAML path."""

    exit_code = EXIT_CONFIG


class ModelError(PcimError, ValueError):
    """The model file cannot be loaded, or does not fit the configured channels / input size."""

    exit_code = EXIT_CONFIG


class InputDataError(PcimError, OSError):
    """An image, layout or mask file is missing or unusable."""

    exit_code = EXIT_DATA


class OutputError(PcimError, OSError):
    """The output store or CSV cannot be written."""

    exit_code = EXIT_DATA


class TemporaryFailure(PcimError, RuntimeError):
    """Retry later: lock held, cluster unreachable, run interrupted."""

    exit_code = EXIT_TEMPFAIL
