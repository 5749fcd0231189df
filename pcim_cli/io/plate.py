"""Plate geometry and well IDs (the plate map, the layout table, is io/layout.py).

Wells are written `A01` everywhere pcim writes them (CSV `Metadata_Well`, logs, run summaries);
`parse_well` accepts the spellings found in vendor file names and spreadsheets: `A1`, `A01`, `A001`,
`a01`, `A/1`, `AA01`. Rows past Z continue `AA`, `AB`, … (a 1536-well plate has rows A–AF).
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass

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


def edge_wells(plate_format: int) -> list[str]:
    """The wells of a plate's outer ring (first and last row and column), row-major: where evaporation
    and temperature edge effects sit."""
    rows, cols = plate_shape(plate_format)
    return [w.name for w in all_wells(plate_format) if w.row in (0, rows - 1) or w.col in (0, cols - 1)]


def parse_well(text: str | Well, plate_format: int | None = None) -> Well:
    """Parse a well ID ('A1', 'A01', 'A001', 'a01', 'A/1', 'AA01').

    Raises WellIdError when the text is not a well, or the well is off the plate: off the given
    `plate_format`, or off every standard plate (1536 wells) when no format is given.
    """
    if isinstance(text, str):  # a plate's thousands of wells are parsed again and again (sorting, paths)
        return _parse_cached(text, plate_format)
    return _parse(text, plate_format)


@functools.lru_cache(maxsize=16384)
def _parse_cached(text: str, plate_format: int | None) -> Well:
    return _parse(text, plate_format)


def _parse(text: str | Well, plate_format: int | None) -> Well:
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
