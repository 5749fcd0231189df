"""What `pcim explain` and `pcim status` print for a screen (several plates); cli.py dispatches here.

Like cli.py, this only calls one library function (run/screen.run_screen, report/status.screen_status)
and turns its result into lines, JSON and an exit code.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import typer

from pcim_cli.run.rerun import Rerun


def is_screen(args: Sequence[str]) -> bool:
    """Several arguments, a glob, or a screen file: the screen path of `pcim explain`."""
    from pcim_cli.config.screen import is_screen_file

    if len(args) != 1:
        return True
    path = Path(args[0]).expanduser()
    if not path.exists() and glob.has_magic(args[0]):
        return True
    return path.is_file() and is_screen_file(path)


def is_single_store(args: Sequence[str]) -> bool:
    """One argument that is a store folder (or names nothing at all): the single-store `pcim status`."""
    if len(args) != 1:
        return False
    path = Path(args[0]).expanduser()
    return path.is_dir() or (not path.exists() and not glob.has_magic(args[0]))


def explain_screen(args: Sequence[str], overrides: Sequence[str], choice: Rerun, dry_run: bool, as_json: bool,
                   quiet: bool, fancy: bool, max_in_flight: int, on_run: Callable[[], None] | None = None) -> int:
    """`pcim explain` over several plates; returns the exit code. `on_run` is called when the run (and its
    own signal handling) begins."""
    from pcim_cli.config.screen import load_screen
    from pcim_cli.run.progress import ScreenProgress
    from pcim_cli.run.screen import run_screen

    screen = load_screen(args, overrides)
    if dry_run:
        return _dry_run(screen, choice, as_json)
    if on_run is not None:
        on_run()
    with ScreenProgress(fancy=fancy, quiet=quiet, plates=len(screen.entries)) as progress:
        result = run_screen(screen, choice, max_in_flight=max_in_flight, progress=progress)
    counts = result.counts
    code = result.exit_code
    complete = sum(p.exit_code == 0 for p in result.plates)
    line = (f"screen: {len(result.plates)} plates, {complete} complete; {counts['done']} maps done "
            f"({result.fitted} fitted by this run), {counts['failed']} failed, {counts['skipped']} not run; "
            f"exit {code}" + (f"; screen csv {result.screen_csv}" if result.screen_csv else ""))
    if code or not quiet:
        typer.echo(line, err=True)
    for p in [] if quiet else result.plates:  # each plate's shortcut verdict, as a one-plate run prints it
        for f in p.result.shortcuts.findings if p.result is not None and p.result.shortcuts is not None else []:
            typer.echo(f"  plate {p.name}: shortcut: {f.sentence}", err=True)
    from pcim_cli.errors import unplaced

    for p in result.plates:
        if p.exit_code == 0:
            continue
        typer.echo(f"  plate {p.name}: exit {p.exit_code}: " + (p.error or _plate_problem(p.result)), err=True)
        for f in (p.result.failed if p.result else [])[:20]:
            typer.echo(f"    failed {f['well']} site {f['site']}: {unplaced(f['well'], f['site'], f['error'])}",
                       err=True)
        for f in (p.result.object_failures if p.result else [])[:20]:
            typer.echo(f"    {f['object']} table failed {f['well']} site {f['site']} (map done): "
                       f"{unplaced(f['well'], f['site'], f['error'])}", err=True)
    if as_json:
        status = {0: "ok", 3: "partial", 75: "interrupted"}.get(code, "failed")
        doc = {"status": status, "exit_code": code, "counts": counts, "fitted": result.fitted,
               "screen_csv": None if result.screen_csv is None else str(result.screen_csv),
               "plates": [p.as_dict() for p in result.plates]}
        typer.echo(json.dumps(doc, default=str))
    return code


def _plate_problem(result) -> str:
    """Why a plate that ran did not end with exit 0: interrupted, failed fields or object tables."""
    if result is None:
        return "not run"
    counts = result.counts
    parts = []
    if result.interrupted:
        parts.append(f"interrupted: {counts['skipped']} field(s) not run; run the same command again to finish")
    if counts["failed"] or result.problems:
        parts.append(f"{counts['failed']} field(s) failed" + (f", {len(result.problems)} problem(s)"
                                                              if result.problems else ""))
    if result.object_failures:
        parts.append(f"{len(result.object_failures)} object table(s) failed (maps done)")
    return "; ".join(parts) or f"{counts['failed']} field(s) failed"


def _dry_run(screen, choice: Rerun, as_json: bool) -> int:
    """--dry-run over a screen: each plate's plan (nothing written)."""
    from pcim_cli.errors import PcimError
    from pcim_cli.io import outputs
    from pcim_cli.run import explain as explain_lib

    outputs.check_screen(screen.configs, screen.screen_csv, screen.files)
    docs = []
    for entry in screen.entries:
        doc: dict = {"plate": entry.name, "source": entry.source}
        if entry.config is None:
            doc["error"] = entry.problem
        else:
            try:
                explain_lib.preflight(entry.config, choice)
                p = explain_lib.plan(entry.config, choice)
                doc.update(counts=p.counts, wells=len(p.tasks))
            except PcimError as exc:
                doc["error"] = str(exc)
        docs.append(doc)
        if not as_json:
            if "error" in doc:
                typer.echo(f"plate {doc['plate']}: not run: {doc['error']}")
            else:
                c = doc["counts"]
                typer.echo(f"plate {doc['plate']}: would fit {c['run'] + c['redo']} fields in {doc['wells']} wells "
                           f"({c['run']} new, {c['redo']} redone); {c['done']} already done; {c['failed']} failed "
                           f"before; {c['unusable']} unusable")
    if as_json:
        typer.echo(json.dumps({"plates": docs}, default=str))
    return 0


