"""The OME-NGFF form of a store (docs/reference/store.md): metadata blocks of NGFF 0.5 (Zarr v3, under
the `ome` attribute key) and 0.4 (Zarr v2, at the top level of the attributes), the multiscale pyramid
of a field image, its display windows and chunking, and records as plain JSON.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import PurePath
from typing import Any

import numpy as np
import zarr

__all__ = ["BAD_METADATA", "COLOURS", "DAMAGE_ERRORS", "FORMATS", "MAX_CHUNK", "PYRAMID_FACTORS",
           "WINDOW_PERCENTILES", "array_options", "channel_window", "check_maps", "format_of", "image_attrs",
           "jsonable", "ome_attrs", "ome_metadata", "pyramid", "set_ome", "zarr_version"]

FORMATS = ("0.5", "0.4")
PYRAMID_FACTORS = (1, 2, 4)  # level 0 full size, then 2x and 4x mean-pooled
MAX_CHUNK = 1024
WINDOW_PERCENTILES = (0.5, 99.5)
#: errors of reading a group whose metadata is damaged (not JSON, wrong types, a missing key) ...
BAD_METADATA = (ValueError, KeyError, TypeError, AttributeError)
#: ... or cannot be read at all
DAMAGE_ERRORS = (*BAD_METADATA, OSError)
# Channel colours for napari / OMERO (hex RRGGBB); attribution maps of one target are one channel.
COLOURS = ("FF00FF", "00FF00", "00FFFF", "FFFF00", "FF0000", "0000FF", "FF8000", "FFFFFF")


def zarr_version(format: str) -> int:
    if format not in FORMATS:
        raise ValueError(f"unknown OME-NGFF format {format!r}; choose one of {', '.join(FORMATS)}")
    return 3 if format == "0.5" else 2


def format_of(group: zarr.Group) -> str:
    return "0.5" if group.metadata.zarr_format == 3 else "0.4"


def ome_metadata(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """The NGFF metadata block: under ``ome`` (0.5) or the attributes themselves (0.4)."""
    return dict(attrs.get("ome", attrs))


def ome_attrs(format: str, key: str, value: dict[str, Any]) -> dict[str, Any]:
    """Attributes that hold one NGFF metadata entry (a new group's)."""
    if format == "0.5":
        return {"ome": {"version": "0.5", key: value}}
    return {key: {**value, "version": "0.4"}}


def set_ome(group: zarr.Group, format: str, key: str, value: dict[str, Any]) -> None:
    """Set one NGFF metadata entry (``plate``, ``well``) on a group, keeping its other attributes."""
    if format == "0.5":
        ome = dict(group.attrs.get("ome", {}))
        ome.update({"version": "0.5", key: value})
        group.update_attributes({"ome": ome})
    else:
        group.update_attributes({key: {**value, "version": "0.4"}})


def check_maps(maps: np.ndarray, labels: Sequence[str]) -> None:
    if maps.ndim != 3 or 0 in maps.shape:
        raise ValueError(f"maps must be a non-empty (c, y, x) array, got shape {maps.shape}")
    if len(labels) != maps.shape[0]:
        raise ValueError(f"{len(labels)} labels for {maps.shape[0]} map channels")
    if not np.isfinite(maps).all() or (maps < 0).any():
        raise ValueError("attribution maps must be finite and non-negative")


def pyramid(maps: np.ndarray) -> list[np.ndarray]:
    """Level 0 and 2x / 4x mean-pooled levels (odd edges cropped); levels under 1 px are skipped."""
    levels = [maps]
    for factor in PYRAMID_FACTORS[1:]:
        prev = levels[-1]
        _, y, x = prev.shape
        if maps.shape[1] // factor < 1 or maps.shape[2] // factor < 1:
            break
        cropped = prev[:, : y // 2 * 2, : x // 2 * 2]
        pooled = cropped.reshape(prev.shape[0], y // 2, 2, x // 2, 2).mean(axis=(2, 4), dtype=np.float64)
        levels.append(pooled.astype(np.float32))
    return levels


def image_attrs(
    format: str, name: str, maps: np.ndarray, labels: Sequence[str], n_levels: int
) -> dict[str, Any]:
    multiscale: dict[str, Any] = {
        "name": name,
        "axes": [
            {"name": "c", "type": "channel"},
            {"name": "y", "type": "space"},
            {"name": "x", "type": "space"},
        ],
        "datasets": [
            {
                "path": str(level),
                "coordinateTransformations": [
                    {"type": "scale", "scale": [1.0, float(factor), float(factor)]}
                ],
            }
            for level, factor in enumerate(PYRAMID_FACTORS[:n_levels])
        ],
    }
    omero = {
        "name": name,
        "channels": [channel_window(label, maps[i], COLOURS[i % len(COLOURS)]) for i, label in enumerate(labels)],
        "rdefs": {"model": "color"},
    }
    if format == "0.5":
        return {"ome": {"version": "0.5", "multiscales": [multiscale], "omero": omero}}
    return {"multiscales": [{**multiscale, "version": "0.4"}], "omero": omero}


def channel_window(label: str, plane: np.ndarray, colour: str) -> dict[str, Any]:
    """An omero channel whose display window spans robust percentiles, so napari shows a sensible map."""
    low, high = (float(v) for v in np.percentile(plane, WINDOW_PERCENTILES))
    vmin, vmax = float(plane.min()), float(plane.max())
    if high <= low:
        high = vmax if vmax > low else low + (abs(low) or 1.0)
    return {
        "label": str(label),
        "color": colour,
        "active": True,
        "coefficient": 1.0,
        "family": "linear",
        "inverted": False,
        "window": {"min": vmin, "max": max(vmax, high), "start": low, "end": high},
    }


def array_options(shape: tuple[int, ...], zarr_format: int, axes: str = "cyx",
                  every_chunk: bool = False) -> dict[str, Any]:
    """Chunks of one channel x up to 1024 x 1024 px (whole-plate browsing); default compression; the axes'
    names (NGFF 0.5) or "/"-separated chunk keys (NGFF 0.4). `every_chunk`: empty chunks are written too
    (the map arrays: a missing chunk file then always means damage, io/store.py `map_arrays_problem`)."""
    options: dict[str, Any] = {"chunks": tuple(1 if a == "c" else min(n, MAX_CHUNK) for a, n in zip(axes, shape,
                                                                                                    strict=True))}
    if every_chunk:
        options["config"] = {"write_empty_chunks": True}
    if zarr_format == 3:
        options["dimension_names"] = tuple(axes)  # NGFF 0.5 requires them to match the axes
    else:
        options["chunk_key_encoding"] = {"name": "v2", "separator": "/"}  # NGFF 0.4 requires "/"
    return options


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON: numpy scalars/arrays unwrapped, tuples -> lists, NaN/inf -> None."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        return jsonable(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None  # strict JSON readers (browser viewers) reject NaN
    if isinstance(value, PurePath):
        return str(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"completion record value {value!r} ({type(value).__name__}) is not JSON-serialisable")
