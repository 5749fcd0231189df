"""Pictures of an attribution store: per-field PNG overlays, a plate montage and an HTML report.

``render(store)`` reads the OME-Zarr HCS store that ``pcim explain`` wrote (shared/DESIGN.md §3.2) one
field at a time and writes, under the output folder:

- ``wells/<well>_s<site>.png``: the maps of one field, one panel per target (or per channel), each over a
  raw image channel when the plate.yaml is given (the raw TIFFs are not in the store), with a colour bar;
- ``montage.png``: one thumbnail per well at its plate position (rows A.., columns 1..), empty wells grey;
- ``report.html``: the montage, a table of the CSV summary's numbers per field with its thumbnail, and
  the run's settings from the completion records. Images are linked by relative paths, so the folder
  opens in a browser without a server and can be moved or zipped as a whole.

Only coarse pyramid levels are read for the montage, and overlays use the finest level that fits
``max_size``, so a whole plate is never held in memory at full resolution.
"""

from __future__ import annotations

import html
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import zarr
from PIL import Image, ImageDraw, ImageFont

from pcim_cli import __version__
from pcim_cli.errors import ConfigError, InputDataError, OutputError, PcimError
from pcim_cli.io import outputs
from pcim_cli.io.plate import WellIdError, infer_plate_format, parse_well, plate_shape, row_letter
from pcim_cli.io.store import DAMAGE_ERRORS, RECORD_KEY, ome_metadata
from pcim_cli.report import composite
from pcim_cli.report import objects as report_objects

logger = logging.getLogger(__name__)

DEFAULT_MAX_SIZE = 1024  # overlays: the finest pyramid level whose longest side fits
MIN_PANEL = 256  # smaller fields are enlarged (nearest neighbour) so the labels stay readable
CELL = 96  # montage cell, pixels
BAR = 14  # colour bar width
BAR_TEXT = 46  # room for the colour bar's numbers
GAP = 4
LINE = 14  # height of one text line
EMPTY_GREY = (128, 128, 128)
MISSING_GREY = (70, 70, 70)
BACKGROUND = (255, 255, 255)
TEXT = (0, 0, 0)
VMAX_PERCENTILE = 99.5
#: colour map anchors (sRGB): near-black violet -> purple -> crimson -> orange -> pale yellow; the LUT
#: interpolates them in OKLab at even perceptual distances, so lightness rises monotonically
HEAT_ANCHORS = ("#12002e", "#5b1a8f", "#c2185b", "#f57c00", "#fff4b8")


# --------------------------------------------------------------------------------------------------
# result


@dataclass
class RenderResult:
    """What ``render`` wrote."""

    out_dir: Path
    overlays: list[Path]
    montage: Path
    report: Path
    csv: Path | None
    skipped: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "out_dir": str(self.out_dir),
            "overlays": [str(p) for p in self.overlays],
            "montage": str(self.montage),
            "report": str(self.report),
            "csv": None if self.csv is None else str(self.csv),
            "skipped": list(self.skipped),
        }


# --------------------------------------------------------------------------------------------------
# reading the store (levels other than 0; store.read_field reads only full resolution)


@dataclass
class Plate:
    """An opened HCS store: its plate metadata and wells (canonical name -> group path ``A/1``)."""

    path: Path
    root: zarr.Group
    name: str
    wells: dict[str, str]
    n_rows: int
    n_cols: int


@dataclass
class FieldLevel:
    """One field image at one pyramid level."""

    well: str
    index: int
    rel: str
    maps: np.ndarray  # (c, y, x) float32
    labels: list[str]
    record: dict[str, Any] | None
    full_shape: tuple[int, int]  # (y, x) at level 0

    @property
    def site(self) -> int:
        site = (self.record or {}).get("site")
        return int(site) if isinstance(site, int) else self.index + 1


