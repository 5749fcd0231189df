"""Plate geometry, well IDs and the plate-map (layout) table.

Wells are written `A01` everywhere pcim writes them (CSV `Metadata_Well`, logs, run summaries);
`parse_well` accepts the spellings found in vendor file names and spreadsheets: `A1`, `A01`, `A001`,
`a01`, `A/1`, `AA01`. Rows past Z continue `AA`, `AB`, … (a 1536-well plate has rows A–AF).
"""

from __future__ import annotations

import csv
import io
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pcim_cli.errors import InputDataError

logger = logging.getLogger(__name__)

#: standard plate formats: wells -> (rows, columns)
PLATE_FORMATS: dict[int, tuple[int, int]] = {
    6: (2, 3),
    12: (3, 4),
    24: (4, 6),
    48: (6, 8),
    96: (8, 12),
    384: (16, 24),
    1536: (32, 48),
}
MAX_ROWS, MAX_COLS = PLATE_FORMATS[1536]

_WELL_RE = re.compile(r"^\s*([A-Za-z]{1,2})\s*[/_-]?\s*(\d{1,3})\s*$")

#: spellings of the layout's well column, compared lower-case without '_', '-', ' ' (first match wins)
WELL_COLUMN_NAMES = ("well", "wellid", "wellname", "metadatawell", "wellposition")


class WellIdError(InputDataError, ValueError):
    """A text is not a well ID, or names a well off the plate.

    An InputDataError (exit 65) for data; also a ValueError, so config validation reports it as a
    configuration problem.
    """


@dataclass(frozen=True, order=True)
class Well:
    """One well: 0-based row and column indices. Sorts row-major (A01, A02, …, B01, …)."""

    row: int
    col: int

    @property
    def row_letter(self) -> str:
        """Row as letters: 'A' … 'Z', 'AA' … 'AF'."""
        return row_letter(self.row)

    @property
    def col_number(self) -> int:
        """Column as the 1-based number printed on the plate."""
        return self.col + 1

    @property
    def name(self) -> str:
        """Canonical name, e.g. 'A01', 'AF48'."""
        return f"{self.row_letter}{self.col_number:02d}"

    def __str__(self) -> str:
        return self.name


def plate_shape(plate_format: int) -> tuple[int, int]:
    """(rows, columns) of a standard plate format; ValueError for other numbers."""
    try:
        return PLATE_FORMATS[plate_format]
    except KeyError:
        allowed = ", ".join(str(n) for n in PLATE_FORMATS)
        raise ValueError(f"{plate_format} is not a standard plate format (one of {allowed})") from None


def row_letter(index: int) -> str:
    """0 -> 'A', 25 -> 'Z', 26 -> 'AA', 31 -> 'AF' (spreadsheet-style letters)."""
    if index < 0:
        raise ValueError(f"row index must be >= 0, got {index}")
    letters = ""
    n = index + 1
    while n:
        n, rem = divmod(n - 1, 26)
        letters = chr(ord("A") + rem) + letters
    return letters


def row_index(letters: str) -> int:
    """'A' -> 0, 'AA' -> 26 (inverse of `row_letter`, case-insensitive)."""
    n = 0
    for ch in letters.upper():
        if not "A" <= ch <= "Z":
            raise ValueError(f"{letters!r} is not a row letter")
        n = n * 26 + (ord(ch) - ord("A") + 1)
    if n == 0:
        raise ValueError("empty row letters")
    return n - 1


def all_wells(plate_format: int) -> list[Well]:
    """Every well of a plate, row-major."""
    rows, cols = plate_shape(plate_format)
    return [Well(r, c) for r in range(rows) for c in range(cols)]


def parse_well(text: str | Well, plate_format: int | None = None) -> Well:
    """Parse a well ID ('A1', 'A01', 'A001', 'a01', 'A/1', 'AA01').

    Raises WellIdError when the text is not a well, or the well is off the plate: off the given
    `plate_format`, or off every standard plate (1536 wells) when no format is given.
    """
    if isinstance(text, Well):
        well = text
    else:
        match = _WELL_RE.match(str(text))
        if not match:
            raise WellIdError(f"{text!r} is not a well ID (expected a row letter and a column, like A01)")
        letters, digits = match.groups()
        well = Well(row_index(letters), int(digits) - 1)
        if well.col < 0:
            raise WellIdError(f"{text!r} is not a well ID: columns start at 1")
    if plate_format is None:
        rows, cols, where = MAX_ROWS, MAX_COLS, "any standard plate (up to 1536 wells: rows A-AF, columns 1-48)"
    else:
        rows, cols = plate_shape(plate_format)
        where = f"a {plate_format}-well plate (rows A-{row_letter(rows - 1)}, columns 1-{cols})"
    if well.row >= rows or well.col >= cols:
        raise WellIdError(f"well {well.name} (from {str(text)!r}) is not on {where}")
    return well


def infer_plate_format(wells: Iterable[str | Well]) -> int:
    """The smallest standard plate format that holds every given well."""
    parsed = [parse_well(w) for w in wells]
    if not parsed:
        raise WellIdError("cannot infer the plate format: no wells given")
    max_row = max(w.row for w in parsed)
    max_col = max(w.col for w in parsed)
    for fmt, (rows, cols) in PLATE_FORMATS.items():
        if max_row < rows and max_col < cols:
            return fmt
    raise AssertionError("unreachable: parse_well keeps wells on a 1536-well plate")  # pragma: no cover


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
