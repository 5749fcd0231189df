"""`pcim explain`: the driver. Plan the wells, create the store, run the wells, write the CSV.

The driver is the only writer of plate-level metadata and of the CSV; each well is explained by
`worker.explain_well`, here in-process (`compute.cluster: none`). Returns data (a RunResult); the
CLI decides what to print and which exit code that means.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from pcim_cli import __version__, images, plate, scheduler, store, summary
from pcim_cli.config import RunConfig
from pcim_cli.engine.pcim import PcimOptions
from pcim_cli.errors import EXIT_DATA, EXIT_OK, EXIT_PARTIAL, ConfigError, InputDataError
from pcim_cli.model import LoadedModel, check_classes, load_model, resolve_device
from pcim_cli.worker import FieldFiles, WellTask, failed_row

logger = logging.getLogger(__name__)

#: engine settings that live in the `explain` section under the same names
ENGINE_KEYS = tuple(f.name for f in dataclasses.fields(PcimOptions))


@dataclass
class RunResult:
    """What a run did: where it wrote, what it counted, and the exit code that means."""

    store: Path
    csv: Path
    summary: pd.DataFrame
    problems: list[str] = field(default_factory=list)  # fields left out at discovery (missing files)

    @property
    def counts(self) -> dict[str, int]:
        status = self.summary["PCIM_Status"] if len(self.summary) else pd.Series(dtype=str)
        return {s: int((status == s).sum()) for s in summary.STATUSES}

    @property
    def failed(self) -> list[dict[str, str]]:
        bad = self.summary[self.summary["PCIM_Status"] == "failed"]
        return [{"well": r.Metadata_Well, "site": int(r.Metadata_Site), "error": r.PCIM_Error}
                for r in bad.itertuples()]

    @property
    def exit_code(self) -> int:
        counts = self.counts
        if counts["failed"] == 0 and not self.problems:
            return EXIT_OK
        return EXIT_PARTIAL if counts["done"] + counts["skipped"] else EXIT_DATA


def engine_options(cfg: RunConfig) -> PcimOptions:
    """The PcimOptions the `explain` section asks for."""
    values = cfg.explain.model_dump()
    return PcimOptions(**{k: values[k] for k in ENGINE_KEYS if k in values})


def fingerprint(cfg: RunConfig, model_sha256: str) -> str:
    """sha256 of every setting that changes a map: model, channels, normalisation, target, engine."""
    settings = {
        "model": model_sha256,
        "channels": list(cfg.plate.channels),
        "normalize": cfg.model.normalize.model_dump(),
        "input_size": cfg.model.input_size,
        "target": cfg.explain.target,
        "method": cfg.explain.method,
        "engine": dataclasses.asdict(engine_options(cfg)),
        "pcim": __version__.rsplit(".", 1)[0],
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def _targets_per_well(cfg: RunConfig, classes: list[str], layout: pd.DataFrame | None,
                      wells: list[str]) -> dict[str, tuple[str, ...] | None | str]:
    """Each well's targets: None (predicted), class names, or an error message (str)."""
    target = cfg.explain.target
    if target == "predicted":
        return dict.fromkeys(wells)
    if target == "all":
        return dict.fromkeys(wells, tuple(classes))
    if not target.startswith("layout:"):
        return dict.fromkeys(wells, (target,))
    column = target.split(":", 1)[1]
    if layout is None or column not in layout.columns:
        have = ", ".join(map(str, layout.columns)) if layout is not None else "none"
        raise ConfigError(f"explain.target: {target!r} names layout column {column!r}, but "
                          f"{cfg.plate.layout} has columns {have}")
    by_well = dict(zip(layout["well"], layout[column].astype(str), strict=True))
    out: dict[str, tuple[str, ...] | None | str] = {}
    for well in wells:
        value = by_well.get(well)
        if value is None or value in ("", "nan"):
            out[well] = f"{well}: no value in layout column {column!r} ({cfg.plate.layout}) to explain"
        elif value not in classes:
            out[well] = (f"{well}: layout column {column!r} says {value!r}, which is not a class "
                         f"({', '.join(classes)}); fix {cfg.plate.layout} or model.classes")
        else:
            out[well] = (value,)
    return out