def open_plate(path: Path) -> Plate:
    """Open a pcim store read-only; InputDataError naming the path and the fix when it is not one."""
    path = Path(path)
    if not path.exists():
        raise InputDataError(f"no store at {path}: pass the output.zarr folder that `pcim explain` wrote "
                             "(run `pcim explain plate.yaml` first)")
    try:
        root = zarr.open_group(str(path), mode="r")
    except (OSError, ValueError) as exc:  # zarr's GroupNotFoundError is a FileNotFoundError
        raise InputDataError(f"{path} is not a Zarr group ({exc}): pass the output.zarr folder that "
                             "`pcim explain` wrote") from exc
    plate = ome_metadata(root.attrs.asdict()).get("plate")
    if not isinstance(plate, Mapping) or not plate.get("wells"):
        raise InputDataError(f"{path} is not an OME-Zarr HCS plate (no plate metadata with wells): pass the "
                             "output.zarr folder that `pcim explain` wrote")
    wells: dict[str, str] = {}
    for entry in plate["wells"]:
        row, col = str(entry["path"]).split("/")
        wells[parse_well(f"{row}{col}").name] = f"{row}/{col}"
    n_rows, n_cols = plate_shape(infer_plate_format(wells))
    n_rows = max(n_rows, len(plate.get("rows", [])))
    n_cols = max(n_cols, len(plate.get("columns", [])))
    return Plate(path, root, str(plate.get("name", path.stem)), wells, n_rows, n_cols)


def field_paths(plate: Plate, well: str) -> list[str]:
    """Relative paths of a well's field groups (``A/1/0``, …) as listed in its well metadata."""
    well_path = plate.wells[well]
    try:
        if well_path not in plate.root:
            return []
        images = ome_metadata(plate.root[well_path].attrs.asdict()).get("well", {}).get("images", [])
        return [f"{well_path}/{image['path']}" for image in images]
    except DAMAGE_ERRORS as exc:
        logger.warning("%s/%s: the well metadata cannot be read (%s: %s); its fields are not drawn",
                       plate.path, well_path, type(exc).__name__, exc)
        return []


def read_level(plate: Plate, well: str, rel: str, level: int = 0, *, fit: int | None = None,
               thumb: int | None = None) -> FieldLevel | None:
    """A field at pyramid ``level`` (clamped to the levels there are); or, with ``fit``, at the finest level
    whose longest side is <= fit; or, with ``thumb``, at the coarsest level still at least half of a
    ``thumb``-pixel thumbnail.

    None when the field group or its arrays are missing (never written, or a crash mid-write).
    """
    try:
        if rel not in plate.root:
            return None
        group = plate.root[rel]
        ome = ome_metadata(group.attrs.asdict())
        datasets = ome["multiscales"][0]["datasets"]
        shapes = [group[d["path"]].shape for d in datasets]
        chosen = _pick_level(shapes, level, fit, thumb)
        labels = [c.get("label", str(i)) for i, c in enumerate(ome.get("omero", {}).get("channels", []))]
        maps = np.asarray(group[datasets[chosen]["path"]][...], dtype=np.float32)
    except (IndexError, *DAMAGE_ERRORS) as exc:  # incomplete (a crash mid-write) or damaged: not drawn
        if not isinstance(exc, (KeyError, FileNotFoundError)):
            logger.warning("%s/%s cannot be read (%s: %s); drawn as incomplete", plate.path, rel,
                           type(exc).__name__, exc)
        return None
    labels = labels if len(labels) == maps.shape[0] else [str(i) for i in range(maps.shape[0])]
    record = group.attrs.get(RECORD_KEY)
    return FieldLevel(well, int(rel.rsplit("/", 1)[1]), rel, maps, labels,
                      dict(record) if record is not None else None, tuple(shapes[0][1:]))


def _pick_level(shapes: Sequence[tuple[int, ...]], level: int, fit: int | None, thumb: int | None) -> int:
    sides = [max(s[1:]) for s in shapes]
    if fit is not None:
        return next((i for i, s in enumerate(sides) if s <= fit), len(sides) - 1)
    if thumb is not None:
        return max((i for i, s in enumerate(sides) if 2 * s >= thumb), default=0)
    return max(0, min(level, len(sides) - 1))


# --------------------------------------------------------------------------------------------------
# colour map (computed here: OKLab interpolation between a few anchors)


def _srgb_to_linear(c: np.ndarray) -> np.ndarray:
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def _linear_to_srgb(c: np.ndarray) -> np.ndarray:
    c = np.clip(c, 0.0, 1.0)
    return np.where(c <= 0.0031308, 12.92 * c, 1.055 * c ** (1 / 2.4) - 0.055)


_M1 = np.array([[0.4122214708, 0.5363325363, 0.0514459929],
                [0.2119034982, 0.6806995451, 0.1073969566],
                [0.0883024619, 0.2817188376, 0.6299787005]])
