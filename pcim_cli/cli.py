"""The `pcim` command line: parse, call one library function, map its errors to exit codes.

Exit codes (shared/DESIGN.md §3.4): 0 all done; 1 internal error; 2 usage; 3 some units failed;
65 input data unusable; 75 retry later; 78 configuration invalid.

Every error ends in one line `pcim: error: ...` on stderr; an internal error (a bug, or the machine
failing under pcim) adds where its traceback was written (the --log-file, or a crash log in the
temporary folder), and prints the traceback itself only with -v. With --json, stdout holds one JSON
document for every exit, errors included: `{"status": "error", "exit_code": N, "message": ...}`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Annotated

import typer

from pcim_cli import __version__
from pcim_cli.errors import (
    EXIT_INTERNAL,
    EXIT_TEMPFAIL,
    ConfigError,
    OutputError,
    PcimError,
    TemporaryFailure,
    clip,
    unplaced,
)

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

app = typer.Typer(
    name="pcim",
    help="PCIM pixel-attribution maps for high-content-imaging plates. " + EXIT_CODES_HELP,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


PLAIN_FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")


def fancy_terminal() -> bool:
    """stderr is a terminal and NO_COLOR is not set: Rich output; else plain lines, no control sequences."""
    return sys.stderr.isatty() and not os.environ.get("NO_COLOR")


def _setup_logging(verbose: int, quiet: bool, log_file: Path | None = None) -> None:
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
            raise _fail(error) from None
        to_file.setFormatter(PLAIN_FORMAT)
        to_file.setLevel(logging.DEBUG)
        root.handlers.append(to_file)
    root.setLevel(logging.DEBUG if log_file is not None else level)


def _wells_option(text: str | None) -> frozenset[str] | None:
    """`A01,b3, C/4` -> canonical well names; a bad name is a ConfigError naming it."""
    if text is None:
        return None
    from pcim_cli.io.plate import WellIdError, parse_well

    wells = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            wells.add(parse_well(part).name)
        except WellIdError as exc:
            raise ConfigError(f"--only: {exc}") from exc
    if not wells:
        raise ConfigError("--only needs at least one well, e.g. --only A01,B03")
    return frozenset(wells)


def _print_plan(p, as_json: bool) -> None:
    """--dry-run: what a run would do, per action, with an estimate from the fields already done."""
    counts = p.counts
    fit = [f for f in p.fields if f.fitted]
    done_times = [sum((f.record.get("timings_s") or {}).get(k, 0.0) for k in ("read", "fit"))
                  for f in p.fields if f.record]
    estimate = (sum(done_times) / len(done_times) * len(fit)) if done_times else None
    doc = {"counts": counts, "wells": len(p.tasks), "estimated_s": estimate,
           "fields": [{"well": f.well, "site": f.site, "action": f.action, "reason": f.reason} for f in p.fields],
           "problems": p.problems, "unusable": [{"well": r["well"], "site": r["site"], "error": r["error"]}
                                                for r in p.rows]}
    if as_json:
        typer.echo(json.dumps(doc, default=str))
        return
    typer.echo(f"would fit {counts['run'] + counts['redo']} fields in {len(p.tasks)} wells "
               f"({counts['run']} new, {counts['redo']} redone); {counts['done']} already done; "
               f"{counts['failed']} failed before (--retry-failed redoes them); {counts['excluded']} outside --only; "
               f"{counts['unusable']} unusable")
    if counts.get("objects"):
        typer.echo(f"{counts['objects']} done fields would get their object tables (re)made from their maps")
    if estimate is not None and fit:
        typer.echo(f"estimated fitting time on one worker: {estimate / 60:.1f} min (from the fields already done)")
    for f in fit:
        typer.echo(f"  {f.action:4s} {f.well} site {f.site}" + (f" ({f.reason})" if f.reason else ""))
    for r in p.rows:
        typer.echo(f"  unusable {r['well']} site {r['site']}: {r['error']}")
    for problem in p.problems:
        typer.echo(f"  problem: {problem}")


def _error_doc(code: int, message: str, status: str = "error") -> str:
    return json.dumps({"status": status, "exit_code": code, "message": message})


def _fail(exc: BaseException, as_json: bool = False) -> typer.Exit:
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
        typer.echo(_error_doc(code, message))
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


_BEFORE_RUN = [True]


def _stop_early(signum: int, frame: object) -> None:
    """SIGTERM / SIGINT outside the run's own handlers: before it, stop (nothing written yet); after it
    (the run is recorded), change nothing."""
    if _BEFORE_RUN[0]:
        raise KeyboardInterrupt


def main() -> None:
    """The console script: the Typer app, with a JSON document (--json) for usage errors too."""
    args = sys.argv[1:]
    try:
        code = typer.main.get_command(app).main(args=args, prog_name="pcim", standalone_mode=False)
    except typer.TyperException as exc:  # usage errors (exit 2), from Typer's own click
        code = getattr(exc, "exit_code", 2)
        if "--json" in args:
            typer.echo(_error_doc(code, exc.format_message() if hasattr(exc, "format_message") else str(exc)))
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


@app.command(epilog=EXIT_CODES_HELP)
def explain(
    plate_yamls: Annotated[list[str], typer.Argument(metavar="PLATE_YAML...", help="The plate's plate.yaml; or "
                                                     "several, quoted globs ('screen/*/plate.yaml', expanded by "
                                                     "pcim) or a screen file (screen.yaml with plates:): a screen, "
                                                     "run on one cluster.")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a key, e.g. --set explain.steps=100 "
                                                   "(repeatable; beats PCIM_* environment variables).")] = None,
    only: Annotated[str | None, typer.Option("--only", help="Only these wells, e.g. --only A01,B03 (the CSV "
                                             "still lists the whole plate).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Redo every field, even those already done.")] = False,
    retry_failed: Annotated[bool, typer.Option("--retry-failed", help="Redo fields that failed in an earlier "
                                               "run with the same settings.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print what would be done, skipped and redone; "
                                          "write nothing.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout at the end.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors.")] = False,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="More detail.")] = 0,
    log_file: Annotated[Path | None, typer.Option("--log-file", help="Also append detailed (debug) log lines "
                                                  "to this file.")] = None,
    max_plates_in_flight: Annotated[int, typer.Option("--max-plates-in-flight", min=1, help="Screens: plates "
                                                      "planned and locked at once (bounds the driver's memory).")] = 4,
) -> None:
    """Fit PCIM maps for every field of a plate (or of every plate of a screen); write each plate's
    OME-Zarr store and CSV summary.

    A rerun continues where the last one stopped: fields already done with the same settings are
    skipped, fields whose settings or model changed are redone.
    """
    with contextlib.suppress(ValueError):  # not the main thread (called from a test's thread): no handler
        for sig in (signal.SIGTERM, signal.SIGINT):  # until the run installs its own handlers
            signal.signal(sig, _stop_early)
    try:
        _setup_logging(verbose, quiet, log_file)
        from pcim_cli import screen_cli
        from pcim_cli.config import load_config
        from pcim_cli.run import explain as explain_lib
        from pcim_cli.run.rerun import Rerun

        choice = Rerun(force=force, retry_failed=retry_failed, only=_wells_option(only))
        if screen_cli.is_screen(plate_yamls):
            code = screen_cli.explain_screen(plate_yamls, set_ or (), choice, dry_run=dry_run, as_json=as_json,
                                             quiet=quiet, fancy=fancy_terminal(), max_in_flight=max_plates_in_flight,
                                             on_run=lambda: _BEFORE_RUN.__setitem__(0, False))
            raise typer.Exit(code)
        cfg = load_config(plate_yamls[0], set_ or ())
        if dry_run:
            explain_lib.preflight(cfg, choice)
            _print_plan(explain_lib.plan(cfg, choice), as_json)
            raise typer.Exit(0)
        from pcim_cli.run.progress import WellProgress

        with WellProgress(fancy=fancy_terminal(), quiet=quiet) as progress:
            _BEFORE_RUN[0] = False  # from here the run's handlers decide; after it, signals change nothing
            result = explain_lib.run(cfg, on_well=progress.on_well, choice=choice, on_start=progress.start)
    except typer.Exit:
        raise
    except KeyboardInterrupt:  # a signal before the run began: nothing was written
        message = "interrupted before the run began (SIGTERM / Ctrl-C); nothing was written: rerun the command"
        typer.echo(f"pcim: error: {message}", err=True)
        if as_json:
            typer.echo(_error_doc(EXIT_TEMPFAIL, message, status="interrupted"))
        raise typer.Exit(EXIT_TEMPFAIL) from None
    except Exception as exc:  # noqa: BLE001 - every error becomes one message and an exit code
        raise _fail(exc, as_json) from None
    advice = explain_lib.fit_advice(result, cfg)
    if advice:  # once per run; a weak map is no failure: cron (-q) gets it only in --log-file
        logger.log(logging.INFO if quiet else logging.WARNING, "%s", advice)
    counts = result.counts
    failed = counts["failed"] + len(result.problems)
    fits = result.fits
    weak = (f" ({fits['weak']} weak, {fits['failed']} failed fits: see PCIM_Fit)"
            if fits["weak"] + fits["failed"] else "")
    if result.csv is None:
        line = f"stopped before anything was written to {result.store}; rerun the same command"
    else:
        line = (f"{counts['done']} maps done{weak} ({result.fitted} fitted by this run), {failed} failed, "
                f"{counts['skipped']} not run; store {result.store}; csv {result.csv}"
                + "".join(f"; {name} {path}" for name, path in result.object_csvs.items())
                + "".join(f"; removed the stale table {path} (plate.objects no longer lists it)"
                          for path in result.removed))
    if failed or result.object_failures or result.interrupted or not quiet:
        typer.echo(line, err=True)
    for f in result.failed:
        typer.echo(f"  failed {f['well']} site {f['site']}: {unplaced(f['well'], f['site'], f['error'])}", err=True)
    for f in result.object_failures:
        typer.echo(f"  {f['object']} table failed {f['well']} site {f['site']} (map done): "
                   f"{unplaced(f['well'], f['site'], f['error'])}", err=True)
    for p in result.problems:
        typer.echo(f"  not run: {p}", err=True)
    for v in [] if quiet else result.verdicts:
        typer.echo(f"verdict: {v.sentence}", err=True)
    if as_json:
        status = {0: "ok", 3: "partial", 75: "interrupted"}.get(result.exit_code, "failed")
        doc = {"status": status, "exit_code": result.exit_code, "store": str(result.store),
               "csv": None if result.csv is None else str(result.csv), "counts": counts, "fits": fits,
               "fitted": result.fitted, "failed": result.failed + result.object_failures, "problems": result.problems,
               "object_csvs": {k: str(v) for k, v in result.object_csvs.items()},
               "object_failures": result.object_failures, "removed": [str(p) for p in result.removed],
               "message": line,
               "verdicts": [v.to_dict() for v in result.verdicts]}
        typer.echo(json.dumps(doc))
    raise typer.Exit(result.exit_code)


@app.command(epilog=VALIDATE_EXIT_CODES_HELP)
def validate(
    plate_yaml: Annotated[Path, typer.Argument(help="The plate's plate.yaml, or a screen file (every plate).")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a key, as for explain.")] = None,
    pixels: Annotated[bool | None, typer.Option("--pixels/--headers-only", help="Read every field's pixels and "
                                                "score it once with the model (default: on plates whose files "
                                                "total at most 1 GB), or only read TIFF headers.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the findings as JSON on stdout.")] = False,
    no_probe: Annotated[bool, typer.Option("--no-probe", help="Do not time a fit step for the ETA.")] = False,
) -> None:
    """Check plate.yaml, the layout, every field's images and the model; fit nothing, write nothing; and say
    what explain will do: tiles per field size, each well's target, the aggregation and the estimated cost.

    Exit 0: no problem; 3: some fields would fail (listed with the messages explain would write);
    65: no field would work; 78: configuration invalid.
    """
    _setup_logging(0, quiet=True)
    logging.getLogger("pcim_cli").setLevel(logging.ERROR)  # problems are part of the report below
    try:
        from pcim_cli import screen_cli
        from pcim_cli.config import load_config
        from pcim_cli.run import validate as validate_lib

        if screen_cli.is_screen([str(plate_yaml)]):  # a screen file: every plate, as explain would run it
            raise typer.Exit(screen_cli.validate_screen([str(plate_yaml)], set_ or (), pixels, not no_probe,
                                                        as_json, _print_validation))
        cfg = load_config(plate_yaml, set_ or ())
        found = validate_lib.validate_plate(cfg, pixels, probe=not no_probe)
    except typer.Exit:
        raise
    except Exception as exc:  # noqa: BLE001
        raise _fail(exc, as_json) from None
    if as_json:
        typer.echo(json.dumps(found.to_dict()))
    else:
        _print_validation(found)
    raise typer.Exit(found.exit_code)


def _print_validation(found) -> None:
    """What `pcim validate` found on one plate, as lines."""
    model = found.model
    typer.echo(f"plate {found.plate}: {found.wells} wells, {found.fields} fields, "
               f"channels {', '.join(found.channels)}")
    typer.echo(f"model {model['path']} ({model['kind']}, sha256 {model['sha256'][:12]}…), "
               f"classes {', '.join(model['classes'])}")
    if model.get("package"):
        _print_package(model["package"])
    if found.layout_columns:
        typer.echo(f"layout columns: {', '.join(found.layout_columns)}")
    typer.echo(f"checked: {'pixels and model output' if found.checked == 'pixels' else 'headers'} of "
               f"every field; {found.usable} of {found.fields} fields usable")
    for name, count in found.objects.items():
        typer.echo(f"objects {name}: label images for {count} of {found.fields} fields")
    if found.explainer:
        typer.echo(f"explainer {found.explainer['path']} (sha256 {found.explainer['sha256'][:12]}…) fits "
                   "this plate's classifier, channels, normalisation and settings")
    for p in found.problems:
        typer.echo(f"problem: {p}")
    if found.plan is not None:
        _print_run_plan(found.plan)


def _print_package(pkg: dict) -> None:
    """validate: what was taken from a bioimage.io model package (run/model_package.py)."""
    version = f", version {pkg['version']}" if pkg.get("version") else ""
    typer.echo(f"  from bioimage.io package {pkg['source']} ({pkg['name']}{version}, format {pkg['format_version']}, "
               f"{pkg['weights']} weights): "
               + "; ".join(f"{key} from the {how}" for key, how in pkg.get("decided", {}).items()))
    norm = pkg.get("normalize")
    if norm:
        typer.echo("  its preprocessing " + (" -> ".join(op["id"] for op in pkg["preprocessing"]) or "none")
                   + " is model.normalize " + ", ".join(f"{k}: {v}" for k, v in norm.items()))
    for note in pkg.get("notes", []):
        typer.echo(f"  note: {note}")


def _print_run_plan(plan) -> None:
    """validate's plan section: what explain will do."""
    typer.echo("plan (what explain will do):")
    for s in plan.sizes:
        head = f"  {s['fields']} field(s) of {s['field'][0]}x{s['field'][1]} px: "
        if "problem" in s:
            typer.echo(head + s["problem"])
        elif s["n_tiles"] == 1:
            typer.echo(head + "one tile (the whole field)")
        else:
            whole = {True: "accepts", False: "does not accept"}[s["whole_field_accepted"]]
            typer.echo(head + f"{s['n_tiles']} tiles of {s['tile'][0]}x{s['tile'][1]} px ({s['grid'][0]} x "
                       f"{s['grid'][1]}, overlap {s['overlap'][0]}x{s['overlap'][1]} px); field prediction: "
                       f"model.aggregate {plan.aggregate}; maps: explain.tile_maps {plan.tile_maps}; the model "
                       f"{whole} the untiled field (model.aggregate: whole-field)")
    targets: dict[str, list[str]] = {}
    for well, t in plan.targets.items():
        targets.setdefault(t, []).append(well)
    for t, wells in targets.items():
        shown = ", ".join(wells[:8]) + (f" … ({len(wells)} wells)" if len(wells) > 8 else "")
        typer.echo(f"  target {t}: {shown}")
    eta = "" if plan.eta_s is None else (f"; about {plan.eta_s / 60:.1f} min on {plan.device} with one worker "
                                         f"({plan.seconds_per_pass * 1000:.2f} ms per image pass, timed)")
    typer.echo(f"  cost: {plan.maps} maps, {plan.model_passes:,} model passes{eta}")


