"""The CSV summary: column contract (docs/reference/csv.md), layout join, plate order, atomic writes."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

from pcim_cli.errors import OutputError
from pcim_cli.io import store, summary

EXPECTED_COLUMNS = [
    "Metadata_Plate",
    "Metadata_Well",
    "Metadata_Site",
    "PCIM_Target",
    "PCIM_PredictedClass",
    "PCIM_ProbOriginal",
    "PCIM_ProbMixed",
    "PCIM_ProbDeleted",
    "PCIM_DeletionAUC",
    "PCIM_InsertionAUC",
    "PCIM_Fit",
    "PCIM_Status",
    "PCIM_Error",
    "PCIM_Runtime_s",
    "PCIM_ZarrPath",
]


def _row(well: str, site: int = 0, target: str = "mitotic", **extra: object) -> dict[str, object]:
    row: dict[str, object] = {
        "plate": "P001",
        "well": well,
        "site": site,
        "target": target,
        "predicted_class": "mitotic",
        "prob_original": 0.9,
        "prob_mixed": 0.95,
        "deletion_auc": 0.2,
        "insertion_auc": 0.7,
        "status": "done",
        "error": "",
        "runtime_s": 1.5,
        "zarr_path": store.field_path(well, site),
    }
    row.update(extra)
    return row


@pytest.fixture
def layout() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "well": ["A12", "B01", "C03", "AA01"],
            "treatment": ["DMSO", "nocodazole", "taxol", "DMSO"],
            "Metadata_Dose_uM": [0.0, 1.0, 0.5, 0.0],
        }
    )


def test_fixed_columns_in_contract_order() -> None:
    assert list(summary.COLUMNS) == EXPECTED_COLUMNS
    assert list(summary.build_summary([_row("A01")], None).columns) == EXPECTED_COLUMNS
    assert list(summary.build_summary([], None).columns) == EXPECTED_COLUMNS


def test_layout_columns_are_prefixed_once_and_sit_after_site(layout: pd.DataFrame) -> None:
    df = summary.build_summary([_row("A12")], layout)
    # an already prefixed column is kept: Metadata_Dose_uM, not Metadata_Metadata_Dose_uM
    expected = [*EXPECTED_COLUMNS[:3], "Metadata_treatment", "Metadata_Dose_uM", *EXPECTED_COLUMNS[3:]]
    assert list(df.columns) == expected
    assert df.loc[0, "Metadata_treatment"] == "DMSO"
    assert list(summary.build_summary([], layout).columns) == list(df.columns)


def test_rows_sort_in_plate_order_then_site_then_target(layout: pd.DataFrame) -> None:
    rows = [
        _row("AA01"),
        _row("B01", site=1),
        _row("B01", site=0, target="negative"),
        _row("B01", site=0, target="mitotic"),
        _row("A12"),
        _row("C03"),
    ]
    df = summary.build_summary(rows, layout)
    assert list(df["Metadata_Well"]) == ["A12", "B01", "B01", "B01", "C03", "AA01"]
    assert list(df["Metadata_Site"]) == [0, 0, 0, 1, 0, 0]
    assert list(df["PCIM_Target"])[1:3] == ["mitotic", "negative"]
    treatments = ["DMSO", "nocodazole", "nocodazole", "nocodazole", "taxol", "DMSO"]
    assert list(df["Metadata_treatment"]) == treatments


def test_wells_missing_from_the_layout_keep_their_rows(layout: pd.DataFrame) -> None:
    df = summary.build_summary([_row("H12"), _row("A12")], layout)
    assert list(df["Metadata_Well"]) == ["A12", "H12"]
    assert pd.isna(df.loc[1, "Metadata_treatment"])


def test_failed_rows_keep_numeric_columns_numeric() -> None:
    failed = _row("A01", status="failed", error="TIFF unreadable", predicted_class=None)
    for key in ("prob_original", "prob_mixed", "deletion_auc", "insertion_auc", "runtime_s"):
        failed[key] = None
    df = summary.build_summary([failed, _row("A02")], None)
    for column in summary.FLOAT_COLUMNS:
        assert df[column].dtype == "float64"
    assert df.loc[0, "PCIM_Status"] == "failed" and df.loc[0, "PCIM_Error"] == "TIFF unreadable"


def test_joins_with_profiles_without_renaming(layout: pd.DataFrame) -> None:
    df = summary.build_summary([_row("A12"), _row("B01"), _row("C03")], layout)
    profiles = pd.DataFrame(  # a pycytominer-style per-well profile
        {
            "Metadata_Plate": ["P001", "P001"],
            "Metadata_Well": ["A12", "C03"],
            "Cells_AreaShape_Area": [120.0, 340.0],
        }
    )
    joined = df.merge(profiles, on=["Metadata_Plate", "Metadata_Well"], how="inner")
    assert list(joined["Metadata_Well"]) == ["A12", "C03"]
    assert list(joined["Cells_AreaShape_Area"]) == [120.0, 340.0]


def test_layout_problems_are_reported(layout: pd.DataFrame) -> None:
    with pytest.raises(ValueError, match="'well'"):
        summary.build_summary([_row("A12")], layout.rename(columns={"well": "Well"}))
    with pytest.raises(ValueError):  # one layout row per well, or rows would be duplicated
        summary.build_summary([_row("A12")], pd.concat([layout, layout]))


def test_layout_column_that_would_shadow_an_id_is_left_out(layout: pd.DataFrame) -> None:
    df = summary.build_summary([_row("A12")], layout.assign(Plate="other", Metadata_Site=9))
    assert df.loc[0, "Metadata_Plate"] == "P001" and df.loc[0, "Metadata_Site"] == 0
    assert list(df.columns).count("Metadata_Plate") == 1


def test_write_csv_atomic_round_trips_and_leaves_no_temp_file(tmp_path: Path, layout: pd.DataFrame) -> None:
    df = summary.build_summary([_row("A12"), _row("B01", site=2)], layout)
    path = tmp_path / "out" / "nested" / "P001_pcim.csv"  # parent folders are created
    summary.write_csv_atomic(df, path)
    assert os.listdir(path.parent) == [path.name]
    back = pd.read_csv(path, keep_default_na=False, na_values=[""])
    assert list(back.columns) == list(df.columns)
    assert list(back["Metadata_Well"]) == ["A12", "B01"]
    assert back.loc[1, "PCIM_ZarrPath"] == "B/1/2"

    summary.write_csv_atomic(df.iloc[:1], path)  # overwrite in place
    assert len(pd.read_csv(path)) == 1 and os.listdir(path.parent) == [path.name]


def test_failed_rename_keeps_the_old_csv_and_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "P001_pcim.csv"
    path.write_text("old\n")

    def broken_replace(src: object, dst: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(summary.os, "replace", broken_replace)
    with pytest.raises(OutputError, match="disk full"):
        summary.write_csv_atomic(summary.build_summary([_row("A01")], None), path)
    assert path.read_text() == "old\n"
    assert os.listdir(tmp_path) == [path.name]


def test_unwritable_csv_is_an_output_error_naming_the_path(tmp_path: Path) -> None:
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a regular file")  # works as root too, unlike a read-only folder
    path = blocker / "P001_pcim.csv"
    with pytest.raises(OutputError, match=str(path)) as info:
        summary.write_csv_atomic(summary.build_summary([_row("A01")], None), path)
    assert "output.csv" in str(info.value)