_M2 = np.array([[0.2104542553, 0.7936177850, -0.0040720468],
                [1.9779984951, -2.4285922050, 0.4505937099],
                [0.0259040371, 0.7827717662, -0.8086757660]])


def _rgb_to_oklab(rgb: np.ndarray) -> np.ndarray:
    lms = _srgb_to_linear(rgb) @ _M1.T
    return np.cbrt(lms) @ _M2.T


def _oklab_to_rgb(lab: np.ndarray) -> np.ndarray:
    lms = (lab @ np.linalg.inv(_M2).T) ** 3
    return _linear_to_srgb(lms @ np.linalg.inv(_M1).T)


def heat_lut(n: int = 256, anchors: Sequence[str] = HEAT_ANCHORS) -> np.ndarray:
    """An ``(n, 3)`` uint8 colour map through ``anchors``, evenly spaced in OKLab distance."""
    rgb = np.array([[int(a[i:i + 2], 16) / 255 for i in (1, 3, 5)] for a in anchors])
    lab = _rgb_to_oklab(rgb)
    stops = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(lab, axis=0), axis=1))])
    t = np.linspace(0.0, stops[-1], n)
    table = np.stack([np.interp(t, stops, lab[:, k]) for k in range(3)], axis=1)
    return np.round(_oklab_to_rgb(table) * 255).astype(np.uint8)


_LUT = heat_lut()


def _scaled(values: np.ndarray, vmax: float) -> np.ndarray:
    return np.clip(values / vmax, 0.0, 1.0) if vmax > 0 else np.zeros_like(values)


def colourise(values: np.ndarray, vmax: float) -> np.ndarray:
    """Map values in ``[0, vmax]`` to RGB uint8 ``(y, x, 3)`` through the heat LUT."""
    return _LUT[np.round(_scaled(values, vmax) * (len(_LUT) - 1)).astype(np.intp)]


def overlay(values: np.ndarray, vmax: float, base: np.ndarray | None) -> np.ndarray:
    """The map in colour, blended over a ``base`` image in [0, 1] where given: grey ``(y, x)`` or colour
    ``(y, x, 3)`` (weak values show the cells through; strong ones cover them)."""
    colour = colourise(values, vmax)
    if base is None:
        return colour
    alpha = (_scaled(values, vmax) ** 0.7 * 0.85)[..., None]
    under = np.clip(base, 0.0, 1.0) * 255
    under = under if under.ndim == 3 else np.repeat(under[..., None], 3, axis=2)
    return np.round(under * (1 - alpha) + colour * alpha).astype(np.uint8)


def robust_vmax(values: np.ndarray) -> float:
    """The upper end of the colour scale: a high percentile, so one hot pixel does not wash out the map."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 1.0
    vmax = float(np.percentile(finite, VMAX_PERCENTILE))
    return vmax if vmax > 0 else (float(finite.max()) or 1.0)


# --------------------------------------------------------------------------------------------------
# drawing


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return composite.font()


def _text_size(draw: ImageDraw.ImageDraw, text: str) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=_font())
    return right - left, bottom - top


def _fmt(value: float) -> str:
    return f"{value:.3g}"


def colour_bar(height: int, vmax: float) -> Image.Image:
    """A vertical colour bar (high at the top) labelled 0 and ``vmax``."""
    height = max(height, 24)
    ramp = np.linspace(vmax, 0.0, height, dtype=np.float32)[:, None].repeat(BAR, axis=1)
    image = Image.new("RGB", (BAR + BAR_TEXT, height), BACKGROUND)
    image.paste(Image.fromarray(colourise(ramp, vmax)), (0, 0))
    draw = ImageDraw.Draw(image)
    _, th = _text_size(draw, "0")
    draw.text((BAR + 3, 0), _fmt(vmax), fill=TEXT, font=_font())
    draw.text((BAR + 3, height - th - 3), "0", fill=TEXT, font=_font())
    return image


@dataclass
class Panel:
    """One picture: a 2-D map and what it is drawn over."""

    title: str
    values: np.ndarray  # (y, x)
    base: np.ndarray | None  # (y, x) grey or (y, x, 3) colour, in [0, 1]
    target: str = ""
    objects: report_objects.FieldObjects | None = None  # plate.objects: the target's top objects are outlined


def draw_panels(panels: Sequence[Panel], title: str) -> Image.Image:
    """Panels side by side, each titled and with its own colour bar, under a title line."""
    h, w = panels[0].values.shape
    scale = max(1, MIN_PANEL // max(h, w))
    tiles = []
    for panel in panels:
        vmax = robust_vmax(panel.values)
        rgb = Image.fromarray(overlay(panel.values, vmax, panel.base))
        if scale > 1:
            rgb = rgb.resize((w * scale, h * scale), Image.Resampling.NEAREST)
        if panel.objects:
            report_objects.draw_outlines(rgb, panel.objects, panel.target, scale)
        tiles.append((panel.title, rgb, colour_bar(rgb.height, vmax)))
    line = LINE
    width = sum(t[1].width + t[2].width + 2 * GAP for t in tiles) + GAP
    height = tiles[0][1].height + 2 * line + 3 * GAP
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    draw.text((GAP, GAP), title, fill=TEXT, font=_font())
    x = GAP
    for caption, rgb, bar in tiles:
        draw.text((x, GAP + line), caption, fill=TEXT, font=_font())
        top = 2 * GAP + 2 * line
        image.paste(rgb, (x, top))
        image.paste(bar, (x + rgb.width + GAP, top))
        x += rgb.width + bar.width + 2 * GAP
    return image


def _resize_values(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a 2-D float array to ``size`` (width, height), bilinear."""
    image = Image.fromarray(values.astype(np.float32), mode="F")
    return np.asarray(image.resize(size, Image.Resampling.BILINEAR), dtype=np.float32)


