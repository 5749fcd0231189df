"""Issue 22 (trust, round 2), defect 5: with `explain.target: layout:<column>`, the target each field
resolves to is part of what makes its map current. A well whose class changes in the layout is redone
(and marked stale before anything runs); a well the layout no longer gives a usable target fails; the
CSV never pairs a layout row with a target the layout no longer gives.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
from cli_runner import run_pcim
from plates import make_plate
from truth import assert_consistent


def fitted(proc) -> int:
    match = re.search(r"\((\d+) fitted by this run\)", proc.stderr)
    assert match, proc.stderr[-2000:]
    return int(match.group(1))


def set_class(layout: Path, well: str, value: str) -> None:
    table = pd.read_csv(layout, dtype=str)
    table.loc[table["well"] == well, "expected_class"] = value
    table.to_csv(layout, index=False)


def test_a_well_whose_layout_class_changes_is_redone_and_never_paired_with_its_old_target(tmp_path: Path) -> None:
    plate = make_plate(tmp_path, wells=("A01", "A02"), steps=2, explain={"target": "layout:expected_class"})
    zarr_path, csv_path = tmp_path / "out" / "P1.zarr", tmp_path / "out" / "P1.csv"
    assert run_pcim("explain", str(plate)).returncode == 0
    layout = tmp_path / "layout.csv"
    set_class(layout, "A01", "negative")  # was mitotic

    dry = run_pcim("explain", str(plate), "--dry-run")
    assert dry.returncode == 0 and "redo A01 site 1 (its target changed (mitotic then, negative now))" in dry.stdout

    rerun = run_pcim("explain", str(plate))
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert fitted(rerun) == 2  # A01's two fields, not A02's
    table = pd.read_csv(csv_path)
    assert (table["PCIM_Target"] == table["Metadata_expected_class"]).all(), table
    assert set(table.loc[table["Metadata_Well"] == "A01", "PCIM_Target"]) == {"negative"}
    assert_consistent(zarr_path, csv_path)

    set_class(layout, "A01", "apoptotic")  # no class of the model: A01 has no target any more
    broken = run_pcim("explain", str(plate))
    assert broken.returncode == 3, broken.stderr[-2000:]
    table = pd.read_csv(csv_path)
    a01 = table[table["Metadata_Well"] == "A01"]
    assert (a01["PCIM_Status"] == "failed").all() and a01["PCIM_Error"].str.contains("apoptotic").all(), a01
    done = table[table["PCIM_Status"] == "done"]
    assert (done["PCIM_Target"] == done["Metadata_expected_class"]).all()
    assert assert_consistent(zarr_path, csv_path) == {"A/1/0": "failed", "A/1/1": "failed", "A/2/0": "done",
                                                      "A/2/1": "done"}
