"""`pcim validate`, `pcim status` and `pcim render`: what a plate and a store hold, checked and drawn."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer

from pcim_cli.cli.common import (
    Quiet,
    Verbose,
    fail,
    fancy_terminal,
    json_option,
    set_option,
    setup_logging,
    split_list,
)
from pcim_cli.errors import clip, unplaced

__all__ = ["render", "status", "validate"]


def validate(
    plate_yaml: Annotated[Path, typer.Argument(help="The plate's plate.yaml, or a screen file (every plate).")],
    set_: set_option() = None,
    pixels: Annotated[bool | None, typer.Option("--pixels/--headers-only", help="Read every field's pixels and "
                                                "score it once with the model (default: on plates whose files "
                                                "total at most 1 GB), or only read headers (TIFF, OME-Zarr "
                                                "metadata).")] = None,
    as_json: json_option("Print the findings as JSON on stdout.") = False,
    no_probe: Annotated[bool, typer.Option("--no-probe", help="Do not time a fit step for the ETA.")] = False,
) -> None:
    """Check plate.yaml, the layout, every field's images and the model; fit nothing, write nothing; and say
    what explain will do: tiles per field size, each well's target, the aggregation and the estimated cost.

    Exit 0: no problem; 3: some fields would fail (listed with the messages explain would write);
    65: no field would work; 78: configuration invalid.
    """
    setup_logging(0, quiet=True)
    logging.getLogger("pcim_cli").setLevel(logging.ERROR)  # problems are part of the report below
    try:
        from pcim_cli.cli import screen as screen_cli
        from pcim_cli.config import load_config

        if screen_cli.is_screen([str(plate_yaml)]):  # a screen file: every plate, as explain would run it
            raise typer.Exit(screen_cli.validate_screen([str(plate_yaml)], set_ or (), pixels, not no_probe,
                                                        as_json, _print_validation))
        cfg = load_config(plate_yaml, set_ or ())  # a configuration error comes back before torch is loaded
        from pcim_cli.run import validate as validate_lib

        found = validate_lib.validate_plate(cfg, pixels, probe=not no_probe)
    except typer.Exit:
        raise
    except Exception as exc:  # noqa: BLE001
        raise fail(exc, as_json) from None
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
    as_json: json_option("Print the written paths as JSON on stdout.") = False,
    quiet: Quiet = False,
    verbose: Verbose = 0,
) -> None:
    """Draw the maps: PNG overlays per field, a plate montage and report.html (opens without a server)."""
    from pcim_cli.report import render as render_lib

    setup_logging(verbose, quiet)
    chosen = split_list(wells) or None
    try:
        result = render_lib.render(store, out_dir=out, wells=chosen, plate_yaml=plate_yaml, channel=channel,
                                   per_channel=per_channel, csv=csv)
    except Exception as exc:  # noqa: BLE001
        raise fail(exc, as_json) from None
    if as_json:
        typer.echo(json.dumps(result.to_dict()))
    else:
        if not quiet:
            typer.echo(f"{len(result.overlays)} overlays in {result.out_dir / 'wells'}; montage {result.montage}",
                       err=True)
        typer.echo(str(result.report))


def status(
    store_paths: Annotated[list[str], typer.Argument(metavar="OUT.zarr...", help="A store written by pcim "
                                                     "explain; or several stores, plate.yaml files or a screen "
                                                     "file: one row per plate.")],
    as_json: json_option("Print the status as JSON on stdout.") = False,
    set_: set_option("Override a key of the plate configs, as for explain (where their stores are).") = None,
) -> None:
    """Done / failed / missing fields per well of a store (per plate of a screen); exit 0 when every field
    is done, else 3."""
    from pcim_cli.report.status import store_status

    try:
        from pcim_cli.cli import screen as screen_cli

        if not screen_cli.is_single_store(store_paths):
            raise typer.Exit(screen_cli.status_screen(store_paths, set_ or (), as_json, fancy_terminal()))
        report = store_status(Path(store_paths[0]))
    except typer.Exit:
        raise
    except Exception as exc:  # noqa: BLE001
        raise fail(exc, as_json) from None
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
    fits = report.fits
    if any(fits.values()):  # PCIM_Fit of the done maps (docs/verdicts.md)
        typer.echo("maps by PCIM_Fit: " + ", ".join(f"{n} {k}" for k, n in fits.items() if n))
    for v in report.last_run.get("verdicts") or []:  # the last run's stain verdicts (explain.fidelity)
        if isinstance(v, dict) and v.get("sentence"):
            typer.echo(f"verdict: {v['sentence']}")
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