def _thumb(values: np.ndarray, cell: int) -> np.ndarray:
    h, w = values.shape
    ratio = cell / max(h, w)
    return _resize_values(values, (max(1, round(w * ratio)), max(1, round(h * ratio))))


def draw_montage(plate: Plate, thumbs: Mapping[str, np.ndarray | None], caption: str,
                 cell: int = CELL, labels: Mapping[str, str] | None = None) -> Image.Image:
    """Thumbnails at plate positions: rows A.., columns 1..; wells not in the store grey, wells without
    a complete first field dark grey. One colour scale (bar on the right) for the whole plate. `labels`
    (well -> text, e.g. its target when wells have different ones) are written at each cell's foot."""
    present = [t for t in thumbs.values() if t is not None]
    vmax = robust_vmax(np.concatenate([t.ravel() for t in present])) if present else 1.0
    left, top = 28, 40
    grid_w, grid_h = plate.n_cols * (cell + 2) + 2, plate.n_rows * (cell + 2) + 2
    bar = colour_bar(min(grid_h, 4 * cell), vmax)
    image = Image.new("RGB", (left + grid_w + GAP * 3 + bar.width, top + grid_h + GAP), BACKGROUND)
    draw = ImageDraw.Draw(image)
    draw.text((GAP, GAP), f"plate {plate.name}: {caption}", fill=TEXT, font=_font())
    for c in range(plate.n_cols):
        label = str(c + 1)
        tw, _ = _text_size(draw, label)
        draw.text((left + 2 + c * (cell + 2) + (cell - tw) // 2, top - 14), label, fill=TEXT, font=_font())
    for r in range(plate.n_rows):
        label = row_letter(r)
        _, th = _text_size(draw, label)
        draw.text((GAP, top + 2 + r * (cell + 2) + (cell - th) // 2), label, fill=TEXT, font=_font())
        for c in range(plate.n_cols):
            x0, y0 = left + 2 + c * (cell + 2), top + 2 + r * (cell + 2)
            name = f"{row_letter(r)}{c + 1:02d}"
            _draw_cell(image, draw, (x0, y0), cell, name, thumbs, vmax)
            if labels and labels.get(name) and thumbs.get(name) is not None:
                _, th = _text_size(draw, labels[name])
                draw.text((x0 + 2, y0 + cell - th - 4), labels[name], fill=(255, 255, 255), font=_font())
    image.paste(bar, (left + grid_w + 2 * GAP, top))
    return image


def _draw_cell(image: Image.Image, draw: ImageDraw.ImageDraw, at: tuple[int, int], cell: int, name: str,
               thumbs: Mapping[str, np.ndarray | None], vmax: float) -> None:
    x0, y0 = at
    if name not in thumbs:
        draw.rectangle((x0, y0, x0 + cell - 1, y0 + cell - 1), fill=EMPTY_GREY)
        draw.text((x0 + 2, y0 + 1), name, fill=(165, 165, 165), font=_font())
        return
    thumb = thumbs[name]
    if thumb is None:
        draw.rectangle((x0, y0, x0 + cell - 1, y0 + cell - 1), fill=MISSING_GREY)
        draw.text((x0 + 3, y0 + cell // 2 - 5), "no map", fill=(230, 230, 230), font=_font())
        return
    th, tw = thumb.shape
    draw.rectangle((x0, y0, x0 + cell - 1, y0 + cell - 1), fill=(0, 0, 0))
    image.paste(Image.fromarray(colourise(thumb, vmax)), (x0 + (cell - tw) // 2, y0 + (cell - th) // 2))
    draw.text((x0 + 2, y0 + 1), name, fill=(255, 255, 255), font=_font())


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
# CSV and report


def find_csv(store: Path, plate_name: str, csv: Path | None, suggested: Path | None = None) -> Path | None:
    """The CSV summary: ``csv`` if given (must exist); else ``suggested`` (the plate.yaml's output.csv when
    its output.zarr is this store) or one beside the store named as pcim names it, if it exists."""
    if csv is not None:
        if not Path(csv).is_file():
            raise InputDataError(f"CSV summary {csv} does not exist: pass --csv with the file that "
                                 "`pcim explain` wrote (output.csv), or leave --csv out")
        return Path(csv)
    candidates = [*([Path(suggested)] if suggested else []), store.with_suffix(".csv"),
                  store.parent / f"{store.stem}_pcim.csv", store.parent / f"{plate_name}_pcim.csv"]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        logger.info("no CSV summary beside %s (looked for %s); numbers come from the completion records",
                    store, ", ".join(c.name for c in candidates))
    return found


def _read_csv(path: Path, wells: Sequence[str]) -> pd.DataFrame:
    try:
        table = pd.read_csv(path, dtype={"Metadata_Well": str, "PCIM_ZarrPath": str}, keep_default_na=False,
                            na_values=[""])
    except (OSError, ValueError) as exc:
        raise InputDataError(f"cannot read the CSV summary {path} ({exc}): pass --csv with the file that "
                             "`pcim explain` wrote") from exc
    if "Metadata_Well" not in table.columns:
        raise InputDataError(f"{path} has no Metadata_Well column: it is not a pcim CSV summary; pass the "
                             "right one with --csv")
    return table[table["Metadata_Well"].isin(set(wells))].reset_index(drop=True)


def _rows_from_records(fields: Sequence[FieldLevel]) -> pd.DataFrame:
    rows = []
    for fld in fields:
        record = fld.record or {}
        for target, result in (record.get("results") or {}).items():
            rows.append({"Metadata_Well": fld.well, "Metadata_Site": fld.site, "PCIM_Target": target,
                         "PCIM_PredictedClass": record.get("predicted_class"),
                         "PCIM_ProbOriginal": result.get("prob_original"),
                         "PCIM_ProbMixed": result.get("prob_mixed"),
                         "PCIM_ProbDeleted": result.get("prob_deleted"), "PCIM_Fit": result.get("fit"),
                         "PCIM_DeletionAUC": result.get("deletion_auc"),
                         "PCIM_InsertionAUC": result.get("insertion_auc"),
                         "PCIM_Status": record.get("status"), "PCIM_ZarrPath": fld.rel})
    return pd.DataFrame(rows)


def _flatten(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(value, Mapping):
        out: list[tuple[str, Any]] = []
        for key, item in value.items():
            out.extend(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return [(prefix, value)]


def _settings_rows(records: Sequence[Mapping[str, Any]]) -> tuple[list[tuple[str, Any]], int]:
    """The first record's settings (flattened) and how many distinct settings fingerprints there are."""
    if not records:
        return [], 0
    first = records[0]
    rows = _flatten(first.get("settings", {}))
    rows += [(key, first.get(key)) for key in ("model_sha256", "fingerprint", "pcim_version") if key in first]
    return rows, len({r.get("fingerprint") for r in records})


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, dict)):
        return html.escape(json.dumps(value))
    return html.escape(str(value))


REPORT_CSS = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 3px 6px; text-align: left; vertical-align: middle; font-size: 13px; }
th { background: #f0f0f0; }
img.thumb { width: 192px; }
img.montage { max-width: 100%; }
ol.objects { margin: 0; padding-left: 1.4em; white-space: nowrap; }
.failed { background: #fde8e8; }
.note { color: #666; }
"""


def write_report(path: Path, plate: Plate, table: pd.DataFrame, images: Mapping[str, str], montage: str,
                 records: Sequence[Mapping[str, Any]], csv: Path | None,
                 objects: Mapping[tuple[str, str], str] | None = None) -> None:
    """Write the self-contained HTML report; ``images`` maps a field's store path to its PNG (relative),
    ``objects`` (store path, target) to the list of its top objects (plate.objects)."""
    settings, n_fingerprints = _settings_rows(records)
    columns = [c for c in table.columns if c not in ("Metadata_Plate", "PCIM_ZarrPath")]
    parts = [
        "<!DOCTYPE html>",
        f'<html lang="en"><head><meta charset="utf-8">{outputs.REPORT_MARK}',
        f"<title>pcim report: {html.escape(plate.name)}</title><style>{REPORT_CSS}</style></head><body>",
        f"<h1>Plate {html.escape(plate.name)}</h1>",
        f'<p class="note">store {html.escape(str(plate.path))}; CSV '
        f"{html.escape(str(csv)) if csv else '(none found: numbers from the completion records)'}; "
        f"made by pcim {__version__} on {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}</p>",
        "<h2>Plate montage</h2>",
        f'<img class="montage" src="{html.escape(montage)}" alt="plate montage">',
        "<h2>Fields</h2>",
        _fields_table(table, columns, images, objects or {}),
        "<h2>Settings</h2>",
    ]
    if n_fingerprints > 1:
        parts.append(f'<p class="failed">{n_fingerprints} different settings fingerprints among these fields; '
                     "showing the first field's settings.</p>")
    parts.append("<table><tr><th>setting</th><th>value</th></tr>"
                 + "".join(f"<tr><td>{html.escape(k)}</td><td>{_cell(v)}</td></tr>" for k, v in settings)
                 + "</table>")
    parts.append("</body></html>")
    path.write_text("\n".join(parts), encoding="utf-8")


def _short(column: str) -> str:
    """Table headers without the CSV's prefixes (the full name is the header's tooltip)."""
    for prefix in ("Metadata_", "PCIM_"):
        if column.startswith(prefix):
            return column[len(prefix):]
    return column


def _fields_table(table: pd.DataFrame, columns: Sequence[str], images: Mapping[str, str],
                  objects: Mapping[tuple[str, str], str]) -> str:
    listed = bool(objects)
    head = ("<tr><th>map</th>" + ("<th>top objects</th>" if listed else "")
            + "".join(f'<th title="{html.escape(c)}">{html.escape(_short(c))}</th>' for c in columns) + "</tr>")
    body = []
    for _, row in table.iterrows():
        rel = row.get("PCIM_ZarrPath")
        src = images.get(rel) if isinstance(rel, str) else None
        thumb = (f'<a href="{html.escape(src)}"><img class="thumb" src="{html.escape(src)}" '
                 f'alt="{html.escape(str(rel))}"></a>') if src else '<span class="note">no map</span>'
        css = ' class="failed"' if row.get("PCIM_Status") == "failed" else ""
        tops = f"<td>{objects.get((rel, str(row.get('PCIM_Target'))), '')}</td>" if listed else ""
        body.append(f"<tr{css}><td>{thumb}</td>{tops}" + "".join(f"<td>{_cell(row.get(c))}</td>" for c in columns)
                    + "</tr>")
    return f"<table>{head}{''.join(body)}</table>"


# --------------------------------------------------------------------------------------------------
# entry point


def _choose_wells(plate: Plate, wells: Sequence[str] | None) -> list[str]:
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
    table = _read_csv(csv_path, chosen) if csv_path is not None else _rows_from_records(fields)
    write_report(result.report, plate, table, images, result.montage.name,
                 [f.record for f in fields if f.record], csv_path, tops)
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


def _draw_fields(plate: Plate, wells: Sequence[str], raw: RawImages | None, channel: str | None,
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


def montage_thumbs(plate: Plate) -> tuple[dict[str, np.ndarray | None], dict[str, str]]:
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
        thumbs[well] = _thumb(fld.maps[idx].sum(axis=0), CELL)
    if not shown:
        raise InputDataError(
            f"no well of {plate.path} has a complete pcim map in its first field (no '{RECORD_KEY}' completion "
            "record): the store was not written by `pcim explain`, or its fields failed; (re)run "
            "`pcim explain plate.yaml` and see the CSV's PCIM_Error column")
    return thumbs, shown


__all__ = ["RenderResult", "colourise", "heat_lut", "open_plate", "read_level", "render"]
