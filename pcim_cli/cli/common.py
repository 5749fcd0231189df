"""What every `pcim` command shares: its options, its logging, and how an error becomes one line and an
exit code (docs/reference/exit-codes.md).

Every error ends in one line `pcim: error: ...` on stderr; an internal error (a bug, or the machine
failing under pcim) adds where its traceback was written (the --log-file, or a crash log in the
temporary folder), and prints the traceback itself only with -v. With --json, stdout holds one JSON
document for every exit, errors included: `{"status": "error", "exit_code": N, "message": ...}`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Annotated, Any

import typer

from pcim_cli import __version__
from pcim_cli.errors import EXIT_INTERNAL, ConfigError, OutputError, PcimError

__all__ = ["EXIT_CODES_HELP", "VALIDATE_EXIT_CODES_HELP", "Quiet", "Verbose", "error_doc", "fail",
           "fancy_terminal", "json_option", "only_wells", "set_option", "setup_logging", "split_list"]

logger = logging.getLogger("pcim_cli")

EXIT_CODES_HELP = (
    "Exit codes: 0 every unit done; 1 internal error; 2 usage error; 3 some units failed (the rest "
    "are done and recorded); 65 input data unusable; 75 retry later (lock held, interrupted); "
    "78 configuration invalid."
)

VALIDATE_EXIT_CODES_HELP = (
    "Exit codes: 0 everything checked is usable; 1 internal error; 2 usage error; 3 problems found (listed; "
    "explain would fail those fields or wells); 65 input data unusable (no field could be found or read); "
    "78 configuration invalid (plate.yaml, overrides, or a model that does not fit the channels)."
)

Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors.")]
Verbose = Annotated[int, typer.Option("--verbose", "-v", count=True, help="More detail.")]


def set_option(help: str = "Override a key, as for explain.") -> Any:
    """The repeatable `--set section.key=value` option, with its help text."""
    return Annotated[list[str] | None, typer.Option("--set", help=help)]


def json_option(help: str) -> Any:
    """The `--json` option (one JSON document on stdout), with its help text."""
    return Annotated[bool, typer.Option("--json", help=help)]


PLAIN_FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")


def fancy_terminal() -> bool:
    """stderr is a terminal and NO_COLOR is not set: Rich output; else plain lines, no control sequences."""
    return sys.stderr.isatty() and not os.environ.get("NO_COLOR")


def setup_logging(verbose: int, quiet: bool, log_file: Path | None = None) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    handler: logging.Handler
    if fancy_terminal():
        from rich.logging import RichHandler

        handler = RichHandler(show_path=False, rich_tracebacks=verbose > 0)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:  # cron mail, SLURM .out files, pipelines: plain timestamped lines, no control sequences
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(PLAIN_FORMAT)
    handler.setLevel(level)
    root = logging.getLogger("pcim_cli")
    root.handlers[:] = [handler]
    if log_file is not None:
        try:
            log_file.parent.mkdir(parents=True, exist_ok=True)
            to_file = logging.FileHandler(log_file, encoding="utf-8")
        except OSError as exc:
            error = OutputError(f"cannot open the log file {log_file}: {exc}; choose a writable --log-file")
            raise fail(error) from None
        to_file.setFormatter(PLAIN_FORMAT)
        to_file.setLevel(logging.DEBUG)
        root.handlers.append(to_file)
    root.setLevel(logging.DEBUG if log_file is not None else level)


def split_list(text: str | None) -> list[str] | None:
    """A comma-separated option (`A01, B03,`): its items, stripped, empty ones dropped; None stays None."""
    if text is None:
        return None
    return [p.strip() for p in text.split(",") if p.strip()]


def only_wells(text: str | None) -> frozenset[str] | None:
    """`--only A01,b3, C/4` -> canonical well names; a bad name is a ConfigError naming it."""
    if text is None:
        return None
    from pcim_cli.io.plate import WellIdError, parse_well

    wells = set()
    for part in split_list(text) or []:
        try:
            wells.add(parse_well(part).name)
        except WellIdError as exc:
            raise ConfigError(f"--only: {exc}") from exc
    if not wells:
        raise ConfigError("--only needs at least one well, e.g. --only A01,B03")
    return frozenset(wells)


def error_doc(code: int, message: str, status: str = "error") -> str:
    return json.dumps({"status": status, "exit_code": code, "message": message})


def fail(exc: BaseException, as_json: bool = False) -> typer.Exit:
    """One `pcim: error:` line (and, with --json, the error document) for an exception; its exit code."""
    if isinstance(exc, PcimError):
        code, message = exc.exit_code, str(exc)
    else:
        code = EXIT_INTERNAL
        logger.debug("internal error", exc_info=exc)  # on stderr with -v, and into --log-file
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        message = f"internal error: {type(exc).__name__}: {first} ({_traceback_note(exc)})"
    typer.echo(f"pcim: error: {message}", err=True)
    if as_json:
        typer.echo(error_doc(code, message))
    return typer.Exit(code)


def _traceback_note(exc: BaseException) -> str:
    """Where the traceback of an internal error is: the --log-file, or a crash log written now."""
    for handler in logging.getLogger("pcim_cli").handlers:
        if isinstance(handler, logging.FileHandler):
            return f"traceback in {handler.baseFilename}"
    path = Path(tempfile.gettempdir()) / f"pcim-crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    try:
        path.write_text(f"pcim {__version__}: {' '.join(sys.argv)}\n" + "".join(traceback.format_exception(exc)))
    except OSError:
        return "rerun with -v to see the traceback"
    return f"traceback in {path}; -v prints it"