@dataclass
class PlateInventory:
    """What a plate.yaml points at, checked without fitting or writing anything."""

    model: LoadedModel
    classes: list[str]
    layout: pd.DataFrame | None
    fields: dict[str, list[images.FieldSource]]
    problems: list[str]

    @property
    def summary(self) -> dict:
        return {
            "wells": len(self.fields),
            "fields": sum(len(v) for v in self.fields.values()),
            "model": {"path": str(self.model.path), "kind": self.model.kind, "sha256": self.model.sha256,
                      "classes": self.classes},
            "layout_columns": [] if self.layout is None else [c for c in self.layout.columns if c != "well"],
            "problems": self.problems,
        }


def inspect_plate(cfg: RunConfig) -> PlateInventory:
    """Model probe, class names, layout and image discovery. Raises when no field at all is usable."""
    if cfg.explain.method != "pcim":
        raise ConfigError(f"explain.method: {cfg.explain.method!r} is not available in pcim {__version__} yet "
                          "(the baselines arrive with `pcim evaluate`); use method: pcim")
    device = resolve_device(cfg.compute.device)
    model = load_model(cfg.model.path, len(cfg.plate.channels), cfg.model.input_size, device=device)
    classes = check_classes(model, cfg.model.classes)
    layout = plate.read_layout(cfg.plate.layout) if cfg.plate.layout is not None else None
    found, problems = images.discover_fields(cfg.plate.images, cfg.plate.pattern, cfg.plate.channels,
                                             cfg.plate.wells)
    for p in problems:
        logger.warning("%s", p)
    if not found:
        raise InputDataError(
            f"no complete field found under {cfg.plate.images}: "
            + ("; ".join(problems[:5]) or f"check plate.images and plate.pattern ({cfg.plate.pattern!r})")
        )
    return PlateInventory(model, classes, layout, found, problems)


def plan(cfg: RunConfig) -> tuple[list[WellTask], list[dict], list[str], pd.DataFrame | None, LoadedModel]:
    """Everything before the fits: the plate inventory, each well's task, the store skeleton.

    Returns (tasks, rows of wells that already failed at planning, problems, layout, model).
    """
    inv = inspect_plate(cfg)
    model, classes, layout, found, problems = inv.model, inv.classes, inv.layout, inv.fields, inv.problems
    device = model.device
    wells = sorted(found, key=plate.parse_well)
    targets = _targets_per_well(cfg, classes, layout, wells)
    opts = engine_options(cfg)
    print_fp = fingerprint(cfg, model.sha256)
    store_path = Path(cfg.output.zarr)
    store.create_plate(store_path, cfg.plate.name, {w: len(found[w]) for w in wells},
                       format=cfg.output.format)

    tasks, failed_rows = [], []
    for well in wells:
        fields = tuple(FieldFiles(site=src.field, index=i, files=tuple(str(f) for f in src.files))
                       for i, src in enumerate(found[well]))
        well_targets = targets[well]
        if isinstance(well_targets, str):
            failed_rows += [failed_row(cfg.plate.name, well, f.site, f.index, well_targets) for f in fields]
            continue
        tasks.append(WellTask(
            plate=cfg.plate.name, well=well, fields=fields, channels=tuple(cfg.plate.channels),
            classes=tuple(classes), targets=well_targets, normalize=cfg.model.normalize.model_dump(),
            model_path=str(model.path), model_sha256=model.sha256, input_size=cfg.model.input_size,
            method=cfg.explain.method, engine=dataclasses.asdict(opts), batch_size=cfg.compute.batch_size,
            device=device,
            fidelity=cfg.explain.fidelity, store_path=str(store_path), store_format=cfg.output.format,
            fingerprint=print_fp,
        ))
    return tasks, failed_rows, problems, layout, model


def run(cfg: RunConfig, on_well: Callable[[str, list[dict]], None] | None = None) -> RunResult:
    """Explain every planned well, then write the CSV. `on_well` is told about each finished well."""
    tasks, rows, problems, layout, _ = plan(cfg)
    logger.info("%d wells to explain (%d fields) -> %s", len(tasks), sum(len(t.fields) for t in tasks),
                cfg.output.zarr)
    rows += scheduler.run_wells(tasks, cfg.compute, on_well).rows
    table = summary.build_summary(rows, layout)
    summary.write_csv_atomic(table, Path(cfg.output.csv))
    return RunResult(store=Path(cfg.output.zarr), csv=Path(cfg.output.csv), summary=table, problems=problems)
