"""One error root for everything pcim reports to a user; each class carries its exit code.

Subclasses also inherit the built-in error they resemble, so library callers can catch either.
Only the CLI (pcim_cli/cli/) turns these into exit codes (docs/reference/exit-codes.md); exit 2 (a usage
error) comes from the command-line parser itself.
"""

from __future__ import annotations

import errno
import re
import reprlib

EXIT_OK = 0
EXIT_INTERNAL = 1
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


# --------------------------------------------------------------------------------------------------
# message helpers: user values and OS errors as one short, readable line


_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 60
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = _SHORT.maxset = 4
_SHORT.maxlevel = 2
SHORT_CHARS = 100
_NUMBER = re.compile(r"[-+]?(\d[\d_]*)?\.?\d*([eE][-+]?\d+)?")


def short(value: object) -> str:
    """repr() of a user's value, cut to a readable length (a huge YAML value must not flood a message)."""
    text = _SHORT.repr(value)
    return text if len(text) <= SHORT_CHARS else text[: SHORT_CHARS - 4] + " ..."


def shown(value: object) -> str:
    """A value as a message shows it: numbers read as text bare (`-1`), everything else as short()."""
    if isinstance(value, str) and value.strip() and len(value) < 40 and _NUMBER.fullmatch(value.strip()):
        return value.strip()
    return short(value)


def clip(text: str, width: int) -> str:
    """`text` in at most `width` characters, cut at a word boundary and ended with '…' when cut (a table
    cell never ends mid-word)."""
    text = str(text)
    if len(text) <= width:
        return text
    cut = text[: max(1, width - 1)]
    space = cut.rfind(" ")
    if space > width // 2:
        cut = cut[:space]
    return cut.rstrip(" ;,:(") + "…"


def unplaced(well: str, site: object, error: str) -> str:
    """`error` without its leading "A01 site 2:" (or "A01:"), for a line that names the field itself."""
    error = str(error)
    for place in (f"{well} site {site}:", f"{well}:"):
        if error.startswith(place):
            return error[len(place):].lstrip()
    return error


_OS_REASONS = {
    errno.ENOSPC: "the disk is full (no space left on device)",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
}


def os_reason(exc: BaseException) -> str:
    """What went wrong in an OSError, saying plainly when the disk is full."""
    reason = _OS_REASONS.get(getattr(exc, "errno", None))
    if reason is None and isinstance(exc.__cause__, OSError):
        reason = _OS_REASONS.get(exc.__cause__.errno)
    return f"{reason} ({exc})" if reason else str(exc)
