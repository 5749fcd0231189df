"""The `pcim` command line: parse, call one library function, map its errors to exit codes.

Exit codes (shared/DESIGN.md §3.4): 0 all done; 1 internal error; 2 usage; 3 some units failed;
65 input data unusable; 75 retry later; 78 configuration invalid.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from pcim_cli import __version__
from pcim_cli.errors import EXIT_INTERNAL, PcimError

logger = logging.getLogger("pcim_cli")

EXIT_CODES_HELP = (
    "Exit codes: 0 every unit done; 1 internal error; 2 usage error; 3 some units failed (the rest "
    "are done and recorded); 65 input data unusable; 75 retry later (lock held, interrupted); "
    "78 configuration invalid."
)

app = typer.Typer(
    name="pcim",
    help="PCIM pixel-attribution maps for high-content-imaging plates. " + EXIT_CODES_HELP,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    handler: logging.Handler
    if sys.stderr.isatty():
        from rich.logging import RichHandler

        handler = RichHandler(show_path=False, rich_tracebacks=verbose > 0)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:  # cron mail, SLURM .out files, pipelines: plain timestamped lines, no control sequences
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    root = logging.getLogger("pcim_cli")
    root.handlers[:] = [handler]
    root.setLevel(level)


def _fail(exc: BaseException) -> typer.Exit:
    if isinstance(exc, PcimError):
        typer.echo(f"pcim: error: {exc}", err=True)
        return typer.Exit(exc.exit_code)
    logger.exception("internal error")
    typer.echo(f"pcim: internal error: {type(exc).__name__}: {exc} (rerun with -v for details)", err=True)
    return typer.Exit(EXIT_INTERNAL)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"pcim {__version__}")
        raise typer.Exit(0)


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """PCIM pixel-attribution maps for high-content-imaging plates."""


@app.command(epilog=EXIT_CODES_HELP)
def explain(
    plate_yaml: Annotated[Path, typer.Argument(help="The plate's plate.yaml.")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a key, e.g. --set explain.steps=100 "
                                                   "(repeatable; beats PCIM_* environment variables).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout at the end.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors.")] = False,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="More detail.")] = 0,
) -> None:
    """Fit PCIM maps for every field of a plate; write the OME-Zarr store and the CSV summary."""
    from pcim_cli import explain as explain_lib
    from pcim_cli.config import load_config

    _setup_logging(verbose, quiet)
    try:
        cfg = load_config(plate_yaml, set_ or ())
        result = explain_lib.run(cfg, on_well=lambda well, rows: logger.info(
            "%s: %s", well, ", ".join(f"site {r['site']} {r['status']}" for r in rows)))
    except Exception as exc:  # noqa: BLE001 - every error becomes one message and an exit code
        raise _fail(exc) from None
    counts = result.counts
    failed = counts["failed"] + len(result.problems)
    line = (f"{counts['done']} maps done, {failed} failed; store {result.store}; csv {result.csv}")
    if failed or not quiet:
        typer.echo(line, err=True)
    for f in result.failed:
        typer.echo(f"  failed {f['well']} site {f['site']}: {f['error']}", err=True)
    for p in result.problems:
        typer.echo(f"  not run: {p}", err=True)
    if as_json:
        doc = {"status": "ok" if result.exit_code == 0 else "partial" if result.exit_code == 3 else "failed",
               "exit_code": result.exit_code, "store": str(result.store), "csv": str(result.csv),
               "counts": counts, "failed": result.failed, "problems": result.problems}
        typer.echo(json.dumps(doc))
    raise typer.Exit(result.exit_code)


@app.command(epilog=EXIT_CODES_HELP)
def validate(
    plate_yaml: Annotated[Path, typer.Argument(help="The plate's plate.yaml.")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a key, as for explain.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the findings as JSON on stdout.")] = False,
) -> None:
    """Check plate.yaml, the layout, the images and the model without fitting or writing anything."""
    from pcim_cli import explain as explain_lib
    from pcim_cli.config import load_config

    _setup_logging(0, quiet=True)
    logging.getLogger("pcim_cli").setLevel(logging.ERROR)  # problems are part of the report below
    try:
        cfg = load_config(plate_yaml, set_ or ())
        found = explain_lib.inspect_plate(cfg).summary
    except Exception as exc:  # noqa: BLE001
        raise _fail(exc) from None
    found = {"plate": cfg.plate.name, "channels": list(cfg.plate.channels), **found}
    if as_json:
        typer.echo(json.dumps(found))
    else:
        model = found["model"]
        typer.echo(f"plate {found['plate']}: {found['wells']} wells, {found['fields']} fields, "
                   f"channels {', '.join(found['channels'])}")
        typer.echo(f"model {model['path']} ({model['kind']}, sha256 {model['sha256'][:12]}…), "
                   f"classes {', '.join(model['classes'])}")
        if found["layout_columns"]:
            typer.echo(f"layout columns: {', '.join(found['layout_columns'])}")
        for p in found["problems"]:
            typer.echo(f"problem: {p}")
    raise typer.Exit(3 if found["problems"] else 0)


@app.command()
def schema() -> None:
    """Print the JSON Schema of plate.yaml (for editors and linters)."""
    from pcim_cli.config import RunConfig

    typer.echo(json.dumps(RunConfig.model_json_schema(), indent=2))


if __name__ == "__main__":  # pragma: no cover
    app()
