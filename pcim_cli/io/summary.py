"""The CSV summary: one row per (well, field, target), CellProfiler / pycytominer naming (docs/reference/csv.md).

Profiles join on ``Metadata_Plate`` + ``Metadata_Well`` without renaming; layout annotations come along
as ``Metadata_<column>``. The driver writes the file atomically (temp file + rename), so a reader
never sees half a CSV.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from pcim_cli.engine.options import QC_COLUMNS
from pcim_cli.engine.verdict import FIT_LABELS, fit_quality
from pcim_cli.errors import OutputError, os_reason
from pcim_cli.io.plate import parse_well

logger = logging.getLogger(__name__)

METADATA_PREFIX = "Metadata_"
LAYOUT_WELL = "well"  # the layout table's canonical well column

# row key -> CSV column, in CSV order; layout columns go between the two groups
ID_COLUMNS: dict[str, str] = {
    "plate": "Metadata_Plate",
    "well": "Metadata_Well",
    "site": "Metadata_Site",
}
RESULT_COLUMNS: dict[str, str] = {
    "target": "PCIM_Target",
    "predicted_class": "PCIM_PredictedClass",
    "prob_original": "PCIM_ProbOriginal",
    "prob_mixed": "PCIM_ProbMixed",
    "prob_deleted": "PCIM_ProbDeleted",
    "deletion_auc": "PCIM_DeletionAUC",
    "insertion_auc": "PCIM_InsertionAUC",
    "fit": "PCIM_Fit",
    "status": "PCIM_Status",
    "error": "PCIM_Error",
    "runtime_s": "PCIM_Runtime_s",
    "zarr_path": "PCIM_ZarrPath",
}
#: The fixed columns in order; ``Metadata_<layout column>`` columns go after ``Metadata_Site``.
COLUMNS: tuple[str, ...] = (*ID_COLUMNS.values(), *RESULT_COLUMNS.values())
FLOAT_COLUMNS = (
    "PCIM_ProbOriginal",
    "PCIM_ProbMixed",
    "PCIM_ProbDeleted",
    "PCIM_DeletionAUC",
    "PCIM_InsertionAUC",
    "PCIM_Runtime_s",
)
STATUSES = ("done", "failed", "skipped")
#: PCIM_Fit: did the fit achieve its objective, or what the class is in the field (engine/verdict.py,
#: docs/verdicts.md); empty for methods that fit nothing
FITS = FIT_LABELS
#: the shortcut QC's columns (docs/shortcuts.md): region -> column; Seams only for tiled fields
SHORTCUT_COLUMNS = {region: f"PCIM_Share_{word}" for region, word in QC_COLUMNS.items()}


def layout_column_name(column: str) -> str:
    """``treatment`` -> ``Metadata_treatment``; a column already named ``Metadata_*`` is kept."""
    return column if column.startswith(METADATA_PREFIX) else METADATA_PREFIX + column


def column_word(name: str) -> str:
    """A class, channel or object name as part of a column name (letters, digits, '_')."""
    return re.sub(r"\W+", "_", str(name)).strip("_") or "_"


def build_summary(rows: Iterable[Mapping[str, Any]], layout: pd.DataFrame | None = None) -> pd.DataFrame:
    """The summary table: result rows joined with the layout's annotations, in plate order.

    Each row has the keys of ``ID_COLUMNS`` and ``RESULT_COLUMNS`` (a missing key is left empty), and
    may carry more numeric ``PCIM_*`` columns (channel shares, object counts), which follow the fixed
    columns in order of first appearance. ``layout`` has a canonical ``well`` column plus annotation
    columns. Rows are sorted by well (row then column), site and target.
    """
    rows = list(rows)
    keys = {**ID_COLUMNS, **RESULT_COLUMNS}
    fixed = set(keys.values())
    extra = list(dict.fromkeys(k for row in rows for k in row if k.startswith("PCIM_") and k not in fixed))
    table = pd.DataFrame([{**{column: row.get(key) for key, column in keys.items()},
                           **{column: row.get(column) for column in extra}} for row in rows])
    if table.empty:
        table = pd.DataFrame(columns=[*COLUMNS, *extra])
    for column in (*FLOAT_COLUMNS, *extra):  # empty (None) metrics of failed rows must not make a column "object"
        table[column] = pd.to_numeric(table[column], errors="coerce").astype("float64")
    for column in extra:  # counts stay whole numbers beside the empty cells of failed rows
        if column.endswith("_Count"):
            table[column] = table[column].round().astype("Int64")
    # a site stays a whole number even when a row has none (a well with no image file at all)
    table[ID_COLUMNS["site"]] = pd.to_numeric(table[ID_COLUMNS["site"]], errors="coerce").astype("Int64")

    layout_columns: list[str] = []
    if layout is not None:
        annotations = _annotations(layout)
        layout_columns = [c for c in annotations.columns if c != ID_COLUMNS["well"]]
        table = table.merge(annotations, on=ID_COLUMNS["well"], how="left", validate="many_to_one")

    if not table.empty:
        order = table[ID_COLUMNS["well"]].map(_well_order)
        table = (
            table.assign(_order=order)
            .sort_values(["_order", ID_COLUMNS["site"], RESULT_COLUMNS["target"]], kind="stable")
            .drop(columns="_order")
            .reset_index(drop=True)
        )
    ids = list(ID_COLUMNS.values())
    return table[[*ids, *layout_columns, *RESULT_COLUMNS.values(), *extra]]


def rows_from_record(plate: str, well: str, zarr_path: str, record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The summary rows (one per target) of a field's completion record in the store."""
    timings = record.get("timings_s") or {}
    runtime = sum(float(timings[k]) for k in ("read", "fit", "write") if k in timings)
    objects = record.get("objects") or {}
    error = "; ".join([record.get("error") or "", *(f"{name} table: {o.get('error', '')}"
                                                    for name, o in objects.items() if o.get("status") == "failed")])
    rows = []
    for target, result in (record.get("results") or {}).items():
        fit = result.get("fit")
        if fit is None:  # a record made before fits were judged: judge it from its probabilities
            fit = fit_quality(*(_number(result.get(k)) for k in ("prob_original", "prob_mixed", "prob_deleted",
                                                                  "prob_full_deleted")))
        rows.append({
            "plate": plate, "well": well, "site": record.get("site"), "target": target,
            "predicted_class": record.get("predicted_class", ""),
            "prob_original": result.get("prob_original"), "prob_mixed": result.get("prob_mixed"),
            "prob_deleted": result.get("prob_deleted"), "fit": fit,
            "deletion_auc": result.get("deletion_auc"), "insertion_auc": result.get("insertion_auc"),
            "status": record.get("status", "done"),
            "error": "; ".join([*(f"warning: {w}" for w in record.get("warnings") or []), error]).strip("; "),
            "runtime_s": runtime, "zarr_path": zarr_path, **_share_columns(result, objects, target),
        })
    return rows


