"""`python -m pcim_cli.cli`: the same as the `pcim` console script."""

from pcim_cli.cli.app import main

main()
