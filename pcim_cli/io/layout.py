"""The plate map (plate.layout): a CSV, TSV or Excel table with one row per well and a well column,
read into a table whose `well` column holds canonical well names (io/plate.py `parse_well`).
"""

from __future__ import annotations

import csv
import io
import logging
import re
from pathlib import Path

import pandas as pd

from pcim_cli.errors import InputDataError
from pcim_cli.io.plate import WellIdError, parse_well

__all__ = ["EXCEL_SUFFIXES", "WELL_COLUMN_NAMES", "read_layout"]

logger = logging.getLogger(__name__)

#: spellings of the layout's well column, compared lower-case without '_', '-', ' ' (first match wins)
WELL_COLUMN_NAMES = ("well", "wellid", "wellname", "metadatawell", "wellposition")


def _sniff_separator(path: Path, sample: str) -> str:
    if path.suffix.lower() in (".tsv", ".tab"):
        return "\t"
    try:
        return csv.Sniffer().sniff(sample, delimiters=",\t;").delimiter
    except csv.Error:
        return "\t" if "\t" in sample.splitlines()[0] else ","


def _normalise_column(name: str) -> str:
    return re.sub(r"[\s_\-]", "", str(name)).lower()


EXCEL_SUFFIXES = (".xlsx", ".xlsm")


def _read_delimited(path: Path) -> pd.DataFrame:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise InputDataError(f"layout file {path} does not exist: fix plate.layout") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputDataError(f"cannot read layout file {path}: {exc}; save it as CSV, TSV or .xlsx") from exc
    if not text.strip():
        raise InputDataError(f"layout file {path} is empty: it needs a header with a 'well' column")
    sep = _sniff_separator(path, text[:8192])
    try:
        return pd.read_csv(io.StringIO(text), sep=sep, dtype=str, keep_default_na=False, na_values=[""],
                           skip_blank_lines=True)  # the text read above: the file is read once
    except (pd.errors.ParserError, ValueError) as exc:
        raise InputDataError(f"cannot parse layout file {path}: {exc}") from exc


def _read_excel(path: Path) -> pd.DataFrame:
    """The first sheet of an Excel workbook, as text (like a CSV)."""
    if not path.is_file():
        raise InputDataError(f"layout file {path} does not exist: fix plate.layout")
    try:
        table = pd.read_excel(path, sheet_name=0, dtype=str, keep_default_na=False, na_values=[""])
    except Exception as exc:  # noqa: BLE001 - openpyxl raises many kinds for a damaged workbook
        raise InputDataError(f"cannot read layout workbook {path} ({type(exc).__name__}: {exc}); "
                             "save it again from Excel, or export the sheet as CSV") from exc
    return table.dropna(how="all")


def read_layout(path: str | Path, plate_format: int | None = None) -> pd.DataFrame:
    """Read a plate map (CSV, TSV or ';'-separated, separator sniffed; or an .xlsx workbook's first sheet).

    The well column may be spelled `well`, `Well`, `WELL`, `well_id`, `Metadata_Well`, …; it is
    returned as a column `well` holding canonical names (A01), first. Other columns are annotations,
    read as text (only empty cells are missing values), so labels such as '0'/'1' stay class names.
    Raises InputDataError naming the file and line for a missing file, no well column, an
    unparseable or off-plate well, or a well listed twice.
    """
    path = Path(path)
    table = _read_excel(path) if path.suffix.lower() in EXCEL_SUFFIXES else _read_delimited(path)
    table.columns = [str(c).strip() for c in table.columns]

    by_key = {_normalise_column(c): c for c in reversed(table.columns)}
    well_col = next((by_key[k] for k in WELL_COLUMN_NAMES if k in by_key), None)
    if well_col is None:
        raise InputDataError(
            f"layout file {path} has no well column (columns: {', '.join(table.columns)}); "
            "name the column with the well IDs 'well'"
        )
    if "well" in table.columns and well_col != "well":
        table = table.drop(columns="well")  # would clash with the canonical column; logged below
        logger.warning("layout %s: using column %r as the wells, ignoring column 'well'", path, well_col)

    names: list[str] = []
    first_line: dict[str, int] = {}
    for i, raw in enumerate(table[well_col].tolist()):
        line = i + 2  # header is line 1 (blank lines are not counted)
        if not isinstance(raw, str) or not raw.strip():
            raise InputDataError(f"layout file {path}, line {line}: the well cell is empty")
        try:
            name = parse_well(raw, plate_format).name
        except WellIdError as exc:
            raise InputDataError(f"layout file {path}, line {line}: {exc}") from None
        if name in first_line:
            raise InputDataError(
                f"layout file {path}: well {name} is listed twice (lines {first_line[name]} and {line}); "
                "keep one row per well"
            )
        first_line[name] = line
        names.append(name)

    annotations = table.drop(columns=well_col)
    annotations.insert(0, "well", names)
    logger.debug("layout %s: %d wells, columns %s", path, len(names), list(annotations.columns[1:]))
    return annotations.reset_index(drop=True)
