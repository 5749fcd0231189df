"""What `pcim explain` will do, said before it does it (`pcim validate`'s plan section).

For a checked plate (run/inventory.py `inspect_plate`): the tile plan per field size (tile, overlap, grid), how a
tiled field's prediction is made (model.aggregate) and whether the model also takes the untiled field,
the target each well resolves to (explain.target, a layout column), and the estimated cost: model passes
(a fit step is a forward and backward pass of 2 images per map input: kept and deleted) and an ETA from
one timed fit step on this machine. Nothing is fitted or written.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from dataclasses import dataclass, field

import torch

from pcim_cli.config import RunConfig
from pcim_cli.engine import tiling
from pcim_cli.engine.attribute import attribute
from pcim_cli.engine.field import TiledForward
from pcim_cli.io import images
from pcim_cli.run.inventory import PlateInventory, engine_options, targets_per_well

logger = logging.getLogger(__name__)

FIDELITY_PASSES = 42  # forward passes per map for the deletion (21 points) and insertion (21 points) curves


@dataclass
class Plan:
    """The plan section: JSON-ready with `as_dict`."""

    sizes: list[dict] = field(default_factory=list)  # per field size: fields, tile plan, whole-field check
    targets: dict[str, str] = field(default_factory=dict)  # well -> target(s) or why none
    aggregate: str = "mean-logit"
    tile_maps: str = "field"
    maps: int = 0  # (field, target) maps to make
    model_passes: int = 0  # forward (+ backward) passes of one image through the model
    seconds_per_pass: float | None = None  # timed on this machine, one fit step
    device: str = "cpu"

    @property
    def eta_s(self) -> float | None:
        return None if self.seconds_per_pass is None else self.model_passes * self.seconds_per_pass

    def as_dict(self) -> dict:
        return {"sizes": self.sizes, "targets": self.targets, "aggregate": self.aggregate,
                "tile_maps": self.tile_maps, "maps": self.maps, "model_passes": self.model_passes,
                "seconds_per_pass": self.seconds_per_pass, "eta_s": self.eta_s, "device": self.device}


def plan_run(cfg: RunConfig, inv: PlateInventory, probe: bool = True,
             exclude: set[tuple[str, int]] = frozenset()) -> Plan:
    """The plan of `pcim explain` for this plate (every field, as a first run would do them), without the
    fields in `exclude` ((well, site): found unusable, they would fail)."""
    plan = Plan(aggregate=cfg.model.aggregate, tile_maps=cfg.explain.tile_maps, device=inv.model.device)
    wells = sorted(inv.fields)
    per_well = targets_per_well(cfg, inv.classes, inv.layout, wells)
    n_targets = {}
    for well, t in per_well.items():
        if isinstance(t, str):
            plan.targets[well] = f"none: {t}"
            n_targets[well] = 0
        else:
            plan.targets[well] = "predicted class" if t is None else ", ".join(t)
            n_targets[well] = 1 if t is None else len(t)
    sizes = Counter()
    maps_by_size = Counter()
    for well, srcs in inv.fields.items():
        for src in srcs:
            if (well, src.field) in exclude:
                continue
            size = images.field_size(src)
            if size is not None:
                sizes[size] += 1
                maps_by_size[size] += n_targets[well]
    opts = engine_options(cfg)
    steps = opts.steps if cfg.explain.method == "pcim" else 1
    for size, count in sorted(sizes.items(), key=lambda kv: -kv[1]):
        entry = {"field": list(size), "fields": count}
        try:
            grid = tiling.plan_tiles(size, cfg.model.input_size)
        except tiling.TileSizeError as exc:
            entry["problem"] = f"{exc}: these fields will fail (set model.input_size to at most the field size)"
            plan.sizes.append(entry)
            continue
        entry.update(grid.record())
        if grid.n_tiles > 1:
            entry["whole_field_accepted"] = _accepts(inv.model.module, size, len(cfg.plate.channels),
                                                     inv.model.device)
        plan.sizes.append(entry)
        inputs = grid.n_tiles  # model inputs per map per step (tiles of one field)
        maps = maps_by_size[size]
        plan.maps += maps
        per_map = 2 * inputs * steps + (FIDELITY_PASSES * inputs if cfg.explain.fidelity else 0)
        plan.model_passes += maps * per_map + count * inputs  # + the prediction of every field's tiles
    if probe and plan.sizes and "problem" not in plan.sizes[0]:
        plan.seconds_per_pass = _time_step(cfg, inv, tuple(plan.sizes[0]["field"]))
    return plan


def _accepts(module, size: tuple[int, int], channels: int, device: str) -> bool:
    """Does the model run on one untiled field of this size (model.aggregate: whole-field)?"""
    try:
        with torch.no_grad():
            out = module(torch.zeros(1, channels, *size, device=device))
    except Exception:  # noqa: BLE001 - any failure means: it does not take this size
        return False
    return isinstance(out, torch.Tensor) and out.ndim == 2 and out.shape[0] == 1


def _time_step(cfg: RunConfig, inv: PlateInventory, size: tuple[int, int]) -> float | None:
    """Seconds per image pass (forward + backward) of a fit step, on a batch as explain makes it: the
    difference between a 3-step and a 1-step fit (after a warm-up), so set-up costs do not count."""
    grid = tiling.plan_tiles(size, cfg.model.input_size)
    whole = grid.n_tiles > 1 and (cfg.explain.tile_maps == "field" or cfg.model.aggregate == "whole-field")
    per_unit = grid.n_tiles if whole else 1
    units = max(1, cfg.compute.batch_size // per_unit)
    shape = size if whole or grid.n_tiles == 1 else grid.tile
    x = torch.rand(units, len(cfg.plate.channels), *shape, device=inv.model.device)
    forward = TiledForward(inv.model.module, grid, cfg.model.aggregate) if whole else inv.model.module
    opts = engine_options(cfg)
    target = torch.zeros(units, dtype=torch.long, device=inv.model.device)
    times = []
    try:
        for steps in (1, 1, 3):  # warm-up, then 1 and 3 steps
            t0 = time.perf_counter()
            attribute(forward, x, target, "pcim", dataclasses.replace(opts, steps=steps))
            times.append(time.perf_counter() - t0)
    except Exception as exc:  # noqa: BLE001 - an estimate is optional; explain reports real failures
        logger.info("could not time a fit step: %s", exc)
        return None
    per_step = max(times[2] - times[1], 1e-9) / 2
    return per_step / (2 * units * per_unit)  # a step passes kept and deleted images
