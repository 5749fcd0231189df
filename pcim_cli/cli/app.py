"""The `pcim` command line: parse, call one library function, map its errors to exit codes.

Exit codes (docs/reference/exit-codes.md): 0 all done; 1 internal error; 2 usage; 3 some units failed;
65 input data unusable; 75 retry later; 78 configuration invalid.

The commands live in cli/explain.py, cli/inspect.py (validate, status, render) and cli/tools.py (init,
schema, evaluate, train-explainer); what they share (options, logging, errors) in cli/common.py. Each
parses its options, calls one library function and turns its result or error into output and an exit
code.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from pcim_cli import __version__
from pcim_cli.cli import explain as explain_cmd
from pcim_cli.cli import inspect as inspect_cmd
from pcim_cli.cli import tools as tools_cmd
from pcim_cli.cli.common import EXIT_CODES_HELP, VALIDATE_EXIT_CODES_HELP, error_doc

__all__ = ["app", "main"]

app = typer.Typer(
    name="pcim",
    help="PCIM pixel-attribution maps for high-content-imaging plates. " + EXIT_CODES_HELP,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def main() -> None:
    """The console script: the Typer app, with a JSON document (--json) for usage errors too."""
    args = sys.argv[1:]
    try:
        code = typer.main.get_command(app).main(args=args, prog_name="pcim", standalone_mode=False)
    except typer.TyperException as exc:  # usage errors (exit 2), from Typer's own click
        code = getattr(exc, "exit_code", 2)
        if "--json" in args:
            typer.echo(error_doc(code, exc.format_message() if hasattr(exc, "format_message") else str(exc)))
        if hasattr(exc, "show"):
            exc.show()
        else:
            typer.echo(f"pcim: error: {exc}", err=True)
    sys.exit(code if isinstance(code, int) else 0)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"pcim {__version__}")
        raise typer.Exit(0)


@app.callback()
def root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """PCIM pixel-attribution maps for high-content-imaging plates."""


app.command(epilog=EXIT_CODES_HELP)(explain_cmd.explain)
app.command(epilog=VALIDATE_EXIT_CODES_HELP)(inspect_cmd.validate)
app.command(epilog=EXIT_CODES_HELP)(inspect_cmd.render)
app.command(epilog=EXIT_CODES_HELP)(inspect_cmd.status)
app.command()(tools_cmd.init)
app.command(epilog=EXIT_CODES_HELP)(tools_cmd.evaluate)
app.command("train-explainer", epilog=EXIT_CODES_HELP)(tools_cmd.train_explainer)
app.command()(tools_cmd.schema)


if __name__ == "__main__":  # pragma: no cover
    main()
