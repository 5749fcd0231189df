"""Reading a store for pictures (pcim render): a plate's wells and grid, and each field's maps at any
pyramid level with its completion record, one field at a time.

The records are the same the CSV and `pcim status` are built from (io/store.py, io/records.py); only
the maps are read here at the level a picture needs, so a whole plate is never held in memory at full
resolution.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from pcim_cli.errors import InputDataError
from pcim_cli.io.ngff import ome_metadata
from pcim_cli.io.plate import infer_plate_format, parse_well, plate_shape
from pcim_cli.io.store import DAMAGE_ERRORS, RECORD_KEY

__all__ = ["FieldLevel", "StorePlate", "field_paths", "open_plate", "read_level"]

logger = logging.getLogger(__name__)


@dataclass
class StorePlate:
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


def open_plate(path: Path) -> StorePlate:
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
    return StorePlate(path, root, str(plate.get("name", path.stem)), wells, n_rows, n_cols)


def field_paths(plate: StorePlate, well: str) -> list[str]:
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


def read_level(plate: StorePlate, well: str, rel: str, level: int = 0, *, fit: int | None = None,
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
