"""Who owns an output store: pcim writes only into stores it created, and a store belongs to one plate.

The plate record (the root group's ``pcim`` attribute, written with the plate metadata when pcim creates
the store, io/store.py) names the plate. :func:`check_owner` reads only, so a refusal leaves the path
exactly as it was (not even a lock file): any existing path that is not such a store (a file, a folder
with other files, a Zarr / OME-Zarr store written by another tool) and, unless forced, a store of
another plate. An empty folder (or one holding only pcim's lock) is used as a new store.
"""

from __future__ import annotations

import enum
import shutil
from collections.abc import Mapping
from pathlib import Path

import zarr

from pcim_cli.errors import OutputError
from pcim_cli.io.lock import LOCK_NAME
from pcim_cli.io.ngff import ome_metadata
from pcim_cli.io.store import (
    DAMAGE_ERRORS,
    RECORD_KEY,
    damaged_root,
    has_root,
    output_error,
)


class Ownership(enum.Enum):
    """What :func:`check_owner` found at an output.zarr path."""

    NEW = "new"  # nothing there (or an empty folder): pcim creates the store
    OURS = "ours"  # a pcim store of this plate
    TAKEOVER = "takeover"  # a pcim store of another plate, replaced because of --force


def check_owner(path: Path, plate_name: str, force: bool = False) -> Ownership:
    """May pcim write plate ``plate_name`` into ``path``? Reads only; raises OutputError (exit 65) when not.

    Refused: a file; a folder with other files in it; a Zarr / OME-Zarr store without pcim's plate
    record (not written by pcim); a store whose metadata cannot be read; a pcim store of another
    plate, unless ``force``.
    """
    path = Path(path)
    if not path.exists():
        return Ownership.NEW
    if not path.is_dir():
        raise OutputError(f"output.zarr {path} exists and is a file, not a pcim store: pcim writes nothing "
                          "there; set output.zarr to a new path")
    if not has_root(path):
        others = sorted(p.name for p in path.iterdir() if p.name != LOCK_NAME)
        if not others:
            return Ownership.NEW
        listed = ", ".join(others[:3]) + (", …" if len(others) > 3 else "")
        raise OutputError(f"output.zarr {path} is a folder with other files in it ({listed}), not a pcim "
                          "store: pcim writes nothing there; set output.zarr to a new path or an empty folder")
    try:
        attrs = zarr.open_group(str(path), mode="r").attrs.asdict()
    except DAMAGE_ERRORS as exc:
        raise damaged_root(path, exc) from exc
    record = attrs.get(RECORD_KEY)
    if not isinstance(record, Mapping):
        raise OutputError(f"output.zarr {path} is a Zarr store that pcim did not write (it has no pcim plate "
                          "record): pcim never writes into it; set output.zarr to a new path")
    owner = record.get("plate") or (ome_metadata(attrs).get("plate") or {}).get("name")
    if owner == plate_name:
        return Ownership.OURS
    if not force:
        raise OutputError(f"output.zarr {path} holds the maps of plate {owner}, not of plate {plate_name}: "
                          "set output.zarr to another path (e.g. out/{plate}.zarr), or rerun with --force to "
                          f"replace plate {owner}'s maps with {plate_name}'s")
    return Ownership.TAKEOVER


def clear_store(path: Path) -> int:
    """Remove every group and file of the store except the run lock (--force onto another plate's store).

    Returns how many field records were there.
    """
    path = Path(path)
    fields = sum(1 for _ in path.glob("*/*/*/zarr.json"))
    for child in path.iterdir():
        if child.name == LOCK_NAME:
            continue
        try:
            shutil.rmtree(child) if child.is_dir() else child.unlink()
        except OSError as exc:
            raise output_error(path, exc) from exc
    return fields
