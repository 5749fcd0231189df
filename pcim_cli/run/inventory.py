"""What a plate contains, checked without fitting or writing anything: the plate inventory.

`inspect_plate` loads and probes the model (once per process: run/device.py), reads the layout, finds
every field's images (and with `check_objects` the label images of plate.objects) and, for
pcim-amortised, loads the explainer and checks it against the plate. `targets_per_well` resolves
explain.target for each well, `engine_options` turns the `explain:` section into the engine's options,
and `fingerprint` is the digest of every setting that changes a map. `pcim explain` plans with them;
validate, preview, train-explainer and evaluate read the same inventory.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field

import pandas as pd

from pcim_cli import __version__
from pcim_cli.config import RunConfig
from pcim_cli.config.explain import ENGINE_KEYS as EXPLAIN_ENGINE_KEYS
from pcim_cli.engine.attribute import method_settings
from pcim_cli.engine.options import PcimOptions
from pcim_cli.errors import ConfigError, InputDataError
from pcim_cli.io import images, labels
from pcim_cli.io.explainer import LoadedExplainer, check_explainer
from pcim_cli.io.layout import read_layout
from pcim_cli.io.model import LoadedModel, check_classes, resolve_device
from pcim_cli.run import device as run_device
from pcim_cli.run import model_package, objects

__all__ = ["PlateInventory", "engine_options", "fingerprint", "inspect_plate", "load_checked_explainer",
           "targets_per_well"]

logger = logging.getLogger(__name__)


def engine_options(cfg: RunConfig) -> PcimOptions:
    """The PcimOptions the `explain` section asks for (intensity_channel: a channel's index, None = auto)."""
    values = {k: getattr(cfg.explain, k) for k in EXPLAIN_ENGINE_KEYS}
    channel = cfg.explain.intensity_channel
    values["intensity_channel"] = None if channel == "auto" else list(cfg.plate.channels).index(channel)
    return PcimOptions(**values)


def fingerprint(cfg: RunConfig, model_sha256: str, classes: list[str] | None = None,
                explainer_sha256: str | None = None) -> str:
    """sha256 of every setting that changes a map or its CSV rows: model, channels and their file
    tokens, class names, normalisation, target, engine (and for pcim-amortised the explainer's sha256)."""
    settings = {
        "model": model_sha256,
        "channels": list(cfg.plate.channels.items()),
        "classes": list(classes if classes is not None else cfg.model.classes or []),
        "normalize": cfg.model.normalize.model_dump(),
        "input_size": cfg.model.input_size,
        **_field_settings(cfg),
        "precision": cfg.compute.precision,
        "target": cfg.explain.target,
        "method": cfg.explain.method,
        "engine": method_settings(cfg.explain.method, engine_options(cfg)),
        "pcim": __version__.rsplit(".", 1)[0],
    }
    if cfg.explain.method == "pcim-amortised":
        settings["explainer"] = explainer_sha256
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def _field_settings(cfg: RunConfig) -> dict:
    """Settings of tiled fields that change maps; only where they apply (so fingerprints of untiled plates
    made before they existed do not change). explain.adaptive_budget is an engine setting (engine_options)."""
    out = {}
    if cfg.model.input_size is not None or cfg.model.aggregate == "whole-field":  # only tiled fields use them
        out["aggregate"] = cfg.model.aggregate
        out["tile_maps"] = cfg.explain.tile_maps
    if cfg.plate.timepoint is not None:  # the time point read from a T axis
        out["timepoint"] = cfg.plate.timepoint
    return out


def targets_per_well(cfg: RunConfig, classes: list[str], layout: pd.DataFrame | None,
                      wells: list[str]) -> dict[str, tuple[str, ...] | None | str]:
    """Each well's targets: None (predicted; contrastive adds the runner-up's map where the predicted class
    rests on what is missing, decided per field by the worker), class names, or an error message (str)."""
    target = cfg.explain.target
    if target in ("predicted", "contrastive"):
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
    objects: dict[str, int] = field(default_factory=dict)  # plate.objects kind -> fields with a usable label file
    object_problems: list[str] = field(default_factory=list)  # fail those object tables only (validate)
    explainer: LoadedExplainer | None = None  # pcim-amortised: loaded and checked against the model
    package: dict | None = None  # model.path a bioimage.io package: what was taken from it (run/model_package.py)

    @property
    def summary(self) -> dict:
        return {
            "wells": len(self.fields),
            "fields": sum(len(v) for v in self.fields.values()),
            "model": {"path": str(self.model.path), "kind": self.model.kind, "sha256": self.model.sha256,
                      "classes": self.classes, **({"package": self.package} if self.package else {})},
            "layout_columns": [] if self.layout is None else [c for c in self.layout.columns if c != "well"],
            "objects": self.objects,
            "problems": self.problems + self.object_problems,
            **({"explainer": {"path": str(self.explainer.path), "sha256": self.explainer.sha256,
                              "trained": self.explainer.meta.get("finished")}} if self.explainer else {}),
        }


def inspect_plate(cfg: RunConfig, check_objects: bool = False, explainer: bool | None = None) -> PlateInventory:
    """Model probe, class names, layout and image discovery. Raises when no field at all is usable.

    With `check_objects` (pcim validate), every field's label images (plate.objects) are looked up and
    their headers checked against the field size; their problems fail object tables only, not fields.
    explainer: load explain.explainer and refuse one trained for another classifier, channels,
    normalisation or objective (ConfigError); None = when explain.method is pcim-amortised.
    """
    device = resolve_device(cfg.compute.device)
    model_package.apply(cfg)  # model.path a bioimage.io package: its weights and settings applied to cfg
    model = run_device.model(cfg.model.path, len(cfg.plate.channels), cfg.model.input_size, device,
                             probe_size=model_package.probe_size(cfg))
    model_package.check_own_test(cfg, model.module)
    classes = check_classes(model, cfg.model.classes)
    loaded = None
    if explainer or (explainer is None and cfg.explain.method == "pcim-amortised"):
        loaded = load_checked_explainer(cfg, model, classes)
    layout = read_layout(cfg.plate.layout) if cfg.plate.layout is not None else None
    found, problems = images.discover_fields(cfg.plate.images, cfg.plate.pattern, cfg.plate.channels,
                                             cfg.plate.wells, timepoint=cfg.plate.timepoint)
    for p in problems:
        logger.warning("%s", p)
    if not found:
        raise InputDataError(
            f"no complete field found under {cfg.plate.images}: "
            + ("; ".join(problems[:5]) or f"check plate.images and plate.pattern ({cfg.plate.pattern!r})")
        )
    model_package.fit_fields(cfg, images.typical_size(src for srcs in found.values() for src in srcs))
    applied = model_package.package_of(cfg)
    inv = PlateInventory(model, classes, layout, found, problems, explainer=loaded,
                         package=None if applied is None else applied.record())
    if check_objects and cfg.plate.objects:
        kinds = objects.label_kinds(cfg.plate.objects)
        size = images.typical_size(src for sources in found.values() for src in sources)
        inv.object_problems = labels.problems_for(kinds.values(), found, size)
        inv.objects = {name: sum(kind.problem(w, src.field) is None for w, srcs in found.items() for src in srcs)
                       for name, kind in kinds.items()}
    return inv


def load_checked_explainer(cfg: RunConfig, model: LoadedModel, classes: list[str]) -> LoadedExplainer:
    """explain.explainer, loaded on the model's device and checked against this plate's setup."""
    hint = str(cfg.config_path or "plate.yaml")
    if cfg.explain.explainer is None:
        raise ConfigError("explain.explainer: not set; name the file that `pcim train-explainer "
                          f"{hint} --out explainer.pt` wrote (e.g. --set explain.explainer=explainer.pt)")
    loaded = run_device.explainer(cfg.explain.explainer, model.device, hint=hint)
    check_explainer(loaded, model_sha256=model.sha256, model_path=model.path, channels=list(cfg.plate.channels),
                    normalize=cfg.model.normalize.model_dump(), classes=classes, opts=engine_options(cfg), hint=hint)
    return loaded