def validate_screen(args: Sequence[str], overrides: Sequence[str], pixels: bool | None, probe: bool, as_json: bool,
                    print_one: Callable[[object], None]) -> int:
    """`pcim validate` of a screen file: every plate as explain would run it (its config, then what
    validate checks), and the screen's output paths; returns the worst exit code of its plates."""
    from pcim_cli.config.screen import load_screen
    from pcim_cli.errors import EXIT_CONFIG, PcimError
    from pcim_cli.io import outputs
    from pcim_cli.run import validate as validate_lib
    from pcim_cli.run.screen import combine_exit_codes

    screen = load_screen(args, overrides)
    outputs.check_screen(screen.configs, screen.screen_csv, screen.files)  # as explain: refused before any plate
    docs, codes = [], []
    for i, entry in enumerate(screen.entries):
        doc: dict = {"plate": entry.name, "source": entry.source}
        found = None
        if entry.config is None:
            code, doc["error"] = EXIT_CONFIG, entry.problem
        else:
            try:
                found = validate_lib.validate_plate(entry.config, pixels, probe=probe)
                code = found.exit_code
                doc.update(found.to_dict())
            except PcimError as exc:
                code, doc["error"] = exc.exit_code, str(exc)
        doc["exit_code"] = code
        codes.append(code)
        docs.append(doc)
        if not as_json:
            typer.echo(f"== plate {entry.name} ({i + 1}/{len(screen.entries)}): {entry.source}")
            if found is None:
                typer.echo(f"not usable (exit {code}): {doc['error']}")
            else:
                print_one(found)
    code = combine_exit_codes(codes)
    if as_json:
        typer.echo(json.dumps({"plates": docs, "exit_code": code}, default=str))
    return code


def status_screen(args: Sequence[str], overrides: Sequence[str], as_json: bool, fancy: bool) -> int:
    """`pcim status` over several plates: one row per plate; returns the exit code."""
    from pcim_cli.report.status import screen_status

    report = screen_status(list(args), list(overrides))
    if as_json:
        typer.echo(json.dumps(report.as_dict(), default=str))
        return report.exit_code
    from rich.console import Console
    from rich.table import Table

    from pcim_cli.errors import clip

    totals = report.totals
    columns = [k for k in totals]
    table = Table("plate", *columns, "complete", "store / problem", title=f"{len(report.plates)} plates")
    for p in report.plates:
        where = clip(p.problem.splitlines()[0], 100) if p.problem else str(p.store)
        table.add_row(p.plate, *(str(p.totals.get(k, "")) for k in columns), "yes" if p.complete else "no", where)
    table.add_row("all", *(str(totals[k]) for k in columns), f"{sum(p.complete for p in report.plates)}", "")
    Console(no_color=not fancy, width=None if fancy else 160).print(table)
    return report.exit_code
