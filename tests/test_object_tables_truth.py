"""Issue 22 (trust, round 2), object tables: a failed object table (its label image deleted) is a failure
everywhere — in `pcim explain --json` failed[], in its exit code and in `pcim status` (exit 3), one truth
from the store's records; removing plate.objects removes pcim's stale `{plate}_pcim_{Object}.csv` (and
says so), never a user's file of a similar name.
"""

from __future__ import annotations

import json
from pathlib import Path

from cli_runner import run_pcim
from plates import make_plate


def test_a_failed_object_table_is_in_failed_and_in_status_exit_code(tmp_path: Path) -> None:
    plate = make_plate(tmp_path, wells=("A01",), steps=2, objects=True)
    zarr_path = tmp_path / "out" / "P1.zarr"
    assert run_pcim("explain", str(plate)).returncode == 0
    assert run_pcim("status", str(zarr_path)).returncode == 0
    (tmp_path / "labels" / "A01_s2_nuclei.tif").unlink()

    proc = run_pcim("explain", str(plate), "--json")
    assert proc.returncode == 3, proc.stderr[-2000:]
    doc = json.loads(proc.stdout)
    assert [(f["well"], f["site"], f.get("object")) for f in doc["failed"]] == [("A01", 2, "Nuclei")], doc
    assert "A01_s2_nuclei.tif" in doc["failed"][0]["error"]

    status = run_pcim("status", str(zarr_path), "--json")
    assert status.returncode == 3, status.stderr[-2000:]
    totals = json.loads(status.stdout)["totals"]
    assert totals["done"] == 2 and totals["object_failures"] == 1, totals
    text = run_pcim("status", str(zarr_path))
    assert text.returncode == 3 and "Nuclei table failed A/1/1" in text.stdout, text.stdout
    screen = run_pcim("status", str(plate), str(plate))  # the screen view (one row per plate) agrees
    assert screen.returncode == 3, screen.stdout


def test_removing_plate_objects_removes_pcims_stale_table_only(tmp_path: Path) -> None:
    plate = make_plate(tmp_path, wells=("A01",), steps=2, objects=True)
    assert run_pcim("explain", str(plate)).returncode == 0
    nuclei = tmp_path / "out" / "P1_pcim_Nuclei.csv"
    assert nuclei.is_file()
    users = tmp_path / "out" / "P1_pcim_Cells.csv"  # a user's table named like pcim's
    users.write_text("ImageNumber,ObjectNumber,AreaShape_Area\n1,1,240\n")

    proc = run_pcim("explain", str(plate), "--set", "plate.objects=null", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not nuclei.exists() and users.read_text().startswith("ImageNumber")
    assert json.loads(proc.stdout)["removed"] == [str(nuclei)]
    assert f"removed the stale table {nuclei}" in proc.stderr
    assert run_pcim("status", str(tmp_path / "out" / "P1.zarr")).returncode == 0
