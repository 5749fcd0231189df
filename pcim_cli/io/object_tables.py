"""Per-object tables: kept in the store with each field, and written as `{plate}_pcim_{Object}.csv`.

Each field group holds, per object kind, one float64 array ``{field}/tables/{Object}`` (one row per
object, the columns named in its ``columns`` attribute, CSV names), next to the label images
(io/labels.py). The per-object CSVs are rebuilt from these arrays at the end of every run, like the
main CSV from the completion records, and written atomically; the store alone reproduces them.

Columns (CellProfiler naming, so they join Image.csv / Nuclei.csv and pycytominer tables):
``Metadata_Plate, Metadata_Well, Metadata_Site, ObjectNumber`` (the label value),
``Location_Center_X, Location_Center_Y`` (0-based px), ``AreaShape_Area`` (px), then per target
``PCIM_<target>_Sum, _Mean, _Max, _Share, _Rank, _DeltaP`` and ``PCIM_<target>_Share_<channel>``.
One row per (well, site, object); the targets explained in a field are its column groups (a target
not explained in that field is empty).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import zarr

from pcim_cli.io import store, summary
from pcim_cli.io.summary import column_word

logger = logging.getLogger(__name__)

TABLES_GROUP = "tables"
OBJECT_ID_COLUMNS = ("ObjectNumber", "Location_Center_X", "Location_Center_Y", "AreaShape_Area")
TARGET_MEASURES = ("Sum", "Mean", "Max", "Share", "Rank", "DeltaP")
INTEGER_COLUMNS = ("ObjectNumber", "AreaShape_Area")
META = ("Metadata_Plate", "Metadata_Well", "Metadata_Site")


def target_columns(target: str, channels: Sequence[str]) -> list[str]:
    """The columns of one target: PCIM_<target>_{Sum,...,DeltaP} and PCIM_<target>_Share_<channel>."""
    t = column_word(target)
    return [f"PCIM_{t}_{m}" for m in TARGET_MEASURES] + [f"PCIM_{t}_Share_{column_word(c)}" for c in channels]


def csv_path(csv: Path, plate: str, name: str) -> Path:
    """``{plate}_pcim_{Object}.csv`` in the folder of the main CSV (output.csv)."""
    return Path(csv).parent / f"{plate}_pcim_{name}.csv"


# --------------------------------------------------------------------------------------------------
# the store


def write_tables(field_group: zarr.Group, tables: Mapping[str, tuple[list[str], np.ndarray]], format: str) -> None:
    """Replace the field group's ``tables`` group with these tables (name -> (columns, (N, len(columns))))."""
    if TABLES_GROUP in field_group:
        del field_group[TABLES_GROUP]
    if not tables:
        return
    group = field_group.create_group(TABLES_GROUP, attributes={"tables": list(tables)})
    for name, (columns, data) in tables.items():
        data = np.asarray(data, dtype=np.float64).reshape(-1, len(columns))
        options: dict = {"chunks": (max(1, min(len(data), 65536)), len(columns)),
                         "attributes": {"columns": list(columns), "object": name}}
        if format != "0.5":
            options["chunk_key_encoding"] = {"name": "v2", "separator": "/"}
        group.create_array(name, data=data, **options)


def read_table(field_group: zarr.Group, name: str) -> pd.DataFrame | None:
    """One object kind's table of a field (None when the field has none)."""
    path = f"{TABLES_GROUP}/{name}"
    if path not in field_group:
        return None
    array = field_group[path]
    columns = list(array.attrs.get("columns", []))
    data = np.asarray(array[...], dtype=np.float64).reshape(-1, len(columns))
    return pd.DataFrame(data, columns=columns)


def field_table(store_path: Path, well: str, index: int, name: str) -> pd.DataFrame | None:
    """The table of one field of the store, or None."""
    try:
        group = zarr.open_group(str(store_path), path=store.field_path(well, index), mode="r")
    except FileNotFoundError:
        return None
    return read_table(group, name)


# --------------------------------------------------------------------------------------------------
# the CSVs


def build_table(plate: str, fields: Iterable[tuple[str, int, int, pd.DataFrame]]) -> pd.DataFrame:
    """One object CSV from the tables of done fields ((well, site, store index, table)), in plate order."""
    parts = []
    for well, site, _index, table in fields:
        meta = pd.DataFrame({"Metadata_Plate": plate, "Metadata_Well": well, "Metadata_Site": site},
                            index=table.index)
        parts.append(pd.concat([meta, table], axis=1))
    if not parts:
        return pd.DataFrame(columns=[*META, *OBJECT_ID_COLUMNS])
    table = pd.concat(parts, ignore_index=True, sort=False)
    ordered = [*META, *OBJECT_ID_COLUMNS]
    table = table[ordered + [c for c in table.columns if c not in ordered]]
    for column in (*INTEGER_COLUMNS, "Metadata_Site"):
        table[column] = pd.to_numeric(table[column]).round().astype("Int64")
    rank = [c for c in table.columns if c.endswith("_Rank")]
    for column in rank:
        table[column] = pd.to_numeric(table[column]).round().astype("Int64")
    return table


def rebuild(store_path: Path, plate: str, names: Sequence[str], done: Iterable[tuple[str, int, int]]
            ) -> dict[str, pd.DataFrame]:
    """The object CSV tables of the done fields ((well, site, store index), in plate order), from the store."""
    done = list(done)
    out = {}
    for name in names:
        found = []
        for well, site, index in done:
            table = field_table(store_path, well, index, name)
            if table is not None:
                found.append((well, site, index, table))
        out[name] = build_table(plate, found)
    return out


def write_csvs(tables: Mapping[str, pd.DataFrame], csv: Path, plate: str) -> dict[str, Path]:
    """Write each table as ``{plate}_pcim_{Object}.csv`` beside the main CSV, atomically."""
    written = {}
    for name, table in tables.items():
        path = csv_path(csv, plate, name)
        summary.write_csv_atomic(table, path)
        written[name] = path
    return written