@app.command(epilog=EXIT_CODES_HELP)
def render(
    store: Annotated[Path, typer.Argument(help="The OME-Zarr store that `pcim explain` wrote (output.zarr).")],
    wells: Annotated[str | None, typer.Option("--wells", help="Wells to draw, comma-separated, e.g. A01,B03 "
                                              "(default: every well in the store).")] = None,
    plate_yaml: Annotated[Path | None, typer.Option("--plate-yaml", help="The plate.yaml, so the maps are "
                                                    "drawn over the raw images (the store has none).")] = None,
    channel: Annotated[str | None, typer.Option("--channel", help="Raw channel under the maps (default: the "
                                                "first of plate.channels; needs --plate-yaml).")] = None,
    per_channel: Annotated[bool, typer.Option("--per-channel", help="One panel per channel instead of one "
                                              "per target.")] = False,
    out: Annotated[Path | None, typer.Option("--out", help="Folder for the PNGs and report.html "
                                             "(default: <store>_render beside the store).")] = None,
    csv: Annotated[Path | None, typer.Option("--csv", help="The CSV summary for the report (default: the "
                                             "one beside the store).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the written paths as JSON on stdout.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors.")] = False,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="More detail.")] = 0,
) -> None:
    """Draw the maps: PNG overlays per field, a plate montage and report.html (opens without a server)."""
    from pcim_cli.report import render as render_lib

    _setup_logging(verbose, quiet)
    chosen = [w.strip() for w in wells.split(",") if w.strip()] if wells else None
    try:
        result = render_lib.render(store, out_dir=out, wells=chosen, plate_yaml=plate_yaml, channel=channel,
                                   per_channel=per_channel, csv=csv)
    except Exception as exc:  # noqa: BLE001
        raise _fail(exc, as_json) from None
    if as_json:
        typer.echo(json.dumps(result.to_dict()))
    else:
        if not quiet:
            typer.echo(f"{len(result.overlays)} overlays in {result.out_dir / 'wells'}; montage {result.montage}",
                       err=True)
        typer.echo(str(result.report))


