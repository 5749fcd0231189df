"""The OME-Zarr HCS attribution store (docs/reference/store.md): where each field lives, its writers and readers.

Layout: ``{store}/{row}/{col}/{field}/{level}``, e.g. ``A/1/0/0``, NGFF 0.5 (Zarr v3, metadata under the
``ome`` attribute key) by default, or NGFF 0.4 (Zarr v2, metadata at the top level of the attributes).

Two kinds of writers, so that concurrent workers never race on shared metadata:

- the driver calls :func:`create_plate` once, before any work is sent out: it writes the plate and
  well groups (the only shared metadata);
- each worker calls :func:`write_field`, which touches only its own field group ``{row}/{col}/{field}``
  and writes the completion record (attribute ``pcim``) last. A field group with arrays but no
  ``pcim`` attribute is *incomplete* (a crash mid-write) and is redone on the next run.

A store belongs to one plate: its plate record (the root group's ``pcim`` attribute, written together
with the plate metadata when the store is created) names that plate; io/ownership.py checks it before
anything is written.

Damaged metadata (a ``zarr.json`` that is not JSON any more) never stops a reader: a field whose group
metadata cannot be read has the record ``{"status": "damaged", ...}`` and is redone by the next run. So
has a field whose record says done but whose map arrays cannot be opened or lack chunk files
(:func:`map_arrays_problem`: one metadata read per array and one listing of its folder; the maps
themselves are not read). Map arrays are written with every chunk, empty ones included, so a missing
chunk file always means damage.

A field group may hold more than pcim wrote (a label layer drawn in napari): rewriting a field replaces
only what pcim owns there — its map levels, its object tables, the label images of its own object kinds
and the group's metadata (:func:`_clear_field`).
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from pcim_cli import __version__
from pcim_cli.errors import OutputError, os_reason
from pcim_cli.io import zarr_files
from pcim_cli.io.ngff import (
    BAD_METADATA,
    DAMAGE_ERRORS,
    MAX_CHUNK,
    check_maps,
    image_attrs,
    jsonable,
    ome_attrs,
    ome_metadata,
    pyramid,
    zarr_version,
)
from pcim_cli.io.plate import parse_well, row_letter
from pcim_cli.io.plate import row_index as plate_row_index

logger = logging.getLogger(__name__)

RECORD_KEY = "pcim"
#: mantissa bits the stored maps keep (relative error <= 2^-7; benchmarks/bench_store.py: no CSV metric
#: moves by more than 2e-4, the map of a 2160 px field takes 2-4x less space)
MAP_MANTISSA_BITS = 6


# --------------------------------------------------------------------------------------------------
# well names and paths


@functools.lru_cache(maxsize=4096)
def split_well(well: str) -> tuple[str, str]:
    """``"A01"`` -> ``("A", "1")``; ``"AA03"`` -> ``("AA", "3")``: the NGFF row and column group names."""
    parsed = parse_well(well)
    return parsed.row_letter, str(parsed.col_number)


def field_path(well: str, field: int) -> str:
    """Relative path of a field image group: ``field_path("A01", 0) == "A/1/0"``."""
    row, col = split_well(well)
    return f"{row}/{col}/{int(field)}"


# --------------------------------------------------------------------------------------------------
# driver side: plate and well metadata


def create_plate(path: Path, plate_name: str, fields: Mapping[str, int], format: str = "0.5",
                 record: Mapping[str, Any] | None = None) -> None:
    """Create (or reopen) the HCS plate at ``path`` with one well group per well of ``fields``.

    ``fields`` maps canonical well names (``A01``) to the number of fields in that well. Reopening an
    existing store keeps its field data and merges its wells into the metadata (a run on a subset of
    wells must not hide wells written by an earlier run). Rows and columns are listed from A / 1 to the
    largest one used, so viewers lay the wells out at their plate positions. The plate record names the
    plate (and takes the keys of ``record``); a new store gets it in the same write as its plate
    metadata, so no pcim store ever lacks it. Call ``ownership.check_owner`` first.
    """
    zarr_format = zarr_version(format)
    existing = _existing_wells(path, format)
    merged = dict(existing)
    for well, count in fields.items():
        cell = split_well(well)
        merged[cell] = max(int(count), merged.get(cell, 0))
    if not merged:
        raise ValueError("create_plate needs at least one well")

    cells = sorted(merged, key=_well_sort_key)
    n_rows = max(plate_row_index(row) for row, _ in cells) + 1
    n_cols = max(int(col) for _, col in cells)
    plate: dict[str, Any] = {
        "name": plate_name,
        "rows": [{"name": row_letter(i)} for i in range(n_rows)],
        "columns": [{"name": str(i + 1)} for i in range(n_cols)],
        "wells": [
            {"path": f"{row}/{col}", "rowIndex": plate_row_index(row), "columnIndex": int(col) - 1}
            for row, col in cells
        ],
        "field_count": max(max(merged.values()), 1),
        "version": format,  # 0.5 moved versions to ``ome.version``, yet its plate section still asks
    }
    try:
        pcim = {**(read_plate_record(path) if has_root(path) else {"created": _now(), "created_by": __version__}),
                **dict(record or {}), "plate": plate_name}
        attrs = {**ome_attrs(format, "plate", plate), RECORD_KEY: jsonable(pcim)}
        if has_root(path):
            zarr_files.update_attributes(path, attrs)
        else:  # one write: the plate metadata and the record that says pcim made this store
            zarr_files.write_group(path, zarr_format, attrs)
        rows_ok: set[str] = set()
        for row, col in cells:  # a well's metadata is written only where it does not already say this
            images = [{"path": str(i)} for i in range(merged[(row, col)])]
            if row not in rows_ok:
                _require_group(path / row, zarr_format, {})
                rows_ok.add(row)
            _require_group(path / row / col, zarr_format, ome_attrs(format, "well", {"images": images}),
                           ome_key="well")
    except OSError as exc:
        raise output_error(path, exc) from exc
    logger.info("plate %s: %d wells in %s (NGFF %s)", plate_name, len(cells), path, format)


def _require_group(folder: Path, zarr_format: int, attrs: dict[str, Any], ome_key: str | None = None) -> None:
    """Make the group at `folder` hold `attrs` (its NGFF entry `ome_key` set, its other attributes kept),
    writing nothing when it already does; damaged metadata is written again (its members are kept)."""
    try:
        have = zarr_files.read_attributes(folder)
    except ValueError:
        logger.warning("rewrote the damaged group metadata of %s", folder)
        have = None
    if have is not None and ome_key is None:
        return
    if have is not None:
        ome_have, ome_want = ome_metadata(have), ome_metadata(attrs)
        if ome_have.get(ome_key) == ome_want.get(ome_key):
            return
        attrs = _merge_ome(have, attrs)
    zarr_files.write_group(folder, zarr_format, attrs)


def _merge_ome(have: Mapping[str, Any], want: Mapping[str, Any]) -> dict[str, Any]:
    """`have` with the NGFF entries of `want` set (under ``ome`` for 0.5, at the top level for 0.4)."""
    out = dict(have)
    for key, value in want.items():
        out[key] = {**dict(out.get(key) or {}), **value} if key == "ome" and isinstance(value, Mapping) else value
    return out


def _existing_wells(path: Path, format: str) -> dict[tuple[str, str], int]:
    """Wells (``("A", "1")`` -> field count) already described by a store at ``path``; {} if none.

    A well whose metadata is damaged counts the field groups found in its folder (create_plate then
    writes its metadata again).
    """
    if not has_root(path):
        return {}
    try:
        attrs = zarr_files.read_attributes(path) or {}
    except (ValueError, OSError) as exc:
        raise damaged_root(path, exc) from exc
    found = "0.5" if zarr_files.zarr_format_at(path) == 3 else "0.4"
    if found != format:
        raise OutputError(
            f"{path} is an NGFF {found} store, but output.format is {format!r}: set output.format: "
            f"{found!r}, or choose another output.zarr path (or delete the old store)."
        )
    plate = ome_metadata(attrs).get("plate") or {}
    wells: dict[tuple[str, str], int] = {}
    for entry in plate.get("wells", []):
        well_path = str(entry.get("path", "")) if isinstance(entry, Mapping) else ""
        if well_path.count("/") != 1:
            continue
        row, col = well_path.split("/")
        wells[(row, col)] = _well_field_count(path, well_path)
    return wells


def _well_field_count(path: Path, well_path: str) -> int:
    try:
        attrs = zarr_files.read_attributes(Path(path) / well_path)
        if attrs is None:
            return 0
        images = ome_metadata(attrs).get("well", {}).get("images", [])
        return len(images)
    except (*BAD_METADATA, OSError):
        logger.warning("the well metadata %s/%s/zarr.json cannot be read (damaged); it is written again",
                       path, well_path)
        folder = path / well_path
        return len([p for p in folder.iterdir() if p.name.isdigit()]) if folder.is_dir() else 0


def has_root(path: Path) -> bool:
    return (Path(path) / "zarr.json").exists() or (Path(path) / ".zgroup").exists()


def damaged_root(path: Path, exc: BaseException) -> OutputError:
    name = "zarr.json" if (Path(path) / "zarr.json").exists() else ".zattrs"
    return OutputError(f"the plate metadata {Path(path) / name} cannot be read ({type(exc).__name__}: "
                       f"{os_reason(exc)}); the store is damaged: restore that file from a backup, or set "
                       "output.zarr to a new path (the maps in the store stay readable by their field paths)")


# --------------------------------------------------------------------------------------------------
# worker side: one field image


def write_field(
    path: Path,
    well: str,
    field: int,
    maps: np.ndarray,
    labels: Sequence[str],
    record: Mapping[str, Any],
    format: str = "0.5",
    extra: Callable[[zarr.Group, int], None] | None = None,
) -> str:
    """Write one field's attribution maps ``(c, y, x)`` as a multiscale image, then its record.

    Replaces any earlier content of the field group (a rerun). The completion record goes into the
    group's attribute ``pcim`` last, so a crash leaves the field visibly incomplete. Touches only the
    field group. ``extra(group, n_levels)`` writes more members (object labels and tables) after the
    maps and before the record. Returns the relative path, e.g. ``"A/1/0"``.
    """
    zarr_format = zarr_version(format)
    maps = np.asarray(maps, dtype=np.float32)
    check_maps(maps, labels)
    record_json = jsonable(dict(record))
    rel = field_path(well, field)
    levels = [zarr_files.round_mantissa(level, MAP_MANTISSA_BITS)
              for level in pyramid(zarr_files.round_mantissa(maps, MAP_MANTISSA_BITS))]
    attrs = image_attrs(format, rel, levels[0], labels, len(levels))
    folder = Path(path) / rel
    try:
        _check_store_format(path, format)
        _clear_field(Path(path), rel)
        zarr_files.write_group(folder, zarr_format, attrs)  # no record yet: incomplete until the last write
        for level, data in enumerate(levels):
            zarr_files.write_array(folder / str(level), zarr_format, data, _chunks(data.shape),
                                   ("c", "y", "x") if zarr_format == 3 else None)
        if extra is not None:
            extra(zarr.open_group(str(path), path=rel, mode="r+"), len(levels))
        zarr_files.update_attributes(folder, {RECORD_KEY: record_json})
    except OutputError:
        raise
    except OSError as exc:
        raise output_error(path, exc) from exc
    logger.debug("wrote %s/%s: %s, %d levels", path, rel, maps.shape, len(levels))
    return rel


#: members of a field group that pcim writes (besides its map levels, named by numbers, and the label
#: images of the object kinds its record lists)
OWNED_MEMBERS = ("tables",)
METADATA_FILES = ("zarr.json", ".zattrs", ".zgroup", ".zarray")


def owned_labels(record: Mapping[str, Any] | None) -> set[str]:
    """The object kinds whose label images pcim wrote into a field (its record's done object entries)."""
    entries = (record or {}).get("objects") or {}
    return {str(k) for k, v in entries.items() if isinstance(v, Mapping) and v.get("status") == "done"}


def _clear_field(path: Path, rel: str) -> None:
    """Remove what pcim wrote in a field group — map levels, object tables, the label images of the kinds
    its record lists, the group metadata — and keep the rest (e.g. a user's label layer)."""
    folder = Path(path) / rel
    if not folder.is_dir():
        return
    try:
        record = (zarr_files.read_attributes(folder) or {}).get(RECORD_KEY)
    except (*BAD_METADATA, OSError):
        record = None
    for child in folder.iterdir():
        if child.name.isdigit() or child.name in OWNED_MEMBERS:
            shutil.rmtree(child) if child.is_dir() else child.unlink()
        elif child.name in METADATA_FILES:
            child.unlink()
    for name in owned_labels(record if isinstance(record, Mapping) else None):
        shutil.rmtree(folder / "labels" / name, ignore_errors=True)


def update_field(path: Path, well: str, field: int, write: Callable[[zarr.Group, int], None],
                 record: Mapping[str, Any]) -> None:
    """Rewrite members of a complete field beside its maps (``write(group, n_levels)``), then its record.

    The label images of the object kinds the old record lists are removed (a user's label layers stay)
    and its ``objects`` entry is dropped first, so a crash in between leaves the members visibly stale
    (the next run makes them again); the maps are not touched.
    """
    from pcim_cli.io.labels import remove_labels

    record_json = jsonable(dict(record))
    try:
        group = zarr.open_group(str(path), path=field_path(well, field), mode="r+")
        old = dict(group.attrs.get(RECORD_KEY) or {})
        remove_labels(group, owned_labels(old))
        old.pop("objects", None)
        group.update_attributes({RECORD_KEY: jsonable(old)})
        n_levels = len(ome_metadata(group.attrs.asdict())["multiscales"][0]["datasets"])
        write(group, n_levels)
        group.update_attributes({RECORD_KEY: record_json})
    except OSError as exc:
        raise output_error(path, exc) from exc


def read_field(path: Path, well: str, field: int) -> tuple[np.ndarray, list[str], dict | None]:
    """Full-resolution maps ``(c, y, x)``, channel labels and completion record (None: incomplete).

    Raises FileNotFoundError when the field was never written.
    """
    group = zarr.open_group(str(path), path=field_path(well, field), mode="r")
    ome = ome_metadata(group.attrs.asdict())
    level0 = ome["multiscales"][0]["datasets"][0]["path"]
    labels = [channel.get("label", "") for channel in ome.get("omero", {}).get("channels", [])]
    record = group.attrs.get(RECORD_KEY)
    return np.asarray(group[level0][...]), labels, (dict(record) if record is not None else None)


#: read_record's answers by (field folder, identity of its metadata file): a command reads a field's
#: record twice (the plan, then the CSV); the second read costs one stat while the file is the same one
#: (every write replaces it: a new inode and time). Damaged answers are never kept.
_RECORDS: dict[str, tuple[tuple[int, int, int], dict | None]] = {}


def read_record(path: Path, well: str, field: int) -> dict | None:
    """The field's completion record, or None when the field is missing or incomplete (no arrays read).

    A field whose group metadata cannot be read gives ``{"status": "damaged", "error": ...}``.
    """
    rel = field_path(well, field)
    folder = os.path.join(os.fspath(path), rel)
    try:
        st = os.stat(os.path.join(folder, "zarr.json"))
        key: tuple[int, int, int] | None = (st.st_ino, st.st_mtime_ns, st.st_size)
    except OSError:
        key = None  # NGFF 0.4 (.zattrs), or no group: read as usual, not kept
    kept = _RECORDS.get(folder)
    if key is not None and kept is not None and kept[0] == key:
        return None if kept[1] is None else dict(kept[1])
    out = _read_record(path, rel)
    if key is not None and (out is None or out.get("status") != "damaged"):
        if len(_RECORDS) > 200_000:
            _RECORDS.clear()
        _RECORDS[folder] = (key, out)
    return None if out is None else dict(out)


def _read_record(path: Path, rel: str) -> dict | None:
    try:
        attrs = zarr_files.read_attributes(Path(path) / rel)
        if attrs is None:
            return None
        record = attrs.get(RECORD_KEY)
    except DAMAGE_ERRORS as exc:
        return damaged_record(path, rel, exc)
    if record is not None and not isinstance(record, Mapping):
        return damaged_record(path, rel, TypeError(f"its record is a {type(record).__name__}"))
    if record is None:
        return None
    if record.get("status") == "done":
        problem = map_arrays_problem(Path(path), rel, attrs)
        if problem is not None:
            return {"status": "damaged", "error": problem, "site": record.get("site")}
    return dict(record)


def map_arrays_problem(path: Path, rel: str, attrs: Mapping[str, Any]) -> str | None:
    """Why the map arrays of a field (its multiscales datasets) are not whole: an array whose metadata
    cannot be opened, or a chunk file missing. None when every array opens with all its chunks. Reads
    one metadata file per array and lists its folder; never reads the maps."""
    redo = "the next pcim explain redoes the field"
    try:
        datasets = [str(d["path"]) for d in ome_metadata(attrs)["multiscales"][0]["datasets"]]
    except (*BAD_METADATA, IndexError) as exc:
        return f"the field metadata {Path(path) / rel / 'zarr.json'} lists no map arrays ({type(exc).__name__}); {redo}"
    for name in datasets:
        folder = os.path.join(os.fspath(path), rel, name)
        try:
            expected, missing = zarr_files.missing_chunks(folder)
        except DAMAGE_ERRORS as exc:
            return (f"the map array {folder} cannot be opened ({type(exc).__name__}: {os_reason(exc)}); {redo}")
        if missing:
            return (f"the map array {folder} lacks {len(missing)} of its {expected} chunk files (e.g. "
                    f"{missing[0]}): its maps are gone; {redo}")
    return None


def damaged_record(path: Path, rel: str, exc: BaseException) -> dict[str, Any]:
    """The record that stands for a field group whose metadata cannot be read."""
    return {"status": "damaged", "error": f"the field metadata {Path(path) / rel / 'zarr.json'} cannot be read "
            f"({type(exc).__name__}: {os_reason(exc)}); the next pcim explain redoes the field"}


def update_record(path: Path, well: str, field: int, changes: Mapping[str, Any]) -> None:
    """Change keys of an existing field record (the driver marks records stale, or refreshes their inputs)."""
    folder = Path(path) / field_path(well, field)
    try:
        record = dict((zarr_files.read_attributes(folder) or {}).get(RECORD_KEY) or {})
        zarr_files.update_attributes(folder, {RECORD_KEY: jsonable({**record, **changes})})
    except OSError as exc:
        raise output_error(path, exc) from exc


# --------------------------------------------------------------------------------------------------
# driver side: the plate record (failures, last run) and what the store holds


def read_plate_record(path: Path) -> dict[str, Any]:
    """The plate group's ``pcim`` attribute (``plate``, ``fingerprint``, ``failed``: fields that failed, by
    path; ``last_run``); {} if none. Raises OutputError when the plate metadata cannot be read."""
    try:
        attrs = zarr_files.read_attributes(path)
    except DAMAGE_ERRORS as exc:
        raise damaged_root(path, exc) from exc
    record = (attrs or {}).get(RECORD_KEY)
    return dict(record) if isinstance(record, Mapping) else {}


def update_plate_record(path: Path, changes: Mapping[str, Any]) -> None:
    """Set keys of the plate group's ``pcim`` attribute, keeping the others. Only the driver calls this."""
    try:
        record = (zarr_files.read_attributes(path) or {}).get(RECORD_KEY)
        record = dict(record) if isinstance(record, Mapping) else {}
        zarr_files.update_attributes(path, {RECORD_KEY: jsonable({**record, **changes})})
    except OSError as exc:
        raise output_error(path, exc) from exc


def plate_fields(path: Path) -> dict[str, int]:
    """Wells (canonical ``A01``) -> number of fields the plate metadata lists; {} when no plate is there."""
    try:
        if zarr_files.read_attributes(path) is None:
            return {}
    except DAMAGE_ERRORS as exc:
        raise damaged_root(path, exc) from exc
    out = {}
    for (row, col), n in _existing_wells(path, "0.5" if zarr_files.zarr_format_at(path) == 3 else "0.4").items():
        try:
            out[_well_name(row, col)] = n
        except ValueError:
            logger.warning("%s: the plate metadata lists a well %s/%s that is no well name; ignored", path, row, col)
    return out


def _well_name(row: str, col: str) -> str:
    return parse_well(f"{row}{col}").name


# --------------------------------------------------------------------------------------------------
# helpers


def _check_store_format(path: Path, format: str) -> None:
    """A worker must not write a Zarr v3 field into a v2 plate (or the reverse)."""
    version = zarr_files.zarr_format_at(path)
    if version is None:
        return  # no plate yet: create_plate was not called; the field is still written
    found = "0.5" if version == 3 else "0.4"
    if found != format:
        raise OutputError(
            f"{path} is an NGFF {found} store, but this field was to be written as NGFF {format}: "
            f"set output.format: {found!r}, or choose another output.zarr path."
        )


def _well_sort_key(cell: tuple[str, str]) -> tuple[int, int]:
    return plate_row_index(cell[0]), int(cell[1])


def _chunks(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """Chunks of one channel x up to 1024 x 1024 px (whole-plate browsing)."""
    return (1, min(shape[1], MAX_CHUNK), min(shape[2], MAX_CHUNK))


def output_error(path: Path, exc: BaseException) -> OutputError:
    return OutputError(
        f"cannot write the output store {path}: {os_reason(exc)}. Make sure every folder above it is a "
        f"writable folder (not a file) with free space, or set output.zarr to a writable path; the fields "
        f"already done are kept."
    )


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S%z")


__all__ = ["DAMAGE_ERRORS", "MAP_MANTISSA_BITS", "RECORD_KEY", "create_plate", "damaged_record",
           "damaged_root", "field_path", "has_root", "output_error", "plate_fields", "read_field",
           "read_plate_record", "read_record", "split_well", "update_field", "update_plate_record", "update_record",
           "write_field"]
