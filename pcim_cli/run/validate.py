"""`pcim validate`: every problem `pcim explain` would hit, found without fitting or writing anything.

Config, layout, model (loaded and probed), image discovery, then each field: its TIFF headers (channel
count, pixel type, size against its siblings and against model.input_size) and, on small plates or with
`--pixels`, its pixels (truncated files, NaN pixels) and one forward pass of the model on them (NaN or
infinite logits, a model that raises on the field). The messages are the ones `pcim explain` writes into
the CSV, from the same functions. Output paths are checked as explain checks them (io/outputs.py). Label
images of plate.objects are checked too, as explain reads them (their problems fail object tables
only). Returns a `Validation` (data the CLI prints), with the plan of the run (run/preview.py: tiles,
targets, cost) for the fields found usable.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from pcim_cli.config import RunConfig
from pcim_cli.engine import tiling
from pcim_cli.errors import EXIT_DATA, EXIT_OK, EXIT_PARTIAL, InputDataError
from pcim_cli.io import images, labels, outputs, signature
from pcim_cli.run import failures, inventory, objects, preview
from pcim_cli.run.device import MODEL_ERRORS

logger = logging.getLogger(__name__)

#: by default, pixels are read when the plate's files add up to at most this many bytes
PIXELS_AUTO_BYTES = 1 << 30


@dataclass
class FieldProblem:
    well: str
    site: int | None
    error: str


@dataclass
class Validation:
    """What `pcim validate` found."""

    plate: str
    channels: list[str]
    wells: int
    fields: int
    model: dict[str, Any]
    layout_columns: list[str]
    checked: str  # "pixels" (every field read and scored once) or "headers"
    usable: int = 0  # fields found complete and without a problem
    field_problems: list[FieldProblem] = field(default_factory=list)  # incomplete fields too
    run_problems: list[str] = field(default_factory=list)  # concern no single field
    objects: dict[str, int] = field(default_factory=dict)  # plate.objects kind -> fields with a usable label file
    object_problems: list[str] = field(default_factory=list)  # fail those object tables only
    plan: preview.Plan | None = None  # what explain will do (tiles, targets, cost)
    explainer: dict[str, Any] | None = None  # pcim-amortised: the explainer checked against the plate

    @property
    def problems(self) -> list[str]:
        return [*self.run_problems, *(p.error for p in self.field_problems), *self.object_problems]

    @property
    def exit_code(self) -> int:
        """As `pcim explain` would end: 0 no problem, 3 some fields would fail, 65 none would work."""
        if not self.problems:
            return EXIT_OK
        return EXIT_PARTIAL if self.usable > 0 else EXIT_DATA

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(problems=self.problems, exit_code=self.exit_code,
                   plan=None if self.plan is None else self.plan.as_dict())
        return out


def validate_plate(cfg: RunConfig, pixels: bool | None = None, probe: bool = True) -> Validation:
    """Check everything `pcim explain` needs. `pixels`: read every field's pixels (None: when the plate's
    files total at most PIXELS_AUTO_BYTES); `probe`: time a fit step for the plan's ETA. Raises like
    explain for a run-level failure (no field found, a model that does not load)."""
    outputs.check_plate(cfg)  # as explain: an output path that would destroy a file or collide ends it
    inv = inventory.inspect_plate(cfg)
    sources = [src for well in sorted(inv.fields) for src in inv.fields[well]]
    if pixels is None:
        size = sum(f["size"] or 0 for src in sources for f in signature.stat_signature(src.files))
        pixels = size <= PIXELS_AUTO_BYTES
        if not pixels:
            logger.info("the plate's files hold %.1f GB: headers checked, not pixels (--pixels reads them)",
                        size / 1e9)
    expected = images.typical_size(sources)
    _check_objects(cfg, inv, expected, pixels)
    summary = inv.summary
    out = Validation(plate=cfg.plate.name, channels=list(cfg.plate.channels), wells=summary["wells"],
                     fields=summary["fields"], model=summary["model"], layout_columns=summary["layout_columns"],
                     checked="pixels" if pixels else "headers", objects=inv.objects,
                     object_problems=list(inv.object_problems), explainer=summary.get("explainer"))
    for p in inv.problems:
        if p.well is None:
            out.run_problems.append(str(p))
        else:
            out.field_problems.append(FieldProblem(p.well, p.field, str(p)))
    targets = inventory.targets_per_well(cfg, inv.classes, inv.layout, sorted(inv.fields))
    for src in sources:
        problem = _field_problem(cfg, inv.model, src, expected, pixels)
        if problem is None and isinstance(targets.get(src.well), str):
            problem = targets[src.well]
        if problem is None:
            out.usable += 1
        else:
            out.field_problems.append(FieldProblem(src.well, src.field, problem))
    out.plan = preview.plan_run(cfg, inv, probe=probe,
                                exclude={(p.well, p.site) for p in out.field_problems if p.site is not None})
    return out


def _check_objects(cfg: RunConfig, inv: inventory.PlateInventory, size: tuple[int, int] | None, pixels: bool) -> None:
    """plate.objects: every field's label image of each kind, checked as explain reads it (its pixels when
    `pixels`, else its TIFF header); the kinds' usable counts and problems go into the inventory."""
    if not cfg.plate.objects:
        return
    kinds = objects.label_kinds(cfg.plate.objects)
    inv.object_problems = labels.problems_for(kinds.values(), inv.fields, size, pixels=pixels)
    inv.objects = {name: sum(kind.problem(w, src.field) is None for w, srcs in inv.fields.items() for src in srcs)
                   for name, kind in kinds.items()}  # fields with a label file found


def _field_problem(cfg: RunConfig, model, src: images.FieldSource, expected: tuple[int, int] | None,
                   pixels: bool) -> str | None:
    """The message explain would fail this field with, or None."""
    try:
        img = images.read_field(src, len(cfg.plate.channels), pixels=pixels)
    except InputDataError as exc:
        return str(exc)
    shape = tuple(img.shape[-2:])
    if expected is not None and shape != tuple(expected):
        return images.size_problem(src.well, src.field, shape, expected, src.where)
    try:
        grid = tiling.plan_tiles(shape, cfg.model.input_size)
    except tiling.TileSizeError as exc:
        return failures.tile_size_problem(src.well, src.field, exc, cfg.model.input_size)
    if not pixels:
        return None
    norm = cfg.model.normalize.model_dump()
    x = torch.from_numpy(images.normalize(img, norm.pop("method"), **norm))
    batch = cfg.compute.batch_size
    try:
        with torch.no_grad():
            for start in range(0, grid.n_tiles, batch):
                part = range(start, min(start + batch, grid.n_tiles))
                logits = model.module(tiling.cut(x, grid, part).to(model.device))
                if not torch.isfinite(logits).all():
                    return failures.non_finite_problem(src.well, src.field, str(model.path), x, "logits")
    except MODEL_ERRORS as exc:
        return failures.model_error_problem(src.well, exc)
    return None