@app.command(epilog=EXIT_CODES_HELP)
def status(
    store_paths: Annotated[list[str], typer.Argument(metavar="OUT.zarr...", help="A store written by pcim "
                                                     "explain; or several stores, plate.yaml files or a screen "
                                                     "file: one row per plate.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the status as JSON on stdout.")] = False,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a key of the plate configs, as for "
                                                   "explain (where their stores are).")] = None,
) -> None:
    """Done / failed / missing fields per well of a store (per plate of a screen); exit 0 when every field
    is done, else 3."""
    from pcim_cli.report.status import store_status

    try:
        from pcim_cli import screen_cli

        if not screen_cli.is_single_store(store_paths):
            raise typer.Exit(screen_cli.status_screen(store_paths, set_ or (), as_json, fancy_terminal()))
        report = store_status(Path(store_paths[0]))
    except typer.Exit:
        raise
    except Exception as exc:  # noqa: BLE001
        raise _fail(exc, as_json) from None
    if as_json:
        typer.echo(json.dumps(report.as_dict(), default=str))
        raise typer.Exit(report.exit_code)
    from rich.console import Console
    from rich.table import Table

    table = Table("well", "fields", "done", "failed", "missing", "errors", title=str(report.store))
    for w in report.wells:
        table.add_row(w.well, str(w.fields), str(w.done), str(w.failed), str(w.missing), clip("; ".join(w.errors), 80))
    totals = report.totals
    table.add_row("all", *(str(totals[k]) for k in ("fields", "done", "failed", "missing")), "")
    Console(no_color=not fancy_terminal(), width=None if fancy_terminal() else 120).print(table)
    for f in report.fields:
        if f.state in ("damaged", "stale"):
            typer.echo(f"{f.state} {f.path} (well {f.well}): {f.error}")
        for name, error in f.object_failures:
            typer.echo(f"{name} table failed {f.path} (well {f.well} site {f.site}; its map is done): "
                       f"{unplaced(f.well, f.site, error)}")
    if report.fingerprints > 1:
        typer.echo(f"note: the maps in the store were made with {report.fingerprints} different settings; those "
                   "not made with the last run's are stale and the next run redoes them", err=True)
    raise typer.Exit(report.exit_code)


