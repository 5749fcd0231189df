"""Never serve a stale map, never lose a row (issue 13): settings, input files, plates and wells that
change between runs, through the installed `pcim` on real TIFFs and a real Zarr store read back.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from cli_runner import run_pcim
from plates import make_plate
from truth import assert_consistent, field_record, plate_record

WELLS = ("A01", "A02")


def fitted(proc) -> int:
    """Maps computed by a run, from its summary line."""
    match = re.search(r"\((\d+) fitted by this run\)", proc.stderr)
    assert match, proc.stderr[-2000:]
    return int(match.group(1))


def out(plate: Path) -> tuple[Path, Path]:
    return plate.parent / "out" / "P1.zarr", plate.parent / "out" / "P1.csv"


def tree_digest(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------------
# stale or mixed-up maps


@pytest.mark.slow
def test_swapped_channel_tokens_redo_every_field(tmp_path: Path) -> None:
    plate = make_plate(tmp_path, wells=WELLS, steps=2)
    assert run_pcim("explain", str(plate)).returncode == 0
    swapped = run_pcim("explain", str(plate), "--set", 'plate.channels={DNA: "3", PH3: "2", Actin: "1"}')
    assert swapped.returncode == 0, swapped.stderr[-2000:]
    assert fitted(swapped) == 4
    assert_consistent(*out(plate))


@pytest.mark.slow
def test_changed_input_files_redo_their_fields_and_identical_copies_do_not(tmp_path: Path) -> None:
    plate = make_plate(tmp_path, wells=("A01", "A02", "B01"), steps=2)
    zarr_path, csv_path = out(plate)
    assert run_pcim("explain", str(plate)).returncode == 0
    images = tmp_path / "images"

    copy = tmp_path / "copy"  # the same pixels in a new folder, new modification times
    copy.mkdir()
    for path in images.iterdir():
        shutil.copyfile(path, copy / path.name)
    same = run_pcim("explain", str(plate), "--set", "plate.images=copy")
    assert same.returncode == 0 and fitted(same) == 0, same.stderr[-2000:]

    # A02 site 1's PH3 plane is exported again, with other pixels, under the same name
    replaced = copy / "A02_s1_w2.tif"
    tifffile.imwrite(replaced, np.flipud(tifffile.imread(replaced)))
    one = run_pcim("explain", str(plate), "--set", "plate.images=copy")
    assert one.returncode == 0 and fitted(one) == 1, one.stderr[-2000:]
    assert field_record(zarr_path, "A/2/0")["fingerprint"] == plate_record(zarr_path)["fingerprint"]

    other = tmp_path / "other"  # another plate's images under the same names: every field is redone
    other.mkdir()
    for path in images.iterdir():
        donor = path.name.replace("A0", "C0").replace("B0", "D0")
        shutil.copyfile(Path(__file__).resolve().parents[1] / "sample_plates/demo/images" / donor, other / path.name)
    redo = run_pcim("explain", str(plate), "--set", "plate.images=other")
    assert redo.returncode == 0 and fitted(redo) == 6, redo.stderr[-2000:]
    assert_consistent(zarr_path, csv_path)


@pytest.mark.slow
def test_a_second_plate_is_refused_in_another_plates_store_unless_forced(tmp_path: Path) -> None:
    plate = make_plate(tmp_path, wells=WELLS, steps=2, output={"zarr": "out/maps.zarr"})
    zarr_path = tmp_path / "out" / "maps.zarr"
    assert run_pcim("explain", str(plate)).returncode == 0
    before = tree_digest(zarr_path)

    second = run_pcim("explain", str(plate), "--set", "plate.name=P2")
    assert second.returncode == 65, second.stderr[-2000:]
    line = second.stderr.strip().splitlines()[-1]
    assert line.startswith("pcim: error:") and str(zarr_path) in line and "P1" in line and "--force" in line
    assert tree_digest(zarr_path) == before and not (tmp_path / "out" / "P2.csv").exists()

    forced = run_pcim("explain", str(plate), "--set", "plate.name=P2", "--force")
    assert forced.returncode == 0 and fitted(forced) == 4, forced.stderr[-2000:]
    table = pd.read_csv(tmp_path / "out" / "P2.csv")
    assert (table["Metadata_Plate"] == "P2").all() and len(table) == 4
    assert plate_record(zarr_path)["plate"] == "P2"
    assert_consistent(zarr_path, tmp_path / "out" / "P2.csv")


@pytest.mark.slow
def test_renamed_classes_never_leave_old_names_in_the_csv(tmp_path: Path) -> None:
    plate = make_plate(tmp_path, wells=WELLS, steps=2, explain={"target": "all"})
    assert run_pcim("explain", str(plate)).returncode == 0
    renamed = run_pcim("explain", str(plate), "--set", "model.classes=[neg, mit]")
    assert renamed.returncode == 0, renamed.stderr[-2000:]
    table = pd.read_csv(out(plate)[1])
    assert set(table["PCIM_Target"]) == {"neg", "mit"} and set(table["PCIM_PredictedClass"]) <= {"neg", "mit"}


# --------------------------------------------------------------------------------------------------
# a plate.wells subset keeps the whole plate


@pytest.mark.slow
def test_a_plate_wells_subset_keeps_every_row_and_failure_of_the_store(tmp_path: Path) -> None:
    plate = make_plate(tmp_path, wells=("A01", "A02", "B01"), steps=2)
    (tmp_path / "images" / "A02_s1_w2.tif").write_bytes(b"")
    (tmp_path / "images" / "B01_s2_w1.tif").write_bytes(b"not a tiff")
    zarr_path, csv_path = out(plate)
    assert run_pcim("explain", str(plate)).returncode == 3
    before = pd.read_csv(csv_path, keep_default_na=False)
    assert len(before) == 6 and (before["PCIM_Status"] == "failed").sum() == 2

    subset = run_pcim("explain", str(plate), "--set", "plate.wells=[A01]")
    assert subset.returncode == 3, subset.stderr[-2000:]
    after = pd.read_csv(csv_path, keep_default_na=False)
    assert len(after) == 6
    cols = ["Metadata_Well", "Metadata_Site", "PCIM_Status"]
    assert after[cols].equals(before[cols])
    failed = after[after["PCIM_Status"] == "failed"]
    assert failed["PCIM_Error"].str.contains("A02_s1_w2.tif is empty").any()
    assert failed["PCIM_Error"].str.contains("B01_s2_w1.tif").any()
    status = json.loads(run_pcim("status", str(zarr_path), "--json").stdout)
    assert status["totals"]["failed"] == 2 and status["totals"]["done"] == 4
    assert_consistent(zarr_path, csv_path)
