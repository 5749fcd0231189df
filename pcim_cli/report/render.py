"""Pictures of an attribution store: per-field PNG overlays, a plate montage and an HTML report.

``render(store)`` reads the OME-Zarr HCS store that ``pcim explain`` wrote (docs/reference/store.md) one
field at a time and writes, under the output folder:

- ``wells/<well>_s<site>.png``: the maps of one field, one panel per target (or per channel), each over a
  raw image channel when the plate.yaml is given (the raw TIFFs are not in the store), with a colour bar;
- ``montage.png``: one thumbnail per well at its plate position (rows A.., columns 1..), empty wells grey;
- ``shortcuts.png``: the shortcut QC (report/shortcuts.py, docs/shortcuts.md): per target, plate heat-maps
  of the share of each well's maps off the objects, at the border (saturated pixels, tile seams), the
  verdict and the flagged fields; when the store's records have shares (qc.enabled);
- ``report.html``: the montage, a table of the CSV summary's numbers per field with its thumbnail, and
  the run's settings from the completion records. Images are linked by relative paths, so the folder
  opens in a browser without a server and can be moved or zipped as a whole.

Only coarse pyramid levels are read for the montage (io/store_view.py), and overlays use the finest level
that fits ``max_size``, so a whole plate is never held in memory at full resolution. The pictures are
drawn by report/drawing.py, the page by report/html.py.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pcim_cli.errors import ConfigError, InputDataError, OutputError, PcimError
from pcim_cli.io import outputs
from pcim_cli.io.plate import WellIdError, parse_well
from pcim_cli.io.store import RECORD_KEY
from pcim_cli.io.store_view import FieldLevel, StorePlate, field_paths, open_plate, read_level
from pcim_cli.report import composite
from pcim_cli.report import objects as report_objects
from pcim_cli.report import shortcuts as report_shortcuts
from pcim_cli.report.drawing import CELL, Panel, draw_montage, draw_panels, thumbnail
from pcim_cli.report.html import find_csv, read_csv, records_table, write_report

__all__ = ["DEFAULT_MAX_SIZE", "RenderResult", "field_panels", "field_paths", "find_csv", "montage_thumbs",
           "open_plate", "read_level", "records_table", "render"]

logger = logging.getLogger(__name__)

DEFAULT_MAX_SIZE = 1024  # overlays: the finest pyramid level whose longest side fits


@dataclass
class RenderResult:
    """What ``render`` wrote."""

    out_dir: Path
    overlays: list[Path]
    montage: Path
    report: Path
    csv: Path | None
    skipped: list[str] = field(default_factory=list)
    shortcuts: report_shortcuts.ShortcutPicture | None = None  # shortcuts.png and the verdict (qc on)

    def to_dict(self) -> dict[str, Any]:
        return {
            "out_dir": str(self.out_dir),
            "overlays": [str(p) for p in self.overlays],
            "montage": str(self.montage),
            "report": str(self.report),
            "csv": None if self.csv is None else str(self.csv),
            "skipped": list(self.skipped),
            "shortcuts": None if self.shortcuts is None else str(self.shortcuts.path),
            "shortcut_findings": [] if self.shortcuts is None else [f.to_dict() for f in
                                                                   self.shortcuts.report.findings],
        }


# --------------------------------------------------------------------------------------------------
# raw images (only with a plate.yaml: the store does not hold them)


@dataclass
class RawImages:
    """Where a plate's raw fields are: config channels and ``{well: {site: FieldSource}}``."""

    channels: list[str]
    normalize: dict[str, Any]
    sources: dict[str, dict[int, Any]]


