"""`pcim render`'s shortcut picture (docs/shortcuts.md): from a store's completion records, the plate
heat-maps of each target's shares per well, the verdict in words and thumbnails of the flagged fields
(the map over the image, the objects outlined), drawn by report/shortcut_figure.py.

Reads records and, for the flagged fields only, one pyramid level of their maps; the raw image under a
thumbnail needs the plate.yaml (the store does not hold the TIFFs). A store made without `qc:` (or
before it existed) has no shares: no picture.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pcim_cli.engine import shares, shortcuts
from pcim_cli.io import outputs
from pcim_cli.io.plate import row_letter
from pcim_cli.io.store import RECORD_KEY
from pcim_cli.io.store_view import FieldLevel, StorePlate, field_paths, read_level
from pcim_cli.report import objects as report_objects
from pcim_cli.report import shortcut_figure as figure

__all__ = ["FILE", "RawPixels", "ShortcutPicture", "edge_ring", "picture"]

logger = logging.getLogger(__name__)

FILE = "shortcuts.png"
THUMBS_PER_TARGET = 8


@dataclass
class RawPixels:
    """A field's normalised raw image at the level of its maps (render.raw_field), and the channels."""

    read: Callable[[FieldLevel], np.ndarray | None]
    channels: list[str]


@dataclass
class ShortcutPicture:
    """What the picture shows: its file and the plate's verdict."""

    path: Path
    report: shortcuts.Report


def edge_ring(n_rows: int, n_cols: int) -> list[str]:
    """The outer ring's wells of an n_rows x n_cols plate."""
    return [f"{row_letter(r)}{c + 1:02d}" for r in range(n_rows) for c in range(n_cols)
            if r in (0, n_rows - 1) or c in (0, n_cols - 1)]


def _records(plate: StorePlate) -> list[tuple[str, str, dict[str, Any]]]:
    """(well, store path, record) of every done field of the store (records only, no pixels)."""
    out = []
    for well in plate.wells:
        for rel in field_paths(plate, well):
            try:
                record = plate.root[rel].attrs.get(RECORD_KEY) if rel in plate.root else None
            except Exception as exc:  # noqa: BLE001 - a damaged field is not drawn, the others are
                logger.warning("%s/%s: record unreadable (%s); left out of the shortcut picture", plate.path, rel, exc)
                continue
            if isinstance(record, Mapping) and record.get("status", "done") == "done":
                out.append((well, rel, dict(record)))
    return out


def picture(plate: StorePlate, out_dir: Path, raw: RawPixels | None = None) -> ShortcutPicture | None:
    """Write out_dir/shortcuts.png; None when no field of the store has shortcut shares (qc off). `raw`:
    how render reads a field's raw image (the thumbnails' background), with the plate's channels."""
    found = _records(plate)
    pairs = [(w, r) for w, _, r in found]
    fields, _, _ = shortcuts.fields_from_records(pairs)
    if not fields:
        return None
    report = shortcuts.from_records(pairs, edge_ring(plate.n_rows, plate.n_cols))
    means = shortcuts.well_means(fields)
    blocks = []
    for target in sorted(means, key=lambda t: -len(means[t])):
        mine = [f for f in report.findings if f.target == target]
        blocks.append(figure.TargetBlock(target, means[target], mine, _thumbs(plate, found, target, mine, raw)))
    image = figure.draw(plate.name, plate.n_rows, plate.n_cols, blocks, present=set(plate.wells))
    path = out_dir / FILE
    image.save(path, pnginfo=outputs.png_info())
    return ShortcutPicture(path, report)


def _thumbs(plate: StorePlate, found: list[tuple[str, str, dict[str, Any]]], target: str,
            findings: list[shortcuts.Finding], raw: RawPixels | None) -> list[figure.Thumb]:
    """The flagged fields of a target (per well flagged, its field with the highest flagged share), first
    the wells flagged most."""
    chosen: list[tuple[str, str, str, float]] = []  # well, rel, region, share
    seen: set[str] = set()
    for f in findings:
        if f.rule == "plate-edge":
            continue
        for well in f.wells:
            if well in seen:
                continue
            best = max(((rel, ((r.get("results") or {}).get(target, {}).get("shares") or {}).get(f.region))
                        for w, rel, r in found if w == well), key=lambda x: x[1] if isinstance(x[1], float) else -1.0,
                       default=(None, None))
            if best[0] is not None and isinstance(best[1], float):
                chosen.append((well, best[0], f.region, best[1]))
                seen.add(well)
    chosen.sort(key=lambda c: -c[3])
    return [t for c in chosen[:THUMBS_PER_TARGET] if (t := _thumb(plate, *c, target, raw)) is not None]


def _thumb(plate: StorePlate, well: str, rel: str, region: str, share: float, target: str,
           raw: RawPixels | None) -> figure.Thumb | None:
    fld = read_level(plate, well, rel, fit=2 * figure.THUMB)
    if fld is None:
        return None
    idx = [i for i, label in enumerate(fld.labels) if label.split(":", 1)[0] == target]
    if not idx:
        return None
    values = fld.maps[idx].sum(axis=0)
    qc = (fld.record or {}).get("qc") or {}
    source = qc.get("objects") or {}
    base = objects = None
    pixels = None
    if raw is not None:
        pixels = raw.read(fld)
    if pixels is not None:
        name = source.get("channel") if source.get("channel") in raw.channels else raw.channels[0]
        base = pixels[raw.channels.index(name)]
    if source.get("source") == "labels":
        labels = report_objects.field_objects(plate.root[rel], fld.record, values.shape).labels
        if source.get("kind") in labels:
            objects = labels[source["kind"]] > 0
    elif source.get("source") == "foreground" and base is not None:
        import torch

        objects = shares.foreground_mask(torch.from_numpy(np.ascontiguousarray(base)),
                                         source.get("polarity", "bright")).numpy()
    caption = f"{well} s{fld.site}: {figure.TITLES[region]} {100 * share:.0f} %"
    return figure.Thumb(well, fld.site, caption, values, base, objects)