def _share_columns(result: Mapping[str, Any], objects: Mapping[str, Any], target: str) -> dict[str, Any]:
    """``PCIM_Share_<channel>`` (the channel split of the map), the shortcut QC's shares
    (``PCIM_Share_OnObjects`` ... ``PCIM_Share_Seams``, when the record has them) and, per object kind,
    ``PCIM_<Object>_Count`` and ``PCIM_<Object>_TopDeltaP`` (the drop of p(target) when the target's
    explain.top_objects objects holding most attribution are deleted together)."""
    out: dict[str, Any] = {f"PCIM_Share_{column_word(c)}": v
                           for c, v in (result.get("channel_shares") or {}).items()}
    found = result.get("shares")
    if isinstance(found, Mapping):  # fields explained with qc.enabled
        out.update({column: found.get(region) for region, column in SHORTCUT_COLUMNS.items()
                    if region != "seams" or found.get("seams") is not None})
    for name, entry in objects.items():
        word = column_word(name)
        done = entry.get("status") == "done"
        out[f"PCIM_{word}_Count"] = entry.get("count") if done else None
        out[f"PCIM_{word}_TopDeltaP"] = ((entry.get("top") or {}).get(target) or {}).get("delta_p") if done else None
    return out


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def write_csv_atomic(df: pd.DataFrame, path: Path) -> None:
    """Write ``df`` to ``path`` through a temp file in the same folder and an atomic rename.

    Creates the parent folder. The file gets the usual permissions (umask applies). Unwritable ->
    :class:`OutputError` naming the path.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as handle:
            df.to_csv(handle, index=False)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise OutputError(
            f"cannot write the CSV summary {path}: {os_reason(exc)}. Make sure its folder is writable and has "
            f"free space (or set output.csv to a writable path); the store keeps every map done, and the next "
            f"run writes the CSV again."
        ) from exc
    logger.info("wrote %d rows to %s", len(df), path)


def _annotations(layout: pd.DataFrame) -> pd.DataFrame:
    """The layout with its ``well`` column as ``Metadata_Well`` and annotations as ``Metadata_<col>``."""
    if LAYOUT_WELL not in layout.columns:
        raise ValueError(f"the layout table has no {LAYOUT_WELL!r} column (columns: {list(layout.columns)})")
    renamed: dict[str, str] = {LAYOUT_WELL: ID_COLUMNS["well"]}
    keep = [LAYOUT_WELL]
    for column in layout.columns:
        if column == LAYOUT_WELL:
            continue
        name = layout_column_name(str(column))
        if name in ID_COLUMNS.values() or name in renamed.values():
            logger.warning("layout column %r would shadow %s; left out of the summary", column, name)
            continue
        renamed[column] = name
        keep.append(column)
    return layout[keep].rename(columns=renamed)


def _well_order(well: Any) -> tuple[int, int]:
    """Plate order (row, then column) of a canonical well name; unparsable names sort last."""
    try:
        parsed = parse_well(str(well))
    except ValueError:
        return (1 << 30, 1 << 30)
    return parsed.row, parsed.col