def find_raw(cfg: Any, wells: Sequence[str]) -> RawImages:
    """Discover the raw TIFFs of ``wells`` through a loaded plate.yaml (a RunConfig)."""
    from pcim_cli.io import images

    found, problems = images.discover_fields(cfg.plate.images, cfg.plate.pattern, cfg.plate.channels, wells,
                                             timepoint=cfg.plate.timepoint)
    for problem in problems:
        logger.warning("raw images: %s", problem)
    sources = {well: {src.field: src for src in srcs} for well, srcs in found.items()}
    return RawImages(list(cfg.plate.channels), cfg.model.normalize.model_dump(), sources)


def raw_field(raw: RawImages, fld: FieldLevel) -> np.ndarray | None:
    """The field's raw image, normalised as in the run, pooled to the maps' level: (C, y, x) in [0, 1]."""
    from pcim_cli.io import images

    src = raw.sources.get(fld.well, {}).get(fld.site)
    if src is None:
        logger.warning("%s site %d: no raw image found; drawing the map alone", fld.well, fld.site)
        return None
    settings = (fld.record or {}).get("settings", {})
    norm = dict(settings.get("normalize") or raw.normalize)
    method = norm.pop("method", "percentile")
    try:
        img = images.normalize(images.read_field(src, len(raw.channels)), method, **norm)
    except (PcimError, ValueError) as exc:
        logger.warning("%s site %d: cannot use the raw image (%s); drawing the map alone", fld.well, fld.site, exc)
        return None
    if img.shape[1:] != fld.full_shape:
        logger.warning("%s site %d: raw image is %s, maps are %s; drawing the map alone",
                       fld.well, fld.site, img.shape[1:], fld.full_shape)
        return None
    return _pool_to(img, fld.maps.shape[1:])


