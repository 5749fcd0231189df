"""The `pcim` command line (the console script is `pcim_cli.cli:main`)."""

from pcim_cli.cli.app import app, main

__all__ = ["app", "main"]