@app.command()
def init(
    path: Annotated[Path, typer.Argument(help="Where to write the template.")] = Path("plate.yaml"),
    force: Annotated[bool, typer.Option("--force", help="Replace an existing file.")] = False,
) -> None:
    """Write a commented plate.yaml template to fill in."""
    from pcim_cli.template import write_template

    try:
        written = write_template(path, overwrite=force)
    except Exception as exc:  # noqa: BLE001
        raise _fail(exc) from None
    typer.echo(f"wrote {written}; fill in the FILL IN lines, then run: pcim validate {written}", err=True)


@app.command(epilog=EXIT_CODES_HELP)
def evaluate(
    plate_yaml: Annotated[Path, typer.Argument(help="The plate's plate.yaml.")],
    masks: Annotated[str, typer.Option("--masks", help="Mask file pattern with {well} (or {row}, {col}) and "
                                       "{field}, e.g. masks/{well}_s{field}.tif; nonzero = true evidence.")],
    methods: Annotated[str | None, typer.Option("--methods", help="Comma-separated methods to compare (default: "
                                                "every explain.method: pcim, the baselines, the trivial maps "
                                                "intensity, contrast, and pcim-amortised when explain.explainer "
                                                "is set).")] = None,
    wells: Annotated[str | None, typer.Option("--wells", help="A number N (N wells spread over the plate, "
                                              "wells with evidence first) or a list A01,B03. Default: all.")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Output folder (default: next to the CSV, "
                                             "<plate>_evaluate/).")] = None,
    no_sanity: Annotated[bool, typer.Option("--no-sanity", help="Skip the randomised-model sanity check "
                                            "(halves the time).")] = False,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a key, as for explain.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the comparison as JSON on stdout.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors.")] = False,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="More detail.")] = 0,
) -> None:
    """Compare PCIM with the baselines on a plate with masks of the true evidence: tables and plots."""
    from pcim_cli.config import load_config
    from pcim_cli.report import evaluate as evaluate_lib

    _setup_logging(verbose, quiet)
    well_arg: int | list[str] | None = None
    if wells is not None:
        well_arg = int(wells) if wells.strip().isdigit() else [w.strip() for w in wells.split(",") if w.strip()]
    try:
        cfg = load_config(plate_yaml, set_ or ())
        result = evaluate_lib.evaluate(cfg, masks, None if methods is None else methods.split(","), well_arg, out,
                                       sanity=not no_sanity)
    except Exception as exc:  # noqa: BLE001
        raise _fail(exc, as_json) from None
    if as_json:
        typer.echo(json.dumps({"out": str(result.out), "fields": result.fields,
                               "files": {k: str(v) for k, v in result.files.items()},
                               "intensity_channel": result.intensity_channel,
                               "verdicts": [v.to_dict() for v in result.verdicts],
                               "table": json.loads(result.table.to_json(orient="records"))}))
    else:
        typer.echo(evaluate_lib.markdown_table(result.table))
        for v in result.verdicts:
            typer.echo(f"verdict ({v.target}): {v.sentence}")
    if not quiet:
        typer.echo(f"{len(result.fields)} fields; comparison in {result.out}", err=True)


