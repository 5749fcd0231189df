"""Reruns that never lose or redo work, the run lock, `pcim status`, and the store as other tools see it.

Everything runs the installed `pcim` on real TIFFs, the real TorchScript demo classifier and a real
Zarr store, read back afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr
from cli_runner import run_pcim, start_pcim
from ome_zarr.io import parse_url
from ome_zarr.reader import Reader
from ome_zarr_models import v04, v05
from ome_zarr_models.exceptions import ValidationWarning
from plates import DEMO, make_plate

from pcim_cli.io import store
from pcim_cli.io.lock import LOCK_NAME

WELLS = ("A01", "A02", "B01", "B02")


def _records(zarr_path: Path, wells=WELLS) -> dict[tuple[str, int], dict | None]:
    return {(w, i): store.read_record(zarr_path, w, i) for w in wells for i in (0, 1)}


def _tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return digest.hexdigest()


def _wait_for(predicate, timeout: float = 240, what: str = "") -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture()
def plate(tmp_path: Path) -> Path:
    return make_plate(tmp_path, wells=WELLS, steps=5)


@pytest.mark.slow
def test_rerun_skips_done_fields_and_redoes_changed_settings(plate: Path) -> None:
    zarr_path = plate.parent / "out" / "P1.zarr"
    first = run_pcim("explain", str(plate))
    assert first.returncode == 0, first.stderr[-2000:]
    done = _records(zarr_path)
    assert all(r["status"] == "done" for r in done.values())

    same = run_pcim("explain", str(plate), "--set", "compute.batch_size=3")  # does not change a map
    assert same.returncode == 0 and "0 fitted by this run" in same.stderr, same.stderr[-2000:]
    assert _records(zarr_path) == done

    changed = run_pcim("explain", str(plate), "--set", "explain.steps=6")  # changes every map
    assert changed.returncode == 0 and "8 fitted by this run" in changed.stderr, changed.stderr[-2000:]
    redone = _records(zarr_path)
    assert all(redone[k]["fingerprint"] != done[k]["fingerprint"] for k in done)

    only = run_pcim("explain", str(plate), "--set", "explain.steps=6", "--only", "a2,B/1", "--force")
    assert only.returncode == 0 and "4 fitted by this run" in only.stderr, only.stderr[-2000:]
    again = _records(zarr_path)
    assert [k for k in again if again[k] != redone[k]] == [("A02", 0), ("A02", 1), ("B01", 0), ("B01", 1)]
    df = pd.read_csv(plate.parent / "out" / "P1.csv")  # the CSV always lists the whole plate
    assert len(df) == 8 and (df["PCIM_Status"] == "done").all()


def test_dry_run_writes_nothing_and_lists_the_plan(plate: Path) -> None:
    assert run_pcim("explain", str(plate), "--only", "A01").returncode == 0
    out = plate.parent / "out"
    before = _tree_digest(out)
    proc = run_pcim("explain", str(plate), "--dry-run", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    plan = json.loads(proc.stdout)
    assert plan["counts"]["done"] == 2 and plan["counts"]["run"] == 6 and plan["wells"] == 3
    assert {(f["well"], f["action"]) for f in plan["fields"]} == {
        ("A01", "done"), ("A02", "run"), ("B01", "run"), ("B02", "run")}
    assert _tree_digest(out) == before


@pytest.mark.slow
def test_json_output_matches_the_csv(plate: Path) -> None:
    (plate.parent / "images" / "B02_s2_w3.tif").write_bytes(b"")
    proc = run_pcim("explain", str(plate), "--json", "-q")
    assert proc.returncode == 3
    doc = json.loads(proc.stdout)  # stdout holds the JSON document only
    df = pd.read_csv(doc["csv"])
    assert doc["status"] == "partial" and doc["exit_code"] == 3
    assert doc["counts"] == df["PCIM_Status"].value_counts().reindex(["done", "failed", "skipped"],
                                                                     fill_value=0).to_dict()
    bad = df[df["PCIM_Status"] == "failed"]
    assert [(f["well"], f["site"]) for f in doc["failed"]] == list(zip(bad["Metadata_Well"], bad["Metadata_Site"],
                                                                       strict=True))


@pytest.mark.slow
def test_kill_9_mid_plate_then_rerun_completes_without_redoing(tmp_path: Path) -> None:
    wells = ("A01", "A02", "A03", "B01", "B02", "B03")
    plate = make_plate(tmp_path, wells=wells, steps=150, compute={"batch_size": 1})
    zarr_path = tmp_path / "out" / "P1.zarr"
    proc = start_pcim("explain", str(plate))

    def finished() -> list[tuple[str, int]]:
        recs = _records(zarr_path, wells) if (zarr_path / "zarr.json").exists() else {}
        return [k for k, r in recs.items() if r is not None]

    _wait_for(lambda: len(finished()) >= 3 or proc.poll() is not None, what="three finished fields")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = _records(zarr_path, wells)
    done_before = [k for k, r in before.items() if r is not None]
    assert 3 <= len(done_before) < 12, "the run must be killed mid-plate"
    assert (zarr_path / LOCK_NAME).exists()  # a dead run leaves its lock behind

    rerun = run_pcim("explain", str(plate), "--set", "explain.steps=150")
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "taking over the lock" in rerun.stderr and "its process no longer runs" in rerun.stderr
    after = _records(zarr_path, wells)
    assert all(r is not None and r["status"] == "done" for r in after.values())
    assert {k: after[k] for k in done_before} == {k: before[k] for k in done_before}  # not recomputed
    assert f"{12 - len(done_before)} fitted by this run" in rerun.stderr
    for (well, index) in after:  # every field readable, none corrupt
        maps, labels, _ = store.read_field(zarr_path, well, index)
        assert maps.shape == (1, 128, 128) and np.isfinite(maps).all() and len(labels) == 1
    df = pd.read_csv(tmp_path / "out" / "P1.csv")
    assert len(df) == 12 and not df.duplicated(["Metadata_Well", "Metadata_Site"]).any()
    assert not (zarr_path / LOCK_NAME).exists()


@pytest.mark.slow
def test_second_run_on_the_same_store_exits_75_naming_the_holder(tmp_path: Path) -> None:
    plate = make_plate(tmp_path, wells=WELLS, steps=300, compute={"batch_size": 1})
    zarr_path = tmp_path / "out" / "P1.zarr"
    first = start_pcim("explain", str(plate))
    try:
        _wait_for(lambda: (zarr_path / LOCK_NAME).exists() or first.poll() is not None, what="the lock")
        second = run_pcim("explain", str(plate))
        assert second.returncode == 75, second.stderr[-2000:]
        assert "is locked by another pcim run" in second.stderr and f"pid {first.pid}" in second.stderr
    finally:
        out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-2000:]
    assert not (zarr_path / LOCK_NAME).exists()


@pytest.mark.slow
def test_status_counts_done_failed_and_missing(plate: Path) -> None:
    (plate.parent / "images" / "A02_s2_w1.tif").write_bytes(b"not a tiff")
    assert run_pcim("explain", str(plate)).returncode == 3
    zarr_path = plate.parent / "out" / "P1.zarr"
    proc = run_pcim("status", str(zarr_path), "--json")
    assert proc.returncode == 3
    doc = json.loads(proc.stdout)
    assert {k: doc["totals"][k] for k in ("fields", "done", "failed", "missing")} == {
        "fields": 8, "done": 7, "failed": 1, "missing": 0}
    a02 = next(w for w in doc["wells"] if w["well"] == "A02")
    assert a02["failed"] == 1 and "A02_s2_w1.tif" in a02["errors"][0]
    table = run_pcim("status", str(zarr_path))
    assert "A02" in table.stdout and "\x1b[" not in table.stdout + table.stderr  # no control sequences
    assert run_pcim("status", str(plate.parent / "nowhere.zarr")).returncode == 65


@pytest.mark.slow
def test_csv_joins_profiles_on_plate_and_well_without_renaming(plate: Path) -> None:
    assert run_pcim("explain", str(plate)).returncode == 0
    df = pd.read_csv(plate.parent / "out" / "P1.csv")
    layout = pd.read_csv(DEMO / "layout.csv")
    profiles = pd.DataFrame({"Metadata_Plate": "P1", "Metadata_Well": layout["well"],
                             "Cells_Intensity": np.arange(len(layout), dtype=float)})
    joined = df.merge(profiles, on=["Metadata_Plate", "Metadata_Well"], how="left", validate="many_to_one")
    assert len(joined) == len(df) == 8 and joined["Cells_Intensity"].notna().all()
    assert (joined["Metadata_treatment"] == joined["Metadata_Well"].map(
        dict(zip(layout["well"], layout["treatment"], strict=True)))).all()


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["0.5", "0.4"])
def test_store_validates_and_reads_back_through_ome_zarr(tmp_path: Path, fmt: str) -> None:
    plate = make_plate(tmp_path, wells=("A01", "B02"), output={"format": fmt})
    assert run_pcim("explain", str(plate)).returncode == 0
    zarr_path = tmp_path / "out" / "P1.zarr"
    models = v05 if fmt == "0.5" else v04
    root = zarr.open_group(str(zarr_path), mode="r")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ValidationWarning)
        models.HCS.from_zarr(root)
        models.Well.from_zarr(root["B/2"])
        models.Image.from_zarr(root["B/2/1"])
    node = list(Reader(parse_url(str(zarr_path / "B/2/1")))())[0]
    maps, labels, _ = store.read_field(zarr_path, "B02", 1)
    np.testing.assert_array_equal(np.asarray(node.data[0]), maps)
    assert node.metadata["channel_names"] == labels
