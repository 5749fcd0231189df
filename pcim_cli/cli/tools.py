"""`pcim init`, `pcim schema`, `pcim evaluate` and `pcim train-explainer`."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import typer

from pcim_cli.cli.common import Quiet, Verbose, fail, fancy_terminal, json_option, set_option, setup_logging, split_list
from pcim_cli.errors import TemporaryFailure
from pcim_cli.run.signals import BeforeRun

__all__ = ["evaluate", "init", "schema", "train_explainer"]


def init(
    path: Annotated[Path, typer.Argument(help="Where to write the template.")] = Path("plate.yaml"),
    force: Annotated[bool, typer.Option("--force", help="Replace an existing file.")] = False,
) -> None:
    """Write a commented plate.yaml template to fill in."""
    from pcim_cli.config.template import write_template

    try:
        written = write_template(path, overwrite=force)
    except Exception as exc:  # noqa: BLE001
        raise fail(exc) from None
    typer.echo(f"wrote {written}; fill in the FILL IN lines, then run: pcim validate {written}", err=True)


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
    set_: set_option() = None,
    as_json: json_option("Print the comparison as JSON on stdout.") = False,
    quiet: Quiet = False,
    verbose: Verbose = 0,
) -> None:
    """Compare PCIM with the baselines on a plate with masks of the true evidence: tables and plots."""
    from pcim_cli.config import load_config

    setup_logging(verbose, quiet)
    well_arg: int | list[str] | None = None
    if wells is not None:
        well_arg = int(wells) if wells.strip().isdigit() else split_list(wells)
    try:
        cfg = load_config(plate_yaml, set_ or ())
        from pcim_cli.report import evaluate as evaluate_lib

        result = evaluate_lib.evaluate(cfg, masks, None if methods is None else split_list(methods), well_arg, out,
                                       sanity=not no_sanity)
    except Exception as exc:  # noqa: BLE001
        raise fail(exc, as_json) from None
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
    set_: set_option("Override a key of every plate.yaml, as for explain (e.g. compute.device=cuda).") = None,
    as_json: json_option("Print the explainer's record as JSON on stdout.") = False,
    quiet: Quiet = False,
    verbose: Verbose = 0,
) -> None:
    """Train an amortised PCIM explainer for the plates' classifier (explain.method: pcim-amortised).

    Held-out wells measure the validation objective; a killed or interrupted run resumes from its
    checkpoint when the same command is run again.
    """
    with BeforeRun():  # SIGTERM / Ctrl-C before training's own handlers (or after them, while saving): exit 75
        _train_explainer(plate_yamls, out, {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed},
                         {"crop": crop, "checkpoint_every": checkpoint_every,
                          "val_wells": None if val_wells is None else tuple(split_list(val_wells) or ())},
                         fresh, set_ or (), as_json, quiet, verbose)


def _train_explainer(plate_yamls: list[Path], out: Path, engine: dict, run: dict, fresh: bool,
                     overrides: Sequence[str], as_json: bool, quiet: bool, verbose: int) -> None:
    try:
        from pcim_cli.config import load_config
        from pcim_cli.run.progress import StepProgress

        setup_logging(verbose, quiet)
        cfgs = [load_config(p, overrides) for p in plate_yamls]  # a configuration error comes back before torch
        from pcim_cli.run import train as train_lib

        settings = train_lib.settings(engine, run)
        with StepProgress(fancy=fancy_terminal(), quiet=quiet) as progress:
            result = train_lib.train_explainer(cfgs, out, settings, progress=progress, fresh=fresh)
    except typer.Exit:
        raise
    except KeyboardInterrupt:  # before the training loop (or after it, while saving): rerun to continue
        message = (f"train-explainer interrupted (SIGTERM / Ctrl-C) before its next checkpoint; {out} is as it "
                   "was: rerun the same command (it resumes from the last checkpoint, if any)")
        raise fail(TemporaryFailure(message), as_json) from None
    except Exception as exc:  # noqa: BLE001
        raise fail(exc) from None
    if as_json:
        typer.echo(json.dumps({"out": str(result.out), "sidecar": str(result.sidecar), "sha256": result.sha256,
                               "up_to_date": result.up_to_date, "resumed_from": result.resumed_from,
                               **result.meta}, default=str))
    elif not quiet:
        typer.echo(train_lib.describe(result), err=True)


def schema() -> None:
    """Print the JSON Schema of plate.yaml (for editors and linters)."""
    from pcim_cli.config import RunConfig

    typer.echo(json.dumps(RunConfig.model_json_schema(), indent=2))
