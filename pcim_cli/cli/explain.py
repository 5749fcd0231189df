"""`pcim explain`: one plate (or a screen: cli/screen.py), its dry run, and what it prints."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import typer

from pcim_cli.cli.common import (
    Quiet,
    Verbose,
    error_doc,
    fail,
    fancy_terminal,
    json_option,
    only_wells,
    set_option,
    setup_logging,
)
from pcim_cli.errors import EXIT_TEMPFAIL, unplaced
from pcim_cli.report import fits as fit_words
from pcim_cli.run.signals import BeforeRun

__all__ = ["explain"]

logger = logging.getLogger("pcim_cli")


def explain(
    plate_yamls: Annotated[list[str], typer.Argument(metavar="PLATE_YAML...", help="The plate's plate.yaml; or "
                                                     "several, quoted globs ('screen/*/plate.yaml', expanded by "
                                                     "pcim) or a screen file (screen.yaml with plates:): a screen, "
                                                     "run on one cluster.")],
    set_: set_option("Override a key, e.g. --set explain.steps=100 (repeatable; beats PCIM_* environment "
                     "variables).") = None,
    only: Annotated[str | None, typer.Option("--only", help="Only these wells, e.g. --only A01,B03 (the CSV "
                                             "still lists the whole plate).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Redo every field, even those already done.")] = False,
    retry_failed: Annotated[bool, typer.Option("--retry-failed", help="Redo fields that failed in an earlier "
                                               "run with the same settings.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print what would be done, skipped and redone; "
                                          "write nothing.")] = False,
    as_json: json_option("Print one JSON document on stdout at the end.") = False,
    quiet: Quiet = False,
    verbose: Verbose = 0,
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
    before = BeforeRun()  # until the run installs its own handlers, a signal stops at once
    with before:
        code = _explain(plate_yamls, set_ or (), only, force, retry_failed, dry_run, as_json, quiet, verbose,
                        log_file, max_plates_in_flight, before)
    raise typer.Exit(code)


def _explain(plate_yamls: list[str], overrides: Sequence[str], only: str | None, force: bool, retry_failed: bool,
             dry_run: bool, as_json: bool, quiet: bool, verbose: int, log_file: Path | None, max_plates_in_flight: int,
             before: BeforeRun) -> int:
    try:
        setup_logging(verbose, quiet, log_file)
        from pcim_cli.cli import screen as screen_cli
        from pcim_cli.config import load_config
        from pcim_cli.run.rerun import Rerun

        choice = Rerun(force=force, retry_failed=retry_failed, only=only_wells(only))
        if screen_cli.is_screen(plate_yamls):
            return screen_cli.explain_screen(plate_yamls, overrides, choice, dry_run=dry_run, as_json=as_json,
                                             quiet=quiet, fancy=fancy_terminal(), max_in_flight=max_plates_in_flight,
                                             on_run=before.started)
        cfg = load_config(plate_yamls[0], overrides)  # a configuration error comes back before torch is loaded
        from pcim_cli.run import explain as explain_lib

        if dry_run:
            explain_lib.preflight(cfg, choice)
            _print_plan(explain_lib.plan(cfg, choice), as_json)
            return 0
        from pcim_cli.run.progress import WellProgress

        with WellProgress(fancy=fancy_terminal(), quiet=quiet) as progress:
            before.started()  # from here the run's handlers decide; after it, signals change nothing
            result = explain_lib.run(cfg, on_well=progress.on_well, choice=choice, on_start=progress.start)
    except typer.Exit:
        raise
    except KeyboardInterrupt:  # a signal before the run began: nothing was written
        message = "interrupted before the run began (SIGTERM / Ctrl-C); nothing was written: rerun the command"
        typer.echo(f"pcim: error: {message}", err=True)
        if as_json:
            typer.echo(error_doc(EXIT_TEMPFAIL, message, status="interrupted"))
        return EXIT_TEMPFAIL
    except Exception as exc:  # noqa: BLE001 - every error becomes one message and an exit code
        raise fail(exc, as_json) from None
    fits = result.fits
    for level, advice in fit_words.advice(fits, str(result.csv), cfg.explain.adaptive_budget):
        # once per run; a weak map is no failure: cron (-q) gets it only in --log-file
        logger.log(min(level, logging.INFO) if quiet else level, "%s", advice)
    counts = result.counts
    failed = counts["failed"] + len(result.problems)
    weak = fit_words.counts_phrase(fits)
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
    for f in [] if quiet or result.shortcuts is None else result.shortcuts.findings:
        typer.echo(f"shortcut: {f.sentence}", err=True)
    if as_json:
        status = {0: "ok", 3: "partial", 75: "interrupted"}.get(result.exit_code, "failed")
        doc = {"status": status, "exit_code": result.exit_code, "store": str(result.store),
               "csv": None if result.csv is None else str(result.csv), "counts": counts, "fits": fits,
               "fitted": result.fitted, "failed": result.failed + result.object_failures, "problems": result.problems,
               "object_csvs": {k: str(v) for k, v in result.object_csvs.items()},
               "object_failures": result.object_failures, "removed": [str(p) for p in result.removed],
               "message": line,
               "verdicts": [v.to_dict() for v in result.verdicts],
               "shortcuts": None if result.shortcuts is None else result.shortcuts.to_dict()}
        typer.echo(json.dumps(doc))
    return result.exit_code


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
    if counts.get("qc"):
        typer.echo(f"{counts['qc']} done fields would get their shortcut-QC shares measured again from their maps")
    if estimate is not None and fit:
        typer.echo(f"estimated fitting time on one worker: {estimate / 60:.1f} min (from the fields already done)")
    for f in fit:
        typer.echo(f"  {f.action:4s} {f.well} site {f.site}" + (f" ({f.reason})" if f.reason else ""))
    for r in p.rows:
        typer.echo(f"  unusable {r['well']} site {r['site']}: {r['error']}")
    for problem in p.problems:
        typer.echo(f"  problem: {problem}")
