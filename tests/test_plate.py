"""Plate geometry, well IDs and layout tables."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pcim_cli.errors import InputDataError
from pcim_cli.io.layout import read_layout
from pcim_cli.io.plate import (
    PLATE_FORMATS,
    Well,
    WellIdError,
    all_wells,
    infer_plate_format,
    parse_well,
    row_index,
    row_letter,
)


@st.composite
def wells_on_plates(draw: st.DrawFn) -> tuple[int, Well]:
    fmt = draw(st.sampled_from(sorted(PLATE_FORMATS)))
    rows, cols = PLATE_FORMATS[fmt]
    return fmt, Well(draw(st.integers(0, rows - 1)), draw(st.integers(0, cols - 1)))


@given(wells_on_plates(), st.sampled_from(["{r}{c}", "{r}{c:02d}", "{r}{c:03d}", "{r}/{c}", " {r}{c:02d} "]),
       st.booleans())
def test_well_round_trips_in_every_spelling(case: tuple[int, Well], spelling: str, lower: bool) -> None:
    fmt, well = case
    letters = well.row_letter.lower() if lower else well.row_letter
    text = spelling.format(r=letters, c=well.col_number)
    assert parse_well(text, fmt) == well
    assert parse_well(well.name, fmt) == well
    assert parse_well(text).name == well.name


@given(wells_on_plates())
def test_canonical_name_shape(case: tuple[int, Well]) -> None:
    _, well = case
    assert well.name == f"{well.row_letter}{well.col_number:02d}"
    assert len(well.name) in (3, 4)
    assert row_index(well.row_letter) == well.row


@given(wells_on_plates())
def test_inferred_format_holds_the_well_and_is_smallest(case: tuple[int, Well]) -> None:
    fmt, well = case
    inferred = infer_plate_format([well.name])
    assert inferred <= fmt
    parse_well(well.name, inferred)  # on the inferred plate
    smaller = [f for f in PLATE_FORMATS if f < inferred]
    for f in smaller:
        with pytest.raises(WellIdError):
            parse_well(well.name, f)


def test_row_letters_past_z() -> None:
    assert [row_letter(i) for i in (0, 25, 26, 31)] == ["A", "Z", "AA", "AF"]
    assert parse_well("AF48", 1536) == Well(31, 47)
    assert parse_well("aa01").name == "AA01"
    assert len(all_wells(1536)) == 1536
    assert all_wells(96)[-1].name == "H12"


def test_wells_sort_row_major() -> None:
    names = ["B01", "A12", "A02", "AA01", "Z48"]
    assert [w.name for w in sorted(parse_well(n) for n in names)] == ["A02", "A12", "B01", "Z48", "AA01"]


@pytest.mark.parametrize(("text", "fmt", "fragment"), [
    ("I01", 96, "not on a 96-well plate (rows A-H, columns 1-12)"),
    ("A13", 96, "columns 1-12"),
    ("A0", None, "columns start at 1"),
    ("AG01", None, "not on any standard plate"),
    ("A49", None, "not on any standard plate"),
    ("01A", None, "is not a well ID"),
    ("", None, "is not a well ID"),
    ("ABC1", None, "is not a well ID"),
])
def test_bad_wells_are_explained(text: str, fmt: int | None, fragment: str) -> None:
    with pytest.raises(WellIdError) as info:
        parse_well(text, fmt)
    assert fragment in str(info.value)
    assert isinstance(info.value, InputDataError) and isinstance(info.value, ValueError)


def test_unknown_plate_format() -> None:
    with pytest.raises(ValueError, match="not a standard plate format"):
        parse_well("A01", 100)


def test_infer_plate_format_examples() -> None:
    assert infer_plate_format(["A01", "B03"]) == 6
    assert infer_plate_format(["H12"]) == 96
    assert infer_plate_format(["A13"]) == 384
    assert infer_plate_format(["Q01"]) == 1536
    with pytest.raises(WellIdError):
        infer_plate_format([])


@pytest.mark.parametrize("header", ["well", "Well", "WELL", "well_id", "Metadata_Well"])
@pytest.mark.parametrize("sep", [",", "\t", ";"])
def test_layout_well_column_spellings_and_separators(tmp_path, header: str, sep: str) -> None:
    path = tmp_path / "layout.txt"
    rows = [[header, "compound", "label"], ["a1", "DMSO", "0"], ["B03", "taxol 1uM", "1"], ["C/12", "", "1"]]
    path.write_text("\n".join(sep.join(r) for r in rows) + "\n")
    table = read_layout(path)
    assert list(table.columns) == ["well", "compound", "label"]
    assert table["well"].tolist() == ["A01", "B03", "C12"]
    assert table["label"].tolist() == ["0", "1", "1"]  # text, not numbers
    assert table["compound"].isna().tolist() == [False, False, True]


def test_layout_tsv_with_bom_and_well_not_first(tmp_path) -> None:
    path = tmp_path / "map.tsv"
    path.write_bytes("\ufeffmoa\tWell\nactin\tA01\ntubulin\tA02\n".encode())
    table = read_layout(path)
    assert table.to_dict("list") == {"well": ["A01", "A02"], "moa": ["actin", "tubulin"]}


def test_layout_duplicate_well_names_both_lines(tmp_path) -> None:
    path = tmp_path / "layout.csv"
    path.write_text("well,x\nA01,1\nB02,2\nA1,3\n")
    with pytest.raises(InputDataError, match=r"well A01 is listed twice \(lines 2 and 4\)") as info:
        read_layout(path)
    assert str(path) in str(info.value)


def test_layout_bad_well_names_file_and_line(tmp_path) -> None:
    path = tmp_path / "layout.csv"
    path.write_text("well,x\nA01,1\nfoo,2\n")
    with pytest.raises(InputDataError, match=r"line 3: 'foo' is not a well ID") as info:
        read_layout(path)
    assert str(path) in str(info.value)


def test_layout_off_plate_well_with_format(tmp_path) -> None:
    path = tmp_path / "layout.csv"
    path.write_text("well\nA01\nP24\n")
    assert read_layout(path, 384)["well"].tolist() == ["A01", "P24"]
    with pytest.raises(InputDataError, match="line 3: well P24"):
        read_layout(path, 96)


def test_layout_problems(tmp_path) -> None:
    with pytest.raises(InputDataError, match="does not exist"):
        read_layout(tmp_path / "missing.csv")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(InputDataError, match="is empty"):
        read_layout(empty)
    no_well = tmp_path / "nowell.csv"
    no_well.write_text("plate,compound\nP1,DMSO\n")
    with pytest.raises(InputDataError, match="no well column .*plate, compound"):
        read_layout(no_well)
    blank = tmp_path / "blank.csv"
    blank.write_text("well,x\nA01,1\n,2\n")
    with pytest.raises(InputDataError, match="line 3: the well cell is empty"):
        read_layout(blank)


def test_layout_from_an_excel_workbook(tmp_path) -> None:
    import pandas as pd


    path = tmp_path / "layout.xlsx"
    pd.DataFrame({"Well": ["a1", "B/3"], "treatment": ["DMSO", "nocodazole"], "dose": ["0", "1.5"]}).to_excel(
        path, index=False)
    table = read_layout(path)
    assert table["well"].tolist() == ["A01", "B03"]
    assert table["treatment"].tolist() == ["DMSO", "nocodazole"] and table["dose"].tolist() == ["0", "1.5"]
    path.write_bytes(b"PK\x03\x04 not really a workbook")
    with pytest.raises(InputDataError, match="layout.xlsx.*export the sheet as CSV"):
        read_layout(path)