@app.command("train-explainer", epilog=EXIT_CODES_HELP)
def train_explainer(
    plate_yamls: Annotated[list[Path], typer.Argument(help="The plate.yaml of each plate to train on (same "
                                                      "classifier, channels and normalisation).")],
    out: Annotated[Path, typer.Option("--out", help="Where to write the explainer (TorchScript); its JSON "
                                      "sidecar goes to <out>.json, the checkpoint to <out>.ckpt.")],
    steps: Annotated[int | None, typer.Option("--steps", help="Training steps (default 1000).")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Crops per step (default 8).")] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Peak learning rate of the one-cycle schedule "
                                             "(default 0.002).")] = None,
    crop: Annotated[int | None, typer.Option("--crop", help="Crop size in px (default: model.input_size, or "
                                             "whole fields).")] = None,
    val_wells: Annotated[str | None, typer.Option("--val-wells", help="Wells held out for validation on every "
                                                  "plate, e.g. A03,C05 (default: every 5th well).")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed of the initial weights and the crops "
                                             "(default 0).")] = None,
    checkpoint_every: Annotated[int | None, typer.Option("--checkpoint-every", help="Steps between checkpoints "
                                                         "(default 25).")] = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="Start over: ignore a checkpoint or an explainer "
                                        "already trained with the same settings.")] = False,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a key of every plate.yaml, as for "
                                                   "explain (e.g. compute.device=cuda).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the explainer's record as JSON on stdout.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors.")] = False,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="More detail.")] = 0,
) -> None:
    """Train an amortised PCIM explainer for the plates' classifier (explain.method: pcim-amortised).

    Held-out wells measure the validation objective; a killed or interrupted run resumes from its
    checkpoint when the same command is run again.
    """
    with contextlib.suppress(ValueError):  # SIGTERM / Ctrl-C before training's own handlers: exit 75
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, _stop_early)
    try:
        from pcim_cli.config import load_config
        from pcim_cli.run import train as train_lib
        from pcim_cli.run.progress import StepProgress

        _setup_logging(verbose, quiet)
        engine = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed}
        run = {"crop": crop, "checkpoint_every": checkpoint_every,
               "val_wells": None if val_wells is None else tuple(w.strip() for w in val_wells.split(",") if w.strip())}
        settings = train_lib.settings(engine, run)
        cfgs = [load_config(p, set_ or ()) for p in plate_yamls]
        with StepProgress(fancy=fancy_terminal(), quiet=quiet) as progress:
            result = train_lib.train_explainer(cfgs, out, settings, progress=progress, fresh=fresh)
    except typer.Exit:
        raise
    except KeyboardInterrupt:  # before the training loop (or after it, while saving): rerun to continue
        message = (f"train-explainer interrupted (SIGTERM / Ctrl-C) before its next checkpoint; {out} is as it "
                   "was: rerun the same command (it resumes from the last checkpoint, if any)")
        raise _fail(TemporaryFailure(message), as_json) from None
    except Exception as exc:  # noqa: BLE001
        raise _fail(exc) from None
    if as_json:
        typer.echo(json.dumps({"out": str(result.out), "sidecar": str(result.sidecar), "sha256": result.sha256,
                               "up_to_date": result.up_to_date, "resumed_from": result.resumed_from,
                               **result.meta}, default=str))
    elif not quiet:
        typer.echo(train_lib.describe(result), err=True)


@app.command()
def schema() -> None:
    """Print the JSON Schema of plate.yaml (for editors and linters)."""
    from pcim_cli.config import RunConfig

    typer.echo(json.dumps(RunConfig.model_json_schema(), indent=2))


if __name__ == "__main__":  # pragma: no cover
    main()
