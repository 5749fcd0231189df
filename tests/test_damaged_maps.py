"""Issue 22 (trust, round 2), defect 6 and the field-group item: a field is done only when its map arrays
open and all their chunk files are there. A damaged array metadata or deleted chunks make the field
`damaged` in `pcim status` (exit 3) and the next `pcim explain` redoes it; a redo (or --force) recreates
only what pcim owns in a field group, so a label layer a user added (in napari) survives.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import zarr
from cli_runner import run_pcim
from plates import make_plate
from truth import assert_consistent

from pcim_cli.io import store

WELLS = ("A01", "A02")


def fitted(proc) -> int:
    match = re.search(r"\((\d+) fitted by this run\)", proc.stderr)
    assert match, proc.stderr[-2000:]
    return int(match.group(1))


def test_a_damaged_map_array_is_damaged_in_status_and_redone(tmp_path: Path) -> None:
    plate = make_plate(tmp_path, wells=WELLS, steps=2)
    zarr_path, csv_path = tmp_path / "out" / "P1.zarr", tmp_path / "out" / "P1.csv"
    assert run_pcim("explain", str(plate)).returncode == 0
    (zarr_path / "A" / "2" / "0" / "0" / "zarr.json").write_text("xx\n")  # the map array's metadata
    chunks = [p for p in (zarr_path / "A" / "1" / "1" / "0").rglob("*") if p.is_file() and p.name != "zarr.json"]
    assert chunks
    for chunk in chunks:  # the map's pixels gone: zarr would read zeros
        chunk.unlink()

    status = run_pcim("status", str(zarr_path), "--json")
    assert status.returncode == 3, status.stderr[-2000:]
    fields = {f["path"]: f for f in json.loads(status.stdout)["fields"]}
    assert fields["A/2/0"]["state"] == "damaged" and "A/2/0/0" in fields["A/2/0"]["error"]
    assert fields["A/1/1"]["state"] == "damaged" and "chunk" in fields["A/1/1"]["error"]
    assert {fields[p]["state"] for p in ("A/1/0", "A/2/1")} == {"done"}
    text = run_pcim("status", str(zarr_path)).stdout
    assert "damaged A/2/0" in text and "damaged A/1/1" in text

    rerun = run_pcim("explain", str(plate))
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert fitted(rerun) == 2
    assert set(assert_consistent(zarr_path, csv_path).values()) == {"done"}
    for well, index in (("A01", 1), ("A02", 0)):
        maps, _, record = store.read_field(zarr_path, well, index)
        assert record["status"] == "done" and maps.sum() > 0


def _add_users_label_layer(zarr_path: Path, rel: str) -> np.ndarray:
    """What napari-ome-zarr adds when a user saves a label layer drawn over a field."""
    field = zarr.open_group(str(zarr_path), path=rel, mode="r+")
    labels = field["labels"]
    drawn = np.zeros((128, 128), dtype=np.uint16)
    drawn[10:20, 30:50] = 7
    layer = labels.create_group("my_annotations", attributes={"ome": {
        "version": "0.5", "image-label": {"source": {"image": "../../"}},
        "multiscales": [{"axes": [{"name": "y", "type": "space"}, {"name": "x", "type": "space"}],
                         "datasets": [{"path": "0", "coordinateTransformations": [
                             {"type": "scale", "scale": [1.0, 1.0]}]}]}]}})
    layer.create_array("0", data=drawn)
    ome = dict(labels.attrs["ome"])
    labels.update_attributes({"ome": {**ome, "labels": [*ome["labels"], "my_annotations"]}})
    (zarr_path / rel / "my_notes.txt").write_text("cells in the corner look odd\n")
    return drawn


def test_a_redo_keeps_what_a_user_added_to_a_field_group(tmp_path: Path) -> None:
    plate = make_plate(tmp_path, wells=("A01",), steps=2, objects=True)
    zarr_path = tmp_path / "out" / "P1.zarr"
    assert run_pcim("explain", str(plate)).returncode == 0
    drawn = _add_users_label_layer(zarr_path, "A/1/0")

    forced = run_pcim("explain", str(plate), "--force", "--set", "explain.steps=3")
    assert forced.returncode == 0 and fitted(forced) == 2, forced.stderr[-2000:]
    field = zarr.open_group(str(zarr_path), path="A/1/0", mode="r")
    assert np.array_equal(field["labels/my_annotations/0"][...], drawn)
    assert sorted(field["labels"].attrs["ome"]["labels"]) == ["Nuclei", "my_annotations"]
    assert (zarr_path / "A/1/0/my_notes.txt").read_text() == "cells in the corner look odd\n"
    record = store.read_record(zarr_path, "A01", 0)
    assert record["status"] == "done" and record["settings"]["engine"]["steps"] == 3
    assert field["labels/Nuclei/0"][...].max() > 0  # pcim's own labels made again

    no_objects = run_pcim("explain", str(plate), "--set", "explain.steps=3", "--set", "plate.objects=null")
    assert no_objects.returncode == 0, no_objects.stderr[-2000:]  # pcim's Nuclei labels go, the user's stay
    field = zarr.open_group(str(zarr_path), path="A/1/0", mode="r")
    assert field["labels"].attrs["ome"]["labels"] == ["my_annotations"] and "Nuclei" not in field["labels"]
    assert np.array_equal(field["labels/my_annotations/0"][...], drawn)