def _pool_to(img: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Block-mean ``(C, H, W)`` down to ``(C, *shape)`` as the store's pyramid does (odd edges cropped)."""
    h, w = shape
    fy, fx = img.shape[1] // h, img.shape[2] // w
    if fy == 1 and fx == 1:
        return img[:, :h, :w]
    cropped = img[:, : h * fy, : w * fx]
    return cropped.reshape(img.shape[0], h, fy, w, fx).mean(axis=(2, 4))


# --------------------------------------------------------------------------------------------------
# panels of one field


def _targets(labels: Sequence[str]) -> dict[str, list[int]]:
    """Map channels grouped by target: ``mitotic`` or ``mitotic:DNA`` -> ``mitotic``."""
    groups: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        groups.setdefault(label.split(":", 1)[0], []).append(i)
    return groups


def field_panels(fld: FieldLevel, raw: np.ndarray | None, raw_channels: Sequence[str], channel: str | None,
                 per_channel: bool) -> list[Panel]:
    """One panel per target (per-channel maps summed), or with ``per_channel`` one per map channel
    (a shared map drawn over each raw channel in turn)."""
    base_name = channel or (raw_channels[0] if raw_channels else None)
    mixed = composite.is_composite(channel)

    def base(name: str | None) -> np.ndarray | None:
        if raw is not None and mixed and name == channel:
            return composite.composite(raw, channel, list(raw_channels))
        if raw is None or name not in raw_channels:
            return None
        return raw[list(raw_channels).index(name)]

    def over(name: str | None) -> str:
        if raw is not None and mixed and name == channel:
            return f" over {composite.label(channel)}"
        return f" over {name}" if raw is not None and name in raw_channels else ""

    if not per_channel:
        return [Panel(f"{target}{over(base_name)}", fld.maps[idx].sum(axis=0), base(base_name), target)
                for target, idx in _targets(fld.labels).items()]
    panels = []
    for i, label in enumerate(fld.labels):
        if ":" in label:
            name = label.split(":", 1)[1]
            panels.append(Panel(f"{label}{over(name)}", fld.maps[i], base(name), label.split(":", 1)[0]))
        elif raw is not None:
            panels.extend(Panel(f"{label}{over(name)}", fld.maps[i], base(name), label) for name in raw_channels)
        else:
            panels.append(Panel(label, fld.maps[i], None, label))
    return panels


# --------------------------------------------------------------------------------------------------
# entry point


def _choose_wells(plate: StorePlate, wells: Sequence[str] | None) -> list[str]:
    if not wells:
        return sorted(plate.wells, key=parse_well)
    chosen = []
    for text in wells:
        try:
            name = parse_well(text).name
        except WellIdError as exc:
            raise ConfigError(f"--wells: {exc}") from None
        if name not in plate.wells:
            listed = ", ".join(sorted(plate.wells, key=parse_well))
            raise ConfigError(f"well {name} is not in the store {plate.path} (its wells: {listed}); "
                              "choose wells from those with --wells")
        if name not in chosen:
            chosen.append(name)
    return chosen


def render(
    store: Path,
    out_dir: Path | None = None,
    wells: Sequence[str] | None = None,
    plate_yaml: Path | None = None,
    channel: str | None = None,
    per_channel: bool = False,
    csv: Path | None = None,
    max_size: int = DEFAULT_MAX_SIZE,
) -> RenderResult:
    """Write overlays of the chosen wells' fields, the plate montage and ``report.html``; return the paths.

    ``out_dir`` defaults to ``<store>_render`` beside the store; it must be no input folder, and files
    there are replaced only when pcim wrote them (io/outputs.py). ``wells`` default to every well in the
    store. With ``plate_yaml`` the maps are drawn over the raw channel ``channel`` (default: the first of
    ``plate.channels``).
    """
    from pcim_cli.config import load_config

    store = Path(store)
    plate = open_plate(store)
    chosen = _choose_wells(plate, wells)
    cfg = load_config(plate_yaml) if plate_yaml is not None else None
    raw = find_raw(cfg, chosen) if cfg is not None else None
    _check_channel(raw, channel)
    csv_path = find_csv(store, plate.name, csv, _suggested_csv(cfg, store))
    thumbs, shown = montage_thumbs(plate)
    shown_targets = set(shown.values())
    out_dir = Path(out_dir) if out_dir is not None else store.parent / f"{store.stem}_render"
    outputs.check_render(out_dir, store, chosen, cfg)  # no input folder; replaces only its own files
    out_dir = _make_out_dir(out_dir)

    result = RenderResult(out_dir, [], out_dir / "montage.png", out_dir / "report.html", csv_path)
    images, fields, tops = _draw_fields(plate, chosen, raw, channel, per_channel, max_size, result)
    if len(shown_targets) == 1:  # one target everywhere: say it once in the title
        draw_montage(plate, thumbs, f"{shown_targets.pop()}, first field of each well").save(
            result.montage, pnginfo=outputs.png_info())
    else:  # layout targets: each well's map is for its own target, written in its cell
        draw_montage(plate, thumbs, "each well's target (in its cell), first field of each well",
                     labels=shown).save(result.montage, pnginfo=outputs.png_info())
    pixels = None if raw is None else report_shortcuts.RawPixels(lambda fld: raw_field(raw, fld), raw.channels)
    result.shortcuts = report_shortcuts.picture(plate, out_dir, pixels)  # the whole plate, not only `chosen`
    table = read_csv(csv_path, chosen) if csv_path is not None else records_table(plate, fields)
    write_report(result.report, plate, table, images, result.montage.name,
                 [f.record for f in fields if f.record], csv_path, tops, result.shortcuts)
    logger.info("rendered %d fields of %d wells, the montage and the report in %s", len(result.overlays),
                len(chosen), out_dir)
    return result


def _check_channel(raw: RawImages | None, channel: str | None) -> None:
    if channel is None:
        return
    if raw is None:
        raise ConfigError("--channel picks a raw image channel: give --plate-yaml too, so the raw TIFFs can be found")
    if composite.is_composite(channel):
        composite.parse_spec(channel, raw.channels)  # ConfigError naming a bad channel or colour
    elif channel not in raw.channels:
        raise ConfigError(f"--channel {channel!r} is not one of plate.channels ({', '.join(raw.channels)}), "
                          "nor rgb or a composite such as DNA,PH3 or DNA=blue,PH3=green")


def _make_out_dir(out_dir: Path) -> Path:
    try:
        (out_dir / "wells").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the output folder {out_dir} ({exc}): pass a writable --out") from exc
    return out_dir


def _draw_fields(plate: StorePlate, wells: Sequence[str], raw: RawImages | None, channel: str | None,
                 per_channel: bool, max_size: int, result: RenderResult
                 ) -> tuple[dict[str, str], list[FieldLevel], dict[tuple[str, str], str]]:
    """Write one overlay per complete field (one field in memory at a time); the fields' PNG paths (relative
    to the output folder, by store path), the fields with their records (pixels dropped) and the HTML
    lists of their top objects by (store path, target)."""
    images: dict[str, str] = {}
    fields: list[FieldLevel] = []
    tops: dict[tuple[str, str], str] = {}
    for well in wells:
        for rel in field_paths(plate, well):
            fld = read_level(plate, well, rel, fit=max_size)
            if fld is None or fld.record is None:
                result.skipped.append(rel)
                logger.warning("%s (%s): no complete map in the store (not written, failed or interrupted); "
                               "skipped", well, rel)
                continue
            objects = report_objects.field_objects(plate.root[rel], fld.record, fld.maps.shape[1:])
            tops.update({(rel, t): report_objects.top_html(top) for t, top in objects.top.items()})
            png = _write_overlay(fld, raw, channel, per_channel, result.out_dir, objects)
            result.overlays.append(png)
            images[rel] = png.relative_to(result.out_dir).as_posix()
            fld.maps = fld.maps[:0]  # keep the record, drop the pixels
            fields.append(fld)
    return images, fields, tops


def _suggested_csv(cfg: Any, store: Path) -> Path | None:
    """The plate.yaml's output.csv, when its output.zarr is the store being drawn."""
    if cfg is None or Path(cfg.output.zarr).resolve() != store.resolve():
        return None
    return Path(cfg.output.csv)


def _write_overlay(fld: FieldLevel, raw: RawImages | None, channel: str | None, per_channel: bool,
                   out_dir: Path, objects: report_objects.FieldObjects | None = None) -> Path:
    pixels = raw_field(raw, fld) if raw is not None else None
    panels = field_panels(fld, pixels, raw.channels if raw else [], channel, per_channel)
    for panel in panels:
        panel.objects = objects
    predicted = (fld.record or {}).get("predicted_class")
    title = f"{fld.well} site {fld.site}" + (f" (predicted {predicted})" if predicted else "")
    png = out_dir / "wells" / f"{fld.well}_s{fld.site}.png"
    draw_panels(panels, title).save(png, pnginfo=outputs.png_info())
    return png


def montage_thumbs(plate: StorePlate) -> tuple[dict[str, np.ndarray | None], dict[str, str]]:
    """Thumbnails (None: no complete map) of each well's first field, its first target, from a coarse
    pyramid level; and that target's name per well. InputDataError when no well has a pcim map at all."""
    thumbs: dict[str, np.ndarray | None] = {}
    shown: dict[str, str] = {}
    for well in plate.wells:
        rels = field_paths(plate, well)
        fld = read_level(plate, well, rels[0], thumb=CELL) if rels else None
        if fld is None or fld.record is None:
            thumbs[well] = None
            continue
        target, idx = next(iter(_targets(fld.labels).items()))
        shown[well] = target
        thumbs[well] = thumbnail(fld.maps[idx].sum(axis=0), CELL)
    if not shown:
        raise InputDataError(
            f"no well of {plate.path} has a complete pcim map in its first field (no '{RECORD_KEY}' completion "
            "record): the store was not written by `pcim explain`, or its fields failed; (re)run "
            "`pcim explain plate.yaml` and see the CSV's PCIM_Error column")
    return thumbs, shown
